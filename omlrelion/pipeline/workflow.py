"""One function per rule of the Snakemake workflow (`workflow/`, `rules/`): paths in, paths out.

Data flow of one run (dataset x parameter set), iteration i = 1..F:

    STAR + stacks --preprocess--> particle store (h5: images, CTF, poses, half, shard)
    initial_model (with a reference map)   -> start/: both halves' reference, noise spectra, sampling, poses
    expectation_shard(half h, shard s, i)  -> sums_h{h}_s{s}.h5 (padded data + weight, noise sums),
                                              poses_h{h}_s{s}.h5
    merge_sums(h, i)                       -> sums_h{h}.h5 (shards added, Hermitian-repaired, symmetrised)
    model_update(i)                        -> model.json (gold-standard FSC from the two halves' sums,
                                              resolution, next r_max, final/converged flags; with a pose
                                              search sigma2, sigma_offset, pose changes, RELION's counters)
    reconstruct_half(h, i)                 -> half map (h5 + RELION-named MRC), MAP with tau2 from the FSC
    next_sampling(i) (pose search)         -> sampling.json: the sampling of iteration i + 1
    final iteration F: reconstruct_unfil(h) and reconstruct_joined -> run_half{h}_class001_unfil.mrc,
                                              run_class001.mrc; postprocess, export_particles, run_summary

Without a pose search the expectation keeps each particle's current pose (from the STAR file at
iteration 1, then from the previous iteration's poses file of its shard), back-projects its shard
and scores every particle against its half's previous map at that pose (normalised
cross-correlation, `score` in the poses file). With `refine.pose_search_order` it is the
refinement engine's E-step of its shard (`refine.autorefine.expect_particles`, what `omlrelion
refine` runs on a whole half set), with the noise spectrum, offset prior and sampling the previous
model_update and next_sampling chose: RELION's 3D auto-refine split into file-level jobs.

Schedule (RELION's auto-refine, refinement spec 4.4 and 5.2-5.7): iteration 1 back-projects up to
r_max from `initial_resolution_A` (all data when null), or, from a reference map, searches up to
r* of `ini_high_A` + incr_size; after each iteration r* is the last shell with SSNR = FSC/(1-FSC)
>= 1, and the next r_max is r* + incr_size; the final iteration uses all data up to the limit
(`maxres_A` or Nyquist).
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

import omlrelion
from omlrelion import backend
from omlrelion.backend import Device, gpu_count, to_numpy
from omlrelion.ctf.ctf import CtfParams, ctf_2d
from omlrelion.errors import InputError
from omlrelion.fourier.layout import rfft2_centred, shift_2d
from omlrelion.fourier.projector import extract_slices, volume_to_ftc
from omlrelion.fourier.symmetrise import hermitian_repair, symmetrise
from omlrelion.geometry.euler import euler_to_matrix
from omlrelion.geometry.grids import PaddedGrid
from omlrelion.geometry.symmetry import point_group_matrices
from omlrelion.io import h5
from omlrelion.io.mrc import ImageStack, map_geometry, read_map, write_map
from omlrelion.io.star import read_particles, write_particles, write_star
from omlrelion.pipeline.simulate import SimulateParams, simulate
from omlrelion.reconstruct.autotune import plan_for
from omlrelion.reconstruct.fsc import (
    MINRES_MAP,
    fsc,
    fsc_from_sums,
    resolution_at,
    resolution_shell,
    tau2_from_fsc,
)
from omlrelion.reconstruct.gridding import soft_sphere
from omlrelion.reconstruct.insert import CtfMode, insert_particles
from omlrelion.reconstruct.plan import run_plan
from omlrelion.refine.autorefine import (
    ACCURACY_PARTICLES,
    SIGMA2_PARTICLES,
    RefineOptions,
    accuracy,
    direction_distribution,
    direction_priors,
    expect_particles,
    high_fsc_at_limit,
    low_pass,
    join_shell,
    low_resolution_join,
    next_perturbation,
    next_r_max,
    particle_diameter,
    resident_images,
    solvent_flatten,
    starting_schedule,
    starting_sigma2,
    sum_noise,
)
from omlrelion.refine.maximization import update_sigma2, update_sigma_offset
from omlrelion.refine.outputs import write_model_star
from omlrelion.refine.schedule import Schedule, hidden_variable_changes
from omlrelion.units import r_max_for_resolution, relion_round

log = logging.getLogger(__name__)

BATCH = 256
_GPU_LOCKS: list = []


# --------------------------------------------------------------------------- helpers
def job_devices(gpus: int = 0) -> list[Device]:
    """Where a job computes: the `gpus` GPUs it asked for (resources gpu), or the host.

    Of the visible GPUs it takes the first that no other omlrelion job on this machine holds (an
    flock on a file named by the GPU's PCI bus id, kept until the process ends), so that concurrent
    local jobs spread over a workstation's GPUs; when fewer are free it runs on those (sharing GPU 0
    when none is). On a machine where CuPy sees no GPU, a job that asked for N > 1 GPUs runs the
    same multi-device algorithm on N simulated host devices (the same map), one that asked for 0
    or 1 on the host.
    """
    gpus = int(gpus or 0)
    if gpu_count() == 0:
        return [Device()] * max(gpus, 1)
    if gpus == 0:
        return [Device()]
    held = []
    for i in range(gpu_count()):
        if len(held) == gpus:
            break
        bus = backend.cp.cuda.Device(i).pci_bus_id.replace(":", "_")
        fd = os.open(os.path.join(tempfile.gettempdir(), f"omlrelion-gpu-{bus}.lock"), os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        _GPU_LOCKS.append(fd)
        held.append(Device(i))
    if not held:
        log.warning("every visible GPU is held by another omlrelion job; sharing GPU 0")
        return [Device(0)]
    if len(held) < gpus:
        log.warning("%d GPUs asked for, %d free: running on GPU %s", gpus, len(held),
                    ",".join(str(d.gpu) for d in held))
    return held


def job_device(gpus: int = 0) -> Device:
    """The one device of a single-device job (`job_devices` with at most one GPU)."""
    return job_devices(min(int(gpus or 0), 1))[0]


def _compression(opts: dict) -> h5.Compression:
    return h5.Compression(**opts)


def _write_json(path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    os.replace(tmp, path)


def _read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the JSON file ({exc})") from exc


def _dtype(precision: str):
    if precision not in ("single", "double"):
        raise InputError(f"precision {precision!r}: expected single or double")
    return np.float32 if precision == "single" else np.float64


# --------------------------------------------------------------------------- input checks
def check_particles(star_path, *, n_shards: int, ctf: bool, box_size: int | None = None, reference=None) -> int:
    """Parse-time check of a particle STAR file and its stacks; returns the number of particles.

    Raises InputError naming the file: the io checks (labels, values, stacks, headers, image
    numbers), optics groups of different box or pixel size, a downsampling box_size larger than
    the images, n_shards larger than a half set, a `reference` map of another box or pixel size.
    """
    required = ("rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi") + (("rlnDefocusU",) if ctf else ())
    particles = read_particles(star_path, require=required)
    _single_geometry(particles)
    check_box(box_size, particles.optics[0].box_size, star_path)
    for stack in np.unique(particles.image_stacks):
        with ImageStack(stack) as images:
            rows = particles.image_stacks == stack
            top = int(particles.image_indices[rows].max()) + 1
            if top > images.n_images:
                raise InputError(f"{star_path}: image {top}@{stack} is out of range: the stack holds "
                                 f"{images.n_images} images")
            if images.box_size != particles.optics[0].box_size:
                raise InputError(f"{stack}: images are {images.box_size} px, {star_path} says "
                                 f"{particles.optics[0].box_size} px")
    if reference is not None:
        optics = particles.optics[0]
        box = box_size or optics.box_size
        check_reference(reference, box_size=box, angpix=optics.angpix * optics.box_size / box, what=star_path)
    halves = _random_halves(particles, seed=0)
    smallest = min(int((halves == 1).sum()), int((halves == 2).sum()))
    _check_shards(n_shards, smallest, star_path)
    return particles.n_particles


def check_reference(path, *, box_size: int, angpix: float, what) -> None:
    """Parse-time check of a dataset's reference map: a readable MRC of box_size^3 voxels at the
    particles' pixel size (both after preprocess.box_size); InputError naming the file otherwise."""
    shape, ref_angpix = map_geometry(path)
    if shape != (box_size,) * 3:
        raise InputError(f"{path}: map of {shape[2]}x{shape[1]}x{shape[0]} px, the particles of {what} (after "
                         f"preprocess.box_size) are {box_size} px; give a map of {box_size}^3 px at {angpix:g} A/px "
                         f"(relion_image_handler --rescale_angpix {angpix:g} --new_box {box_size})")
    if abs(ref_angpix - angpix) > 1e-3 * angpix:
        raise InputError(f"{path}: pixel size {ref_angpix:g} A, the particles of {what} (after "
                         f"preprocess.box_size) have {angpix:g} A; rescale the map or fix its header")


