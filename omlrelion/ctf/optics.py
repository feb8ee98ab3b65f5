"""Optics of one RELION optics group, as a validated frozen value.

Units follow the RELION optics columns: `angpix` in A/px (`rlnImagePixelSize`), `voltage_kv` in kV
(`rlnVoltage`), `cs_mm` in mm (`rlnSphericalAberration`), `amp_contrast` as a fraction
(`rlnAmplitudeContrast`), `box_size` in px (`rlnImageSize`). `ctf_premultiplied` mirrors
`rlnCtfDataAreCtfPremultiplied`; `name` mirrors `rlnOpticsGroupName`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omlrelion.errors import InputError


@dataclass(frozen=True)
class Optics:
    """Acquisition parameters shared by the particles of one optics group.

    Parameters
    ----------
    angpix : float
        Pixel size of the particle images, A/px; > 0.
    voltage_kv : float
        Acceleration voltage, kV; > 0.
    cs_mm : float
        Spherical aberration, mm (finite; 0 for a corrected microscope).
    amp_contrast : float
        Amplitude contrast as a fraction, 0 <= amp_contrast < 1.
    box_size : int
        Edge of the square particle images, px; >= 2.
    ctf_premultiplied : bool
        True when the images were already multiplied by their CTF.
    name : str
        Optics group name (`rlnOpticsGroupName`); may be empty.

    Raises
    ------
    InputError
        When a value is out of range, with the offending field and value.
    """

    angpix: float
    voltage_kv: float
    cs_mm: float
    amp_contrast: float
    box_size: int
    ctf_premultiplied: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        label = f"optics group {self.name!r}" if self.name else "optics group"
        values = {}
        for field in ("angpix", "voltage_kv", "cs_mm", "amp_contrast"):
            raw = getattr(self, field)
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise InputError(f"{label}: {field} must be a number, got {raw!r}") from None
            if not math.isfinite(value):
                raise InputError(f"{label}: {field} must be finite, got {raw!r}")
            values[field] = value
        if values["angpix"] <= 0:
            raise InputError(f"{label}: angpix (pixel size, A/px) must be > 0, got {self.angpix!r}")
        if values["voltage_kv"] <= 0:
            raise InputError(f"{label}: voltage_kv must be > 0, got {self.voltage_kv!r}")
        if not 0 <= values["amp_contrast"] < 1:
            raise InputError(
                f"{label}: amp_contrast is a fraction and must satisfy 0 <= Q0 < 1, got {self.amp_contrast!r}")
        box = self.box_size
        try:
            box_value = float(box)
        except (TypeError, ValueError):
            box_value = math.nan
        if isinstance(box, bool) or not math.isfinite(box_value) or box_value != int(box_value):
            raise InputError(f"{label}: box_size must be an integer, got {box!r}")
        if box_value < 2:
            raise InputError(f"{label}: box_size must be >= 2 px, got {box!r}")
        for field, value in values.items():
            object.__setattr__(self, field, value)
        object.__setattr__(self, "box_size", int(box))
        object.__setattr__(self, "ctf_premultiplied", bool(self.ctf_premultiplied))
        object.__setattr__(self, "name", str(self.name))
