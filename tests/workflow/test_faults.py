"""Reliability of the workflow on config/test.yaml: a run killed (SIGKILL) during expectation, merge
or reconstruction resumes with the README's plain command to outputs identical to an uninterrupted
run's; two runs give byte-identical outputs; a corrupt HDF5 intermediate is detected by its
checksum and recomputed. Faults are injected through OMLRELION_FAULT (omlrelion/pipeline/logs.py).
The uninterrupted reference is the session's `tiny_run`."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("snakemake", reason="pip install -e \".[workflow]\"")
pytest.importorskip("matplotlib", reason="pip install -e \".[workflow]\"")

from omlrelion.io import h5
from omlrelion.pipeline import workflow as wf
from omlrelion.pipeline.logs import FAULT_ENV

from .conftest import (
    SNAKEFILE,
    TEST_CONFIG,
    assert_same_outputs,
    flip_byte_in_chunk,
    job_counts,
    run_outputs,
    snakemake,
)

RUN = Path("results/tiny/default")
# one job per rule kind; the job pauses once its outputs are written, before Snakemake hears of it
KILL_AT = {"expectation": "*/it001/expectation_half1_shard1.log", "merge": "*/it002/merge_half1.log",
           "reconstruct_half": "*/it001/reconstruct_half2.log"}


@pytest.fixture(scope="module")
def reference(tiny_run):
    return run_outputs(tiny_run[0])


def _paused_log(folder: Path, pattern: str, proc: subprocess.Popen, timeout: float = 300) -> Path:
    """Wait until the job whose log matches `pattern` says it paused; its log path (relative)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for log in (folder / "results").rglob("*.log") if (folder / "results").is_dir() else ():
            rel = log.relative_to(folder)
            if fnmatch.fnmatch(str(rel), pattern) and "fault injection: paused" in log.read_text():
                return rel
        assert proc.poll() is None, f"snakemake ended ({proc.returncode}) before the job paused"
        time.sleep(0.2)
    raise AssertionError(f"no job matching {pattern} paused within {timeout} s")


@pytest.mark.parametrize("rule", list(KILL_AT))
def test_killed_run_resumes_to_identical_outputs(reference, tmp_path, rule):
    """SIGKILL to Snakemake and all its jobs while a `rule` job runs (outputs written, the job not
    finished), then the plain `snakemake --cores 2 --configfile ...` again: it removes the stale
    locks, reruns the incomplete job (rerun-incomplete, set by the workflow profile) and the rest,
    and every output equals the uninterrupted run's."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--cores", "2", "--configfile", str(TEST_CONFIG)]
    env = {**os.environ, FAULT_ENV: f"pause:{KILL_AT[rule]}"}
    with open(tmp_path / "killed_run.txt", "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        job_log = _paused_log(tmp_path, KILL_AT[rule], proc)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)
    assert any((tmp_path / ".snakemake/incomplete").iterdir())  # Snakemake knew the job was running
    assert any((tmp_path / ".snakemake/locks").iterdir())       # and the kill left its locks
    assert not (tmp_path / RUN / "summary.json").exists()

    rerun = snakemake(tmp_path, "--cores", "2", "--configfile", str(TEST_CONFIG))
    out = rerun.stdout + rerun.stderr
    assert "omlrelion: removed the locks that an interrupted Snakemake left" in out
    assert job_counts(out).get(rule, 0) >= 1 and f"log: {job_log}" in out  # the killed job ran again
    assert not list((tmp_path / "results").rglob(".*.tmp"))
    assert_same_outputs(reference, run_outputs(tmp_path))
    again = snakemake(tmp_path, "--cores", "2", "--configfile", str(TEST_CONFIG))
    assert "Nothing to be done" in again.stdout + again.stderr


def test_same_config_and_seed_give_identical_outputs(reference, tmp_path):
    """A second run in another folder, with one core (another job order), gives byte-identical maps,
    STAR files, HDF5 stores, model.json files and plots; only the logs, the benchmark files and the
    summaries' cpu_wall_s and peak_rss_mb (times and memory of the machine) differ."""
    snakemake(tmp_path, "--cores", "1", "--configfile", str(TEST_CONFIG))
    assert_same_outputs(reference, run_outputs(tmp_path))


