"""Helpers of the workflow tests: run Snakemake in a scratch folder, parse what it planned or ran.

The `slurm` marker: tests that submit to a real SLURM cluster on localhost
(tests/workflow/slurm_cluster.sh); skipped when the SLURM client is absent or no cluster answers.
"""

from __future__ import annotations

import json
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


# ---------------------------------------------------------------- comparing runs
# What legitimately differs between two runs of one config: the job logs and Snakemake's
# benchmark files (times, memory) and, in the summaries, the sums of the jobs' wall times and the
# peak memory. Everything else under results/ (maps, STAR files, HDF5 stores, model.json, plots)
# must be byte-identical.
VOLATILE = ("cpu_wall_s", "peak_rss_mb")


def _table_without(text: str, sep: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip().strip("|").split(sep)] for line in text.splitlines() if line.strip()]
    drop = {i for i, name in enumerate(rows[0]) if name in VOLATILE}
    return [[c for i, c in enumerate(row) if i not in drop] for row in rows]


def run_outputs(folder: Path) -> dict[str, object]:
    """Every file under folder/results but logs/ and benchmarks/: relative path -> its bytes
    (summary.json, summary.tsv, summary.md: their contents without the VOLATILE entries)."""
    out: dict[str, object] = {}
    for path in sorted((folder / "results").rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or {"logs", "benchmarks"} & set(rel.parts):
            continue
        if path.name == "summary.json":
            out[str(rel)] = {k: v for k, v in json.loads(path.read_text()).items() if k not in VOLATILE}
        elif path.name in ("summary.tsv", "summary.md"):
            out[str(rel)] = _table_without(path.read_text(), "\t" if path.suffix == ".tsv" else "|")
        else:
            out[str(rel)] = path.read_bytes()
    return out


FINAL_OUTPUTS = ("final/run_class001.mrc", "final/run_half1_class001_unfil.mrc", "final/run_half2_class001_unfil.mrc",
                 "final/run_data.star", "final/run_model.star", "postprocess/postprocess.star",
                 "postprocess/postprocess.mrc", "it002/sums_half1.h5", "it002/sums_half2_shard1.h5",
                 "it002/poses_half1_shard2.h5", "it001/half1.h5", "summary.json")


def flip_byte_in_chunk(path, dataset: str) -> None:
    """Flip one bit in the middle of the first stored (compressed) chunk of `dataset`."""
    import h5py

    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(0)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset + info.size // 2)
        byte = f.read(1)
        f.seek(info.byte_offset + info.size // 2)
        f.write(bytes([byte[0] ^ 0x10]))


def assert_same_outputs(reference: dict, other: dict) -> None:
    """The two runs' outputs (run_outputs) are the same files with the same contents."""
    assert sorted(other) == sorted(reference), set(other) ^ set(reference)
    for name in FINAL_OUTPUTS:
        assert f"results/tiny/default/{name}" in reference, name
    differ = [name for name in reference if reference[name] != other[name]]
    assert not differ, f"differ from the reference run: {differ}"
