"""omlrelion simulate through its CLI, in-process: outputs, the summary line, and bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from omlrelion.cli.main import run
from omlrelion.io.mrc import ImageStack, write_map
from omlrelion.io.star import read_particles, write_star


@pytest.fixture
def maps(tmp_path):
    """A folder of input maps: good, non-cubic, odd-sized, corrupt; and a 2-row pose file."""
    folder = tmp_path / "in"
    folder.mkdir()
    c = np.arange(16) - 8
    blob = np.exp(-(c[:, None, None] ** 2 + c[None, :, None] ** 2 + (c[None, None, :] - 2) ** 2) / 8.0)
    write_map(folder / "good.mrc", blob, 1.5)
    write_map(folder / "flat.mrc", blob[:12], 1.5)
    write_map(folder / "odd.mrc", blob[:15, :15, :15], 1.5)
    (folder / "corrupt.mrc").write_bytes(b"not an MRC file" * 10)
    write_star(folder / "poses.star", {"particles": pd.DataFrame(
        {"rlnAngleRot": [0.0, 10.0], "rlnAngleTilt": [90.0, 45.0], "rlnAnglePsi": [0.0, -30.0]})})
    return folder


def _outputs(folder):
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def test_simulate_phantom_prints_one_summary_line(tmp_path, capsys):
    out = tmp_path / "sim"
    assert run(["simulate", "--map", "phantom", "--box", "16", "--n", "10", "--o", str(out), "--shift_max", "2",
                "--snr", "1", "--seed", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("omlrelion simulate: 10 particles, box 16, 2 A/px -> ")
    assert str(out) + ".star" in lines[0] and str(out) + ".mrcs" in lines[0]
    assert _outputs(tmp_path) == ["sim.mrcs", "sim.star", "sim_phantom.mrc"]
    particles = read_particles(out.with_suffix(".star"))
    assert particles.n_particles == 10 and particles.optics[0].box_size == 16
    with ImageStack(particles.image_stacks[0]) as stack:
        assert stack.n_images == 10 and stack.angpix == pytest.approx(2.0)


def test_simulate_map_with_orientation_file(maps, tmp_path, capsys):
    out = tmp_path / "sim"
    assert run(["simulate", "--map", str(maps / "good.mrc"), "--orientations", str(maps / "poses.star"),
                "--o", str(out), "--no_ctf", "--snr", "0", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    particles = read_particles(out.with_suffix(".star"))
    np.testing.assert_array_equal(particles.eulers_deg, [[0, 90, 0], [10, 45, -30]])
    assert particles.optics[0].angpix == 1.5 and "rlnDefocusU" not in particles.table.columns


@pytest.mark.parametrize("extra, fragments", [
    (["--map", "{in}/missing.mrc"], ["missing.mrc", "not found"]),
    (["--map", "{in}/corrupt.mrc"], ["corrupt.mrc", "not a readable MRC file"]),
    (["--map", "{in}/flat.mrc"], ["--map", "flat.mrc", "cube"]),
    (["--map", "{in}/odd.mrc"], ["--map", "odd.mrc", "even"]),
    (["--map", "phantom", "--box", "15"], ["--box 15", "even"]),
    (["--map", "phantom", "--n", "0"], ["--n 0", ">= 1"]),
    (["--map", "phantom", "--n", "-3"], ["--n -3"]),
    (["--map", "phantom", "--angpix", "0"], ["--angpix 0"]),
    (["--map", "{in}/good.mrc", "--angpix", "-1.5"], ["--angpix -1.5", "> 0"]),
    (["--map", "phantom", "--defocus_min", "30000", "--defocus_max", "20000"], ["--defocus_min", "--defocus_max"]),
    (["--map", "phantom", "--snr", "-0.1"], ["--snr -0.1"]),
    (["--map", "phantom", "--snr", "nan"], ["--snr nan"]),
    (["--map", "{in}/good.mrc", "--orientations", "{in}/poses.star", "--n", "5"], ["--n 5", "2 rows"]),
    (["--map", "phantom", "--orientations", "{in}/none.star"], ["none.star", "not found"]),
    (["--map", "phantom", "--device", "tpu"], ["--device"]),
])
def test_bad_input_is_one_line_and_leaves_no_output(maps, tmp_path, capsys, extra, fragments):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = ["simulate", "--o", str(out_dir / "sim")] + [a.replace("{in}", str(maps)) for a in extra]
    if "phantom" in extra and "--box" not in extra:
        argv += ["--box", "16"]
    if "--n" not in extra and "--orientations" not in extra:
        argv += ["--n", "4"]
    assert run(argv) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("omlrelion simulate: error: ")
    for fragment in fragments:
        assert fragment in err, err
    assert captured.out == ""
    assert _outputs(out_dir) == []


def test_missing_output_folder_is_an_error(tmp_path, capsys):
    assert run(["simulate", "--map", "phantom", "--box", "16", "--n", "2", "--o", str(tmp_path / "no" / "sim")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--o" in err and "does not exist" in err
    assert _outputs(tmp_path) == []
