"""Project a 3D map (or a built-in phantom) into RELION particle images: <o>.star + <o>.mrcs.

Random orientations (uniform on SO(3)) or those of a STAR file, random origin offsets, RELION's
CTF (not phase-flipped) and white Gaussian noise at a given SNR, e.g.
  omlrelion simulate --map phantom --box 64 --angpix 2 --n 2000 --o sim/particles --shift_max 3
  omlrelion simulate --map emd_1234.mrc --orientations run_data.star --o sim/particles --snr 0.05
  omlrelion reconstruct --i sim/particles.star --o sim/map.mrc --ctf
The phantom is also written to <o>_phantom.mrc, for comparison with a reconstruction.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omlrelion.backend import parse_device
from omlrelion.errors import InputError
from omlrelion.pipeline.simulate import PHANTOM, SimulateParams, simulate


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--map", required=True, help="input map (.mrc), or 'phantom' for a built-in test map")
    p.add_argument("--o", dest="output", type=Path, required=True,
                   help="output root: writes <o>.star and <o>.mrcs (its folder must exist)")
    p.add_argument("--n", type=int, default=None,
                   help="number of particles (default: every row of an --orientations STAR file)")
    p.add_argument("--box", type=int, default=None, help="box size of the phantom, px (default: 64)")
    p.add_argument("--angpix", type=float, default=None,
                   help="pixel size, A/px (default: the map header's; 2.0 for the phantom)")
    p.add_argument("--orientations", default="random",
                   help="'random' (uniform on SO(3)) or a STAR file with rlnAngleRot/Tilt/Psi "
                        "(and rlnOriginX/YAngst, rlnDefocusU/V/Angle when present) (default: random)")
    p.add_argument("--shift_max", type=float, default=0.0,
                   help="origin offsets uniform in [-s, s] px on x and y (default: 0)")
    p.add_argument("--voltage", type=float, default=300.0, help="acceleration voltage, kV (default: 300)")
    p.add_argument("--cs", type=float, default=2.7, help="spherical aberration, mm (default: 2.7)")
    p.add_argument("--amp_contrast", type=float, default=0.1, help="amplitude contrast fraction (default: 0.1)")
    p.add_argument("--defocus_min", type=float, default=10000.0, help="smallest DefocusU, A (default: 10000)")
    p.add_argument("--defocus_max", type=float, default=30000.0, help="largest DefocusU, A (default: 30000)")
    p.add_argument("--astigmatism", type=float, default=600.0,
                   help="DefocusV = DefocusU - uniform[0, a], A (default: 600)")
    p.add_argument("--bfactor", type=float, default=0.0, help="CTF B-factor, A^2 (default: 0)")
    p.add_argument("--no_ctf", action="store_true", help="do not apply a CTF (no defocus columns)")
    p.add_argument("--snr", type=float, default=0.1,
                   help="signal variance / noise variance over the whole box; 0 or inf: no noise (default: 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: 0)")
    p.add_argument("--phantom_seed", type=int, default=0, help="seed of the phantom map (default: 0)")
    p.add_argument("--pad", type=float, default=2.0, help="projector padding factor (default: 2)")
    p.add_argument("--device", default="cpu", help="cpu or gpu, gpu:ID (default: cpu)")
    p.add_argument("--batch", type=int, default=None, help="particles per batch")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")


def main(args: argparse.Namespace) -> dict:
    params = SimulateParams(
        n_particles=args.n, angpix=args.angpix, box_size=args.box, orientations=args.orientations,
        shift_max_px=args.shift_max, voltage_kv=args.voltage, cs_mm=args.cs, amp_contrast=args.amp_contrast,
        defocus_min=args.defocus_min, defocus_max=args.defocus_max, astigmatism=args.astigmatism,
        bfactor=args.bfactor, ctf=not args.no_ctf, snr=args.snr, pad=args.pad, batch_size=args.batch,
        phantom_seed=args.phantom_seed)
    devices = parse_device(args.device)
    root = args.output.with_suffix("") if args.output.suffix in (".star", ".mrcs") else args.output
    for suffix in (".star", ".mrcs") + (("_phantom.mrc",) if args.map == PHANTOM else ()):
        if root.name and root.with_name(root.name + suffix).is_dir():   # simulate() checks the rest
            raise InputError(f"--o {args.output}: {root.name + suffix} is a folder; remove it or choose "
                             f"another output root")
    summary = simulate(args.map, args.output, params, device=devices[0], seed=args.seed,
                       show_progress=not args.quiet, argv=sys.argv)
    if not args.quiet:
        outputs = f"{summary['star']} + {summary['stack']}"
        if summary["phantom_map"]:
            outputs += f" (map: {summary['phantom_map']})"
        print(f"omlrelion simulate: {summary['n_particles']} particles, box {summary['box_size']}, "
              f"{summary['angpix']:.4g} A/px -> {outputs} on {summary['device']['name']} "
              f"in {summary['timings_s']['total']:.2f} s")
    return summary
