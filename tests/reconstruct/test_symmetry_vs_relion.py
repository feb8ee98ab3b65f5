"""Point-group symmetrised reconstructions against relion_reconstruct --sym on the same particles."""

import subprocess

import mrcfile
import numpy as np
import pytest

from omlrelion.pipeline.steps import ReconstructOptions, reconstruct
from omlrelion.reconstruct.fsc import fsc
from omlrelion.reconstruct.insert import CtfMode


@pytest.mark.relion
@pytest.mark.parametrize("sym", ["C4", "D2", "T", "O", "I1", "I2"])
def test_symmetrised_map_matches_relion(relion_sim64, tmp_path, sym):
    (tmp_path / "particles.star").write_bytes((relion_sim64 / "particles.star").read_bytes())
    (tmp_path / "particles.mrcs").symlink_to(relion_sim64 / "particles.mrcs")
    subprocess.run(["relion_reconstruct", "--i", "particles.star", "--o", "relion.mrc", "--ctf", "--sym", sym,
                    "--skip_gridding"], cwd=tmp_path, check=True, capture_output=True)
    reconstruct(tmp_path / "particles.star", tmp_path / "ours.mrc",
                ReconstructOptions(ctf=CtfMode(apply=True), sym=sym, skip_gridding=True), show_progress=False)
    ours = mrcfile.read(tmp_path / "ours.mrc").astype(np.float64)
    ref = mrcfile.read(tmp_path / "relion.mrc").astype(np.float64)
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] >= 0.999
    assert fsc(ours, ref)[1:29].min() >= 0.99
