"""Point groups as stacks of 3x3 matrices, built the way RELION 3.1 builds them.

RELION (``SymList`` in ``src/symmetries.cpp``) turns a symbol such as ``C4`` or ``I3`` into a short
list of symmetry elements, one per line of a built-in "symmetry file":

* ``rot_axis n ax ay az``: for ``j = 1 .. n-1`` the matrix ``Rot(j*360/n, axis)^T``, where
  ``Rot(t, a) = A^T Rz(t) A`` with ``A`` the matrix that turns ``a`` onto ``z`` and
  ``Rz(t) = [[cos t, -sin t, 0], [sin t, cos t, 0], [0, 0, 1]]``. So the stored matrix of a
  ``+t`` rotation about ``a`` is the right-handed rotation by ``-t`` about ``a``
  (for ``C4``: ``[[0, 1, 0], [-1, 0, 0], [0, 0, 1]]``, which maps ``(1, 0, 0)`` to ``(0, -1, 0)``).
* ``inversion``: ``-I``; ``mirror_plane nx ny nz``: the reflection ``I - 2 n n^T``.

and then closes the list under multiplication (``compute_subgroup``), appending every new
product ``M_i @ M_j`` in RELION's traversal order. This module replays that construction in
double precision (same axis literals, same angle accumulation, same 1e-6 zeroing and matching
tolerances), so the returned matrices are RELION's, in RELION's order, with the identity (which
RELION keeps implicit) prepended.

Convention (``BackProjector::applyPointGroupSymmetry``, ``src/backprojector.cpp``): the matrices
act on column vectors ``k = (x, y, z)`` of logical Fourier coordinates, and RELION uses them as
stored, not transposed: the symmetrised value at ``k`` is the sum over the group of the
original arrays sampled at ``R @ k``. The same matrices are what ``relion_refine
--print_symmetry_ops`` prints. Because the sum runs over a whole group, which also contains
every ``R^T = R^-1``, using ``R`` or ``R^T`` gives the same sum.

Group generators (axes as (x, y, z)), transcribed from RELION's table:

=============  ==================================================================================
``Cn``         n-fold about z
``Ci``         inversion
``Cs``         mirror plane normal to z
``Cnv``        n-fold about z, mirror plane normal to y
``Cnh``        n-fold about z, mirror plane normal to z
``Sn``         (n even) n/2-fold about z and inversion (RELION's definition: for n/2 even this
               is C(n/2)h rather than the rotoreflection group)
``Dn``         n-fold about z, 2-fold about x
``Dnv``        as Dn plus mirror plane normal to x
``Dnh``        as Dn plus mirror plane normal to z
``T``          3-fold about z, 2-fold about (0, 0.816496, 0.577350)
``Td``         as T plus mirror plane normal to (1.4142136, 2.4494897, 0)
``Th``         3-fold about z, 2-fold about (0, -0.816496, -0.577350), inversion
``O``          3-fold about (1, 1, 1)/sqrt 3, 4-fold about z
``Oh``         as O plus mirror plane normal to (0, 1, 1)
``I``, ``I2``  2-fold about z, 5-fold about (0.525731114, 0, 0.850650807),
               3-fold about (0, 0.356822076, 0.934172364)
``I1``         2-fold about x, 5-fold about (0.85065080702670, 0, -0.5257311142635),
               3-fold about (0.9341723640, 0.3568220765, 0)
``I3``         2-fold about (-0.5257311143, 0, 0.8506508070), 5-fold about z,
               3-fold about (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428)
``I4``         2-fold about (0.5257311143, 0, 0.8506508070),
               5-fold about (0.8944271932547096, 0, 0.4472135909903704),
               3-fold about (0.4911234778630044, 0.3568220764705179, 0.7946544753759428)
``Ih``, ``I1h`` .. ``I4h``  the matching I group plus a mirror plane normal to (1, 0, 0), (0, 0, -1),
               (0.850650807, 0, 0.525731114) and (0.850650807, 0, -0.525731114) respectively
=============  ==================================================================================

Orders: Cn n, Ci/Cs 2, Cnv/Cnh 2n, Sn n, Dn 2n, Dnv/Dnh 4n, T 12, Td/Th/O 24, Oh 48, I* 60,
I*h 120. The axis literals carry only 6 to 16 digits, as in RELION, so the T and I matrices are
orthogonal and closed to within 1e-6 (T about 6e-7, I about 5e-8), not to machine precision.

Checked against RELION 3.1.3 (Debian build): the operators equal those printed by
``relion_refine --print_symmetry_ops`` (same count and order) for every group family, and are
bit-identical to the ``SymList`` matrices read from a running ``relion_reconstruct`` for rotation
groups; for mirror planes off the coordinate axes (Td, Oh, I3h, I4h) RELION inverts a 4x4 matrix
by SVD where this module transposes it, a difference of a few 1e-16.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

import numpy as np

from omlrelion.errors import InputError

__all__ = ["point_group_matrices", "ACCEPTED_SYMBOLS"]

ACCEPTED_SYMBOLS = (
    "C1, Cn, Ci, Cs, Cnv, Cnh, Sn (n even), Dn, Dnv, Dnh (n = 1..99), "
    "T, Td, Th, O, Oh, I (= I2), I1, I2, I3, I4, Ih (= I2h), I1h, I2h, I3h, I4h; case-insensitive"
)

_EPS = 1e-6  # RELION's XMIPP_EQUAL_ACCURACY in a double-precision build

# RELION's symmetry "file" for each fixed group: (kind, numbers...) lines, literals as in RELION.
_I2 = [("rot_axis", 2, "0", "0", "1"),
       ("rot_axis", 5, "0.525731114", "0", "0.850650807"),
       ("rot_axis", 3, "0", "0.356822076", "0.934172364")]
_I1 = [("rot_axis", 2, "1", "0", "0"),
       ("rot_axis", 5, "0.85065080702670", "0", "-0.5257311142635"),
       ("rot_axis", 3, "0.9341723640", "0.3568220765", "0")]
_I3 = [("rot_axis", 2, "-0.5257311143", "0", "0.8506508070"),
       ("rot_axis", 5, "0.", "0.", "1."),
       ("rot_axis", 3, "-0.4911234778630044", "0.3568220764705179", "0.7946544753759428")]
_I4 = [("rot_axis", 2, "0.5257311143", "0", "0.8506508070"),
       ("rot_axis", 5, "0.8944271932547096", "0", "0.4472135909903704"),
       ("rot_axis", 3, "0.4911234778630044", "0.3568220764705179", "0.7946544753759428")]
_T = [("rot_axis", 3, "0.", "0.", "1."), ("rot_axis", 2, "0.", "0.816496", "0.577350")]
_O = [("rot_axis", 3, ".5773502", ".5773502", ".5773502"), ("rot_axis", 4, "0", "0", "1")]

_FIXED = {
    "CI": [("inversion",)],
    "CS": [("mirror_plane", "0", "0", "1")],
    "T": _T,
    "TD": _T + [("mirror_plane", "1.4142136", "2.4494897", "0.0000000")],
    "TH": [("rot_axis", 3, "0.", "0.", "1."), ("rot_axis", 2, "0.", "-0.816496", "-0.577350"),
           ("inversion",)],
    "O": _O,
    "OH": _O + [("mirror_plane", "0", "1", "1")],
    "I": _I2, "I2": _I2, "I1": _I1, "I3": _I3, "I4": _I4,
    "IH": _I2 + [("mirror_plane", "1", "0", "0")],
    "I2H": _I2 + [("mirror_plane", "1", "0", "0")],
    "I1H": _I1 + [("mirror_plane", "0", "0", "-1")],
    "I3H": _I3 + [("mirror_plane", "0.850650807", "0", "0.525731114")],
    "I4H": _I4 + [("mirror_plane", "0.850650807", "0", "-0.525731114")],
}

_NUMBERED = re.compile(r"^([CDS])(\d{1,2})([VH]?)$")


def point_group_matrices(symbol: str) -> np.ndarray:
    """RELION's symmetry operators of a point group, identity first.

    Parameters
    ----------
    symbol : str
        RELION symmetry symbol, case-insensitive (see ``ACCEPTED_SYMBOLS``): ``C1``, ``C4``,
        ``D7``, ``T``, ``O``, ``I3``, ``C2v``, ``D3h``, ...

    Returns
    -------
    float64 array, (n, 3, 3)
        ``[identity, R_1, ..., R_{n-1}]``: the identity, then RELION's stored matrices in the
        order RELION applies them. Each acts on column vectors ``k = (x, y, z)`` of logical
        Fourier (or real-space) coordinates; RELION's point-group symmetrisation samples the
        unsymmetrised map at ``R @ k`` (see the module docstring). Proper groups have ``det = +1``
        throughout; groups with mirrors or inversion also hold ``det = -1`` matrices.

    Raises
    ------
    InputError
        Unknown or unsupported symbol (for example ``C0``, odd ``Sn``, ``I5``).
    """
    lines = _symmetry_lines(symbol)
    return _build(tuple(lines)).copy()


@lru_cache(maxsize=None)
def _build(lines) -> np.ndarray:
    mats = _generators(lines)
    _close_like_relion(mats)
    out = np.empty((len(mats) + 1, 3, 3), dtype=np.float64)
    out[0] = np.eye(3)
    for n, m in enumerate(mats, start=1):
        out[n] = m
    _check_group(out, lines)
    out.setflags(write=False)
    return out


# ------------------------------------------------------------------------------------------------
# symbol -> RELION symmetry-file lines


def _bad_symbol(symbol, why=""):
    extra = f" ({why})" if why else ""
    return InputError(f"unknown symmetry group {symbol!r}{extra}; accepted: {ACCEPTED_SYMBOLS}")


def _symmetry_lines(symbol: str):
    if not isinstance(symbol, str):
        raise _bad_symbol(symbol, "expected a string")
    s = symbol.strip().upper()
    if s in ("I5", "I5H"):
        raise _bad_symbol(symbol, "RELION does not implement I5")
    if s in _FIXED:
        return _FIXED[s]
    m = _NUMBERED.match(s)
    if m is None:
        raise _bad_symbol(symbol)
    letter, order, suffix = m.group(1), int(m.group(2)), m.group(3)
    if order < 1:
        raise _bad_symbol(symbol, "the order must be at least 1")
    z_axis = ("rot_axis", order, "0", "0", "1")
    if letter == "C":
        extra = {"": [], "V": [("mirror_plane", "0", "1", "0")], "H": [("mirror_plane", "0", "0", "1")]}
        return [z_axis] + extra[suffix]
    if letter == "D":
        extra = {"": [], "V": [("mirror_plane", "1", "0", "0")], "H": [("mirror_plane", "0", "0", "1")]}
        return [z_axis, ("rot_axis", 2, "1", "0", "0")] + extra[suffix]
    # S
    if suffix or order % 2:
        raise _bad_symbol(symbol, "Sn needs an even n and no suffix")
    return [("rot_axis", order // 2, "0", "0", "1"), ("inversion",)]


# ------------------------------------------------------------------------------------------------
# RELION's matrix arithmetic, replayed in double precision


def _matmul(a, b):
    """3x3 product summed in RELION's order (Matrix2D::operator*: k = 0, 1, 2 from zero)."""
    return [[((0.0 + a[i][0] * b[0][j]) + a[i][1] * b[1][j]) + a[i][2] * b[2][j]
             for j in range(3)] for i in range(3)]


