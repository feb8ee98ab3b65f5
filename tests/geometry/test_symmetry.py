"""Point groups: orders, group axioms, axis orientations pinned to RELION 3.1."""

import re
import shutil
import subprocess

import numpy as np
import pytest

from omlrelion.errors import InputError
from omlrelion.geometry.symmetry import ACCEPTED_SYMBOLS, point_group_matrices

ORDERS = {
    "C1": 1, "C2": 2, "C4": 4, "C7": 7, "C12": 12, "C99": 99, "Ci": 2, "Cs": 2, "C2v": 4, "C3v": 6,
    "C4h": 8, "C5h": 10, "S2": 2, "S4": 4, "S6": 6, "S8": 8, "D1": 2, "D2": 4, "D3": 6, "D7": 14,
    "D12": 24, "D3v": 12, "D2h": 8, "D4h": 16, "T": 12, "Td": 24, "Th": 24, "O": 24, "Oh": 48,
    "I": 60, "I1": 60, "I2": 60, "I3": 60, "I4": 60, "Ih": 120, "I1h": 120, "I2h": 120, "I3h": 120,
    "I4h": 120,
}
PROPER = [s for s in ORDERS if re.fullmatch(r"C\d+|D\d+|T|O|I\d?", s)]

# Printed by `relion_refine --print_symmetry_ops --sym <G>` (RELION 3.1.3, Debian build), in
# RELION's order and print precision: R(1) (identity), R(2), ... The first matrices are the
# generators, so these pin RELION's axis orientations.
RELION_PRINTED = {
    "C4": [
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        [[0, 1, 0], [-1, 0, 0], [0, 0, 1]],
        [[-1, 0, 0], [0, -1, 0], [0, 0, 1]],
        [[0, -1, 0], [1, 0, 0], [0, 0, 1]],
    ],
    "D2": [
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        [[-1, 0, 0], [0, -1, 0], [0, 0, 1]],
        [[1, 0, 0], [0, -1, 0], [0, 0, -1]],
        [[-1, 0, 0], [0, 1, 0], [0, 0, -1]],
    ],
    "T": [
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        [[-0.5, 0.86602539, 0], [-0.86602539, -0.5, 0], [0, 0, 1]],
        [[-0.5, -0.86602539, 0], [0.86602539, -0.5, 0], [0, 0, 1]],
        [[-1, 0, 0], [0, 0.33333, 0.94281], [0, 0.94281, -0.33333]],
        [[0.5, 0.28867, 0.8165], [0.86603, -0.16667, -0.4714], [0, 0.94281, -0.33333]],
        [[0.5, -0.28867, -0.8165], [-0.86603, -0.16667, -0.4714], [0, 0.94281, -0.33333]],
        [[0.5, 0.86603, 0], [0.28867, -0.16667, 0.94281], [0.8165, -0.4714, -0.33333]],
        [[0.5, -0.86603, 0], [-0.28867, -0.16667, 0.94281], [-0.8165, -0.4714, -0.33333]],
        [[-0.5, -0.28867, -0.8165], [0.28867, 0.83333, -0.4714], [0.8165, -0.4714, -0.33333]],
        [[0, -0.57735, 0.8165], [-0.57735, -0.66667, -0.4714], [0.8165, -0.4714, -0.33333]],
        [[-0.5, 0.28868, 0.8165], [-0.28868, 0.83333, -0.4714], [-0.8165, -0.4714, -0.33333]],
        [[0, 0.57735, -0.8165], [0.57735, -0.66667, -0.4714], [-0.8165, -0.4714, -0.33333]],
    ],
    "O": [
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        [[0, 1, 0], [0, 0, 1], [1, 0, 0]],
        [[0, 0, 1], [1, 0, 0], [0, 1, 0]],
        [[0, 1, 0], [-1, 0, 0], [0, 0, 1]],
        [[-1, 0, 0], [0, -1, 0], [0, 0, 1]],
        [[0, -1, 0], [1, 0, 0], [0, 0, 1]],
    ],
    "I1": [
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        [[1, 0, 0], [0, -1, 0], [0, 0, -1]],
        [[0.80902, -0.5, -0.30902], [0.5, 0.30902, 0.80902], [-0.30902, -0.80902, 0.5]],
        [[0.5, -0.30902, -0.80902], [0.30902, -0.80902, 0.5], [-0.80902, -0.5, -0.30902]],
        [[0.5, 0.30902, -0.80902], [-0.30902, -0.80902, -0.5], [-0.80902, 0.5, -0.30902]],
        [[0.80902, 0.5, -0.30902], [-0.5, 0.30902, -0.80902], [-0.30902, 0.80902, 0.5]],
    ],
    "I2": [
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        [[-1, 0, 0], [0, -1, 0], [0, 0, 1]],
        [[0.5, 0.80902, 0.30902], [-0.80902, 0.30902, 0.5], [0.30902, -0.5, 0.80902]],
        [[-0.30902, 0.5, 0.80902], [-0.5, -0.80902, 0.30902], [0.80902, -0.30902, 0.5]],
        [[-0.30902, -0.5, 0.80902], [0.5, -0.80902, -0.30902], [0.80902, 0.30902, 0.5]],
        [[0.5, -0.80902, 0.30902], [0.80902, 0.30902, -0.5], [0.30902, 0.5, 0.80902]],
    ],
    "I3": [
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        [[-0.44721, 0, -0.89443], [0, -1, 0], [-0.89443, 0, 0.44721]],
        [[0.309017, 0.95105654, 0], [-0.95105654, 0.309017, 0], [0, 0, 1]],
        [[-0.809017, 0.58778524, 0], [-0.58778524, -0.809017, 0], [0, 0, 1]],
        [[-0.809017, -0.58778524, 0], [0.58778524, -0.809017, 0], [0, 0, 1]],
        [[0.309017, -0.95105654, 0], [0.95105654, 0.309017, 0], [0, 0, 1]],
    ],
    "I4": [
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        [[-0.44721, 0, 0.89443], [0, -1, 0], [0.89443, 0, 0.44721]],
        [[0.8618, 0.42533, 0.27639], [-0.42533, 0.30902, 0.85065], [0.27639, -0.85065, 0.44721]],
        [[0.6382, 0.26287, 0.72361], [-0.26287, -0.80902, 0.52573], [0.72361, -0.52573, -0.44721]],
        [[0.6382, -0.26287, 0.72361], [0.26287, -0.80902, -0.52573], [0.72361, 0.52573, -0.44721]],
        [[0.8618, -0.42533, 0.27639], [0.42533, 0.30902, -0.85065], [0.27639, 0.85065, 0.44721]],
    ],
}
PRINT_TOL = 2e-5  # RELION prints 5 significant digits


