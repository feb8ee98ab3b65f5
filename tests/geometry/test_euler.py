import numpy as np
import pytest

from omlrelion.geometry.euler import euler_to_matrix, matrix_to_euler


def _rz(t):
    c, s = np.cos(t), np.sin(t)
    return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])


def _ry(t):
    c, s = np.cos(t), np.sin(t)
    return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])


def test_matrix_is_rz_ry_rz_product(rng):
    eulers = rng.uniform([-180, 0, -180], [180, 180, 180], size=(20, 3))
    mats = euler_to_matrix(eulers)
    for e, a in zip(eulers, mats):
        rot, tilt, psi = np.deg2rad(e)
        np.testing.assert_allclose(a, _rz(psi) @ _ry(tilt) @ _rz(rot), atol=1e-14)
        np.testing.assert_allclose(a @ a.T, np.eye(3), atol=1e-14)
        assert np.linalg.det(a) == pytest.approx(1.0)


def test_beam_direction_is_third_row():
    # tilt 90, rot 0: the beam (third row of A) runs along +x of the map
    a = euler_to_matrix(np.array([0.0, 90.0, 0.0]))
    np.testing.assert_allclose(a[2], [1, 0, 0], atol=1e-15)
    # rot 90 turns it to +y
    a = euler_to_matrix(np.array([90.0, 90.0, 0.0]))
    np.testing.assert_allclose(a[2], [0, 1, 0], atol=1e-15)


def test_round_trip_through_angles(rng):
    eulers = rng.uniform([-180, 1, -180], [180, 179, 180], size=(50, 3))
    back = matrix_to_euler(euler_to_matrix(eulers))
    np.testing.assert_allclose(euler_to_matrix(back), euler_to_matrix(eulers), atol=1e-12)
    np.testing.assert_allclose(back, eulers, atol=1e-9)


@pytest.mark.parametrize("tilt", [0.0, 180.0])
def test_degenerate_tilt(tilt):
    a = euler_to_matrix(np.array([30.0, tilt, 20.0]))
    np.testing.assert_allclose(euler_to_matrix(matrix_to_euler(a)), a, atol=1e-12)