def check_box(box_size: int | None, image_box: int, what) -> None:
    """InputError when preprocess.box_size would enlarge the images."""
    if box_size is not None and box_size > image_box:
        raise InputError(f"preprocess.box_size = {box_size} is larger than the {image_box} px images of {what}; "
                         f"downsampling only")


def check_shards(n_shards: int, n_particles: int, what) -> None:
    """InputError when a half set (about n_particles / 2) cannot fill n_shards shards."""
    _check_shards(n_shards, n_particles // 2, what)


def _check_shards(n_shards: int, per_half: int, what) -> None:
    if n_shards > per_half:
        raise InputError(f"preprocess.n_shards = {n_shards} is larger than the number of particles in a half "
                         f"set of {what} ({per_half}); lower preprocess.n_shards")


def _single_geometry(particles) -> None:
    geometry = {(o.box_size, o.angpix) for o in particles.optics}
    if len(geometry) != 1:
        raise InputError(f"{particles.star_path}: optics groups differ in box or pixel size {sorted(geometry)}; "
                         f"the workflow needs one geometry (re-extract, or run each group as its own dataset)")


def _random_halves(particles, seed: int) -> np.ndarray:
    subset = particles.random_subset
    if np.all(np.isin(subset, (1, 2))):
        return subset.astype(np.int8)
    if np.any(subset != 0):
        raise InputError(f"{particles.star_path}: rlnRandomSubset is set for some particles only; RELION "
                         f"needs it for all (1 or 2) or for none")
    return np.random.default_rng(seed).integers(1, 3, particles.n_particles).astype(np.int8)


# --------------------------------------------------------------------------- simulate, preprocess
def simulate_dataset(out_star, *, opts: dict) -> dict:
    """The built-in demo data: `omlrelion simulate --map phantom` into out_star (+ .mrcs, _phantom.mrc)."""
    opts = dict(opts)
    seed = opts.pop("seed")
    params = SimulateParams(n_particles=opts.pop("n_particles"), box_size=opts.pop("box_size"),
                            angpix=opts.pop("angpix"), **opts)
    return simulate("phantom", Path(out_star).with_suffix(""), params, seed=seed)


def _fourier_crop(images: np.ndarray, new_box: int) -> np.ndarray:
    """Resample (k, n, n) images to (k, m, m) by Fourier cropping (grey values kept; centre n//2 -> m//2)."""
    n = images.shape[-1]
    if new_box == n:
        return images
    f = np.fft.rfft2(images, norm="forward")
    h = new_box // 2
    rows = np.r_[0:h, n - h:n]
    return np.fft.irfft2(f[:, rows, :h + 1], s=(new_box, new_box), norm="forward").astype(np.float32)


def _normalise(images: np.ndarray, radius: float, remove_ramp: bool, first_row: int, star) -> np.ndarray:
    """relion_preprocess --norm: ramp (plane) removal, then background mean 0 and stddev 1."""
    n = images.shape[-1]
    y, x = np.mgrid[:n, :n] - n // 2
    bg = (x * x + y * y > radius * radius).ravel()
    flat = images.reshape(len(images), -1).astype(np.float64)
    if remove_ramp:
        design = np.stack([x.ravel(), y.ravel(), np.ones(n * n)], axis=1)
        coef = flat[:, bg] @ np.linalg.pinv(design[bg]).T
        flat = flat - coef @ design.T
    mean = flat[:, bg].mean(axis=1, keepdims=True)
    std = flat[:, bg].std(axis=1, keepdims=True)
    if np.any(std <= 0):
        row = first_row + int(np.flatnonzero(std.ravel() <= 0)[0])
        raise InputError(f"{star}: row {row + 1}: the image background is constant; set preprocess.normalise: false")
    return ((flat - mean) / std).reshape(images.shape).astype(np.float32)


def preprocess(star_path, out_store, *, opts: dict) -> dict:
    """STAR + stacks -> particle store: downsampling, normalisation, contrast, halves, shards.

    opts: box_size (null keeps), normalise, bg_radius_px (null: 0.375 box), remove_ramp,
    invert_contrast, n_shards (per half), seed (random halves when the STAR has none),
    compression (codec, level, shuffle). Absent CTF labels take RELION's defaults.
    """
    t0 = time.perf_counter()
    particles = read_particles(star_path, require=("rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
    _single_geometry(particles)
    optics0 = particles.optics[0]
    box = int(opts["box_size"] or optics0.box_size)
    check_box(box, optics0.box_size, star_path)
    if box % 2 or box < 8:
        raise InputError(f"preprocess.box_size = {box}: must be even and >= 8")
    scale = box / optics0.box_size
    angpix = optics0.angpix / scale
    radius = opts["bg_radius_px"] if opts["bg_radius_px"] is not None else 0.375 * box
    if not 0 < radius < box / 2:
        raise InputError(f"preprocess.bg_radius_px = {radius}: must lie in (0, {box // 2})")
    halves = _random_halves(particles, int(opts["seed"]))
    n_shards = int(opts["n_shards"])
    shards = np.zeros(particles.n_particles, dtype=np.int32)
    for half in (1, 2):
        members = np.flatnonzero(halves == half)
        _check_shards(n_shards, len(members), star_path)
        shards[members] = np.arange(len(members)) % n_shards + 1
    optics = [replace(o, box_size=box, angpix=angpix) for o in particles.optics]
    hash_ = h5.config_hash({"star": str(star_path), **opts})
    stacks: dict[str, ImageStack] = {}
    try:
        with h5.ParticleStoreWriter(out_store, n_particles=particles.n_particles, box_size=box, angpix=angpix,
                                    optics=optics, attrs={"config_hash": hash_, "n_shards": n_shards,
                                                          "source_star": str(star_path)},
                                    compression=_compression(opts["compression"])) as store:
            for start in range(0, particles.n_particles, BATCH):
                rows = np.arange(start, min(start + BATCH, particles.n_particles))
                images = np.empty((len(rows), optics0.box_size, optics0.box_size), dtype=np.float32)
                for stack in np.unique(particles.image_stacks[rows]):
                    sel = particles.image_stacks[rows] == stack
                    if stack not in stacks:
                        stacks[stack] = ImageStack(stack)
                    images[sel] = stacks[stack].read(particles.image_indices[rows[sel]])
                images = _fourier_crop(images, box)
                if opts["normalise"]:
                    images = _normalise(images, radius, opts["remove_ramp"], start, star_path)
                if opts["invert_contrast"]:
                    images = -images
                store.write_images(start, images)
            store.write_columns({
                "eulers_deg": particles.eulers_deg, "shifts_px": particles.shifts_px * scale,
                "defocus_u": particles.defocus_u, "defocus_v": particles.defocus_v,
                "defocus_angle_deg": particles.defocus_angle_deg, "phase_shift_deg": particles.phase_shift_deg,
                "ctf_bfactor": particles.ctf_bfactor, "ctf_scale": particles.ctf_scale,
                "optics_group": particles.optics_group, "half": halves, "shard": shards,
                "star_row": np.arange(particles.n_particles, dtype=np.int64)})
    finally:
        for s in stacks.values():
            s.close()
    log.info("preprocessed %d particles from %s: box %d, %.4f A/px, %d shards per half in %.1f s",
             particles.n_particles, star_path, box, angpix, n_shards, time.perf_counter() - t0)
    return {"n_particles": particles.n_particles, "box_size": box, "angpix": angpix}


# --------------------------------------------------------------------------- expectation
def _ctf_params(store: h5.ParticleStore, index: np.ndarray, columns: dict) -> CtfParams:
    return CtfParams(*(columns[c][index] for c in ("defocus_u", "defocus_v", "defocus_angle_deg",
                                                   "phase_shift_deg", "ctf_bfactor", "ctf_scale")))


def _scores(volume_ftc, images, rotations, shifts_px, optics, ctf, *, grid: PaddedGrid, apply_ctf: bool):
    """Normalised cross-correlation of each image with its reference projection, |k| <= r_max, DC out."""
    xp = backend.get_xp(volume_ftc)
    n = images.shape[-1]
    model = extract_slices(volume_ftc, rotations, box_size=n, pad=grid.pad, r_padded=grid.r_padded)
    if apply_ctf:
        model = model * ctf_2d(optics, ctf, xp=xp, dtype=images.dtype)
    x = shift_2d(rfft2_centred(images), np.asarray(shifts_px, dtype=np.float64))
    ky = xp.fft.fftfreq(n, 1.0 / n)[:, None]
    kx = xp.arange(n // 2 + 1)[None, :]
    mask = ((kx * kx + ky * ky) <= grid.r_max**2) & ~((kx == 0) & (ky == 0))
    weight = xp.where(kx == 0, 1.0, 2.0) * mask  # the rfft half counts twice except x = 0
    num = xp.sum(weight * (xp.conj(model) * x).real, axis=(1, 2))
    den = xp.sqrt(xp.sum(weight * xp.abs(model) ** 2, axis=(1, 2)) * xp.sum(weight * xp.abs(x) ** 2, axis=(1, 2)))
    return to_numpy(xp.where(den > 0, num / xp.where(den > 0, den, 1.0), 0.0)).astype(np.float64)


def search_options(search: dict, *, symmetry: str, pad: float = 2.0) -> RefineOptions:
    """The refinement engine's options for the workflow's pose search (config section refine; the
    padding only matters to the searches and accuracy estimates)."""
    return RefineOptions(healpix_order=int(search["pose_search_order"]), offset_range_px=float(search["offset_range_px"]),
                         offset_step_px=float(search["offset_step_px"]), pad=float(pad),
                         oversampling=int(search["oversampling"]), schedule=bool(search["sampling_schedule"]),
                         max_order=int(search["max_healpix_order"]), auto_local_order=int(search["auto_local_order"]),
                         particle_diameter_A=search["particle_diameter_A"], zero_mask=bool(search["zero_mask"]),
                         perturb=float(search["perturb"]), random_seed=int(search["seed"]),
                         sigma_offset_A=float(search["sigma_offset_A"]), symmetry=symmetry, batch=BATCH)


def _search_shard(store, index, columns, volume, eulers, shifts, model: dict, sampling: dict, *, half: int,
                  r_max: int, ropts: RefineOptions, apply_ctf: bool, device: Device):
    """The pose search of one shard (`refine.autorefine.expect_particles`, the engine's E-step) from
    its poses `eulers`, `shifts` against its half map `volume`, with the half's noise spectrum,
    offset prior and direction prior (when learned at this order) of `model` (the previous
    model_update) and the sampling of `sampling` (the previous iteration's sampling job). Returns
    (data, weight on the host, eulers, shifts, Pmax, significant samples, noise sums)."""
    search = model["search"]
    schedule = Schedule(**sampling["schedule"])
    prior = direction_priors(search.get("pdf_direction"), search.get("pdf_order"), schedule.order)[half - 1]
    images = resident_images(store.read_images(index), device)
    ctf = _ctf_params(store, index, columns)
    eulers, shifts = np.array(eulers, dtype=np.float64), np.array(shifts, dtype=np.float64)
    pmax, n_sig = np.zeros(len(index)), np.zeros(len(index), dtype=np.int64)
    data = weight = None
    noise = []
    for group in np.unique(columns["optics_group"][index]):
        rows = np.flatnonzero(columns["optics_group"][index] == group)
        found = expect_particles(images, ctf, store.optics[group], rows, volume, search["sigma2"][half - 1],
                                 search["sigma_offset_A"][half - 1], eulers[rows], shifts[rows], schedule=schedule,
                                 perturb=float(sampling["perturb"]), r_max=r_max, opts=ropts, device=device,
                                 apply_ctf=apply_ctf, direction_prior=prior)
        eulers[rows], shifts[rows], pmax[rows], n_sig[rows] = (found.eulers, found.shifts_px, found.pmax,
                                                               found.n_significant)
        d, w = to_numpy(found.data), to_numpy(found.weight)
        data, weight = (d, w) if data is None else (data + d, weight + w)
        noise.append(found.noise)
    return data, weight, eulers, shifts, pmax, n_sig, sum_noise(noise)


def _starting_search(store, search: dict, symmetry: str) -> tuple[dict, Schedule]:
    """The pose search's part of the model before its first search, as `refine()` starts: each
    half's noise spectrum from its first 1000 particles of the store, the offset prior of the
    config, no perturbation yet; and the first sampling."""
    ropts = search_options(search, symmetry=symmetry)
    half = store.column("half")
    sigma2 = [starting_sigma2(store.read_images(np.flatnonzero(half == h)[:SIGMA2_PARTICLES]), ropts,
                              angpix=store.angpix).tolist() for h in (1, 2)]
    return ({"sigma2": sigma2, "sigma_offset_A": [ropts.sigma_offset_A] * 2, "perturb": 0.0,
             "angle_change_deg": None, "offset_change_A": 0.0, "mean_pmax": None}, starting_schedule(ropts))


def initial_model(store_path, reference_path, out_model, out_sampling, out_volumes, out_poses, *, opts: dict) -> dict:
    """A pose-search run's starting state from a reference map (folder `start/`, iteration 0), as
    `omlrelion refine --ref` starts: the map low-passed to `ini_high_A` as both halves' reference,
    each half's noise spectrum from its first 1000 particles, the offset prior and the first
    sampling of the config, and the input poses (their rounded offsets centre the first
    translational search). Iteration 1 is then a search like every later one.

    opts: ini_high_A, incr_size, maxres_A, first (first_iteration()), search, symmetry, compression.
    out_volumes: the two halves' volume stores; out_poses: {(half, shard): poses file}.
    """
    search = opts["search"]
    ropts = search_options(search, symmetry=opts["symmetry"])
    volume, _ = read_map(reference_path)
    with h5.ParticleStore(store_path) as store:
        box, angpix = store.box_size, store.angpix
        check_reference(reference_path, box_size=box, angpix=angpix, what=store_path)
        if not np.isfinite(volume).all():
            raise InputError(f"{reference_path}: the map holds NaN or Inf values")
        half, shard = store.column("half"), store.column("shard")
        eulers, shifts = store.column("eulers_deg"), store.column("shifts_px")
        search_state, schedule = _starting_search(store, search, opts["symmetry"])
    start = low_pass(volume.astype(np.float64), angpix=angpix, resolution_A=float(opts["ini_high_A"])).astype(np.float32)
    compression = _compression(opts["compression"])
    for h, path in zip((1, 2), out_volumes):
        h5.write_volume(path, start, attrs={"box_size": box, "angpix": angpix, "iteration": 0, "half": h,
                                            "config_hash": h5.config_hash(opts)}, compression=compression)
    for (h, s), path in out_poses.items():
        index = np.flatnonzero((half == h) & (shard == s))
        h5.write_table(path, {"index": index, "eulers_deg": eulers[index], "shifts_px": shifts[index],
                              "score": np.full(len(index), np.nan)},
                       attrs={"box_size": box, "angpix": angpix, "iteration": 0, "half": h, "shard": s,
                              "config_hash": h5.config_hash(opts)}, compression=compression)
    r_star = relion_round(box * angpix / float(opts["ini_high_A"]))
    limit = r_max_for_resolution(box, angpix, opts["maxres_A"])
    next_is_final = bool(opts["first"]["final"])
    model = {"omlrelion_version": omlrelion.__version__, "iteration": 0, "box_size": box, "angpix": angpix,
             "reference": str(reference_path), "ini_high_A": float(opts["ini_high_A"]), "r_star": r_star,
             "current_resolution_A": box * angpix / r_star, "current_resolution_inv_A": r_star / (box * angpix),
             "incr_size": int(opts["incr_size"]), "iterations_without_resolution_gain": 0, "converged": False,
             "final": False, "next_is_final": next_is_final,
             "next_r_max": limit if next_is_final else min(limit, next_r_max(r_star, int(opts["incr_size"]), box)),
             "search": {**search_state, "high_fsc_at_limit": False, "schedule": asdict(schedule), "converged": False}}
    _write_json(out_model, model)
    _write_json(out_sampling, {"iteration": 1, "schedule": asdict(schedule),
                               "perturb": next_perturbation(0.0, ropts.perturb, seed=ropts.random_seed, iteration=0)})
    log.info("start: %s low-passed to %.1f A as both halves' reference, r* %d, first r_max %d", reference_path,
             float(opts["ini_high_A"]), r_star, model["next_r_max"])
    return model


def first_iteration(schedule: dict) -> dict:
    """What iteration 1 needs of the schedule: its resolution limit and whether it is the final one."""
    last = schedule["max_iterations"] if schedule["until_converged"] else schedule["iterations"]
    return {"initial_resolution_A": schedule["initial_resolution_A"], "final": last == 1}


def iteration_schedule(schedule: dict, iteration: int) -> dict:
    """What model_update of `iteration` needs of the schedule (so that other changes do not rerun it)."""
    if schedule["until_converged"]:
        out = {"mode": "converge", "last_allowed": iteration + 1 >= schedule["max_iterations"]}
    else:
        out = {"mode": "fixed", "next_is_final": iteration + 1 >= schedule["iterations"]}
    if iteration == 1:
        out.update(first_is_final=first_iteration(schedule)["final"], incr_size=schedule["incr_size"])
    return out


def expectation_shard(store_path, out_sums, out_poses, *, half: int, shard: int, iteration: int, opts: dict,
                      poses_in=None, model_in=None, reference=None, sampling_in=None,
                      device: Device = Device()) -> dict:
    """One shard of one half set: poses -> poses file, back-projection -> partial sums.

    opts: pad, maxres_A (resolution limit; null: Nyquist), ctf, precision, compression, for
    iteration 1 `first` (first_iteration()), and with a pose search `search` (the config's refine
    options, search_options()) and `symmetry`. poses_in / model_in / reference: the shard's poses
    file, model.json and half map of the previous iteration (iteration >= 2); sampling_in: the
    previous iteration's sampling.json (pose search).

    Without a pose search, or in iteration 1 of a search without a reference map, the poses are
    kept (the STAR file's, then the previous iteration's) and each particle is scored against the
    reference (normalised cross-correlation). Otherwise the job is the refinement engine's E-step of
    this shard (`_search_shard`).
    """
    t0 = time.perf_counter()
    dtype = _dtype(opts["precision"])
    search = opts.get("search")
    with h5.ParticleStore(store_path) as store:
        columns = {c: store.column(c) for c in ("half", "shard", "eulers_deg", "shifts_px", "optics_group",
                                               "defocus_u", "defocus_v", "defocus_angle_deg", "phase_shift_deg",
                                               "ctf_bfactor", "ctf_scale")}
        index = np.flatnonzero((columns["half"] == half) & (columns["shard"] == shard))
        if index.size == 0:
            raise InputError(f"{store_path}: half {half}, shard {shard} holds no particle")
        box, angpix = store.box_size, store.angpix
        limit = r_max_for_resolution(box, angpix, opts["maxres_A"])
        if model_in is None:
            first = opts["first"]
            r_max = limit if first["final"] else min(limit, r_max_for_resolution(box, angpix, first["initial_resolution_A"]))
            eulers, shifts = columns["eulers_deg"][index], columns["shifts_px"][index]
        else:
            model = _read_json(model_in)
            r_max = limit if model["next_is_final"] else min(limit, int(model["next_r_max"]))
            prev, _ = h5.read_table(poses_in, expect={"iteration": iteration - 1, "half": half, "shard": shard})
            if not np.array_equal(prev["index"], index):
                raise InputError(f"{poses_in}: its particles are not those of half {half}, shard {shard} of {store_path}")
            eulers, shifts = prev["eulers_deg"], prev["shifts_px"]
        grid = PaddedGrid(box, float(opts["pad"]), r_max)
        xp = device.xp
        volume = None
        if reference is not None:
            volume, _ = h5.read_volume(reference, expect={"box_size": box, "angpix": angpix, "half": half,
                                                          "iteration": iteration - 1})
        scores = np.full(len(index), np.nan)
        n_significant = noise = None
        if search is not None and volume is not None:
            ropts = search_options(search, pad=grid.pad, symmetry=opts["symmetry"])
            sampling = _read_json(sampling_in)
            if int(sampling["iteration"]) != iteration:
                raise InputError(f"{sampling_in}: the sampling of iteration {sampling['iteration']}, "
                                 f"not {iteration}; rerun the job that writes it")
            data, weight, eulers, shifts, scores, n_significant, noise = _search_shard(
                store, index, columns, volume, eulers, shifts, model, sampling, half=half, r_max=r_max, ropts=ropts,
                apply_ctf=bool(opts["ctf"]), device=device)
        else:
            with device.use():
                ref_ftc = (None if volume is None
                           else volume_to_ftc(device.put(volume.astype(dtype)), pad=grid.pad, r_max=r_max))
                data = xp.zeros(grid.shape, dtype=np.result_type(dtype, np.complex64))
                weight = xp.zeros(grid.shape, dtype=dtype)
                mode = CtfMode(apply=bool(opts["ctf"]))
                for group in np.unique(columns["optics_group"][index]):
                    members = np.flatnonzero(columns["optics_group"][index] == group)
                    optics = store.optics[group]
                    for start in range(0, len(members), BATCH):
                        sel = members[start:start + BATCH]
                        rows = index[sel]
                        images = device.put(store.read_images(rows).astype(dtype))
                        rotations = euler_to_matrix(eulers[sel])
                        ctf = _ctf_params(store, rows, columns)
                        insert_particles(data, weight, images, rotations, shifts[sel], optics, ctf, mode=mode,
                                         pad=grid.pad, r_padded=grid.r_padded)
                        if ref_ftc is not None:
                            scores[sel] = _scores(ref_ftc, images, device.put(rotations), shifts[sel], optics, ctf,
                                                  grid=grid, apply_ctf=mode.apply)
                data, weight = to_numpy(data), to_numpy(weight)
    data, weight = data.astype(np.result_type(dtype, np.complex64)), weight.astype(dtype)
    attrs = {"box_size": box, "angpix": angpix, "pad": grid.pad, "r_max": r_max, "iteration": iteration,
             "half": half, "shard": shard, "n_particles": len(index), "config_hash": h5.config_hash(opts),
             "precision": opts["precision"]}
    compression = _compression(opts["compression"])
    table = {"index": index, "eulers_deg": eulers, "shifts_px": shifts, "score": scores}
    if n_significant is not None:
        table["n_significant"] = n_significant
    h5.write_table(out_poses, table,
                   attrs={k: attrs[k] for k in ("box_size", "angpix", "iteration", "half", "shard", "config_hash")},
                   compression=compression)
    h5.write_sums(out_sums, data, weight, attrs=attrs, compression=compression, noise=noise)
    log.info("iteration %d, half %d, shard %d: %d particles %s to r_max %d on %s in %.1f s", iteration, half, shard,
             len(index), "searched and back-projected" if n_significant is not None else "back-projected", r_max,
             device.name, time.perf_counter() - t0)
    return attrs


# --------------------------------------------------------------------------- merge, model update
def merge_sums(shard_paths, out_sums, *, half: int, iteration: int, opts: dict) -> dict:
    """Add the shards' sums of one half, Hermitian-repair and symmetrise them (opts: symmetry, compression)."""
    data = weight = first = None
    n = 0
    noise = []
    for path in shard_paths:
        expect = {"iteration": iteration, "half": half, **(first or {})}
        d, w, attrs = h5.read_sums(path, expect=expect)
        if first is None:
            first = {k: attrs[k] for k in ("box_size", "angpix", "pad", "r_max", "config_hash", "precision")}
            data, weight = d, w
        else:
            data += d
            weight += w
        n += int(attrs["n_particles"])
        noise.append(h5.read_noise(path, expect=expect))
    if any(noise) and not all(noise):
        raise InputError(f"{shard_paths[0]}: some shards of half {half} have noise sums and some not; rerun them")
    grid = PaddedGrid(int(first["box_size"]), float(first["pad"]), int(first["r_max"]))
    hermitian_repair(data, weight)
    matrices = point_group_matrices(opts["symmetry"])
    if len(matrices) > 1:
        data, weight = symmetrise(data, weight, matrices, grid.r_padded)
    attrs = {**first, "iteration": iteration, "half": half, "n_particles": n, "symmetry": opts["symmetry"].upper(),
             "config_hash": h5.config_hash({**opts, "shards": first["config_hash"]})}
    merged = {k: sum(part[k] for part in noise) for k in noise[0]} if noise[0] else None
    h5.write_sums(out_sums, data, weight, attrs=attrs, compression=_compression(opts["compression"]), noise=merged)
    return attrs


def _first_below(curve, threshold: float) -> int:
    below = np.flatnonzero(np.asarray(curve)[1:] < threshold)
    return int(below[0]) + 1 if below.size else len(curve)


def _read_poses(paths, iteration: int):
    """The poses files of one iteration joined, in particle order: (index, eulers, shifts, score)."""
    tables = [h5.read_table(path, expect={"iteration": iteration})[0] for path in paths]
    index = np.concatenate([t["index"] for t in tables])
    order = np.argsort(index, kind="stable")
    return (index[order], np.concatenate([t["eulers_deg"] for t in tables])[order],
            np.concatenate([t["shifts_px"] for t in tables])[order], np.concatenate([t["score"] for t in tables])[order])


def _search_update(sums1, sums2, *, iteration: int, search: dict, symmetry: str, final: bool, gain: bool, curve,
                   current_size: int, prev: dict | None, angpix: float, poses=(), prev_poses=(), prev_sampling=None,
                   store_path=None) -> dict:
    """The pose search's part of the model (RELION's M-step and schedule, spec 4.5, 5.2, 5.6): each
    half's noise spectrum and offset prior from its merged noise sums (after iteration 1 of a run
    without a reference map, which searched nothing: the starting spectrum of the half's first 1000
    particles in `store_path`), the mean angle and offset changes against the previous iteration,
    the no-gain and no-large-change counters, and whether the FSC is high at the edge of the
    iteration's image size (`current_size`)."""
    ov = int(search["oversampling"])
    if prev is None:
        with h5.ParticleStore(store_path) as store:
            out, schedule = _starting_search(store, search, symmetry)
    else:
        noise = [h5.read_noise(sums1), h5.read_noise(sums2)]
        sampling = _read_json(prev_sampling)
        schedule = Schedule(**sampling["schedule"])
        index, eulers, shifts, pmax = _read_poses(poses, iteration)
        old_index, old_eulers, old_shifts, _ = _read_poses(prev_poses, iteration - 1)
        if not np.array_equal(index, old_index):
            raise InputError(f"{poses[0]}: the poses of iterations {iteration - 1} and {iteration} are of different particles")
        angle, offset = hidden_variable_changes(old_eulers, eulers, old_shifts, shifts, angpix=angpix,
                                                symmetry=point_group_matrices(symmetry))
        schedule.iter_wo_gain = 0 if gain else schedule.iter_wo_gain + 1
        if not final:
            schedule.record_changes(angle, offset, ov=ov, angpix=angpix)
        pdf = [direction_distribution(n["direction_mass"]) if "direction_mass" in n else None for n in noise]
        out = {"sigma2": [update_sigma2(prev["search"]["sigma2"][h], [noise[h]]).tolist() for h in (0, 1)],
               "sigma_offset_A": [update_sigma_offset([n]) for n in noise], "perturb": float(sampling["perturb"]),
               "angle_change_deg": angle, "offset_change_A": offset, "mean_pmax": float(pmax.mean()),
               "pdf_direction": [None if p is None else p.tolist() for p in pdf], "pdf_order": schedule.order}
    out["high_fsc_at_limit"] = high_fsc_at_limit(curve, current_size)
    out["schedule"] = asdict(schedule)
    out["converged"] = prev is not None and schedule.converged()
    return out


def model_update(sums1, sums2, out_model, *, iteration: int, opts: dict, prev_model=None, poses=(), prev_poses=(),
                 prev_sampling=None, store=None) -> dict:
    """Gold-standard FSC of the halves' sums and the schedule: resolution, next r_max, final/converged.

    opts: maxres_A, tau2_fudge and the iteration_schedule() entries (mode, incr_size, ...);
    low_resol_join_A: the halves' sums are averaged within that resolution, or within the previous
    resolution if lower, before the FSC (RELION --low_resol_join_halves; `autorefine.join_shell`);
    with a pose search also `search` and `symmetry`, and then poses / prev_poses (this and the
    previous iteration's poses files) and prev_sampling (the previous iteration's sampling.json)
    after a search, or the particle `store` (starting noise spectra) after iteration 1 without a
    reference. Without a pose search the run has converged after an iteration without resolution
    gain; with one, by RELION's test (`Schedule.converged`).
    """
    d1, w1, a1 = h5.read_sums(sums1, expect={"iteration": iteration, "half": 1})
    d2, w2, a2 = h5.read_sums(sums2, expect={"iteration": iteration, "half": 2, "r_max": a1["r_max"],
                                             "pad": a1["pad"], "box_size": a1["box_size"], "angpix": a1["angpix"]})
    box, angpix, r_max = int(a1["box_size"]), float(a1["angpix"]), int(a1["r_max"])
    grid = PaddedGrid(box, float(a1["pad"]), r_max)
    prev = _read_json(prev_model) if prev_model else None
    shell = None
    if opts.get("low_resol_join_A"):
        shell = join_shell(float(opts["low_resol_join_A"]), box, angpix, prev["r_star"] if prev else r_max)
        low_resolution_join([[d1, w1], [d2, w2]], grid=grid, shell=shell)
    curve = fsc_from_sums(d1, w1, d2, w2, grid=grid)
    del d1, w1, d2, w2
    final = prev["next_is_final"] if prev else bool(opts["first_is_final"])
    r_star = resolution_shell(curve, fudge=opts["tau2_fudge"])
    incr = max(int(prev["incr_size"] if prev else opts["incr_size"]),
               _first_below(curve, 0.143) - _first_below(curve, 0.5) + 5)
    current = r_star / (box * angpix)
    gain = prev is None or current > prev["current_resolution_inv_A"] + 1e-4
    no_gain = 0 if gain else int(prev["iterations_without_resolution_gain"]) + 1
    search = None
    if opts.get("search"):
        search = _search_update(sums1, sums2, iteration=iteration, search=opts["search"], symmetry=opts["symmetry"],
                                final=final, gain=gain, curve=curve, current_size=min(box, 2 * r_max), prev=prev,
                                angpix=angpix, poses=poses, prev_poses=prev_poses, prev_sampling=prev_sampling,
                                store_path=store)
        converged = search["converged"]
    else:
        converged = no_gain >= 1
    if final:
        next_is_final = False
    elif opts["mode"] == "fixed":
        next_is_final = bool(opts["next_is_final"])
    else:
        next_is_final = converged or bool(opts["last_allowed"])
    limit = r_max_for_resolution(box, angpix, opts["maxres_A"])
    if final:
        next_r = None
    elif next_is_final:
        next_r = limit
    elif search is not None:
        next_r = min(limit, next_r_max(r_star, incr, box, high_fsc_at_limit=search["high_fsc_at_limit"],
                                       mean_pmax=search["mean_pmax"] or 0.0))
    else:
        next_r = min(limit, r_star + incr)
    model = {
        "omlrelion_version": omlrelion.__version__, "iteration": iteration, "box_size": box, "angpix": angpix,
        "pad": grid.pad, "r_max": r_max, "r_max_limit": limit, "n_particles": [int(a1["n_particles"]),
                                                                               int(a2["n_particles"])],
        "symmetry": a1.get("symmetry", "C1"), "fsc": curve.tolist(),
        "resolution_0143_A": resolution_at(curve, box_size=box, angpix=angpix, threshold=0.143),
        "resolution_05_A": resolution_at(curve, box_size=box, angpix=angpix, threshold=0.5),
        "r_star": r_star, "current_resolution_A": 1.0 / current, "current_resolution_inv_A": current,
        "incr_size": incr, "iterations_without_resolution_gain": no_gain, "converged": bool(converged),
        "final": bool(final), "next_is_final": next_is_final, "next_r_max": next_r, "low_resol_join_shell": shell,
    }
    if search is not None:
        model["search"] = search
    _write_json(out_model, model)
    log.info("iteration %d: FSC 0.143 at %.2f A, r* %d, next r_max %s%s", iteration, model["resolution_0143_A"],
             r_star, model["next_r_max"], " (final)" if final else "")
    if search is not None and search["angle_change_deg"] is not None:
        sch = search["schedule"]
        log.info("iteration %d: HEALPix order %d%s, offsets %.2f/%.2f px, pose changes %.2f deg / %.2f A, "
                 "<Pmax> %.3f%s", iteration, sch["order"], " (local)" if sch["local"] else "", sch["offset_range_px"],
                 sch["offset_step_px"], search["angle_change_deg"], search["offset_change_A"], search["mean_pmax"],
                 ", converged" if converged else "")
    return model


def next_sampling(store_path, model_json, half1_volume, poses_paths, out_json, *, iteration: int, opts: dict,
                  device: Device = Device()) -> dict:
    """The pose search's sampling for iteration + 1 (RELION's start of an iteration, spec 3.7, 5.4,
    5.5): unless that iteration is the final one, the angular and translational accuracy of half 1's
    first 100 particles against half 1's new map and the schedule's update (finer HEALPix order and
    offsets, local searches); always the next random perturbation of the grids. opts: search,
    symmetry, pad, ctf."""
    model = _read_json(model_json)
    search = opts["search"]
    ropts = search_options(search, pad=float(opts["pad"]), symmetry=opts["symmetry"])
    schedule = Schedule(**model["search"]["schedule"])
    if not model["next_is_final"] and ropts.schedule:
        volume, _ = h5.read_volume(half1_volume, expect={"half": 1, "iteration": iteration})
        with h5.ParticleStore(store_path) as store:
            columns = {c: store.column(c) for c in ("half", "optics_group", "defocus_u", "defocus_v",
                                                   "defocus_angle_deg", "phase_shift_deg", "ctf_bfactor", "ctf_scale")}
            index, eulers, _, _ = _read_poses(poses_paths, iteration)
            first = np.flatnonzero(columns["half"] == 1)[:ACCURACY_PARTICLES]
            where = np.searchsorted(index, first)
            if np.any(where >= len(index)) or not np.array_equal(index[np.minimum(where, len(index) - 1)], first):
                raise InputError(f"{poses_paths[0]}: the poses files of half 1 lack some of its first particles")
            n = store.box_size
            r_acc = min(n // 2, int(model["r_star"]) + int(model["incr_size"]))
            rot = trans = 0.0
            for group in np.unique(columns["optics_group"][first]):
                sel = first[columns["optics_group"][first] == group]
                acc = accuracy(volume, _ctf_params(store, sel, columns), store.optics[group],
                               eulers[np.searchsorted(index, sel)], model["search"]["sigma2"][0], r_max=r_acc,
                               opts=ropts, device=device, seed=iteration, apply_ctf=bool(opts["ctf"]))
                rot, trans = rot + acc[0] * len(sel), trans + acc[1] * len(sel)
        schedule.acc_rot_deg, schedule.acc_trans_px = rot / len(first), trans / len(first)
        schedule.update_sampling(ov=ropts.oversampling, angpix=float(model["angpix"]),
                                 offset_change_A=float(model["search"]["offset_change_A"]),
                                 max_order=ropts.max_order, auto_local_order=ropts.auto_local_order)
    out = {"iteration": iteration + 1, "schedule": asdict(schedule),
           "perturb": next_perturbation(float(model["search"]["perturb"]), ropts.perturb, seed=ropts.random_seed,
                                        iteration=iteration)}
    _write_json(out_json, out)
    log.info("sampling of iteration %d: HEALPix order %d%s, offsets %.2f/%.2f px, accuracy %.2f deg / %.2f px",
             iteration + 1, schedule.order, " (local)" if schedule.local else "", schedule.offset_range_px,
             schedule.offset_step_px, schedule.acc_rot_deg, schedule.acc_trans_px)
    return out


# --------------------------------------------------------------------------- reconstruction
def _reconstruct(data, weight, grid: PaddedGrid, opts: dict, devices: list[Device], tau2=None):
    """The sums-to-map step on `devices`: dense on one, packed by columns over several (the same map)."""
    n_iter = int(opts["gridding_iterations"])
    plan = plan_for(grid, devices, None, real_dtype=weight.dtype, n_iter=n_iter, map_term=tau2 is not None)
    log.info("sums to map: %s on %s", plan.describe(), devices[0].name)
    with devices[0].use():
        sums = {"data": devices[0].put(data), "weight": devices[0].put(weight)}
        volume = run_plan(plan, grid, devices, sums, n_iter=n_iter, skip_gridding=n_iter == 0, tau2=tau2,
                          tau2_fudge=float(opts["tau2_fudge"]), minres_map=MINRES_MAP)
        return to_numpy(volume).astype(np.float32)


def _half_sums(sums, model: dict, *, half: int, iteration: int, other=None):
    """(data, weight, attrs) of a half's merged sums; when model.json says the halves were joined at
    low resolution, averaged with the other half's sums (`other`) within that shell."""
    expect = {"iteration": iteration, "r_max": model["r_max"]}
    data, weight, attrs = h5.read_sums(sums, expect={**expect, "half": half})
    shell = model.get("low_resol_join_shell")
    if shell:
        if other is None:
            raise InputError(f"{sums}: model.json joins the halves at low resolution; the other half's sums are needed")
        d2, w2, _ = h5.read_sums(other, expect={**expect, "half": 3 - half})
        grid = PaddedGrid(int(attrs["box_size"]), float(attrs["pad"]), int(attrs["r_max"]))
        pair = [[data, weight], [d2, w2]]
        low_resolution_join(pair, grid=grid, shell=int(shell))
        data, weight = pair[0]
    return data, weight, attrs


def reconstruct_half(sums, model_json, out_volume, out_mrc, out_model_star, *, half: int, iteration: int,
                     opts: dict, devices: list[Device] | None = None, other_sums=None) -> dict:
    """The half map of one iteration: MAP reconstruction with tau2 from the halves' FSC (spec 4.4).

    opts: tau2_fudge, gridding_iterations, compression, and flatten_solvent ({particle_diameter_A}:
    the map times a soft sphere of that diameter, (N - 5) px when null, unless the iteration is the
    final one; RELION --flatten_solvent).
    """
    t0 = time.perf_counter()
    model = _read_json(model_json)
    data, weight, attrs = _half_sums(sums, model, half=half, iteration=iteration, other=other_sums)
    grid = PaddedGrid(int(attrs["box_size"]), float(attrs["pad"]), int(attrs["r_max"]))
    tau2, sigma2, ssnr = tau2_from_fsc(weight, model["fsc"], grid=grid, whole_data=False, fudge=opts["tau2_fudge"])
    devices = devices or [Device()]
    volume = _reconstruct(data, weight, grid, opts, devices, tau2=tau2)
    if opts.get("flatten_solvent") and not model["final"]:
        angpix = float(attrs["angpix"])
        diameter_A = particle_diameter(opts["flatten_solvent"]["particle_diameter_A"], grid.box_size, angpix)
        volume = solvent_flatten(volume, diameter_A / (2 * angpix))
    out = {"box_size": grid.box_size, "angpix": float(attrs["angpix"]), "pad": grid.pad, "r_max": grid.r_max,
           "iteration": iteration, "half": half, "config_hash": h5.config_hash({**opts, "sums": attrs["config_hash"]})}
    h5.write_volume(out_volume, volume, attrs=out, compression=_compression(opts["compression"]))
    write_map(out_mrc, volume, float(attrs["angpix"]))
    pdf = (model.get("search") or {}).get("pdf_direction")
    write_model_star(out_model_star, model, tau2, sigma2, ssnr, fudge=opts["tau2_fudge"], reference=Path(out_mrc).name,
                     pdf_direction=pdf[half - 1] if pdf else None)
    log.info("iteration %d, half %d: map reconstructed to r_max %d on %d device(s) (%s) in %.1f s", iteration,
             half, grid.r_max, len(devices), devices[0].name, time.perf_counter() - t0)
    return out


def reconstruct_unfil(sums, model_json, out_mrc, *, half: int, iteration: int, opts: dict,
                      devices: list[Device] | None = None, other_sums=None) -> None:
    """Final iteration: the unregularised half map (no tau2), RELION's run_half{h}_class001_unfil.mrc
    (joined with the other half at low resolution when the model says so)."""
    model = _read_json(model_json)
    data, weight, attrs = _half_sums(sums, model, half=half, iteration=iteration, other=other_sums)
    grid = PaddedGrid(int(attrs["box_size"]), float(attrs["pad"]), int(attrs["r_max"]))
    write_map(out_mrc, _reconstruct(data, weight, grid, opts, devices or [Device()]), float(attrs["angpix"]))


def reconstruct_joined(sums1, sums2, model_json, out_mrc, out_model_star, *, iteration: int, opts: dict,
                       devices: list[Device] | None = None) -> None:
    """Final iteration: both halves' sums added, tau2 from the full-data FSC estimate sqrt(2f/(1+f))."""
    model = _read_json(model_json)
    d1, w1, attrs = h5.read_sums(sums1, expect={"iteration": iteration, "half": 1, "r_max": model["r_max"]})
    d2, w2, _ = h5.read_sums(sums2, expect={"iteration": iteration, "half": 2, "r_max": model["r_max"]})
    grid = PaddedGrid(int(attrs["box_size"]), float(attrs["pad"]), int(attrs["r_max"]))
    d1 += d2
    w1 += w2
    tau2, sigma2, ssnr = tau2_from_fsc(w1, model["fsc"], grid=grid, whole_data=True, fudge=opts["tau2_fudge"])
    write_map(out_mrc, _reconstruct(d1, w1, grid, opts, devices or [Device()], tau2=tau2), float(attrs["angpix"]))
    write_model_star(out_model_star, model, tau2, sigma2, ssnr, fudge=opts["tau2_fudge"], reference=Path(out_mrc).name)


# --------------------------------------------------------------------------- postprocess
def _shells(n: int) -> np.ndarray:
    k = np.fft.fftfreq(n, 1.0 / n)
    kx = np.arange(n // 2 + 1)
    return np.floor(np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2) + 0.5).astype(int)


def _randomise_phases(volume: np.ndarray, from_shell: int, rng) -> np.ndarray:
    f = np.fft.rfftn(volume)
    sel = _shells(volume.shape[0]) > from_shell
    f[sel] = np.abs(f[sel]) * np.exp(2j * np.pi * rng.random(int(sel.sum())))
    return np.fft.irfftn(f, s=volume.shape, axes=(0, 1, 2))


def _guinier(volume: np.ndarray, angpix: float):
    """(s^2 in 1/A^2, ln of the mean amplitude) per shell 1..n/2."""
    n = volume.shape[0]
    f = np.abs(np.fft.rfftn(volume, norm="forward"))
    shells = _shells(n).ravel()
    keep = shells <= n // 2
    total = np.bincount(shells[keep], weights=f.ravel()[keep], minlength=n // 2 + 1)
    count = np.bincount(shells[keep], minlength=n // 2 + 1)
    s = np.arange(1, n // 2 + 1)
    amp = total[1:] / np.maximum(count[1:], 1)
    return (s / (n * angpix)) ** 2, np.log(np.maximum(amp, 1e-30))


def _filter(volume, angpix: float, *, bfactor: float, fsc_weight, resolution_A: float, edge_shells: float = 2.0):
    """Sharpen (exp(-B s^2 / 4)), FSC-weight and low-pass (raised cosine) a map."""
    n = volume.shape[0]
    f = np.fft.rfftn(volume)
    r = np.sqrt(np.fft.fftfreq(n, 1.0 / n)[:, None, None] ** 2 + np.fft.fftfreq(n, 1.0 / n)[None, :, None] ** 2
                + np.arange(n // 2 + 1)[None, None, :] ** 2)
    s2 = (r / (n * angpix)) ** 2
    shell = np.minimum(np.floor(r + 0.5).astype(int), n // 2)
    cut = n * angpix / resolution_A if math.isfinite(resolution_A) else n / 2
    lowpass = 0.5 + 0.5 * np.cos(np.pi * np.clip((r - cut + edge_shells / 2) / edge_shells, 0, 1))
    f *= np.exp(-bfactor * s2 / 4) * np.asarray(fsc_weight)[shell] * lowpass
    return np.fft.irfftn(f, s=volume.shape, axes=(0, 1, 2)).astype(np.float32)


def postprocess(half1, half2, outputs: dict, *, opts: dict) -> dict:
    """relion_postprocess on the final unfiltered half maps, with a soft spherical mask.

    outputs: map, masked_map, star, json, fsc_png, guinier_png, slices_png. opts: mask_diameter_A
    (null: 0.8 x box), mask_edge_px, randomise_at_fsc, bfactor (null: Guinier fit), fit_low_A, seed.
    """
    import pandas as pd

    m1, angpix = read_map(half1)
    m2, _ = read_map(half2)
    n = m1.shape[0]
    diameter = opts["mask_diameter_A"] or 0.8 * n * angpix
    mask = soft_sphere(n, diameter / (2 * angpix), width=float(opts["mask_edge_px"]), dtype=np.float64)
    unmasked = fsc(m1.astype(np.float64), m2.astype(np.float64))
    masked = fsc(m1 * mask, m2 * mask)
    rand_at = min(_first_below(unmasked, opts["randomise_at_fsc"]), n // 2)
    rng = np.random.default_rng(opts["seed"])
    randomised = fsc(_randomise_phases(m1, rand_at, rng) * mask, _randomise_phases(m2, rand_at, rng) * mask)
    corrected = masked.copy()
    tail = np.arange(len(corrected)) > rand_at + 2
    with np.errstate(divide="ignore", invalid="ignore"):
        corrected[tail] = np.nan_to_num((masked[tail] - randomised[tail]) / (1 - randomised[tail]))
    resolution = resolution_at(corrected, box_size=n, angpix=angpix, threshold=0.143)
    combined = 0.5 * (m1 + m2)
    s2, lnf = _guinier(combined * mask, angpix)
    fit = (s2 >= 1 / opts["fit_low_A"] ** 2) & (s2 <= 1 / resolution**2)
    slope = intercept = float("nan")
    if opts["bfactor"] is not None:
        bfactor = float(opts["bfactor"])
    elif fit.sum() >= 3:
        slope, intercept = np.polyfit(s2[fit], lnf[fit], 1)
        bfactor = 4.0 * float(slope)
    else:
        bfactor = 0.0
        log.warning("Guinier fit: fewer than 3 shells between %.1f A and %.2f A; no sharpening (B = 0)",
                    opts["fit_low_A"], resolution)
    weight = np.sqrt(np.clip(2 * corrected / (1 + corrected), 0, 1))
    weight[0] = 1.0
    sharp = _filter(combined, angpix, bfactor=bfactor, fsc_weight=weight, resolution_A=resolution)
    write_map(outputs["map"], sharp, angpix)
    write_map(outputs["masked_map"], sharp * mask.astype(np.float32), angpix)
    shells = np.arange(n // 2 + 1)
    inv = shells / (n * angpix)
    general = pd.DataFrame({"rlnFinalResolution": [resolution], "rlnBfactorUsedForSharpening": [bfactor],
                            "rlnUnfilteredMapHalf1": [str(half1)], "rlnUnfilteredMapHalf2": [str(half2)],
                            "rlnMaskName": [f"soft sphere {diameter:.1f} A"],
                            "rlnRandomiseFrom": [n * angpix / max(rand_at, 1)]})
    table = pd.DataFrame({"rlnSpectralIndex": shells, "rlnResolution": inv,
                          "rlnAngstromResolution": np.where(shells > 0, n * angpix / np.maximum(shells, 1), 999.0),
                          "rlnFourierShellCorrelationCorrected": corrected,
                          "rlnFourierShellCorrelationUnmaskedMaps": unmasked,
                          "rlnFourierShellCorrelationMaskedMaps": masked,
                          "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps": randomised})
    guinier = pd.DataFrame({"rlnResolutionSquared": s2, "rlnLogAmplitudesOriginal": lnf})
    write_star(outputs["star"], {"general": general, "fsc": table, "guinier": guinier})
    summary = {"resolution_A": resolution, "resolution_unmasked_A": resolution_at(unmasked, box_size=n, angpix=angpix),
               "bfactor": bfactor, "randomise_from_shell": int(rand_at), "mask_diameter_A": diameter,
               "fsc_corrected": corrected.tolist(), "fsc_unmasked": unmasked.tolist(), "box_size": n, "angpix": angpix}
    _plot_fsc(outputs["fsc_png"], inv, {"corrected": corrected, "unmasked": unmasked, "masked": masked,
                                        "phase-randomised masked": randomised}, resolution)
    _plot_guinier(outputs["guinier_png"], s2, lnf, fit, slope, intercept, bfactor)
    _plot_slices(outputs["slices_png"], sharp, f"postprocess.mrc, {resolution:.2f} A, B = {bfactor:.0f} A^2")
    _write_json(outputs["json"], summary)
    return summary


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_fsc(path, inv, curves: dict, resolution: float) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, c in curves.items():
        ax.plot(inv, c, label=label)
    ax.axhline(0.143, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="resolution (1/A)", ylabel="FSC", ylim=(-0.1, 1.05),
           title=f"gold-standard FSC: {resolution:.2f} A at 0.143")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_guinier(path, s2, lnf, fit, slope, intercept, bfactor) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(s2, lnf, ".-", label="ln |F| (masked map)")
    if np.isfinite(slope):
        ax.plot(s2[fit], slope * s2[fit] + intercept, "r-", label=f"fit: B = {bfactor:.0f} A^2")
    ax.set(xlabel="s^2 (1/A^2)", ylabel="ln amplitude", title="Guinier plot")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_slices(path, volume, title: str) -> None:
    plt = _pyplot()
    c = volume.shape[0] // 2
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    for ax, img, name in zip(axes, (volume[c], volume[:, c], volume[:, :, c]), ("z", "y", "x")):
        ax.imshow(img, cmap="gray", origin="lower")
        ax.set(title=f"central {name} slice", xticks=[], yticks=[])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def export_particles(star_path, store_path, poses_paths, out_star, out_png, *, iteration: int) -> None:
    """run_data.star (the input rows with the final poses and half sets) and the angular distribution plot."""
    with h5.ParticleStore(store_path) as store:
        rows, halves, angpix = store.column("star_row"), store.column("half"), store.angpix
    particles = read_particles(star_path)
    eulers = particles.eulers_deg.copy()
    shifts_a = particles.shifts_px * np.array([o.angpix for o in particles.optics])[particles.optics_group][:, None]
    seen = np.zeros(particles.n_particles, dtype=bool)
    for path in poses_paths:
        table, _ = h5.read_table(path, expect={"iteration": iteration})
        target = rows[table["index"]]
        eulers[target], shifts_a[target] = table["eulers_deg"], table["shifts_px"] * angpix
        seen[target] = True
    if not seen.all():
        raise InputError(f"{store_path}: {int((~seen).sum())} particles are in no poses file of iteration {iteration}")
    pix = np.array([o.angpix for o in particles.optics])[particles.optics_group][:, None]
    subset = np.zeros(particles.n_particles, dtype=np.int64)
    subset[rows] = halves
    table = particles.table.copy()  # image names relative to run_data.star's folder
    table["rlnImageName"] = particles.image_names_relative_to(Path(out_star).parent)
    write_particles(out_star, replace(particles, table=table, eulers_deg=eulers, shifts_px=shifts_a / pix,
                                      random_subset=subset))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6), subplot_kw={"projection": "hammer"})
    hb = ax.hexbin(np.deg2rad(((eulers[:, 0] + 180) % 360) - 180), np.deg2rad(90 - eulers[:, 1]), gridsize=30,
                   mincnt=1, cmap="viridis")
    fig.colorbar(hb, ax=ax, label="particles")
    ax.set_title(f"angular distribution (rot, 90 - tilt), {particles.n_particles} particles", fontsize=9, pad=18)
    ax.grid(True, lw=0.3)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- summaries
def _benchmark(folders) -> dict:
    """Total job seconds and the largest peak RSS (MB) of the Snakemake benchmark files in `folders`."""
    seconds, rss = 0.0, 0.0
    for path in sorted(p for folder in folders for p in Path(folder).rglob("*.tsv")):
        lines = Path(path).read_text().splitlines()
        if len(lines) < 2:
            continue
        head, values = lines[0].split("\t"), lines[1].split("\t")
        row = dict(zip(head, values))
        seconds += float(row.get("s", 0) or 0)
        try:
            rss = max(rss, float(row.get("max_rss", 0)))
        except ValueError:  # "NA" where the job was too short to sample
            pass
    return {"cpu_wall_s": seconds, "peak_rss_mb": rss}


def run_summary(out_json, *, dataset: str, parameter_set: str, overrides: dict, models, postprocess_json,
                stores: dict, benchmark_dirs, final_map, phantom=None) -> dict:
    """One row of the sweep table: resolution per iteration and final, time, memory, compression per file type
    (and, with a pose search, each iteration's HEALPix order, local or global search, <Pmax> and pose changes).

    stores: file type -> h5 paths; benchmark_dirs: folders of Snakemake benchmark files (all jobs of
    the run and of its dataset's simulation and preprocessing).
    """
    post = _read_json(postprocess_json)
    history = [_read_json(m) for m in models]
    compression: dict[str, dict] = {}
    for kind, paths in stores.items():
        raw = stored = 0
        for path in paths:
            report = h5.compression_report(path)
            raw += report["raw_bytes"]
            stored += report["stored_bytes"]
        compression[kind] = {"files": len(paths), "raw_bytes": raw, "stored_bytes": stored,
                             "ratio": raw / stored if stored else None}
    truth = None
    if phantom is not None:
        final, angpix = read_map(final_map)
        ref, _ = read_map(phantom)
        if ref.shape == final.shape:
            curve = fsc(final.astype(np.float64), ref.astype(np.float64))
            truth = resolution_at(curve, box_size=final.shape[0], angpix=angpix, threshold=0.5)
    last = history[-1]
    summary = {"dataset": dataset, "parameter_set": parameter_set, "overrides": overrides,
               "n_particles": sum(last["n_particles"]), "box_size": last["box_size"], "angpix": last["angpix"],
               "pad": last["pad"], "symmetry": last["symmetry"], "iterations": len(history),
               "resolution_A": post["resolution_A"], "resolution_unmasked_A": post["resolution_unmasked_A"],
               "resolution_vs_truth_A": truth, "bfactor": post["bfactor"],
               "resolution_per_iteration_A": [m["resolution_0143_A"] for m in history],
               "r_max_per_iteration": [m["r_max"] for m in history], **_benchmark(benchmark_dirs),
               "compression": compression, "omlrelion_version": omlrelion.__version__}
    if "search" in last:    # per iteration: the sampling searched (none in iteration 1 without a reference)
        searched = [m["search"]["angle_change_deg"] is not None for m in history]
        summary["pose_search"] = {
            "healpix_order": [m["search"]["schedule"]["order"] if s else None for m, s in zip(history, searched)],
            "local": [m["search"]["schedule"]["local"] if s else None for m, s in zip(history, searched)],
            "mean_pmax": [m["search"]["mean_pmax"] for m in history],
            "angle_change_deg": [m["search"]["angle_change_deg"] for m in history],
            "offset_change_A": [m["search"]["offset_change_A"] if s else None for m, s in zip(history, searched)],
            "converged": any(m["converged"] for m in history)}
    _write_json(out_json, summary)
    return summary


SWEEP_COLUMNS = ("dataset", "parameter_set", "n_particles", "box_size", "angpix", "pad", "symmetry", "iterations",
                 "resolution_A", "resolution_unmasked_A", "resolution_vs_truth_A", "bfactor", "cpu_wall_s",
                 "peak_rss_mb", "ratio_particles", "ratio_sums", "ratio_volumes")


def sweep_table(summaries, out_tsv, out_md) -> list[dict]:
    """All runs' summaries as one table (TSV for programs, Markdown for the report)."""
    rows = []
    for path in summaries:
        s = _read_json(path)
        row = {k: s.get(k) for k in SWEEP_COLUMNS}
        for kind in ("particles", "sums", "volumes"):
            row[f"ratio_{kind}"] = (s["compression"].get(kind) or {}).get("ratio")
        rows.append(row)

    def fmt(v):
        if isinstance(v, float):
            return "inf" if math.isinf(v) else f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["\t".join(SWEEP_COLUMNS)] + ["\t".join(fmt(r[c]) for c in SWEEP_COLUMNS) for r in rows]
    tmp = Path(out_tsv).with_name(f".{Path(out_tsv).name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out_tsv)
    md = ["| " + " | ".join(SWEEP_COLUMNS) + " |", "|" + "---|" * len(SWEEP_COLUMNS)]
    md += ["| " + " | ".join(fmt(r[c]) for c in SWEEP_COLUMNS) + " |" for r in rows]
    tmp = Path(out_md).with_name(f".{Path(out_md).name}.tmp")
    tmp.write_text("\n".join(md) + "\n")
    os.replace(tmp, out_md)
    return rows


# --------------------------------------------------------------------------- restarts (run by the Snakefile)
def verify_stores(paths, cache_path) -> dict[str, str]:
    """Check the HDF5 intermediates `paths` before Snakemake plans a run: {path: reason} of the corrupt ones.

    Every chunk is read (`h5.verify_file`: Fletcher32 checksums, truncation, damaged metadata). A
    store whose size, mtime, ctime and inode are those recorded when it last passed (`cache_path`,
    JSON) is not read again: any write to it, an mtime put back included, changes its ctime.
    Nothing is modified but the cache; the Snakefile marks the corrupt ones incomplete (mark_incomplete).
    """
    cache_path = Path(cache_path)
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    passed, corrupt = {}, {}
    for path in sorted(str(p) for p in paths):
        try:
            st = os.stat(path)
        except OSError:
            continue
        key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        reason = None if cache.get(path) == key else h5.verify_file(path)
        if reason is None:
            passed[path] = key
        else:
            corrupt[path] = reason
    if passed != cache:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(cache_path, passed)
    return corrupt


def mark_incomplete(path, snakemake_dir=".snakemake") -> None:
    """Record `path` as an output of an unfinished job, as Snakemake's default (file) persistence does
    while a job runs: `<snakemake_dir>/incomplete/<urlsafe base64 of the path>`, split into folders
    of at most NAME_MAX characters. With rerun-incomplete (the workflow profile's default) Snakemake
    then reruns the job that writes it and, as for any rerun job, everything after it; without,
    it stops and names the file. (Moving the file aside would not do: Snakemake does not rebuild a
    missing intermediate whose dependents are up to date.)"""
    folder = Path(snakemake_dir) / "incomplete"
    folder.mkdir(parents=True, exist_ok=True)
    size = (os.pathconf(folder, "PC_NAME_MAX") if os.name == "posix" else 255) or 255
    name = base64.urlsafe_b64encode(str(path).encode()).decode()
    parts = [name[i:i + size - 1] for i in range(0, len(name), size - 1)]
    record = folder.joinpath(*["@" + p for p in parts[:-1]], parts[-1])
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"external_jobid": None}))


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (/proc, clock ticks since boot), None if it does not run."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def claim_folder(snakemake_dir=".snakemake") -> bool:
    """Record this main Snakemake process; True when no other one recorded in this folder still runs.

    Every start of the workflow's main process records itself (host, pid, process start time) in
    `<snakemake_dir>/omlrelion/runs/`; records of processes that have ended are dropped. A record
    from another host, or where /proc is missing, counts as running (False: nothing is cleaned).
    """
    runs = Path(snakemake_dir) / "omlrelion" / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    host, me, live = os.uname().nodename, os.getpid(), 0
    for record in runs.glob("*.json"):
        try:
            rec = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("host") == host and rec.get("pid") == me:
            continue
        if rec.get("host") == host and Path("/proc/self/stat").exists() and _process_start(rec["pid"]) != rec["start"]:
            record.unlink(missing_ok=True)
        else:
            live += 1
    _write_json(runs / f"{host}-{me}.json", {"host": host, "pid": me, "start": _process_start(me)})
    return live == 0


def release_stale_locks(snakemake_dir=".snakemake", results="results") -> list[str]:
    """Let a plain rerun resume after a kill (call only when `claim_folder` says nothing else runs).

    A SIGKILL, an out-of-memory kill, a power loss leave Snakemake's locks (`<snakemake_dir>/locks`,
    its default file persistence) behind, and the next run would stop with a LockException until
    `snakemake --unlock`; the locks are removed. So are the hidden temporaries (`.<name>...tmp`)
    that killed jobs left under `results` (outputs are written under such names and renamed when
    complete; nothing reads them). Returns the warning lines.
    """
    lines = []
    locks = sorted((Path(snakemake_dir) / "locks").glob("*.lock"))
    for lock in locks:
        lock.unlink(missing_ok=True)
    if locks:
        lines.append(f"omlrelion: removed the locks that an interrupted Snakemake left in "
                     f"{Path(snakemake_dir).resolve()} (no other Snakemake of this folder runs)")
    temporaries = sorted(p for p in Path(results).rglob(".*.tmp") if p.is_file())
    for tmp in temporaries:
        tmp.unlink(missing_ok=True)
    if temporaries:
        lines.append(f"omlrelion: removed {len(temporaries)} partial output(s) of interrupted jobs under {results}")
    return lines


def retried_jobs(snakemake_log: str) -> list[str]:
    """The failed attempts that Snakemake retried (profile `retries`), read from the text of its log:
    one "rule (job log)" per "Trying to restart job N." line, N matched to the "Error in rule" block
    of job N wherever it stands (executors report failures and restarts in either order)."""
    errors, restarts, block = {}, [], None
    for line in snakemake_log.splitlines():
        text = line.strip()
        if text.startswith("Error in rule "):
            block = {"rule": text.removeprefix("Error in rule ").rstrip(":"), "log": None}
        elif block is not None and text.startswith("jobid: "):
            errors[text.removeprefix("jobid: ")] = block
        elif block is not None and text.startswith("log: "):
            block["log"] = text.removeprefix("log: ").split(" (")[0]
        elif text.startswith("Trying to restart job "):
            restarts.append(text.removeprefix("Trying to restart job ").rstrip("."))
            block = None
        elif not line.startswith((" ", "\t")):
            block = None
    out = []
    for jobid in restarts:
        err = errors.get(jobid)
        if err is None:
            out.append(f"job {jobid}")
        else:
            out.append(f"{err['rule']} ({err['log']})" if err["log"] else err["rule"])
    return out
