"""Physical units and RELION's rounding.

Lengths are in Angstrom unless a name says otherwise (`_px`, `_mm`, `_kv`, `_deg`).
"""

from __future__ import annotations

import math

import numpy as np


def relion_round(x):
    """RELION's ROUND: halves go away from zero (np.round rounds halves to even)."""
    if np.isscalar(x):
        return int(math.floor(x + 0.5)) if x >= 0 else -int(math.floor(-x + 0.5))
    x = np.asarray(x)
    return np.where(x >= 0, np.floor(x + 0.5), -np.floor(-x + 0.5)).astype(np.int64)


def electron_wavelength(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Angstrom for an accelerating voltage in kV."""
    volts = 1000.0 * voltage_kv
    return 12.2643247 / math.sqrt(volts * (1.0 + 0.978466e-6 * volts))


def shell_to_resolution(shell: float, box_size: int, angpix: float) -> float:
    """Resolution in Angstrom of Fourier shell `shell` (pixels) of a box of `box_size` pixels."""
    return math.inf if shell <= 0 else box_size * angpix / shell


def r_max_for_resolution(box_size: int, angpix: float, maxres: float | None) -> int:
    """Outermost Fourier radius (pixels of the unpadded box) for --maxres (Nyquist if None or <= 0).

    RELION: r_max = ceil(box_size * angpix / maxres), capped at box_size // 2.
    """
    nyquist = box_size // 2
    if maxres is None or maxres <= 0:
        return nyquist
    return min(nyquist, int(math.ceil(box_size * angpix / maxres)))
