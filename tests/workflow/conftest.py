"""Helpers of the workflow tests: run Snakemake in a scratch folder, parse what it planned or ran.

The `slurm` marker: tests that submit to a real SLURM cluster on localhost
(tests/workflow/slurm_cluster.sh); skipped when the SLURM client is absent or no cluster answers.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SNAKEFILE = REPO / "workflow" / "Snakefile"
TEST_CONFIG = REPO / "config" / "test.yaml"
SLURM_DIR = Path(os.environ.get("OMLRELION_SLURM_DIR", "/tmp/omlrelion-slurm"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: submits jobs to the local SLURM cluster (tests/workflow/slurm_cluster.sh)")


def slurm_env() -> dict | None:
    """Environment for the SLURM clients of the cluster started by slurm_cluster.sh, or None."""
    conf = SLURM_DIR / "slurm.conf"
    if shutil.which("sinfo") is None or not conf.is_file():
        return None
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": f"{SLURM_DIR / 'bin'}:{os.environ['PATH']}"}
    try:
        state = subprocess.run(["sinfo", "-h", "-n", "localhost", "-o", "%T"], env=env, capture_output=True,
                               text=True, timeout=15).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return env if state in ("idle", "mixed", "allocated") else None


def pytest_collection_modifyitems(config, items):
    slurm = None
    for item in items:
        if "slurm" in item.keywords:
            if slurm is None:
                slurm = slurm_env() or False
            if not slurm:
                item.add_marker(pytest.mark.skip(reason="no SLURM cluster up (start tests/workflow/slurm_cluster.sh)"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """config/test.yaml run locally with --cores 2: (folder, CompletedProcess)."""
    folder = tmp_path_factory.mktemp("tiny")
    return folder, snakemake(folder, "--cores", "2", "--configfile", str(TEST_CONFIG))


def snakemake(cwd: Path, *args: str, timeout: int = 600, env: dict | None = None, check: bool = True):
    """Run `python -m snakemake -s workflow/Snakefile ARGS` in `cwd`; returns the CompletedProcess."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a Snakemake run or dry run: rule -> number of jobs."""
    if "Job stats" not in output:
        return {}
    table = output.split("Job stats:", 1)[1]
    counts = {}
    for line in table.splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not m:
            break
        counts[m.group(1)] = int(m.group(2))
    return counts


def planned_outputs(output: str) -> list[str]:
    """Every `output:` file listed by a dry run."""
    files = []
    for line in output.splitlines():
        if line.strip().startswith("output:"):
            files += [f.strip() for f in line.split(":", 1)[1].split(",")]
    return files
