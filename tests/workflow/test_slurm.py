"""config/test.yaml through `snakemake --profile slurm` on the local SLURM cluster
(tests/workflow/slurm_cluster.sh): every job goes through sbatch, GPU rules ask for a GPU and CPU
rules do not, and the outputs equal those of the local run bit for bit; a job that fails once is
submitted again (the profile's `retries`) and reported."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("snakemake", reason="pip install -e \".[workflow]\"")
pytest.importorskip("snakemake_executor_plugin_slurm", reason="pip install -e \".[workflow]\"")

from omlrelion.io import h5
from omlrelion.io.mrc import read_map
from omlrelion.io.star import read_particles
from omlrelion.pipeline.logs import FAULT_ENV

from .conftest import (REPO, SLURM_DIR, TEST_CONFIG, assert_same_outputs, job_counts, run_outputs, slurm_env,
                       snakemake)

GPU_RULES = {"expectation", "reconstruct_half", "reconstruct_unfil", "reconstruct_joined"}
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")


@pytest.mark.slurm
def test_profile_slurm_resolves_from_the_repository_root(tmp_path):
    proc = snakemake(REPO, "--profile", "slurm", "-n", "--directory", str(tmp_path), "--configfile",
                     str(TEST_CONFIG), env=slurm_env())
    assert job_counts(proc.stdout)["expectation"] == 8


@pytest.mark.slow  # about 3 minutes: ~12 s of SLURM scheduling and polling per level of the job chain
@pytest.mark.slurm
def test_workflow_through_slurm_equals_local_run(tiny_run, tmp_path):
    env = slurm_env()
    proc = snakemake(tmp_path, "--profile", str(REPO / "slurm"), "--configfile", str(TEST_CONFIG),
                     "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "1",
                     "--slurm-keep-successful-logs", env=env, timeout=900)
    out = proc.stdout + proc.stderr
    submitted = {int(j): Path(log).parts[-3].removeprefix("rule_") for j, log in SUBMITTED.findall(out)}
    expected = job_counts(out)
    assert len(submitted) == expected["total"] - 1  # every job but the target rule `all` went to sbatch
    controller = (SLURM_DIR / "log" / "slurmctld.log").read_text()
    for job, rule in submitted.items():
        assert f"_slurm_rpc_submit_batch_job: JobId={job} " in controller
        assert f"_job_complete: JobId={job} WEXITSTATUS 0" in controller
        info = subprocess.run(["scontrol", "show", "job", str(job)], env=env, capture_output=True, text=True).stdout
        assert "JobState=COMPLETED" in info, info
        assert ("TresPerJob=gres:gpu:1" in info) == (rule in GPU_RULES), (rule, info)
    local, remote = tiny_run[0] / "results", tmp_path / "results"
    files = sorted(local.rglob("*.mrc"))
    assert len(files) == 8  # phantom, 2 half maps of it001, 3 final maps, 2 postprocess maps
    for path in files:
        a, _ = read_map(path)
        b, _ = read_map(remote / path.relative_to(local))
        assert np.array_equal(a, b), path
    for path in sorted(local.rglob("sums_*.h5")):
        d1, w1, _ = h5.read_sums(path)
        d2, w2, _ = h5.read_sums(remote / path.relative_to(local))
        assert np.array_equal(d1, d2) and np.array_equal(w1, w2), path
    p1 = read_particles(local / "tiny/default/final/run_data.star")
    p2 = read_particles(remote / "tiny/default/final/run_data.star")
    assert np.array_equal(p1.eulers_deg, p2.eulers_deg) and np.array_equal(p1.shifts_px, p2.shifts_px)


@pytest.mark.slow  # about 3 minutes, as the run above
@pytest.mark.slurm
def test_failed_slurm_job_is_retried_and_reported(tiny_run, tmp_path):
    """One expectation job fails on its first attempt (OMLRELION_FAULT=fail_once, which sbatch
    exports to the job): the slurm profile's `retries` submits it again, the run completes, the
    failed attempt is reported (Snakemake's "Trying to restart job" and the workflow's closing
    "retried" line), and every output equals the local run's."""
    job_log = "results/tiny/default/logs/it001/expectation_half2_shard1.log"
    env = {**slurm_env(), FAULT_ENV: "fail_once:*/it001/expectation_half2_shard1.log"}
    proc = snakemake(tmp_path, "--profile", str(REPO / "slurm"), "--configfile", str(TEST_CONFIG),
                     "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "1",
                     env=env, timeout=900)
    out = proc.stdout + proc.stderr
    assert (tmp_path / f"{job_log}.fault").is_file()  # the first attempt ran and failed on purpose
    submitted = [(int(j), Path(log).parts[-3].removeprefix("rule_")) for j, log in SUBMITTED.findall(out)]
    assert len(submitted) == job_counts(out)["total"]  # every job but `all`, and the failed one twice
    controller = (SLURM_DIR / "log" / "slurmctld.log").read_text()
    failed = [(job, rule) for job, rule in submitted if f"_job_complete: JobId={job} WEXITSTATUS 0" not in controller]
    assert [rule for _, rule in failed] == ["expectation"], failed
    assert f"_job_complete: JobId={failed[0][0]} WEXITSTATUS 0" not in controller
    assert "Trying to restart job" in out
    report = [line for line in out.splitlines() if "omlrelion:" in line or "restart" in line or "Error in rule" in line]
    line = re.search(r"omlrelion: (\d+) failed job attempt\(s\) retried: (.*)", out)
    assert line, report
    assert int(line[1]) == out.count("Trying to restart job"), report   # one entry per restart
    assert f"expectation ({job_log}" in line[2], report
    assert_same_outputs(run_outputs(tiny_run[0]), run_outputs(tmp_path))
