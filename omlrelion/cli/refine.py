"""Gold-standard 3D refinement of a particle set against a starting map (RELION's auto-refine,
`omlrelion.refine.autorefine`): with --auto_refine it runs until RELION's convergence test passes
(fine enough sampling, no resolution gain, no large pose changes), otherwise --iter iterations;
see docs/refinement.md.

Writes RELION's auto-refine names: per iteration ROOT_itNNN_half{1,2}_class001.mrc, ROOT_itNNN_data.star,
ROOT_itNNN_half{1,2}_model.star (and ROOT_itNNN_state.json to continue from); then a final iteration
on all the data up to Nyquist gives ROOT_class001.mrc (both halves' sums joined),
ROOT_half{1,2}_class001_unfil.mrc, ROOT_data.star and ROOT_model.star, e.g.
  omlrelion refine --i particles.star --ref start.mrc --o Refine3D/run --auto_refine --ini_high 30 \
      --particle_diameter 200 --zero_mask --flatten_solvent --low_resol_join_halves 40 --device gpu
  omlrelion refine --i particles.star --ref start.mrc --o Refine3D/run --iter 3 --continue Refine3D/run_it005_state.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from omlrelion.backend import parse_device, to_numpy
from omlrelion.errors import InputError
from omlrelion.io.jsonfile import write_json
from omlrelion.io.mrc import ImageStack, read_map, write_map
from omlrelion.io.star import read_particles, write_particles


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--i", dest="star", type=Path, required=True, help="particles STAR file (one box size)")
    p.add_argument("--ref", type=Path, required=True, help="starting map (MRC, the particles' box and pixel size)")
    p.add_argument("--o", dest="root", type=Path, required=True, help="output root, e.g. Refine3D/run")
    p.add_argument("--ini_high", type=float, default=60.0, help="low-pass of the starting map in A (default 60)")
    p.add_argument("--auto_refine", action="store_true",
                   help="iterate until converged (RELION's test), at most --iter iterations (default 999)")
    p.add_argument("--iter", type=int, default=None,
                   help="iterations to run (default 5), or the limit with --auto_refine (default 999)")
    p.add_argument("--healpix_order", type=int, default=2, help="HEALPix order of the search (default 2, 15 deg)")
    p.add_argument("--offset_range", type=float, default=6.0, help="search range of the offsets, px (default 6)")
    p.add_argument("--offset_step", type=float, default=2.0, help="step of the offsets, px (default 2)")
    p.add_argument("--oversampling", type=int, default=1, choices=(0, 1),
                   help="1: second pass on the 2x finer grid around significant points (RELION's default); 0: one pass")
    p.add_argument("--auto_local_healpix_order", type=int, default=4,
                   help="order from which each particle is searched locally around its pose (default 4)")
    p.add_argument("--max_healpix_order", type=int, default=8,
                   help="finest order the sampling schedule may reach (default 8)")
    p.add_argument("--particle_diameter", type=float, default=None,
                   help="particle diameter in A: the mask and the first pass's coarse image size "
                        "(default (N - 5) apix)")
    p.add_argument("--zero_mask", action="store_true",
                   help="likelihoods on images masked to the particle diameter, zero outside")
    p.add_argument("--flatten_solvent", action="store_true",
                   help="mask each half map with a soft sphere of the particle diameter after each iteration")
    p.add_argument("--low_resol_join_halves", type=float, default=None,
                   help="average the halves' sums below this resolution (A), e.g. 40")
    p.add_argument("--skip_gridding", action="store_true",
                   help="no iterative gridding in the M-step (relion_refine 3.1 grids by default)")
    p.add_argument("--fixed_sampling", action="store_true",
                   help="keep --healpix_order and the offsets throughout (no sampling updates)")
    p.add_argument("--perturb", type=float, default=0.5,
                   help="random perturbation of the sampling grids each iteration, in coarse steps "
                        "(RELION's; default 0.5, 0: none)")
    p.add_argument("--sym", default="C1",
                   help="point group (RELION's symbols, default C1): the search covers its asymmetric unit "
                        "of directions and the sums are symmetrised")
    p.add_argument("--pad", type=float, default=2.0, help="padding factor (default 2)")
    p.add_argument("--batch", type=int, default=256, help="particles per E-step batch (default 256)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random half sets when the STAR file has none, and of the perturbation")
    p.add_argument("--device", default="cpu", help="cpu or gpu[:ID] (default cpu)")
    p.add_argument("--continue", dest="resume", type=Path, default=None,
                   help="an ROOT_itNNN_state.json of an earlier run: continue after that iteration")


def _load_images(particles) -> np.ndarray:
    n = particles.optics[0].box_size
    out = np.empty((particles.n_particles, n, n), dtype=np.float32)
    for path in np.unique(particles.image_stacks):
        sel = np.flatnonzero(particles.image_stacks == path)
        stack = ImageStack(path)
        if stack.box_size != n:
            raise InputError(f"{path}: images are {stack.box_size} px but the STAR file's optics group says {n} px; "
                             f"fix rlnImageSize in data_optics or re-extract the particles")
        out[sel] = stack.read(particles.image_indices[sel])
    return out


def _check_symmetry(symbol: str) -> None:
    """A point group that the sampling can reduce (one line naming --sym otherwise), before any file is read."""
    from omlrelion.geometry.symmetry import point_group_matrices
    from omlrelion.refine.sampling import asymmetric_unit, healpix_directions

    try:
        point_group_matrices(symbol)
        asymmetric_unit(healpix_directions(0), symbol)
    except (InputError, ValueError) as exc:
        raise InputError(f"--sym {symbol}: {exc}") from None


def _halves(particles, seed: int) -> np.ndarray:
    subset = particles.random_subset
    if np.all(np.isin(subset, (1, 2))) and len(np.unique(subset)) == 2:
        return subset.astype(np.int64)
    order = np.random.default_rng(seed).permutation(particles.n_particles)
    halves = np.empty(particles.n_particles, dtype=np.int64)
    halves[order] = np.arange(particles.n_particles) % 2 + 1
    return halves


def main(args: argparse.Namespace) -> dict:
    from omlrelion.reconstruct.fsc import MINRES_MAP, tau2_from_fsc
    from omlrelion.reconstruct.gridding import reconstruct_map
    from omlrelion.refine.autorefine import RefineOptions, refine
    from omlrelion.pipeline.logs import progress
    from omlrelion.refine.outputs import write_model_star

    if args.iter is None:
        args.iter = 999 if args.auto_refine else 5
    if args.iter < 1 or args.healpix_order < 0 or args.offset_step <= 0 or args.offset_range < 0 or args.batch < 1:
        raise InputError("--iter and --batch must be >= 1, --healpix_order >= 0, --offset_step > 0, "
                         "--offset_range >= 0")
    if not (math.isfinite(args.pad) and args.pad >= 1):
        raise InputError(f"--pad {args.pad:g}: the padding factor must be a number >= 1")
    _check_symmetry(args.sym)
    device = parse_device(args.device)[0]
    folder = args.root.parent if str(args.root.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{args.root}: output folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{args.root}: output folder {folder} is not writable; check its permissions")
    particles = read_particles(args.star, require=("rlnImageName", "rlnDefocusU"))
    if len({(o.box_size, o.angpix) for o in particles.optics}) != 1:
        raise InputError(f"{args.star}: optics groups differ in box or pixel size; select one group and refine it "
                         f"alone")
    optics = particles.optics[0]
    start, ref_angpix = read_map(args.ref)
    if start.shape != (optics.box_size,) * 3:
        raise InputError(f"{args.ref}: map is {start.shape[0]} px, the particles are {optics.box_size} px; "
                         f"expected a map of the particles' box (resample or pad it)")
    if abs(ref_angpix - optics.angpix) > 1e-3 * optics.angpix:
        raise InputError(f"{args.ref}: pixel size {ref_angpix:g} A, the particles' is {optics.angpix:g} A; "
                         f"expected the particles' pixel size (rescale the map or fix its header)")
    images = _load_images(particles)
    ctf = particles.ctf_params()
    halves = _halves(particles, args.seed)
    opts = RefineOptions(healpix_order=args.healpix_order, offset_range_px=args.offset_range,
                         offset_step_px=args.offset_step, pad=args.pad, ini_high_A=args.ini_high, n_iter=args.iter,
                         batch=args.batch, oversampling=args.oversampling, max_order=args.max_healpix_order,
                         auto_local_order=args.auto_local_healpix_order, particle_diameter_A=args.particle_diameter,
                         auto_refine=args.auto_refine, skip_gridding=args.skip_gridding, zero_mask=args.zero_mask,
                         flatten_solvent=args.flatten_solvent, low_resol_join_A=args.low_resol_join_halves,
                         schedule=not args.fixed_sampling, perturb=args.perturb, random_seed=args.seed,
                         symmetry=args.sym.upper())
    state = None
    if args.resume is not None:
        state, halves = _resume(args.resume, particles.n_particles)
    clock = [time.perf_counter()]

    def after_iteration(st) -> None:
        _write_iteration(args.root, len(st.history), st, particles, halves, optics, opts)
        now = time.perf_counter()
        _progress_line(st, now - clock[0])
        clock[0] = now

    # the iteration number is the length of the history, which a resumed state carries on
    state = refine(images, ctf, optics, halves, start, opts, device=device, state=state, on_iteration=after_iteration,
                   initial_eulers=particles.eulers_deg, initial_shifts_px=particles.shifts_px, progress=progress)
    # RELION's final iteration: every particle aligned once more against its half map on all the data
    # up to Nyquist, then the halves' sums joined (tau2 from the full-data FSC) and the unfiltered halves
    state = refine(images, ctf, optics, halves, start, replace(opts, n_iter=1), device=device, state=state,
                   final=True, on_iteration=lambda st: _progress_line(st, time.perf_counter() - clock[0]),
                   progress=progress)
    (d1, w1), (d2, w2) = state.last_sums
    grid, last = state.last_grid, state.history[-1]
    tau2, sigma2, ssnr = tau2_from_fsc(w1 + w2, last["fsc"], grid=grid, whole_data=True)
    kwargs = dict(box_size=grid.box_size, pad=grid.pad, r_max=grid.r_max, skip_gridding=opts.skip_gridding)
    real = np.float64 if device.gpu is None else np.float32

    def on_device(d, w, **extra):
        with device.use():
            xp = device.xp
            return to_numpy(reconstruct_map(xp.asarray(d.astype(np.result_type(real, np.complex64))),
                                            xp.asarray(w.astype(real)), **kwargs, **extra)).astype(np.float32)

    joined = on_device(d1 + d2, w1 + w2, tau2=tau2, minres_map=MINRES_MAP)
    root = str(args.root)
    write_map(f"{root}_class001.mrc", joined, optics.angpix)
    for h, (d, w) in ((1, (d1, w1)), (2, (d2, w2))):
        write_map(f"{root}_half{h}_class001_unfil.mrc", on_device(d, w), optics.angpix)
    final_A = _final_resolution(last, optics)
    final_model = dict(_model(last, optics, grid), current_resolution_A=final_A, resolution_0143_A=final_A)
    write_model_star(f"{root}_model.star", final_model, tau2, sigma2, ssnr, fudge=1.0,
                     reference=Path(f"{root}_class001.mrc").name, sigma2_noise=state.sigma2[0])
    _write_data(f"{root}_data.star", state, particles, halves)
    summary = {"iterations": len(state.history), "resolution_A": final_A,
               "converged": state.converged,
               "history": [{k: v for k, v in h.items() if k != "halves"} for h in state.history]}
    print(f"omlrelion refine: {len(state.history)} iterations"
          f"{' (converged)' if state.converged else ''}, final resolution {final_A:.2f} A "
          f"(gold-standard FSC 0.143), final map {root}_class001.mrc")
    return summary


def _final_resolution(entry: dict, optics) -> float:
    """The joined halves' resolution, RELION's final r*: its rule on the full-data FSC sqrt(2f / (1 + f)),
    i.e. where the halves' FSC drops below 1/7 (0.143)."""
    from omlrelion.reconstruct.fsc import resolution_shell

    f = np.clip(np.asarray(entry["fsc"], dtype=np.float64), 0.0, 1.0)
    shell = resolution_shell(np.sqrt(2 * f / (1 + f)))
    return optics.box_size * optics.angpix / max(shell, 1)


