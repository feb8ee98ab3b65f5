"""Orientation and translation sampling of RELION's refinement (spec `relion-refinement.md`, 6).

Directions: the centres of the HEALPix pixels of order o (Nside = 2^o, 12 Nside^2 pixels) in the
NESTED scheme, rot = phi and tilt = theta in degrees, rot wrapped into [-180, 180]. Psi: n_psi =
ceil(360 / step) angles j 360 / n_psi with step = 360 / (6 Nside). Translations: a disc of grid
points of spacing `step` within radius `range`. Oversampling by `ov`: a direction's 4^ov NESTED
children at order o + ov, psi +- step / 4 (ov = 1), shifts +- step / 4 in x and y.

Perturbation (RELION's `--perturb`, spec 3.7): with `Sampling.perturb` = rho every sampled
orientation (coarse and fine) is turned by Euler angles (a, a, a), a = rho x the coarse step, and
every trial shift moved by rho x the coarse offset step on x and y.

Symmetry: the directions are reduced to RELION's asymmetric unit of the point group (its
hard-coded inequalities for Cn, Dn, T, O and the icosahedral settings I1-I4), then, while fewer
than 4000 remain, cleaned of directions within half a pixel radius of a symmetry mate of a kept
one (spec 6.2). Improper groups (mirrors, inversion) are refused with a message naming them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from omlrelion.errors import InputError

_JRLL = np.array([2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4], dtype=np.int64)
_JPLL = np.array([1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7], dtype=np.int64)


def _compress_bits(v: np.ndarray) -> np.ndarray:
    """The even bits of v, packed (the x coordinate of a NESTED in-face index)."""
    out = np.zeros_like(v)
    bit = 0
    v = v.copy()
    while np.any(v):
        out |= (v & 1) << bit
        v >>= 2
        bit += 1
    return out


def pix2ang_nest(nside: int, ipix) -> tuple[np.ndarray, np.ndarray]:
    """(theta, phi) in radians of the centres of NESTED pixels `ipix` (HEALPix's nest2xyf + xyf2loc)."""
    ipix = np.asarray(ipix, dtype=np.int64)
    npface = nside * nside
    face, ipf = ipix // npface, ipix % npface
    ix, iy = _compress_bits(ipf), _compress_bits(ipf >> 1)
    nl4 = 4 * nside
    npix = 12 * npface
    fact2 = 4.0 / npix
    fact1 = 2 * nside * fact2
    jr = _JRLL[face] * nside - ix - iy - 1
    north, south = jr < nside, jr > 3 * nside
    nr = np.where(north, jr, np.where(south, nl4 - jr, nside))
    z = np.where(north, 1 - nr * nr * fact2, np.where(south, nr * nr * fact2 - 1, (2 * nside - jr) * fact1))
    kshift = np.where(north | south, 0, (jr - nside) & 1)
    jp = (_JPLL[face] * nr + ix - iy + 1 + kshift) // 2
    jp = np.where(jp > nl4, jp - nl4, jp)
    jp = np.where(jp < 1, jp + nl4, jp)
    phi = (jp - (kshift + 1) * 0.5) * (np.pi / 2 / nr)
    return np.arccos(np.clip(z, -1, 1)), phi


def pix2ang_ring(nside: int, ipix) -> tuple[np.ndarray, np.ndarray]:
    """(theta, phi) of RING-scheme pixels: an independent enumeration of the same centres (tests)."""
    ipix = np.asarray(ipix, dtype=np.int64)
    npix, ncap = 12 * nside * nside, 2 * nside * (nside - 1)
    theta, phi = np.empty(ipix.shape), np.empty(ipix.shape)
    north = ipix < ncap
    south = ipix >= npix - ncap
    eq = ~(north | south)
    p = ipix[north]
    iring = (1 + np.sqrt(1 + 2 * p).astype(np.int64)) // 2
    iring = np.where(2 * iring * (iring - 1) > p, iring - 1, iring)       # guard float rounding
    iring = np.where(2 * (iring + 1) * iring <= p, iring + 1, iring)
    iphi = p - 2 * iring * (iring - 1)
    theta[north] = np.arccos(1 - iring**2 / (3.0 * nside**2))
    phi[north] = (iphi + 0.5) * np.pi / (2 * iring)
    p = ipix[eq] - ncap
    iring = p // (4 * nside) + nside
    iphi = p % (4 * nside)
    fodd = np.where((iring + nside) & 1, 1.0, 0.5)
    theta[eq] = np.arccos((2 * nside - iring) * 2.0 / (3 * nside))
    phi[eq] = (iphi + 1 - fodd) * np.pi / (2 * nside)
    p = npix - ipix[south]
    iring = (1 + np.sqrt(2 * p - 1).astype(np.int64)) // 2
    iring = np.where(2 * iring * (iring - 1) >= p, iring - 1, iring)
    iring = np.where(2 * (iring + 1) * iring < p, iring + 1, iring)
    iphi = 4 * iring + 1 - (p - 2 * iring * (iring - 1))
    theta[south] = np.arccos(iring**2 / (3.0 * nside**2) - 1)
    phi[south] = (iphi - 0.5) * np.pi / (2 * iring)
    return theta, phi


def healpix_directions(order: int) -> np.ndarray:
    """(12 4^order, 2) rot, tilt in degrees of the NESTED pixel centres, RELION's wrapping."""
    if not 0 <= int(order) <= 10:
        raise InputError(f"HEALPix order {order}: expected 0 .. 10")
    nside = 2 ** int(order)
    theta, phi = pix2ang_nest(nside, np.arange(12 * nside * nside))
    rot, tilt = np.degrees(phi), np.degrees(theta)
    rot = np.where(rot > 180, rot - 360, rot)
    return np.stack([rot, tilt], axis=1)


def angular_step(order: int) -> float:
    """RELION's nominal angular step of a HEALPix order, degrees: 360 / (6 Nside)."""
    return 360.0 / (6 * 2 ** int(order))


def psi_angles(order: int) -> np.ndarray:
    """The psi list of an order: j 360 / n_psi, n_psi = ceil(360 / step)."""
    n_psi = int(np.ceil(360.0 / angular_step(order) - 1e-9))
    return np.arange(n_psi) * (360.0 / n_psi)


def max_pixrad(nside: int) -> float:
    """HEALPix's largest angle (radians) between a pixel centre and its corners at `nside`."""
    def unit(z, phi):
        r = np.sqrt(1 - z * z)
        return np.array([r * np.cos(phi), r * np.sin(phi), z])

    va = unit(2.0 / 3.0, np.pi / (4 * nside))
    vb = unit(1 - (1 - 1.0 / nside) ** 2 / 3, 0.0)
    return float(np.arctan2(np.linalg.norm(np.cross(va, vb)), va @ vb))


def _tilt_about_y(theta_deg: float) -> np.ndarray:
    """RELION's Euler matrix of (0, theta, 0), which turns the icosahedral reference planes."""
    from omlrelion.geometry.euler import euler_to_matrix

    return euler_to_matrix(np.array([[0.0, theta_deg, 0.0]]))[0]


_I_P = np.array([0.0, 1.0, 0.0])
_I_Q = np.array([-0.4999999839058737, -0.8090170074556163, 0.3090169861701543])
_I_Z = np.array([0.0, 0.0, 1.0])
_I_U = np.array([0.187592467856686, -0.303530987314591, -0.491123477863004])
_I3_ANGLE = 31.7174745559


def _planes(units: np.ndarray, normals, sign: float = 1.0) -> np.ndarray:
    """Directions on the non-negative side (sign +1) or non-positive side (-1) of every plane."""
    keep = np.ones(len(units), bool)
    for n in normals:
        n = np.asarray(n, dtype=np.float64)
        keep &= sign * (units @ (n / np.linalg.norm(n))) >= 0
    return keep


def _geometric_unit(rot: np.ndarray, tilt: np.ndarray, units: np.ndarray, sym: str) -> np.ndarray:
    """RELION's hard-coded asymmetric unit of a proper point group (healpix_sampling.cpp's
    geometric filter; non-strict inequalities, rot in (-180, 180], tilt in [0, 180])."""
    kind, digits = sym[:1], sym[1:]
    if kind == "C" and digits.isdigit():
        n = int(digits)
        return (rot >= -180.0 / n) & (rot <= 180.0 / n)
    if kind == "D" and digits.isdigit():
        n = int(digits)
        if n == 1:
            return tilt <= 90.0
        return (rot >= 90.0 - 180.0 / n) & (rot <= 90.0 + 180.0 / n) & (tilt <= 90.0)
    if sym == "T":
        return (((rot >= 90.0) & (rot <= 150.0)) | (rot == 0)) & _planes(
            units, [(-1.0, 0.0, 0.0), (0.471405, 0.272165, 0.7698), (0.471404, 0.816497, 0.0)])
    if sym == "O":
        return (((rot >= 45.0) & (rot <= 135.0) & (tilt <= 90.0)) | (rot == 0)) & _planes(
            units, [(0.0, -1.0, 1.0), (1.0, 1.0, 0.0), (-1.0, 1.0, 0.0)])
    q_mirror = _I_Q * np.array([-1.0, 1.0, 1.0])
    if sym in ("I", "I2"):
        return _planes(units, [_I_P, _I_Q, q_mirror])
    if sym in ("I1", "I3"):
        a = _tilt_about_y(90.0 if sym == "I1" else _I3_ANGLE)
        return _planes(units, [a @ _I_P, a @ _I_Q, a @ q_mirror])
    if sym == "I4":
        a = _tilt_about_y(-_I3_ANGLE)
        return _planes(units, [a @ _I_Z, a @ _I_U, a @ (_I_U * np.array([1.0, -1.0, 1.0]))], sign=-1.0)
    raise InputError(f"symmetry {sym!r}: the orientation search handles the proper point groups (Cn, Dn, T, O, "
                     "I, I1-I4); refine with one of them (e.g. the rotational part of the group)")


def asymmetric_unit(directions: np.ndarray, symmetry: str, order: int | None = None) -> np.ndarray:
    """Boolean mask of the (rot, tilt) directions RELION keeps for a point group (spec 6.2).

    The group's hard-coded asymmetric unit; then, when fewer than 4000 directions are left and the
    HEALPix `order` of the directions is given, RELION's seam clean-up: in order, a direction is
    dropped when it lies within half a pixel radius (`max_pixrad`) of a symmetry mate of a
    direction already kept.
    """
    sym = symmetry.strip().upper()
    rot, tilt = directions[:, 0], directions[:, 1]
    if sym == "C1":
        return np.ones(len(directions), bool)
    units = _unit_vectors(rot, tilt)
    keep = _geometric_unit(rot, tilt, units, sym)
    kept = np.flatnonzero(keep)
    if order is None or len(kept) >= 4000:
        return keep
    from omlrelion.geometry.symmetry import point_group_matrices

    operators = np.asarray(point_group_matrices(sym), dtype=np.float64)
    limit = np.cos(0.5 * max_pixrad(2 ** int(order)))
    chosen: list[int] = []
    for i in kept:
        mates = operators.transpose(0, 2, 1) @ units[i]               # d_i . (M d_k) = (M^T d_i) . d_k
        if chosen and np.any(mates @ units[chosen].T > limit):
            keep[i] = False
        else:
            chosen.append(int(i))
    return keep


def translations(range_px: float, step_px: float) -> np.ndarray:
    """(m, 2) x, y offsets of the disc x^2 + y^2 <= range^2 on a grid of `step` (RELION's rule)."""
    if step_px <= 0 or range_px < 0:
        raise InputError(f"offset range {range_px} and step {step_px}: expected range >= 0 and step > 0")
    m = int(np.ceil(range_px / step_px - 1e-9))
    i = np.arange(-m, m + 1)
    x, y = np.meshgrid(i * step_px, i * step_px, indexing="xy")
    keep = x**2 + y**2 <= range_px**2 + 0.001
    return np.stack([x[keep], y[keep]], axis=1)


@dataclass(frozen=True)
class Sampling:
    """The coarse hidden-variable grid of one iteration: directions x psi x translations."""

    order: int
    offset_range_px: float
    offset_step_px: float
    symmetry: str = "C1"
    perturb: float = 0.0      # RELION's random perturbation rho of this iteration, in coarse steps

    # the tables are made once per Sampling (a local search reads them for every particle), read-only
    @cached_property
    def _kept(self) -> np.ndarray:
        return asymmetric_unit(healpix_directions(self.order), self.symmetry, order=self.order)

    @cached_property
    def directions(self) -> np.ndarray:
        return _frozen(healpix_directions(self.order)[self._kept])

    @cached_property
    def direction_pixels(self) -> np.ndarray:
        """The NESTED pixel index of each kept direction (what oversampling refines)."""
        return np.flatnonzero(self._kept)

    @cached_property
    def direction_units(self) -> np.ndarray:
        """(n_dir, 3) unit vectors of the kept directions."""
        return _unit_vectors(self.directions[:, 0], self.directions[:, 1])

    @cached_property
    def symmetry_matrices(self) -> np.ndarray:
        """The point group's operators, identity first."""
        from omlrelion.geometry.symmetry import point_group_matrices

        return _frozen(np.array(point_group_matrices(self.symmetry), dtype=np.float64))

    @cached_property
    def psi(self) -> np.ndarray:
        return _frozen(psi_angles(self.order))

    @cached_property
    def shifts(self) -> np.ndarray:
        """The trial shifts, each moved by rho coarse steps on x and y (spec 3.7)."""
        return _frozen(translations(self.offset_range_px, self.offset_step_px) + self.perturb * self.offset_step_px)

    @cached_property
    def _eulers(self) -> np.ndarray:
        d, p = self.directions, self.psi
        return _frozen(self.perturbed(np.column_stack([np.repeat(d, len(p), axis=0), np.tile(p, len(d))])))

    def eulers(self) -> np.ndarray:
        """(n_dir n_psi, 3) rot, tilt, psi; psi varies fastest (RELION's orientation order)."""
        return self._eulers

    def perturbed(self, eulers: np.ndarray) -> np.ndarray:
        """RELION's perturbation of sampled orientations: each matrix right-multiplied by the rotation
        of Euler angles (a, a, a), a = rho x the coarse angular step."""
        if self.perturb == 0:
            return eulers
        from omlrelion.geometry.euler import euler_to_matrix, matrix_to_euler

        a = self.perturb * angular_step(self.order)
        shape = eulers.shape
        turned = euler_to_matrix(eulers.reshape(-1, 3)) @ euler_to_matrix(np.array([[a, a, a]]))[0]
        return matrix_to_euler(turned).reshape(shape)


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _unit_vectors(rot_deg, tilt_deg) -> np.ndarray:
    r, t = np.radians(rot_deg), np.radians(tilt_deg)
    return np.stack([np.sin(t) * np.cos(r), np.sin(t) * np.sin(r), np.cos(t)], axis=-1)


def local_orientations(sampling: Sampling, prior_euler, sigma_deg: float):
    """A local search's orientations (spec 3.5): indices into `sampling.eulers()` whose direction lies
    within 3 sigma (great-circle angle) of the prior's and whose psi within 3 sigma of its psi, with
    the Gaussian log prior of each (direction and psi terms). The nearest one is kept if none is."""
    index, log_prior = local_orientations_batch(sampling, np.asarray(prior_euler, dtype=np.float64)[None], sigma_deg)
    return index, log_prior[0]


def local_orientations_batch(sampling: Sampling, prior_eulers, sigma_deg: float):
    """`local_orientations` of several particles (B, 3) at once: the union of their orientations
    (U,) indices into `sampling.eulers()`, and each particle's log prior over it (B, U), -inf where
    an orientation is not in its own set. With a point group, the direction term takes the angle
    between the prior's direction and the closest symmetry mate of each sampled direction; the psi
    term is not changed (RELION's rule)."""
    prior_eulers = np.asarray(prior_eulers, dtype=np.float64)
    psi = sampling.psi
    p_units = _unit_vectors(prior_eulers[:, 0], prior_eulers[:, 1])                      # (B, 3)
    # each sampled direction, or its symmetry mate closest to the prior (the group maps directions
    # onto directions as its operators' transposes do, and is closed under transposition)
    mates = np.einsum("sij,bj->sbi", sampling.symmetry_matrices, p_units)                   # (S, B, 3)
    cos = np.max(mates @ sampling.direction_units.T, axis=0)                               # (B, D)
    angle = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    dpsi = np.abs((psi[None, :] - prior_eulers[:, 2, None] + 180.0) % 360.0 - 180.0)       # (B, P)
    limit, inv2 = 3 * sigma_deg, 1.0 / (2 * sigma_deg**2)
    sets = []
    for b in range(len(prior_eulers)):
        keep_d = np.flatnonzero(angle[b] < limit)
        keep_p = np.flatnonzero(dpsi[b] < limit)
        if not len(keep_d):
            keep_d = np.array([int(np.argmin(angle[b]))])
        if not len(keep_p):
            keep_p = np.array([int(np.argmin(dpsi[b]))])
        index = (keep_d[:, None] * len(psi) + keep_p[None, :]).ravel()
        value = (-(angle[b, keep_d][:, None] ** 2) * inv2 - (dpsi[b, keep_p][None, :] ** 2) * inv2).ravel()
        sets.append((index, value))
    union = np.unique(np.concatenate([index for index, _ in sets]))
    log_prior = np.full((len(sets), len(union)), -np.inf)
    for b, (index, value) in enumerate(sets):
        log_prior[b, np.searchsorted(union, index)] = value
    return union, log_prior


def oversampled_orientations(sampling: Sampling, orientations, ov: int = 1) -> np.ndarray:
    """(len(orientations), 4^ov 2^ov, 3) fine rot, tilt, psi of coarse orientation indices (into
    `sampling.eulers()`): the direction's NESTED children (outer), psi - step/2 + (m + 1/2) step/2^ov
    (inner), RELION's order."""
    orientations = np.asarray(orientations, dtype=np.int64)
    psi = sampling.psi
    n_psi = len(psi)
    step = 360.0 / n_psi
    dirs = oversampled_directions(sampling.order, sampling.direction_pixels[orientations // n_psi], ov)
    fine_psi = psi[orientations % n_psi][:, None] - step / 2 + (np.arange(2**ov) + 0.5) * step / 2**ov
    n_dir, n_p = dirs.shape[1], fine_psi.shape[1]
    out = np.empty((len(orientations), n_dir * n_p, 3))
    out[:, :, :2] = np.repeat(dirs, n_p, axis=1)
    out[:, :, 2] = np.tile(fine_psi, (1, n_dir))
    return sampling.perturbed(out)


def oversampled_shifts(shifts_px, step_px: float, ov: int = 1) -> np.ndarray:
    """(len(shifts), 4^ov, 2) fine shifts t - step/2 + (m + 1/2) step/2^ov on each axis (x outer)."""
    t = np.asarray(shifts_px, dtype=np.float64)
    o = -step_px / 2 + (np.arange(2**ov) + 0.5) * step_px / 2**ov
    ox, oy = np.meshgrid(o, o, indexing="ij")
    return t[:, None, :] + np.stack([ox.ravel(), oy.ravel()], axis=1)[None]


def oversampled_directions(order: int, ipix, ov: int = 1) -> np.ndarray:
    """(len(ipix), 4^ov, 2) rot, tilt of the NESTED children at order + ov of coarse pixels `ipix`."""
    ipix = np.asarray(ipix, dtype=np.int64)
    children = ipix[:, None] * 4**ov + np.arange(4**ov)[None, :]
    theta, phi = pix2ang_nest(2 ** (order + ov), children)
    rot = np.degrees(phi)
    return np.stack([np.where(rot > 180, rot - 360, rot), np.degrees(theta)], axis=-1)


__all__ = ["Sampling", "angular_step", "asymmetric_unit", "healpix_directions", "max_pixrad", "oversampled_directions",
           "local_orientations", "local_orientations_batch", "oversampled_orientations", "oversampled_shifts",
           "pix2ang_nest", "pix2ang_ring", "psi_angles", "translations"]
