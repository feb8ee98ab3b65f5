"""Plans for the sums-to-map step: which path, how many devices, which storage, kernel and FFT size.

A `Plan` says how `gridding.reconstruct_map` (one device, dense) or `columns.reconstruct_packed`
(the sphere's columns packed over G devices) is run for one grid. `choose_plan` enumerates the
candidates for a `PaddedGrid` and a device list, drops those whose modelled memory does not fit in
each device's free memory, ranks the rest by a calibrated cost model and, with ``measure=k``,
times the k best on the real code. It depends only on (box, pad, r_max, devices) and a few
options, so a refinement calls it every iteration (r_max grows) and gets cached decisions.

Memory model: `reconstruct.memory_model`. Calibration: `reconstruct.calibration`.

Cost model
----------
Dense: ``n_iter`` whole-volume c2r + r2c pairs of side ``fft_size`` (measured, or extrapolated as
``a n^3 log2(n^3) penalty(largest prime factor)``) plus the elementwise passes (bytes / measured
bandwidth), then the window, inverse FFT on Q and mask. Packed: ``n_iter`` rounds of the column
engine (measured on one device, fitted as ``t0 + a n^3 log2(n^3)``) divided over the devices,
plus the column exchange (bytes / measured peer bandwidth), the final stage and the map's copy to
the host; the direct convolution by the bytes its taps move. Simulated host devices share one
CPU, so their work adds up instead of running side by side.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time

import numpy as np

from omlrelion.backend import Device
from omlrelion.reconstruct.columns import dense_float32_bytes
from omlrelion.errors import InputError
from omlrelion.geometry.grids import PaddedGrid, fft_friendly_size
from omlrelion.reconstruct.calibration import (
    _random_sums,
    _sync,
    fft_pair_seconds,
    fft_work_bytes,
    get_calibration,
    dense_fft_possible,
    memory_need,
)
from omlrelion.reconstruct.calibration import calibrate as calibrate  # re-exported
from omlrelion.reconstruct.calibration import calibration_path as calibration_path
from omlrelion.reconstruct.calibration import device_model as device_model
from omlrelion.reconstruct.calibration import load_calibration as load_calibration
from omlrelion.reconstruct.calibration import save_calibration as save_calibration
from omlrelion.reconstruct.memory_model import (
    MemoryEstimate,
    _sphere_counts,
    memory_estimate,
    memory_per_device,
)
from omlrelion.reconstruct.plan import (
    _INEXACT_MAX_GROWTH,
    _INEXACT_PRIMES,
    CACHE_ENV,
    STORAGES,
    Plan,
    free_memory,
    largest_prime_factor,
    run_plan,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Candidates, free memory
# ------------------------------------------------------------------------------------------------


def inexact_sizes(grid: PaddedGrid) -> list[int]:
    """FFT-friendly sides above P (2,3,5,7-smooth, 2,3,5-, 2,3- and 2-smooth), at most 15% larger."""
    P = grid.size
    sizes = {fft_friendly_size(P + 1, primes) for primes in _INEXACT_PRIMES}
    return sorted(s for s in sizes if s <= _INEXACT_MAX_GROWTH * P)


def enumerate_candidates(grid: PaddedGrid, n_devices: int, *, allow_inexact: bool = False,
                         kernel: str = "relion") -> list[Plan]:
    """Every plan for up to `n_devices` devices: one device dense (RELION's kernel); 1..n devices
    packed (contiguous and strided for G > 1), with the packed data on the devices or staged on the
    host; RELION's P and, with `allow_inexact`, the FFT-friendly sides of `inexact_sizes`. With the
    compact kernel the FFT-friendly sides are always candidates (they give the same map) and so is
    the direct convolution on one device."""
    if int(n_devices) < 1:
        raise ValueError(f"n_devices must be >= 1, got {n_devices}")
    compact = kernel == "compact"
    sizes = [grid.size] + (inexact_sizes(grid) if allow_inexact or compact else [])
    plans = [] if compact else [Plan(1, "dense", False, n) for n in sizes]
    for g in range(1, int(n_devices) + 1):
        for strided in ((False,) if g == 1 else (False, True)):
            for n in sizes:
                for stage in (False, True):
                    plans.append(Plan(g, "packed", strided, n, stage, kernel))
    if compact:
        plans += [Plan(1, "packed", False, grid.size, stage, kernel, "direct") for stage in (False, True)]
    return plans


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
    n = plan.fft_size
    npk, n_columns = _sphere_counts(P, grid.r2_sphere)
    if plan.convolution == "direct":
        from omlrelion.reconstruct.columns import compact_stencil

        offsets, _ = compact_stencil(grid)
        pairs = len({(int(a), int(b)) for a, b in offsets[:, 1:]})
        per_iter = n_columns * n * r * (5 * len(offsets) + 12 * pairs + 8) / bw + npk * 60 / bw
        final = (0.5 * fft_pair_seconds(cal, "columns", Q) + N ** 3 * r / copy["to_host"] * 3
                 + N ** 3 * _MASK_BYTES / bw)
        return npk * (r + c) * 6 / bw + n_iter * per_iter + final
    exchange = 0.0
    if G > 1:
        moved = n_columns * n * c * (G - 1) / G          # column values leaving (and coming back to) each device
        exchange = 2 * (moved / par / copy["peer"] + n_columns * n * c / par / copy["local"])
    if serial and G > 1:
        exchange = 2 * 2 * n_columns * n * c / copy["local"]
    # setup: pack the weight and the data from the input (index gather) on every device
    setup = npk * (r + c) * 6 / par / (copy["peer"] if G > 1 else bw) + npk * 60 / par / bw
    if plan.stage_data:
        setup += 2 * npk * c / copy["to_host"]
    if n_iter:
        per_iter = fft_pair_seconds(cal, "columns", n) / par + exchange
    else:
        per_iter, setup = 0.0, setup + npk * 100 / par / bw
    final = (0.5 * fft_pair_seconds(cal, "columns", Q) / par + exchange * Q / n
             + N ** 3 * r / copy["to_host"] * 3 + N ** 3 * _MASK_BYTES / bw)
    return setup + n_iter * per_iter + final


# ------------------------------------------------------------------------------------------------
# Measurement of a plan on the real code
# ------------------------------------------------------------------------------------------------


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
            run_plan(plan, grid, used, {"data": data, "weight": weight}, n_iter=k)
            _sync(used)
            best = min(best, clock() - t0)
        return best

    run_plan(plan, grid, used, {"data": data, "weight": weight}, n_iter=min(n_iter, 1))
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
                recalibrate: bool = False, input_on_device: bool | None = None,
                kernel: str = "relion") -> tuple[Plan, list[dict]]:
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
    input_on_device : whether device 0 holds the dense sums before a packed plan packs them
        (default: on GPUs); False for sums that arrive packed or from the host.
    kernel : "relion" or "compact" (see `Plan`).
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
               int(measure), free_bytes, real.name, bool(map_term), cal_key, input_on_device, kernel)
        if key in _DECISIONS:
            plan, table = _DECISIONS[key]
            return plan, [dict(row) for row in table]
    backend = "numpy" if devices[0].gpu is None else "cupy"
    if calibration is None:
        calibration = get_calibration(devices, sizes_needed(grid, allow_inexact=allow_inexact), cache_dir=cache_dir,
                                      recalibrate=recalibrate, real_dtype=real)
    shared_host = free_bytes is None and all(d.gpu is None for d in devices)
    free = [int(free_bytes)] * len(devices) if free_bytes is not None else free_memory(devices)
    dense_f32 = dense_float32_bytes(grid)
    rows = []
    candidates = [p for p in enumerate_candidates(grid, len(devices), allow_inexact=allow_inexact, kernel=kernel)
                  if not p.single_device_path or (dense_fft_possible(devices[0], p.fft_size)
                                                  and dense_fft_possible(devices[0], grid.final_size))]
    for plan in candidates:
        est = memory_estimate(plan, grid, real, backend=backend, n_iter=n_iter, map_term=map_term,
                              input_on_device=input_on_device)
        work = [_work_bytes(calibration, plan, grid)] * plan.n_devices
        need = [memory_need(calibration, plan.storage, m + w) for m, w in zip(est.per_device, work)]
        total = sum(need) + est.host if plan.storage == "packed" else \
            memory_need(calibration, plan.storage, est.simulated_total + sum(work))
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
        raise _no_plan_fits(grid, f"the smallest, {small['description']}, needs {need} bytes ({_gb(need)}) "
                                  f"{where}, {have} bytes ({_gb(have)}) are free")
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
        # sides of 2^30 voxels and more: at least 16 B a voxel (a 3D c2r of side 1215 on an H200
        # allocated 1215^3 x 16 B beyond the model and the plan's reported work area)
        return sum(max(fft_work_bytes(calibration, "3d", n), 16 * n**3 if n**3 >= 2**30 else 0)
                   for n in (plan.fft_size, grid.final_size))
    return fft_work_bytes(calibration, "columns", plan.fft_size) + fft_work_bytes(calibration, "columns",
                                                                                   grid.final_size)


def plan_for(grid: PaddedGrid, devices: list[Device], storage: str = "auto", *, strided: bool = False,
             n_iter: int = 10, real_dtype=None, map_term: bool = False, allow_inexact: bool = False,
             free_bytes: int | None = None, measure: int = 0, cache_dir=None, kernel: str = "relion") -> Plan:
    """The plan `omlrelion reconstruct` runs: chosen by `choose_plan` for storage "auto", else the
    one asked for (all devices, RELION's P), with a warning when the model says it will not fit.

    Raises InputError (one line) when "auto" finds no plan that fits, before any particle is read.
    """
    devices = list(devices)
    if storage is None:
        storage = "dense" if len(devices) == 1 and kernel == "relion" else "packed"
    if storage == "auto":
        return choose_plan(grid, devices, free_bytes=free_bytes, allow_inexact=allow_inexact, measure=measure,
                           n_iter=n_iter, real_dtype=real_dtype, map_term=map_term, cache_dir=cache_dir,
                           kernel=kernel)[0]
    if storage not in STORAGES:
        raise InputError(f"--storage {storage!r}: expected auto, dense or packed")
    if storage == "dense" and len(devices) > 1:
        raise InputError(f"--storage dense runs on one device, {len(devices)} were given: use --storage packed "
                         "or auto")
    if storage == "dense" and kernel != "relion":
        raise InputError(f"--kernel {kernel} runs with --storage packed or auto")
    plan = Plan(len(devices), storage, bool(strided) and len(devices) > 1, grid.size, kernel=kernel)
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


def fallback_plan(grid: PaddedGrid, devices: list[Device], failed: list[Plan], *, real_dtype=None,
                  n_iter: int = 10, map_term: bool = False, kernel: str = "relion", reason: str = "") -> Plan:
    """The plan to run after `failed` (the plans tried, in order) ran out of memory.

    Of the candidates not tried, the one the memory model says needs least per device, if it fits in
    the memory free now (the failed plan needed more than the model said, so the smallest is the best
    bet). Nothing is measured: a device that has just run out of memory cannot host a calibration.
    Raises InputError (one line, in the words of `choose_plan`) when none is left.
    """
    devices = list(devices)
    real = np.dtype(real_dtype or (np.float32 if devices[0].gpu is not None else np.float64))
    backend = "numpy" if devices[0].gpu is None else "cupy"
    shared_host = all(d.gpu is None for d in devices)
    free = free_memory(devices)
    rows = []
    for plan in enumerate_candidates(grid, len(devices), kernel=kernel):
        if plan in failed or (plan.single_device_path and not dense_fft_possible(devices[0], plan.fft_size)):
            continue
        est = memory_estimate(plan, grid, real, backend=backend, n_iter=n_iter, map_term=map_term)
        need = est.simulated_total if shared_host else est.max_per_device
        have = free[0] if shared_host else min(free[:plan.n_devices])
        rows.append((need, have, plan))
    fitting = [row for row in rows if row[0] <= row[1]]
    if fitting:
        need, _, plan = min(fitting, key=lambda row: row[0])
        log.warning("%s ran out of memory (%s); falling back to %s, which needs %s per device by the model",
                    failed[-1].describe(), reason, plan.describe(), _gb(need))
        return plan
    detail = ""
    if rows:
        need, have, plan = min(rows, key=lambda row: row[0])
        detail = f"; the smallest, {plan.describe()}, needs {need} bytes ({_gb(need)}), {have} bytes ({_gb(have)}) are free"
    raise _no_plan_fits(grid, f"{failed[-1].describe()} ran out of memory ({reason}){detail}")


def _no_plan_fits(grid: PaddedGrid, why: str) -> InputError:
    """The one-line error of a sums-to-map step that no plan can run, `why` saying what was found."""
    return InputError(f"no reconstruction plan fits in memory for box {grid.box_size}, pad {grid.pad:g}, "
                      f"r_max {grid.r_max}: {why}; use more devices, a coarser --maxres or a smaller --pad")

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
    "fallback_plan",
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
