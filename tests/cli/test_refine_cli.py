"""omlrelion refine through its CLI: RELION-named outputs, continuation, bad input."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from omlrelion.cli.main import run
from omlrelion.io.mrc import read_map, write_map
from omlrelion.io.star import read_particles, read_star_table
from omlrelion.pipeline.phantom import phantom_volume


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refine")
    assert run(["simulate", "--map", "phantom", "--box", "32", "--angpix", "5", "--n", "120", "--snr", "2",
                "--shift_max", "1.5", "--o", str(folder / "particles"), "--quiet"]) == 0
    write_map(folder / "start.mrc", phantom_volume(32, 5.0, seed=0), 5.0)
    return folder


def _refine(folder, *extra):
    return run(["refine", "--i", str(folder / "particles.star"), "--ref", str(folder / "start.mrc"),
                "--o", str(folder / "out" / "run"), "--ini_high", "20", "--healpix_order", "1", "--max_healpix_order", "1",
                "--offset_range", "2", "--offset_step", "1", *extra])


def test_refine_writes_relion_names_and_continues(dataset, capsys):
    (dataset / "out").mkdir(exist_ok=True)
    assert _refine(dataset, "--iter", "2") == 0
    out = dataset / "out"
    for it in (1, 2):
        for h in (1, 2):
            volume, angpix = read_map(out / f"run_it{it:03d}_half{h}_class001.mrc")
            assert volume.shape == (32, 32, 32) and angpix == pytest.approx(5.0)
            model = read_star_table(out / f"run_it{it:03d}_half{h}_model.star", block="model_class_1",
                                    required=("rlnGoldStandardFsc", "rlnSsnrMap"))
            assert len(model) == 17
        data = read_particles(out / f"run_it{it:03d}_data.star")
        assert data.n_particles == 120 and set(np.unique(data.random_subset)) == {1, 2}
        assert np.all(np.isfinite(data.eulers_deg))
    for name in ("run_class001.mrc", "run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc",
                 "run_data.star", "run_model.star"):
        assert (out / name).is_file(), name
    assert "resolution" in capsys.readouterr().out
    noise = read_star_table(out / "run_it002_half1_model.star", block="model_optics_group_1",
                            required=("rlnSigma2Noise",))["rlnSigma2Noise"].to_numpy(float)
    assert len(noise) == 17 and np.all(noise > 0)
    classes = read_star_table(out / "run_it002_half1_model.star", block="model_classes")
    assert 0 < float(classes["rlnAccuracyRotations"].iloc[0]) <= 30
    assert 0 < float(classes["rlnAccuracyTranslationsAngst"].iloc[0]) <= 50
    general = read_star_table(out / "run_it002_sampling.star", block="sampling_general").iloc[0]
    assert int(general["rlnHealpixOrder"]) == 1 and general["rlnSymmetryGroup"] == "C1"
    assert float(general["rlnOffsetRange"]) == pytest.approx(10.0) and float(general["rlnOffsetStep"]) == pytest.approx(5.0)
    assert float(general["rlnPsiStep"]) == pytest.approx(30.0) and float(general["rlnSamplingPerturbFactor"]) == 0.5
    assert abs(float(general["rlnSamplingPerturbInstance"])) <= 0.5
    assert len(read_star_table(out / "run_it002_sampling.star", block="sampling_directions")) == 48
    # the learned direction prior of each half, one value per direction of the order-1 grid
    for h in (1, 2):
        pdf = read_star_table(out / f"run_it002_half{h}_model.star", block="model_pdf_orient_class_1",
                              required=("rlnOrientationDistribution",))["rlnOrientationDistribution"].to_numpy(float)
        assert len(pdf) == 48 and np.all(pdf >= 0) and pdf.sum() == pytest.approx(1.0, abs=1e-5)
    # continue after iteration 2: iteration 3 is written, with the same half sets
    assert _refine(dataset, "--iter", "1", "--continue", str(out / "run_it002_state.json")) == 0
    import json

    saved = json.loads((out / "run_it002_state.json").read_text())
    assert saved["iteration"] == 2 and saved["schedule"]["order"] >= 1
    assert saved["pdf_order"] == 1 and all(len(p) == 48 for p in saved["pdf_direction"])
    third = read_particles(out / "run_it003_data.star")
    assert json.loads((out / "run_it003_state.json").read_text())["schedule"]["order"] >= saved["schedule"]["order"]
    assert np.array_equal(third.random_subset, read_particles(out / "run_it002_data.star").random_subset)


@pytest.mark.skipif(shutil.which("relion_postprocess") is None, reason="needs RELION's relion_postprocess")
def test_relion_postprocess_reads_our_final_half_maps(dataset, tmp_path):
    """RELION's post-processing takes our unfiltered halves as it takes its own (it finds half 2 by name)."""
    out = tmp_path / "Refine3D"
    out.mkdir()
    assert run(["refine", "--i", str(dataset / "particles.star"), "--ref", str(dataset / "start.mrc"), "--o",
                str(out / "run"), "--ini_high", "20", "--healpix_order", "1", "--offset_range", "2",
                "--offset_step", "1", "--iter", "1"]) == 0
    post = tmp_path / "PostProcess"
    post.mkdir()
    from omlrelion.refine.autorefine import solvent_flatten

    write_map(tmp_path / "mask.mrc", solvent_flatten(np.ones((32, 32, 32)), 12.0).astype(np.float32), 5.0)
    done = subprocess.run(["relion_postprocess", "--i", str(out / "run_half1_class001_unfil.mrc"), "--o",
                           str(post / "postprocess"), "--angpix", "5", "--adhoc_bfac", "-100",
                           "--mask", str(tmp_path / "mask.mrc")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    fsc = read_star_table(post / "postprocess.star", block="fsc", required=("rlnFourierShellCorrelationUnmaskedMaps",))
    curve = fsc["rlnFourierShellCorrelationUnmaskedMaps"].to_numpy(float)
    ours = read_star_table(out / "run_model.star", block="model_class_1")["rlnGoldStandardFsc"].to_numpy(float)
    assert curve[1] > 0.9 and len(curve) == 17
    # RELION's FSC of our half maps falls where ours of the halves' sums does (within two shells at 0.5)
    assert abs(int(np.argmax(curve < 0.5)) - int(np.argmax(ours < 0.5))) <= 2


@pytest.mark.parametrize("change, message", [
    (("--iter", "0"), "--iter"),
    (("--continue", "missing_state.json"), "no such state file"),
])
def test_refine_bad_options_are_one_line(dataset, capsys, change, message):
    (dataset / "out").mkdir(exist_ok=True)
    assert _refine(dataset, *change) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_refine_refuses_a_map_of_another_size(dataset, capsys, tmp_path):
    write_map(tmp_path / "small.mrc", np.zeros((16, 16, 16), np.float32), 5.0)
    assert run(["refine", "--i", str(dataset / "particles.star"), "--ref", str(tmp_path / "small.mrc"),
                "--o", str(tmp_path / "run")]) == 1
    assert "16 px, the particles are 32 px" in capsys.readouterr().err