def _progress_line(state, seconds: float) -> None:
    h = state.history[-1]
    search = "local" if h["local"] else "global"
    acc = (f"acc {h['acc_rot_deg']:.2f} deg / {h['acc_trans_A']:.2f} A" if h["acc_rot_deg"] < 999
           else "acc -")
    print(f"iteration {len(state.history):3d}: {h['resolution_A']:6.2f} A (size {h['current_size']}), order "
          f"{h['healpix_order']} {search}, offsets {h['offset_range_px']:.2f}/{h['offset_step_px']:.2f} px, {acc}, "
          f"<significant> {h['n_significant_mean']:.1f}, <Pmax> {h['ave_pmax']:.3f}, {seconds:.1f} s", flush=True)


def _model(entry: dict, optics, grid) -> dict:
    n, apix = optics.box_size, optics.angpix
    acc = entry.get("acc_rot_deg", 999.0)
    return {"box_size": n, "angpix": apix, "pad": grid.pad, "r_max": entry["r_max"],
            "current_resolution_A": entry["resolution_A"], "resolution_0143_A": entry["resolution_A"],
            "fsc": entry["fsc"], "ave_pmax": entry["ave_pmax"],
            "acc_rot_deg": None if acc >= 999 else acc, "acc_trans_A": entry.get("acc_trans_A")}


