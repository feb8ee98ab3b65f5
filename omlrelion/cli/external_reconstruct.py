"""omlrelion as RELION's external reconstruction program (relion_refine --external_reconstruct).

  export RELION_EXTERNAL_RECONSTRUCT_EXECUTABLE="omlrelion_external_reconstruct --device gpu"
  relion_refine ... --external_reconstruct

RELION runs the program with one argument, the STAR file describing the sums to reconstruct, and
reads back the map it names. Options given in the variable come before that argument.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omlrelion.backend import parse_device
from omlrelion.cli.main import OneLineParser
from omlrelion.errors import InputError
from omlrelion.pipeline.external import external_reconstruct


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="omlrelion_external_reconstruct", description=__doc__.splitlines()[0],
                      epilog="\n".join(__doc__.splitlines()[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("star", type=Path, help="the *_external_reconstruct.star file written by relion_refine")
    p.add_argument("--device", default="cpu", help="cpu, gpu or gpu:ID (default: cpu)")
    p.add_argument("--iter", type=int, default=10, help="gridding iterations (default: 10)")
    p.add_argument("--skip_gridding", action="store_true", help="divide by the weights instead of gridding")
    p.add_argument("--no_map", action="store_true", help="leave out the MAP (tau^2) term")
    p.add_argument("--precision", choices=("single", "double"), default=None)
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return p


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        device = parse_device(args.device)[0]
        if args.iter < 0:
            raise InputError(f"--iter {args.iter}: the number of gridding iterations must be >= 0")
        external_reconstruct(args.star, device=device, n_iter=args.iter,
                             skip_gridding=args.skip_gridding, use_map=not args.no_map, precision=args.precision)
    except (ValueError, OSError) as exc:
        if args.debug:
            raise
        print(f"omlrelion_external_reconstruct: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