def test_corrupt_intermediate_is_recomputed(tiny_run, reference, tmp_path):
    """One flipped byte inside a compressed chunk of a merged sums file, its mtime put back (so that
    Snakemake alone would trust it): the next start names it with its checksum failure and marks it
    incomplete, the run recomputes it and everything after it (and nothing before), and the
    outputs equal the uncorrupted run's."""
    work = tmp_path / "copy"
    shutil.copytree(tiny_run[0], work, symlinks=True)
    target = RUN / "it002/sums_half1.h5"
    stat = (work / target).stat()
    flip_byte_in_chunk(work / target, "weight")
    os.utime(work / target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert "checksum" in h5.verify_file(work / target)

    proc = snakemake(work, "--cores", "2", "--configfile", str(TEST_CONFIG))
    out = proc.stdout + proc.stderr
    lines = [line for line in out.splitlines() if "checksum" in line]
    assert len(lines) == 1 and f"{target} failed verification: checksum mismatch" in lines[0], lines
    assert "marked incomplete" in lines[0]
    counts = job_counts(out)
    assert counts["merge"] == 1 and "expectation" not in counts and counts["reconstruct_unfil"] == 2, counts
    assert h5.verify_file(work / target) is None
    assert_same_outputs(reference, run_outputs(work))
    again = snakemake(work, "--cores", "2", "--configfile", str(TEST_CONFIG))
    assert "Nothing to be done" in again.stdout + again.stderr and "checksum" not in again.stdout + again.stderr


# ---------------------------------------------------------------- the pieces, without Snakemake
def test_verify_stores_finds_corrupt_files_and_skips_unchanged_ones(tmp_path, monkeypatch):
    import numpy as np

    good, flipped, truncated = (tmp_path / f"{n}.h5" for n in ("good", "flipped", "truncated"))
    for path in (good, flipped, truncated):
        h5.write_volume(path, np.arange(4096, dtype=np.float32).reshape(16, 16, 16),
                        attrs={"box_size": 16, "angpix": 1.0}, compression=h5.Compression())
    cache = tmp_path / "state/verified.json"
    assert wf.verify_stores([good, flipped, truncated], cache) == {}
    stat = flipped.stat()
    flip_byte_in_chunk(flipped, "volume")
    os.utime(flipped, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: the ctime differs
    truncated.write_bytes(truncated.read_bytes()[:1000])
    read = []
    monkeypatch.setattr(h5, "verify_file", lambda p, real=h5.verify_file: read.append(Path(p).name) or real(p))
    corrupt = wf.verify_stores([good, flipped, truncated], cache)
    assert read == ["flipped.h5", "truncated.h5"]  # the unchanged file is not read again
    assert sorted(corrupt) == [str(flipped), str(truncated)]
    assert corrupt[str(flipped)].startswith("checksum mismatch in dataset /volume")
    assert corrupt[str(truncated)].startswith("unreadable HDF5 file (")
    assert set(json.loads(cache.read_text())) == {str(good)}
    assert wf.verify_stores([good, flipped], cache) == {str(flipped): corrupt[str(flipped)]}  # until rebuilt


def test_mark_incomplete_writes_snakemakes_record(tmp_path):
    import base64

    wf.mark_incomplete("results/a/it002/sums_half1.h5", tmp_path)
    name = base64.urlsafe_b64encode(b"results/a/it002/sums_half1.h5").decode()
    assert json.loads((tmp_path / "incomplete" / name).read_text()) == {"external_jobid": None}


def test_stale_locks_are_released_only_when_no_run_is_alive(tmp_path):
    state = tmp_path / ".snakemake"
    (state / "locks").mkdir(parents=True)
    (state / "locks/0.input.lock").write_text("x")
    (tmp_path / "results/a").mkdir(parents=True)
    (tmp_path / "results/a/.sums.h5.0123456789ab.tmp").write_text("partial")
    runs = state / "omlrelion/runs"
    runs.mkdir(parents=True)
    host = os.uname().nodename
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (runs / "dead.json").write_text(json.dumps({"host": host, "pid": int(dead.stdout), "start": "1"}))
    (runs / "parent.json").write_text(json.dumps({"host": host, "pid": os.getppid(),
                                                  "start": wf._process_start(os.getppid())}))
    assert wf.claim_folder(state) is False  # the parent process is alive: another run may hold the locks
    assert not (runs / "dead.json").exists() and (runs / f"{host}-{os.getpid()}.json").is_file()
    (runs / "parent.json").unlink()
    assert wf.claim_folder(state) is True   # only this process's own record is left
    lines = wf.release_stale_locks(state, tmp_path / "results")
    assert len(lines) == 2 and not list((state / "locks").iterdir())
    assert not list((tmp_path / "results").rglob("*.tmp"))


def test_retried_jobs_are_read_from_the_snakemake_log():
    """Each "Trying to restart job N." is matched to job N's error block, before or after it."""
    log = """Error in rule merge:
    message: None
    jobid: 4
    log: results/tiny/default/logs/it001/merge_half1.log (check log file(s) for error details)
[Sun Nov 29 05:34:43 2026]
Finished jobid: 5 (Rule: expectation)
Trying to restart job 4.
Trying to restart job 7.
[Sun Nov 29 05:34:44 2026]
Error in rule expectation:
    jobid: 7
    output: results/tiny/default/it001/sums_half2_shard1.h5
Error in rule postprocess:
    jobid: 9
    log: results/tiny/default/logs/postprocess.log (check log file(s) for error details)
Trying to restart job 12.
"""
    assert wf.retried_jobs(log) == ["merge (results/tiny/default/logs/it001/merge_half1.log)", "expectation",
                                    "job 12"]
