"""Plans for the sums-to-map step: which path, how many devices, which storage and FFT size.

A `Plan` says how `reconstruct_map` (one device, dense) or `reconstruct_map_distributed` (slabs
over G devices, dense or packed) is run for one grid. `choose_plan` enumerates the candidates for
a `PaddedGrid` and a device list, drops those whose modelled memory does not fit in each device's
free memory, ranks the rest by a calibrated cost model and, with ``measure=k``, times the k best
on the real code. It depends only on (box, pad, r_max, devices) and a few options, so a refinement
calls it every iteration (r_max grows) and gets cached decisions.

Memory model
------------
`memory_estimate` replays, allocation by allocation, what the current implementation holds:
the centred input sums on the input device; per device the Fourier slabs (``fw``, ``wn``, data,
dense or packed), the int64 ``|k|^2`` and bool ``inside`` arrays, the blob slab and the
temporaries that build it, the `SlabFFT` buffers (2D/1D FFT outputs, gathered exchange buffers,
exchanged pieces, c2r outputs), the temporaries of every elementwise update, and the final
window and inverse on the Q grid; or the same for the single-device path. NumPy's temporary
elision (``a * b + c`` reusing a temporary) is followed on the host; CuPy allocates a new array
for every operation. Library buffers: CuPy copies the input of every c2r transform and of every
FFT along a non-last axis (ordinary pool allocations, always counted); pocketfft on the host
allocates a c2r buffer of the input's size with ``malloc`` (counted when ``library_buffers``;
invisible to tracemalloc). On GPUs two more terms come from the calibration: the work areas
of the cuFFT plans CuPy keeps cached (measured per FFT side as the plan cache's size, added by
the planner), and ``memory_factor`` (default 1.0; on a GPU, the CuPy pool's high-water mark over
the model in two box-128 runs) for the pool's rounding and fragmentation. CUDA context memory
is outside both; `free_memory` leaves a margin. For scale, the H200 benchmark recorded pool
peaks of 8.9 GB (box 256) and 32.0 GB (box 400) for whole commands (back-projection and cached
FFT plans included), where the replay of the sums-to-map step gives 3.0 and 11.4 GB.

Checked against tracemalloc on the host (NumPy arrays are traced; inputs added; pocketfft's
buffers left out): model / measured peak 0.989-1.000 over 42 runs of boxes 32-64 (P 51-131,
r_max 12 to Nyquist), float32 and float64, both paths, G = 1-4 simulated devices, dense and
packed, contiguous and strided slabs, an inexact FFT side, the MAP term and the no-gridding
branch (e.g. box 48, 2 devices, packed: 29.08 MB modelled, 29.09 MB traced; the test suite
repeats nine of them). On GPUs the model has not been checked against a run yet.

Cost model
----------
``n_iter`` gridding iterations, each one c2r + r2c pair of side ``fft_size`` (measured on the
device, or extrapolated as ``a n^3 log2(n^3) penalty(largest prime factor)``), split over the
devices, plus two all-to-all exchanges (bytes / measured copy bandwidth) and the elementwise
passes (bytes / measured memory bandwidth); then the window and inverse FFT on Q and the mask.
Simulated host devices share one CPU, so their work adds up instead of running side by side.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from omlrelion.backend import Device, fft_module
from omlrelion.compress.sphere import SpherePacking, footprint_report
from omlrelion.errors import InputError
from omlrelion.geometry.grids import PaddedGrid, fft_friendly_size, signed_freqs
from omlrelion.io.jsonfile import write_json
from omlrelion.reconstruct.slab_fft import SlabFFT, SlabLayout
from omlrelion.units import relion_round

log = logging.getLogger(__name__)

STORAGES = ("dense", "packed")
CACHE_ENV = "OMLRELION_AUTOTUNE_CACHE"
CALIBRATION_FORMAT = 1
_INEXACT_PRIMES = ((2, 3, 5, 7), (2, 3, 5), (2, 3), (2,))
_INEXACT_MAX_GROWTH = 1.15          # friendly FFT sides considered: at most 15% above P


@dataclass(frozen=True)
class Plan:
    """How the sums-to-map step runs.

    n_devices : devices used (the first n of the list); 1 with dense storage is the single-device
        path `reconstruct_map`, anything else `reconstruct_map_distributed`.
    storage : "dense" or "packed" (Fourier arrays kept only inside the sphere).
    strided : slab layout over several devices (plane p on device p mod G) instead of blocks.
    fft_size : side of the gridding loop's FFTs: RELION's odd P (exact), or a larger FFT-friendly
        side (single-device path only; differs from RELION's grid by ~4e-4 relative).
    """

    n_devices: int
    storage: str
    strided: bool
    fft_size: int

    def __post_init__(self):
        if int(self.n_devices) < 1:
            raise ValueError(f"n_devices must be >= 1, got {self.n_devices}")
        if self.storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {self.storage!r}")

    @property
    def single_device_path(self) -> bool:
        """True when the plan runs `reconstruct_map` (one device, dense)."""
        return self.n_devices == 1 and self.storage == "dense"

    def is_exact(self, grid: PaddedGrid) -> bool:
        """True when the FFTs run on RELION's own grid side P."""
        return self.fft_size == grid.size

    def describe(self) -> str:
        """One line, e.g. '2 devices, packed, strided slabs, fft 515'."""
        parts = [f"{self.n_devices} device" + ("s" if self.n_devices > 1 else ""), self.storage]
        if self.n_devices > 1:
            parts.append("strided slabs" if self.strided else "contiguous slabs")
        parts.append(f"fft {self.fft_size}")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        """JSON-ready dict (the dataclass fields)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        return cls(int(d["n_devices"]), str(d["storage"]), bool(d["strided"]), int(d["fft_size"]))


# ------------------------------------------------------------------------------------------------
# Memory model: a replay of the implementation's allocations
# ------------------------------------------------------------------------------------------------

HOST = -1
_NUMPY_ELIDE_BYTES = 256 * 1024         # NumPy reuses temporaries of at least this size


class _Ledger:
    """Bytes alive per place (device index, or HOST), their peaks, and the peak of their sum."""

    def __init__(self, n_devices: int):
        self.live: dict = {}
        self.current = [0] * (n_devices + 1)        # index -1: the host
        self.peak = [0] * (n_devices + 1)
        self.total = 0
        self.total_peak = 0

    def alloc(self, key, where: int, nbytes) -> None:
        if key in self.live:
            raise RuntimeError(f"memory model: {key!r} allocated twice")
        nbytes = int(nbytes)
        self.live[key] = (where, nbytes)
        self.current[where] += nbytes
        self.total += nbytes
        self.peak[where] = max(self.peak[where], self.current[where])
        self.total_peak = max(self.total_peak, self.total)

    def free(self, *keys) -> None:
        for key in keys:
            if key is None or key not in self.live:
                continue
            where, nbytes = self.live.pop(key)
            self.current[where] -= nbytes
            self.total -= nbytes

    def rebind(self, key, where: int, nbytes) -> None:
        """`name = new array`: the new one is allocated while the old one is still alive."""
        old = ("old", key)
        if key in self.live:
            self.live[old] = self.live.pop(key)
        self.alloc(key, where, nbytes)
        self.free(old)

    def rename(self, old, new) -> None:
        """The same array under a new name (NumPy's elided temporaries, `a = b` hand-overs)."""
        self.live[new] = self.live.pop(old)

    def temp(self, where: int, *sizes) -> None:
        """Temporaries alive together for a moment, on top of everything alive now."""
        keys = [("temp", id(sizes), i) for i in range(len(sizes))]
        for key, size in zip(keys, sizes):
            self.alloc(key, where, size)
        self.free(*keys)


@dataclass(frozen=True)
class MemoryEstimate:
    """Modelled peak bytes of one run: per device, on the host, and of the sum (simulated devices)."""

    per_device: tuple
    host: int
    simulated_total: int

    @property
    def max_per_device(self) -> int:
        return max(self.per_device)


@functools.lru_cache(maxsize=256)
def _sphere_count(size: int, n_parts: int, strided: bool, part: int, r2_max: int, inclusive: bool) -> int:
    """Voxels of one device's y-slab of the half grid with |k|^2 <= r2_max (< when not inclusive)."""
    rows = SlabLayout(size, n_parts, strided).planes(part)
    return SpherePacking(size, rows, r2_max, inclusive).n_packed


class _Replay:
    """Walks through one run of the sums-to-map step, recording every array it allocates.

    Each method follows one function of `reconstruct.gridding` / `reconstruct.distributed` /
    `reconstruct.slab_fft` / `compress.sphere` statement by statement; a comment names what an
    allocation is when the code line alone does not say it.
    """

    def __init__(self, plan: Plan, grid: PaddedGrid, real, backend: str, library_buffers: bool,
                 n_iter: int, map_term: bool):
        if backend not in ("numpy", "cupy"):
            raise ValueError(f"backend must be 'numpy' or 'cupy', got {backend!r}")
        if np.dtype(real).kind != "f":
            raise ValueError(f"real_dtype must be float32 or float64, got {np.dtype(real)}")
        self.plan, self.grid, self.n_iter, self.map_term = plan, grid, int(n_iter), bool(map_term)
        self.r = np.dtype(real).itemsize
        self.c = 2 * self.r
        self.cupy = backend == "cupy"
        self.lib = library_buffers
        self.G = plan.n_devices
        self.L = _Ledger(self.G)

    def run(self) -> MemoryEstimate:
        P, H = self.grid.size, self.grid.half
        self.L.alloc("data_in", 0, P * P * H * self.c)
        self.L.alloc("weight_in", 0, P * P * H * self.r)
        if self.plan.single_device_path:
            self.single()
        else:
            self.distributed()
        L = self.L
        return MemoryEstimate(tuple(L.peak[:self.G]), L.peak[HOST], L.total_peak)

    # -- small patterns ----------------------------------------------------------------------------
    def binop_on_temp(self, key, where, nbytes, temp_key):
        """`temp OP x`: NumPy writes into a temporary of >= 256 KiB (elision), CuPy allocates anew."""
        if self.cupy or nbytes < _NUMPY_ELIDE_BYTES:
            self.L.alloc(key, where, nbytes)
            self.L.free(temp_key)
        else:
            self.L.rename(temp_key, key)

    def c2r(self, where, in_bytes, out_key, out_bytes):
        """A multi-axis c2r transform: its output, and CuPy's input copy / pocketfft's buffer."""
        L = self.L
        buffered = self.cupy or self.lib
        if buffered:
            L.alloc("c2r_buffer", where, in_bytes)
        L.alloc(out_key, where, out_bytes)
        L.free("c2r_buffer")

    def radial_float64(self, where, nvox, key):
        """sqrt(a^2 + b^2 + c^2) over a grid in float64: the sum, then its square root."""
        self.L.alloc("rad_sum", where, 8 * nvox)
        self.L.alloc(key, where, 8 * nvox)
        self.L.free("rad_sum")

    def blob_build(self, where, nvox, key):
        """blob_real_space / _blob_slab: float64 radius, int64 table index, then the table lookup."""
        L, r = self.L, self.r
        self.radial_float64(where, nvox, "blob_sqrt")
        self.binop_on_temp("blob_rho", where, 8 * nvox, "blob_sqrt")     # * or / (N pad)
        L.alloc("blob_div", where, 8 * nvox)                             # rho / step
        L.alloc("blob_floor", where, 8 * nvox)
        L.free("blob_div")
        L.alloc("blob_idx", where, 8 * nvox)                             # .astype(int64)
        L.free("blob_floor")
        L.alloc("blob_below", where, nvox)                               # idx < table size
        L.alloc("blob_min", where, 8 * nvox)
        L.alloc("blob_take", where, r * nvox)
        L.free("blob_min")
        L.alloc("blob_where", where, r * nvox)
        L.free("blob_below", "blob_take")
        L.alloc(key, where, r * nvox)                                    # .astype(dtype)
        L.free("blob_where", "blob_rho", "blob_idx")

    def blob_build_chunked(self, where, n_planes, size, key, planes_per_chunk=8):
        """distributed._blob_slab: the output, the (y, x) radius table, then a few planes at a time."""
        L, r = self.L, self.r
        L.alloc(key, where, r * n_planes * size * size)
        L.alloc("blob_ry2", where, 8 * size * size)
        chunk = min(planes_per_chunk, n_planes) * size * size
        if chunk:
            self.blob_build(where, chunk, "blob_chunk")
            L.free("blob_chunk")
        L.free("blob_ry2")

    def mask_and_correct(self, where, n):
        """soft_mask_outside + grid_correct on an (N, N, N) map (their temporaries are float64)."""
        L, v, r = self.L, n ** 3, self.r
        self.radial_float64(where, v, "m_r")
        L.alloc("m_b1", where, v)                                        # r < radius
        L.alloc("m_b2", where, v)                                        # r > outer
        L.alloc("m_t", where, 8 * v)                                     # raised cosine: at most two
        L.alloc("m_t2", where, 8 * v)                                    # float64 temporaries at once
        L.free("m_t")
        L.alloc("m_inner", where, 8 * v)
        L.free("m_b2", "m_t2")
        L.alloc("m_c", where, 8 * v)
        L.free("m_b1", "m_inner")
        L.alloc("m_v", where, 8 * v)                                     # volume.astype(float64)
        L.temp(where, 8 * v)                                             # c * v
        L.alloc("m_1c", where, 8 * v)                                    # (1 - c) * v + c * b
        self.binop_on_temp("m_1cv", where, 8 * v, "m_1c")
        L.alloc("m_cb", where, 8 * v)
        self.binop_on_temp("m_sum", where, 8 * v, "m_1cv")
        L.free("m_cb")
        L.temp(where, r * v)                                             # .astype(volume.dtype)
        L.free("m_sum", "m_r", "m_c", "m_v")
        self.radial_float64(where, v, "g_r")                             # grid_correct
        self.binop_on_temp("g_arg", where, 8 * v, "g_r")                 # / (N pad)
        if self.cupy:
            L.alloc("g_s", where, 8 * v)                                 # CuPy's sinc: one kernel
        else:                                                            # numpy.sinc: pi x, where, sin
            L.alloc("g_pix", where, 8 * v)
            L.alloc("g_y", where, 8 * v)
            L.alloc("g_s", where, 8 * v)
            L.free("g_pix", "g_y")
        L.free("g_arg")
        L.alloc("g_ss", where, 8 * v)
        L.temp(where, r * v)
        L.free("g_s", "g_ss")

    def map_term_steps(self, where, nvox, own_r2: bool):
        """add_map_term over `nvox` voxels (its own int64 |k|^2 on the single-device path)."""
        L, r = self.L, self.r
        if own_r2:
            L.alloc("mt_r2", where, 8 * nvox)                            # radius2_ft
        L.alloc("mt_f", where, 8 * nvox)                                 # r2.astype(float64)
        L.alloc("mt_k", where, 8 * nvox)                                 # sqrt
        L.free("mt_f")
        self.binop_on_temp("mt_kp", where, 8 * nvox, "mt_k")             # / pad
        self.binop_on_temp("mt_kp5", where, 8 * nvox, "mt_kp")           # + 0.5
        L.alloc("mt_fl", where, 8 * nvox)
        L.free("mt_kp5")
        L.alloc("mt_shell", where, 8 * nvox)                             # .astype(int64)
        L.free("mt_fl")
        L.alloc("mt_b1", where, nvox)                                    # (r2 < R2) & (shell >= minres)
        L.alloc("mt_b2", where, nvox)
        self.binop_on_temp("mt_inside", where, nvox, "mt_b1")
        L.free("mt_b2")
        L.alloc("mt_min", where, 8 * nvox)                               # tau2[minimum(shell, n - 1)]
        L.alloc("mt_t", where, 8 * nvox)
        L.free("mt_min")
        L.alloc("mt_w", where, 8 * nvox)                                 # weight.astype(float64)
        # where(t > 0, 1 / (c * where(t > 0, t, 1)), where((t < e) & (w > e), 1 / (d * where(w > e, w, 1)), 0))
        L.alloc("mt_a1", where, nvox)
        L.alloc("mt_b", where, nvox)
        L.alloc("mt_w1", where, 8 * nvox)
        L.free("mt_b")
        self.binop_on_temp("mt_cw1", where, 8 * nvox, "mt_w1")
        L.alloc("mt_d1", where, 8 * nvox)
        L.free("mt_cw1")
        L.alloc("mt_bt", where, nvox)
        L.alloc("mt_bw", where, nvox)
        self.binop_on_temp("mt_and", where, nvox, "mt_bt")
        L.free("mt_bw")
        L.alloc("mt_b", where, nvox)
        L.alloc("mt_w2", where, 8 * nvox)
        L.free("mt_b")
        self.binop_on_temp("mt_dw2", where, 8 * nvox, "mt_w2")
        L.alloc("mt_d2", where, 8 * nvox)
        L.free("mt_dw2")
        L.alloc("mt_e2", where, 8 * nvox)
        L.free("mt_d2", "mt_and")
        L.alloc("mt_add", where, 8 * nvox)
        L.free("mt_a1", "mt_d1", "mt_e2")
        L.alloc("mt_wh", where, 8 * nvox)                                # where(inside, add, 0)
        L.temp(where, r * nvox)                                          # .astype(dtype)
        L.free("mt_wh", "mt_add", "mt_w", "mt_t", "mt_shell", "mt_inside", "mt_r2")

    def shell_floor_steps(self, parts, key):
        """shell_floor_weights: per part (device, voxels, voxels inside) float64 shells, then the
        float64 weights 1 / max(W, floor) as (key, part)."""
        L, r = self.L, self.r
        for i, (where, n, n_in) in enumerate(parts):
            L.alloc("sf_f", where, 8 * n)                                # r2.astype(float64)
            L.alloc("sf_k", where, 8 * n)
            L.free("sf_f")
            self.binop_on_temp("sf_kp", where, 8 * n, "sf_k")            # / pad
            L.alloc("sf_fl", where, 8 * n)
            L.free("sf_kp")
            L.alloc(("sf_shell", i), where, 8 * n)
            L.free("sf_fl")
            L.rebind("sf_inside", where, n)
            L.alloc("sf_sel", where, 8 * n_in)                           # shell[inside]
            L.temp(where, r * n_in, 8 * n_in)                            # w[inside].astype(float64)
            L.free("sf_sel")
            L.temp(where, 8 * n_in)
        for i, (where, n, _) in enumerate(parts):
            L.alloc("sf_w64", where, 8 * n)
            L.alloc("sf_min", where, 8 * n)
            L.alloc("sf_take", where, 8 * n)
            L.free("sf_min")
            L.rebind("sf_m", where, 8 * n)                               # maximum(...)
            L.free("sf_w64", "sf_take")
            L.alloc("sf_b1", where, n)
            L.alloc("sf_b2", where, n)
            L.alloc("sf_wh", where, 8 * n)
            L.free("sf_b2")
            L.alloc("sf_d", where, 8 * n)
            L.free("sf_wh")
            L.alloc((key, i), where, 8 * n)
            L.free("sf_b1", "sf_d")
        L.free("sf_m", "sf_inside", *[("sf_shell", i) for i in range(len(parts))])

    # -- single-device path: reconstruct_map -----------------------------------------------------
    def single(self):
        L, r, c, d = self.L, self.r, self.c, 0
        P, H, n = self.grid.size, self.grid.half, self.plan.fft_size
        hv = P * P * H
        L.alloc("fw", d, hv * r)                                         # decentre: ifftshift copy
        L.temp(d, 8 * hv, hv)                                            # |k|^2 int64, then the bool mask
        if self.map_term:
            self.map_term_steps(d, hv, own_r2=True)
        if self.n_iter <= 0:
            L.alloc("sf_r2", d, 8 * hv)                                  # radius2_ft argument
            self.shell_floor_steps([(d, hv, self.inside_count())], "wn")
            L.rename(("wn", 0), "wn")
            L.free("sf_r2")
        else:
            self.single_gridding(n)
        L.free("fw")
        L.alloc("fconv", d, hv * c)                                      # decentre(data)
        L.temp(d, 8 * hv, hv)
        if self.n_iter <= 0 and r != 8:
            L.temp(d, hv * r)                                            # float64 wn.astype(real)
        L.free("wn")
        q = self.grid.final_size
        hq = q * q * (q // 2 + 1)
        L.alloc("f2_window", d, hq * c)                                  # window_ft
        if q <= P:
            L.temp(d, hq * c)                                            # fancy-indexed block
        else:
            L.temp(d, 8 * hv, hv, hv * c)                                # enlarging: mask, masked copy
        L.alloc("f2_sign", d, hq * r)                                    # centre_by_sign's checkerboard
        L.alloc("f2", d, hq * c)
        L.free("f2_sign", "f2_window", "fconv")
        self.c2r(d, hq * c, "v_full", q ** 3 * r)
        L.free("f2")
        N = self.grid.box_size
        L.alloc("v", d, N ** 3 * r)                                      # crop .copy()
        L.free("v_full")
        self.mask_and_correct(d, N)
        L.free("v")

    def single_gridding(self, n):
        """gridding_weights: the NumPy loop, or the fused CuPy kernels (no mask or blob array)."""
        L, r, c, d = self.L, self.r, self.c, 0
        P = self.grid.size
        hn, real_n = n * n * (n // 2 + 1), n ** 3
        if n > P:
            L.alloc("fw_e", d, hn * r)                                   # embed_ft
        if self.cupy:
            L.alloc("wn_e", d, hn * r)
            L.alloc("conv", d, hn * c)
            for _ in range(self.n_iter):
                self.c2r(d, hn * c, "m", real_n * r)
                L.rebind("conv", d, hn * c)                              # rfftn(m)
                L.free("m")
            L.free("conv")
        else:
            L.alloc("g_r2", d, 8 * hn)                                   # radius2_ft
            L.alloc("inside", d, hn)
            L.free("g_r2")
            L.alloc("wn_e", d, hn * r)
            self.blob_build(d, real_n, "blob")
            for _ in range(self.n_iter):
                L.alloc("prod", d, hn * r)                               # wn * fw
                L.alloc("cplx", d, hn * c)                               # scipy's c2rn: real input + 0j
                self.c2r(d, hn * c, "m", real_n * r)
                L.free("prod", "cplx")
                L.alloc("conv", d, hn * c)                               # rfftn(m)
                L.free("m")
                L.alloc("u_abs", d, hn * r)
                L.alloc("u_max", d, hn * r)
                L.free("u_abs")
                L.alloc("u_div", d, hn * r)
                L.free("u_max")
                L.rebind("wn_e", d, hn * r)                              # where(inside, wn / mag, wn)
                L.free("u_div", "conv")
                if r == 4:
                    L.rebind("wn_e", d, hn * r)                          # minimum(wn, 1e20)
            L.free("inside", "blob")
        if n > P:
            L.alloc("wn", d, P * P * self.grid.half * r)                 # extract_ft
            L.free("wn_e", "fw_e")
        else:
            L.rename("wn_e", "wn")

    def inside_count(self, n_parts: int = 1, strided: bool = False, part: int = 0) -> int:
        """Voxels of a slab with |k|^2 < round((r_max pad)^2) (the shells of the no-gridding floor)."""
        g = self.grid
        limit = relion_round((g.r_max * g.pad) ** 2)
        return _sphere_count(g.size, n_parts, strided, part, max(limit - 1, 0), True)

    # -- distributed path: reconstruct_map_distributed and _reconstruct_packed -------------------
    def distributed(self):
        L, r, c, G = self.L, self.r, self.c, self.G
        grid, plan = self.grid, self.plan
        P, H = grid.size, grid.half
        hv = P * P * H
        layout = SlabLayout(P, G, plan.strided)
        ny = [len(layout.planes(h)) for h in range(G)]
        F = [P * ny[h] * H for h in range(G)]
        packed = plan.storage == "packed"
        npk = [_sphere_count(P, G, plan.strided, h, grid.r2_sphere, True) for h in range(G)] if packed else F
        for h in range(G):                                               # _SlabStore: packing, |k|^2
            if packed:
                L.alloc(("tables", h), HOST, 16 * P * ny[h] + 8)        # SpherePacking counts, offsets
                if self.cupy:
                    L.alloc(("dtables", h), h, 16 * P * ny[h] + 8)       # their device copies
                self.packed_r2(h, npk[h], P * ny[h], ("r2", h))
            else:
                L.alloc(("r2", h), h, 8 * F[h])
        for h in range(G):
            self.store_decentred(h, F[h], npk[h], r, hv, packed, ("fw", h))
        if self.map_term:
            for h in range(G):
                self.map_term_steps(h, npk[h], own_r2=False)
        if self.n_iter <= 0:
            inside = [npk[h] if packed else self.inside_count(G, plan.strided, h) for h in range(G)]
            self.shell_floor_steps([(h, npk[h], inside[h]) for h in range(G)], "wn")
            wn_itemsize = 8
        else:
            self.slab_gridding(layout, F, npk, packed)
            wn_itemsize = r
        L.free(*[("fw", h) for h in range(G)])
        for h in range(G):
            self.store_decentred(h, F[h], npk[h], c, hv, packed, "d")
            if wn_itemsize != r:
                L.temp(h, npk[h] * r)                                    # float64 wn.astype(real)
            L.free(("wn", h))                                            # wn[h] = None
            if packed:
                self.unpack(h, F[h], c, ("fconv", h))
                L.free("d")
            else:
                L.rename("d", ("fconv", h))
        L.free(*[(k, h) for h in range(G) for k in ("r2", "tables", "dtables")])   # del wn, r2, stores
        self.window_and_invert(layout)
        self.mask_and_correct(HOST, grid.box_size)
        L.free("volume", *[("fconv", h) for h in range(G)])

    def store_decentred(self, h, f, n, itemsize, hv, packed, key):
        """_SlabStore.decentred: _decentred_rows (with a dense |k|^2 when packed), then pack."""
        if not packed:
            self.decentred_rows(h, f, itemsize, hv, key)
            return
        L = self.L
        L.alloc("r2_dense", h, 8 * f)
        self.decentred_rows(h, f, itemsize, hv, "dense")
        self.pack(h, f, n, itemsize, key)
        L.free("dense", "r2_dense")

    def decentred_rows(self, h, f, itemsize, hv, key):
        """_decentred_rows: one slab-sized gather (z permuted, y rows), its copy onto the device, mask."""
        L = self.L
        L.alloc("y_rows", h, f * itemsize)
        L.alloc(key, h, f * itemsize)
        L.free("y_rows")
        L.temp(h, f)

    def pack(self, h, f, n, itemsize, key):
        """pack: the packed array; on the host also the chunk's bool mask and dense[mask]."""
        self.L.alloc(key, h, n * itemsize)
        if not self.cupy:
            self.L.temp(h, f, n * itemsize)

    def unpack(self, h, f, itemsize, key):
        """unpack: the dense slab; on the host also the chunk's bool mask."""
        self.L.alloc(key, h, f * itemsize)
        if not self.cupy:
            self.L.temp(h, f)

    def packed_r2(self, h, n, n_rows, key):
        """packed_frequencies + packed_r2: int64 arrays per stored voxel."""
        L = self.L
        L.alloc("pf_filled", h, 8 * n_rows)
        L.alloc("pf_steps", h, 8 * n)
        L.alloc("pf_row", h, 8 * n)                                      # cumsum
        L.alloc("pf_t", h, 8 * n)                                        # row // ny
        L.alloc("pf_kz", h, 8 * n)
        L.free("pf_t")
        L.alloc("pf_t", h, 8 * n)                                        # row % ny
        L.alloc("pf_ky", h, 8 * n)
        L.free("pf_t")
        L.alloc("pf_ar", h, 8 * n)                                       # arange - offsets[row]
        L.alloc("pf_off", h, 8 * n)
        self.binop_on_temp("pf_kx", h, 8 * n, "pf_ar")
        L.free("pf_off", "pf_steps", "pf_row", "pf_filled")
        L.alloc("pf_kz2", h, 8 * n)                                      # kz*kz + ky*ky + kx*kx
        L.alloc("pf_ky2", h, 8 * n)
        self.binop_on_temp("pf_s1", h, 8 * n, "pf_kz2")
        L.free("pf_ky2")
        L.alloc("pf_kx2", h, 8 * n)
        self.binop_on_temp(key, h, 8 * n, "pf_s1")
        L.free("pf_kx2", "pf_kz", "pf_ky", "pf_kx")

    def slab_gridding(self, layout, F, npk, packed):
        """_gridding (dense) or the loop of _reconstruct_packed."""
        L, r, c, G = self.L, self.r, self.c, self.G
        P = self.grid.size
        for g in range(G):
            self.blob_build_chunked(g, len(layout.planes(g)), P, ("blob", g))
            L.alloc(("inside", g), g, npk[g])
            L.alloc(("wn", g), g, npk[g] * r)
        for _ in range(self.n_iter):
            for h in range(G):
                L.alloc("prod", h, npk[h] * r)                           # wn * fw
                if packed:
                    L.alloc("prod_c", h, npk[h] * c)
                    L.free("prod")
                    self.unpack(h, F[h], c, ("conv", h))
                    L.free("prod_c")
                else:
                    L.alloc(("conv", h), h, F[h] * c)                    # .astype(complex)
                    L.free("prod")
            self.slab_inverse(layout, layout, P, "conv", "m")
            L.free(*[("conv", h) for h in range(G)])
            self.slab_forward(layout, P, "m", "conv")
            L.free(*[("m", g) for g in range(G)])
            for h in range(G):
                if packed:
                    self.pack(h, F[h], npk[h], c, "pk")
                    L.alloc("u_abs", h, npk[h] * r)
                    L.free("pk")
                else:
                    L.alloc("u_abs", h, npk[h] * r)
                L.alloc("u_max", h, npk[h] * r)
                L.free("u_abs")
                L.rebind("mag", h, npk[h] * r)                           # .astype(real)
                L.free("u_max", ("conv", h))                             # conv[h] = None
                L.alloc("u_div", h, npk[h] * r)
                L.rebind(("wn", h), h, npk[h] * r)                       # where(inside, wn / mag, wn)
                L.free("u_div")
                if r == 4:
                    L.rebind(("wn", h), h, npk[h] * r)                   # minimum(wn, 1e20)
            L.free(*[("conv", h) for h in range(G)])
        L.free("mag", *[("blob", g) for g in range(G)], *[("inside", g) for g in range(G)])

    def slab_inverse(self, ylayout, zlayout, n, src, dst):
        """SlabFFT.inverse: 1D c2c along z, exchange by z planes, 2D c2r per device."""
        L, r, c, G = self.L, self.r, self.c, self.G
        half = n // 2 + 1
        ny = [len(ylayout.planes(h)) for h in range(G)]
        nz = [len(zlayout.planes(g)) for g in range(G)]
        for h in range(G):
            if self.cupy:
                L.temp(h, n * ny[h] * half * c)                          # transposed copy for axis 0
            L.alloc(("cols", h), h, n * ny[h] * half * c)
        for g in range(G):
            L.rebind("gathered", g, nz[g] * n * half * c)
            z_is_slice = isinstance(zlayout.selector(g), slice)
            for h in range(G):
                piece = nz[g] * ny[h] * half * c
                if self.cupy or not z_is_slice:                         # CuPy's z-FFT output is a
                    L.rebind("piece", h, piece)                         # transposed view: sliced, it
                else:                                                   # is copied to be contiguous
                    L.free("piece")
                L.temp(g, piece)                                         # _move onto device g
            self.c2r(g, nz[g] * n * half * c, (dst, g), nz[g] * n * n * r)
        L.free("gathered", "piece", *[("cols", h) for h in range(G)])

    def slab_forward(self, layout, n, src, dst):
        """SlabFFT.forward: 2D r2c per device, exchange by y rows, 1D c2c along z."""
        L, c, G = self.L, self.c, self.G
        half = n // 2 + 1
        nz = [len(layout.planes(g)) for g in range(G)]
        for g in range(G):
            L.alloc(("planes", g), g, nz[g] * n * half * c)
        for h in range(G):
            ny = len(layout.planes(h))
            L.rebind("gathered", h, n * ny * half * c)
            for g in range(G):
                piece = nz[g] * ny * half * c
                if ny == n:                                              # all rows: a contiguous view
                    L.free("piece")
                else:
                    L.rebind("piece", g, piece)
                L.temp(h, piece)                                         # _move onto device h
            if self.cupy:
                L.temp(h, n * ny * half * c)                             # transposed copy for axis 0
            L.alloc((dst, h), h, n * ny * half * c)
        L.free("gathered", "piece", *[("planes", g) for g in range(G)])

    def window_and_invert(self, layout):
        """_window_and_invert: P rows -> Q rows per device, sign, SlabFFT.inverse on Q, gather."""
        L, r, c, G = self.L, self.r, self.c, self.G
        grid = self.grid
        P, q, N = grid.size, grid.final_size, grid.box_size
        qh = q // 2 + 1
        parts = _q_parts(P, q, G, self.plan.strided)
        kx_len = min(P // 2 + 1, qh)
        for h in range(G):
            nq = len(parts[h][0])
            L.alloc(("slab", h), h, q * nq * qh * c)                     # zeros
            if nq:
                L.alloc("w_zperm", h, q * len(layout.planes(h)) * (P // 2 + 1) * c)
                L.rebind("block", h, q * nq * kx_len * c)
                L.free("w_zperm")
                if q > P:                                                # enlarging: |k|^2 mask
                    L.temp(h, 8 * q * nq * kx_len, q * nq * kx_len, q * nq * kx_len * c)
                L.temp(h, 8 * q * nq * qh, q * nq * qh * r)              # int64 signs, .astype
        n_last = len(parts[-1][1])
        if n_last != len(parts[-1][0]):                                   # rows no device has: a larger
            L.rename(("slab", G - 1), "w_out")                           # last slab (`out` keeps the
            L.alloc(("slab", G - 1), G - 1, q * n_last * qh * c)         # old one alive)
        ylayout = SlabLayout(q, G, parts=tuple(p[1] for p in parts))
        zlayout = SlabLayout(q, G, self.plan.strided)
        self.slab_inverse(ylayout, zlayout, q, "slab", "real")
        L.alloc("volume", HOST, N ** 3 * r)
        lo = q // 2 - N // 2
        for g in range(G):
            planes = zlayout.planes(g)
            nsel = int(np.count_nonzero((planes >= lo) & (planes < lo + N)))
            if nsel:
                L.rebind("part", g, nsel * q * q * r)
                if self.cupy:
                    L.temp(g, nsel * N * N * r)                          # contiguous copy for the host
                    L.temp(HOST, nsel * N * N * r)
        L.free("block", "w_out", "part", *[("real", g) for g in range(G)], *[("slab", h) for h in range(G)])


def _q_parts(size: int, q: int, n_parts: int, strided: bool):
    """Per device: (Q rows from its own P rows, Q rows it holds after the last one takes the rest)."""
    layout = SlabLayout(size, n_parts, strided)
    k_in = signed_freqs(size, np)
    q_index = {int(k): i for i, k in enumerate(signed_freqs(q, np))}
    own = [tuple(sorted(q_index[int(k)] for k in k_in[layout.planes(h)] if int(k) in q_index))
           for h in range(n_parts)]
    covered = {i for part in own for i in part}
    missing = tuple(i for i in range(q) if i not in covered)
    held = list(own)
    if missing:
        held[-1] = tuple(sorted(held[-1] + missing))
    return [(own[h], held[h]) for h in range(n_parts)]


def memory_estimate(plan: Plan, grid: PaddedGrid, real_dtype=np.float32, *, backend: str = "cupy",
                    library_buffers: bool = True, n_iter: int = 10, map_term: bool = False) -> MemoryEstimate:
    """Modelled peak memory of one sums-to-map run of `plan` on `grid` (see the module docstring).

    backend : "cupy" (GPUs) or "numpy" (host devices): which library copies and temporaries occur.
    library_buffers : count pocketfft's c2r buffers on the host (not seen by tracemalloc).
    n_iter : gridding iterations; 0 models the no-gridding branch.
    map_term : a tau2 (MAP) term is added to the weights.
    """
    if plan.fft_size < grid.size:
        raise ValueError(f"fft_size {plan.fft_size} is smaller than the padded grid {grid.size}")
    if plan.fft_size != grid.size and not plan.single_device_path:
        raise ValueError(f"fft_size {plan.fft_size} != P {grid.size} is only supported by the single-device "
                         "dense path")
    replay = _Replay(plan, grid, real_dtype, backend, library_buffers, n_iter, map_term)
    return replay.run()


def memory_per_device(plan: Plan, grid: PaddedGrid, real_dtype=np.float32, **kwargs) -> int:
    """Modelled peak bytes on the busiest device (the input device holds the input sums).

    Keywords as `memory_estimate` (backend="cupy" by default: what a GPU holds, before the
    calibration's memory_factor).
    """
    return memory_estimate(plan, grid, real_dtype, **kwargs).max_per_device


# ------------------------------------------------------------------------------------------------
# Candidates, free memory
# ------------------------------------------------------------------------------------------------

def largest_prime_factor(n: int) -> int:
    """Largest prime factor of n >= 2 (1 for n = 1)."""
    n, p, largest = int(n), 2, 1
    while p * p <= n:
        while n % p == 0:
            largest, n = p, n // p
        p += 1
    return max(largest, n) if n > 1 else largest


def inexact_sizes(grid: PaddedGrid) -> list[int]:
    """FFT-friendly sides above P (2,3,5,7-smooth, 2,3,5-, 2,3- and 2-smooth), at most 15% larger."""
    P = grid.size
    sizes = {fft_friendly_size(P + 1, primes) for primes in _INEXACT_PRIMES}
    return sorted(s for s in sizes if s <= _INEXACT_MAX_GROWTH * P)


def enumerate_candidates(grid: PaddedGrid, n_devices: int, *, allow_inexact: bool = False) -> list[Plan]:
    """Every plan for up to `n_devices` devices: 1..n devices, dense/packed, contiguous/strided
    slabs (G > 1 only: one device has one layout), RELION's P; with `allow_inexact`, also the
    FFT-friendly sides of `inexact_sizes` for the single-device dense path (the only path with
    a free FFT side)."""
    if int(n_devices) < 1:
        raise ValueError(f"n_devices must be >= 1, got {n_devices}")
    P = grid.size
    plans = []
    for g in range(1, int(n_devices) + 1):
        for storage in STORAGES:
            for strided in ((False,) if g == 1 else (False, True)):
                plans.append(Plan(g, storage, strided, P))
                if allow_inexact and g == 1 and storage == "dense":
                    plans.extend(Plan(1, "dense", False, n) for n in inexact_sizes(grid))
    return plans


def _host_available_bytes() -> tuple[int, int]:
    """(MemAvailable, MemTotal) of the host in bytes, from /proc/meminfo (sysconf elsewhere)."""
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info[key] = int(value.split()[0]) * 1024
        return info["MemAvailable"], info["MemTotal"]
    except (OSError, KeyError, ValueError, IndexError):
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


def free_memory(devices: list[Device], *, margin_fraction: float = 0.05) -> list[int]:
    """Bytes each device may use now, less a safety margin of `margin_fraction` of its total.

    GPU: `cudaMemGetInfo`'s free bytes plus the CuPy pool's cached free blocks. Host devices
    (simulated GPUs) share the host's MemAvailable: each entry is that shared amount.
    """
    out = []
    for dev in devices:
        if dev.gpu is None:
            free, total = _host_available_bytes()
        else:
            cp = dev.xp
            with dev.use():
                free, total = cp.cuda.runtime.memGetInfo()
                free += cp.get_default_memory_pool().free_bytes()
        out.append(max(int(free - margin_fraction * total), 0))
    return out


# ------------------------------------------------------------------------------------------------
# Calibration: FFT pair times, plan work areas, bandwidths, the memory factor; cached per model
# ------------------------------------------------------------------------------------------------

def device_model(device: Device) -> str:
    """The device model a calibration belongs to: the GPU's name, or 'cpu <model name> x<cores>'."""
    if device.gpu is not None:
        return device.name
    name = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = "cpu " + line.partition(":")[2].strip()
                    break
    except OSError:
        pass
    return f"{name} x{os.cpu_count() or 1}"


def calibration_path(device: Device, cache_dir=None) -> Path:
    """JSON file of `device`'s model: <cache_dir>/autotune-<sanitised model>.json.

    cache_dir : default $OMLRELION_AUTOTUNE_CACHE, else ~/.cache/omlrelion.
    """
    folder = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "omlrelion")
    slug = re.sub(r"[^a-z0-9]+", "-", device_model(device).lower()).strip("-") or "device"
    return folder / f"autotune-{slug}.json"


def load_calibration(path) -> dict | None:
    """A cached calibration, or None when the file is absent or of another format."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable calibration %s: %s", path, exc)
        return None
    return record if record.get("format") == CALIBRATION_FORMAT else None


def save_calibration(record: dict, path) -> None:
    """Write `record` to `path` atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record, indent=1, sort_keys=True)


def _pair_bytes(kind: str, n: int, real) -> int:
    """Memory a measured FFT pair of side n needs (input, c2r buffer, real output, r2c output,
    exchange buffers of the slab version), with room for the library's work area."""
    r = np.dtype(real).itemsize
    hn = n * n * (n // 2 + 1)
    return (5 if kind == "3d" else 7) * hn * 2 * r + n ** 3 * r


def _sync(devices) -> None:
    for dev in dict.fromkeys(devices):
        dev.synchronize()


def _plan_cache(device: Device):
    """CuPy's cuFFT plan cache of the current device (None on the host or without one)."""
    if device.gpu is None:
        return None
    try:
        return device.xp.fft.config.get_plan_cache()
    except AttributeError:
        return None


def _time_pair(kind: str, n: int, device: Device, real, repeats: int, clock) -> tuple[float, int]:
    """Seconds of one c2r + r2c pair of side n (best of `repeats`, after a first call that makes
    the FFT plans) and the bytes of the cuFFT plans' work areas it created (0 on the host)."""
    xp = device.xp
    cplx = np.result_type(real, np.complex64)
    with device.use():
        if kind == "3d":
            fft = fft_module(xp)
            a = xp.ones((n, n, n // 2 + 1), dtype=cplx)

            def pair():
                m = fft.irfftn(a, s=(n, n, n), axes=(0, 1, 2), norm="forward")
                return fft.rfftn(m, norm="forward")
        else:
            slab = SlabFFT(n, [device])
            a = [xp.ones((n, n, n // 2 + 1), dtype=cplx)]

            def pair():
                return slab.forward(slab.inverse(a))
        cache = _plan_cache(device)
        if cache is not None:
            cache.clear()
        pair()
        work = int(cache.get_curr_memsize()) if cache is not None else 0
        times = []
        for _ in range(max(int(repeats), 1)):
            device.synchronize()
            t0 = clock()
            pair()
            device.synchronize()
            times.append(clock() - t0)
    return min(times), work


def _time_copy(src: Device, dst: Device, nbytes: int, clock, repeats: int = 3) -> float:
    """Bytes per second of `_move`-style copies of an nbytes buffer from src to dst."""
    from omlrelion.reconstruct.slab_fft import _move

    with src.use():
        a = src.xp.ones(max(nbytes // 4, 1), dtype=np.float32)
    best = math.inf
    for _ in range(repeats):
        _sync([src, dst])
        t0 = clock()
        b = _move(a, dst)
        _sync([src, dst])
        best = min(best, clock() - t0)
        del b
    return a.nbytes / max(best, 1e-9)


def _time_elementwise(device: Device, nbytes: int, clock, repeats: int = 3) -> float:
    """Memory bandwidth (bytes/s) of `out = a * b` over float32 arrays of nbytes each."""
    xp = device.xp
    with device.use():
        a = xp.ones(max(nbytes // 4, 1), dtype=np.float32)
        b = xp.ones_like(a)
        out = xp.empty_like(a)
        best = math.inf
        for _ in range(repeats):
            device.synchronize()
            t0 = clock()
            xp.multiply(a, b, out=out)
            device.synchronize()
            best = min(best, clock() - t0)
    return 3 * a.nbytes / max(best, 1e-9)


def _to_host_bandwidth(device: Device, nbytes: int, clock, repeats: int = 3) -> float:
    from omlrelion.backend import to_numpy

    with device.use():
        a = device.xp.ones(max(nbytes // 4, 1), dtype=np.float32)
        best = math.inf
        for _ in range(repeats):
            device.synchronize()
            t0 = clock()
            to_numpy(a)
            best = min(best, clock() - t0)
    return a.nbytes / max(best, 1e-9)


def _fit_fft(points: dict) -> dict:
    """Fit t = a n^3 log2(n^3) (1 + b log2(lpf / 7) if lpf > 7) to {n: seconds}, relative errors."""
    ns = np.array(sorted(int(k) for k in points), dtype=np.float64)
    if not len(ns):
        return {"a": None, "b": None}
    t = np.array([points[str(int(n))] for n in ns])
    x = ns ** 3 * np.log2(ns ** 3)
    lp = np.array([math.log2(max(largest_prime_factor(int(n)) / 7.0, 1.0)) for n in ns])
    if np.any(lp > 0) and np.any(lp == 0):
        A = np.stack([x / t, x * lp / t], axis=1)
        (a, ab), *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
        if a > 0 and ab >= 0:
            return {"a": float(a), "b": float(ab / a)}
    sel = lp == 0 if np.any(lp == 0) else np.ones(len(ns), bool)
    a = float(np.exp(np.mean(np.log(t[sel] / x[sel]))))
    b = 0.0
    if np.any(lp > 0) and np.any(lp == 0):
        b = float(max(np.mean((t[~sel] / (a * x[~sel]) - 1) / lp[~sel]), 0.0))
    return {"a": a, "b": b}


def fft_pair_seconds(calibration: dict, kind: str, n: int) -> float:
    """Measured seconds of a c2r + r2c pair of side n, or the fitted model's value."""
    measured = calibration["fft_pair_s"].get(kind, {})
    if str(int(n)) in measured:
        return float(measured[str(int(n))])
    fit = calibration["fft_fit"].get(kind) or {}
    if fit.get("a") is None:
        raise ValueError(f"calibration {calibration.get('device_model')!r} has no {kind} FFT measurement "
                         "to extrapolate from; recalibrate")
    lpf = largest_prime_factor(int(n))
    penalty = 1.0 + fit["b"] * math.log2(lpf / 7.0) if lpf > 7 else 1.0
    return fit["a"] * n ** 3 * math.log2(n ** 3) * penalty


def fft_work_bytes(calibration: dict, kind: str, n: int) -> int:
    """cuFFT work areas of the cached plans of an FFT pair of side n (measured, or scaled by n^3
    from the nearest measured side whose largest prime factor is in the same class)."""
    measured = calibration.get("fft_work_bytes", {}).get(kind, {})
    if str(int(n)) in measured:
        return int(measured[str(int(n))])
    smooth = largest_prime_factor(int(n)) <= 7
    same = [int(k) for k in measured if (largest_prime_factor(int(k)) <= 7) == smooth]
    if not same:
        return 0
    m = min(same, key=lambda k: abs(k - n))
    return int(measured[str(m)] * (n / m) ** 3)


def _anchor_sizes(sizes, fits) -> set:
    """Extra sides that make the fit well-posed: a smooth and a non-smooth side near the largest
    requested side that can be measured (smaller ones when none can)."""
    measurable = [n for n in sizes if fits(n)]
    m = max(measurable) if measurable else max(sizes)
    while m > 16 and not fits(m):
        m = int(m * 0.8)
    smooth = fft_friendly_size(m)
    rough = m if largest_prime_factor(m) > 7 else m + 1
    while largest_prime_factor(rough) <= 7:
        rough += 1
    return {n for n in (smooth, rough) if fits(n)}


def calibrate(devices: list[Device], sizes, *, kinds=("3d", "slab"), real_dtype=None, record: dict | None = None,
              max_bytes: int | None = None, repeats: int = 3, probe_bytes: int | None = None,
              clock=time.perf_counter) -> dict:
    """Measure what the cost and memory models need on `devices`' model, and return the record.

    Parameters
    ----------
    sizes : FFT sides to time (those a grid's candidates need); each is measured when its pair
        fits in `max_bytes` (default: half the first device's free memory), otherwise left to the
        fit ``t = a n^3 log2(n^3) penalty(largest prime factor)``, for which a smooth and a
        non-smooth side that fit are added when missing.
    kinds : "3d" (`reconstruct_map`'s rfftn/irfftn) and "slab" (`SlabFFT` on one device).
    record : a cached record to extend (its measured sides are kept, missing ones measured).
    probe_bytes : buffer size of the bandwidth probes (default 256 MiB on GPUs, 32 MiB on the host).

    Returns
    -------
    dict (JSON-ready): device_model, backend, fft_pair_s and fft_work_bytes per kind and side,
    fft_fit per kind, memory and copy bandwidths (bytes/s), memory_factor and its source.
    """
    device = devices[0]
    real = np.dtype(real_dtype or (np.float32 if device.gpu is not None else np.float64))
    backend = "numpy" if device.gpu is None else "cupy"
    if record is None or record.get("backend") != backend:
        record = {"format": CALIBRATION_FORMAT, "device_model": device_model(device), "backend": backend,
                  "fft_pair_s": {}, "fft_work_bytes": {}, "fft_fit": {}, "memory_factor": 1.0,
                  "memory_factor_source": "default"}
    budget = max_bytes if max_bytes is not None else free_memory([device])[0] // 2

    def fits(n):
        return _pair_bytes("slab", n, real) <= budget

    sizes = sorted({int(n) for n in sizes})
    for kind in kinds:
        measured = record["fft_pair_s"].setdefault(kind, {})
        work = record["fft_work_bytes"].setdefault(kind, {})
        todo = [n for n in sizes if fits(n)]
        if len(todo) < len(sizes) or not measured:
            todo += sorted(_anchor_sizes(sizes, fits))
        for n in sorted(set(todo)):
            if str(n) not in measured:
                measured[str(n)], work[str(n)] = _time_pair(kind, n, device, real, repeats, clock)
                log.info("calibration %s: %s FFT pair of side %d: %.4g s", record["device_model"], kind, n,
                         measured[str(n)])
        record["fft_fit"][kind] = _fit_fft(measured)
    if "memory_bandwidth_Bps" not in record:
        probe = probe_bytes or (256 << 20 if device.gpu is not None else 32 << 20)
        host = Device()
        record["memory_bandwidth_Bps"] = _time_elementwise(device, probe, clock)
        record["host_memory_bandwidth_Bps"] = (record["memory_bandwidth_Bps"] if device.gpu is None
                                               else _time_elementwise(host, min(probe, 32 << 20), clock))
        local = _time_copy(device, device, probe, clock)
        gpus = [d for d in dict.fromkeys(devices) if d.gpu is not None]
        peer = _time_copy(gpus[0], gpus[1], probe, clock) if len(gpus) > 1 else local
        record["copy_bandwidth_Bps"] = {"local": local, "peer": peer,   # host arrays gather by copy
                                        "to_host": local if device.gpu is None
                                        else _to_host_bandwidth(device, probe, clock)}
        if device.gpu is not None:
            record["memory_factor"], record["memory_factor_source"] = _measure_memory_factor(device, real)
        else:
            record["memory_factor_source"] = ("default: the host model matches tracemalloc within 2% "
                                              "(pocketfft buffers counted)")
    import omlrelion

    record["omlrelion_version"] = omlrelion.__version__
    record["measured"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return record


def _measure_memory_factor(device: Device, real, box_size: int = 128) -> tuple[float, str]:
    """CuPy pool high-water mark of two small real runs over the model (arrays + plan work areas)."""
    cp = device.xp
    grid = PaddedGrid(box_size, 2.0, box_size // 2)
    ratios = []
    for plan in (Plan(1, "dense", False, grid.size), Plan(1, "packed", False, grid.size)):
        with device.use():
            pool = cp.get_default_memory_pool()
            cache = _plan_cache(device)
            if cache is not None:
                cache.clear()
            pool.free_all_blocks()
            base = pool.total_bytes()
            data, weight = _random_sums(grid, device, real, seed=0)
            _run_plan(plan, grid, [device], data, weight, 2)
            device.synchronize()
            del data, weight
            peak = pool.total_bytes() - base
            work = int(cache.get_curr_memsize()) if cache is not None else 0
        model = memory_estimate(plan, grid, real, backend="cupy", n_iter=2).per_device[0] + work
        ratios.append(peak / model)
    return max(1.0, max(ratios)), f"measured: CuPy pool peak / model at box {box_size}"


def get_calibration(devices: list[Device], sizes, *, cache_dir=None, recalibrate: bool = False,
                    real_dtype=None, measure_missing: bool = True, max_bytes: int | None = None, **kwargs) -> dict:
    """The cached calibration of `devices`' model, extended with the missing `sizes` that can be
    measured (and saved), or a new one with `recalibrate`. Without `measure_missing`, a cached
    record is used as it is (sides it lacks come from its fit)."""
    path = calibration_path(devices[0], cache_dir)
    record = None if recalibrate else load_calibration(path)
    if record is not None and record.get("fft_fit") and not measure_missing:
        return record
    if record is not None:
        real = np.dtype(real_dtype or (np.float32 if devices[0].gpu is not None else np.float64))
        budget = max_bytes if max_bytes is not None else free_memory([devices[0]])[0] // 2
        missing = [n for n in {int(n) for n in sizes} for k in ("3d", "slab")
                   if str(n) not in record["fft_pair_s"].get(k, {}) and _pair_bytes("slab", n, real) <= budget]
        if not missing and all((record["fft_fit"].get(k) or {}).get("a") for k in ("3d", "slab")):
            return record
    record = calibrate(devices, sizes, real_dtype=real_dtype, record=record, max_bytes=max_bytes, **kwargs)
    save_calibration(record, path)
    log.info("calibration of %s written to %s", record["device_model"], path)
    return record


# ------------------------------------------------------------------------------------------------
# Cost model
# ------------------------------------------------------------------------------------------------

# Bytes read + written per half-grid voxel and gridding iteration by the elementwise passes, in
# units of the real itemsize r (counted from the code): fused CuPy kernels of the single-device
# path (product 4r, blob 4r, update 4r); NumPy single-device loop (product 3r, +0j 3r, blob 6r,
# abs 3r, maximum 2r, divide 3r, where 3r); slab loop (product 3r, to complex 3r, blob 6r,
# abs 3r, maximum 2r, astype 2r, divide 3r, where 3r). The float32 clamp adds 2r.
_PASSES_FUSED = 12
_PASSES_NUMPY_SINGLE = 23
_PASSES_SLABS = 25
_BLOB_BUILD_BYTES = 130        # per real voxel: float64 radius, index, lookup (see blob_build)
_MASK_BYTES = 200              # per output voxel: soft mask and sinc^2 correction in float64


def predict_seconds(plan: Plan, grid: PaddedGrid, calibration: dict, *, n_iter: int = 10,
                    real_dtype=np.float32) -> float:
    """Modelled seconds of the sums-to-map step of `plan` (see the module docstring).

    Simulated host devices (calibration backend "numpy") share one CPU: their work adds up.
    """
    cal = calibration
    r = np.dtype(real_dtype).itemsize
    c = 2 * r
    P, H, Q, N = grid.size, grid.half, grid.final_size, grid.box_size
    G = plan.n_devices
    hv, hq = P * P * H, Q * Q * (Q // 2 + 1)
    bw = cal["memory_bandwidth_Bps"]
    host_bw = cal["host_memory_bandwidth_Bps"]
    copy = cal["copy_bandwidth_Bps"]
    serial = cal["backend"] == "numpy"
    par = 1 if serial else G
    clamp = 2 if r == 4 else 0
    n_iter = max(int(n_iter), 0)
    if plan.single_device_path:
        n = plan.fft_size
        hn = n * n * (n // 2 + 1)
        fused = cal["backend"] == "cupy"
        setup = (hv * (2 * (r + c) + 18)
                 + (0 if fused else n ** 3 * _BLOB_BUILD_BYTES + hn * 9)) / bw
        if n_iter:
            passes = _PASSES_FUSED if fused else _PASSES_NUMPY_SINGLE + clamp
            per_iter = fft_pair_seconds(cal, "3d", n) + hn * passes * r / bw
        else:
            per_iter, setup = 0.0, setup + hv * 100 / bw               # float64 shells and 1/w
        final = 0.5 * fft_pair_seconds(cal, "3d", Q) + (hv * 2 * c + hq * (6 * c + 8)) / bw \
            + N ** 3 * _MASK_BYTES / bw
        return setup + n_iter * per_iter + final
    packed = plan.storage == "packed"
    phi = (sum(_sphere_count(P, G, plan.strided, h, grid.r2_sphere, True) for h in range(G)) / hv) if packed else 1.0
    remote = hv * c * (G - 1) / G / par                                # bytes each device receives from others
    contiguity = hv * c / par if G > 1 else 0.0                        # pieces made contiguous before sending
    exchange = contiguity / copy["local"] + max(remote / copy["peer"] - remote / copy["local"], 0.0)
    if serial and G > 1:
        exchange = (hv * c + hv * c * (G - 1) / G) / copy["local"]
    elementwise = hv * r * (_PASSES_SLABS + clamp) * (phi if packed else 1.0)
    if packed:
        elementwise += hv * (c + 1) + hv * phi * 2 * c + hv           # unpack (fill, scatter), pack
    # setup: every device gathers its slab of the input (read from the input device), blob slab, r2
    setup = hv * (r + c) / par / (copy["peer"] if G > 1 else copy["local"]) \
        + (hv * (2 * (r + c) + 18) + P ** 3 * _BLOB_BUILD_BYTES) / par / bw
    if n_iter:
        per_iter = fft_pair_seconds(cal, "slab", P) / par + 2 * exchange + elementwise / par / bw
    else:
        per_iter, setup = 0.0, setup + hv * 100 / par / bw
    final = 0.5 * fft_pair_seconds(cal, "slab", Q) / par + exchange * hq / hv \
        + hq * (6 * c + 8) / par / bw + N ** 3 * r / copy["to_host"] + N ** 3 * _MASK_BYTES / host_bw
    return setup + n_iter * per_iter + final


# ------------------------------------------------------------------------------------------------
# Measurement of a plan on the real code
# ------------------------------------------------------------------------------------------------

def _random_sums(grid: PaddedGrid, device: Device, real, seed: int = 0):
    """Random positive weights and complex data of `grid`'s shape on `device` (timing input)."""
    xp = device.xp
    real = np.dtype(real)
    with device.use():
        rng = xp.random.default_rng(seed)
        weight = rng.random(grid.shape, dtype=real)
        weight += real.type(0.1)
        data = weight.astype(np.result_type(real, np.complex64))
    return data, weight


def _run_plan(plan: Plan, grid: PaddedGrid, devices: list[Device], data, weight, n_iter: int):
    from omlrelion.reconstruct.distributed import reconstruct_map_distributed
    from omlrelion.reconstruct.gridding import reconstruct_map

    kwargs = {"box_size": grid.box_size, "pad": grid.pad, "r_max": grid.r_max, "n_iter": n_iter,
              "skip_gridding": n_iter <= 0}
    with devices[0].use():
        if plan.single_device_path:
            return reconstruct_map(data, weight, fft_size=None if plan.fft_size == grid.size else plan.fft_size,
                                   **kwargs)
        return reconstruct_map_distributed(data, weight, devices=list(devices[:plan.n_devices]),
                                           storage=plan.storage, strided=plan.strided, **kwargs)


def measure_plan(plan: Plan, grid: PaddedGrid, devices: list[Device], *, n_iter: int = 10, real_dtype=None,
                 seed: int = 0, repeats: int = 2, clock=time.perf_counter) -> float:
    """Seconds of the sums-to-map step of `plan` with `n_iter` iterations, from real runs.

    On random sums: one untimed run (FFT plans, kernels), then the best of `repeats` runs with one
    and with three gridding iterations; the step costs t1 - t_iter + n_iter t_iter with
    t_iter = (t3 - t1) / 2.
    """
    if len(devices) < plan.n_devices:
        raise ValueError(f"{plan.describe()} needs {plan.n_devices} devices, {len(devices)} given")
    real = np.dtype(real_dtype or (np.float32 if devices[0].gpu is not None else np.float64))
    data, weight = _random_sums(grid, devices[0], real, seed)
    used = list(devices[:plan.n_devices])

    def timed(k):
        best = math.inf
        for _ in range(max(int(repeats), 1)):
            _sync(used)
            t0 = clock()
            _run_plan(plan, grid, used, data, weight, k)
            _sync(used)
            best = min(best, clock() - t0)
        return best

    _run_plan(plan, grid, used, data, weight, min(n_iter, 1))
    if n_iter <= 0:
        return timed(0)
    t1, t3 = timed(1), timed(3)
    t_iter = max((t3 - t1) / 2, 0.0)
    return max(t1 - t_iter, 0.0) + n_iter * t_iter


# ------------------------------------------------------------------------------------------------
# The planner
# ------------------------------------------------------------------------------------------------

_DECISIONS: dict = {}


def clear_plan_cache() -> None:
    """Forget the decisions `choose_plan` cached in this process."""
    _DECISIONS.clear()


def _gb(nbytes) -> str:
    return f"{nbytes / 1e9:.3g} GB"


def sizes_needed(grid: PaddedGrid, *, allow_inexact: bool = False) -> list[int]:
    """FFT sides the candidates of `grid` run: P and Q, and the inexact sides when allowed."""
    return sorted({grid.size, grid.final_size, *(inexact_sizes(grid) if allow_inexact else ())})


def choose_plan(grid: PaddedGrid, devices: list[Device], *, free_bytes: int | None = None,
                allow_inexact: bool = False, measure: int = 0, calibration: dict | None = None,
                n_iter: int = 10, real_dtype=None, map_term: bool = False, timer=None, cache_dir=None,
                recalibrate: bool = False) -> tuple[Plan, list[dict]]:
    """The fastest plan that fits, and the table of every candidate.

    Parameters
    ----------
    grid : the padded grid (box, pad, r_max).
    devices : the devices a plan may use (a plan with G devices uses the first G).
    free_bytes : bytes free per device, instead of asking the devices; for host devices standing
        in for GPUs, each one's budget. Without it, GPUs report their free memory and host devices
        share the host's MemAvailable (their simulated total is checked against it).
    allow_inexact : also consider FFT-friendly sides above P (single-device dense path), whose map
        differs from RELION's by ~4e-4 relative.
    measure : time the `measure` best-ranked plans that fit on the real code (`measure_plan`) and
        pick the fastest measured one.
    calibration : a calibration record; default: the cached one of the devices' model, measured
        and cached when missing (`get_calibration`).
    n_iter : gridding iterations (0: the no-gridding branch). real_dtype : float32 (GPU default) or
        float64 (host default). map_term : a tau2 term will be added (its temporaries are counted).
    timer : callable(plan) -> seconds replacing `measure_plan` (tests, external timing).

    Returns
    -------
    (Plan, table): table rows (dicts) ranked as the candidates were: fitting plans by predicted
    time (then measured time where measured), then the others by memory.

    Raises
    ------
    InputError : no candidate fits; the one-line message names the smallest plan, the bytes per
        device it needs and the bytes free.
    """
    devices = list(devices)
    if not devices or not all(isinstance(d, Device) for d in devices):
        raise ValueError("devices must be a non-empty list of omlrelion.backend.Device")
    real = np.dtype(real_dtype or (np.float32 if devices[0].gpu is not None else np.float64))
    key = None
    if timer is None:
        cal_key = None if calibration is None else json.dumps(calibration, sort_keys=True, default=str)
        key = (grid.box_size, float(grid.pad), grid.r_max, tuple(devices), int(n_iter), bool(allow_inexact),
               int(measure), free_bytes, real.name, bool(map_term), cal_key)
        if key in _DECISIONS:
            plan, table = _DECISIONS[key]
            return plan, [dict(row) for row in table]
    backend = "numpy" if devices[0].gpu is None else "cupy"
    if calibration is None:
        calibration = get_calibration(devices, sizes_needed(grid, allow_inexact=allow_inexact), cache_dir=cache_dir,
                                      recalibrate=recalibrate, real_dtype=real)
    shared_host = free_bytes is None and all(d.gpu is None for d in devices)
    free = [int(free_bytes)] * len(devices) if free_bytes is not None else free_memory(devices)
    factor = float(calibration.get("memory_factor", 1.0))
    dense_f32 = footprint_report(grid.box_size, grid.pad, grid.r_max, 1, np.float32)["dense_total_bytes"]
    rows = []
    for plan in enumerate_candidates(grid, len(devices), allow_inexact=allow_inexact):
        est = memory_estimate(plan, grid, real, backend=backend, n_iter=n_iter, map_term=map_term)
        work = [_work_bytes(calibration, plan, grid)] * plan.n_devices
        need = [int(factor * (m + w)) for m, w in zip(est.per_device, work)]
        total = int(factor * (est.simulated_total + sum(work)))
        fits = total <= free[0] if shared_host else all(n <= f for n, f in zip(need, free))
        rows.append({
            "plan": plan.to_dict(), "description": plan.describe(), "exact": plan.is_exact(grid),
            "memory_per_device_bytes": max(need), "memory_by_device_bytes": need, "memory_total_bytes": total,
            "free_bytes": free[:plan.n_devices], "fits": fits, "dense_float32_bytes": dense_f32,
            "predicted_s": predict_seconds(plan, grid, calibration, n_iter=n_iter, real_dtype=real),
            "measured_s": None, "chosen": False,
        })
    fitting = sorted((row for row in rows if row["fits"]), key=lambda row: row["predicted_s"])
    others = sorted((row for row in rows if not row["fits"]), key=lambda row: row["memory_per_device_bytes"])
    if not fitting:
        small = others[0]
        need = small["memory_total_bytes"] if shared_host else small["memory_per_device_bytes"]
        where = "on the host (shared by the simulated devices)" if shared_host else "per device"
        have = free[0] if shared_host else min(small["free_bytes"])
        raise InputError(f"no reconstruction plan fits in memory for box {grid.box_size}, pad {grid.pad:g}, "
                         f"r_max {grid.r_max}: the smallest, {small['description']}, needs {need} bytes "
                         f"({_gb(need)}) {where}, {have} bytes ({_gb(have)}) are free; use more devices, "
                         "a coarser --maxres or a smaller --pad")
    if measure > 0:
        run = timer or functools.partial(measure_plan, grid=grid, devices=devices, n_iter=n_iter, real_dtype=real)
        for row in fitting[:int(measure)]:
            row["measured_s"] = float(run(Plan.from_dict(row["plan"])))
        timed = sorted(fitting[:int(measure)], key=lambda row: row["measured_s"])
        fitting = timed + fitting[int(measure):]
    fitting[0]["chosen"] = True
    table = fitting + others
    plan = Plan.from_dict(fitting[0]["plan"])
    log.info("plan for box %d, r_max %d, P %d on %d device(s): %s", grid.box_size, grid.r_max, grid.size,
             len(devices), plan.describe())
    if key is not None:
        _DECISIONS[key] = (plan, [dict(row) for row in table])
    return plan, table


def _work_bytes(calibration: dict, plan: Plan, grid: PaddedGrid) -> int:
    """cuFFT plan work areas a device holds for `plan` (the plan cache keeps them between calls)."""
    if plan.single_device_path:
        return fft_work_bytes(calibration, "3d", plan.fft_size) + fft_work_bytes(calibration, "3d", grid.final_size)
    return (fft_work_bytes(calibration, "slab", grid.size)
            + fft_work_bytes(calibration, "slab", grid.final_size)) // plan.n_devices


def plan_for(grid: PaddedGrid, devices: list[Device], storage: str = "auto", *, strided: bool = False,
             n_iter: int = 10, real_dtype=None, map_term: bool = False, allow_inexact: bool = False,
             free_bytes: int | None = None, measure: int = 0, cache_dir=None) -> Plan:
    """The plan `omlrelion reconstruct` runs: chosen by `choose_plan` for storage "auto", else the
    one asked for (all devices, RELION's P), with a warning when the model says it will not fit.

    Raises InputError (one line) when "auto" finds no plan that fits, before any particle is read.
    """
    devices = list(devices)
    if storage == "auto":
        return choose_plan(grid, devices, free_bytes=free_bytes, allow_inexact=allow_inexact, measure=measure,
                           n_iter=n_iter, real_dtype=real_dtype, map_term=map_term, cache_dir=cache_dir)[0]
    if storage not in STORAGES:
        raise InputError(f"--storage {storage!r}: expected auto, dense or packed")
    plan = Plan(len(devices), storage, bool(strided) and len(devices) > 1, grid.size)
    real = np.dtype(real_dtype or (np.float32 if devices[0].gpu is not None else np.float64))
    est = memory_estimate(plan, grid, real, backend="numpy" if devices[0].gpu is None else "cupy",
                          n_iter=n_iter, map_term=map_term)
    free = [int(free_bytes)] * len(devices) if free_bytes is not None else free_memory(devices)
    shared = free_bytes is None and all(d.gpu is None for d in devices)
    need = est.simulated_total if shared else est.max_per_device
    if need > min(free):
        log.warning("%s needs about %s per device by the memory model, %s free: it may run out of memory "
                    "(--storage auto picks a plan that fits)", plan.describe(), _gb(need), _gb(min(free)))
    return plan


__all__ = [
    "CACHE_ENV",
    "MemoryEstimate",
    "Plan",
    "calibrate",
    "calibration_path",
    "choose_plan",
    "clear_plan_cache",
    "device_model",
    "enumerate_candidates",
    "fft_pair_seconds",
    "fft_work_bytes",
    "free_memory",
    "get_calibration",
    "inexact_sizes",
    "largest_prime_factor",
    "load_calibration",
    "measure_plan",
    "memory_estimate",
    "memory_per_device",
    "plan_for",
    "predict_seconds",
    "save_calibration",
    "sizes_needed",
]
