"""Scientific check of `omlrelion refine` against RELION's `relion_refine --auto_refine`.

From a real map (the 70S ribosome of ../shared/data, 65 px at 5 A/px, Fourier-upsampled to the
box), simulate particles (random orientations, shifts, CTF at 1-3 um, white noise at an SNR),
start both programs from the true map low-passed to 30 A with random initial angles and zero
offsets, and compare: final gold-standard resolution, median angular error to the true poses,
RMS offset error and the FSC of the final map against the truth (0.5 and 0.143).

  python benchmarks/refine_vs_relion.py prepare --map ../shared/data/clean70SRibosome_vol_65p.mrc \
      --source-angpix 5 --box 128 --n 5000 --snr 0.05 --o sci
  python benchmarks/refine_vs_relion.py relion --dir sci --mpi 3        # relion_refine_mpi, in sci/relion
  python benchmarks/refine_vs_relion.py ours --dir sci --device gpu     # omlrelion refine, in sci/ours
  python benchmarks/refine_vs_relion.py compare --dir sci               # the table

The start map is the truth low-passed, so it is CTF-corrected: RELION gets `--ctf_corrected_ref`
(what its GUI passes by default), without which its first iteration compares images with
projections that lack the CTF; omlrelion always treats the reference as CTF-corrected.
Both programs get the same options (`relion_options` / `ours_options` below): HEALPix order 2,
local searches from order 4, offsets 5 px in steps of 2 px, pad 2, gridding on, particle
diameter, solvent flattening, zero-masked images and the halves joined below 40 A.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

PARTICLE_DIAMETER_A = 280.0
INI_HIGH_A = 30.0


def fourier_resample(volume: np.ndarray, box_size: int) -> np.ndarray:
    """Zero-pad (or crop) the centred spectrum of a cubic map to `box_size` (same physical box)."""
    n = volume.shape[0]
    f = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(volume)))
    out = np.zeros((box_size,) * 3, dtype=complex)
    m = min(n, box_size)
    src = slice(n // 2 - m // 2, n // 2 - m // 2 + m)
    dst = slice(box_size // 2 - m // 2, box_size // 2 - m // 2 + m)
    out[dst, dst, dst] = f[src, src, src]
    v = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(out))).real
    return v * (box_size / n) ** 3


def relion_options(mpi: int, threads: int) -> list[str]:
    # the program by its full path: MPI starts ranks with argv[0] as given (wrappers resolve from it)
    program = shutil.which("relion_refine_mpi") or "relion_refine_mpi"
    return (["mpirun", "--oversubscribe", "--allow-run-as-root", "-n", str(mpi), program]
            + ["--i", "particles_start.star", "--ref", "start.mrc", "--o", "relion/run", "--auto_refine",
               "--split_random_halves", "--ctf", "--ctf_corrected_ref", "--ini_high", str(INI_HIGH_A),
               "--particle_diameter", str(PARTICLE_DIAMETER_A), "--flatten_solvent", "--zero_mask",
               "--oversampling", "1", "--healpix_order", "2", "--auto_local_healpix_order", "4",
               "--offset_range", "5", "--offset_step", "2", "--sym", "C1", "--low_resol_join_halves", "40",
               "--pad", "2", "--j", str(threads), "--pool", "10", "--dont_combine_weights_via_disc",
               "--random_seed", "1"])


def ours_options(device: str) -> list[str]:
    return ["--i", "particles_start.star", "--ref", "start.mrc", "--o", "ours/run", "--auto_refine",
            "--ini_high", str(INI_HIGH_A), "--particle_diameter", str(PARTICLE_DIAMETER_A),
            "--flatten_solvent", "--zero_mask", "--oversampling", "1", "--healpix_order", "2",
            "--auto_local_healpix_order", "4", "--offset_range", "5", "--offset_step", "2",
            "--low_resol_join_halves", "40", "--pad", "2", "--device", device]


def prepare(args) -> None:
    from omlrelion.io.mrc import read_map, write_map
    from omlrelion.io.star import read_particles, write_particles
    from omlrelion.refine.autorefine import low_pass

    out = Path(args.o)
    out.mkdir(parents=True, exist_ok=True)
    source, _ = read_map(args.map)
    angpix = args.source_angpix * source.shape[0] / args.box
    truth = fourier_resample(source.astype(np.float64), args.box)
    write_map(out / "truth.mrc", truth.astype(np.float32), angpix)
    write_map(out / "start.mrc", low_pass(truth, angpix=angpix, resolution_A=INI_HIGH_A).astype(np.float32), angpix)
    cmd = [sys.executable, "-m", "omlrelion", "simulate", "--map", str(out / "truth.mrc"), "--o",
           str(out / "particles"), "--n", str(args.n), "--snr", str(args.snr), "--shift_max", str(args.shift_max),
           "--seed", str(args.seed), "--device", args.device]
    subprocess.run(cmd, check=True)
    particles = read_particles(out / "particles.star")
    rng = np.random.default_rng(args.seed + 1)
    m = particles.n_particles
    eulers = np.column_stack([rng.uniform(-180, 180, m), np.degrees(np.arccos(rng.uniform(-1, 1, m))),
                              rng.uniform(-180, 180, m)])
    start = replace(particles, eulers_deg=eulers, shifts_px=np.zeros((m, 2)),
                    random_subset=np.where(np.arange(m) % 2 == 0, 1, 2))
    write_particles(out / "particles_start.star", start)
    print(f"prepared {m} particles, box {args.box}, {angpix:.4f} A/px, SNR {args.snr} in {out}")


def run_program(args, name: str, cmd: list[str]) -> None:
    d = Path(args.dir) / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    t0 = time.perf_counter()
    with open(d / "log.txt", "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        env = dict(os.environ, OMPI_MCA_btl_vader_single_copy_mechanism="none")
        proc = subprocess.run(cmd, cwd=d.parent, stdout=log, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - t0
    (d / "wall_seconds.json").write_text(json.dumps({"seconds": seconds, "returncode": proc.returncode}))
    print(f"{name}: exit {proc.returncode} in {seconds:.1f} s (log {d / 'log.txt'})")
    if proc.returncode:
        sys.exit(proc.returncode)


def angular_error_deg(e1: np.ndarray, e2: np.ndarray) -> np.ndarray:
    from omlrelion.geometry.euler import euler_to_matrix

    r = np.einsum("nij,nkj->nik", euler_to_matrix(e1), euler_to_matrix(e2))
    cos = (np.trace(r, axis1=1, axis2=2) - 1) / 2
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def summarise(d: Path, name: str, truth_particles, truth_map: np.ndarray, angpix: float, suffix: str = "") -> dict:
    """Final numbers of one program's run: its own rlnCurrentResolution; the FSC 0.143 crossing of the
    halves' FSC in its final model.star (the same rule for both programs); pose errors to the truth;
    the final map's FSC against the true map; wall time."""
    from omlrelion.io.mrc import read_map
    from omlrelion.io.star import read_particles, read_star_table
    from omlrelion.reconstruct.fsc import fsc, resolution_at

    run = d / name
    data = read_particles(run / f"run{suffix}_data.star")
    # the same stack: match particles by their image number in it
    index_to_row = {int(k): i for i, k in enumerate(truth_particles.image_indices)}
    rows = np.array([index_to_row[int(k)] for k in data.image_indices])
    err = angular_error_deg(data.eulers_deg, truth_particles.eulers_deg[rows])
    off = (data.shifts_px - truth_particles.shifts_px[rows]) * angpix
    model_star = run / (f"run{suffix}_half1_model.star" if suffix else "run_model.star")
    model = read_star_table(model_star, block="model_general")
    halves_fsc = read_star_table(model_star, block="model_class_1")["rlnGoldStandardFsc"].to_numpy(float)
    final, _ = read_map(run / (f"run{suffix}_half1_class001.mrc" if suffix else "run_class001.mrc"))
    curve = fsc(final.astype(np.float64), truth_map)
    n = truth_map.shape[0]
    wall = (json.loads((run / "wall_seconds.json").read_text())["seconds"] if not suffix
            else model_star.stat().st_mtime - (run / "run_it000_half1_model.star").stat().st_mtime)
    iters = sorted(run.glob("run_it*_half1_model.star"))
    return {"program": name + suffix, "resolution_A": float(model["rlnCurrentResolution"].iloc[0]),
            "halves_fsc0143_A": resolution_at(halves_fsc, box_size=n, angpix=angpix),
            "iterations": len(iters), "median_angular_error_deg": float(np.median(err)),
            "mean_angular_error_deg": float(np.mean(err)),
            "rms_offset_error_A": float(np.sqrt(np.mean(np.sum(off ** 2, axis=1)))),
            "map_vs_truth_fsc05_A": resolution_at(curve, box_size=n, angpix=angpix, threshold=0.5),
            "map_vs_truth_fsc0143_A": resolution_at(curve, box_size=n, angpix=angpix), "wall_seconds": wall}


