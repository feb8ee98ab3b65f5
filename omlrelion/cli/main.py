"""`omlrelion <command>`: the explicit list of commands; errors as one line, exit status 1."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

import omlrelion

COMMANDS = {
    "reconstruct": "omlrelion.cli.reconstruct",
    "autotune": "omlrelion.cli.autotune",
    "simulate": "omlrelion.cli.simulate",
    "refine": "omlrelion.cli.refine",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors as one line, like every other error (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help for the expected options\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="omlrelion", description=omlrelion.__doc__)
    parser.add_argument("--version", action="version", version=f"omlrelion {omlrelion.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip()
        first, _, rest = doc.partition("\n")
        p = sub.add_parser(name, help=first, description=first, epilog=rest.strip() or None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
        module.add_args(p)
        p.set_defaults(_main=module.main)
    return parser


def run(argv: list[str] | None = None) -> int:
    """Entry point of the `omlrelion` script."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args._main(args)
    except (ValueError, OSError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"omlrelion {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"omlrelion {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(run())
