"""RELION STAR files (through `starfile`): particle sets in, particle sets out.

Both layouts are read: RELION 3.1+ (`data_optics` + `data_particles`) and 3.0 (one table whose
rows carry their own optics columns; optics groups are built from the distinct (voltage, Cs, Q0,
pixel size, box, premultiplied) tuples). Files are written in the 3.1 layout.

Shifts: STAR files hold `rlnOriginXAngst/YAngst` (A; 3.1) or `rlnOriginX/Y` (px; pre-3.1).
Inside omlrelion there are only `shifts_px` (n, 2) = (x, y) in pixels of the particle's optics
group; the conversion happens here and nowhere else. Image names `<k>@<stack>` are resolved
relative to the STAR file's folder first, then to the current folder (RELION's own rule: the
project folder).
"""

from __future__ import annotations

import difflib
import os
import re
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from omlrelion import __version__
from omlrelion.ctf.optics import Optics
from omlrelion.errors import InputError
from omlrelion.io.mrc import ImageStack, _atomic_output

__all__ = ["COLUMN_TYPES", "ParticleSet", "read_particles", "read_star_table", "write_star",
           "write_particles", "particle_star_blocks"]

# The RELION labels omlrelion reads or writes, with their types (int columns are written as ints).
COLUMN_TYPES: dict[str, type] = {
    # optics (data_optics in 3.1; per particle in 3.0)
    "rlnOpticsGroup": int, "rlnOpticsGroupName": str, "rlnVoltage": float,
    "rlnSphericalAberration": float, "rlnAmplitudeContrast": float, "rlnImagePixelSize": float,
    "rlnMicrographPixelSize": float, "rlnMicrographOriginalPixelSize": float, "rlnImageSize": int,
    "rlnImageDimensionality": int, "rlnCtfDataAreCtfPremultiplied": int,
    "rlnDetectorPixelSize": float, "rlnMagnification": float,
    # particles
    "rlnImageName": str, "rlnMicrographName": str, "rlnCoordinateX": float, "rlnCoordinateY": float,
    "rlnAngleRot": float, "rlnAngleTilt": float, "rlnAnglePsi": float,
    "rlnOriginX": float, "rlnOriginY": float, "rlnOriginXAngst": float, "rlnOriginYAngst": float,
    "rlnDefocusU": float, "rlnDefocusV": float, "rlnDefocusAngle": float, "rlnPhaseShift": float,
    "rlnCtfBfactor": float, "rlnCtfScalefactor": float, "rlnRandomSubset": int,
    "rlnClassNumber": int, "rlnParticleFigureOfMerit": float, "rlnGroupNumber": int,
    "rlnGroupName": str, "rlnNormCorrection": float,
    # FSC tables (relion_postprocess data_fsc)
    "rlnSpectralIndex": int, "rlnResolution": float, "rlnAngstromResolution": float,
    "rlnGoldStandardFsc": float, "rlnFourierShellCorrelation": float,
}
_STRING_LABELS = [label for label, kind in COLUMN_TYPES.items() if kind is str]
_OPTICS_LABELS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize",
                  "rlnImageSize", "rlnCtfDataAreCtfPremultiplied", "rlnDetectorPixelSize",
                  "rlnMagnification", "rlnImageDimensionality")
# ParticleSet field -> (label, default when the label is absent); DefocusV defaults to DefocusU.
_FIELD_LABELS = {
    "defocus_u": ("rlnDefocusU", 0.0), "defocus_v": ("rlnDefocusV", None),
    "defocus_angle_deg": ("rlnDefocusAngle", 0.0), "phase_shift_deg": ("rlnPhaseShift", 0.0),
    "ctf_bfactor": ("rlnCtfBfactor", 0.0), "ctf_scale": ("rlnCtfScalefactor", 1.0),
    "random_subset": ("rlnRandomSubset", 0), "class_number": ("rlnClassNumber", 0),
    "fom": ("rlnParticleFigureOfMerit", 1.0),
}
_IMAGE_NAME = re.compile(r"^\s*(\d+)@(\S(?:.*\S)?)\s*$")


