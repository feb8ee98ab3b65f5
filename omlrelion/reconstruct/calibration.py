"""Calibration of the planner's cost model: FFT pair times, plan work areas, bandwidths and the
memory factor, measured on the devices and cached per device model as JSON."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path

import numpy as np

from omlrelion.backend import Device, fft_module
from omlrelion.geometry.grids import PaddedGrid, fft_friendly_size
from omlrelion.io.jsonfile import write_json
from omlrelion.reconstruct.memory_model import memory_estimate
from omlrelion.reconstruct.plan import (
    CACHE_ENV,
    CALIBRATION_FORMAT,
    Plan,
    free_memory,
    largest_prime_factor,
    run_plan,
)

log = logging.getLogger(__name__)

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
    """Memory a measured FFT pair of side n needs ("3d": input, c2r buffer, real output, r2c output;
    "columns": one gridding round of the column engine), with room for the library's work area."""
    r = np.dtype(real).itemsize
    hn = n * n * (n // 2 + 1)
    if kind == "3d":          # from 2^30 voxels cuFFT asked for 16 B a voxel more (side 1215, H200)
        return 5 * hn * 2 * r + n ** 3 * r + (16 * n**3 if n**3 >= 2**30 else 0)
    return 3 * hn * 2 * r


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
            from omlrelion.reconstruct.columns import ColumnEngine

            engine = ColumnEngine(_grid_for_side(n), [device], fft_size=n)
            fw = [xp.ones(engine.parts[0].n_packed, dtype=real)]

            def pair():
                return engine.gridding_weights(fw, 1)
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


CUFFT_MAX_ELEMENTS = 2**31 - 1


def dense_fft_possible(device: Device, n: int) -> bool:
    """Whether a whole-volume 3D FFT of side n can run on `device`: CuPy's n-d cuFFT plans take
    32-bit sizes (an H200 answered CUFFT_INVALID_SIZE above 2^31 elements); the host has no limit."""
    return device.gpu is None or n**3 <= CUFFT_MAX_ELEMENTS


def _grid_for_side(n: int) -> PaddedGrid:
    """The full-resolution pad-2 grid with the largest odd side P <= n (P = 2 box + 3)."""
    box = max(4, ((n - 3) // 2) // 2 * 2)
    return PaddedGrid(box, 2.0, box // 2)


def _time_copy(src: Device, dst: Device, nbytes: int, clock, repeats: int = 3) -> float:
    """Bytes per second of `_move`-style copies of an nbytes buffer from src to dst."""
    from omlrelion.reconstruct.columns import _move

    with src.use():
        a = src.xp.ones(max(nbytes // 4, 1), dtype=np.float32)
    best = math.inf
    for _ in range(repeats):
        _sync([src, dst])
        t0 = clock()
        if src == dst:
            with src.use():
                b = a.copy()
        else:
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


def _fit_fft(points: dict, *, intercept: bool = False) -> dict:
    """Fit t = a n^3 log2(n^3) (1 + b log2(lpf / 7) if lpf > 7) to {n: seconds}, relative errors.

    With `intercept`, t = t0 + a n^3 log2(n^3) (no prime penalty): the column engine's rounds have a
    fixed cost (launches, index tables) that dominates small sides.
    """
    ns = np.array(sorted(int(k) for k in points), dtype=np.float64)
    if not len(ns):
        return {"a": None, "b": None}
    t = np.array([points[str(int(n))] for n in ns])
    x = ns ** 3 * np.log2(ns ** 3)
    if intercept:
        if len(ns) >= 2:
            (t0, a), *_ = np.linalg.lstsq(np.stack([1 / t, x / t], axis=1), np.ones_like(t), rcond=None)
            if a > 0 and t0 >= 0:
                return {"a": float(a), "b": 0.0, "t0": float(t0)}
        return {"a": float(np.exp(np.mean(np.log(t / x)))), "b": 0.0, "t0": 0.0}
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
    return fit.get("t0", 0.0) + fit["a"] * n ** 3 * math.log2(n ** 3) * penalty


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


def calibrate(devices: list[Device], sizes, *, kinds=("3d", "columns"), real_dtype=None, record: dict | None = None,
              max_bytes: int | None = None, repeats: int = 3, probe_bytes: int | None = None,
              clock=time.perf_counter) -> dict:
    """Measure what the cost and memory models need on `devices`' model, and return the record.

    Parameters
    ----------
    sizes : FFT sides to time (those a grid's candidates need); each is measured when its pair
        fits in `max_bytes` (default: half the first device's free memory), otherwise left to the
        fit ``t = a n^3 log2(n^3) penalty(largest prime factor)``, for which a smooth and a
        non-smooth side that fit are added when missing.
    kinds : "3d" (`reconstruct_map`'s rfftn/irfftn) and "columns" (one gridding round of
        `columns.ColumnEngine` on one device: column FFTs, plane FFTs, blob and update).
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

    sizes = sorted({int(n) for n in sizes})
    for kind in kinds:
        def fits(n, kind=kind):
            return _pair_bytes(kind, n, real) <= budget and (kind != "3d" or dense_fft_possible(device, n))

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
        record["fft_fit"][kind] = _fit_fft(measured, intercept=kind == "columns")
    gpus = [d for d in dict.fromkeys(devices) if d.gpu is not None]
    if len(gpus) > 1 and not record.get("peer_measured", False):
        record.pop("memory_bandwidth_Bps", None)          # measured on one GPU before: measure peers now
    if "memory_bandwidth_Bps" not in record:
        probe = probe_bytes or (256 << 20 if device.gpu is not None else 32 << 20)
        host = Device()
        record["memory_bandwidth_Bps"] = _time_elementwise(device, probe, clock)
        record["host_memory_bandwidth_Bps"] = (record["memory_bandwidth_Bps"] if device.gpu is None
                                               else _time_elementwise(host, min(probe, 32 << 20), clock))
        local = _time_copy(device, device, probe, clock)
        peer = _time_copy(gpus[0], gpus[1], probe, clock) if len(gpus) > 1 else local
        record["peer_measured"] = len(gpus) > 1
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


def _measure_memory_factor(device: Device, real, box_size: int = 256) -> tuple[dict, str]:
    """Per storage: CuPy pool high-water mark of a real run over the model (arrays + plan work areas)."""
    cp = device.xp
    grid = PaddedGrid(box_size, 2.0, box_size // 2)
    factors = {}
    for plan in (Plan(1, "dense", False, grid.size), Plan(1, "packed", False, grid.size)):
        with device.use():
            pool = cp.get_default_memory_pool()
            cache = _plan_cache(device)
            if cache is not None:
                cache.clear()
            pool.free_all_blocks()
            base = pool.total_bytes()
            data, weight = _random_sums(grid, device, real, seed=0)
            run_plan(plan, grid, [device], {"data": data, "weight": weight}, n_iter=2)
            device.synchronize()
            del data, weight
            peak = pool.total_bytes() - base
            work = int(cache.get_curr_memsize()) if cache is not None else 0
        model = memory_estimate(plan, grid, real, backend="cupy", n_iter=2).per_device[0] + work
        # dense: a factor (the 3D FFT buffers grow with the volume); packed: bytes on top of the
        # model (plans and pool rounding; its chunks are bounded, so the excess does not grow)
        factors[plan.storage] = max(1.0, peak / model) if plan.storage == "dense" else max(0, peak - model)
    return factors, (f"measured at box {box_size}: dense, CuPy pool peak / model; packed, pool peak - model "
                     "(bytes)")


def memory_need(calibration: dict, storage: str, model_bytes: int) -> int:
    """Bytes a plan needs on a device: the model scaled (dense) or plus the measured excess (packed)."""
    f = calibration.get("memory_factor", 1.0)
    if not isinstance(f, dict):
        return int(float(f) * model_bytes)
    if storage == "dense":
        return int(float(f.get("dense", 1.0)) * model_bytes)
    return int(model_bytes + float(f.get("packed", 0.0)))


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
        missing = [n for n in {int(n) for n in sizes} for k in ("3d", "columns")
                   if str(n) not in record["fft_pair_s"].get(k, {}) and _pair_bytes(k, n, real) <= budget]
        if sum(d.gpu is not None for d in dict.fromkeys(devices)) > 1 and not record.get("peer_measured", False):
            missing.append("peer bandwidth")
        if not missing and all((record["fft_fit"].get(k) or {}).get("a") for k in ("3d", "columns")):
            return record
    record = calibrate(devices, sizes, real_dtype=real_dtype, record=record, max_bytes=max_bytes, **kwargs)
    save_calibration(record, path)
    log.info("calibration of %s written to %s", record["device_model"], path)
    return record


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
