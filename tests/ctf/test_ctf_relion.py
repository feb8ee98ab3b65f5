"""Our CTF against CTF images made by RELION 3.1.3's own programs (tests/data, see its README)."""

import csv
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from omlrelion.ctf.ctf import CtfParams, ctf_2d
from omlrelion.ctf.optics import Optics

DATA = Path(__file__).resolve().parents[1] / "data"
with (DATA / "ctf_sets.csv").open() as _f:
    SETS = list(csv.DictReader(_f))


def _ctf(row, *, bfactor):
    optics = Optics(angpix=float(row["angpix"]), voltage_kv=float(row["voltage_kV"]), cs_mm=float(row["cs_mm"]),
                    amp_contrast=float(row["amplitude_contrast"]), box_size=int(row["box"]))
    params = CtfParams(*(np.array([float(row[k])]) for k in (
        "defocus_u_A", "defocus_v_A", "defocus_angle_deg", "phase_shift_deg")),
        np.array([float(row["bfactor_A2"]) if bfactor else 0.0]), np.array([1.0]))
    return ctf_2d(optics, params, dtype=np.float64)[0]


@pytest.mark.parametrize("row", SETS, ids=[r["set"] for r in SETS])
def test_ctf_equals_relion_project_psf(row):
    """relion_project --ctf of a centred delta: rfft2 of the (origin-shifted) PSF is the CTF with envelope."""
    n = int(row["box"])
    img = mrcfile.read(DATA / row["project_file"]).reshape(-1, n, n)[0].astype(np.float64)
    f = np.fft.rfft2(np.fft.ifftshift(img))
    ky = np.fft.fftfreq(n, 1 / n)[:, None]
    kx = np.arange(n // 2 + 1)[None, :]
    inside = kx**2 + ky**2 <= (n // 2) ** 2
    ours = _ctf(row, bfactor=True)
    assert np.abs(f.real - ours)[inside].max() < 1e-5
    assert np.abs(f.imag).max() < 1e-5


@pytest.mark.parametrize("row", SETS, ids=[r["set"] for r in SETS])
def test_ctf_equals_relion_ctf_toolbox(row):
    """relion_ctf_toolbox --simulate: the CTF without envelope on the centred full plane."""
    n = int(row["box"])
    img = mrcfile.read(DATA / row["toolbox_file"]).astype(np.float64)
    ours = _ctf(row, bfactor=False)
    # toolbox pixel (i, j) holds ctf(kx = j - n/2, ky = i - n/2); ours holds kx >= 0, ky signed (rfft rows)
    rows = (np.arange(n) + n // 2) % n          # toolbox row of rfft row i: ky = i (i <= n/2) or i - n
    theirs = img[rows][:, n // 2:]
    ky = np.fft.fftfreq(n, 1 / n)
    keep = ky != -n // 2                          # the toolbox image has no +n/2 row: compare the rest
    assert np.abs(theirs[keep] - ours[keep][:, : n // 2]).max() < 1e-5
