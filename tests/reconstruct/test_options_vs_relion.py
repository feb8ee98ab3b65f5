"""relion_reconstruct's options (--maxres, --NN, --pad, --fsc) against RELION on the same particles."""

import subprocess

import mrcfile
import numpy as np
import pytest

from omlrelion.pipeline.steps import ReconstructOptions, reconstruct
from omlrelion.reconstruct.insert import CtfMode


def _setup(relion_sim64, tmp_path):
    (tmp_path / "particles.star").write_bytes((relion_sim64 / "particles.star").read_bytes())
    (tmp_path / "particles.mrcs").symlink_to(relion_sim64 / "particles.mrcs")


def _relion(tmp_path, *args):
    subprocess.run(["relion_reconstruct", "--i", "particles.star", "--o", "relion.mrc", "--ctf", *args],
                   cwd=tmp_path, check=True, capture_output=True)
    return mrcfile.read(tmp_path / "relion.mrc").astype(np.float64)


def _ours(tmp_path, **kwargs):
    reconstruct(tmp_path / "particles.star", tmp_path / "ours.mrc", ReconstructOptions(ctf=CtfMode(apply=True), **kwargs),
                show_progress=False)
    return mrcfile.read(tmp_path / "ours.mrc").astype(np.float64)


@pytest.mark.relion
@pytest.mark.parametrize("args,kwargs", [
    (["--maxres", "20"], {"maxres": 20.0}),
    (["--NN"], {"nn": True}),
    (["--pad", "3"], {"pad": 3.0}),
    (["--iter", "3"], {"n_iter": 3}),
], ids=["maxres20", "NN", "pad3", "iter3"])
def test_option_matches_relion(relion_sim64, tmp_path, args, kwargs):
    _setup(relion_sim64, tmp_path)
    ref = _relion(tmp_path, *args)
    ours = _ours(tmp_path, **kwargs)
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] >= 0.999


@pytest.mark.relion
def test_map_term_from_fsc_matches_relion(relion_sim64, tmp_path):
    _setup(relion_sim64, tmp_path)
    shells = np.arange(33)
    curve = np.clip(1.0 - (shells / 26.0) ** 2, 0.0, 1.0)    # a plausible gold-standard FSC
    lines = ["data_fsc", "", "loop_", "_rlnSpectralIndex #1", "_rlnGoldStandardFsc #2"]
    lines += [f"{s} {c:.6f}" for s, c in zip(shells, curve)]
    (tmp_path / "fsc.star").write_text("\n".join(lines) + "\n")
    ref = _relion(tmp_path, "--fsc", "fsc.star")
    ours = _ours(tmp_path, fsc_path=tmp_path / "fsc.star")
    plain = _ours(tmp_path)
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] >= 0.999
    # the MAP term really acted: without it the map is further from RELION's
    assert np.linalg.norm(ours - ref) < np.linalg.norm(plain - ref)
