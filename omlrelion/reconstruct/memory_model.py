"""Memory model of the sums-to-map step.

Single-device path (`gridding.reconstruct_map`): `memory_estimate` replays, allocation by
allocation, what the implementation holds: the centred input sums, the decentred weights, |k|^2
and mask temporaries, the gridding loop (fused CuPy kernels, or the NumPy loop with its blob and
temporaries), the window and final inverse on the Q grid, the mask and grid correction. NumPy's
temporary elision is followed on the host; CuPy allocates a new array for every operation. CuPy
copies the input of every c2r transform (counted); pocketfft's c2r buffer on the host is counted
when ``library_buffers`` (tracemalloc does not see it). Checked against tracemalloc on the host
within 5% (tests).

Packed path (`columns.reconstruct_packed`): the closed form `columns.column_memory` (per device:
packed arrays, column buffer, index tables, the largest chunk temporaries, and the dense input
sums while device 0 packs them).

On GPUs the planner adds the work areas of the cuFFT plans CuPy keeps cached (measured per FFT
side) and the calibration's measured excess of the CuPy pool over the model (dense: a factor;
packed: bytes). CUDA context memory is outside both; `free_memory` leaves a margin.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np

from omlrelion.geometry.grids import PaddedGrid
from omlrelion.reconstruct.gridding import map_term_in_float64
from omlrelion.reconstruct.plan import Plan
from omlrelion.units import relion_round

log = logging.getLogger(__name__)

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
def _sphere_counts(size: int, r2_max: int) -> tuple[int, int]:
    """(voxels, (ky, kx) columns) of the FFTW-layout half grid of side `size` with |k|^2 <= r2_max."""
    from omlrelion.reconstruct.columns import ColumnLayout

    _, _, half_len = ColumnLayout(size, r2_max, 1).all_columns()
    return int((2 * half_len + 1).sum()), len(half_len)


class _Replay:
    """Walks through one run of the sums-to-map step, recording every array it allocates.

    Each method follows one function of `reconstruct.gridding` statement by statement; a comment names what an
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
        self.single()
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
        """One chunk of blob_real_space: float64 radius, int64 table index, then the table lookup."""
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
        """blob_real_space: the output, the (y, x) radius table, then a few planes at a time."""
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
        loop64 = map_term_in_float64(np.float64 if r == 8 else np.float32, self.map_term, self.n_iter <= 0)
        if loop64:
            L.alloc("fw64", d, 8 * hv)                                   # fw.astype(float64)
            L.free("fw")
            L.rename("fw64", "fw")
            self.r, self.c = 8, 16                                       # the MAP term and the loop in float64
        if self.map_term:
            self.map_term_steps(d, hv, own_r2=True)
        if self.n_iter <= 0:
            L.alloc("sf_r2", d, 8 * hv)                                  # radius2_ft argument
            self.shell_floor_steps([(d, hv, self.inside_count())], "wn")
            L.rename(("wn", 0), "wn")
            L.free("sf_r2")
        else:
            self.single_gridding(n)
        self.r, self.c = r, c
        L.free("fw")
        L.alloc("fconv", d, hv * c)                                      # decentre(data)
        L.temp(d, 8 * hv, hv)
        if (self.n_iter <= 0 or loop64) and r != 8:
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
            self.blob_build_chunked(d, n, n, "blob")
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

    def inside_count(self) -> int:
        """Voxels with |k|^2 < round((r_max pad)^2) (the shells of the no-gridding floor)."""
        g = self.grid
        limit = relion_round((g.r_max * g.pad) ** 2)
        return _sphere_counts(g.size, max(limit - 1, 0))[0]


def memory_estimate(plan: Plan, grid: PaddedGrid, real_dtype=np.float32, *, backend: str = "cupy",
                    library_buffers: bool = True, n_iter: int = 10, map_term: bool = False,
                    input_on_device: bool | None = None) -> MemoryEstimate:
    """Modelled peak memory of one sums-to-map run of `plan` on `grid` (see the module docstring).

    backend : "cupy" (GPUs) or "numpy" (host devices): which library copies and temporaries occur.
    library_buffers : count pocketfft's c2r buffers on the host (not seen by tracemalloc).
    n_iter : gridding iterations; 0 models the no-gridding branch.
    map_term : a tau2 (MAP) term is added to the weights.
    input_on_device : packed plans: the dense centred sums are on device 0 and are packed there
        (default: on GPUs, as in `pipeline.steps.reconstruct`); False when they come packed or from the host.
    """
    if plan.fft_size < grid.size:
        raise ValueError(f"fft_size {plan.fft_size} is smaller than the padded grid {grid.size}")
    if not plan.single_device_path:
        from omlrelion.reconstruct.columns import column_memory

        per_device, host = column_memory(grid, plan.n_devices, strided=plan.strided, fft_size=plan.fft_size,
                                         real_dtype=real_dtype, n_iter=n_iter, stage_data=plan.stage_data,
                                         convolution=plan.convolution, map_term=map_term,
                                         input_on_device=backend == "cupy" if input_on_device is None
                                         else input_on_device)
        return MemoryEstimate(tuple(per_device), host, sum(per_device) + host)
    replay = _Replay(plan, grid, real_dtype, backend, library_buffers, n_iter, map_term)
    return replay.run()


def memory_per_device(plan: Plan, grid: PaddedGrid, real_dtype=np.float32, **kwargs) -> int:
    """Modelled peak bytes on the busiest device (the input device holds the input sums).

    Keywords as `memory_estimate` (backend="cupy" by default: what a GPU holds, before the
    calibration's memory_factor).
    """
    return memory_estimate(plan, grid, real_dtype, **kwargs).max_per_device
