"""One function per user-facing step: paths in, paths out. The only glue layer.

`reconstruct` is `omlrelion reconstruct` (relion_reconstruct's job): read a particle STAR file and
its stacks, back-project, symmetrise, reconstruct, write an MRC map and optionally a JSON summary.
"""

from __future__ import annotations

import logging
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import omlrelion
from omlrelion.backend import Device, memory_report, to_numpy
from omlrelion.errors import InputError
from omlrelion.fourier.symmetrise import hermitian_repair, symmetrise
from omlrelion.geometry.euler import euler_to_matrix
from omlrelion.geometry.grids import PaddedGrid
from omlrelion.geometry.symmetry import point_group_matrices
from omlrelion.io.jsonfile import write_json
from omlrelion.io.mrc import ImageStack, write_map
from omlrelion.io.star import ParticleSet, read_particles, read_star_table
from omlrelion.pipeline.logs import progress
from omlrelion.reconstruct.autotune import fallback_plan, plan_for
from omlrelion.reconstruct.columns import dense_float32_bytes
from omlrelion.reconstruct.fsc import fsc, resolution_at, tau2_from_fsc
from omlrelion.reconstruct.insert import CtfMode, insert_particles
from omlrelion.reconstruct.plan import Plan, is_out_of_memory, release_memory, run_plan
from omlrelion.units import r_max_for_resolution

log = logging.getLogger(__name__)

MIN_BOX_SIZE = 8
READ_AHEAD = 4


@dataclass
class ReconstructOptions:
    """relion_reconstruct's options (same names and defaults as RELION 3.1)."""

    angpix: float | None = None
    ctf: CtfMode = field(default_factory=CtfMode)
    pad: float = 2.0
    n_iter: int = 10
    maxres: float | None = None
    sym: str = "c1"
    subset: int | None = None
    skip_gridding: bool = False
    nn: bool = False
    fom_weighting: bool = False
    fsc_path: Path | None = None
    precision: str | None = None  # "single" | "double"; default double on the host, single on GPUs
    batch_size: int | None = None
    storage: str | None = None    # "dense" | "packed" | "auto" (the planner's choice); None: dense on one
                                  # device, packed on several
    strided: bool = False         # over several devices: strided plane chunks and column rows instead of blocks
    kernel: str = "relion"        # gridding kernel: "relion" (RELION's map) or "compact" (packed plans only)


def _select_particles(particles: ParticleSet, opts: ReconstructOptions) -> ParticleSet:
    if opts.subset in (1, 2):
        if not np.any(particles.random_subset):
            raise InputError(f"{particles.star_path}: --subset {opts.subset} asked for, but the STAR file "
                             "has no rlnRandomSubset column; add it (relion_refine's halves) or leave --subset out")
        particles = particles.select(particles.random_subset == opts.subset)
    if particles.n_particles == 0:
        raise InputError(f"{particles.star_path}: no particles to reconstruct"
                         + (f" in subset {opts.subset}; check rlnRandomSubset or leave --subset out"
                            if opts.subset in (1, 2) else "; check that the STAR file lists particles"))
    return particles


def _output_geometry(particles: ParticleSet, opts: ReconstructOptions):
    boxes = {o.box_size for o in particles.optics}
    if len(boxes) != 1:
        raise InputError(f"{particles.star_path}: optics groups have different box sizes {sorted(boxes)}; "
                         "reconstruct each optics group separately (select them) or re-extract at one size")
    box_size = boxes.pop()
    if box_size % 2 or box_size < MIN_BOX_SIZE:
        raise InputError(f"{particles.star_path}: box size {box_size} px is not supported: it must be even "
                         f"and at least {MIN_BOX_SIZE}")
    angpix = opts.angpix if opts.angpix else particles.optics[0].angpix
    if not angpix > 0:
        raise InputError(f"{particles.star_path}: pixel size {angpix} is not positive; pass --angpix")
    if opts.pad < 1:
        raise InputError(f"--pad {opts.pad}: the padding factor must be >= 1")
    r_max = r_max_for_resolution(box_size, angpix, opts.maxres)
    return box_size, angpix, PaddedGrid(box_size, opts.pad, r_max)


def _batches(particles: ParticleSet, batch_size: int):
    """Index batches that stay within one optics group and one stack, in file order."""
    order = np.lexsort((particles.image_indices, particles.image_stacks, particles.optics_group))
    start = 0
    while start < len(order):
        first = order[start]
        stop = start
        while (stop < len(order) and stop - start < batch_size
               and particles.optics_group[order[stop]] == particles.optics_group[first]
               and particles.image_stacks[order[stop]] == particles.image_stacks[first]):
            stop += 1
        yield order[start:stop]
        start = stop


