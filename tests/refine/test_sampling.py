"""HEALPix directions (NESTED, RELION's order and wrapping), psi, translations, oversampling."""

import numpy as np
import pytest

from omlrelion.errors import InputError
from omlrelion.refine.sampling import (
    Sampling,
    angular_step,
    asymmetric_unit,
    healpix_directions,
    oversampled_directions,
    pix2ang_nest,
    pix2ang_ring,
    psi_angles,
    translations,
)


@pytest.mark.parametrize("order,n_dir,step,n_psi", [(0, 12, 60, 6), (1, 48, 30, 12), (2, 192, 15, 24),
                                                    (3, 768, 7.5, 48), (4, 3072, 3.75, 96)])
def test_orders_as_the_spec_table(order, n_dir, step, n_psi):
    assert len(healpix_directions(order)) == n_dir
    assert angular_step(order) == pytest.approx(step) and len(psi_angles(order)) == n_psi
    assert Sampling(order, 0, 1).eulers().shape == (n_dir * n_psi, 3)


@pytest.mark.parametrize("order", range(6))
def test_nested_centres_are_the_ring_centres(order):
    """Two independent enumerations (NESTED face bits, RING rings) give the same pixel centres."""
    nside = 2**order
    npix = 12 * nside**2
    nest = np.column_stack(pix2ang_nest(nside, np.arange(npix)))
    ring = np.column_stack(pix2ang_ring(nside, np.arange(npix)))
    as_set = lambda a: {tuple(row) for row in np.round(a, 9)}
    assert len(as_set(nest)) == npix and as_set(nest) == as_set(ring)


def test_first_pixels_match_healpy_values():
    # healpy.pix2ang(1, [0, 4], nest=True) = (0.84106867, 0.78539816), (1.57079633, 0)
    theta, phi = pix2ang_nest(1, [0, 4])
    np.testing.assert_allclose(theta, [0.84106867, np.pi / 2], atol=1e-8)
    np.testing.assert_allclose(phi, [0.78539816, 0.0], atol=1e-8)
    d = healpix_directions(1)
    assert d[:, 0].min() >= -180 and d[:, 0].max() <= 180 and np.all((d[:, 1] >= 0) & (d[:, 1] <= 180))


def _unit(rot_tilt):
    r, t = np.radians(rot_tilt[..., 0]), np.radians(rot_tilt[..., 1])
    return np.stack([np.sin(t) * np.cos(r), np.sin(t) * np.sin(r), np.cos(t)], axis=-1)


def test_oversampled_children_surround_their_parent():
    order = 2
    parents = healpix_directions(order)
    children = oversampled_directions(order, np.arange(len(parents)))
    assert children.shape == (192, 4, 2)
    cos_own = (_unit(children) * _unit(parents)[:, None, :]).sum(-1)
    # every child is nearer its own parent than any other coarse direction
    cos_all = _unit(children).reshape(-1, 3) @ _unit(parents).T
    assert np.all(np.argmax(cos_all, axis=1) == np.repeat(np.arange(192), 4))
    assert np.degrees(np.arccos(cos_own.min())) < angular_step(order)


def test_translations_disc_counts():
    assert len(translations(5, 2)) == 21 and len(translations(6, 2)) == 29
    t = translations(4, 1)
    assert np.all((t**2).sum(1) <= 16.001) and [0, 0] in t.tolist()
    with pytest.raises(InputError, match="step"):
        translations(4, 0)


def test_cyclic_and_dihedral_asymmetric_units():
    d = healpix_directions(3)
    c4 = asymmetric_unit(d, "C4")
    # without the order, the geometric unit alone: a quarter plus the directions on both seams rot = +-45
    seam = np.isclose(np.abs(d[:, 0]), 45.0)
    assert c4.sum() == len(d) // 4 + seam.sum() // 2
    # the seam clean-up keeps one direction of each pair of symmetry mates on the seams
    assert asymmetric_unit(d, "C4", order=3).sum() == len(d) // 4
    d2 = asymmetric_unit(d, "d2")
    assert np.all(d[d2, 1] <= 90) and np.all((d[d2, 0] >= 0) & (d[d2, 0] <= 180))
    assert 0.25 <= d2.sum() / len(d) < 0.3
    assert asymmetric_unit(d, "C1").all()
    with pytest.raises(InputError, match="proper point groups"):
        asymmetric_unit(d, "C2v")


def test_oversampled_orientations_and_shifts_follow_relion():
    from omlrelion.refine.sampling import oversampled_orientations, oversampled_shifts

    s = Sampling(1, 2.0, 1.0)
    fine = oversampled_orientations(s, [0, 13])
    assert fine.shape == (2, 8, 3)
    coarse = s.eulers()[[0, 13]]
    # psi +- step/4 inside each child direction (children outer, psi inner)
    np.testing.assert_allclose(fine[:, ::2, 2], np.repeat(coarse[:, None, 2] - 7.5, 4, axis=1))
    np.testing.assert_allclose(fine[:, 1::2, 2], np.repeat(coarse[:, None, 2] + 7.5, 4, axis=1))
    angle = np.degrees(np.arccos(np.clip((_unit(fine[..., :2]) * _unit(coarse[:, None, :2])).sum(-1), -1, 1)))
    assert np.all(angle < angular_step(1))
    t = oversampled_shifts([[0.0, 0.0], [1.0, -1.0]], 1.0)
    np.testing.assert_allclose(t[1], [[0.75, -1.25], [0.75, -0.75], [1.25, -1.25], [1.25, -0.75]])


def test_perturbation_turns_every_orientation_and_moves_every_shift():
    """RELION's perturbation (spec 3.7): orientations right-multiplied by Euler (a, a, a), a = rho x the
    coarse step, coarse and oversampled alike; shifts moved by rho x the coarse offset step."""
    from omlrelion.geometry.euler import euler_to_matrix
    from omlrelion.refine.sampling import Sampling, angular_step, oversampled_orientations

    plain, turned = Sampling(1, 2.0, 1.0), Sampling(1, 2.0, 1.0, perturb=0.3)
    a = 0.3 * angular_step(1)
    r = euler_to_matrix(np.array([[a, a, a]]))[0]
    np.testing.assert_allclose(euler_to_matrix(turned.eulers()), euler_to_matrix(plain.eulers()) @ r, atol=1e-12)
    fine_plain = oversampled_orientations(plain, [5, 77])
    fine_turned = oversampled_orientations(turned, [5, 77])
    np.testing.assert_allclose(euler_to_matrix(fine_turned), euler_to_matrix(fine_plain) @ r, atol=1e-12)
    np.testing.assert_allclose(turned.shifts, plain.shifts + 0.3)
    assert Sampling(1, 2.0, 1.0, perturb=0.0).eulers() is not None
