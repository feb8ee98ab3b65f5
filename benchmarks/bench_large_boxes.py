"""Sums-to-map at large boxes on 1..G GPUs: the auto-tuner's plan, its time and memory per GPU.

For each case BOX:G the padded sums of a full-resolution reconstruction (pad 2, r_max = BOX/2)
are made directly in packed form on the GPUs (random positive weights, random complex data: no
dense volume is ever built, as in a refinement that keeps its sums packed), the auto-tuner chooses
a plan (`choose_plan`, calibrated on these GPUs, FFT-friendly sides allowed), and the step runs
once, timed: 10 gridding iterations, the final inverse FFT, mask and grid correction, the N^3 map
copied to the host. Per GPU: the CuPy pool's high-water mark (pool reset before each case, cuFFT
work areas included) and the driver's used memory at the end; the memory model's prediction;
the dense float32 footprint of the straightforward one-GPU step (`columns.dense_float32_bytes`).
With --memory-limit-gb each GPU's pool is capped (e.g. 80 for the memory of an H100) and the tuner
plans for that budget. Prints a Markdown table; --out writes it (and --json the rows).

  python benchmarks/bench_large_boxes.py --cases 200:1 400:1 800:2 --out results.md
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np


def _gb(b) -> str:
    return f"{b / 1e9:.1f}"


def _reset(devices):
    import cupy as cp

    for d in devices:
        with d.use():
            cp.cuda.Device(d.gpu).synchronize()
            cp.fft.config.get_plan_cache().clear()
            cp.get_default_memory_pool().free_all_blocks()
            cp.get_default_pinned_memory_pool().free_all_blocks()


def _random_packed(engine, seed: int):
    """Packed positive float32 weights and complex64 data on every device of `engine`."""
    import cupy as cp

    fw, data = [], []
    for g, dev in enumerate(engine.devices):
        n = engine.parts[g].n_packed
        with dev.use():
            rng = cp.random.default_rng(seed + g)
            w = rng.random(n, dtype=np.float32)
            w += np.float32(0.5)
            fw.append(w)
            d = cp.empty(n, dtype=np.complex64)
            d.real = rng.standard_normal(n, dtype=np.float32)
            d.imag = rng.standard_normal(n, dtype=np.float32)
            data.append(d)
    return fw, data


def run_case(box: int, n_gpus: int, *, limit_bytes: int | None, allow_inexact: bool, n_iter: int,
             force_exact: bool = False, r_max: int | None = None, kernel: str = "relion",
             convolution: str | None = None) -> dict:
    import cupy as cp

    from omlrelion.backend import Device
    from omlrelion.geometry.grids import PaddedGrid
    from omlrelion.reconstruct.autotune import Plan, choose_plan, memory_estimate
    from omlrelion.reconstruct.columns import (
        ColumnEngine,
        dense_float32_bytes,
        reconstruct_packed,
    )
    from omlrelion.reconstruct.plan import free_memory

    devices = [Device(i) for i in range(n_gpus)]
    _reset(devices)
    grid = PaddedGrid(box, 2.0, r_max or box // 2)
    free = min(free_memory(devices))
    if limit_bytes:
        free = min(free, int(limit_bytes * 0.95))
        for d in devices:
            with d.use():
                cp.get_default_memory_pool().set_limit(size=limit_bytes)
    t = time.perf_counter()
    plan, table = choose_plan(grid, devices, free_bytes=free, allow_inexact=allow_inexact and not force_exact,
                              n_iter=n_iter, input_on_device=False, kernel=kernel)
    if plan.n_devices != n_gpus or (convolution and plan.convolution != convolution):
        # the case asks for n_gpus (and a convolution): the best-ranked plan that fits with them
        plan = next((Plan.from_dict(row["plan"]) for row in table if row["fits"]
                     and row["plan"]["n_devices"] == n_gpus
                     and (convolution is None or row["plan"]["convolution"] == convolution)), plan)
    plan_s = time.perf_counter() - t
    chosen = next((row for row in table if Plan.from_dict(row["plan"]) == plan), None)
    _reset(devices)
    timings: dict = {}
    if plan.single_device_path:
        from omlrelion.reconstruct.calibration import _random_sums
        from omlrelion.reconstruct.gridding import reconstruct_map

        data, weight = _random_sums(grid, devices[0], np.float32, seed=box)
        run = lambda: reconstruct_map(data, weight, box_size=box, r_max=grid.r_max, n_iter=n_iter,
                                      timings=timings,
                                      fft_size=None if plan.fft_size == grid.size else plan.fft_size)
    else:
        engine = ColumnEngine(grid, devices, strided=plan.strided, fft_size=plan.fft_size, kernel=plan.kernel,
                              convolution=plan.convolution)
        engine.memory_trace = []
        fw, data = _random_packed(engine, seed=box)
        run = lambda: reconstruct_packed(engine, data, fw, n_iter=n_iter, stage_data=plan.stage_data,
                                         timings=timings)
    for d in devices:                  # the inputs' temporaries out of the pool: the peak is the step's
        with d.use():
            cp.cuda.Device(d.gpu).synchronize()
            cp.get_default_memory_pool().free_all_blocks()
    t = time.perf_counter()
    volume = cp.asnumpy(run())
    for d in devices:
        d.synchronize()
    seconds = time.perf_counter() - t
    finite = bool(np.isfinite(volume[::max(1, box // 16)]).all())
    del volume
    peaks, used = [], []
    for d in devices:
        with d.use():
            peaks.append(int(cp.get_default_memory_pool().total_bytes()))
            free_b, total_b = cp.cuda.runtime.memGetInfo()
            used.append(int(total_b - free_b))
    model = list(memory_estimate(plan, grid, np.float32, n_iter=n_iter, input_on_device=False).per_device)
    row = {
        "box": box, "gpus": n_gpus, "r_max": grid.r_max, "padded_size": grid.size, "plan": plan.describe(),
        "exact": plan.fft_size == grid.size, "seconds": seconds, "gridding_s": timings.get("gridding"),
        "fft_to_map_s": timings.get("fft_to_map"), "plan_s": plan_s,
        "predicted_s": chosen["predicted_s"] if chosen else None,
        "pool_peak_bytes": peaks, "driver_used_bytes": used, "model_bytes": model,
        "dense_float32_bytes": dense_float32_bytes(grid), "memory_limit_bytes": limit_bytes,
        "finite": finite, "memory_trace": None if plan.single_device_path else engine.memory_trace, "device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
    }
    if limit_bytes:
        for d in devices:
            with d.use():
                cp.get_default_memory_pool().set_limit(size=0)
    _reset(devices)
    return row


def table(rows) -> str:
    head = ("| box | r_max | P | GPUs | plan chosen | time (s) | gridding (s) | to map (s) | peak/GPU, pool (GB) | "
            "driver used/GPU (GB) | model/GPU (GB) | dense f32 (GB) | peak / dense | limit (GB) |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['box']} | | | {r['gpus']} | {r['error']} | | | | | | | | | |")
            continue
        peak = max(r["pool_peak_bytes"])
        lines.append(
            f"| {r['box']} | {r['r_max']} | {r['padded_size']} | {r['gpus']} | {r['plan']} | {r['seconds']:.2f} | "
            f"{r['gridding_s']:.2f} | {r['fft_to_map_s']:.2f} | {' / '.join(_gb(b) for b in r['pool_peak_bytes'])} | "
            f"{' / '.join(_gb(b) for b in r['driver_used_bytes'])} | {_gb(max(r['model_bytes']))} | "
            f"{_gb(r['dense_float32_bytes'])} | {peak / r['dense_float32_bytes']:.2f} | "
            f"{_gb(r['memory_limit_bytes']) if r['memory_limit_bytes'] else '-'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", required=True,
                   help="BOX:GPUS[:R_MAX], e.g. 800:2 (r_max in Fourier pixels; default BOX/2)")
    p.add_argument("--kernel", choices=("relion", "compact"), default="relion")
    p.add_argument("--convolution", choices=("fft", "direct"), default=None,
                   help="run the best plan with this convolution (default: the tuner's choice)")
    p.add_argument("--iter", type=int, default=10)
    p.add_argument("--exact", action="store_true", help="RELION's P only (no FFT-friendly sides)")
    p.add_argument("--memory-limit-gb", type=float, default=None, help="cap each GPU's CuPy pool (GB, 1e9 B)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    limit = int(args.memory_limit_gb * 1e9) if args.memory_limit_gb else None
    rows = []
    for case in args.cases:
        fields = [int(f) for f in case.split(":")]
        box, g, r_max = fields[0], (fields[1:2] or [1])[0], (fields[2:3] or [None])[0]
        try:
            row = run_case(box, g, limit_bytes=limit, allow_inexact=not args.exact, n_iter=args.iter,
                           force_exact=args.exact, r_max=r_max, kernel=args.kernel, convolution=args.convolution)
        except Exception as exc:           # keep the other cases: out of memory is a result too
            row = {"box": box, "gpus": g, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    text = (f"Device: {rows[0].get('device', '?')}; host {platform.node()}; python {sys.version.split()[0]}; "
            f"{args.iter} gridding iterations; pad 2; kernel {args.kernel}; "
            f"{'memory limit %.0f GB per GPU' % args.memory_limit_gb if limit else 'no memory limit'}\n\n"
            + table(rows))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
