"""Choose the sums-to-map plan for a box and devices: candidates, memory per device, predicted times.

Calibrates the devices' model on first use (FFT pair times, bandwidths; cached as JSON in
$OMLRELION_AUTOTUNE_CACHE or ~/.cache/omlrelion), e.g.
  omlrelion autotune --box 800 --device gpu:0,1
  omlrelion autotune --box 256 --maxres 4.5 --angpix 1.2 --device cpu:4 --free-gb 2 --measure 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from omlrelion.backend import parse_device
from omlrelion.errors import InputError
from omlrelion.geometry.grids import PaddedGrid
from omlrelion.io.jsonfile import write_json
from omlrelion.io.mrc import check_output
from omlrelion.reconstruct.autotune import (
    calibration_path,
    choose_plan,
    device_model,
    largest_prime_factor,
)
from omlrelion.units import r_max_for_resolution


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--box", type=int, required=True, help="box size N in pixels (even)")
    p.add_argument("--pad", type=float, default=2.0, help="padding factor (default: 2)")
    p.add_argument("--maxres", type=float, default=None, help="maximum resolution in A (default: Nyquist)")
    p.add_argument("--angpix", type=float, default=None, help="pixel size in A (needed with --maxres)")
    p.add_argument("--iter", type=int, default=10, help="gridding iterations (default: 10; 0: no gridding)")
    p.add_argument("--device", default="cpu",
                   help="cpu, cpu:N (N simulated devices), gpu, gpu:ID[,ID...] or gpu:all (default: cpu)")
    p.add_argument("--precision", choices=("single", "double"), default=None,
                   help="arithmetic (default: double on the CPU, single on GPUs)")
    p.add_argument("--allow-inexact", action="store_true",
                   help="also consider FFT-friendly sides above RELION's P with RELION's kernel (the map differs by "
                        "~1e-3 relative; with --kernel compact they are always considered and exact)")
    p.add_argument("--kernel", choices=("relion", "compact"), default="relion",
                   help="gridding kernel (compact adds the direct convolution and makes every FFT side exact)")
    p.add_argument("--measure", type=int, default=0, metavar="K",
                   help="time the K best predicted plans on the real code and pick the fastest measured")
    p.add_argument("--free-gb", type=float, default=None, metavar="X",
                   help="free memory per device in GB (1e9 bytes), instead of what the devices report")
    p.add_argument("--recalibrate", action="store_true", help="measure the device model again, ignoring the cache")
    p.add_argument("--cache", type=Path, default=None,
                   help="calibration folder (default: $OMLRELION_AUTOTUNE_CACHE or ~/.cache/omlrelion)")
    p.add_argument("--json", type=Path, default=None, help="write the candidates and the chosen plan here")


def _grid(args: argparse.Namespace) -> PaddedGrid:
    if args.box < 8 or args.box % 2:
        raise InputError(f"--box {args.box}: the box size must be even and at least 8")
    if not args.pad >= 1:                   # also refuses NaN
        raise InputError(f"--pad {args.pad}: the padding factor must be >= 1")
    if args.maxres is not None:
        if args.angpix is None or args.angpix <= 0:
            raise InputError("--maxres needs --angpix (the pixel size in A) to give r_max")
        if not 0 < args.maxres < float("inf"):
            raise InputError(f"--maxres {args.maxres}: expected a resolution in A > 0")
    if args.iter < 0 or args.measure < 0:
        raise InputError("--iter and --measure must be >= 0")
    if args.free_gb is not None and not args.free_gb > 0:
        raise InputError(f"--free-gb {args.free_gb}: expected a positive size in GB")
    r_max = r_max_for_resolution(args.box, args.angpix or 1.0, args.maxres)
    return PaddedGrid(args.box, args.pad, r_max)


def _factors(n: int) -> str:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return "*".join(str(f) for f in out) or "1"


def format_table(grid: PaddedGrid, table: list[dict]) -> str:
    """The candidates as a text table (one line each), the chosen plan marked with '*'."""
    head = (f"{'':2}{'plan':44} {'memory/device':>14} {'% of dense':>10} {'dense f32':>10} {'fits':>4} "
            f"{'predicted s':>12} {'measured s':>11}")
    lines = [head]
    for row in table:
        plan = row["description"] + ("" if row["exact"] else " (inexact)")
        measured = "-" if row["measured_s"] is None else f"{row['measured_s']:.4g}"
        lines.append(f"{'*' if row['chosen'] else ' ':2}{plan:44} {row['memory_per_device_bytes'] / 1e9:11.3f} GB "
                     f"{100 * row['memory_per_device_bytes'] / row['dense_float32_bytes']:9.1f}% "
                     f"{row['dense_float32_bytes'] / 1e9:7.3f} GB {'yes' if row['fits'] else 'no':>4} "
                     f"{row['predicted_s']:12.4g} {measured:>11}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    grid = _grid(args)
    devices = parse_device(args.device)
    if args.json:
        check_output(args.json, "JSON summary")
    real = None if args.precision is None else (np.float32 if args.precision == "single" else np.float64)
    free = None if args.free_gb is None else int(args.free_gb * 1e9)
    plan, table = choose_plan(grid, devices, free_bytes=free, allow_inexact=args.allow_inexact, measure=args.measure,
                              n_iter=args.iter, real_dtype=real, cache_dir=args.cache, recalibrate=args.recalibrate,
                              kernel=args.kernel)
    cal_file = calibration_path(devices[0], args.cache)
    print(f"box {grid.box_size}, pad {grid.pad:g}, r_max {grid.r_max}: P {grid.size} ({_factors(grid.size)}, "
          f"largest prime {largest_prime_factor(grid.size)}), Q {grid.final_size}; {args.iter} gridding iterations; "
          f"{len(devices)} device(s) of {device_model(devices[0])}; calibration {cal_file}")
    print(format_table(grid, table))
    print(f"chosen: {plan.describe()}" + ("" if plan.is_exact(grid) else
                                          " (inexact: RELION's kernel on another FFT side; the map differs by ~1e-3 relative)"))
    summary = {"box_size": grid.box_size, "pad": grid.pad, "r_max": grid.r_max, "padded_size": grid.size,
               "final_size": grid.final_size, "gridding_iterations": args.iter, "device": args.device,
               "device_model": device_model(devices[0]), "calibration": str(cal_file),
               "chosen": plan.to_dict(), "candidates": table, "command": sys.argv}
    if args.json:
        write_json(args.json, summary, indent=2)
    return summary
