"""Logging set-up and the one progress wrapper; called by entry points only, never at import.

`setup_logging` also holds the workflow's one fault-injection hook, for the reliability tests
(tests/workflow/test_faults.py, test_slurm.py) and never set in production: the environment
variable OMLRELION_FAULT="ACTION:PATTERN", where PATTERN is an fnmatch pattern of the job's log
path (e.g. "*/it001/merge_half1.log") and ACTION is
  pause      the job logs "fault injection: paused" once its script has finished (outputs
             written, Snakemake not yet told) and waits until it is killed (or its parent dies);
  fail_once  the job's first attempt logs "fault injection: failing attempt" and exits with
             status 3, leaving the marker file <log>.fault; every later attempt runs normally.
"""

from __future__ import annotations

import atexit
import fnmatch
import logging
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

FAULT_ENV = "OMLRELION_FAULT"


def setup_logging(log_path=None, level=logging.INFO) -> None:
    """Log to `log_path` (a Snakemake rule's log) or to stderr."""
    handler = logging.FileHandler(log_path) if log_path else logging.StreamHandler()
    logging.basicConfig(level=level, handlers=[handler], force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if log_path and os.environ.get(FAULT_ENV):
        _inject_fault(str(log_path), os.environ[FAULT_ENV])


def _inject_fault(log_path: str, spec: str) -> None:
    action, _, pattern = spec.partition(":")
    if not fnmatch.fnmatch(log_path, pattern):
        return
    log = logging.getLogger(__name__)
    if action == "fail_once":
        marker = Path(log_path + ".fault")
        if not marker.exists():
            marker.touch()
            log.error("fault injection: failing attempt (%s=%s)", FAULT_ENV, spec)
            sys.exit(3)
    elif action == "pause":
        parent = os.getppid()

        def pause() -> None:
            log.warning("fault injection: paused (%s=%s)", FAULT_ENV, spec)
            while os.getppid() == parent:  # until killed, or orphaned by the workflow's death
                time.sleep(0.2)
            os._exit(1)

        atexit.register(pause)
    else:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected pause:PATTERN or fail_once:PATTERN")


def progress(total: int, desc: str, enabled: bool = True):
    """A tqdm bar that stays out of log files and batch jobs (off without a TTY)."""
    return tqdm(total=total, desc=desc, disable=None if enabled else True, mininterval=1.0,
                unit="ptcl", leave=False)