@dataclass
class ParticleSet:
    """Particles of one STAR file: images, optics, poses and CTF parameters (arrays of length n).

    Attributes
    ----------
    star_path : Path
    table : DataFrame
        The particle table as read (kept so that unknown columns are written back).
    optics_table : DataFrame or None
        `data_optics` as read; None for a pre-3.1 file.
    optics : list of Optics
        One per optics group, in `data_optics` order (index = 0-based group).
    optics_group : int64 array, (n,)
        0-based index into `optics`.
    image_stacks : str array, (n,)
        Absolute paths of the image stacks.
    image_indices : int64 array, (n,)
        0-based image index in its stack (`k@stack` minus one).
    eulers_deg : float64 array, (n, 3)
        (rlnAngleRot, rlnAngleTilt, rlnAnglePsi), degrees; 0 when absent.
    shifts_px : float64 array, (n, 2)
        (x, y) origin offsets in pixels of the particle's optics group; 0 when absent.
    defocus_u, defocus_v, defocus_angle_deg, phase_shift_deg, ctf_bfactor, ctf_scale : float64 arrays, (n,)
        A, A, degrees, degrees, A^2, 1 (defaults 0, DefocusU, 0, 0, 0, 1).
    random_subset, class_number : int64 arrays, (n,)
        0 when absent.
    fom : float64 array, (n,)
        rlnParticleFigureOfMerit; 1 when absent.
    """

    star_path: Path
    table: pd.DataFrame
    optics_table: pd.DataFrame | None
    optics: list[Optics]
    optics_group: np.ndarray
    image_stacks: np.ndarray
    image_indices: np.ndarray
    eulers_deg: np.ndarray
    shifts_px: np.ndarray
    defocus_u: np.ndarray
    defocus_v: np.ndarray
    defocus_angle_deg: np.ndarray
    phase_shift_deg: np.ndarray
    ctf_bfactor: np.ndarray
    ctf_scale: np.ndarray
    random_subset: np.ndarray
    class_number: np.ndarray
    fom: np.ndarray

    @property
    def n_particles(self) -> int:
        """Number of particles n."""
        return len(self.image_indices)

    def ctf_params(self, index=slice(None)):
        """The CTF parameters of the particles `index` (all by default) as `ctf.ctf.CtfParams`."""
        from omlrelion.ctf.ctf import CtfParams

        return CtfParams(self.defocus_u[index], self.defocus_v[index], self.defocus_angle_deg[index],
                         self.phase_shift_deg[index], self.ctf_bfactor[index], self.ctf_scale[index])

    def image_names_relative_to(self, folder) -> list[str]:
        """rlnImageName values `k@stack` with each stack path relative to `folder` (where a written
        STAR file will sit), so that RELION's rule resolves them from that file."""
        folder = Path(folder).resolve()
        return [f"{k + 1:06d}@{os.path.relpath(s, folder)}" for k, s in zip(self.image_indices, self.image_stacks)]

    def select(self, mask_or_indices) -> ParticleSet:
        """Subset of the rows: a boolean mask of length n, or 0-based indices (order kept)."""
        sel = np.asarray(mask_or_indices)
        if sel.dtype == bool:
            if sel.shape != (self.n_particles,):
                raise ValueError(f"mask of shape {sel.shape} for {self.n_particles} particles")
            sel = np.flatnonzero(sel)
        elif sel.size == 0:
            sel = np.zeros(0, dtype=np.int64)
        elif sel.ndim != 1 or not np.issubdtype(sel.dtype, np.integer):
            raise ValueError(f"expected a boolean mask or a 1D integer index array, got {sel.dtype} {sel.shape}")
        elif sel.min() < 0 or sel.max() >= self.n_particles:
            raise ValueError(f"particle index out of range 0..{self.n_particles - 1}")
        arrays = {f.name: getattr(self, f.name)[sel] for f in fields(self)
                  if isinstance(getattr(self, f.name), np.ndarray)}
        return replace(self, table=self.table.iloc[sel].reset_index(drop=True), **arrays)


def _read_blocks(path: Path) -> dict[str, pd.DataFrame]:
    if not path.is_file():
        problem = "STAR file not found" if not path.exists() else "not a file"
        raise InputError(f"{path}: {problem}; check the path")
    try:
        with open(path, encoding="utf-8") as text:  # starfile silently skips undecodable lines
            for _ in text:
                pass
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = starfile.read(path, always_dict=True, parse_as_string=_STRING_LABELS)
    except Exception as exc:  # pandas/csv/shlex/decoding errors all mean "not a STAR file we can parse"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: cannot parse the STAR file ({reason}); check that it is a RELION STAR "
                         f"file") from exc
    blocks = {}
    for name, block in raw.items():
        if isinstance(block, dict):  # a non-loop block: one row
            block = pd.DataFrame({k: [v] for k, v in block.items()})
        if isinstance(block, pd.DataFrame):
            blocks[name] = block
    return blocks


