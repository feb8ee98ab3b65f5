import sys

from omlrelion.cli.main import run

sys.exit(run())
