"""The learned direction prior (model.star's model_pdf_orient_class_1) of an omlrelion refine run and
a relion_refine run of the same particles, each against its own poses and against the true poses.

RELION's pdf_direction of a half is the posterior mass each direction of the iteration's HEALPix
grid received. With poses that are mostly certain it follows the histogram of the particles' best
directions on that grid, the grid rotated by the iteration's perturbation (each program reads its
own from its sampling.star). Per half and program: the correlation of the prior with that
histogram (its own best poses), and with the histogram of the true poses.

  python benchmarks/direction_prior_vs_relion.py --truth particles.star --relion relion/run \\
      --ours ours/run --iteration 1
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from omlrelion.io.star import read_particles, read_star_table
from omlrelion.refine.sampling import Sampling


def _units(eulers_deg: np.ndarray) -> np.ndarray:
    rot, tilt = np.radians(eulers_deg[:, 0]), np.radians(eulers_deg[:, 1])
    return np.stack([np.sin(tilt) * np.cos(rot), np.sin(tilt) * np.sin(rot), np.cos(tilt)], axis=1)


def _histogram(eulers_deg: np.ndarray, grid: np.ndarray) -> np.ndarray:
    return np.bincount(np.argmax(_units(eulers_deg) @ grid.T, axis=1), minlength=len(grid)) / len(eulers_deg)


def compare(root: str, iteration: int, truth) -> list[dict]:
    general = read_star_table(f"{root}_it{iteration:03d}_sampling.star", block="sampling_general").iloc[0]
    sampling = Sampling(int(general["rlnHealpixOrder"]), 1.0, 1.0, symmetry=str(general["rlnSymmetryGroup"]),
                        perturb=float(general["rlnSamplingPerturbInstance"]))
    grid = _units(sampling.eulers()[::len(sampling.psi)])          # each direction's perturbed (rot, tilt)
    data = read_particles(f"{root}_it{iteration:03d}_data.star")
    index = {int(k): i for i, k in enumerate(truth.image_indices)}
    true_eulers = truth.eulers_deg[[index[int(k)] for k in data.image_indices]]
    rows = []
    for h in (1, 2):
        pdf = read_star_table(f"{root}_it{iteration:03d}_half{h}_model.star", block="model_pdf_orient_class_1",
                              required=("rlnOrientationDistribution",))["rlnOrientationDistribution"].to_numpy(float)
        sel = data.random_subset == h
        rows.append({"half": h, "directions": len(pdf), "sum": pdf.sum(), "zero": int(np.sum(pdf == 0)),
                     "perturb": sampling.perturb,
                     "own": np.corrcoef(pdf, _histogram(data.eulers_deg[sel], grid))[0, 1],
                     "truth": np.corrcoef(pdf, _histogram(true_eulers[sel], grid))[0, 1]})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--truth", required=True, help="the particles with their true poses")
    p.add_argument("--relion", required=True, help="relion_refine's output root (e.g. relion/run)")
    p.add_argument("--ours", required=True, help="omlrelion refine's output root")
    p.add_argument("--iteration", type=int, default=1)
    args = p.parse_args(argv)
    truth = read_particles(args.truth)
    print("| program | half | directions | sum | zero-mass directions | perturbation | corr. with own best "
          "directions | corr. with true directions |")
    print("|---|---|---|---|---|---|---|---|")
    for name, root in (("relion_refine", args.relion), ("omlrelion", args.ours)):
        for r in compare(root, args.iteration, truth):
            print(f"| {name} | {r['half']} | {r['directions']} | {r['sum']:.4f} | {r['zero']} | {r['perturb']:+.4f} | "
                  f"{r['own']:.3f} | {r['truth']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