def _particle_tables(path: Path, blocks: dict) -> tuple[pd.DataFrame, pd.DataFrame | None, str]:
    found = ", ".join(f"data_{n}" for n in blocks) or "none"
    if "optics" in blocks:
        if "particles" not in blocks:
            raise InputError(f"{path}: no particle table: a 3.1 file needs data_particles next to "
                             f"data_optics (blocks found: {found})")
        return blocks["particles"], blocks["optics"], "particles"
    for name in ("particles", "images", ""):
        if name in blocks:
            return blocks[name], None, name
    with_images = [n for n, b in blocks.items() if "rlnImageName" in b.columns]
    if len(with_images) == 1 or (len(blocks) == 1 and not with_images):
        name = with_images[0] if with_images else next(iter(blocks))
        return blocks[name], None, name
    raise InputError(f"{path}: no particle table (expected data_particles, data_images or data_; "
                     f"blocks found: {found})")


def _clean(path: Path, block: str, df: pd.DataFrame) -> pd.DataFrame:
    """Check the numeric columns we know (finite numbers; integers where RELION wants them)."""
    df = df.copy()
    for label in df.columns:
        kind = COLUMN_TYPES.get(label)
        if kind is str:
            df[label] = df[label].astype(str)
        if kind not in (int, float):
            continue
        values = pd.to_numeric(df[label], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values) | ((values != np.round(values)) if kind is int else False)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raw = df[label].iloc[row]
            what = "NaN" if pd.isna(raw) or str(raw).lower() == "nan" else repr(raw)
            expected = "an integer" if kind is int else "a finite number"
            raise InputError(f"{path}: data_{block}, label {label}, row {row + 1}: {what} is not {expected}; "
                             f"fix or remove that row")
        df[label] = values.astype(np.int64) if kind is int else values
    return df


