"""omlrelion reconstruct through its CLI, in-process: outputs, summary, and bad input."""

import json
import shutil

import mrcfile
import numpy as np
import pytest

from omlrelion.cli.main import run


@pytest.fixture
def small_set(relion_sim64, tmp_path):
    """The first 300 RELION-simulated particles in a writable folder (stack linked, not copied)."""
    lines = (relion_sim64 / "particles.star").read_text().splitlines()
    last_header = max(i for i, line in enumerate(lines) if line.startswith("_rln"))
    (tmp_path / "particles.star").write_text("\n".join(lines[:last_header + 301]) + "\n")
    (tmp_path / "particles.mrcs").symlink_to(relion_sim64 / "particles.mrcs")
    return tmp_path


def _outputs(folder):
    return sorted(p.name for p in folder.iterdir() if p.name not in ("particles.star", "particles.mrcs"))


def test_reconstruct_writes_map_and_summary(small_set, capsys):
    out = small_set / "map.mrc"
    assert run(["reconstruct", "--i", str(small_set / "particles.star"), "--o", str(out), "--ctf",
                "--json", str(small_set / "map.json"), "--quiet"]) == 0
    with mrcfile.open(out) as m:
        assert m.data.shape == (64, 64, 64) and m.data.dtype == np.float32
        assert float(m.voxel_size.x) == pytest.approx(5.078125)
    summary = json.loads((small_set / "map.json").read_text())
    assert summary["n_particles"] == 300 and summary["padded_size"] == 131
    assert set(summary["timings_s"]) >= {"read", "backproject", "gridding", "fft_to_map", "total"}
    assert summary["peak_memory"][0]


