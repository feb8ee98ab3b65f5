"""omlrelion autotune through its CLI, in-process: table, JSON, measurement and one-line errors."""

import json

import pytest

from omlrelion.cli.main import run
from omlrelion.reconstruct import autotune


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One calibration folder for the module: the CPU model is measured once."""
    return tmp_path_factory.mktemp("autotune-cache")


@pytest.fixture(autouse=True)
def _isolated(cache, monkeypatch):
    monkeypatch.setenv(autotune.CACHE_ENV, str(cache))
    autotune.clear_plan_cache()
    yield
    autotune.clear_plan_cache()


def test_prints_candidates_and_writes_json(tmp_path, cache, capsys):
    out = tmp_path / "plan.json"
    assert run(["autotune", "--box", "16", "--device", "cpu:2", "--allow-inexact", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "P 35 (5*7, largest prime 7), Q 32" in text
    assert "memory/device" in text and "dense f32" in text and "predicted s" in text and "measured s" in text
    assert "2 devices, packed, strided, fft 35" in text
    chosen = [line for line in text.splitlines() if line.startswith("*")]
    assert len(chosen) == 1 and text.rstrip().splitlines()[-1].startswith("chosen: ")
    summary = json.loads(out.read_text())
    assert summary["padded_size"] == 35 and summary["r_max"] == 8
    rows = summary["candidates"]
    assert len(rows) == len(autotune.enumerate_candidates(autotune.PaddedGrid(16, 2.0, 8), 2, allow_inexact=True))
    assert sum(row["chosen"] for row in rows) == 1 and rows[0]["chosen"]
    assert summary["chosen"] == rows[0]["plan"]
    assert all(row["measured_s"] is None and row["dense_float32_bytes"] > 0 for row in rows)
    assert list(cache.glob("autotune-cpu*.json"))


def test_measure_fills_the_measured_column(capsys):
    assert run(["autotune", "--box", "16", "--device", "cpu:2", "--measure", "2", "--iter", "2"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line[:2] in ("* ", "  ") and "fft" in line]
    measured = [line.split()[-1] for line in lines]
    assert sum(m != "-" for m in measured) == 2 and all(m == "-" for m in measured[2:])


def test_maxres_sets_r_max(capsys):
    assert run(["autotune", "--box", "32", "--maxres", "8", "--angpix", "1.0", "--iter", "0"]) == 0
    assert "r_max 4: P 19" in capsys.readouterr().out          # ceil(32 * 1.0 / 8) = 4, P = 2 (8 + 1) + 1


@pytest.mark.parametrize("argv, message", [
    (["--box", "16", "--free-gb", "0.000001"], "no reconstruction plan fits in memory for box 16"),
    (["--box", "16", "--maxres", "5"], "--maxres needs --angpix"),
    (["--box", "15"], "--box 15: the box size must be even"),
    (["--box", "16", "--device", "tpu"], "--device 'tpu'"),
])
def test_errors_are_one_line(argv, message, capsys):
    assert run(["autotune", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("omlrelion autotune: error: ") and message in err and err.count("\n") == 1


def test_refusal_names_needed_and_free_bytes(capsys):
    assert run(["autotune", "--box", "16", "--device", "cpu:3", "--free-gb", "0.000001"]) == 1
    err = capsys.readouterr().err
    assert "needs " in err and "bytes" in err and "1000 bytes (1e-06 GB) are free" in err
