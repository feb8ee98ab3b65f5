"""RELION's sums-to-map step spread over several devices (slab decomposition, no full gather).

Same maths as `reconstruct.gridding.reconstruct_map` (RELION 3.1 BackProjector::reconstruct), laid
out for G devices: every Fourier-space array (weights, gridding weights, data) is held as y-slabs
of the FFTW-layout half grid, every real-space array as z-slabs, and the 3D FFTs of the gridding
loop and of the final inverse are `SlabFFT`s whose only inter-device traffic is one all-to-all
exchange each. Elementwise steps (multiply, blob, divide inside the sphere) stay local. Only the
final N^3 map is brought together, on the host.
"""

from __future__ import annotations

import time

import numpy as np

from omlrelion.backend import Device, get_xp, is_gpu_array, to_numpy
from omlrelion.geometry.grids import PaddedGrid, signed_freqs
from omlrelion.reconstruct.gridding import (
    add_map_term,
    blob_real_space,
    grid_correct,
    shell_floor_weights,
    soft_mask_outside,
)
from omlrelion.reconstruct.slab_fft import SlabFFT, SlabLayout, _move


def _r2_slab(size: int, rows, xp):
    """|k|^2 (int64) on the y-rows `rows` (FFTW indices) of the side-`size` half grid: (size, ny, H)."""
    k = xp.asarray(signed_freqs(size, np).astype(np.int64))
    ky = k[xp.asarray(rows)]
    kx = xp.arange(size // 2 + 1, dtype=xp.int64)
    return k[:, None, None] ** 2 + ky[None, :, None] ** 2 + kx[None, None, :] ** 2


def _device_of(a) -> Device:
    """The Device an array lives on (the host for NumPy arrays)."""
    return Device(int(a.device.id)) if is_gpu_array(a) else Device()


def _decentred_rows(a_ftc, rows, r2, r2_max, dev: Device):
    """FFTW-layout y-rows `rows` of a projector-centred array, zero where |k|^2 > r2_max, on `dev`."""
    size = a_ftc.shape[0]
    c = size // 2
    z_src = (np.arange(size) + c) % size
    y_src = (np.asarray(rows) + c) % size
    xp = get_xp(a_ftc)
    with _device_of(a_ftc).use():    # gather where the sums live, then copy the slab over
        slab = a_ftc[xp.asarray(z_src)[:, None], xp.asarray(y_src)[None, :], :]
    out = _move(slab, dev)
    out *= (r2 <= r2_max)
    return out


def reconstruct_map_distributed(data_ftc, weight_ftc, *, devices: list[Device], box_size: int, pad: float = 2.0,
                                r_max: int | None = None, n_iter: int = 10, skip_gridding: bool = False, tau2=None,
                                tau2_fudge: float = 1.0, strided: bool = False, storage: str = "dense",
                                timings=None):
    """Padded Fourier sums -> (N, N, N) map on the host, the work spread over `devices`.

    data_ftc, weight_ftc : projector-centred (P, P, P//2+1) sums (on the host or one device),
    Hermitian-repaired and symmetrised. Arithmetic in the weight's float type.
    storage : "dense" keeps each device's Fourier slabs whole; "packed" keeps the weights, the
    gridding weights and the data only inside the sphere |k| <= R (`compress.sphere`, about half
    the voxels), unpacking into the FFT buffer when a transform needs them. Same result, bit for bit.
    """
    if storage not in ("dense", "packed"):
        raise ValueError(f"storage must be 'dense' or 'packed', got {storage!r}")
    grid = PaddedGrid(box_size, pad, box_size // 2 if r_max is None else r_max)
    size, r2_sphere = grid.size, grid.r2_sphere
    real = np.dtype(weight_ftc.dtype)
    t0 = time.perf_counter()
    fft = SlabFFT(size, devices, strided=strided)
    rows = [fft.y_layout.planes(h) for h in range(len(devices))]
    stores = [_SlabStore(size, rows[h], r2_sphere, dev, packed=storage == "packed") for h, dev in enumerate(devices)]
    fw = [st.decentred(weight_ftc) for st in stores]
    r2 = [st.r2 for st in stores]
    if tau2 is not None:
        for h, dev in enumerate(devices):
            with dev.use():
                add_map_term(fw[h], tau2, grid=grid, tau2_fudge=tau2_fudge, r2=r2[h])
    if skip_gridding or n_iter <= 0:
        wn = shell_floor_weights(fw, r2, grid=grid, devices=devices)
    else:
        wn = _gridding(fft, fw, stores, grid, n_iter, devices, real)
    del fw
    fconv = []
    for h in range(len(stores)):
        with stores[h].device.use():
            d = stores[h].decentred(data_ftc)
            d *= wn[h].astype(real, copy=False)
            wn[h] = None
            fconv.append(stores[h].to_dense(d))
            del d
    del wn, r2, stores
    _sync(devices)
    t1 = time.perf_counter()
    volume = _window_and_invert(fconv, rows, grid, devices, strided)
    volume /= real.type(pad**3 * box_size)
    soft_mask_outside(volume, radius=box_size / 2, width=3.0)
    grid_correct(volume, pad=pad)
    if timings is not None:
        timings["gridding"] = timings.get("gridding", 0.0) + (t1 - t0)
        timings["fft_to_map"] = timings.get("fft_to_map", 0.0) + (time.perf_counter() - t1)
    return volume


class _SlabStore:
    """How one device holds its y-slab of a Fourier array: dense (P, ny, H), or packed inside |k|^2 <= R^2.

    Elementwise steps run on the stored form either way; `to_dense`/`from_dense` convert for the FFTs.
    """

    def __init__(self, size: int, rows, r2_sphere: int, device: Device, *, packed: bool):
        from omlrelion.compress.sphere import SpherePacking, packed_r2

        self.size, self.rows, self.r2_sphere, self.device = size, rows, r2_sphere, device
        self.packing = SpherePacking(size, rows, r2_sphere, inclusive=True) if packed else None
        with device.use():
            self.r2 = packed_r2(self.packing, device.xp) if packed else _r2_slab(size, rows, device.xp)

    def from_dense(self, a):
        from omlrelion.compress.sphere import pack

        return a if self.packing is None else pack(a, self.packing)

    def to_dense(self, a):
        from omlrelion.compress.sphere import unpack

        return a if self.packing is None else unpack(a, self.packing)

    def decentred(self, a_ftc):
        """This slab of a projector-centred array, in FFTW layout, zero outside the sphere, stored."""
        with self.device.use():
            r2 = self.r2 if self.packing is None else _r2_slab(self.size, self.rows, self.device.xp)
            return self.from_dense(_decentred_rows(a_ftc, self.rows, r2, self.r2_sphere, self.device))


def _gridding(fft: SlabFFT, fw, stores, grid: PaddedGrid, n_iter: int, devices, real):
    complex_ = np.result_type(real, np.complex64)
    blobs, inside, wn = [], [], []
    for g, dev in enumerate(devices):
        with dev.use():
            blobs.append(blob_real_space(grid.size, grid.box_size, grid.pad, dev.xp, real,
                                         planes=fft.z_layout.planes(g)))
            inside.append(stores[g].r2 < grid.r2_sphere)
            wn.append(inside[g].astype(real))
    for _ in range(n_iter):
        conv = []
        for h, dev in enumerate(devices):
            with dev.use():
                conv.append(stores[h].to_dense((wn[h] * fw[h]).astype(complex_)))
        m = fft.inverse(conv)
        del conv
        for g, dev in enumerate(devices):
            with dev.use():
                m[g] *= blobs[g]
        conv = fft.forward(m)
        del m
        for h, dev in enumerate(devices):
            xp = dev.xp
            with dev.use():
                mag = xp.maximum(xp.abs(stores[h].from_dense(conv[h])), 1e-6).astype(real)
                conv[h] = None
                wn[h] = xp.where(inside[h], wn[h] / mag, wn[h])
                if real == np.float32:
                    wn[h] = xp.minimum(wn[h], 1e20)
        del conv
    return wn


def _window_and_invert(fconv, rows, grid: PaddedGrid, devices, strided: bool):
    """Window each device's rows from the odd P grid to the even Q grid, centre, c2r, crop, gather."""
    size, q, n = grid.size, grid.final_size, grid.box_size
    k_in = signed_freqs(size, np)
    k_q = signed_freqs(q, np)
    q_index = {int(k): i for i, k in enumerate(k_q)}
    q_parts, q_windows = [], []
    for h in range(len(devices)):
        ks = k_in[np.asarray(rows[h])]
        keep = [(j, q_index[int(k)]) for j, k in enumerate(ks) if int(k) in q_index]
        q_parts.append(tuple(sorted(i for _, i in keep)))
        q_windows.append(sorted(keep, key=lambda t: t[1]))
    covered = sorted(i for part in q_parts for i in part)
    z_valid = np.abs(k_q) <= size // 2                # Q-grid z planes that exist on the P grid
    z_src = np.where(k_q < 0, k_q + size, k_q)[z_valid]      # their P-grid z index
    kx_len = min(size // 2 + 1, q // 2 + 1)
    slabs = []
    for h, dev in enumerate(devices):
        xp = dev.xp
        with dev.use():
            src_rows = xp.asarray(np.array([j for j, _ in q_windows[h]], dtype=np.int64))
            out = xp.zeros((q, len(q_parts[h]), q // 2 + 1), dtype=fconv[h].dtype)
            if len(q_parts[h]):
                block = fconv[h][xp.asarray(z_src)[:, None], src_rows[None, :], :kx_len]
                if q > size:          # enlarging: RELION copies only |k|^2 <= (P//2)^2
                    kz = xp.asarray(k_q[z_valid].astype(np.int64))[:, None, None]
                    ky = xp.asarray(k_q[np.asarray(q_parts[h])].astype(np.int64))[None, :, None]
                    kx = xp.arange(kx_len, dtype=xp.int64)[None, None, :]
                    block = block * ((kz**2 + ky**2 + kx**2) <= (size // 2) ** 2)
                out[xp.asarray(np.nonzero(z_valid)[0]), :, :kx_len] = block
                # centre by sign on the Q grid: (-1)^(z + y + x) with Q-grid FFTW indices
                sz = 1 - 2 * (xp.arange(q) % 2)
                sy = 1 - 2 * (xp.asarray(np.asarray(q_parts[h])) % 2)
                sx = 1 - 2 * (xp.arange(q // 2 + 1) % 2)
                out *= (sz[:, None, None] * sy[None, :, None] * sx[None, None, :]).astype(out.real.dtype)
            slabs.append(out)
    # Q rows outside every device's P rows are zero (|k| > R): give them to the last device
    missing = tuple(i for i in range(q) if i not in set(covered))
    if missing:
        q_parts[-1] = tuple(sorted(q_parts[-1] + missing))
        dev = devices[-1]
        with dev.use():
            full = dev.xp.zeros((q, len(q_parts[-1]), q // 2 + 1), dtype=slabs[-1].dtype)
            pos = {r: i for i, r in enumerate(q_parts[-1])}
            keep = [pos[r] for r in sorted(set(q_parts[-1]) - set(missing))]
            full[:, keep, :] = slabs[-1]
            slabs[-1] = full
    fft = SlabFFT(q, devices, strided=strided, y_layout=SlabLayout(q, len(devices), parts=tuple(q_parts)))
    real_slabs = fft.inverse(slabs)
    lo = q // 2 - n // 2
    volume = np.empty((n, n, n), dtype=to_numpy(real_slabs[0][:1, :1, :1]).dtype)
    for g, dev in enumerate(devices):
        planes = fft.z_layout.planes(g)
        sel = (planes >= lo) & (planes < lo + n)
        if np.any(sel):
            with dev.use():
                part = real_slabs[g][dev.xp.asarray(np.nonzero(sel)[0])][:, lo:lo + n, lo:lo + n]
            volume[planes[sel] - lo] = to_numpy(part)
    return volume


def _sync(devices) -> None:
    for dev in devices:
        dev.synchronize()

