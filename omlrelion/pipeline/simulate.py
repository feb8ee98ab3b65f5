"""`omlrelion simulate`: project a 3D map into RELION particle images (`<root>.star` + `<root>.mrcs`).

Forward model (RELION's Projector; reconstruction spec 1.3, 1.4, 2.5 and 3.1). For particle i with
matrix A_i (`geometry.euler`), origin offset o_i (px) and CTF c_i (`ctf.ctf`, not phase-flipped):

    image_i = irfft2_centred( shift_2d( c_i * slice(V, A_i), -o_i ) ) + noise_i

where slice(V, A_i) is the central slice of the pad-2 trilinear projector (`fourier.projector`), on
the scale of `rfft2_centred` of the images, so that image_i(x, y) ~ sum_z V(A_i.T @ (x, y, z)).
The shift by -o_i puts the particle centre at n//2 - o_i; RELION (and `omlrelion reconstruct`)
shift by +o_i (rlnOriginX/YAngst = o_i * angpix) and so recover the map.

Noise is white and Gaussian with one variance for the whole stack: the variance of all pixels of
all noise-free (CTF-modulated) images, divided by `snr`; snr 0 or inf means no noise.

Random draws, in this order, all from one `numpy.random.Generator(seed)`: rot, tilt, psi (random
orientations only), shifts x and y (when not read from a STAR file and shift_max_px > 0), defocus
U, astigmatism, defocus angle (CTF on, not read from a STAR file), then the noise, image after
image. Output files are byte-identical for a seed on one device and batch size (on the host,
whatever the batch size).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import omlrelion
from omlrelion.backend import REAL, Device, get_xp, to_numpy
from omlrelion.ctf.ctf import CtfParams, ctf_2d
from omlrelion.ctf.optics import Optics
from omlrelion.errors import InputError
from omlrelion.fourier.layout import irfft2_centred, shift_2d
from omlrelion.fourier.projector import extract_slices, volume_to_ftc
from omlrelion.geometry.euler import euler_to_matrix
from omlrelion.geometry.grids import PaddedGrid
from omlrelion.io.mrc import read_map, write_map, write_stack
from omlrelion.io.star import particle_star_blocks, read_star_table, write_star
from omlrelion.pipeline.logs import progress
from omlrelion.pipeline.phantom import phantom_volume

__all__ = ["SimulateParams", "project_images", "simulate", "PHANTOM"]

log = logging.getLogger(__name__)

PHANTOM = "phantom"
PHANTOM_BOX_SIZE = 64
PHANTOM_ANGPIX = 2.0
MIN_BOX_SIZE = 8
NOISE_CHUNK = 256  # images per noise draw (the draws do not depend on it)


def _number(option: str, value, *, minimum=None, strict=False, integer=False, allow_inf=False):
    """`value` as a float (or int), or an InputError naming `option`."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{option} {value!r}: expected a number") from None
    if math.isnan(x) or (math.isinf(x) and not allow_inf):
        raise InputError(f"{option} {value!r}: expected a finite number")
    if integer and (isinstance(value, bool) or x != int(x)):
        raise InputError(f"{option} {value!r}: expected an integer")
    if minimum is not None and (x <= minimum if strict else x < minimum):
        raise InputError(f"{option} {value!r}: must be {'>' if strict else '>='} {minimum}")
    return int(x) if integer else x