def _resolve_stacks(path: Path, names: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    parts = names.astype(str).str.extract(_IMAGE_NAME)
    numbers = pd.to_numeric(parts[0], errors="coerce").to_numpy()
    bad = np.flatnonzero(np.isnan(numbers) | (np.nan_to_num(numbers) < 1))
    if bad.size:
        r = int(bad[0])
        raise InputError(f"{path}: row {r + 1}: malformed rlnImageName {names.iloc[r]!r}; expected "
                         f"'<k>@<stack.mrcs>' with k >= 1 (1-based image number)")
    stacks = parts[1].to_numpy(dtype=str)
    unique, first_row, inverse = np.unique(stacks, return_index=True, return_inverse=True)
    resolved = []
    for stack, row in zip(unique.tolist(), first_row.tolist()):
        candidates = [Path(stack)] if os.path.isabs(stack) else [path.parent / stack, Path.cwd() / stack]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            where = " and in ".join(str(c.parent) for c in candidates)
            raise InputError(f"{path}: row {row + 1}: image stack {stack!r} not found (looked in {where}); "
                             f"run from the RELION project folder or fix rlnImageName")
        resolved.append(os.path.abspath(hit))
    return np.asarray(resolved, dtype=str)[inverse], numbers.astype(np.int64) - 1


def _misspelt(missing, present, needed) -> str:
    """A hint "; rename X to Y ..." for each missing label Y close to an unknown label X (a likely misspelling)."""
    unknown = sorted(label for label in present if label not in COLUMN_TYPES and label not in needed)
    hints = []
    for label in missing:
        close = difflib.get_close_matches(label, unknown, n=1, cutoff=0.85)
        if close:
            hints.append(f"; rename {close[0]} to {label} if it is a misspelling")
    return "".join(hints)


def _column(df: pd.DataFrame, label: str, default, dtype=np.float64) -> np.ndarray:
    """The column as an array, or `default` (a scalar or an (n,) array) when it is absent."""
    if label in df.columns:
        return df[label].to_numpy(dtype=dtype)
    return np.broadcast_to(np.asarray(default, dtype=dtype), (len(df),)).copy()


def _positive_angpix(path: Path, angpix: np.ndarray, where: str) -> None:
    if np.isnan(angpix).any():
        raise InputError(f"{path}: {where} gives no pixel size (rlnImagePixelSize); pass --angpix")
    if (angpix <= 0).any():
        raise InputError(f"{path}: {where}: pixel size must be > 0 A/px, got {angpix[angpix <= 0][0]}; "
                         f"fix the file or pass --angpix")


def _build_optics(path: Path, keys: pd.DataFrame, names: list[str], group: np.ndarray,
                  stacks: np.ndarray) -> list[Optics]:
    """One Optics per row of `keys` (kv, cs, q0, pix, box, pre); box <= 0: read the stack header."""
    optics = []
    for i, (kv, cs, q0, pix, box, pre) in enumerate(keys.itertuples(index=False)):
        if box <= 0:
            members = np.flatnonzero(group == i)
            with ImageStack(stacks[members[0] if members.size else 0]) as images:
                box = images.box_size
        try:
            optics.append(Optics(angpix=pix, voltage_kv=kv, cs_mm=cs, amp_contrast=q0, box_size=box,
                                 ctf_premultiplied=bool(pre), name=names[i]))
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None
    return optics


def _optics_keys(table: pd.DataFrame, pix: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({
        "kv": _column(table, "rlnVoltage", 200.0), "cs": _column(table, "rlnSphericalAberration", 0.0),
        "q0": _column(table, "rlnAmplitudeContrast", 0.0), "pix": pix,
        "box": _column(table, "rlnImageSize", -1, np.int64),
        "pre": _column(table, "rlnCtfDataAreCtfPremultiplied", 0, np.int64)})


def _optics_31(path, particles, optics_df, stacks, angpix):
    if "rlnOpticsGroup" not in optics_df.columns:
        if len(optics_df) != 1:
            raise InputError(f"{path}: data_optics has {len(optics_df)} rows but no rlnOpticsGroup label; "
                             f"add rlnOpticsGroup to data_optics")
        optics_df = optics_df.assign(rlnOpticsGroup=1)
    ids = optics_df["rlnOpticsGroup"].to_numpy()
    dup = pd.Series(ids).duplicated().to_numpy()
    if dup.any():
        raise InputError(f"{path}: data_optics: optics group {ids[dup][0]} is listed twice; ids must be unique: "
                         f"renumber or remove the duplicate")
    if "rlnOpticsGroup" not in particles.columns and len(ids) > 1:
        raise InputError(f"{path}: data_particles lacks rlnOpticsGroup but data_optics has {len(ids)} groups; "
                         f"add rlnOpticsGroup to data_particles")
    pgroups = _column(particles, "rlnOpticsGroup", ids[0], np.int64)
    lookup = {int(g): i for i, g in enumerate(ids)}
    group = np.array([lookup.get(int(g), -1) for g in pgroups], dtype=np.int64)
    if (group < 0).any():
        r = int(np.flatnonzero(group < 0)[0])
        raise InputError(f"{path}: row {r + 1} references optics group {pgroups[r]}, absent from data_optics "
                         f"(groups: {', '.join(str(int(g)) for g in ids)}); fix rlnOpticsGroup or add the group "
                         f"to data_optics")
    pix = np.full(len(optics_df), np.nan if angpix is None else angpix)
    for label in ("rlnMicrographPixelSize", "rlnImagePixelSize"):  # later labels take precedence
        if label in optics_df.columns:
            pix = optics_df[label].to_numpy(dtype=np.float64)
    _positive_angpix(path, pix, "data_optics")
    names = _column(optics_df, "rlnOpticsGroupName", "", object).astype(str).tolist()
    names = [name or f"opticsGroup{int(g)}" for name, g in zip(names, ids)]
    return optics_df, _build_optics(path, _optics_keys(optics_df, pix), names, group, stacks), group


def _optics_30(path, particles, stacks, angpix):
    n = len(particles)
    if angpix is not None:
        pix = np.full(n, float(angpix))
    elif "rlnImagePixelSize" in particles.columns:
        pix = particles["rlnImagePixelSize"].to_numpy(dtype=np.float64)
    elif {"rlnDetectorPixelSize", "rlnMagnification"} <= set(particles.columns):
        with np.errstate(divide="ignore", invalid="ignore"):
            pix = particles["rlnDetectorPixelSize"].to_numpy(dtype=np.float64) * 1e4 \
                / particles["rlnMagnification"].to_numpy(dtype=np.float64)
        pix[~np.isfinite(pix)] = 0.0
    else:
        pix = np.full(n, np.nan)
    _positive_angpix(path, pix, "the particle table (pre-3.1, no data_optics)")
    group, uniques = pd.MultiIndex.from_frame(_optics_keys(particles, pix)).factorize()  # first-seen order
    keys = uniques.to_frame(index=False)
    group = group.astype(np.int64)
    names = [f"opticsGroup{i + 1}" for i in range(len(keys))]
    return _build_optics(path, keys, names, group, stacks), group


def read_star_table(path: str | os.PathLike, *, required: tuple[str, ...] = (),
                    block: str | None = None) -> pd.DataFrame:
    """One table of a STAR file, e.g. `data_fsc` of a relion_postprocess output.

    Parameters
    ----------
    path : str or PathLike
        The .star file.
    required : tuple of str
        Labels the table must hold; without `block`, the first table holding them all is taken.
    block : str, optional
        Block name without "data_" (e.g. "fsc"); "" is the unnamed `data_` block.

    Returns
    -------
    DataFrame with the known labels (COLUMN_TYPES) checked: finite numbers, integers as int64.

    Raises
    ------
    InputError
        Missing or unparsable file, no such block, no table with the required labels,
        an empty table, non-numeric or NaN values in a known numeric column.
    """
    path = Path(path)
    blocks = _read_blocks(path)
    found = ", ".join(f"data_{n}" for n in blocks) or "none"
    if block is not None:
        if block not in blocks:
            raise InputError(f"{path}: no block data_{block} (blocks found: {found}); expected a file with "
                             f"data_{block}")
        name = block
    else:
        name = next((n for n, b in blocks.items() if set(required) <= set(b.columns)), None)
        if name is None:
            raise InputError(f"{path}: no table holds the label(s) {', '.join(required)} (blocks found: {found})"
                             f"; check that it is the right file")
    missing = [label for label in required if label not in blocks[name].columns]
    if missing:
        raise InputError(f"{path}: missing label(s) {', '.join(missing)} in data_{name}; needed: "
                         f"{', '.join(required)}{_misspelt(missing, blocks[name].columns, required)}")
    if len(blocks[name]) == 0:
        raise InputError(f"{path}: the table data_{name} is empty; expected at least one row")
    return _clean(path, name, blocks[name])


def read_particles(path: str | os.PathLike, *, angpix: float | None = None,
                   require: tuple[str, ...] = ("rlnImageName",)) -> ParticleSet:
    """Read a RELION particle STAR file (3.0 or 3.1+ layout).

    Parameters
    ----------
    path : str or PathLike
        The .star file.
    angpix : float, optional
        Pixel size, A/px. For a pre-3.1 file it overrides the file's own; for a 3.1 file it is
        used only when data_optics gives neither rlnImagePixelSize nor rlnMicrographPixelSize.
    require : tuple of str
        Labels that must be present (in data_particles or data_optics); rlnImageName always is.
        Absent optional labels take RELION's defaults (angles, shifts, defocus 0; Cs 0, Q0 0,
        200 kV; B 0, scale 1; DefocusV = DefocusU).

    Returns
    -------
    ParticleSet

    Raises
    ------
    InputError
        One line naming the file for: missing or unparsable file, no or empty particle table,
        missing labels, non-numeric/NaN values, malformed image names, missing stacks, unknown
        or duplicated optics groups, missing or non-positive pixel size, negative defocus.
    """
    path = Path(path)
    if angpix is not None:
        value = pd.to_numeric(pd.Series([angpix]), errors="coerce").iloc[0]
        if not (np.isfinite(value) and value > 0):
            raise InputError(f"{path}: --angpix must be a number > 0 (A/px), got {angpix!r}")
        angpix = float(value)
    blocks = _read_blocks(path)
    particles, optics_df, name = _particle_tables(path, blocks)
    if len(particles) == 0:
        raise InputError(f"{path}: the particle table data_{name} is empty; expected at least one particle row")
    needed = ["rlnImageName"] + [label for label in require if label != "rlnImageName"]
    present = set(particles.columns) | (set(optics_df.columns) if optics_df is not None else set())
    missing = [label for label in needed if label not in present]
    if missing:
        raise InputError(f"{path}: missing label(s) {', '.join(missing)} in data_{name}; "
                         f"needed: {', '.join(needed)}{_misspelt(missing, present, needed)}")
    particles = _clean(path, name, particles)
    stacks, indices = _resolve_stacks(path, particles["rlnImageName"])
    if optics_df is not None:
        optics_df, optics, group = _optics_31(path, particles, _clean(path, "optics", optics_df), stacks, angpix)
        # per-particle values missing from the particle row are looked up in its optics row
        lookup = optics_df.iloc[group].reset_index(drop=True)
        source = pd.concat([lookup[[c for c in lookup.columns if c not in particles.columns]],
                            particles.reset_index(drop=True)], axis=1)
    else:
        optics, group = _optics_30(path, particles, stacks, angpix)
        source = particles
    pix = np.array([o.angpix for o in optics])[group]
    shifts = np.zeros((len(particles), 2))
    for axis, xy in enumerate("XY"):
        if f"rlnOrigin{xy}Angst" in source.columns:
            shifts[:, axis] = source[f"rlnOrigin{xy}Angst"].to_numpy(dtype=np.float64) / pix
        elif f"rlnOrigin{xy}" in source.columns:  # pre-3.1: pixels
            shifts[:, axis] = source[f"rlnOrigin{xy}"].to_numpy(dtype=np.float64)
    values = {}
    for field, (label, default) in _FIELD_LABELS.items():
        dtype = np.int64 if COLUMN_TYPES[label] is int else np.float64
        values[field] = _column(source, label, values["defocus_u"] if default is None else default, dtype)
    for field in ("defocus_u", "defocus_v"):
        if (values[field] < 0).any():
            r = int(np.flatnonzero(values[field] < 0)[0])
            raise InputError(f"{path}: row {r + 1}: negative {_FIELD_LABELS[field][0]} ({values[field][r]} A); "
                             f"RELION defocus is positive for underfocus: fix the sign")
    eulers = np.stack([_column(source, f"rlnAngle{a}", 0.0) for a in ("Rot", "Tilt", "Psi")], axis=1)
    return ParticleSet(star_path=path, table=particles, optics_table=optics_df, optics=optics,
                       optics_group=group, image_stacks=stacks, image_indices=indices,
                       eulers_deg=eulers, shifts_px=shifts, **values)


def write_star(path: str | os.PathLike, blocks: dict[str, pd.DataFrame]) -> None:
    """Write STAR data blocks atomically (temporary file + rename), RELION-style.

    Parameters
    ----------
    path : str or PathLike
        Output .star; replaced if it exists.
    blocks : dict of str -> DataFrame
        Block name (without "data_") -> loop table. Known integer labels (COLUMN_TYPES) are
        written as integers; floats with full precision.

    Raises
    ------
    InputError
        NaN or non-integral values in a typed column, missing or unwritable folder.
    """
    path = Path(path)
    parts = [f"# Written by omlrelion {__version__}\n"]
    for name, df in blocks.items():
        if not isinstance(df, pd.DataFrame):
            raise InputError(f"{path}: block data_{name} must be a pandas DataFrame, got {type(df).__name__}")
        df = df.copy()
        for label in df.columns:
            if df[label].isna().any():
                raise InputError(f"{path}: data_{name}, label {label}: NaN values cannot be written")
            kind = COLUMN_TYPES.get(label)
            if kind is int:
                values = df[label].to_numpy(dtype=np.float64)
                if (values != np.round(values)).any():
                    raise InputError(f"{path}: data_{name}, label {label}: non-integer value for an integer label")
                df[label] = values.astype(np.int64)
            elif kind is float:
                df[label] = df[label].to_numpy(dtype=np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            text = starfile.to_string({name: df}, float_format=None)
        body = "".join(line + "\n" for line in text.splitlines() if not line.startswith("# Created by"))
        parts.append(f"\n# version 30001\n{body}")
    with _atomic_output(path, "STAR file") as tmp:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write("".join(parts))


def _optics_table(optics: list[Optics]) -> pd.DataFrame:
    table = pd.DataFrame({
        "rlnOpticsGroup": np.arange(1, len(optics) + 1, dtype=np.int64),
        "rlnOpticsGroupName": [o.name or f"opticsGroup{i + 1}" for i, o in enumerate(optics)],
        "rlnVoltage": [o.voltage_kv for o in optics], "rlnSphericalAberration": [o.cs_mm for o in optics],
        "rlnAmplitudeContrast": [o.amp_contrast for o in optics], "rlnImagePixelSize": [o.angpix for o in optics],
        "rlnImageSize": [o.box_size for o in optics], "rlnImageDimensionality": 2})
    if any(o.ctf_premultiplied for o in optics):
        table["rlnCtfDataAreCtfPremultiplied"] = [int(o.ctf_premultiplied) for o in optics]
    return table


def particle_star_blocks(optics: list[Optics], columns: dict[str, np.ndarray]) -> dict[str, pd.DataFrame]:
    """Blocks of a fresh 3.1 particle STAR file (pass them to `write_star`).

    Parameters
    ----------
    optics : list of Optics
        Optics groups; group k (1-based in the file) is `optics[k - 1]`.
    columns : dict of str -> array, (n,)
        Particle labels -> values, e.g. rlnImageName, rlnAngleRot, rlnOriginXAngst (A),
        rlnDefocusU. rlnOpticsGroup (1-based) may be left out when there is one group.

    Returns
    -------
    dict with "optics" and "particles" DataFrames.
    """
    if not optics:
        raise InputError("particle STAR: at least one optics group is needed")
    lengths = {label: len(np.atleast_1d(v)) for label, v in columns.items()}
    if len(set(lengths.values())) > 1:
        raise InputError(f"particle STAR: columns differ in length: {lengths}")
    particles = pd.DataFrame({label: np.atleast_1d(v) for label, v in columns.items()})
    if "rlnOpticsGroup" not in particles.columns:
        if len(optics) > 1:
            raise InputError("particle STAR: rlnOpticsGroup is needed when there are several optics groups")
        particles["rlnOpticsGroup"] = 1
    groups = particles["rlnOpticsGroup"].to_numpy()
    if len(groups) and (groups.min() < 1 or groups.max() > len(optics)):
        raise InputError(f"particle STAR: rlnOpticsGroup must lie in 1..{len(optics)}")
    return {"optics": _optics_table(optics), "particles": particles}


def write_particles(path: str | os.PathLike, particles: ParticleSet) -> None:
    """Write a particle set in the 3.1 layout, with its current poses and per-particle values.

    Pose columns are always written from `eulers_deg` and `shifts_px` (as rlnOriginX/YAngst =
    shifts_px * angpix; pixel rlnOriginX/Y are dropped). The other ParticleSet arrays replace
    their columns, which are added when absent and not at their default. A pre-3.1 source gets
    an optics table built from `optics`, its per-particle optics columns moving there.
    """
    ps = particles
    table = ps.table.copy().reset_index(drop=True)
    if ps.optics_table is not None:  # as read: it always has rlnOpticsGroup
        optics_table = ps.optics_table.copy().reset_index(drop=True)
        for label, attr in (("rlnImagePixelSize", "angpix"), ("rlnImageSize", "box_size")):
            if label not in optics_table.columns:
                optics_table[label] = [getattr(o, attr) for o in ps.optics]
    else:
        optics_table = _optics_table(ps.optics)
        table = table.drop(columns=[c for c in _OPTICS_LABELS if c in table.columns])
    table["rlnOpticsGroup"] = optics_table["rlnOpticsGroup"].to_numpy(dtype=np.int64)[ps.optics_group]
    table = table.drop(columns=[c for c in ("rlnOriginX", "rlnOriginY") if c in table.columns])
    pix = np.array([o.angpix for o in ps.optics])[ps.optics_group]
    for axis, angle in enumerate(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
        table[angle] = ps.eulers_deg[:, axis]
    table["rlnOriginXAngst"] = ps.shifts_px[:, 0] * pix
    table["rlnOriginYAngst"] = ps.shifts_px[:, 1] * pix
    for field, (label, default) in _FIELD_LABELS.items():
        values = getattr(ps, field)
        default = ps.defocus_u if default is None else default
        if label in table.columns or (values != default).any():
            table[label] = values
    write_star(path, {"optics": optics_table, "particles": table})
