"""Reconstruct a 3D map from particles with known poses (relion_reconstruct's job, on CPU or GPU).

Takes relion_reconstruct's options (RELION 3.1 defaults: pad 2, 10 gridding iterations), e.g.
  omlrelion reconstruct --i particles.star --o map.mrc --ctf --device gpu
  omlrelion reconstruct --i particles.star --o half1.mrc --ctf --subset 1 --json half1.json
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from omlrelion.backend import parse_device
from omlrelion.errors import InputError
from omlrelion.io.mrc import check_output, map_shape
from omlrelion.pipeline.steps import ReconstructOptions, reconstruct
from omlrelion.reconstruct.insert import CtfMode


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--i", dest="input", type=Path, required=True, help="input particle STAR file")
    p.add_argument("--o", dest="output", type=Path, default=Path("relion.mrc"), help="output map (default: relion.mrc)")
    p.add_argument("--angpix", type=float, default=-1,
                   help="output pixel size in A (default, or -1: the first optics group's)")
    p.add_argument("--ctf", action="store_true", help="apply CTF correction")
    p.add_argument("--ctf_intact_first_peak", action="store_true", help="leave the CTF's first peak intact")
    p.add_argument("--ctf_phase_flipped", action="store_true", help="images are phase-flipped")
    p.add_argument("--only_flip_phases", action="store_true", help="only flip phases, no amplitude correction")
    p.add_argument("--pad", type=float, default=2.0, help="padding factor (default: 2)")
    p.add_argument("--iter", type=int, default=10, help="gridding iterations (default: 10)")
    p.add_argument("--skip_gridding", action="store_true", help="no gridding: divide by the weights (RELION 4/5 default)")
    p.add_argument("--maxres", type=float, default=-1, help="maximum resolution in A (default: Nyquist)")
    p.add_argument("--sym", default="c1", help="point-group symmetry (default: c1)")
    p.add_argument("--subset", type=int, default=-1, help="1 or 2: only particles of that rlnRandomSubset")
    p.add_argument("--NN", dest="nn", action="store_true", help="nearest-neighbour insertion")
    p.add_argument("--fom_weighting", action="store_true", help="weight particles by rlnParticleFigureOfMerit")
    p.add_argument("--fsc", type=Path, default=None, help="STAR file with rlnSpectralIndex/rlnGoldStandardFsc: MAP term")
    p.add_argument("--device", default="cpu",
                   help="cpu, cpu:N (N simulated devices), gpu, gpu:ID[,ID...] or gpu:all (default: cpu)")
    p.add_argument("--precision", choices=("single", "double"), default=None,
                   help="arithmetic (default: double on the CPU, single on GPUs)")
    p.add_argument("--batch", type=int, default=None, help="particles per batch")
    p.add_argument("--storage", choices=("dense", "packed", "auto"), default=None,
                   help="sums-to-map arrays: dense (one device), packed (the sphere's columns, any number of "
                        "devices) or auto (the planner picks devices, storage and layout that fit; see omlrelion "
                        "autotune); default: dense on one device, packed on several")
    p.add_argument("--strided", action="store_true",
                   help="over several devices: strided plane chunks and column rows instead of blocks")
    p.add_argument("--kernel", choices=("relion", "compact"), default="relion",
                   help="gridding kernel: relion (RELION's tabulated blob, RELION's map; default) or compact (the "
                        "blob as a Fourier-space stencil: any FFT side or the direct convolution gives the same "
                        "map; packed storage)")
    p.add_argument("--half_maps", type=Path, nargs=2, default=None, metavar=("HALF1", "HALF2"),
                   help="report the FSC and resolution of these two half maps in the summary")
    p.add_argument("--json", type=Path, default=None, help="write a machine-readable summary here")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")


def _check_args(args: argparse.Namespace) -> None:
    """The options alone, before any file is read: one InputError naming the option."""
    if args.angpix != -1 and not (math.isfinite(args.angpix) and args.angpix > 0):
        raise InputError(f"--angpix {args.angpix:g}: expected a pixel size in A > 0 (or -1: the STAR file's)")
    if not (math.isfinite(args.pad) and args.pad >= 1):
        raise InputError(f"--pad {args.pad:g}: the padding factor must be a number >= 1")
    if not math.isfinite(args.maxres):
        raise InputError(f"--maxres {args.maxres:g}: expected a resolution in A (or -1: Nyquist)")
    if args.iter < 0:
        raise InputError(f"--iter {args.iter}: the number of gridding iterations must be >= 0")
    if args.batch is not None and args.batch < 1:
        raise InputError(f"--batch {args.batch}: the number of particles per batch must be >= 1")
    check_output(args.output, "map")
    if args.json is not None:
        check_output(args.json, "JSON summary")
    if args.half_maps:
        shapes = [map_shape(path) for path in args.half_maps]
        if shapes[0] != shapes[1]:
            raise InputError(f"{args.half_maps[1]}: shape {shapes[1]} differs from {args.half_maps[0]}'s "
                             f"{shapes[0]}; expected the two half maps of one refinement")


def main(args: argparse.Namespace) -> dict:
    _check_args(args)
    opts = ReconstructOptions(
        angpix=args.angpix if args.angpix > 0 else None,
        ctf=CtfMode(apply=args.ctf, intact_first_peak=args.ctf_intact_first_peak,
                    phase_flipped=args.ctf_phase_flipped, only_flip_phases=args.only_flip_phases),
        pad=args.pad, n_iter=args.iter, maxres=args.maxres if args.maxres > 0 else None, sym=args.sym,
        subset=args.subset if args.subset in (1, 2) else None, skip_gridding=args.skip_gridding, nn=args.nn,
        fom_weighting=args.fom_weighting, fsc_path=args.fsc, precision=args.precision, batch_size=args.batch,
        storage=args.storage, strided=args.strided, kernel=args.kernel)
    devices = parse_device(args.device)
    summary = reconstruct(args.input, args.output, opts, device=devices, json_path=args.json,
                          half_maps=args.half_maps, show_progress=not args.quiet, argv=sys.argv)
    if not args.quiet:
        t = summary["timings_s"]
        line = (f"omlrelion reconstruct: {summary['n_particles']} particles, box {summary['box_size']}, "
                f"{summary['angpix']:.4g} A/px -> {args.output} on {summary['device']['name']} in {t['total']:.2f} s "
                f"(read {t.get('read', 0):.2f}, back-project {t.get('backproject', 0):.2f}, "
                f"reconstruct {t.get('gridding', 0) + t.get('fft_to_map', 0):.2f})")
        if "fsc" in summary:
            line += f"; half-map resolution {summary['fsc']['resolution_0143_A']:.2f} A at FSC 0.143"
        print(line)
    return summary