def _write_data(path, state, particles, halves) -> None:
    table = particles.table.copy()
    table["rlnMaxValueProbDistribution"] = state.pmax
    table["rlnNrOfSignificantSamples"] = state.n_significant
    table["rlnImageName"] = particles.image_names_relative_to(Path(path).parent)
    write_particles(path, replace(particles, table=table, eulers_deg=state.eulers.copy(),
                                  shifts_px=state.shifts_px.copy(), random_subset=halves))


def _write_iteration(root: Path, it: int, state, particles, halves, optics, opts) -> None:
    from omlrelion.refine.outputs import write_model_star, write_sampling_star
    from omlrelion.refine.sampling import Sampling

    stem = f"{root}_it{it:03d}"
    entry = state.history[-1]
    sch = state.schedule
    write_sampling_star(f"{stem}_sampling.star",
                        Sampling(sch.order, sch.offset_range_px, sch.offset_step_px, symmetry=opts.symmetry,
                                 perturb=state.perturb), angpix=optics.angpix, perturb_factor=opts.perturb,
                        original=Sampling(opts.healpix_order, opts.offset_range_px, opts.offset_step_px,
                                          symmetry=opts.symmetry))
    for h in (1, 2):
        write_map(f"{stem}_half{h}_class001.mrc", np.asarray(state.maps[h - 1], dtype=np.float32), optics.angpix)
        spectra = entry["halves"][h - 1]
        write_model_star(f"{stem}_half{h}_model.star", _model(entry, optics, state.last_grid), spectra["tau2"],
                         spectra["sigma2_ref"], spectra["ssnr"], fudge=1.0,
                         reference=Path(f"{stem}_half{h}_class001.mrc").name, sigma2_noise=state.sigma2[h - 1],
                         pdf_direction=state.pdf_direction[h - 1] if state.pdf_direction else None)
    _write_data(f"{stem}_data.star", state, particles, halves)
    write_json(Path(f"{stem}_state.json"), {
        "iteration": it, "r_star": state.r_star, "schedule": asdict(state.schedule), "incr_size": state.incr_size,
        "high_fsc_at_limit": state.high_fsc_at_limit, "offset_change_A": state.offset_change_A,
        "perturb": state.perturb,
        "pdf_direction": [None if p is None else p.tolist() for p in state.pdf_direction or [None, None]],
        "pdf_order": state.pdf_order,
        "sigma2": [s.tolist() for s in state.sigma2],
        "sigma_offset_A": list(state.sigma_offset_A), "history": state.history,
        "halves": halves.tolist(), "maps": [f"{Path(stem).name}_half{h}_class001.mrc" for h in (1, 2)],
        "data": f"{Path(stem).name}_data.star"}, indent=1)