def backproject(particles: ParticleSet, grid: PaddedGrid, device: Device, opts: ReconstructOptions,
                *, angpix: float, dtype, timings: dict, show_progress: bool = True):
    """Read every particle and insert it into new padded sums on `device`; returns (data, weight)."""
    xp = device.xp
    real = np.dtype(dtype)
    complex_ = np.result_type(real, np.complex64)
    batch_size = opts.batch_size or (512 if device.gpu is not None else 128)
    with device.use():
        data = xp.zeros(grid.shape, dtype=complex_)
        weight = xp.zeros(grid.shape, dtype=real)
    stacks: dict[str, ImageStack] = {}

    def read(idx):
        t = time.perf_counter()
        images = stacks[particles.image_stacks[idx[0]]].read(particles.image_indices[idx])
        return images, time.perf_counter() - t

    batches = list(_batches(particles, batch_size))
    bar = progress(particles.n_particles, "back-projecting", show_progress)
    try:
        for idx in batches:            # open every stack once, and check its box, before the readers start
            path = particles.image_stacks[idx[0]]
            if path not in stacks:
                stacks[path] = ImageStack(path)
            expected = particles.optics[particles.optics_group[idx[0]]].box_size
            if stacks[path].box_size != expected:
                raise InputError(f"{path}: images are {stacks[path].box_size} px but the STAR file's optics "
                                 f"group says {expected} px; fix rlnImageSize in data_optics or re-extract the "
                                 "particles")
        # READ_AHEAD reader threads (copies from the memory-mapped stacks release the GIL) keep the
        # device fed; batches are consumed in order, so the sums do not depend on thread timing
        with ThreadPoolExecutor(max_workers=READ_AHEAD) as pool:
            pending = [pool.submit(read, idx) for idx in batches[:READ_AHEAD]]
            for i, idx in enumerate(batches):
                images, t_read = pending[i].result()
                pending[i] = None
                if i + READ_AHEAD < len(batches):
                    pending.append(pool.submit(read, batches[i + READ_AHEAD]))
                timings["read"] = timings.get("read", 0.0) + t_read
                t = time.perf_counter()
                optics = particles.optics[particles.optics_group[idx[0]]]
                scale = angpix / optics.angpix * grid.box_size / optics.box_size
                with device.use():
                    imgs = device.put(images.astype(real, copy=False))
                    del images
                    rotations = euler_to_matrix(particles.eulers_deg[idx])
                    insert_particles(data, weight, imgs, rotations, particles.shifts_px[idx], optics,
                                     particles.ctf_params(idx), mode=opts.ctf,
                                     pad=grid.pad * scale, r_padded=grid.r_padded, nn=opts.nn,
                                     fom=particles.fom[idx] if opts.fom_weighting else None)
                device.synchronize()
                timings["backproject"] = timings.get("backproject", 0.0) + time.perf_counter() - t
                bar.update(len(idx))
    finally:
        bar.close()
        for s in stacks.values():
            s.close()
    return data, weight