def _transpose(a):
    return [[a[j][i] for j in range(3)] for i in range(3)]


def _zero_small(a):
    """Matrix2D::setSmallValuesToZero: |v| < 1e-6 becomes 0."""
    return [[0.0 if abs(v) < _EPS else v for v in row] for row in a]


def _is_identity(a):
    return all(abs(a[i][j] - (1.0 if i == j else 0.0)) <= _EPS for i in range(3) for j in range(3))


def _align_with_z(axis):
    """transformations.cpp alignWithZ: A with A @ axis = z (axis normalised by multiplying by 1/|a|)."""
    x, y, z = axis
    norm = math.sqrt(((0.0 + x * x) + y * y) + z * z)
    if abs(norm) > _EPS:
        inv = 1.0 / norm
        x, y, z = x * inv, y * inv, z * inv
    else:
        x = y = z = 0.0
    proj = math.sqrt(y * y + z * z)
    if proj > _EPS:
        return [[proj, -x * y / proj, -x * z / proj],
                [0.0, z / proj, -y / proj],
                [x, y, z]]
    return [[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]  # RELION assumes +x here


def _rotation_about(angle_deg, axis):
    """transformations.cpp rotation3DMatrix(ang, axis) = A^T Rz(ang) A."""
    t = angle_deg * math.pi / 180
    c, s = math.cos(t), math.sin(t)
    rz = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]
    a = _align_with_z(axis)
    return _matmul(_matmul(_transpose(a), rz), a)


