"""RELION's sums-to-map step on the sphere's columns, spread over G devices, never densely stored.

Every Fourier array of `reconstruct.gridding.reconstruct_map` is zero outside |k|^2 <= R^2. On the
half grid a *column* is a (ky, kx) pair inside the disc ky^2 + kx^2 <= R^2; its voxels inside the
sphere are kz = -L .. L, L = isqrt(R^2 - ky^2 - kx^2). Columns are dealt to the devices (strided:
row ky goes to device (ky row number) mod G; contiguous: blocks of equal memory), and each
device keeps its columns *packed*: the 2L + 1 values of every column one after the other, in
increasing kz. At full resolution the packed sphere is pi/6 ~ 52% of the dense half grid; real
arrays (the weights) stay real.

One 3D FFT of the gridding loop is done in two local steps and one exchange, never holding a dense
volume:

1. columns: each device unpacks a batch of its columns into full z-lines of the transform side n,
   and runs 1D FFTs along z (a "column buffer" of (n_columns, n) complex per device, 78% of a
   dense half grid / G at full resolution);
2. planes: z-planes are processed in chunks (strided: chunk i on device i mod G; contiguous:
   blocks); a chunk gathers its (ky, kx) values from every device's column buffer (peer-to-peer
   copies between GPUs), runs the 2D c2r FFT, multiplies by the blob's real-space transform, runs
   the 2D r2c FFT and sends the columns back. The real-space volume exists one plane chunk at a
   time.
3. columns again: 1D FFTs along z, and the gridding update on the packed arrays.

The final inverse FFT on the even side Q = 2N works the same way on the columns of the Q grid, and
only the N central real-space planes are transformed and kept. Soft mask and grid correction run
per plane chunk. The same code runs on GPUs (CuPy) and on host Devices standing in for them.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np

from omlrelion.backend import Device, fft_module, get_xp, is_gpu_array, to_numpy
from omlrelion.geometry.grids import PaddedGrid, radial_distance
from omlrelion.reconstruct.gridding import (
    BLOB_ALPHA,
    BLOB_RADIUS,
    add_map_term,
    blob_real_space,
    blob_table,
    map_term_in_float64,
    soft_edge,
)
from omlrelion.units import relion_round

MAX_CHUNK_VOXELS = 1 << 24
MIN_CHUNK_VOXELS = 1 << 20
DEFAULT_PLANE_CHUNK = 16
KERNELS = ("relion", "compact")


def default_chunk_voxels(n_packed: int) -> int:
    """Packed voxels per column chunk: 1/32 of a device's share, within [2^20, 2^24], so that the
    chunk's index temporaries (~70 B a voxel) stay small next to the packed arrays."""
    return int(min(MAX_CHUNK_VOXELS, max(MIN_CHUNK_VOXELS, n_packed // 32)))


def _isqrt(a: np.ndarray) -> np.ndarray:
    """floor(sqrt(a)) for non-negative int64 arrays, exact."""
    r = np.floor(np.sqrt(a.astype(np.float64))).astype(np.int64)
    r -= (r * r > a)
    r += ((r + 1) * (r + 1) <= a)
    return r


@dataclass(frozen=True)
class ColumnPart:
    """One device's columns: signed ky, kx, half length L and packed offsets (host int64 arrays)."""

    ky: np.ndarray
    kx: np.ndarray
    half_len: np.ndarray
    offsets: np.ndarray          # (n_columns + 1,), column c is packed[offsets[c]:offsets[c + 1]]

    @property
    def n_columns(self) -> int:
        return len(self.ky)

    @property
    def n_packed(self) -> int:
        return int(self.offsets[-1])

    def chunks(self, chunk_columns: int):
        """(c0, c1) ranges of `chunk_columns` columns (the last one shorter): one FFT batch size, so
        one cached cuFFT plan per pass."""
        step = max(1, int(chunk_columns))
        return [(c0, min(c0 + step, self.n_columns)) for c0 in range(0, self.n_columns, step)]


@dataclass(frozen=True)
class ColumnLayout:
    """The sphere |k|^2 <= r2_sphere of an odd side-`size` half grid, its columns dealt to n_parts."""

    size: int
    r2_sphere: int
    n_parts: int
    strided: bool = False

    def all_columns(self):
        r = relion_round(np.sqrt(self.r2_sphere)) + 1
        ky = np.arange(-r, r + 1, dtype=np.int64)
        kx = np.arange(0, r + 1, dtype=np.int64)
        ky2, kx2 = np.meshgrid(ky, kx, indexing="ij")
        keep = ky2**2 + kx2**2 <= self.r2_sphere
        # FFTW row order: ky = 0, 1, .., then the negative rows
        order = np.lexsort((kx2[keep], np.where(ky2[keep] < 0, ky2[keep] + self.size, ky2[keep])))
        ky_c, kx_c = ky2[keep][order], kx2[keep][order]
        return ky_c, kx_c, _isqrt(self.r2_sphere - ky_c**2 - kx_c**2)

    def parts(self) -> list[ColumnPart]:
        return _layout_parts(self)

    def _make_parts(self) -> list[ColumnPart]:
        ky, kx, half_len = self.all_columns()
        lens = 2 * half_len + 1
        if self.strided:
            row_ids = np.unique(ky, return_inverse=True)[1]
            owner = row_ids % self.n_parts
        else:       # blocks of equal memory: packed arrays (~2 len) plus the column's z-line (size)
            cost = 2 * lens + self.size
            cum = np.cumsum(cost) - cost
            owner = np.minimum((cum * self.n_parts) // max(int(cost.sum()), 1), self.n_parts - 1)
        out = []
        for g in range(self.n_parts):
            sel = owner == g
            out.append(ColumnPart(ky[sel], kx[sel], half_len[sel],
                                  np.concatenate([[0], np.cumsum(lens[sel])]).astype(np.int64)))
        return out


@functools.lru_cache(maxsize=32)
def _layout_parts(layout: ColumnLayout) -> list[ColumnPart]:
    return layout._make_parts()


def _chunk_index(part: ColumnPart, c0: int, c1: int, xp):
    """Column number (relative to c0) and kz of every packed voxel of columns c0..c1-1, on xp."""
    half_len = xp.asarray(part.half_len[c0:c1])
    ends = xp.asarray(part.offsets[c0 + 1:c1 + 1] - part.offsets[c0])
    lens = 2 * half_len + 1
    j = xp.arange(int(part.offsets[c1] - part.offsets[c0]), dtype=xp.int64)
    col = xp.searchsorted(ends, j, side="right")
    kz = j - (ends - lens)[col] - half_len[col]
    return col, kz


def _move(a, device: Device):
    """`a` on `device`: the same array when it is already there, else a copy.

    Between GPUs the copy is a peer-to-peer copy queued on the destination's stream after the
    source's pending work (event), and the source's stream waits for it before its memory is reused,
    so no device waits on the host.
    """
    if device.gpu is None:
        return to_numpy(a)
    import cupy as cp

    if not is_gpu_array(a):
        with device.use():
            out = cp.empty(a.shape, dtype=a.dtype)
            out.set(np.ascontiguousarray(a))
            return out
    if a.device.id == device.gpu:
        return a
    with cp.cuda.Device(a.device.id):
        src = a if a.flags.c_contiguous else cp.ascontiguousarray(a)
        ready = cp.cuda.Event(block=False, disable_timing=True)
        ready.record()
    with device.use():
        out = cp.empty(a.shape, dtype=a.dtype)
        stream = cp.cuda.get_current_stream()
        stream.wait_event(ready)
        out.data.copy_from_device_async(src.data, src.nbytes, stream)
        done = cp.cuda.Event(block=False, disable_timing=True)
        done.record(stream)
    with cp.cuda.Device(a.device.id):
        cp.cuda.get_current_stream().wait_event(done)
    return out


class ColumnEngine:
    """Packed sphere arrays over `devices` and the column/plane transforms between them."""

    def __init__(self, grid: PaddedGrid, devices: list[Device], *, strided: bool = False, fft_size: int | None = None,
                 chunk_voxels: int | None = None, plane_chunk: int = DEFAULT_PLANE_CHUNK, kernel: str = "relion",
                 convolution: str = "fft"):
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if convolution not in ("fft", "direct"):
            raise ValueError(f"convolution must be 'fft' or 'direct', got {convolution!r}")
        if convolution == "direct" and (kernel != "compact" or len(devices) != 1):
            raise ValueError("the direct convolution runs the compact kernel on one device")
        self.kernel, self.convolution = kernel, convolution
        self.grid, self.devices = grid, list(devices)
        self.n = fft_size or grid.size
        if self.n < grid.size:
            raise ValueError(f"fft_size {self.n} is smaller than the padded grid {grid.size}")
        self.layout = ColumnLayout(grid.size, grid.r2_sphere, len(self.devices), strided)
        self.parts = self.layout.parts()
        self.strided, self.plane_chunk = strided, max(1, int(plane_chunk))
        self.chunk_voxels = int(chunk_voxels or default_chunk_voxels(max(p.n_packed for p in self.parts)))
        # columns per chunk: the chunk's z-lines (columns x side) hold at most chunk_voxels values
        self.chunk_columns = max(1, self.chunk_voxels // self.n)
        self.memory_trace = None           # a list to receive (phase, pool bytes per device)

    # packed arrays ------------------------------------------------------------------------
    def pack_centred(self, a_ftc, dtype=None) -> list:
        """Per-device packed copies of a projector-centred (P, P, P//2+1) array (host or device)."""
        c = self.grid.size // 2
        xp = get_xp(a_ftc)
        src_dev = Device(int(a_ftc.device.id)) if is_gpu_array(a_ftc) else Device()
        out = []
        for part, dev in zip(self.parts, self.devices):
            with dev.use():
                packed = dev.xp.empty(part.n_packed, dtype=dtype or a_ftc.dtype)
            for c0, c1 in part.chunks(self.chunk_columns):
                with src_dev.use():
                    col, kz = _chunk_index(part, c0, c1, xp)
                    cy = xp.asarray(part.ky[c0:c1] + c)[col]
                    cx = xp.asarray(part.kx[c0:c1])[col]
                    values = a_ftc[kz + c, cy, cx]
                    del col, kz, cy, cx
                with dev.use():
                    packed[int(part.offsets[c0]):int(part.offsets[c1])] = _move(values, dev)
            out.append(packed)
        return out

    def unpack_centred(self, packed: list):
        """The projector-centred (P, P, P//2+1) host array of per-device packed arrays (zeros outside)."""
        size = self.grid.size
        c = size // 2
        out = np.zeros(self.grid.shape, dtype=to_numpy(packed[0][:1]).dtype)
        for part, a in zip(self.parts, packed):
            for c0, c1 in part.chunks(self.chunk_columns):
                col, kz = _chunk_index(part, c0, c1, np)
                out[kz + c, (part.ky[c0:c1] + c)[col], part.kx[c0:c1][col]] = to_numpy(
                    a[int(part.offsets[c0]):int(part.offsets[c1])])
        return out

    def chunk_frequencies(self, g: int, c0: int, c1: int):
        """(col, kz, rho2) of the packed voxels of device g's columns c0..c1 (rho2 = ky^2 + kx^2)."""
        part, xp = self.parts[g], self.devices[g].xp
        col, kz = _chunk_index(part, c0, c1, xp)
        rho2 = xp.asarray(part.ky[c0:c1] ** 2 + part.kx[c0:c1] ** 2)[col]
        return col, kz, rho2

    def _chunks(self, g):
        part = self.parts[g]
        for c0, c1 in part.chunks(self.chunk_columns):
            yield c0, c1, slice(int(part.offsets[c0]), int(part.offsets[c1]))

    # the plane chunks ---------------------------------------------------------------------
    def plane_rounds(self, z_planes) -> list[list[tuple[int, int, int]]]:
        """Chunks (z0, z1, device) of the planes z_planes[0] .. z_planes[1]-1, in rounds that give each
        device at most one chunk (strided: chunk i on device i mod G; contiguous: blocks)."""
        z_lo, z_hi = z_planes
        starts = list(range(z_lo, z_hi, self.plane_chunk))
        g_count = len(self.devices)
        chunks = [(z0, min(z0 + self.plane_chunk, z_hi)) for z0 in starts]
        if self.strided:
            return [[(*chunks[i], i - r0) for i in range(r0, min(r0 + g_count, len(chunks)))]
                    for r0 in range(0, len(chunks), g_count)]
        bounds = np.linspace(0, len(chunks), g_count + 1).round().astype(int)
        blocks = [chunks[bounds[e]:bounds[e + 1]] for e in range(g_count)]
        return [[(*blocks[e][r], e) for e in range(g_count) if r < len(blocks[e])]
                for r in range(max(len(b) for b in blocks))]

    def _flat_index(self, n: int, columns: list) -> dict:
        """Per (owner, source device) flat (y, x) positions on the side-n half plane, on the owner."""
        half = n // 2 + 1
        out = {}
        for e, dev in enumerate(self.devices):
            with dev.use():
                for d, (ky, kx) in enumerate(columns):
                    out[e, d] = dev.xp.asarray(np.where(ky < 0, ky + n, ky) * half + kx)
        return out

    def _plane_pass(self, buffers, n: int, flat, z_planes, work):
        """For each z-plane chunk: gather the columns, work(planes, z0, z1, owner), scatter back.

        `work` gets (zc, n, n//2+1) complex planes and returns complex planes to scatter back (or
        None: nothing goes back). A round gathers one chunk per device, then every owner works, then
        the results go back, so the devices work side by side (their streams wait on each other
        through events, never on the host).
        """
        half = n // 2 + 1
        for chunks in self.plane_rounds(z_planes):
            gathered = []
            for z0, z1, e in chunks:
                dev = self.devices[e]
                with dev.use():
                    planes = dev.xp.zeros((z1 - z0, n * half), dtype=buffers[0].dtype)
                for d, src in enumerate(self.devices):
                    if buffers[d].shape[0] == 0:
                        continue
                    with src.use():
                        piece = src.xp.ascontiguousarray(buffers[d][:, z0:z1].T)
                    with dev.use():
                        planes[:, flat[e, d]] = _move(piece, dev)
                    del piece
                gathered.append(planes)
            results = []
            for (z0, z1, e), planes in zip(chunks, gathered):
                with self.devices[e].use():
                    result = work(planes.reshape(z1 - z0, n, half), z0, z1, e)
                    results.append(None if result is None else result.reshape(z1 - z0, n * half))
            del gathered, planes
            for (z0, z1, e), result in zip(chunks, results):
                if result is None:
                    continue
                dev = self.devices[e]
                for d, dst in enumerate(self.devices):
                    if buffers[d].shape[0] == 0:
                        continue
                    with dev.use():
                        piece = dev.xp.ascontiguousarray(result[:, flat[e, d]].T)
                    with dst.use():
                        buffers[d][:, z0:z1] = _move(piece, dst)
                    del piece
            del results

    def _trace(self, phase: str) -> None:
        """Record the memory each device's pool holds (GPUs) after `phase`, when tracing."""
        if self.memory_trace is None:
            return
        row = []
        for dev in self.devices:
            if dev.gpu is None:
                row.append(0)
                continue
            with dev.use():
                row.append(int(dev.xp.get_default_memory_pool().total_bytes()))
        self.memory_trace.append((phase, row))

    # gridding -----------------------------------------------------------------------------
    def gridding_weights(self, fw: list, n_iter: int) -> list:
        """Packed Wn after `n_iter` rounds (RELION's Pipe-Menon loop), in fw's float type.

        Each round convolves Wn Fw with the blob: by FFTs (column pass, plane pass with the blob's
        real-space transform, column pass), or with `convolution="direct"` (one device, compact
        kernel) by the stencil itself on the z-lines of the sphere's columns.
        """
        grid, n = self.grid, self.n
        real = fw[0].dtype
        complex_ = np.result_type(real, np.complex64)
        clamp = 1e20 if real == np.float32 else None
        direct = self.convolution == "direct"
        wn, buffers = [], []
        for g, dev in enumerate(self.devices):
            xp = dev.xp
            with dev.use():
                w = xp.ones(self.parts[g].n_packed, dtype=real)
                for c0, c1, sl in self._chunks(g):
                    _, kz, rho2 = self.chunk_frequencies(g, c0, c1)
                    w[sl] = (kz * kz + rho2 < grid.r2_sphere).astype(real)
                wn.append(w)
                buffers.append(xp.empty((self.parts[g].n_columns, n), dtype=real if direct else complex_))
        self._trace("gridding start")
        if direct:
            stencil = _DirectStencil(self, real)
        else:
            flat = self._flat_index(n, [(p.ky, p.kx) for p in self.parts])
            blob = [_RealSpaceBlob(self, dev, real) for dev in self.devices]

            def blob_work(planes, z0, z1, e):
                fft = fft_module(self.devices[e].xp)
                m = fft.irfft2(planes, s=(n, n), axes=(1, 2), norm="forward")
                blob[e].multiply(m, z0)
                return fft.rfft2(m, axes=(1, 2), norm="forward")

        for _ in range(n_iter):
            for g, dev in enumerate(self.devices):
                xp = dev.xp
                with dev.use():
                    for c0, c1, sl in self._chunks(g):
                        col, kz, _ = self.chunk_frequencies(g, c0, c1)
                        lines = xp.zeros((c1 - c0, n), dtype=buffers[g].dtype)
                        lines[col, kz % n] = wn[g][sl] * fw[g][sl]
                        buffers[g][c0:c1] = lines if direct else fft_module(xp).ifft(lines, axis=1, norm="forward")
                        del lines, col, kz
            self._trace("columns inverse")
            if direct:
                conv_lines = stencil.convolve(buffers[0])
            else:
                self._plane_pass(buffers, n, flat, (0, n), blob_work)
                conv_lines = None
            self._trace("planes")
            for g, dev in enumerate(self.devices):
                xp = dev.xp
                with dev.use():
                    for c0, c1, sl in self._chunks(g):
                        col, kz, rho2 = self.chunk_frequencies(g, c0, c1)
                        if direct:
                            conv = conv_lines[c0:c1][col, kz % n]
                        else:
                            conv = fft_module(xp).fft(buffers[g][c0:c1], axis=1, norm="forward")[col, kz % n]
                        mag = xp.maximum(xp.abs(conv), 1e-6).astype(real)
                        w = wn[g][sl]
                        w[...] = xp.where(kz * kz + rho2 < grid.r2_sphere, w / mag, w)
                        if clamp is not None:
                            xp.minimum(w, clamp, out=w)
                        del conv, mag, col, kz, rho2
            del conv_lines
            self._trace("columns forward")
        del buffers
        return wn

    def shell_floor_weights(self, fw: list) -> list:
        """`gridding.shell_floor_weights` on the packed arrays (the --skip_gridding branch)."""
        grid = self.grid
        r_max, pad = grid.r_max, grid.pad
        r2_limit = relion_round((r_max * pad) ** 2)
        acc, cnt = np.zeros(r_max), np.zeros(r_max)
        for g, dev in enumerate(self.devices):
            xp = dev.xp
            with dev.use():
                for c0, c1, sl in self._chunks(g):
                    _, kz, rho2 = self.chunk_frequencies(g, c0, c1)
                    r2 = kz * kz + rho2
                    shell = xp.floor(xp.sqrt(r2.astype(xp.float64)) / pad).astype(xp.int64)
                    inside = r2 < r2_limit
                    acc += to_numpy(xp.bincount(shell[inside], weights=fw[g][sl][inside].astype(xp.float64),
                                                minlength=r_max))[:r_max]
                    cnt += to_numpy(xp.bincount(shell[inside], minlength=r_max))[:r_max]
        if np.any((cnt == 0) & (acc == 0)):
            raise ValueError("a Fourier shell holds no voxel: r_max or pad too small for this grid")
        floor = acc / (1000.0 * np.maximum(cnt, 1))
        out = []
        for g, dev in enumerate(self.devices):
            xp = dev.xp
            with dev.use():
                w = xp.empty_like(fw[g])
                floor_d = xp.asarray(floor)
                for c0, c1, sl in self._chunks(g):
                    _, kz, rho2 = self.chunk_frequencies(g, c0, c1)
                    shell = xp.floor(xp.sqrt((kz * kz + rho2).astype(xp.float64)) / pad).astype(xp.int64)
                    m = xp.maximum(fw[g][sl].astype(xp.float64), floor_d[xp.minimum(shell, r_max - 1)])
                    w[sl] = xp.where(m != 0, 1.0 / xp.where(m != 0, m, 1.0), 1.0)
                out.append(w)
        return out

    def add_map_term(self, fw: list, tau2, *, tau2_fudge: float = 1.0, minres_map: int = -1) -> None:
        for g, dev in enumerate(self.devices):
            with dev.use():
                for c0, c1, sl in self._chunks(g):
                    _, kz, rho2 = self.chunk_frequencies(g, c0, c1)
                    add_map_term(fw[g][sl], tau2, grid=self.grid, tau2_fudge=tau2_fudge, minres_map=minres_map,
                                 r2=kz * kz + rho2)

    # the final inverse --------------------------------------------------------------------
    def to_map(self, fconv: list, *, out=None):
        """Packed data * Wn -> (N, N, N) host map: window to Q, centre, c2r, crop, scale, mask, correct.

        Consumes (empties) the arrays of `fconv`.
        """
        grid = self.grid
        q, n_box = grid.final_size, grid.box_size
        kx_len = min(grid.size // 2 + 1, q // 2 + 1)
        q_columns, buffers, keep_cols = [], [], []
        for g, dev in enumerate(self.devices):
            part, xp = self.parts[g], dev.xp
            keep = (part.ky >= -(q // 2 - 1)) & (part.ky <= q // 2) & (part.kx < kx_len)
            new_index = np.cumsum(keep) - 1
            q_columns.append((part.ky[keep], part.kx[keep]))
            keep_cols.append((keep, new_index))
            with dev.use():
                buf = xp.zeros((int(keep.sum()), q), dtype=fconv[g].dtype)
                keep_d, new_d = xp.asarray(keep), xp.asarray(new_index)
                for c0, c1, sl in self._chunks(g):
                    col, kz, _ = self.chunk_frequencies(g, c0, c1)
                    ok = keep_d[c0:c1][col] & (kz >= -(q // 2 - 1)) & (kz <= q // 2)
                    sign = 1 - 2 * ((kz + xp.asarray(part.ky[c0:c1] + part.kx[c0:c1])[col]) & 1)
                    buf[new_d[c0:c1][col][ok], kz[ok] % q] = fconv[g][sl][ok] * sign[ok].astype(buf.real.dtype)
                    del col, kz, ok, sign
                fconv[g] = None
                rows = max(1, self.chunk_voxels // q)
                for c0 in range(0, buf.shape[0], rows):
                    c1 = min(buf.shape[0], c0 + rows)
                    buf[c0:c1] = fft_module(xp).ifft(buf[c0:c1], axis=1, norm="forward")
                buffers.append(buf)
        self._trace("final columns")
        flat = self._flat_index(q, q_columns)
        lo = q // 2 - n_box // 2
        volume = _host_array((n_box, n_box, n_box), np.dtype(buffers[0].real.dtype), self.devices) if out is None \
            else out
        scale = grid.pad**3 * n_box
        sums = {}

        def invert(planes, z0, z1, e):
            dev = self.devices[e]
            xp = dev.xp
            m = fft_module(xp).irfft2(planes, s=(q, q), axes=(1, 2), norm="forward")[:, lo:lo + n_box, lo:lo + n_box]
            m = m / m.dtype.type(scale)
            c = soft_edge(radial_distance(n_box, xp, z_range=(z0 - lo, z1 - lo)), radius=n_box / 2)
            part = xp.stack([(c * m.astype(xp.float64)).sum(), c.sum()])
            sums[e] = part if e not in sums else sums[e] + part
            _to_host(m, volume[z0 - lo:z1 - lo])

        self._plane_pass(buffers, q, flat, (lo, lo + n_box), invert)
        self._trace("final planes")
        del buffers
        _sync(self.devices)
        total = sum(to_numpy(v) for v in sums.values())
        background = total[0] / total[1]
        for i, z0 in enumerate(range(0, n_box, self.plane_chunk)):      # mask and correct, chunks round-robin
            z1 = min(n_box, z0 + self.plane_chunk)
            dev = self.devices[i % len(self.devices)]
            xp = dev.xp
            with dev.use():
                v = xp.asarray(volume[z0:z1]).astype(xp.float64)
                r = radial_distance(n_box, xp, z_range=(z0, z1))
                c = soft_edge(r, radius=n_box / 2)
                v = (1 - c) * v + c * background
                s = xp.sinc(r / (n_box * grid.pad))
                _to_host((v / (s * s)).astype(volume.dtype), volume[z0:z1])
        _sync(self.devices)
        return volume


def dense_float32_bytes(grid: PaddedGrid) -> int:
    """Float32 footprint of the straightforward one-device step: complex64 data, float32 weight and
    gridding weights, a complex64 transform of the half grid and the real volume of one FFT."""
    hv = grid.size * grid.size * grid.half
    return int(hv * (8 + 4 + 4 + 8) + grid.size**3 * 4)


def column_memory(grid: PaddedGrid, n_devices: int, *, strided: bool = False, fft_size: int | None = None,
                  real_dtype=np.float32, n_iter: int = 10, stage_data: bool = False, input_on_device: bool = False,
                  chunk_voxels: int | None = None, plane_chunk: int = DEFAULT_PLANE_CHUNK, convolution: str = "fft",
                  map_term: bool = False):
    """Modelled peak bytes per device (and on the host) of `reconstruct_packed`, FFT work areas excluded.

    Counts the packed arrays (fw, wn, data unless staged on the host), the column buffers, the
    (y, x) index tables, and the largest temporaries of a column chunk, a plane chunk and the final
    Q-grid stage, as the code above allocates them (CuPy: one new array per operation). With
    `input_on_device`, device 0 first holds the dense centred sums while they are packed (weight
    first, then data, each freed once packed: `pipeline.steps.reconstruct`). With `map_term` the
    gridding loop of float32 sums runs in float64 (`gridding.map_term_in_float64`).
    """
    r = np.dtype(real_dtype).itemsize
    c = 2 * r
    loop64 = map_term_in_float64(real_dtype, map_term, n_iter <= 0)
    rl, cl = (8, 16) if loop64 else (r, c)           # the gridding loop's float and complex sizes
    n = fft_size or grid.size
    q, n_box = grid.final_size, grid.box_size
    h, hq = n // 2 + 1, q // 2 + 1
    zc = max(1, int(plane_chunk))
    parts = ColumnLayout(grid.size, grid.r2_sphere, n_devices, strided).parts()
    chunk_voxels = int(chunk_voxels or default_chunk_voxels(max(p.n_packed for p in parts)))
    kx_len = min(grid.size // 2 + 1, hq)
    ncol_q = [int(((p.ky >= -(q // 2 - 1)) & (p.ky <= q // 2) & (p.kx < kx_len)).sum()) for p in parts]
    ncol_total, ncol_q_total = sum(p.n_columns for p in parts), sum(ncol_q)
    max_piece, max_piece_q = max(p.n_columns for p in parts), max(ncol_q)
    per_device = []
    for p, nq in zip(parts, ncol_q):
        npk = p.n_packed
        chunks = p.chunks(max(1, chunk_voxels // n)) or [(0, 0)]
        cv = max(int(p.offsets[b] - p.offsets[a]) for a, b in chunks)
        ncc = max(b - a for a, b in chunks)
        index = 40 * cv
        column_pass = max(index, 32 * cv + cv * rl + 2 * ncc * n * cl, 73 * cv + cv * cl + ncc * n * cl)
        plane_pass = 2 * zc * n * h * cl + zc * n * n * rl + 2 * zc * max_piece * cl
        data = 0 if stage_data else npk * c
        gridding = 2 * npk * rl + data + p.n_columns * n * cl + 8 * ncol_total + max(column_pass, plane_pass)
        if convolution == "direct":      # real z-lines and their convolution, gathered neighbours per chunk
            gridding = 2 * npk * rl + data + 2 * p.n_columns * n * rl + max(column_pass, 4 * ncc * n * rl + 24 * ncc)
        if loop64:                       # fw converted: the float32 and float64 copies at once
            gridding = max(gridding, npk * (r + rl) + data)
        if n_iter <= 0:
            gridding = npk * r + data + npk * 8 + 80 * cv
        q_rows = max(1, chunk_voxels // q)
        build = npk * c + nq * q * c + 60 * cv + 2 * cv * c
        invert = (nq * q * c + 8 * ncol_q_total + 2 * zc * q * hq * c + zc * q * q * r
                  + zc * n_box * n_box * (r + 32) + 2 * zc * max_piece_q * c + 2 * q_rows * q * c)
        per_device.append(int(max(gridding, build, invert)))
    per_device[0] = max(per_device[0], int(zc * n_box * n_box * 56))        # mask and correction chunks
    if input_on_device:
        hv = grid.size * grid.size * grid.half
        cv0 = min(chunk_voxels, parts[0].n_packed)
        packing = max(hv * (c + r) + parts[0].n_packed * r, hv * c + parts[0].n_packed * (r + c)) + 48 * cv0
        per_device[0] = max(per_device[0], int(packing))
    host = n_box**3 * r + (sum(p.n_packed for p in parts) * c if stage_data else 0)
    return per_device, int(host)


def _host_array(shape, dtype, devices):
    """An empty host array, in page-locked memory when GPUs will copy into it (several times faster)."""
    if any(d.gpu is not None for d in devices):
        import cupyx

        return cupyx.empty_pinned(shape, dtype=dtype)
    return np.empty(shape, dtype=dtype)


def _to_host(a, out) -> None:
    """out[...] = a: an asynchronous copy on a's stream for GPU arrays (out page-locked)."""
    if is_gpu_array(a):
        a.get(out=out, blocking=False)
    else:
        out[...] = a


def compact_stencil(grid: PaddedGrid):
    """The gridding kernel as a Fourier-space stencil: RELION's Kaiser-Bessel blob (radius 2 x 1.9,
    alpha 15, order 0) at |d| N pad / P, the scale at which RELION's real-space table samples it,
    normalised to sum 1. Returns (offsets (n_taps, 3) int64 as (dz, dy, dx), weights float64)."""
    radius = 2 * BLOB_RADIUS
    scale = grid.box_size * grid.pad / grid.size
    reach = int(np.floor(radius / scale))
    d = np.arange(-reach, reach + 1)
    dz, dy, dx = np.meshgrid(d, d, d, indexing="ij")
    r = np.sqrt(dz**2 + dy**2 + dx**2) * scale
    keep = r < radius
    weights = np.i0(BLOB_ALPHA * np.sqrt(1 - (r[keep] / radius) ** 2)) / np.i0(BLOB_ALPHA)
    offsets = np.stack([dz[keep], dy[keep], dx[keep]], axis=1).astype(np.int64)
    return offsets, weights / weights.sum()


class _RealSpaceBlob:
    """The blob's real-space transform on plane chunks of the side-n grid, on one device.

    kernel "relion": RELION's table T(|r| / (N pad)) with its floor lookup and cut at rho = 0.5;
    "compact": T(r) = sum over the stencil of w_d exp(2 pi i d.r / n), whose transform on the grid
    is the stencil exactly (any n), made per chunk from separable (y, x) factors by matrix products.
    """

    def __init__(self, engine: ColumnEngine, device: Device, real):
        xp = device.xp
        grid, n = engine.grid, engine.n
        self.kernel, self.n, self.xp, self.real = engine.kernel, n, xp, np.dtype(real)
        with device.use():
            if self.kernel == "relion":
                self.table = xp.asarray(blob_table(), dtype=real)
                self.box_size, self.pad, self.scale = grid.box_size, grid.pad, grid.size / n
                return
            offsets, weights = compact_stencil(grid)
            reach = int(np.abs(offsets).max())
            self.reach = reach
            coef = np.zeros((2 * reach + 1,) * 3)
            coef[offsets[:, 0] + reach, offsets[:, 1] + reach, offsets[:, 2] + reach] = weights
            self.coef = xp.asarray(coef.astype(np.complex128))
            r = np.where(np.arange(n) < n // 2, np.arange(n), np.arange(n) - n)   # RELION's signed rule
            self.r = r
            d = np.arange(-reach, reach + 1)
            phase = np.exp(2j * np.pi * np.outer(d, r) / n)                       # (2 reach + 1, n)
            self.ey = xp.asarray(phase.T.copy())                                  # (n, nd): y rows
            self.ex = xp.asarray(phase.copy())                                    # (nd, n): x columns
            self.d = d

    def multiply(self, m, z0: int) -> None:
        if self.kernel == "relion":
            _multiply_blob(m, self.table, self.n, z0, box_size=self.box_size, pad=self.pad, scale=self.scale)
            return
        xp = self.xp
        rz = self.r[z0:z0 + len(m)]
        ez = xp.asarray(np.exp(2j * np.pi * np.outer(rz, self.d) / self.n))        # (zc, nd)
        a = xp.einsum("zk,kyx->zyx", ez, self.coef)                               # (zc, nd_y, nd_x)
        t = xp.matmul(xp.matmul(self.ey[None], a), self.ex[None]).real           # (zc, n, n)
        m *= t.astype(self.real)


class _DirectStencil:
    """Conv(k) = sum_d w_d f(k + d) over the sphere's columns, on one device (the compact kernel).

    f is held as full z-lines (side n, FFTW z order) of the device's columns; a neighbour column with
    kx + dx < 0 is read through f(k) = f(-k) (the weights are real and Hermitian).
    """

    def __init__(self, engine: ColumnEngine, real):
        part, dev = engine.parts[0], engine.devices[0]
        self.xp = dev.xp
        self.n, self.chunk_columns, self.device, self.real = engine.n, engine.chunk_columns, dev, real
        offsets, weights = compact_stencil(engine.grid)
        reach = int(np.abs(offsets).max())
        ky, kx = part.ky, part.kx
        lim = int(np.abs(ky).max(initial=0)) + reach + 1
        colmap = -np.ones((2 * lim + 1, lim + 1), dtype=np.int64)
        colmap[ky + lim, kx] = np.arange(part.n_columns)
        self.pairs = []
        with dev.use():
            for dy, dx in sorted({(int(a), int(b)) for a, b in offsets[:, 1:]}):
                y, x = ky + dy, kx + dx
                mirror = x < 0
                src = np.where(mirror, colmap[-y + lim, np.abs(x)], colmap[y + lim, np.abs(x)])
                sel = (offsets[:, 1] == dy) & (offsets[:, 2] == dx)
                taps = [(int(dz), float(w)) for dz, w in zip(offsets[sel, 0], weights[sel])]
                self.pairs.append((src, mirror, taps))

    def convolve(self, lines):
        """(n_columns, n) real z-lines -> their convolution with the stencil, same shape."""
        xp, n = self.xp, self.n
        with self.device.use():
            out = xp.zeros_like(lines)
            flip = xp.asarray((-np.arange(n)) % n)
            for c0 in range(0, lines.shape[0], self.chunk_columns):
                c1 = min(lines.shape[0], c0 + self.chunk_columns)
                acc = out[c0:c1]
                for src, mirror, taps in self.pairs:
                    s, mr = src[c0:c1], mirror[c0:c1]
                    valid = xp.asarray(s >= 0)
                    g = lines[xp.asarray(np.maximum(s, 0))]
                    if mr.any():
                        mr_d = xp.asarray(mr)
                        g[mr_d] = g[mr_d][:, flip]
                    g *= valid[:, None].astype(self.real)
                    for dz, w in taps:           # acc[:, z] += w g[:, (z + dz) mod n]
                        acc += self.real.type(w) * xp.roll(g, -dz, axis=1)
                    del g
            return out


def _multiply_blob(m, table, n: int, z0: int, *, box_size: int, pad: float, scale: float) -> None:
    """m *= T(|r| scale / (N pad)) on the real planes z0 .. z0+len(m) of a side-n grid (RELION's table
    and floor lookup: `gridding.blob_real_space` on the host, a fused kernel on GPUs)."""
    xp = get_xp(m)
    if xp is not np:
        _cuda_blob_kernel()(table, np.int32(n), np.int64(z0), np.float64(box_size * pad / scale), m)
        return
    m *= blob_real_space(n, box_size, pad, np, m.dtype, scale=scale, planes=np.arange(z0, z0 + len(m)))


_KERNELS: dict = {}


def _cuda_blob_kernel():
    if "blob" not in _KERNELS:
        import cupy as cp

        _KERNELS["blob"] = cp.ElementwiseKernel(
            "raw T table, int32 size, int64 z0, float64 norm", "T m",
            """
            const long long x = i % size, y = (i / size) % size, z = z0 + i / ((long long)size * size);
            const double rx = x < size / 2 ? x : x - size, ry = y < size / 2 ? y : y - size,
                         rz = z < size / 2 ? z : z - size;
            const double rho = sqrt(rx * rx + ry * ry + rz * rz) / norm;
            const long long idx = (long long)floor(rho / 5e-5);
            m = idx < 10000 ? m * table[idx] : (T)0;
            """, "omlrelion_columns_blob")
    return _KERNELS["blob"]


def reconstruct_map_columns(data_ftc, weight_ftc, *, devices: list[Device], box_size: int, pad: float = 2.0,
                            r_max: int | None = None, n_iter: int = 10, skip_gridding: bool = False, tau2=None,
                            tau2_fudge: float = 1.0, minres_map: int = -1, strided: bool = False,
                            fft_size: int | None = None, chunk_voxels: int | None = None,
                            plane_chunk: int = DEFAULT_PLANE_CHUNK, kernel: str = "relion", convolution: str = "fft",
                            timings=None):
    """Padded projector-centred sums -> (N, N, N) host map, as `gridding.reconstruct_map`, over `devices`.

    The sums may live on the host or on one device; each device receives its packed columns.
    Arithmetic in the weight's float type.
    """
    grid = PaddedGrid(box_size, pad, box_size // 2 if r_max is None else r_max)
    if data_ftc.shape != grid.shape or weight_ftc.shape != grid.shape:
        raise ValueError(f"Fourier sums have shape {data_ftc.shape}, expected {grid.shape} for "
                         f"box {box_size}, pad {pad}, r_max {grid.r_max}")
    engine = ColumnEngine(grid, devices, strided=strided, fft_size=fft_size, chunk_voxels=chunk_voxels,
                          plane_chunk=plane_chunk, kernel=kernel, convolution=convolution)
    fw = engine.pack_centred(weight_ftc)
    return reconstruct_packed(engine, lambda: engine.pack_centred(data_ftc), fw, n_iter=n_iter,
                              skip_gridding=skip_gridding, tau2=tau2, tau2_fudge=tau2_fudge, minres_map=minres_map,
                              timings=timings)


def reconstruct_packed(engine: ColumnEngine, data_packed, fw: list, *, n_iter: int = 10, skip_gridding: bool = False,
                       tau2=None, tau2_fudge: float = 1.0, minres_map: int = -1, stage_data: bool = False,
                       timings=None):
    """The step on arrays already packed per device. `data_packed`: the packed data (a list, one
    array per device), or a callable giving it (called once the gridding weights are made).
    With `stage_data`, the packed data waits in host memory during the gridding loop. Consumes
    `fw` and the data list.
    """
    t0 = time.perf_counter()
    if stage_data and not callable(data_packed):
        for g in range(len(data_packed)):
            data_packed[g] = to_numpy(data_packed[g])
    if map_term_in_float64(fw[0].dtype, tau2 is not None, skip_gridding or n_iter <= 0):
        for g, dev in enumerate(engine.devices):
            with dev.use():
                fw[g] = fw[g].astype(np.float64)
    if tau2 is not None:
        engine.add_map_term(fw, tau2, tau2_fudge=tau2_fudge, minres_map=minres_map)
    if skip_gridding or n_iter <= 0:
        wn = engine.shell_floor_weights(fw)
    else:
        wn = engine.gridding_weights(fw, n_iter)
    fw.clear()
    data = data_packed() if callable(data_packed) else data_packed
    for g, dev in enumerate(engine.devices):
        with dev.use():
            data[g] = _move(data[g], dev)
            data[g] *= wn[g].astype(data[g].real.dtype, copy=False)
            wn[g] = None
    _sync(engine.devices)
    t1 = time.perf_counter()
    volume = engine.to_map(data)
    if timings is not None:
        timings["gridding"] = timings.get("gridding", 0.0) + (t1 - t0)
        timings["fft_to_map"] = timings.get("fft_to_map", 0.0) + (time.perf_counter() - t1)
    return volume


def _sync(devices) -> None:
    for dev in devices:
        dev.synchronize()


__all__ = ["ColumnEngine", "ColumnLayout", "column_memory", "dense_float32_bytes", "reconstruct_map_columns", "reconstruct_packed"]
