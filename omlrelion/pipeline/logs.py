"""Logging set-up and the one progress wrapper; called by entry points only, never at import."""

from __future__ import annotations

import logging

from tqdm import tqdm


def setup_logging(log_path=None, level=logging.INFO) -> None:
    """Log to `log_path` (a Snakemake rule's log) or to stderr."""
    handler = logging.FileHandler(log_path) if log_path else logging.StreamHandler()
    logging.basicConfig(level=level, handlers=[handler], force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def progress(total: int, desc: str, enabled: bool = True):
    """A tqdm bar that stays out of log files and batch jobs (off without a TTY)."""
    return tqdm(total=total, desc=desc, disable=None if enabled else True, mininterval=1.0,
                unit="ptcl", leave=False)