def _parse_double(text):
    """sscanf("%lf"): leading number, trailing junk (RELION's I3 lines carry commas) ignored."""
    return float(re.match(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text).group(0))


def _parse_float32(text):
    """textToFloat: sscanf("%f") into a C float, then widened to double."""
    return float(np.float32(_parse_double(text)))


def _generators(lines):
    """read_sym_file: the list of stored R matrices (L is irrelevant to the maps)."""
    mats = []
    for line in lines:
        kind = line[0]
        if kind == "rot_axis":
            fold = line[1]
            axis = [_parse_double(v) for v in line[2:5]]
            step = 360.0 / fold
            angle = step
            for _ in range(1, fold):
                r = _zero_small(_rotation_about(angle, axis))
                mats.append(_transpose(r))
                angle += step
        elif kind == "inversion":
            mats.append([[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]])
        else:  # mirror_plane: A L A^-1 with A = alignWithZ(n)^T, L = diag(1, 1, -1)
            normal = [_parse_float32(v) for v in line[1:4]]
            a = _transpose(_align_with_z(normal))
            flip = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]]
            # RELION inverts the (orthogonal) A with an SVD; A^T equals it to rounding.
            mats.append(_matmul(_matmul(a, flip), _transpose(a)))
    return mats


def _close_like_relion(mats):
    """compute_subgroup: append M_i @ M_j not yet present, visiting (i, j) in RELION's order.

    RELION scans a growing 'tried' table shell by shell: shell n holds (0, n), (1, n), ..., (n, n),
    then (n, n-1), ..., (n, 0). Cells added when the list grows belong to later shells, so one
    forward pass visits every pair exactly once, in RELION's order.
    """
    stack = np.array(mats, dtype=np.float64).reshape(-1, 3, 3)
    n = 0
    while n < len(mats):
        cells = [(i, n) for i in range(n + 1)] + [(n, j) for j in range(n - 1, -1, -1)]
        for i, j in cells:
            prod = _matmul(mats[i], mats[j])
            if _is_identity(prod):
                continue
            # Matrix2D::equal against every stored matrix: all |a - b| <= 1e-6
            if not (np.abs(stack - np.array(prod)).max(axis=(1, 2)) <= _EPS).any():
                mats.append(_zero_small(prod))
                stack = np.array(mats, dtype=np.float64)
        n += 1


def _check_group(mats: np.ndarray, lines) -> None:
    """Orthogonal, |det| = 1, no duplicates, closed under multiplication (tolerance 1e-5)."""
    tol = 1e-5
    n = len(mats)
    eye = np.eye(3)
    ortho = np.abs(np.einsum("nij,nkj->nik", mats, mats) - eye).max()
    dets = np.linalg.det(mats)
    flat = mats.reshape(n, 9)
    dist = np.abs(flat[:, None, :] - flat[None, :, :]).max(axis=-1)
    np.fill_diagonal(dist, np.inf)
    closed = 0.0
    for a in mats:  # every product a @ b must be (close to) a member
        prods = np.einsum("ij,bjk->bik", a, mats).reshape(n, 9)
        closed = max(closed, np.abs(prods[:, None, :] - flat[None, :, :]).max(axis=-1).min(axis=1).max())
    if ortho > tol or np.abs(np.abs(dets) - 1).max() > tol or dist.min() < tol or closed > tol:
        raise RuntimeError(  # a construction bug, not a user error
            f"point group {lines!r}: matrices are not a group (orthogonality {ortho:.2e}, "
            f"closure {closed:.2e}, min distance {dist.min():.2e})")