def compare(args) -> None:
    from omlrelion.io.mrc import read_map
    from omlrelion.io.star import read_particles

    d = Path(args.dir).resolve()
    os.chdir(d)          # RELION's image names are relative to its project folder
    truth_map, angpix = read_map(d / "truth.mrc")
    truth_particles = read_particles(d / "particles.star")
    rows = [summarise(d, name, truth_particles, truth_map.astype(np.float64), angpix)
            for name in ("relion", "ours") if (d / name / "run_class001.mrc").exists()]
    if args.relion_iteration:           # a RELION run still going: its latest iteration
        rows.append(summarise(d, "relion", truth_particles, truth_map.astype(np.float64), angpix,
                              suffix=f"_it{args.relion_iteration:03d}"))
    cols = ["program", "iterations", "resolution_A", "halves_fsc0143_A", "median_angular_error_deg", "mean_angular_error_deg",
            "rms_offset_error_A", "map_vs_truth_fsc05_A", "map_vs_truth_fsc0143_A", "wall_seconds"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    (d / "compare.json").write_text(json.dumps(rows, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="stage", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--map", required=True)
    a.add_argument("--source-angpix", type=float, default=None, help="the map's pixel size (A/px)")
    a.add_argument("--box", type=int, default=128)
    a.add_argument("--n", type=int, default=5000)
    a.add_argument("--snr", type=float, default=0.05)
    a.add_argument("--shift-max", dest="shift_max", type=float, default=3.0)
    a.add_argument("--seed", type=int, default=7)
    a.add_argument("--device", default="cpu")
    a.add_argument("--o", required=True)
    r = sub.add_parser("relion")
    r.add_argument("--dir", required=True)
    r.add_argument("--mpi", type=int, default=3)
    r.add_argument("--threads", type=int, default=1)
    o = sub.add_parser("ours")
    o.add_argument("--dir", required=True)
    o.add_argument("--device", default="cpu")
    c = sub.add_parser("compare")
    c.add_argument("--dir", required=True)
    c.add_argument("--relion-iteration", dest="relion_iteration", type=int, default=None,
                   help="also summarise this iteration of RELION's run (e.g. one still going)")
    args = p.parse_args(argv)
    if args.stage == "prepare":
        prepare(args)
    elif args.stage == "relion":
        run_program(args, "relion", relion_options(args.mpi, args.threads))
    elif args.stage == "ours":
        run_program(args, "ours", [sys.executable, "-m", "omlrelion", "refine"] + ours_options(args.device))
    else:
        compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