def _resume(path: Path, n_particles: int):
    from omlrelion.refine.autorefine import RefineState
    from omlrelion.refine.schedule import Schedule

    if not path.is_file():
        raise InputError(f"{path}: no such state file to continue from; check the path")
    try:
        saved = json.loads(path.read_text())
        maps = [read_map(path.parent / name)[0].astype(np.float64) for name in saved["maps"]]
        data = read_particles(path.parent / saved["data"])
        halves = np.asarray(saved["halves"], dtype=np.int64)
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(f"{path}: not a refine state file ({exc}); expected an ROOT_itNNN_state.json of "
                         f"omlrelion refine") from None
    if len(halves) != n_particles or data.n_particles != n_particles:
        raise InputError(f"{path}: it describes {len(halves)} particles, the STAR file has {n_particles}; "
                         f"use the STAR file that run started from")
    state = RefineState(maps=maps, sigma2=[np.asarray(s) for s in saved["sigma2"]],
                        sigma_offset_A=list(saved["sigma_offset_A"]), r_star=int(saved["r_star"]),
                        eulers=data.eulers_deg.copy(), shifts_px=data.shifts_px.copy(),
                        pmax=np.zeros(n_particles), n_significant=np.zeros(n_particles, dtype=np.int64),
                        history=list(saved["history"]), schedule=Schedule(**saved["schedule"]),
                        incr_size=int(saved["incr_size"]), high_fsc_at_limit=bool(saved["high_fsc_at_limit"]),
                        offset_change_A=float(saved["offset_change_A"]), perturb=float(saved["perturb"]),
                        pdf_direction=[None if p is None else np.asarray(p) for p in saved.get("pdf_direction",
                                                                                               [None, None])],
                        pdf_order=int(saved.get("pdf_order", -1)))
    return state, halves