@dataclass(frozen=True)
class SimulateParams:
    """Options of `omlrelion simulate` (units in the names; defocus in A).

    Parameters
    ----------
    n_particles : int or None
        Number of images (--n); None takes every row of an orientations STAR file.
    angpix : float or None
        Pixel size, A/px (--angpix); None: the map header's, or 2.0 for the phantom.
    box_size : int or None
        Phantom box edge, px (--box; default 64); a map gives its own.
    orientations : str or Path
        "random" (uniform on SO(3)) or a STAR file with rlnAngleRot/Tilt/Psi and optionally
        rlnOriginXAngst/YAngst (or rlnOriginX/Y in px) and rlnDefocusU/V/Angle.
    shift_max_px : float
        Origin offsets are uniform in [-shift_max_px, shift_max_px] on x and y.
    voltage_kv, cs_mm, amp_contrast : float
        Optics (RELION columns rlnVoltage, rlnSphericalAberration, rlnAmplitudeContrast).
    defocus_min, defocus_max, astigmatism : float
        DefocusU uniform in [min, max], DefocusV = DefocusU - uniform[0, astigmatism] (>= 0), A.
    bfactor : float
        rlnCtfBfactor, A^2 (the CTF envelope exp(-B s^2 / 4)).
    ctf : bool
        Multiply the projections by their CTF (--no_ctf turns it off).
    snr : float
        Signal variance / noise variance; 0 or inf: no noise.
    pad : float
        Projector padding factor (>= 1).
    batch_size : int or None
        Images per batch (default 256 on the host, 2048 on a GPU).
    phantom_seed : int
        Seed of the phantom map (--map phantom).
    """

    n_particles: int | None = None
    angpix: float | None = None
    box_size: int | None = None
    orientations: str | Path = "random"
    shift_max_px: float = 0.0
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amp_contrast: float = 0.1
    defocus_min: float = 10000.0
    defocus_max: float = 30000.0
    astigmatism: float = 600.0
    bfactor: float = 0.0
    ctf: bool = True
    snr: float = 0.1
    pad: float = 2.0
    batch_size: int | None = None
    phantom_seed: int = 0

    def __post_init__(self) -> None:
        if self.n_particles is not None:
            _number("--n", self.n_particles, minimum=1, integer=True)
        if self.angpix is not None:
            _number("--angpix", self.angpix, minimum=0, strict=True)
        if self.box_size is not None:
            box = _number("--box", self.box_size, minimum=MIN_BOX_SIZE, integer=True)
            if box % 2:
                raise InputError(f"--box {self.box_size}: the box size must be even")
        _number("--shift_max", self.shift_max_px, minimum=0)
        _number("--voltage", self.voltage_kv, minimum=0, strict=True)
        _number("--cs", self.cs_mm)
        q0 = _number("--amp_contrast", self.amp_contrast, minimum=0)
        if q0 >= 1:
            raise InputError(f"--amp_contrast {self.amp_contrast!r}: must be a fraction < 1")
        dmin = _number("--defocus_min", self.defocus_min, minimum=0)
        dmax = _number("--defocus_max", self.defocus_max, minimum=0)
        if dmin > dmax:
            raise InputError(f"--defocus_min {self.defocus_min!r} is larger than --defocus_max {self.defocus_max!r}")
        _number("--astigmatism", self.astigmatism, minimum=0)
        _number("--bfactor", self.bfactor)
        _number("--snr", self.snr, minimum=0, allow_inf=True)
        _number("--pad", self.pad, minimum=1)
        if self.batch_size is not None:
            _number("--batch", self.batch_size, minimum=1, integer=True)
        _number("--phantom_seed", self.phantom_seed, minimum=0, integer=True)


def project_images(volume_ftc, rotations, shifts_px, optics: Optics, ctf: CtfParams | None, *,
                   pad: float, r_padded: int):
    """Noise-free particle images: slice, CTF, shift by -origin, inverse transform.

    Parameters
    ----------
    volume_ftc : complex64 array, (P, P, P//2+1)
        `fourier.projector.volume_to_ftc` of the map (NumPy or CuPy: the result lives there too).
    rotations : float array, (m, 3, 3)
        RELION matrices A (`geometry.euler`).
    shifts_px : float array, (m, 2)
        (x, y) origin offsets o in px (rlnOriginX/YAngst / angpix); the image is translated by -o.
    optics : Optics
        Box size, pixel size, voltage, Cs and Q0 of the images.
    ctf : CtfParams or None
        Per-image CTF parameters, arrays of shape (m,); None: no CTF.
    pad, r_padded : float, int
        The projector's padding factor and sphere radius (padded voxels).

    Returns
    -------
    float32 array, (m, n, n)
        Images indexed [image, y, x], origin at n//2, not phase-flipped.
    """
    xp = get_xp(volume_ftc)
    n = optics.box_size
    f = extract_slices(volume_ftc, rotations, box_size=n, pad=pad, r_padded=r_padded)
    if ctf is not None:
        f *= ctf_2d(optics, ctf, xp=xp, dtype=f.real.dtype)
    shifts_px = np.asarray(shifts_px, dtype=np.float64)
    if np.any(shifts_px != 0):
        f = shift_2d(f, -shifts_px)
    return irfft2_centred(f, n).astype(REAL, copy=False)


