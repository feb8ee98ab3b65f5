"""RELION's CTF on an rfft grid: the one owner of the CTF convention.

Defocus U/V in Angstrom (positive = underfocus), defocus angle in degrees, Cs in mm, voltage in kV,
amplitude contrast Q0 as a fraction, phase shift in degrees, B-factor in A^2. With spatial frequency
s = (kx, ky) / (n * angpix) (1/A, signed ky):

    gamma = -pi lambda dF(s) |s|^2 + (pi/2) Cs lambda^3 |s|^4 - phase_shift - asin(Q0)
    ctf   = -sin(gamma) * exp(-B |s|^2 / 4) * scale

so the CTF is positive at low frequency. Values with |ctf| < 1e-8 are set to +-1e-8 (sign kept,
sign(0) = +1), as RELION does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from omlrelion.ctf.optics import Optics
from omlrelion.geometry.grids import rfft_freqs, signed_freqs
from omlrelion.units import electron_wavelength


@dataclass(frozen=True)
class CtfParams:
    """Per-particle CTF parameters, arrays of shape (n,) (float64)."""

    defocus_u: np.ndarray
    defocus_v: np.ndarray
    defocus_angle_deg: np.ndarray
    phase_shift_deg: np.ndarray
    bfactor: np.ndarray
    scale: np.ndarray

    def take(self, index) -> "CtfParams":
        return CtfParams(*(np.asarray(getattr(self, f))[index] for f in self.__dataclass_fields__))


def ctf_2d(optics: Optics, params: CtfParams, *, xp=np, dtype=np.float32, box_size=None, angpix=None,
           intact_first_peak: bool = False, phase_flipped: bool = False, only_flip_phases: bool = False):
    """CTF of n particles on the rfft grid of their images.

    Parameters
    ----------
    optics : Optics of the particles' group (voltage, Cs, Q0; box and pixel size by default).
    params : CtfParams with arrays of shape (n,).
    xp : numpy or cupy: where the result is made.

    Returns
    -------
    (n, box_size, box_size//2+1) array of `dtype`, corner (FFTW) layout.
    """
    n = box_size or optics.box_size
    angpix = angpix or optics.angpix
    lam = electron_wavelength(optics.voltage_kv)
    cs = 1e7 * optics.cs_mm
    q0 = optics.amp_contrast
    chi = math.atan(q0 / math.sqrt(1.0 - q0 * q0))
    k1 = math.pi * lam
    k2 = 0.5 * math.pi * cs * lam**3

    def col(a):
        return xp.asarray(np.asarray(a, dtype=np.float64))[:, None, None]

    sy = (signed_freqs(n, xp).astype(xp.float64) / (n * angpix))[None, :, None]
    sx = (rfft_freqs(n, xp).astype(xp.float64) / (n * angpix))[None, None, :]
    ang = col(np.deg2rad(params.defocus_angle_deg))
    cos_a, sin_a = xp.cos(ang), xp.sin(ang)
    du, dv = col(params.defocus_u), col(params.defocus_v)
    # defocus as a bilinear form: -s^T Q^T diag(dU, dV) Q s, well defined at s = 0
    qx = cos_a * sx + sin_a * sy
    qy = -sin_a * sx + cos_a * sy
    u2 = sx * sx + sy * sy
    gamma = -k1 * (du * qx * qx + dv * qy * qy) + k2 * u2 * u2 - col(np.deg2rad(params.phase_shift_deg)) - chi
    ctf = -xp.sin(gamma)
    if intact_first_peak:
        ctf = xp.where(xp.abs(gamma) < 0.5 * math.pi, 1.0, ctf)
    ctf = ctf * xp.exp(-col(params.bfactor) * u2 / 4.0)
    if phase_flipped:
        ctf = xp.abs(ctf)
    elif only_flip_phases:
        ctf = xp.where(ctf < 0, -1.0, 1.0)
    ctf = ctf * col(params.scale)
    ctf = xp.where(xp.abs(ctf) < 1e-8, xp.where(ctf < 0, -1e-8, 1e-8), ctf)
    return ctf.astype(dtype, copy=False)


