"""RELION's Euler angles: the one owner of the (rot, tilt, psi) convention.

RELION uses ZYZ angles in degrees. The matrix

    A = Rz(psi) @ Ry(tilt) @ Rz(rot),
    Rz(t) = [[cos t, sin t, 0], [-sin t, cos t, 0], [0, 0, 1]],
    Ry(t) = [[cos t, 0, -sin t], [0, 1, 0], [sin t, 0, cos t]]

maps reference (map) coordinates to particle-frame coordinates: an image is the projection along z
of the map rotated by A, so its 2D transform at (kx, ky) samples the 3D transform at
``A.T @ (kx, ky, 0)``. Vectors are (x, y, z); this matches RELION's Euler_angles2matrix.
"""

from __future__ import annotations

import numpy as np

from omlrelion.backend import get_xp


def euler_to_matrix(eulers_deg):
    """(..., 3) RELION (rot, tilt, psi) in degrees -> (..., 3, 3) float64 matrices A."""
    xp = get_xp(eulers_deg)
    e = xp.deg2rad(xp.asarray(eulers_deg, dtype=xp.float64))
    ca, cb, cg = xp.cos(e[..., 0]), xp.cos(e[..., 1]), xp.cos(e[..., 2])
    sa, sb, sg = xp.sin(e[..., 0]), xp.sin(e[..., 1]), xp.sin(e[..., 2])
    cc, cs = cb * ca, cb * sa
    sc, ss = sb * ca, sb * sa
    a = xp.empty(e.shape[:-1] + (3, 3), dtype=xp.float64)
    a[..., 0, 0] = cg * cc - sg * sa
    a[..., 0, 1] = cg * cs + sg * ca
    a[..., 0, 2] = -cg * sb
    a[..., 1, 0] = -sg * cc - cg * sa
    a[..., 1, 1] = -sg * cs + cg * ca
    a[..., 1, 2] = sg * sb
    a[..., 2, 0] = sc
    a[..., 2, 1] = ss
    a[..., 2, 2] = cb
    return a


def matrix_to_euler(matrices) -> np.ndarray:
    """(..., 3, 3) rotation matrices -> (..., 3) RELION (rot, tilt, psi) in degrees.

    Inverse of `euler_to_matrix`: tilt in [0, 180]; at tilt 0 or 180 only rot - psi (or rot +
    psi) is defined and psi is returned as 0.
    """
    a = np.asarray(matrices, dtype=np.float64)
    abs_sb = np.sqrt(a[..., 0, 2] ** 2 + a[..., 1, 2] ** 2)
    regular = abs_sb > 16 * np.finfo(np.float64).eps
    tilt = np.arctan2(abs_sb, a[..., 2, 2])
    safe = np.where(regular, abs_sb, 1.0)
    psi = np.where(regular, np.arctan2(a[..., 1, 2] / safe, -a[..., 0, 2] / safe), 0.0)
    rot = np.where(regular, np.arctan2(a[..., 2, 1] / safe, a[..., 2, 0] / safe),
                   np.arctan2(-a[..., 1, 0], a[..., 1, 1]))
    tilt = np.where(regular, tilt, np.where(a[..., 2, 2] > 0, 0.0, np.pi))
    return np.rad2deg(np.stack([rot, tilt, psi], axis=-1))
