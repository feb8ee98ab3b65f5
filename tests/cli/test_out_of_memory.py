"""A device running out of memory during `omlrelion reconstruct`: the step falls back to a plan that
fits, or stops with one line and writes nothing.

Running out is simulated by making the dense sums-to-map step (or every step) raise an error named
as CuPy's, `cupy.cuda.memory.OutOfMemoryError`, which is what omlrelion recognises; on a GPU it
happens for real under a CuPy memory-pool limit (the test marked gpu).
"""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest

import omlrelion.pipeline.steps as steps
import omlrelion.reconstruct.columns as columns
import omlrelion.reconstruct.gridding as gridding
import omlrelion.reconstruct.autotune as autotune
from omlrelion.cli.main import run
from omlrelion.reconstruct.plan import is_out_of_memory


class OutOfMemoryError(MemoryError):
    """Stands in for cupy.cuda.memory.OutOfMemoryError (a MemoryError subclass of that name)."""


@pytest.fixture
def particles(tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "autotune-cache"))
    autotune.clear_plan_cache()
    assert run(["simulate", "--map", "phantom", "--box", "24", "--n", "60", "--o", str(tmp_path / "sim"),
                "--snr", "1", "--seed", "5", "--quiet"]) == 0
    return tmp_path / "sim.star"


def _dense_runs_out(monkeypatch):
    calls = []

    def dense(*args, **kwargs):
        calls.append("dense")
        raise OutOfMemoryError("Out of memory allocating 1,234 bytes (allocated so far: 5,678 bytes).")

    monkeypatch.setattr(gridding, "reconstruct_map", dense)
    return calls


def test_falls_back_to_a_plan_that_fits_and_gives_the_same_map(particles, tmp_path, monkeypatch, caplog):
    out = tmp_path / "maps"
    out.mkdir()
    assert run(["reconstruct", "--i", str(particles), "--o", str(out / "ref.mrc"), "--quiet"]) == 0
    calls = _dense_runs_out(monkeypatch)
    assert run(["reconstruct", "--i", str(particles), "--o", str(out / "fallback.mrc"), "--quiet",
                "--json", str(out / "fallback.json")]) == 0
    assert calls == ["dense"]
    summary = json.loads((out / "fallback.json").read_text())
    assert summary["plans_out_of_memory"] == ["1 device, dense, fft 51"]
    assert summary["plan"]["storage"] == "packed"
    assert "ran out of memory" in caplog.text and "falling back to" in caplog.text
    ref = mrcfile.read(out / "ref.mrc").astype(np.float64)
    fallback = mrcfile.read(out / "fallback.mrc").astype(np.float64)
    assert np.linalg.norm(fallback - ref) / np.linalg.norm(ref) < 1e-6


def test_stops_with_one_line_when_no_plan_is_left(particles, tmp_path, monkeypatch, capsys):
    out = tmp_path / "maps"
    out.mkdir()
    _dense_runs_out(monkeypatch)

    def packed(*args, **kwargs):
        raise OutOfMemoryError("Out of memory allocating 999 bytes")

    monkeypatch.setattr(columns, "reconstruct_packed", packed)
    assert run(["reconstruct", "--i", str(particles), "--o", str(out / "m.mrc"), "--json", str(out / "m.json"),
                "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "ran out of memory" in err[0] and "no reconstruction plan fits" in err[0] and "--maxres" in err[0]
    assert list(out.iterdir()) == []


def test_other_errors_are_not_taken_for_memory(particles, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("a bug, not memory")

    monkeypatch.setattr(gridding, "reconstruct_map", broken)
    with pytest.raises(ValueError, match="a bug"):
        steps.reconstruct(particles, tmp_path / "m.mrc", steps.ReconstructOptions(), show_progress=False)
    assert not (tmp_path / "m.mrc").exists()


def test_recognised_errors():
    class CuFFTError(RuntimeError):
        pass

    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(OutOfMemoryError("x"))
    assert is_out_of_memory(CuFFTError("CUFFT_ALLOC_FAILED"))
    assert not is_out_of_memory(CuFFTError("CUFFT_INVALID_PLAN"))
    assert not is_out_of_memory(RuntimeError("out of memory?"))


@pytest.mark.gpu
def test_gpu_running_out_of_memory_stops_with_one_line(tmp_path, capsys):
    """A real out-of-memory on the GPU: the CuPy pool is capped at 16 MiB, below what any plan needs at
    box 64 (the dense sums alone are 18 MB); the command stops with one line and writes nothing."""
    import cupy as cp

    assert run(["simulate", "--map", "phantom", "--box", "64", "--n", "20", "--o", str(tmp_path / "sim"),
                "--snr", "1", "--seed", "5", "--quiet"]) == 0
    out = tmp_path / "maps"
    out.mkdir()
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    pool.set_limit(size=16 * 1024**2)
    try:
        code = run(["reconstruct", "--i", str(tmp_path / "sim.star"), "--o", str(out / "gpu.mrc"), "--quiet",
                    "--device", "gpu", "--storage", "dense", "--precision", "double", "--json", str(out / "gpu.json")])
    finally:
        pool.set_limit(size=0)
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "OutOfMemoryError" in err[0] and "no reconstruction plan fits" in err[0]
    assert list(out.iterdir()) == []
