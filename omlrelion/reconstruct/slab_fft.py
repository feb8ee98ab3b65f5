"""Slab-decomposed 3D real FFTs over several devices, and the gridding loop on top of them.

A real cube of side n is split along z into slabs, one per device (contiguous blocks of planes, or
strided: plane p on device p mod G). Its rfft half transform (n, n, n//2+1) is held split along y.
Forward (r2c): each device transforms its z-planes in 2D (rfft2 over y, x), one all-to-all
exchange regroups the data by y-rows, and each device finishes with 1D FFTs along z. The inverse
(c2r) runs the same steps backwards. Only the exchange moves data between devices. Scaling is
RELION's: forward divided by n^3, inverse not divided (NumPy's ``norm="forward"``).

The same code runs on GPUs (CuPy, peer-to-peer copies between devices) and on host Devices, which
stand in for GPUs so that the algorithm is tested without one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from omlrelion.backend import Device, fft_module


@dataclass(frozen=True)
class SlabLayout:
    """Which planes of an axis of length `n` each of `n_parts` devices owns.

    Contiguous blocks, strided (plane p on part p mod n_parts), or explicit plane lists.
    """

    n: int
    n_parts: int
    strided: bool = False
    parts: tuple | None = None     # explicit: a tuple of sorted index tuples, one per part

    def planes(self, part: int) -> np.ndarray:
        """Sorted plane indices owned by `part`."""
        if self.parts is not None:
            return np.asarray(self.parts[part], dtype=np.int64)
        if self.strided:
            return np.arange(part, self.n, self.n_parts)
        bounds = np.linspace(0, self.n, self.n_parts + 1).round().astype(int)
        return np.arange(bounds[part], bounds[part + 1])

    def selector(self, part: int):
        """A slice (when the planes are contiguous) or an index array selecting `part`'s planes."""
        idx = self.planes(part)
        if len(idx) and idx[-1] - idx[0] + 1 == len(idx):
            return slice(int(idx[0]), int(idx[-1]) + 1)
        return idx


def _move(a, device: Device):
    """A copy of `a` on `device` (a peer-to-peer copy between GPUs, a plain copy on the host)."""
    if device.gpu is None:
        return np.array(a, copy=True) if not isinstance(a, np.ndarray) else a.copy()
    import cupy as cp

    with device.use():
        out = cp.empty(a.shape, dtype=a.dtype)
        if isinstance(a, np.ndarray):
            out.set(np.ascontiguousarray(a))
        else:
            src = cp.ascontiguousarray(a) if not a.flags.c_contiguous else a
            out.data.copy_from_device(src.data, src.nbytes)
        return out


class SlabFFT:
    """Distributed r2c/c2r FFTs of a side-`n` cube over `devices`.

    Real arrays: a list of per-device z-slabs (nz_g, n, n). Fourier arrays: a list of per-device
    y-slabs (n, ny_g, n//2+1) in FFTW (corner) layout, z and y signed as in `geometry.grids`.
    """

    def __init__(self, n: int, devices: list[Device], *, strided: bool = False, y_layout: SlabLayout | None = None):
        self.n = n
        self.devices = list(devices)
        self.z_layout = SlabLayout(n, len(self.devices), strided)
        self.y_layout = y_layout or SlabLayout(n, len(self.devices), strided)

    @property
    def half(self) -> int:
        return self.n // 2 + 1

    def forward(self, real_slabs):
        """z-slabs of a real cube -> y-slabs of its rfft (divided by n^3)."""
        planes = []
        for dev, slab in zip(self.devices, real_slabs):
            with dev.use():
                planes.append(fft_module(dev.xp).rfft2(slab, axes=(1, 2), norm="forward"))
        out = []
        for h, dev in enumerate(self.devices):
            ysel = self.y_layout.selector(h)
            ny = len(self.y_layout.planes(h))
            with dev.use():
                dtype = planes[0].dtype
                gathered = dev.xp.empty((self.n, ny, self.half), dtype=dtype)
                for g, src_dev in enumerate(self.devices):
                    with src_dev.use():
                        piece = src_dev.xp.ascontiguousarray(planes[g][:, ysel, :])
                    gathered[self.z_layout.selector(g)] = _move(piece, dev)
                out.append(fft_module(dev.xp).fft(gathered, axis=0, norm="forward"))
        return out

    def inverse(self, fourier_slabs):
        """y-slabs of a half transform -> z-slabs of the real cube (not divided)."""
        columns = []
        for dev, slab in zip(self.devices, fourier_slabs):
            with dev.use():
                columns.append(fft_module(dev.xp).ifft(slab, axis=0, norm="forward"))
        out = []
        for g, dev in enumerate(self.devices):
            zsel = self.z_layout.selector(g)
            nz = len(self.z_layout.planes(g))
            with dev.use():
                gathered = dev.xp.empty((nz, self.n, self.half), dtype=columns[0].dtype)
                for h, src_dev in enumerate(self.devices):
                    with src_dev.use():
                        piece = src_dev.xp.ascontiguousarray(columns[h][zsel])
                    gathered[:, self.y_layout.selector(h), :] = _move(piece, dev)
                out.append(fft_module(dev.xp).irfft2(gathered, s=(self.n, self.n), axes=(1, 2), norm="forward"))
        return out

    # helpers to move whole arrays in and out (tests, small sizes)
    def scatter_real(self, volume):
        return [_move(volume[self.z_layout.selector(g)], dev) for g, dev in enumerate(self.devices)]

    def scatter_fourier(self, volume_ft):
        return [_move(volume_ft[:, self.y_layout.selector(h), :], dev) for h, dev in enumerate(self.devices)]

    def gather_real(self, slabs):
        from omlrelion.backend import to_numpy

        out = np.empty((self.n, self.n, self.n), dtype=to_numpy(slabs[0]).dtype)
        for g, slab in enumerate(slabs):
            out[self.z_layout.selector(g)] = to_numpy(slab)
        return out

    def gather_fourier(self, slabs):
        from omlrelion.backend import to_numpy

        out = np.empty((self.n, self.n, self.half), dtype=to_numpy(slabs[0]).dtype)
        for h, slab in enumerate(slabs):
            out[:, self.y_layout.selector(h), :] = to_numpy(slab)
        return out
