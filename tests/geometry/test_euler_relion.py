"""Our Euler matrices against projections of off-centre voxels made by relion_project (tests/data)."""

from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from omlrelion.geometry.euler import euler_to_matrix

DATA = Path(__file__).resolve().parents[1] / "data"
SPOTS = {1: (6, 0, 0), 2: (0, 4, 0), 3: (0, 0, 3)}


def _spot_position(img):
    """Sub-pixel (x, y) of a single band-limited spot, relative to the centre n//2, by a phase fit."""
    n = img.shape[0]
    f = np.fft.fft2(np.fft.ifftshift(img))
    y0, x0 = np.unravel_index(np.argmax(img), img.shape)
    p = np.array([x0 - n // 2, y0 - n // 2], dtype=np.float64)
    k = np.fft.fftfreq(n, 1 / n)
    ky, kx = np.meshgrid(k, k, indexing="ij")
    sel = (kx**2 + ky**2 > 0) & (kx**2 + ky**2 <= 36)
    kx, ky, fs = kx[sel], ky[sel], f[sel]
    w = np.abs(fs)
    for _ in range(20):          # Gauss-Newton on the phase residual of exp(-2 pi i k.p / n)
        model = np.exp(-2j * np.pi * (kx * p[0] + ky * p[1]) / n)
        resid = np.angle(fs / model)
        jac = np.stack([kx, ky], axis=1) * (-2 * np.pi / n)
        step, *_ = np.linalg.lstsq(jac * w[:, None], -resid * w, rcond=None)
        p -= step
        if np.abs(step).max() < 1e-9:
            break
    return p


@pytest.mark.parametrize("spot", sorted(SPOTS))
def test_spots_land_where_our_matrix_puts_them(spot):
    angles = starfile.read(DATA / "euler_angles.star", always_dict=True)["particles"]
    eulers = angles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(dtype=np.float64)
    images = mrcfile.read(DATA / f"euler_proj_spot{spot}.mrcs").reshape(-1, 32, 32).astype(np.float64)
    r = np.array(SPOTS[spot], dtype=np.float64)
    for a, img in zip(euler_to_matrix(eulers), images):
        expected = (a @ r)[:2]
        if np.hypot(*expected) < 1e-9 and np.max(img) <= 0:
            continue
        np.testing.assert_allclose(_spot_position(img), expected, atol=0.01)
