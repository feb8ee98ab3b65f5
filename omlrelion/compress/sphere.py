"""Lossless packed storage of Fourier-space slabs that are zero outside a sphere.

Dense layout
------------
A *slab* is an array of shape ``(P, ny, H)``, ``H = P // 2 + 1``, indexed ``[z, y_local, x]``: the
y-rows ``rows`` (FFTW indices into ``0 .. P-1``) of the FFTW-layout (corner) half grid of side
``P`` (odd for RELION's padded grid). Signed frequencies are ``kz = signed_freqs(P)[z]``,
``ky = signed_freqs(P)[rows[y_local]]`` and ``kx = x`` (see ``geometry.grids``). A full grid is the
slab with ``rows = 0 .. P-1``. The reconstruction's Fourier arrays (data, weights ``Fw``,
gridding weights ``Wn``) are zero outside ``|k|^2 <= r2_max`` (or ``< r2_max``: the caller
chooses, ``inclusive``), ``r2_max`` an integer.

Packed format
-------------
For each row ``(z, y_local)`` the stored voxels are ``x = 0 .. len - 1`` with
``len = #{x in 0..H-1 : x^2 + ky^2 + kz^2 <= r2_max}`` (``<`` when strict): because ``x^2`` grows
with ``x``, the voxels of a row inside the sphere are always a prefix of the row. The packed
array is 1D, of the dense array's dtype (complex stays complex, real stays real), and holds
these prefixes one after the other in C order (z-major, then y_local): exactly the elements
``dense[mask]`` of the boolean mask ``x < len[z, y_local]``, in the same order. Voxels outside
are dropped: ``pack`` is lossless only for arrays that are zero there (assert it with
:func:`check_outside_zero`), and ``unpack`` writes zeros there.

Index tables (host, NumPy; built vectorised, no loop over rows)
----------------------------------------------------------------
``counts`` : int64 ``(P, ny)``, the row lengths ``len``.
``offsets`` : int64 ``(P * ny + 1,)``, row ``r = z * ny + y_local`` occupies
``packed[offsets[r] : offsets[r + 1]]``; ``offsets[-1] = n_packed``. The z-planes ``z0 .. z1-1``
occupy the contiguous range ``packed[offsets[z0 * ny] : offsets[z1 * ny]]``, so a z-chunk of a slab
can be unpacked (or packed back) on its own: at most one chunk needs to be dense at a time.
``SpherePacking.to(xp)`` gives device copies (cached per backend and GPU).

Memory per voxel
----------------
Packed data: the dtype's size per *stored* voxel (complex64 8 B, float32 4 B, complex128 16 B,
float64 8 B) and nothing per dropped voxel; the only index is ``offsets``, 8 B per row
(``8 (P ny + 1)`` bytes, about 0.02 B per stored voxel at P = 1603). There is no per-voxel gather
index: on CuPy a kernel derives each voxel's place from ``offsets``; on NumPy ``pack``/``unpack``
build the boolean mask of the chunk being moved (1 B per dense voxel of that chunk, freed on
return). At full resolution (pad 2, ``r_max = N/2``, ``P = 2N + 3``) 49% (N = 64) to 52% (N = 800) of
the half grid is stored (``pi/6`` in the limit): :func:`footprint_report` gives whole-problem numbers.

Elementwise steps on packed arrays
----------------------------------
Two arrays packed with the same packing hold the same voxel at the same position, so any
elementwise step runs on the 1D packed arrays without unpacking: ``pack(f(a, b)) ==
f(pack(a), pack(b))`` bit for bit (e.g. ``wn * fw``). Steps that depend on the frequency use
:func:`packed_r2` / :func:`packed_frequencies`, e.g. the strict interior of an inclusive packing
for the gridding update, ``wn_p = xp.where(packed_r2(pk, xp) < R2, wn_p / c_p, wn_p)``;
:func:`packed_rows_view` gives the part of a packed array that belongs to a range of z-planes.
``packed_r2`` holds an int64 per stored voxel: on large grids make it per z-chunk (``z_range``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from omlrelion.backend import Array, cp, get_xp, is_gpu_array, to_numpy
from omlrelion.geometry.grids import PaddedGrid, signed_freqs

__all__ = [
    "SpherePacking", "PackingTables", "pack", "unpack", "check_outside_zero", "packed_rows_view",
    "packed_frequencies", "packed_r2", "dense_bytes", "packed_bytes", "footprint_report",
]


class PackingTables(NamedTuple):
    """Index tables of a packing on one backend: ``offsets`` (n_rows + 1,) and ``counts`` (P, ny), int64."""

    offsets: Array
    counts: Array


def _row_lengths(s, r2_max: int, inclusive: bool, width: int) -> np.ndarray:
    """Number of ``x in 0..width-1`` with ``x^2 + s <= r2_max`` (``< r2_max`` when strict), exactly.

    ``s`` : int64 array of ``ky^2 + kz^2``.
    """
    limit = np.asarray(r2_max - s if inclusive else r2_max - 1 - s, dtype=np.int64)   # x^2 <= limit
    lim = np.maximum(limit, 0)
    x = np.floor(np.sqrt(lim.astype(np.float64))).astype(np.int64)
    x -= x * x > lim                       # exact integer square root: fix float rounding both ways
    x += (x + 1) * (x + 1) <= lim
    return np.minimum(np.where(limit >= 0, x + 1, 0), width)


class SpherePacking:
    """Which voxels of a ``(P, ny, P//2+1)`` FFTW-layout y-slab a packed array stores (see module doc).

    Parameters
    ----------
    size : int
        Side ``P`` of the grid.
    rows : integer array-like, (ny,)
        FFTW y indices (``0 .. P-1``) of the slab's rows, in the slab's order.
    r2_max : int
        Squared radius of the sphere, in grid voxels.
    inclusive : bool
        Keep ``|k|^2 <= r2_max`` (True) or ``|k|^2 < r2_max`` (False).

    Attributes
    ----------
    counts : int64 array, (P, ny), read-only
        Stored voxels of each row (``x = 0 .. counts - 1``).
    offsets : int64 array, (P * ny + 1,), read-only
        Start of each row in the packed array; the last entry is ``n_packed``.
    """

    def __init__(self, size: int, rows, r2_max: int, inclusive: bool):
        size = int(size)
        if size < 1:
            raise ValueError(f"size must be a positive grid side, got {size}")
        rows_np = np.asarray(to_numpy(rows))
        if rows_np.ndim != 1 or not (rows_np.size == 0 or np.issubdtype(rows_np.dtype, np.integer)):
            raise ValueError(f"rows must be a 1D integer index array, got shape {rows_np.shape}, dtype {rows_np.dtype}")
        rows_np = rows_np.astype(np.int64)
        if rows_np.size and (rows_np.min() < 0 or rows_np.max() >= size):
            raise ValueError(f"rows must be FFTW indices in 0..{size - 1}, got values in "
                             f"{rows_np.min()}..{rows_np.max()}")
        if int(r2_max) != r2_max or r2_max < 0:
            raise ValueError(f"r2_max must be a non-negative integer (squared radius in voxels), got {r2_max!r}")
        self.size = size
        self.rows = rows_np
        self.rows.flags.writeable = False
        self.r2_max = int(r2_max)
        self.inclusive = bool(inclusive)
        k = signed_freqs(size, np).astype(np.int64)
        s = k[:, None] ** 2 + k[rows_np][None, :] ** 2
        self.counts = _row_lengths(s, self.r2_max, self.inclusive, size // 2 + 1)
        self.offsets = np.zeros(self.counts.size + 1, dtype=np.int64)
        np.cumsum(self.counts.ravel(), out=self.offsets[1:])
        self.counts.flags.writeable = False
        self.offsets.flags.writeable = False
        self._tables = {}                 # device copies of the tables, filled by `to`
        self._frozen = True

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False):
            raise AttributeError(f"SpherePacking is immutable: cannot set {name!r}; build a new packing")
        object.__setattr__(self, name, value)

    @classmethod
    def full(cls, size: int, r2_max: int, inclusive: bool) -> SpherePacking:
        """Packing of the whole half grid (``rows = 0 .. P-1``)."""
        return cls(size, np.arange(int(size)), r2_max, inclusive)

    def __repr__(self) -> str:
        return (f"SpherePacking(size={self.size}, ny={self.ny}, r2_max={self.r2_max}, "
                f"inclusive={self.inclusive}, n_packed={self.n_packed})")

    def __eq__(self, other) -> bool:
        if not isinstance(other, SpherePacking):
            return NotImplemented
        return (self.size, self.r2_max, self.inclusive) == (other.size, other.r2_max, other.inclusive) \
            and np.array_equal(self.rows, other.rows)

    def __hash__(self) -> int:
        return hash((self.size, self.r2_max, self.inclusive, self.rows.tobytes()))

    @property
    def ny(self) -> int:
        """Number of y-rows in the slab."""
        return int(self.rows.size)

    @property
    def half(self) -> int:
        """Length ``P//2 + 1`` of the x axis."""
        return self.size // 2 + 1

    @property
    def dense_shape(self) -> tuple[int, int, int]:
        """``(P, ny, P//2+1)``: shape of the dense slab."""
        return (self.size, self.ny, self.half)

    @property
    def n_rows(self) -> int:
        """Number of (z, y_local) rows, ``P * ny``."""
        return self.size * self.ny

    @property
    def n_packed(self) -> int:
        """Number of stored voxels (length of a packed array)."""
        return int(self.offsets[-1])

    @property
    def packed_fraction(self) -> float:
        """Stored voxels over dense voxels (0 for an empty slab)."""
        n_dense = self.size * self.ny * self.half
        return self.n_packed / n_dense if n_dense else 0.0

    @property
    def index_bytes(self) -> int:
        """Bytes of the offsets table (the only index a packed array needs)."""
        return int(self.offsets.nbytes)

    def plane_offsets(self) -> np.ndarray:
        """int64 (P + 1,): the packed range of z-plane ``z`` is ``[po[z], po[z + 1])``."""
        return self.offsets[:: self.ny] if self.ny else np.zeros(self.size + 1, dtype=np.int64)

    def z_slice(self, z0: int, z1: int) -> slice:
        """The slice of a packed array holding z-planes ``z0 .. z1-1``."""
        z0, z1 = self._z_bounds((z0, z1))
        return slice(int(self.offsets[z0 * self.ny]), int(self.offsets[z1 * self.ny]))

    def to(self, xp) -> PackingTables:
        """``offsets`` and ``counts`` on backend ``xp`` (the current GPU for CuPy), cached."""
        if xp is np:
            return PackingTables(self.offsets, self.counts)
        key = (xp.__name__, int(xp.cuda.Device().id))
        if key not in self._tables:
            self._tables[key] = PackingTables(xp.asarray(self.offsets), xp.asarray(self.counts))
        return self._tables[key]

    def _z_bounds(self, z_range) -> tuple[int, int]:
        if z_range is None:
            return 0, self.size
        z0, z1 = (int(v) for v in z_range)
        if not 0 <= z0 <= z1 <= self.size:
            raise ValueError(f"z_range must satisfy 0 <= z0 <= z1 <= {self.size}, got {tuple(z_range)}")
        return z0, z1

    def chunk_shape(self, z_range=None) -> tuple[int, int, int]:
        """Shape ``(z1 - z0, ny, P//2+1)`` of the dense chunk of z-planes ``z_range`` (all when None)."""
        z0, z1 = self._z_bounds(z_range)
        return (z1 - z0, self.ny, self.half)


def _check_array(name: str, a, shape, xp) -> None:
    if get_xp(a) is not xp:
        raise ValueError(f"{name} must live on the same backend as the input ({xp.__name__}), "
                         f"got a {type(a).__module__}.{type(a).__name__}")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")


def _check_cast(name: str, src, dst) -> None:
    if not np.can_cast(src, dst, casting="safe"):
        raise ValueError(f"{name} has dtype {np.dtype(dst)}, which cannot hold {np.dtype(src)} exactly; "
                         f"pass a buffer of dtype {np.dtype(src)}")


def pack(dense, packing: SpherePacking, *, out=None, z_range=None):
    """Keep the voxels of `dense` inside the packing's sphere, as a 1D array.

    Parameters
    ----------
    dense : array, (z1 - z0, ny, P//2+1), numpy or cupy, any dtype
        The slab (``z_range=None``: all P planes) or its z-planes ``z0 .. z1-1``. Values outside
        the sphere are dropped (see :func:`check_outside_zero`).
    packing : SpherePacking
    out : 1D array, (n_packed,), same backend, optional
        Packed array to write into (only the part of ``z_range`` is written); its dtype must
        hold ``dense.dtype`` exactly. Required with ``z_range``.
    z_range : (z0, z1), optional

    Returns
    -------
    1D array, (n_packed,): `out`, or a new array of ``dense.dtype`` on `dense`'s backend.
    """
    xp = get_xp(dense)
    z0, z1 = packing._z_bounds(z_range)
    _check_array("dense", dense, packing.chunk_shape((z0, z1)), xp)
    if out is None:
        if (z0, z1) != (0, packing.size):
            raise ValueError("pack of a z_range writes into an existing packed array: pass out= "
                             f"(shape ({packing.n_packed},))")
        out = xp.empty(packing.n_packed, dtype=dense.dtype)
    else:
        _check_array("out", out, (packing.n_packed,), xp)
        _check_cast("out", dense.dtype, out.dtype)
    if is_gpu_array(dense):
        _pack_cuda(dense, packing, out, z0)
    else:
        _pack_mask(dense, packing, out, z0, z1)
    return out


def unpack(packed, packing: SpherePacking, *, out=None, z_range=None):
    """Dense slab (or z-planes ``z_range``) from a packed array; zero outside the sphere.

    Parameters
    ----------
    packed : 1D array, (n_packed,), numpy or cupy
    packing : SpherePacking
    out : array, (z1 - z0, ny, P//2+1), same backend, optional
        Buffer to reuse (e.g. an FFT buffer, which may be a strided view); every element is
        written. Its dtype must hold ``packed.dtype`` exactly (real into complex is allowed).
    z_range : (z0, z1), optional
        Unpack only z-planes ``z0 .. z1-1`` (FFTW z indices); None: all P planes.

    Returns
    -------
    array, (z1 - z0, ny, P//2+1): `out`, or a new array of ``packed.dtype``.
    """
    xp = get_xp(packed)
    z0, z1 = packing._z_bounds(z_range)
    _check_array("packed", packed, (packing.n_packed,), xp)
    shape = packing.chunk_shape((z0, z1))
    if out is None:
        out = xp.empty(shape, dtype=packed.dtype)
    else:
        _check_array("out", out, shape, xp)
        _check_cast("out", packed.dtype, out.dtype)
    if is_gpu_array(packed):
        _unpack_cuda(packed, packing, out, z0)
    else:
        _unpack_mask(packed, packing, out, z0, z1)
    return out


def _chunk_mask(packing: SpherePacking, xp, z0: int, z1: int):
    counts = packing.to(xp).counts[z0:z1]
    return xp.arange(packing.half, dtype=np.int64) < counts[:, :, None]


def _pack_mask(dense, packing, out, z0, z1):
    """xp version (numpy; also runs on cupy): one boolean-mask gather."""
    xp = get_xp(dense)
    out[packing.z_slice(z0, z1)] = dense[_chunk_mask(packing, xp, z0, z1)]


def _unpack_mask(packed, packing, out, z0, z1):
    """xp version (numpy; also runs on cupy): zero fill, then one boolean-mask scatter."""
    xp = get_xp(packed)
    out.fill(0)
    out[_chunk_mask(packing, xp, z0, z1)] = packed[packing.z_slice(z0, z1)]


_CUDA_KERNELS: dict = {}


def _cuda_kernels() -> dict:
    """Pack/unpack kernels: one thread per dense voxel of the chunk, places read from `offsets`."""
    if not _CUDA_KERNELS:
        _CUDA_KERNELS["pack"] = cp.ElementwiseKernel(
            "T dense, raw int64 offsets, int64 width, int64 row0", "raw U packed",
            """
            const long long row = row0 + (long long)i / width, x = (long long)i % width;
            const long long start = offsets[row];
            if (x < offsets[row + 1] - start) packed[start + x] = (U)dense;
            """, "omlrelion_sphere_pack")
        _CUDA_KERNELS["unpack"] = cp.ElementwiseKernel(
            "raw T packed, raw int64 offsets, int64 width, int64 row0", "U dense",
            """
            const long long row = row0 + (long long)i / width, x = (long long)i % width;
            const long long start = offsets[row];
            if (x < offsets[row + 1] - start) dense = (U)packed[start + x]; else dense = U();
            """, "omlrelion_sphere_unpack")
    return _CUDA_KERNELS


def _pack_cuda(dense, packing, out, z0):
    if dense.size:
        offsets = packing.to(cp).offsets
        _cuda_kernels()["pack"](dense, offsets, np.int64(packing.half), np.int64(z0 * packing.ny), out)


def _unpack_cuda(packed, packing, out, z0):
    if out.size:
        offsets = packing.to(cp).offsets
        _cuda_kernels()["unpack"](packed, offsets, np.int64(packing.half), np.int64(z0 * packing.ny), out)


def check_outside_zero(dense, packing: SpherePacking, *, z_range=None) -> bool:
    """True when every voxel of `dense` outside the packing's sphere is exactly zero.

    ``pack`` drops those voxels, so it is lossless only when this holds; assert it in tests or
    debug runs (it costs one boolean mask of the dense shape). NaN counts as non-zero.
    """
    xp = get_xp(dense)
    z0, z1 = packing._z_bounds(z_range)
    _check_array("dense", dense, packing.chunk_shape((z0, z1)), xp)
    return not bool(xp.any(dense[~_chunk_mask(packing, xp, z0, z1)] != 0))


def packed_rows_view(packed, packing: SpherePacking, z_range):
    """The part of a packed array that holds z-planes ``z0 .. z1-1`` (a view, writable)."""
    if packed.shape != (packing.n_packed,):
        raise ValueError(f"packed must have shape ({packing.n_packed},), got {tuple(packed.shape)}")
    return packed[packing.z_slice(*z_range)]


def packed_frequencies(packing: SpherePacking, xp=np, *, z_range=None):
    """Signed ``(kz, ky, kx)`` of every stored voxel, in packed order.

    Returns three int64 1D arrays on `xp` of length ``n_packed`` (or that of ``z_range``'s planes).
    """
    z0, z1 = packing._z_bounds(z_range)
    sl = packing.z_slice(z0, z1)
    tables = packing.to(xp)
    # row of every stored voxel: the row number, written where each non-empty row starts, as steps
    # from the previous non-empty row, then summed (one scatter and one cumsum, on either backend)
    filled = xp.flatnonzero(tables.counts.reshape(-1)[z0 * packing.ny:z1 * packing.ny]) + z0 * packing.ny
    steps = xp.zeros(sl.stop - sl.start, dtype=np.int64)
    steps[tables.offsets[filled] - sl.start] = xp.diff(filled, prepend=0)
    row = xp.cumsum(steps)
    k = xp.asarray(signed_freqs(packing.size, np).astype(np.int64))
    ky = k[xp.asarray(packing.rows)] if packing.ny else xp.zeros(0, dtype=np.int64)
    ny = max(packing.ny, 1)
    return k[row // ny], ky[row % ny], xp.arange(sl.start, sl.stop, dtype=np.int64) - tables.offsets[row]


def packed_r2(packing: SpherePacking, xp=np, *, z_range=None):
    """``|k|^2`` (int64) of every stored voxel, in packed order (e.g. for a strict-interior mask)."""
    kz, ky, kx = packed_frequencies(packing, xp, z_range=z_range)
    return kz * kz + ky * ky + kx * kx


def dense_bytes(shape, dtype) -> int:
    """Bytes of a dense array of `shape` and `dtype`."""
    return int(np.prod([int(s) for s in shape], dtype=object)) * np.dtype(dtype).itemsize


def packed_bytes(packing: SpherePacking, dtype) -> int:
    """Bytes of the values of one packed array of `dtype` (the offsets table: ``packing.index_bytes``)."""
    return packing.n_packed * np.dtype(dtype).itemsize


def _slab_parts(n: int, n_parts: int, strided: bool) -> list[np.ndarray]:
    """Planes of each part, as reconstruct.slab_fft.SlabLayout splits them (contiguous or strided)."""
    if strided:
        return [np.arange(p, n, n_parts) for p in range(n_parts)]
    bounds = np.linspace(0, n, n_parts + 1).round().astype(int)
    return [np.arange(bounds[p], bounds[p + 1]) for p in range(n_parts)]


def footprint_report(box_size: int, pad: float, r_max: int, n_devices: int, dtype=np.float32,
                     *, strided: bool = False) -> dict:
    """Memory of the sums-to-map step: RELION's dense arrays against a sphere-packed plan.

    Dense (whole problem, as in the reconstruction spec's memory table, every array in `dtype`
    or its complex counterpart): ``data``, ``Fconv`` complex and ``weight``, ``Fweight``,
    ``Fnewweight`` real on the half grid ``(P, P, P//2+1)``; ``Mconv`` real ``(P, P, P)``.

    Packed plan, over `n_devices` y-slabs (contiguous or strided, as ``reconstruct.slab_fft``):
    ``data`` complex, ``Fweight`` and ``Fnewweight`` real, packed inside ``|k|^2 <= R^2``
    (``R = round(pad r_max)``, as ``decenter`` keeps), each device's offsets table, and one dense
    complex FFT buffer per device the size of its slab ``(P, ny_g, P//2+1)`` (which also holds its
    real z-slab in place). Exchange staging buffers of the distributed FFT are not counted.

    Returns
    -------
    dict of ints, floats and strings (JSON-ready), bytes throughout: ``dense_bytes`` and
    ``packed_bytes`` per array, their totals, ``per_device`` (list of dicts), the largest
    device's total and the ratios to the dense total.
    """
    if int(n_devices) < 1:
        raise ValueError(f"n_devices must be >= 1, got {n_devices}")
    real = np.dtype(dtype)
    if real.kind != "f":
        raise ValueError(f"dtype must be a real float type (float32 or float64), got {real}")
    cplx = np.result_type(real, np.complex64)
    grid = PaddedGrid(int(box_size), float(pad), int(r_max))
    size, half, r2 = grid.size, grid.half, grid.r2_sphere
    half_grid = size * size * half
    # stored voxels per y row, summed over z: |kz| values with their multiplicities (memory ~ P^2 / 2)
    k = signed_freqs(size, np).astype(np.int64)
    mult = np.bincount(np.abs(k))
    kz_abs = np.arange(mult.size, dtype=np.int64)
    per_y = (mult[:, None] * _row_lengths(kz_abs[:, None] ** 2 + k[None, :] ** 2, r2, True, half)).sum(axis=0)
    n_packed = int(per_y.sum())
    dense = {
        "data": dense_bytes((size, size, half), cplx),
        "weight": dense_bytes((size, size, half), real),
        "Fconv": dense_bytes((size, size, half), cplx),
        "Fweight": dense_bytes((size, size, half), real),
        "Fnewweight": dense_bytes((size, size, half), real),
        "Mconv": dense_bytes((size, size, size), real),
    }
    per_device = []
    for part in _slab_parts(size, int(n_devices), strided):
        n_dev = int(per_y[part].sum())
        entry = {
            "rows": int(part.size),
            "packed_voxels": n_dev,
            "data": n_dev * cplx.itemsize,
            "Fweight": n_dev * real.itemsize,
            "Fnewweight": n_dev * real.itemsize,
            "index": 8 * (size * int(part.size) + 1),
            "fft_buffer": dense_bytes((size, part.size, half), cplx),
        }
        entry["total"] = sum(v for key, v in entry.items() if key not in ("rows", "packed_voxels"))
        per_device.append(entry)
    packed = {key: sum(d[key] for d in per_device) for key in ("data", "Fweight", "Fnewweight", "index")}
    packed["fft_buffers"] = sum(d["fft_buffer"] for d in per_device)
    dense_total = sum(dense.values())
    packed_total = sum(packed.values())
    peak = max(d["total"] for d in per_device)
    return {
        "box_size": grid.box_size, "pad": grid.pad, "r_max": grid.r_max, "n_devices": int(n_devices),
        "strided": bool(strided), "dtype": real.name, "padded_size": size, "r2_max": r2,
        "half_grid_voxels": half_grid, "real_grid_voxels": size**3,
        "packed_voxels": n_packed, "packed_fraction": n_packed / half_grid,
        "dense_bytes": dense, "dense_total_bytes": dense_total,
        "packed_bytes": packed, "packed_total_bytes": packed_total,
        "per_device": per_device, "packed_peak_device_bytes": peak,
        "packed_over_dense": packed_total / dense_total, "peak_device_over_dense": peak / dense_total,
    }
