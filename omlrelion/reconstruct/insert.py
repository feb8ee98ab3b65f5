"""Particle images -> weighted Fourier terms -> padded 3D sums (relion_reconstruct's loop body).

Per particle (reconstruction spec 2.5 and 3.2): rfft2 / n^2 with the origin at n//2, shift by
+origin offset, CTF weighting, DC set to 0, then insertion (`fourier.backprojector`).

| CTF mode                       | data term      | weight       |
|--------------------------------|----------------|--------------|
| no CTF                         | F              | 1            |
| CTF                            | c F            | c^2          |
| CTF, premultiplied images      | F              | c^2          |
| CTF, phase flipped             | abs(c) F       | c^2          |
| CTF, only flip phases          | sign(c) F      | scale^2      |
FOM weighting (optional) multiplies both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from omlrelion.backend import get_xp
from omlrelion.ctf.ctf import CtfParams, ctf_2d
from omlrelion.ctf.optics import Optics
from omlrelion.fourier.backprojector import insert_slices
from omlrelion.fourier.layout import rfft2_centred, shift_2d


@dataclass(frozen=True)
class CtfMode:
    """relion_reconstruct's CTF options."""

    apply: bool = False
    intact_first_peak: bool = False
    phase_flipped: bool = False
    only_flip_phases: bool = False


def particle_terms(images, shifts_px, optics: Optics, ctf: CtfParams, mode: CtfMode, fom=None):
    """(m, n, n) real images -> data terms (m, n, n//2+1) complex and weights (same, real).

    Runs where `images` live (NumPy or CuPy) in their float type.
    """
    xp = get_xp(images)
    real = images.dtype
    f = rfft2_centred(images)
    shifts_px = np.asarray(shifts_px, dtype=np.float64)
    if np.any(shifts_px != 0):
        f = shift_2d(f, shifts_px)
    if mode.apply:
        c = ctf_2d(optics, ctf, xp=xp, dtype=real, intact_first_peak=mode.intact_first_peak,
                   phase_flipped=mode.phase_flipped, only_flip_phases=mode.only_flip_phases)
        if mode.only_flip_phases:
            w = xp.broadcast_to(xp.asarray(np.asarray(ctf.scale, dtype=real) ** 2)[:, None, None], f.shape)
            w = xp.ascontiguousarray(w)
        else:
            w = c * c
        if not optics.ctf_premultiplied:
            f *= c
    else:
        w = xp.ones(f.shape, dtype=real)
    if fom is not None:
        fom = xp.asarray(np.asarray(fom, dtype=real))[:, None, None]
        f *= fom
        w = w * fom
    f[:, 0, 0] = 0
    return f, w


def insert_particles(data_ftc, weight_ftc, images, rotations, shifts_px, optics: Optics, ctf: CtfParams,
                     *, mode: CtfMode, pad: float, r_padded: int, nn: bool = False, fom=None) -> None:
    """Prepare m images of one optics group and add them into the padded sums, in place."""
    f, w = particle_terms(images, shifts_px, optics, ctf, mode, fom=fom)
    insert_slices(data_ftc, weight_ftc, f, w, rotations, pad=pad, r_padded=r_padded, nn=nn)