def _output_paths(out_root) -> tuple[Path, Path]:
    root = Path(out_root)
    if root.suffix in (".star", ".mrcs"):
        root = root.with_suffix("")
    if not root.name:
        raise InputError(f"--o {out_root!r}: expected an output root such as sim/particles")
    folder = root.parent
    if not folder.is_dir():
        raise InputError(f"--o {out_root}: output folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise InputError(f"--o {out_root}: output folder {folder} is not writable; check its permissions")
    return root.with_name(root.name + ".star"), root.with_name(root.name + ".mrcs")


def _load_volume(source, params: SimulateParams) -> tuple[np.ndarray, float, str]:
    """(map, angpix, description) from "phantom", an MRC path or an array."""
    if isinstance(source, str) and source == PHANTOM:
        angpix = PHANTOM_ANGPIX if params.angpix is None else float(params.angpix)
        box = PHANTOM_BOX_SIZE if params.box_size is None else int(params.box_size)
        return phantom_volume(box, angpix, int(params.phantom_seed)), angpix, PHANTOM
    if isinstance(source, (str, os.PathLike)):
        volume, header_angpix = read_map(source)
        what = f"--map {source}"
        if params.angpix is not None:
            angpix = float(params.angpix)
        elif header_angpix > 0:
            angpix = header_angpix
        else:
            raise InputError(f"{what}: the map header gives no pixel size; pass --angpix")
    else:
        volume = np.asarray(to_numpy(source), dtype=REAL)
        what = "the map"
        if params.angpix is None:
            raise InputError("--angpix: give the pixel size of the map passed as an array")
        angpix = float(params.angpix)
    shape = volume.shape
    if volume.ndim != 3 or not shape[0] == shape[1] == shape[2]:
        raise InputError(f"{what}: the map must be a cube (N, N, N), got shape {shape} ([z, y, x])")
    if shape[0] % 2 or shape[0] < MIN_BOX_SIZE:
        raise InputError(f"{what}: the box size must be even and >= {MIN_BOX_SIZE}, got {shape[0]}")
    if params.box_size is not None and int(params.box_size) != shape[0]:
        raise InputError(f"--box {params.box_size}: only for --map phantom; {what} is {shape[0]} px "
                         f"(leave --box out or resample the map)")
    if not np.isfinite(volume).all():
        raise InputError(f"{what}: the map contains NaN or Inf values")
    return volume, angpix, str(source) if isinstance(source, (str, os.PathLike)) else "array"


def _poses_from_star(path, n_particles, angpix: float, ctf: bool) -> dict:
    """Angles, and shifts (px) and defocus when present, from the first n rows of a STAR table."""
    table = read_star_table(path, required=("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
    rows = len(table)
    n = rows if n_particles is None else int(n_particles)
    if n > rows:
        raise InputError(f"--n {n}: --orientations {path} holds only {rows} rows")
    table = table.iloc[:n]
    out = {"eulers_deg": table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(dtype=np.float64)}
    shifts = np.zeros((n, 2))
    found = False
    for axis, xy in enumerate("XY"):
        if f"rlnOrigin{xy}Angst" in table.columns:
            shifts[:, axis] = table[f"rlnOrigin{xy}Angst"].to_numpy(dtype=np.float64) / angpix
            found = True
        elif f"rlnOrigin{xy}" in table.columns:  # pre-3.1 files: pixels
            shifts[:, axis] = table[f"rlnOrigin{xy}"].to_numpy(dtype=np.float64)
            found = True
    if found:
        out["shifts_px"] = shifts
    if ctf and "rlnDefocusU" in table.columns:
        u = table["rlnDefocusU"].to_numpy(dtype=np.float64)
        v = table["rlnDefocusV"].to_numpy(dtype=np.float64) if "rlnDefocusV" in table.columns else u.copy()
        angle = (table["rlnDefocusAngle"].to_numpy(dtype=np.float64) if "rlnDefocusAngle" in table.columns
                 else np.zeros(n))
        if (u < 0).any() or (v < 0).any():
            raise InputError(f"--orientations {path}: negative defocus; RELION defocus is positive for underfocus")
        out["defocus"] = (u, v, angle)
    return out


def _draw_particles(params: SimulateParams, rng: np.random.Generator, angpix: float) -> dict:
    """Poses, shifts (px) and defocus of every particle, in the documented draw order."""
    if str(params.orientations) == "random":
        if params.n_particles is None:
            raise InputError("--n: give the number of particles to simulate")
        n = int(params.n_particles)
        rot = rng.uniform(-180.0, 180.0, n)
        tilt = np.rad2deg(np.arccos(rng.uniform(-1.0, 1.0, n)))
        psi = rng.uniform(-180.0, 180.0, n)
        drawn = {"eulers_deg": np.stack([rot, tilt, psi], axis=1)}
    else:
        drawn = _poses_from_star(params.orientations, params.n_particles, angpix, params.ctf)
        n = len(drawn["eulers_deg"])
    if "shifts_px" not in drawn:
        s = float(params.shift_max_px)
        drawn["shifts_px"] = rng.uniform(-s, s, (n, 2)) if s > 0 else np.zeros((n, 2))
    if params.ctf and "defocus" not in drawn:
        u = rng.uniform(float(params.defocus_min), float(params.defocus_max), n)
        v = np.maximum(u - rng.uniform(0.0, float(params.astigmatism), n), 0.0)
        drawn["defocus"] = (u, v, rng.uniform(0.0, 180.0, n))
    return drawn


def _star_columns(stack_path: Path, drawn: dict, params: SimulateParams, angpix: float) -> dict:
    n = len(drawn["eulers_deg"])
    width = max(6, len(str(n)))
    columns = {
        "rlnImageName": np.array([f"{i:0{width}d}@{stack_path.name}" for i in range(1, n + 1)], dtype=object),
        "rlnOpticsGroup": np.ones(n, dtype=np.int64),
        "rlnAngleRot": drawn["eulers_deg"][:, 0], "rlnAngleTilt": drawn["eulers_deg"][:, 1],
        "rlnAnglePsi": drawn["eulers_deg"][:, 2],
        "rlnOriginXAngst": drawn["shifts_px"][:, 0] * angpix, "rlnOriginYAngst": drawn["shifts_px"][:, 1] * angpix,
    }
    if params.ctf:
        u, v, angle = drawn["defocus"]
        columns.update(rlnDefocusU=u, rlnDefocusV=v, rlnDefocusAngle=angle)
        if float(params.bfactor) != 0:
            columns["rlnCtfBfactor"] = np.full(n, float(params.bfactor))
    columns["rlnRandomSubset"] = np.arange(n, dtype=np.int64) % 2 + 1
    return columns


def _project_all(volume, drawn: dict, optics: Optics, params: SimulateParams, device: Device,
                 timings: dict, show_progress: bool):
    """All noise-free images on the host, and the per-image pixel sums and sums of squares."""
    n_particles = len(drawn["eulers_deg"])
    n = optics.box_size
    batch = params.batch_size or (2048 if device.gpu is not None else 256)
    grid = PaddedGrid(n, float(params.pad), n // 2)
    images = np.empty((n_particles, n, n), dtype=REAL)
    sums = np.empty((n_particles, 2), dtype=np.float64)
    rotations = euler_to_matrix(drawn["eulers_deg"])
    if params.ctf:
        u, v, angle = drawn["defocus"]
        zeros = np.zeros(n_particles)
        ctf = CtfParams(u, v, angle, zeros, np.full(n_particles, float(params.bfactor)), np.ones(n_particles))
    bar = progress(n_particles, "projecting", show_progress)
    try:
        with device.use():
            t = time.perf_counter()
            volume_ftc = volume_to_ftc(device.put(volume), pad=grid.pad, r_max=grid.r_max)
            device.synchronize()
            timings["fourier_map"] = time.perf_counter() - t
            t = time.perf_counter()
            xp = device.xp
            for start in range(0, n_particles, batch):
                idx = slice(start, min(start + batch, n_particles))
                imgs = project_images(volume_ftc, rotations[idx], drawn["shifts_px"][idx], optics,
                                      ctf.take(idx) if params.ctf else None,
                                      pad=grid.pad, r_padded=grid.r_padded)
                sums[idx, 0] = to_numpy(xp.sum(imgs, axis=(1, 2), dtype=xp.float64))
                sums[idx, 1] = to_numpy(xp.sum(imgs.astype(xp.float64) ** 2, axis=(1, 2)))
                images[idx] = to_numpy(imgs)
                bar.update(idx.stop - idx.start)
            device.synchronize()
            timings["project"] = time.perf_counter() - t
    finally:
        bar.close()
    return images, sums


def _add_noise(images: np.ndarray, sums: np.ndarray, snr: float, rng: np.random.Generator) -> tuple[float, float]:
    """Add white Gaussian noise in place; returns (signal variance, noise sigma)."""
    count = images[0].size * len(images)
    mean = sums[:, 0].sum() / count
    signal_var = max(sums[:, 1].sum() / count - mean * mean, 0.0)
    if not 0 < snr < math.inf:
        return signal_var, 0.0
    if signal_var == 0:
        log.warning("the noise-free images are constant: the noise variance (signal / snr) is 0")
    sigma = math.sqrt(signal_var / snr)
    shape = images.shape[1:]
    for start in range(0, len(images), NOISE_CHUNK):
        stop = min(start + NOISE_CHUNK, len(images))
        images[start:stop] += REAL(sigma) * rng.standard_normal((stop - start,) + shape, dtype=REAL)
    return signal_var, sigma


def _write_outputs(star_path: Path, stack_path: Path, phantom_path: Path | None, images, volume,
                   angpix: float, blocks: dict) -> None:
    """Stack, then STAR (then phantom map); after a partial write, remove what this run wrote."""
    write_stack(stack_path, images, angpix)
    try:
        write_star(star_path, blocks)
        if phantom_path is not None:
            write_map(phantom_path, volume, angpix)
    except BaseException:
        for path in (stack_path, star_path):
            path.unlink(missing_ok=True)
        raise


def simulate(source, out_root, params: SimulateParams, *, device: Device = Device(), seed: int = 0,
             show_progress: bool = False, argv=None) -> dict:
    """Project a map into `<out_root>.mrcs` with their poses and CTFs in `<out_root>.star`.

    Parameters
    ----------
    source : "phantom", str or PathLike, or float array (N, N, N)
        The map: `phantom_volume(params.box_size, angpix, params.phantom_seed)`, an MRC file, or an
        array indexed [z, y, x] (then `params.angpix` is required). N even.
    out_root : str or PathLike
        Output root; a trailing .star or .mrcs is dropped. Its folder must exist. The STAR file
        names the images `000001@<root name>.mrcs`, relative to its own folder. For the phantom,
        the map is also written to `<out_root>_phantom.mrc`.
    params : SimulateParams
    device : Device
        Where the projections are computed (the random draws always happen on the host).
    seed : int
        Seed of the one numpy Generator behind every random draw (module docstring).

    Returns
    -------
    dict
        Summary: paths, n_particles, box_size, angpix, noise, device, timings_s, parameters.

    Raises
    ------
    InputError
        One line naming the option: missing or corrupt map (from `io`), non-cubic or odd map,
        --n < 1, --angpix <= 0, --defocus_min > --defocus_max, negative --snr, unwritable --o.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    seed = _number("--seed", seed, minimum=0, integer=True)
    star_path, stack_path = _output_paths(out_root)
    t = time.perf_counter()
    volume, angpix, map_name = _load_volume(source, params)
    timings["read_map"] = time.perf_counter() - t
    phantom_path = stack_path.with_name(stack_path.stem + "_phantom.mrc") if map_name == PHANTOM else None
    box = volume.shape[0]
    optics = Optics(angpix=angpix, voltage_kv=params.voltage_kv, cs_mm=params.cs_mm,
                    amp_contrast=params.amp_contrast, box_size=box, name="opticsGroup1")
    rng = np.random.default_rng(seed)
    drawn = _draw_particles(params, rng, angpix)
    n_particles = len(drawn["eulers_deg"])
    log.info("simulating %d particles, box %d, %.4g A/px, pad %g on %s", n_particles, box, angpix,
             params.pad, device.name)
    images, sums = _project_all(volume, drawn, optics, params, device, timings, show_progress)
    t = time.perf_counter()
    signal_var, sigma = _add_noise(images, sums, float(params.snr), rng)
    timings["noise"] = time.perf_counter() - t
    blocks = particle_star_blocks([optics], _star_columns(stack_path, drawn, params, angpix))
    t = time.perf_counter()
    _write_outputs(star_path, stack_path, phantom_path, images, volume, angpix, blocks)
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    return {
        "omlrelion_version": omlrelion.__version__,
        "command": list(argv) if argv is not None else None,
        "map": map_name, "star": str(star_path), "stack": str(stack_path),
        "phantom_map": str(phantom_path) if phantom_path else None,
        "n_particles": n_particles, "box_size": box, "angpix": angpix, "seed": seed,
        "ctf": bool(params.ctf), "snr": float(params.snr), "signal_variance": signal_var, "noise_sigma": sigma,
        "device": {"spec": "cpu" if device.gpu is None else f"gpu:{device.gpu}", "name": device.name},
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(params).items()},
        "python": sys.version.split()[0],
        "timings_s": timings,
    }
