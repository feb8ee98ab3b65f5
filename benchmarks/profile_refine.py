"""Where an `omlrelion refine` iteration spends its time (the particle set and options of
`bench_refine_vs_relion.py`, which prepares it in --work if missing).

Runs the iterations twice in this process (the first compiles CuPy's kernels) and profiles the
second with cProfile. Run it under CUDA_LAUNCH_BLOCKING=1 so that a kernel's time is charged to the
Python call that launched it. Also counts the second pass's (particle, orientation, shift)
evaluations against the pairs that are a particle's own (children of its significant coarse
pairs): the rest is the padding of the per-particle products.

  CUDA_LAUNCH_BLOCKING=1 python benchmarks/profile_refine.py --box 256 --n 5000 --iters 2 --work /tmp/b256
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_refine_vs_relion import run_ours  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--box", type=int, default=256)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--device", default="gpu")
    p.add_argument("--work", required=True)
    p.add_argument("--top", type=int, default=45)
    args = p.parse_args(argv)
    work = Path(args.work)
    if not (work / "particles_start.star").exists():
        source = str(Path(os.environ.get("OMLRELION_DATA", "../shared/data")) / "clean70SRibosome_vol_65p.mrc")
        subprocess.run([sys.executable, str(Path(__file__).with_name("refine_vs_relion.py")), "prepare", "--map",
                        source, "--source-angpix", "5", "--box", str(args.box), "--n", str(args.n), "--snr", "0.05",
                        "--o", str(work)], check=True)

    from omlrelion.refine import expectation

    counts = {"evaluated": 0, "own": 0, "parts": 0}
    original = expectation._own_points

    def counted(lists, images, ctf, noise_weight, pixels, sig, **kw):
        fp = original(lists, images, ctf, noise_weight, pixels, sig, **kw)
        counts["evaluated"] += int(fp.posterior.size)
        counts["own"] += int(sig.sum()) * lists.k_t * lists.k_r
        counts["parts"] += 1
        return fp

    expectation._own_points = counted
    t0 = time.perf_counter()
    run_ours(work, args.iters, args.device)
    print(f"first run (with compilation): {time.perf_counter() - t0:.2f} s", flush=True)
    for k in counts:
        counts[k] = 0
    prof = cProfile.Profile()
    prof.enable()
    rows = run_ours(work, args.iters, args.device)
    prof.disable()
    for r in rows:
        print(f"iteration {r['iteration']}: {r['seconds']:.2f} s, size {r['size']}, order {r['order']}, "
              f"{r['evaluations']:.3g} evaluations", flush=True)
    print(f"second pass: {counts['parts']} parts, {counts['evaluated']:.3g} evaluated, {counts['own']:.3g} the "
          f"particles' own pairs ({counts['evaluated'] / max(counts['own'], 1):.1f}x)")
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(args.top)
        print("\n".join(s.getvalue().splitlines()[:args.top + 12]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