def test_subset_and_half_map_resolution(small_set, capsys):
    star = str(small_set / "particles.star")
    for half in (1, 2):
        assert run(["reconstruct", "--i", star, "--o", str(small_set / f"h{half}.mrc"), "--ctf",
                    "--subset", str(half), "--quiet", "--json", str(small_set / f"h{half}.json")]) == 0
        assert json.loads((small_set / f"h{half}.json").read_text())["n_particles"] == 150
    assert run(["reconstruct", "--i", star, "--o", str(small_set / "m.mrc"), "--ctf", "--half_maps",
                str(small_set / "h1.mrc"), str(small_set / "h2.mrc")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "half-map resolution" in line and " A at FSC 0.143" in line


def _expect_error(capsys, folder, argv, *fragments):
    before = _outputs(folder)
    assert run(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    assert _outputs(folder) == before      # nothing written, no temporary files left


def test_missing_star(tmp_path, capsys):
    _expect_error(capsys, tmp_path, ["reconstruct", "--i", str(tmp_path / "nope.star"), "--o", str(tmp_path / "m.mrc")],
                  "nope.star")


def test_missing_label(small_set, capsys):
    text = (small_set / "particles.star").read_text().replace("_rlnAngleTilt", "_rlnAngleTlt")
    (small_set / "particles.star").write_text(text)
    _expect_error(capsys, small_set, ["reconstruct", "--i", str(small_set / "particles.star"),
                                      "--o", str(small_set / "m.mrc")], "rlnAngleTilt")


def test_truncated_stack(small_set, capsys):
    raw = (small_set / "particles.mrcs").read_bytes()
    (small_set / "particles.mrcs").unlink()
    (small_set / "particles.mrcs").write_bytes(raw[: len(raw) // 3])
    _expect_error(capsys, small_set, ["reconstruct", "--i", str(small_set / "particles.star"),
                                      "--o", str(small_set / "m.mrc")], "particles.mrcs")


def test_nan_pixels(small_set, capsys):
    source = (small_set / "particles.mrcs").resolve()
    (small_set / "particles.mrcs").unlink()
    shutil.copy(source, small_set / "particles.mrcs")
    with mrcfile.mmap(small_set / "particles.mrcs", mode="r+") as m:
        m.data[5, 10, 10] = np.nan
    _expect_error(capsys, small_set, ["reconstruct", "--i", str(small_set / "particles.star"),
                                      "--o", str(small_set / "m.mrc")], "particles.mrcs")


def test_unwritable_output(small_set, capsys):
    _expect_error(capsys, small_set, ["reconstruct", "--i", str(small_set / "particles.star"),
                                      "--o", str(small_set / "no" / "such" / "m.mrc")], "m.mrc")


@pytest.mark.parametrize("argv,fragment", [
    (["--pad", "0.5"], "--pad"),
    (["--device", "gpu:7"], "--device"),
    (["--sym", "X9"], "X9"),
    (["--subset", "1"], "rlnRandomSubset"),
])
def test_bad_options(small_set, capsys, argv, fragment):
    import starfile

    blocks = starfile.read(small_set / "particles.star", always_dict=True)
    blocks["particles"] = blocks["particles"].drop(columns=["rlnRandomSubset"])
    starfile.write(blocks, small_set / "particles.star", overwrite=True)
    _expect_error(capsys, small_set, ["reconstruct", "--i", str(small_set / "particles.star"),
                                      "--o", str(small_set / "m.mrc"), *argv], fragment)


def test_simulated_devices_give_the_single_device_map(small_set):
    star = str(small_set / "particles.star")
    assert run(["reconstruct", "--i", star, "--o", str(small_set / "one.mrc"), "--ctf", "--quiet"]) == 0
    assert run(["reconstruct", "--i", star, "--o", str(small_set / "three.mrc"), "--ctf", "--quiet",
                "--device", "cpu:3", "--json", str(small_set / "three.json")]) == 0
    one = mrcfile.read(small_set / "one.mrc").astype(np.float64)
    three = mrcfile.read(small_set / "three.mrc").astype(np.float64)
    assert np.linalg.norm(three - one) / np.linalg.norm(one) < 1e-6      # float32 files
    assert json.loads((small_set / "three.json").read_text())["plan"]["n_devices"] == 3
    assert run(["reconstruct", "--i", star, "--o", str(small_set / "packed.mrc"), "--ctf", "--quiet",
                "--device", "cpu:2", "--storage", "packed", "--strided"]) == 0
    packed = mrcfile.read(small_set / "packed.mrc").astype(np.float64)
    assert np.linalg.norm(packed - one) / np.linalg.norm(one) < 1e-6


def test_auto_plan_refuses_an_impossible_budget_before_reading(small_set, capsys, monkeypatch, tmp_path_factory):
    import omlrelion.reconstruct.autotune as autotune

    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path_factory.mktemp("autotune-cache")))
    monkeypatch.setattr(autotune, "free_memory", lambda devices: [10_000_000] * len(devices))
    _expect_error(capsys, small_set, ["reconstruct", "--i", str(small_set / "particles.star"),
                                      "--o", str(small_set / "m.mrc"), "--storage", "auto", "--device", "cpu:2"],
                  "needs")


def test_stack_box_differs_from_the_optics_group(small_set, capsys):
    import starfile

    blocks = starfile.read(small_set / "particles.star", always_dict=True)
    blocks["optics"]["rlnImageSize"] = 62
    starfile.write(blocks, small_set / "particles.star", overwrite=True)
    _expect_error(capsys, small_set, ["reconstruct", "--i", str(small_set / "particles.star"),
                                      "--o", str(small_set / "m.mrc")], "particles.mrcs", "62 px")


def test_packed_plan_on_simulated_devices_gives_the_dense_map_and_names_its_plan(small_set, capsys):
    """--device cpu:3 runs the packed column engine (the default on several devices): same map as one
    device, and the summary names the plan and the dense float32 footprint."""
    star = str(small_set / "particles.star")
    assert run(["reconstruct", "--i", star, "--o", str(small_set / "one.mrc"), "--ctf", "--quiet"]) == 0
    assert run(["reconstruct", "--i", star, "--o", str(small_set / "three.mrc"), "--ctf", "--quiet",
                "--device", "cpu:3", "--strided", "--json", str(small_set / "three.json")]) == 0
    one = mrcfile.read(small_set / "one.mrc").astype(np.float64)
    three = mrcfile.read(small_set / "three.mrc").astype(np.float64)
    assert np.linalg.norm(three - one) / np.linalg.norm(one) <= 1e-6          # float32 files of float64 maps
    summary = json.loads((small_set / "three.json").read_text())
    assert summary["plan"]["storage"] == "packed" and summary["plan"]["n_devices"] == 3
    assert summary["plan"]["description"] == "3 devices, packed, strided, fft 131"
    assert summary["dense_float32_bytes"] == 131 * 131 * 66 * 24 + 131**3 * 4
