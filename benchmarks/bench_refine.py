"""Time the reduced refinement loop (`refine.autorefine.refine`) on simulated particles.

Particles: projections of the package's phantom at random orientations and shifts (+-2 px), CTF
(defocus 1-3 um), Gaussian noise at the given SNR; start: the phantom low-passed to --ini-high.
Prints per-iteration wall time, current image size, resolution and the pose error to the truth.

  python benchmarks/bench_refine.py --box 128 --particles 2000 --order 2 --iter 2 --device gpu
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--angpix", type=float, default=None, help="default: 320 A / box")
    p.add_argument("--particles", type=int, default=500)
    p.add_argument("--snr", type=float, default=0.5)
    p.add_argument("--order", type=int, default=2)
    p.add_argument("--offset-range", type=float, default=3.0)
    p.add_argument("--offset-step", type=float, default=1.0)
    p.add_argument("--ini-high", type=float, default=30.0)
    p.add_argument("--iter", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    from omlrelion.backend import parse_device
    from omlrelion.ctf.ctf import CtfParams
    from omlrelion.ctf.optics import Optics
    from omlrelion.fourier.projector import volume_to_ftc
    from omlrelion.geometry.euler import euler_to_matrix
    from omlrelion.pipeline.phantom import phantom_volume
    from omlrelion.pipeline.simulate import project_images
    from omlrelion.refine.autorefine import RefineOptions, refine

    dev = parse_device(args.device)[0]
    n, m = args.box, args.particles
    angpix = args.angpix or 320.0 / n
    rng = np.random.default_rng(0)
    truth = phantom_volume(n, angpix, seed=1).astype(np.float64)
    eulers = np.column_stack([rng.uniform(-180, 180, m), np.degrees(np.arccos(rng.uniform(-1, 1, m))),
                              rng.uniform(-180, 180, m)])
    rotations = euler_to_matrix(eulers)
    shifts = rng.uniform(-2, 2, size=(m, 2))
    optics = Optics(angpix=angpix, voltage_kv=300, cs_mm=2.7, amp_contrast=0.1, box_size=n)
    defocus = rng.uniform(10000, 30000, m)
    ctf = CtfParams(defocus, defocus, np.zeros(m), np.zeros(m), np.zeros(m), np.ones(m))
    clean = project_images(volume_to_ftc(truth, pad=2.0), rotations, shifts, optics, ctf, pad=2.0, r_padded=n)
    images = clean + rng.normal(scale=clean.std() / np.sqrt(args.snr), size=clean.shape)
    halves = np.where(np.arange(m) % 2 == 0, 1, 2)
    opts = RefineOptions(healpix_order=args.order, offset_range_px=args.offset_range,
                         offset_step_px=args.offset_step, ini_high_A=args.ini_high, n_iter=1, batch=args.batch)
    print(f"device {dev.name}; box {n}, {angpix:.2f} A/px, {m} particles, SNR {args.snr}, order {args.order}")
    print("| iteration | seconds | current size | resolution (A) | median pose error (deg) | <Pmax> |")
    print("|---|---|---|---|---|---|")
    state = None
    for it in range(args.iter):
        t0 = time.perf_counter()
        state = refine(images, ctf, optics, halves, truth, opts, device=dev, state=state)
        dev.synchronize()
        seconds = time.perf_counter() - t0
        cos = (np.einsum("mij,mij->m", euler_to_matrix(state.eulers), rotations) - 1) / 2
        err = np.median(np.degrees(np.arccos(np.clip(cos, -1, 1))))
        h = state.history[-1]
        print(f"| {it + 1} | {seconds:.2f} | {h['current_size']} | {h['resolution_A']:.1f} | {err:.1f} | "
              f"{h['ave_pmax']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