def _member(mats, target, tol=1e-5):
    return np.abs(mats - np.asarray(target, dtype=float)).max(axis=(1, 2)).min() < tol


def _rotation(axis, angle_deg):
    """Right-handed (active) rotation matrix by angle about axis."""
    a = np.asarray(axis, dtype=float)
    a = a / np.linalg.norm(a)
    t = np.deg2rad(angle_deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


@pytest.mark.parametrize("symbol", list(ORDERS))
def test_order_and_group_axioms(symbol):
    mats = point_group_matrices(symbol)
    n = ORDERS[symbol]
    assert mats.shape == (n, 3, 3) and mats.dtype == np.float64
    assert np.array_equal(mats[0], np.eye(3))
    np.testing.assert_allclose(np.einsum("nij,nkj->nik", mats, mats), np.broadcast_to(np.eye(3), mats.shape),
                               atol=1e-5)
    dets = np.linalg.det(mats)
    np.testing.assert_allclose(np.abs(dets), 1, atol=1e-5)
    if symbol in PROPER:
        assert (dets > 0).all()
    else:
        assert (dets < 0).sum() == n // 2
    flat = mats.reshape(n, 9)
    dist = np.abs(flat[:, None] - flat[None]).max(axis=-1) + np.eye(n) * 10
    assert dist.min() > 1e-3, "duplicate operators"
    for a in mats:  # closed under multiplication, and every product lands on exactly one member
        prods = (a @ mats).reshape(n, 9)
        nearest = np.abs(prods[:, None] - flat[None]).max(axis=-1)
        assert nearest.min(axis=1).max() < 1e-5
        assert len(set(nearest.argmin(axis=1))) == n


@pytest.mark.parametrize("symbol", list(RELION_PRINTED))
def test_matches_relion_printed_operators(symbol):
    """Same matrices, same order, as relion_refine --print_symmetry_ops (RELION 3.1.3)."""
    ref = np.array(RELION_PRINTED[symbol], dtype=float)
    mats = point_group_matrices(symbol)
    np.testing.assert_allclose(mats[: len(ref)], ref, atol=PRINT_TOL)


def test_cn_axis_and_sense():
    """RELION stores Rot(+360/n about z)^T: C4's first operator maps x -> -y (its transpose x -> y)."""
    c4 = point_group_matrices("C4")
    np.testing.assert_array_equal(c4[1], [[0, 1, 0], [-1, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(c4[1] @ [1, 0, 0], [0, -1, 0])
    np.testing.assert_array_equal(c4[1].T @ [1, 0, 0], [0, 1, 0])
    assert _member(c4, c4[1].T)
    for n in (2, 3, 5, 6, 13):
        mats = point_group_matrices(f"C{n}")
        np.testing.assert_allclose(mats @ [0, 0, 1], np.tile([0, 0, 1], (n, 1)), atol=1e-12)
        np.testing.assert_allclose(mats[1], _rotation([0, 0, 1], -360 / n), atol=1e-6)


def test_dn_contains_two_fold_about_x():
    for n in (2, 3, 4, 7):
        mats = point_group_matrices(f"D{n}")
        assert _member(mats, np.diag([1.0, -1.0, -1.0]))
        np.testing.assert_allclose(mats[1], _rotation([0, 0, 1], -360 / n), atol=1e-6)


# Axes from RELION's symmetry table (symmetries.cpp, fill_symmetry_class): (fold, axis)
TABLE_AXES = {
    "T": [(3, (0, 0, 1)), (2, (0, 0.816496, 0.577350))],
    "O": [(3, (1, 1, 1)), (4, (0, 0, 1))],
    "I2": [(2, (0, 0, 1)), (5, (0.525731114, 0, 0.850650807)), (3, (0, 0.356822076, 0.934172364))],
    "I1": [(2, (1, 0, 0)), (5, (0.85065080702670, 0, -0.5257311142635)), (3, (0.9341723640, 0.3568220765, 0))],
    "I3": [(2, (-0.5257311143, 0, 0.8506508070)), (5, (0, 0, 1)),
           (3, (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428))],
    "I4": [(2, (0.5257311143, 0, 0.8506508070)), (5, (0.8944271932547096, 0, 0.4472135909903704)),
           (3, (0.4911234778630044, 0.3568220764705179, 0.7946544753759428))],
}


@pytest.mark.parametrize("symbol", list(TABLE_AXES))
def test_table_axes_are_symmetry_axes(symbol):
    """Every rotation about each tabulated axis is in the group; the generators come first."""
    mats = point_group_matrices(symbol)
    row = 1
    for fold, axis in TABLE_AXES[symbol]:
        for j in range(1, fold):
            assert _member(mats, _rotation(axis, j * 360 / fold))
            # RELION stores Rot(+j 360/n)^T, generators in table order right after the identity
            np.testing.assert_allclose(mats[row], _rotation(axis, -j * 360 / fold), atol=1e-5)
            row += 1


def test_i_is_i2_and_case_insensitive():
    np.testing.assert_array_equal(point_group_matrices("I"), point_group_matrices("I2"))
    np.testing.assert_array_equal(point_group_matrices("i3"), point_group_matrices("I3"))
    np.testing.assert_array_equal(point_group_matrices(" d2h "), point_group_matrices("D2H"))
    np.testing.assert_array_equal(point_group_matrices("c4"), point_group_matrices("C4"))


def test_returns_a_fresh_array():
    a = point_group_matrices("O")
    a[1] = 0
    np.testing.assert_allclose(point_group_matrices("O")[1], [[0, 1, 0], [0, 0, 1], [1, 0, 0]], atol=1e-6)


def test_icosahedral_orientations_differ():
    groups = {s: point_group_matrices(s) for s in ("I1", "I2", "I3", "I4")}
    for a in groups:
        for b in groups:
            if a < b:
                shared = sum(_member(groups[b], m) for m in groups[a])
                assert shared < 60


@pytest.mark.parametrize("bad", ["", "C0", "X", "C", "D", "S3", "S4v", "I5", "I5h", "C100", "Q2",
                                 "T2", "Ohh", 4, None])
def test_unknown_symbol_raises(bad):
    with pytest.raises(InputError) as info:
        point_group_matrices(bad)
    assert "accepted" in str(info.value) and "Cn" in ACCEPTED_SYMBOLS


def _relion_ops(symbol, cwd):
    out = subprocess.run(["relion_refine", "--print_symmetry_ops", "--sym", symbol], cwd=cwd,
                         capture_output=True, text=True, timeout=60).stdout
    lines = out.splitlines()
    mats = [[[float(v) for v in lines[i + k].split()] for k in (1, 2, 3)]
            for i in range(len(lines)) if re.match(r"\s*R\(\d+\)=", lines[i])]
    return np.array(mats)


@pytest.mark.relion
@pytest.mark.skipif(shutil.which("relion_refine") is None, reason="RELION (relion_refine) not installed")
@pytest.mark.parametrize("symbol", ["C1", "C4", "C7", "C12", "D2", "D7", "T", "O", "I", "I1", "I2", "I3",
                                    "I4", "Ci", "Cs", "C3v", "C4h", "S4", "S6", "D3v", "D2h", "Td", "Th",
                                    "Oh", "Ih", "I1h", "I3h", "I4h"])
def test_matches_relion_refine_print_symmetry_ops(symbol, tmp_path):
    ref = _relion_ops(symbol, tmp_path)
    mats = point_group_matrices(symbol)
    assert ref.shape == mats.shape
    np.testing.assert_allclose(mats, ref, atol=PRINT_TOL)
