"""E-step throughput: (particle x orientation x translation) evaluations per second of
`refine.expectation.squared_differences` (the two matrix products), one batch at a time.

  python benchmarks/bench_estep.py --box 128 --order 2 --batch 32 --device gpu
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--box", type=int, default=128)
    p.add_argument("--order", type=int, default=2)
    p.add_argument("--offset-range", type=float, default=5.0)
    p.add_argument("--offset-step", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    from omlrelion.backend import parse_device
    from omlrelion.refine.expectation import HalfPlanePixels, squared_differences
    from omlrelion.refine.sampling import Sampling

    dev = parse_device(args.device)[0]
    xp = dev.xp
    n = args.box
    s = Sampling(args.order, args.offset_range, args.offset_step)
    n_rot, shifts = len(s.eulers()), s.shifts
    pix = HalfPlanePixels.of(n)
    real, cplx = (np.float32, np.complex64) if dev.gpu is not None else (np.float64, np.complex128)
    with dev.use():
        rng = np.random.default_rng(0)
        shape = (n, n // 2 + 1)
        proj = xp.asarray((rng.normal(size=(n_rot, *shape)) + 1j * rng.normal(size=(n_rot, *shape))).astype(cplx))
        img = xp.asarray((rng.normal(size=(args.batch, *shape)) + 1j * rng.normal(size=(args.batch, *shape))).astype(cplx))
        ctf = xp.asarray(rng.uniform(-1, 1, size=(args.batch, *shape)).astype(real))
        w = xp.asarray(np.ones(len(pix.index), dtype=real))
        squared_differences(proj, img, ctf, w, shifts, pix, box_size=n)
        dev.synchronize()
        best = np.inf
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            squared_differences(proj, img, ctf, w, shifts, pix, box_size=n)
            dev.synchronize()
            best = min(best, time.perf_counter() - t0)
    evals = args.batch * n_rot * len(shifts)
    flops = 8.0 * args.batch * len(shifts) * len(pix.index) * n_rot + 2.0 * args.batch * len(pix.index) * n_rot
    print(f"device {dev.name}; box {n}, order {args.order}: {n_rot} orientations x {len(shifts)} shifts x "
          f"{args.batch} particles, {len(pix.index)} pixels")
    print(f"| batch s | evaluations/s | GEMM GFLOP/s |\n|---|---|---|\n| {best:.4f} | {evals / best:.3g} | "
          f"{flops / best / 1e9:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