def reconstruct(star_path, out_path, opts: ReconstructOptions, *, device: Device | list[Device] = Device(),
                json_path=None, half_maps=None, show_progress: bool = True, argv=None) -> dict:
    """relion_reconstruct: particles STAR -> map MRC. Returns the summary (also written to json_path).

    `device` may be a list: the particles are back-projected on the first device and the
    sums-to-map step is spread over all of them (`reconstruct.columns`).
    """
    devices = list(device) if isinstance(device, (list, tuple)) else [device]
    device = devices[0]
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out_path = Path(out_path)
    required = ("rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
    if opts.ctf.apply:
        required += ("rlnDefocusU",)
    t = time.perf_counter()
    particles = read_particles(star_path, angpix=opts.angpix, require=required)
    particles = _select_particles(particles, opts)
    box_size, angpix, grid = _output_geometry(particles, opts)
    sym_matrices = point_group_matrices(opts.sym)
    fsc_curve = _read_fsc(opts.fsc_path) if opts.fsc_path else None
    _check_writable(out_path)
    if json_path:
        _check_writable(Path(json_path))
    timings["read_star"] = time.perf_counter() - t
    precision = opts.precision or ("double" if device.gpu is None else "single")
    dtype = np.float64 if precision == "double" else np.float32
    # the plan of the sums-to-map step, before any particle is read: "auto" refuses what cannot fit
    plan = plan_for(grid, devices, opts.storage, strided=opts.strided, real_dtype=dtype, kernel=opts.kernel,
                    n_iter=0 if opts.skip_gridding else opts.n_iter, map_term=fsc_curve is not None)
    all_devices = devices
    log.info("reconstructing %d particles, box %d, %.4f A/px, pad %g, r_max %d, grid %d^3 on %s",
             particles.n_particles, box_size, angpix, grid.pad, grid.r_max, grid.size, device.name)

    tried = []
    while True:
        devices = all_devices[:plan.n_devices]
        try:
            volume = _sums_to_volume(particles, grid, devices, plan, opts, box_size=box_size, angpix=angpix,
                                     dtype=dtype, sym_matrices=sym_matrices, fsc_curve=fsc_curve,
                                     timings=timings, show_progress=show_progress)
            break
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            tried.append(plan)
            release_memory(all_devices)
            plan = fallback_plan(grid, all_devices, tried, real_dtype=dtype, kernel=opts.kernel,
                                 n_iter=0 if opts.skip_gridding else opts.n_iter, map_term=fsc_curve is not None,
                                 reason=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    device = devices[0]
    memory = [memory_report(d) for d in dict.fromkeys(devices)] if device.gpu is not None else [memory_report(device)]
    half_map_fsc = half_map_resolution(*half_maps) if half_maps else None     # read before anything is written
    t = time.perf_counter()
    write_map(out_path, volume, angpix)
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    summary = {
        "omlrelion_version": omlrelion.__version__,
        "plans_out_of_memory": [p.describe() for p in tried],
        "command": list(argv) if argv is not None else None,
        "input": str(star_path), "output": str(out_path),
        "n_particles": int(particles.n_particles), "box_size": box_size, "angpix": angpix,
        "pad": grid.pad, "r_max": grid.r_max, "padded_size": grid.size, "final_size": grid.final_size,
        "gridding_iterations": 0 if opts.skip_gridding else opts.n_iter, "symmetry": opts.sym.upper(),
        "ctf": opts.ctf.apply, "precision": precision,
        "device": {"spec": (f"cpu:{len(devices)}" if len(devices) > 1 else "cpu") if device.gpu is None
                   else "gpu:" + ",".join(str(d.gpu) for d in devices), "name": device.name},
        "plan": {**plan.to_dict(), "description": plan.describe()},
        "dense_float32_bytes": dense_float32_bytes(grid),     # what the straightforward one-device step would hold
        "peak_memory": memory,
        "host": platform.node(), "python": sys.version.split()[0],
        "timings_s": timings,
    }
    if half_map_fsc is not None:
        summary["fsc"] = half_map_fsc
    if json_path:
        _write_json(Path(json_path), summary)
    return summary


def _sums_to_volume(particles: ParticleSet, grid: PaddedGrid, devices: list[Device], plan: Plan,
                    opts: ReconstructOptions, *, box_size: int, angpix: float, dtype, sym_matrices, fsc_curve,
                    timings: dict, show_progress: bool) -> np.ndarray:
    """Back-project on devices[0], repair, symmetrise and run `plan`'s sums-to-map step: the map (host float32)."""
    device = devices[0]
    data, weight = backproject(particles, grid, device, opts, angpix=angpix, dtype=dtype,
                               timings=timings, show_progress=show_progress)
    t = time.perf_counter()
    with device.use():
        hermitian_repair(data, weight)
        if len(sym_matrices) > 1:
            data, weight = symmetrise(data, weight, sym_matrices, grid.r_padded)
        tau2 = None
        if fsc_curve is not None:
            tau2, _, _ = tau2_from_fsc(weight, fsc_curve, grid=grid, whole_data=True)
        device.synchronize()
        timings["symmetrise"] = time.perf_counter() - t
        sums = {"data": data, "weight": weight}
        del data, weight                 # a packed plan frees each dense array once it is packed
        volume = run_plan(plan, grid, devices, sums, n_iter=opts.n_iter, skip_gridding=opts.skip_gridding,
                          tau2=tau2, timings=timings)
        return to_numpy(volume).astype(np.float32)


def half_map_resolution(half1_path, half2_path) -> dict:
    """FSC of two half maps and the resolution at 0.143 (and 0.5)."""
    from omlrelion.io.mrc import read_map

    m1, a1 = read_map(half1_path)
    m2, _ = read_map(half2_path)
    if m1.shape != m2.shape:
        raise InputError(f"{half2_path}: shape {m2.shape} differs from {half1_path}'s {m1.shape}")
    curve = fsc(m1.astype(np.float64), m2.astype(np.float64))
    n = m1.shape[0]
    return {"curve": [float(c) for c in curve],
            "resolution_0143_A": resolution_at(curve, box_size=n, angpix=a1, threshold=0.143),
            "resolution_05_A": resolution_at(curve, box_size=n, angpix=a1, threshold=0.5)}


def _read_fsc(path) -> np.ndarray:
    table = read_star_table(path, required=("rlnSpectralIndex", "rlnGoldStandardFsc"))
    idx = table["rlnSpectralIndex"].to_numpy().astype(int)
    curve = np.zeros(idx.max() + 1)
    curve[idx] = table["rlnGoldStandardFsc"].to_numpy(dtype=np.float64)
    return curve


def _check_writable(path: Path) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{path}: output folder {folder} does not exist")
    import os

    if not os.access(folder, os.W_OK):
        raise InputError(f"{path}: output folder {folder} is not writable")


def _write_json(path: Path, summary: dict) -> None:
    write_json(path, summary, indent=2, default=float)
