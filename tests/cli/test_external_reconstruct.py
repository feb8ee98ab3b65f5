"""omlrelion as relion_refine's external reconstruction program, with Debian's RELION 3.1.3."""

import shutil
import subprocess
import sys

import mrcfile
import numpy as np
import pytest

from omlrelion.cli.external_reconstruct import run

relion_external_fixture = pytest.importorskip("relion_external_fixture")


@pytest.mark.relion
def test_relion_refine_round_trip(relion_sim64, tmp_path):
    if shutil.which("relion_refine") is None or shutil.which("relion_external_reconstruct") is None:
        pytest.skip("relion_refine / relion_external_reconstruct not installed")
    command = f"{sys.executable} -m omlrelion.cli.external_reconstruct"
    out = relion_external_fixture.run_relion_refine_external(tmp_path, command)
    requests = sorted(out.glob("*_external_reconstruct.star"))
    assert requests, "relion_refine made no external-reconstruct call"
    # RELION finished its iteration with our maps: the iteration's references and model exist
    assert list(out.glob("run_it001*class001.mrc")) and list(out.glob("run_it001*model.star"))
    for star in requests:
        ours_path = star.with_suffix(".mrc")
        assert ours_path.is_file()
        ref_path = tmp_path / f"relion_{star.stem}.mrc"
        subprocess.run(["relion_external_reconstruct", str(star.relative_to(tmp_path)), "--o", str(ref_path)],
                       cwd=tmp_path, check=True, capture_output=True)
        ours = mrcfile.read(ours_path).astype(np.float64)
        ref = mrcfile.read(ref_path).astype(np.float64)
        assert ours.shape == ref.shape == (64, 64, 64)
        assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-5


def test_bad_request_is_one_line(tmp_path, capsys):
    star = tmp_path / "x_external_reconstruct.star"
    star.write_text("data_external_reconstruct_general\n\n_rlnExtReconsDataReal a.mrc\n")
    assert run([str(star)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "x_external_reconstruct.star" in err
