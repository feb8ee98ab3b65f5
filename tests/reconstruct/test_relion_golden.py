"""omlrelion reconstruct against RELION 3.1 on RELION-simulated particles (golden references)."""

import shutil
import subprocess

import mrcfile
import numpy as np
import pytest

from omlrelion.pipeline.steps import ReconstructOptions, reconstruct
from omlrelion.reconstruct.fsc import fsc
from omlrelion.reconstruct.gridding import reconstruct_map
from omlrelion.reconstruct.insert import CtfMode


def _relion_map(folder, tmp_path, name, *args):
    """RELION's own reconstruction of the set: the shipped file, else run Debian's relion_reconstruct."""
    shipped = folder / name
    if shipped.is_file():
        return mrcfile.read(shipped).astype(np.float64)
    if shutil.which("relion_reconstruct") is None:
        pytest.skip(f"{shipped} missing and relion_reconstruct not installed")
    out = tmp_path / name
    subprocess.run(["relion_reconstruct", "--i", "particles.star", "--o", str(out), *args],
                   cwd=folder, check=True, capture_output=True)
    return mrcfile.read(out).astype(np.float64)


def _compare(ours, ref, box_size):
    cc = np.corrcoef(ours.ravel(), ref.ravel())[0, 1]
    curve = fsc(ours, ref)
    return cc, curve[1:int(0.9 * box_size / 2) + 1].min()


def test_gridding_matches_relion(relion_sim64, tmp_path):
    out = tmp_path / "ours.mrc"
    summary = reconstruct(relion_sim64 / "particles.star", out, ReconstructOptions(ctf=CtfMode(apply=True)),
                          show_progress=False)
    ours, header = mrcfile.read(out).astype(np.float64), mrcfile.open(out)
    ref = _relion_map(relion_sim64, tmp_path, "relion_reconstruct_ctf.mrc", "--ctf")
    cc, min_fsc = _compare(ours, ref, summary["box_size"])
    assert cc >= 0.999
    assert min_fsc >= 0.99
    assert float(header.voxel_size.x) == pytest.approx(5.078125)
    # against the truth, as RELION's own map does (reference numbers in relion_reconstruct_vs_truth.json)
    truth = mrcfile.read(relion_sim64 / "ground_truth.mrc").astype(np.float64)
    assert np.corrcoef(ours.ravel(), truth.ravel())[0, 1] == pytest.approx(
        np.corrcoef(ref.ravel(), truth.ravel())[0, 1], abs=2e-3)


@pytest.mark.relion
def test_no_gridding_matches_relion(relion_sim64, tmp_path):
    out = tmp_path / "ours.mrc"
    reconstruct(relion_sim64 / "particles.star", out,
                ReconstructOptions(ctf=CtfMode(apply=True), skip_gridding=True), show_progress=False)
    ref = _relion_map(relion_sim64, tmp_path, "relion_reconstruct_ctf_skip_gridding.mrc", "--ctf", "--skip_gridding")
    cc, min_fsc = _compare(mrcfile.read(out).astype(np.float64), ref, 64)
    assert cc >= 0.999
    assert min_fsc >= 0.99


@pytest.mark.relion
@pytest.mark.parametrize("skip_gridding", [False, True])
def test_sums_to_map_reproduce_relion_exactly(relion_sim64, tmp_path, skip_gridding):
    """RELION's own padded sums (--write_debug_output) through our reconstruct_map give RELION's map."""
    (tmp_path / "particles.star").write_bytes((relion_sim64 / "particles.star").read_bytes())
    (tmp_path / "particles.mrcs").symlink_to(relion_sim64 / "particles.mrcs")
    args = ["--ctf", "--write_debug_output"] + (["--skip_gridding"] if skip_gridding else [])
    subprocess.run(["relion_reconstruct", "--i", "particles.star", "--o", "r.mrc", *args],
                   cwd=tmp_path, check=True, capture_output=True)
    data = mrcfile.read(tmp_path / "r_data_real.mrc").astype(np.float64) \
        + 1j * mrcfile.read(tmp_path / "r_data_imag.mrc").astype(np.float64)
    weight = mrcfile.read(tmp_path / "r_weight.mrc").astype(np.float64)
    ref = mrcfile.read(tmp_path / "r.mrc").astype(np.float64)
    ours = reconstruct_map(data, weight, box_size=64, pad=2.0, skip_gridding=skip_gridding)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-6
