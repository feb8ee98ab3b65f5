"""RELION's 3D auto-refine on particle images in memory (spec `relion-refinement.md`, 3-5).

Per iteration and half set: each image recentred on its rounded offset (and, with `zero_mask`,
masked to the particle diameter for the likelihoods), the projector of the half's map at the
current r_max, the first pass over the HEALPix grid (the point group's asymmetric unit of
directions) on RELION's coarse image size,
the oversampled second pass on the significant points at the current size (or, from
`auto_local_order` on, a local search within 3 sigma of each pose), the posterior-weighted
back-projection of the unmasked images with 1/sigma2 weights, and the noise and offset updates.
Then the halves' sums symmetrised (point group), their low-resolution join, their FSC, tau2 from it and each half's MAP
reconstruction (`reconstruct_map`, with iterative gridding unless `skip_gridding`), solvent
flattening, r* (FSC 0.5), incr_size and the no-gain counter.

Schedule (`refine.schedule`): accuracy estimates on 100 particles, finer sampling after an
iteration without resolution gain and without large pose changes, convergence once the fine step
is below 0.75 acc_rot (`auto_refine`). `final=True` runs RELION's last iteration on all data.

The sampling grids are perturbed each iteration as RELION's (`perturb`, spec 3.7). Global searches
weigh the directions by the distribution each half learned in its last E-step at the same HEALPix
order (spec 3.5, 4.5).

Not done: norm and scale corrections.
`omlrelion refine` (`cli/refine.py`) writes
RELION's file names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from omlrelion.backend import Device, get_xp, to_numpy
from omlrelion.ctf.ctf import CtfParams, ctf_2d
from omlrelion.ctf.optics import Optics
from omlrelion.fourier.layout import irfft2_centred, rfft2_centred, shift_2d
from omlrelion.fourier.projector import extract_slices, volume_to_ftc
from omlrelion.fourier.symmetrise import hermitian_repair, symmetrise
from omlrelion.geometry.symmetry import point_group_matrices
from omlrelion.geometry.euler import euler_to_matrix
from omlrelion.geometry.grids import PaddedGrid, signed_freqs
from omlrelion.reconstruct.fsc import (
    MINRES_MAP,
    fsc_from_sums,
    resolution_shell,
    tau2_from_fsc,
)
from omlrelion.reconstruct.gridding import reconstruct_map, soft_edge, soft_sphere
from omlrelion.refine.expectation import HalfPlanePixels, expectation, fine_pass_parts, offset_log_prior
from omlrelion.refine.maximization import (
    accumulate,
    inverse_sigma2_plane,
    shell_index,
    update_sigma2,
    update_sigma_offset,
)
from omlrelion.refine.sampling import Sampling, angular_step, local_orientations_batch
from omlrelion.refine.schedule import Schedule, accuracy_estimates, hidden_variable_changes
from omlrelion.units import relion_round

log = logging.getLogger(__name__)


@dataclass
class RefineOptions:
    healpix_order: int = 2
    offset_range_px: float = 6.0
    offset_step_px: float = 2.0
    pad: float = 2.0
    ini_high_A: float = 60.0
    incr_size: int = 10
    n_iter: int = 5
    sigma_offset_A: float = 10.0
    adaptive_fraction: float = 0.999
    batch: int = 256
    oversampling: int = 1            # RELION's default: a second pass on the 2x finer grid (0: one pass)
    schedule: bool = True            # RELION's sampling updates (5.5); False: the starting sampling throughout
    max_order: int = 8               # the finest HEALPix order the schedule may reach
    auto_local_order: int = 4        # from this order on, local searches around each particle's pose
    particle_diameter_A: float | None = None   # mask diameter and coarse image size; None: (N - 5) apix
    auto_refine: bool = False        # stop once converged (5.7); n_iter is then the iteration limit
    skip_gridding: bool = False      # relion_refine 3.1's default: iterative gridding in the M-step
    zero_mask: bool = False          # likelihoods on images masked to the particle diameter, zero outside
    flatten_solvent: bool = False    # multiply each new half map by a soft sphere of the particle diameter
    low_resol_join_A: float | None = None   # average the halves' sums below this resolution (A)
    perturb: float = 0.5             # RELION's random perturbation of the sampling grids (0: none)
    random_seed: int = 0             # seeds the perturbation (and nothing else)
    symmetry: str = "C1"             # point group: directions of its asymmetric unit, symmetrised sums


@dataclass
class RefineState:
    """What the loop carries between iterations (per half where a list of two)."""

    maps: list
    sigma2: list
    sigma_offset_A: list
    r_star: int
    eulers: np.ndarray                  # (M, 3) best rot, tilt, psi of every particle
    shifts_px: np.ndarray               # (M, 2) best origin offsets
    pmax: np.ndarray
    n_significant: np.ndarray = None    # (M,) significant samples of each particle's last E-step
    history: list = field(default_factory=list)
    schedule: Schedule = None           # sampling, counters and convergence flags (shared by the halves)
    incr_size: int = 10                 # shells added to r* for the next current size (grows with the FSC)
    high_fsc_at_limit: bool = False     # FSC > 0.2 at the last image size's edge: r_max grows by N/8
    offset_change_A: float = 0.0        # RMS offset change of the last iteration
    perturb: float = 0.0                # the sampling grids' random perturbation rho, in coarse steps
    converged: bool = False
    pdf_direction: list = None          # per half: the learned direction prior (None: uniform) ...
    pdf_order: int = -1                 # ... of the HEALPix order it was learned at
    last_sums: list = None              # the final iteration's (data, weight) per half (host)
    last_grid: PaddedGrid = None        # the last iteration's padded grid


def window_2d(a_ft, c: int):
    """(..., N, N//2+1) corner-layout transforms -> the frequencies of a side-c window."""
    n = a_ft.shape[-2]
    k = signed_freqs(c, np)
    rows = np.where(k < 0, k + n, k)
    return a_ft[..., rows, :c // 2 + 1]


def initial_sigma2(images_ft) -> np.ndarray:
    """Per-shell noise power (spec 5.9): mean |F|^2 / 2 - |mean F|^2 / 2 (negative values: previous shell).
    images_ft: NumPy or CuPy (summed in float64); returns NumPy."""
    xp = get_xp(images_ft)
    n = images_ft.shape[-2]
    shells = shell_index(n).ravel()
    n_shells = n // 2 + 1
    keep = np.flatnonzero(shells < n_shells)
    s_keep = xp.asarray(shells[keep])
    k_dev = xp.asarray(keep)
    f = images_ft.astype(xp.complex128, copy=False).reshape(len(images_ft), -1)
    power = (xp.abs(f) ** 2).mean(axis=0)[k_dev]
    mean_power = xp.abs(f.mean(axis=0))[k_dev] ** 2
    count = np.bincount(shells[keep], minlength=n_shells)
    s = to_numpy(xp.bincount(s_keep, weights=power, minlength=n_shells)
                 - xp.bincount(s_keep, weights=mean_power, minlength=n_shells)) / (2 * np.maximum(count, 1))
    for r in range(len(s)):
        if s[r] <= 0:
            s[r] = s[r - 1] if r > 0 else s[s > 0].min()
    return s


def low_pass(volume, *, angpix: float, resolution_A: float):
    """Zero the map's Fourier components beyond `resolution_A` (sharp cut, as RELION's ini_high);
    on the volume's device, in its precision."""
    xp = get_xp(volume)
    n = volume.shape[0]
    f = xp.fft.rfftn(volume)
    k = xp.fft.fftfreq(n) * n
    r = xp.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + xp.arange(n // 2 + 1)[None, None, :] ** 2)
    f[r > n * angpix / resolution_A] = 0
    return xp.fft.irfftn(f, s=volume.shape, axes=(0, 1, 2))


def fine_pass_batch(vft, images, ctf, noise_weight, pixels, sampling, coarse_posterior, log_prior_t, data, weight,
                    inv_sigma2, *, box_size: int, pad: float, r_padded: int, adaptive_fraction: float = 0.999,
                    ov: int = 1, noise_sums: bool = True, angpix: float = 1.0, masked_images=None,
                    centres_px=None, log_prior_r=None, orientation_index=None):
    """RELION's second pass for a batch, back-projected into (data, weight).

    images, ctf: (B, c, c//2+1) on the current window (images unmasked: back-projected);
    masked_images: the likelihood's images (default `images`); coarse_posterior (B, T, R) of the first
    pass on `sampling`'s grid (or on `orientation_index`'s subset, with log_prior_r (B, R)); log_prior_t
    (B, T); centres_px (B, 2): the offsets the images were recentred on (the shifts returned are
    relative to them). With `noise_sums`, the M-step's noise sums are made too. Returns (eulers (B, 3),
    shifts (B, 2), pmax (B,), n_significant (B,), list of sums, posterior mass on each coarse
    orientation of the sampling).
    """
    xp = get_xp(images)
    b = len(images)
    masked_images = images if masked_images is None else masked_images
    centres_px = np.zeros((b, 2)) if centres_px is None else np.asarray(centres_px)
    eulers, shifts = np.zeros((b, 3)), np.zeros((b, 2))
    pmax, n_sig, sums = np.zeros(b), np.zeros(b, dtype=np.int64), []
    mass = np.zeros(len(sampling.eulers()))
    for rows, f in fine_pass_parts(vft, masked_images, ctf, noise_weight, pixels, sampling, coarse_posterior,
                                   sampling.shifts, box_size=box_size, pad=pad, r_padded=r_padded,
                                   log_prior_t=log_prior_t, log_prior_r=log_prior_r,
                                   adaptive_fraction=adaptive_fraction, ov=ov, orientation_index=orientation_index):
        eulers[rows], shifts[rows], pmax[rows], n_sig[rows] = f.best_euler, f.best_shift, f.pmax, f.n_significant
        mass += f.orientation_mass(len(mass))
        r = xp.asarray(rows)
        sums.append(accumulate(data, weight, images[r], ctf[r], inv_sigma2, f.posterior, f.eulers, f.shifts_px,
                               box_size=box_size, pad=pad, r_padded=r_padded,
                               projections=f.projections if noise_sums else None, angpix=angpix,
                               old_offsets_px=centres_px[rows], noise_images=masked_images[r],
                               slots=(f.t_index, f.r_index)))
    return eulers, shifts, pmax, n_sig, sums, mass


def coarse_size(box_size: int, angpix: float, current_size: int, order: int, particle_diameter_A: float) -> int:
    """RELION's image size of the first (coarse) pass: 2 ceil(N apix / d_c), d_c = (step / 360) pi D / 1.2
    with the coarse angular step of the order, at most the current size (spec 3.7)."""
    d_c = angular_step(order) / 360.0 * np.pi * particle_diameter_A / 1.2
    return int(min(current_size, 2 * int(np.ceil(box_size * angpix / d_c))))


def _local_batch(prior_eulers, vft, x, xm, ct, noise_w, pix, sampling, prior_t, sigma_deg: float,
                 data, weight, inv_d, centre, *, opts: RefineOptions, grid: PaddedGrid, box_size: int, angpix: float):
    """A batch's local search (spec 3.5, 3.10): each particle's orientations within 3 sigma of its last
    pose `prior_eulers` (B, 3) with their Gaussian prior (one set of projections for the batch: the
    union), then the second pass and the back-projection. Returns what `fine_pass_batch` does."""
    xp = get_xp(x)
    index, log_prior_r = local_orientations_batch(sampling, prior_eulers, sigma_deg)
    eulers = sampling.eulers()[index]
    proj = extract_slices(vft, xp.asarray(euler_to_matrix(eulers)), box_size=x.shape[-2], pad=opts.pad,
                          r_padded=grid.r_padded)
    prior_r = xp.asarray(log_prior_r, dtype=x.real.dtype)
    e = expectation(proj, xm, ct, noise_w, sampling.shifts, pix, box_size=box_size,
                    log_prior=prior_t + prior_r[:, None, :], adaptive_fraction=opts.adaptive_fraction)
    if opts.oversampling <= 0:
        sums = accumulate(data, weight, x, ct, inv_d, e.posterior, eulers, sampling.shifts, box_size=box_size,
                          pad=opts.pad, r_padded=grid.r_padded, projections=proj, angpix=angpix,
                          old_offsets_px=centre, noise_images=xm)
        mass = np.bincount(index, weights=to_numpy(e.posterior.sum(axis=(0, 1))), minlength=len(sampling.eulers()))
        return (eulers[e.best_orientation], sampling.shifts[e.best_shift], e.pmax, e.n_significant, [sums], mass)
    return fine_pass_batch(vft, x, ct, noise_w, pix, sampling, e.posterior, prior_t[:, :, 0], data, weight, inv_d,
                           box_size=box_size, pad=opts.pad, r_padded=grid.r_padded,
                           adaptive_fraction=opts.adaptive_fraction, ov=opts.oversampling, angpix=angpix,
                           masked_images=xm, centres_px=centre, log_prior_r=prior_r, orientation_index=index)


def circular_mask(n: int, radius_px: float, xp, *, width: float = 5.0):
    """(n, n) soft disc around n//2: 1 inside `radius_px`, a raised cosine to 0 over `width` px outward."""
    c = xp.arange(n, dtype=xp.float64) - n // 2
    return 1.0 - soft_edge(xp.sqrt(c[:, None] ** 2 + c[None, :] ** 2), radius=radius_px, width=width)


def particle_diameter(particle_diameter_A: float | None, box_size: int, angpix: float) -> float:
    """The particle diameter in A: the one given, or (N - 5) pixels (RELION's default)."""
    return particle_diameter_A or (box_size - 5) * angpix


def starting_sigma2(images, opts: RefineOptions, *, angpix: float, device: Device = Device()) -> np.ndarray:
    """A half set's starting noise spectrum (spec 5.9, `initial_sigma2`) from its first
    SIGMA2_PARTICLES images (P, N, N), masked to the particle diameter with `opts.zero_mask`;
    computed in float64 on `device`."""
    n = images.shape[-1]
    with device.use():
        xp = device.xp
        first = xp.asarray(images, dtype=xp.float64)
        if opts.zero_mask:
            first = first * circular_mask(n, particle_diameter(opts.particle_diameter_A, n, angpix) / (2 * angpix), xp)
        return initial_sigma2(rfft2_centred(first))


def starting_schedule(opts: RefineOptions) -> Schedule:
    """The first iteration's sampling: `healpix_order` and the offsets, local from `auto_local_order`."""
    return Schedule(opts.healpix_order, opts.offset_range_px, opts.offset_step_px,
                    local=opts.healpix_order >= opts.auto_local_order)


def solvent_flatten(volume, radius_px: float, *, width: float = 5.0):
    """RELION's --flatten_solvent without a user mask: multiply by a soft sphere (1 inside, 0 outside)."""
    mask = soft_sphere(volume.shape[0], radius_px, width=width, xp=get_xp(volume), dtype=volume.dtype)
    return volume * mask.astype(volume.dtype)


def join_shell(join_A: float, box_size: int, angpix: float, r_star: int) -> int:
    """RELION's --low_resol_join_halves shell: the halves are averaged up to join_A, or up to the
    current resolution (shell r_star) when that is lower."""
    return int(np.ceil(box_size * angpix / max(join_A, box_size * angpix / max(int(r_star), 1))))


def low_resolution_join(sums, *, grid: PaddedGrid, shell: int) -> None:
    """Replace both halves' data and weight by their average within round(pad * shell) (in place)."""
    c = grid.size // 2
    k = np.arange(-c, c + 1)
    r2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + np.arange(grid.half)[None, None, :] ** 2
    inside = r2 <= relion_round(grid.pad * shell) ** 2
    xp = get_xp(sums[0][0])
    inside = xp.asarray(inside)
    for part in (0, 1):
        mean = 0.5 * (sums[0][part] + sums[1][part])
        for h in (0, 1):
            sums[h][part][...] = xp.where(inside, mean, sums[h][part])


def _prepare_batch(images, sel, centres_px, mask, sizes, xp, real):
    """A batch's transforms (made on the device) recentred on their rounded offsets (RELION 3.1): the
    unmasked window of the current size (for back-projection) and the masked windows of each size in
    `sizes` (likelihoods)."""
    x = shift_2d(rfft2_centred(xp.asarray(images[sel], dtype=real)), centres_px)         # complex of `real`
    n = x.shape[-2]
    xm = x if mask is None else rfft2_centred((irfft2_centred(x, n) * mask).astype(real))
    return window_2d(x, sizes[0]), [window_2d(xm, c) for c in sizes]


def refine(images, ctf: CtfParams, optics: Optics, halves, initial_map, opts: RefineOptions, *,
           device: Device = Device(), state: RefineState | None = None, final: bool = False,
           on_iteration=None, initial_eulers=None, initial_shifts_px=None, progress=None) -> RefineState:
    """Run up to `opts.n_iter` iterations on images (M, N, N) with half sets `halves` (M,) in {1, 2}.

    With `opts.auto_refine` the loop stops early once RELION's convergence test passes
    (`state.converged`). final: RELION's last iteration, on all the data up to Nyquist (current size
    N; the caller joins the halves' sums, `state.last_sums`, for the final map). on_iteration: called
    with the state after every iteration (e.g. to write its files). initial_eulers/shifts_px: the
    input poses (their rounded offsets centre the first translational search). progress: a factory
    (total, desc) -> bar with update(n) and close() (e.g. `pipeline.logs.progress`), a bar over the
    particles of each iteration.
    """
    images = np.asarray(images)
    m, n = images.shape[0], images.shape[-1]
    halves = np.asarray(halves)
    apix = optics.angpix
    radius_px = particle_diameter(opts.particle_diameter_A, n, apix) / (2 * apix)
    work = resident_images(images, device)
    if state is None:
        with device.use():
            start = to_numpy(low_pass(device.xp.asarray(initial_map, dtype=np.float64), angpix=apix,
                                      resolution_A=opts.ini_high_A))
        sigma2 = [starting_sigma2(work[np.flatnonzero(halves == h)[:SIGMA2_PARTICLES]], opts, angpix=apix,
                                  device=device) for h in (1, 2)]
        state = RefineState(
            maps=[start, start.copy()], sigma2=sigma2, sigma_offset_A=[opts.sigma_offset_A] * 2,
            r_star=relion_round(n * apix / opts.ini_high_A),
            eulers=np.zeros((m, 3)) if initial_eulers is None else np.array(initial_eulers, dtype=np.float64),
            shifts_px=np.zeros((m, 2)) if initial_shifts_px is None else np.array(initial_shifts_px, dtype=np.float64),
            pmax=np.zeros(m), n_significant=np.zeros(m, dtype=np.int64),
            schedule=starting_schedule(opts),
            incr_size=opts.incr_size)
    sch = state.schedule
    ov = max(opts.oversampling, 0)
    sym_matrices = point_group_matrices(opts.symmetry)
    for _ in range(opts.n_iter):
        if state.history and not final:
            if opts.auto_refine and sch.converged():
                state.converged = True
                break
            if opts.schedule:
                r_acc = min(n // 2, state.r_star + state.incr_size)
                sel = np.flatnonzero(halves == 1)[:ACCURACY_PARTICLES]
                sch.acc_rot_deg, sch.acc_trans_px = accuracy(state.maps[0], ctf.take(sel), optics,
                                                             state.eulers[sel], state.sigma2[0], r_max=r_acc,
                                                             opts=opts, device=device,
                                                             seed=len(state.history))
                sch.update_sampling(ov=ov, angpix=apix, offset_change_A=state.offset_change_A,
                                    max_order=opts.max_order, auto_local_order=opts.auto_local_order)
        state.perturb = next_perturbation(state.perturb, opts.perturb, seed=opts.random_seed,
                                          iteration=len(state.history))
        if final:
            r_max = n // 2
        else:
            r_max = next_r_max(state.r_star, state.incr_size, n, high_fsc_at_limit=state.high_fsc_at_limit,
                               mean_pmax=float(state.pmax.mean()))
        grid = PaddedGrid(n, opts.pad, r_max)
        old_eulers, old_shifts = state.eulers.copy(), state.shifts_px.copy()
        bar = None if progress is None else progress(m, f"iteration {len(state.history) + 1}")
        sums, stats = [], []
        priors = direction_priors(state.pdf_direction, state.pdf_order, sch.order)
        pdf = []
        for h in (1, 2):
            idx = np.flatnonzero(halves == h)
            found = expect_particles(work, ctf, optics, idx, state.maps[h - 1], state.sigma2[h - 1],
                                     state.sigma_offset_A[h - 1], state.eulers[idx], state.shifts_px[idx],
                                     schedule=sch, perturb=state.perturb, r_max=r_max, opts=opts, device=device,
                                     bar=bar, direction_prior=priors[h - 1])
            pdf.append(direction_distribution(found.noise["direction_mass"]))
            state.eulers[idx], state.shifts_px[idx] = found.eulers, found.shifts_px
            state.pmax[idx], state.n_significant[idx] = found.pmax, found.n_significant
            data, weight = found.data, found.weight
            with device.use():
                hermitian_repair(data, weight)
                if len(sym_matrices) > 1:
                    data, weight = symmetrise(data, weight, sym_matrices, grid.r_padded)
            sums.append([data, weight])
            stats.append([found.noise])
        if bar is not None:
            bar.close()
        angle_change, offset_change = hidden_variable_changes(old_eulers, state.eulers, old_shifts, state.shifts_px,
                                                              symmetry=sym_matrices,
                                                              angpix=apix)
        state.offset_change_A = offset_change
        if opts.low_resol_join_A:
            low_resolution_join(sums, grid=grid, shell=join_shell(opts.low_resol_join_A, n, apix, state.r_star))
        with device.use():
            curve = fsc_from_sums(sums[0][0], sums[0][1], sums[1][0], sums[1][1], grid=grid)
        spectra = []
        for h in (1, 2):
            data, weight = sums[h - 1]
            with device.use():
                tau2, sigma2_ref, ssnr = tau2_from_fsc(weight, curve, grid=grid, whole_data=False)
            spectra.append({"tau2": tau2.tolist(), "sigma2_ref": sigma2_ref.tolist(), "ssnr": ssnr.tolist()})
            with device.use():
                new_map = reconstruct_map(data, weight, box_size=n, pad=opts.pad, r_max=r_max,
                                          skip_gridding=opts.skip_gridding, tau2=tau2, minres_map=MINRES_MAP)
                if opts.flatten_solvent and not final:
                    new_map = solvent_flatten(new_map, radius_px)
                state.maps[h - 1] = to_numpy(new_map).astype(np.float64)
            state.sigma2[h - 1] = update_sigma2(state.sigma2[h - 1], stats[h - 1])
            state.sigma_offset_A[h - 1] = update_sigma_offset(stats[h - 1])
        state.last_grid = grid
        if final:           # the caller joins them
            state.last_sums = [(to_numpy(d).astype(np.complex128), to_numpy(w).astype(np.float64)) for d, w in sums]
        del sums
        state.pdf_direction, state.pdf_order = pdf, sch.order
        _update_resolution(state, curve, n, found.current_size)
        if not final:
            sch.record_changes(angle_change, offset_change, ov=ov, angpix=apix)
        state.history.append({"r_max": r_max, "current_size": found.current_size, "fsc": curve.tolist(),
                              "r_star": state.r_star,
                              "resolution_A": n * apix / state.r_star, "ave_pmax": float(state.pmax.mean()),
                              "halves": spectra, "healpix_order": sch.order, "local": sch.local,
                              "coarse_size": found.coarse_size, "offset_range_px": sch.offset_range_px,
                              "offset_step_px": sch.offset_step_px, "acc_rot_deg": sch.acc_rot_deg,
                              "acc_trans_A": sch.acc_trans_px * apix, "angle_change_deg": angle_change,
                              "offset_change_A": offset_change,
                              "n_significant_mean": float(state.n_significant.mean())})
        log.info("refine iteration %d: r_max %d, resolution %.2f A, <Pmax> %.3f", len(state.history), r_max,
                 n * apix / state.r_star, state.pmax.mean())
        if on_iteration is not None:
            on_iteration(state)
    return state


def resident_images(images, device: Device, *, fraction: float = 0.25):
    """The images for all iterations: on a GPU, copied there once as float32 when they take at most
    `fraction` of its free memory (otherwise, as on the host, each batch is copied when used)."""
    if device.gpu is None or images.size * 4 > fraction * device.free_bytes():
        return images
    with device.use():
        return device.xp.asarray(images, dtype=np.float32)


def _update_resolution(state: RefineState, curve, n: int, current_size: int) -> None:
    """r* from the FSC (5.2), the no-gain counter, incr_size and the high-FSC-at-the-limit flag (4.4)."""
    curve = np.asarray(curve)
    r_new = resolution_shell(curve)
    state.schedule.iter_wo_gain = state.schedule.iter_wo_gain + 1 if r_new <= state.r_star else 0
    state.r_star = r_new
    below_05 = np.flatnonzero(curve[1:] < 0.5)
    below_0143 = np.flatnonzero(curve[1:] < 0.143)
    if below_05.size and below_0143.size:
        state.incr_size = max(state.incr_size, int(below_0143[0] - below_05[0]) + 5)
    state.high_fsc_at_limit = high_fsc_at_limit(curve, current_size)


def high_fsc_at_limit(curve, current_size: int) -> bool:
    """RELION's test after every iteration (ml_optimiser): the halves' FSC above 0.2 at shell
    current_size / 2 - 1, the edge of the iteration's image size; the next r_max then grows by N/8
    while <Pmax> > 0.1 (`next_r_max`)."""
    shell = current_size // 2 - 1
    return bool(0 <= shell < len(curve) and curve[shell] > 0.2)

ACCURACY_PARTICLES = 100          # RELION's accuracy estimates use the first 100 particles of half 1
SIGMA2_PARTICLES = 1000           # and its starting noise spectrum each half's first 1000


@dataclass
class ParticleExpectation:
    """One E-step over a set of particles of one half set: their sums (on the device), new poses
    (aligned with the rows given), and the noise and offset sums of the M-step (summed dict, see
    `maximization.accumulate`)."""

    data: object
    weight: object
    eulers: np.ndarray
    shifts_px: np.ndarray
    pmax: np.ndarray
    n_significant: np.ndarray
    noise: dict
    current_size: int
    coarse_size: int


def sum_noise(parts) -> dict:
    """The batches' (or shards') noise and offset sums added up (`accumulate`'s dicts)."""
    parts = list(parts)
    keys = sorted(set().union(*parts)) if parts else ["gamma_sum", "offset_sum", "sigma2_count", "sigma2_sum"]
    out = {k: sum((np.asarray(d[k], dtype=np.float64) for d in parts if k in d), np.float64(0)) for k in keys}
    out["offset_sum"], out["gamma_sum"] = float(out["offset_sum"]), float(out["gamma_sum"])
    return out


def direction_priors(pdf_direction, pdf_order: int | None, order: int) -> list:
    """Each half's direction prior for a search at HEALPix `order`: the distributions `pdf_direction`
    (per half, None: uniform) while they were learned at that order (`pdf_order`), else uniform
    (RELION resets them when the order changes)."""
    return list(pdf_direction) if pdf_direction and pdf_order == order else [None, None]


def direction_distribution(direction_mass) -> np.ndarray | None:
    """RELION's learned direction prior (spec 4.5): each direction's share of the posterior mass of
    an E-step (its `direction_mass`); None (uniform) when there is no mass."""
    mass = np.asarray(direction_mass, dtype=np.float64)
    total = mass.sum()
    return mass / total if total > 0 else None


def next_r_max(r_star: int, incr_size: int, box_size: int, *, high_fsc_at_limit: bool = False,
               mean_pmax: float = 0.0) -> int:
    """The next iteration's current size / 2 (spec 4.4): r* + incr_size, or r* + N/8 once the FSC was
    high at the edge and the poses are certain (<Pmax> > 0.1); at most Nyquist."""
    if high_fsc_at_limit and mean_pmax > 0.1:
        return min(box_size // 2, r_star + relion_round(0.125 * box_size))
    return min(box_size // 2, r_star + incr_size)


def next_perturbation(perturb: float, fraction: float, *, seed: int, iteration: int) -> float:
    """Spec 3.7: the sampling grids' random perturbation rho += U(f/2, f), wrapped into [-f, f]
    (seeded by `seed` and the number of iterations done; 0 when f is 0)."""
    if fraction <= 0:
        return perturb
    rng = np.random.default_rng([seed, iteration])
    perturb += rng.uniform(0.5 * fraction, fraction)
    return perturb - 2 * fraction if perturb > fraction else perturb


def expect_particles(images, ctf: CtfParams, optics: Optics, rows, volume, sigma2, sigma_offset_A: float, eulers,
                     shifts_px, *, schedule: Schedule, perturb: float, r_max: int, opts: RefineOptions,
                     device: Device = Device(), bar=None, apply_ctf: bool = True,
                     direction_prior=None) -> ParticleExpectation:
    """The E-step of particles `rows` of `images` (M, N, N) (one half set, or a shard of one) against
    their half's map `volume`, with its noise spectrum `sigma2` and offset prior, at poses `eulers`
    (P, 3) / `shifts_px` (P, 2) aligned with `rows`; the sampling of `schedule` perturbed by
    `perturb`, the current size 2 r_max.

    Each batch is recentred on its rounded offsets; global searches take the first pass on RELION's
    coarse image size and the oversampled second pass on its significant points, local searches the
    orientations within 3 sigma of each pose; the posterior-weighted back-projection with 1/sigma2
    goes into new sums of the padded grid (float64 on the host, float32 on a GPU). apply_ctf False:
    images without CTF (CTF 1). direction_prior: the learned distribution over the sampling's
    directions (spec 3.5, `direction_distribution`) that weighs a global search's orientations (a
    direction without mass is skipped); None: uniform. Local searches take their Gaussian priors."""
    rows = np.asarray(rows)
    n, apix = images.shape[-1], optics.angpix
    xp = device.xp
    real = np.float64 if device.gpu is None else np.float32
    cplx = np.result_type(real, np.complex64)
    ov = max(opts.oversampling, 0)
    diameter_A = particle_diameter(opts.particle_diameter_A, n, apix)
    sampling = Sampling(schedule.order, schedule.offset_range_px, schedule.offset_step_px, symmetry=opts.symmetry,
                        perturb=perturb)
    all_eulers, shifts = sampling.eulers(), sampling.shifts
    sigma_local = 2 * angular_step(schedule.order + ov)
    c = min(n, 2 * r_max)
    grid = PaddedGrid(n, opts.pad, r_max)
    pix = HalfPlanePixels.of(c)
    cc = c if schedule.local or ov == 0 else coarse_size(n, apix, c, schedule.order, diameter_A)
    p = len(rows)
    new_eulers, new_shifts = np.array(eulers, dtype=np.float64), np.array(shifts_px, dtype=np.float64)
    pmax, n_sig = np.zeros(p), np.zeros(p, dtype=np.int64)
    noise = []
    orientation_mass = np.zeros(len(all_eulers))
    inv = inverse_sigma2_plane(sigma2, c)
    with device.use():
        prior_r = None
        if direction_prior is not None and not schedule.local:
            with np.errstate(divide="ignore"):
                log_pdf = np.log(np.asarray(direction_prior, dtype=np.float64))
            prior_r = xp.asarray(np.repeat(log_pdf, len(sampling.psi)), dtype=real)       # (R,)
        mask = (xp.asarray(circular_mask(n, diameter_A / (2 * apix), np), dtype=real) if opts.zero_mask
                else None)
        vft = volume_to_ftc(xp.asarray(volume, dtype=real), pad=opts.pad, r_max=r_max)
        proj_c = proj = None
        if not schedule.local:
            proj_c = extract_slices(vft, xp.asarray(euler_to_matrix(all_eulers)), box_size=cc, pad=opts.pad,
                                    r_padded=grid.r_padded)
            if cc == c:
                proj = proj_c
        pix_c = HalfPlanePixels.of(cc)
        noise_c = xp.asarray(inverse_sigma2_plane(sigma2, cc).ravel()[pix_c.index], dtype=real)
        data = xp.zeros(grid.shape, dtype=cplx)
        weight = xp.zeros(grid.shape, dtype=real)
        noise_w = xp.asarray(inv.ravel()[pix.index], dtype=real)
        inv_d = xp.asarray(inv, dtype=real)
        for start in range(0, p, opts.batch):
            at = slice(start, start + opts.batch)
            sel = rows[at]
            if bar is not None:
                bar.update(len(sel))
            centre = np.rint(new_shifts[at])
            x, (xm, xm_c) = _prepare_batch(images, sel, centre, mask, (c, cc), xp, real)
            ct_full = _ctf_plane(optics, ctf.take(sel), apply_ctf, xp, real)
            ct = window_2d(ct_full, c)
            prior = offset_log_prior(centre, shifts, angpix=apix, sigma_offset_A=sigma_offset_A, xp=xp)[:, :, None]
            prior_tr = prior if prior_r is None else prior + prior_r[None, None, :]
            if schedule.local:
                found = _local_batch(new_eulers[at], vft, x, xm, ct, noise_w, pix, sampling, prior, sigma_local,
                                     data, weight, inv_d, centre, opts=opts, grid=grid, box_size=n, angpix=apix)
            elif ov == 0:
                e = expectation(proj_c, xm_c, ct, noise_w, shifts, pix, box_size=n, log_prior=prior_tr,
                                adaptive_fraction=opts.adaptive_fraction)
                found = (all_eulers[e.best_orientation], shifts[e.best_shift], e.pmax, e.n_significant,
                         [accumulate(data, weight, x, ct, inv_d, e.posterior, all_eulers, shifts, box_size=n,
                                     pad=opts.pad, r_padded=grid.r_padded, projections=proj, angpix=apix,
                                     old_offsets_px=centre, noise_images=xm)],
                         to_numpy(e.posterior.sum(axis=(0, 1))))
            else:
                ct_c = ct if cc == c else window_2d(ct_full, cc)
                e = expectation(proj_c, xm_c, ct_c, noise_c if cc < c else noise_w, shifts, pix_c if cc < c else pix,
                                box_size=n, log_prior=prior_tr, adaptive_fraction=opts.adaptive_fraction)
                found = fine_pass_batch(vft, x, ct, noise_w, pix, sampling, e.posterior, prior[:, :, 0], data, weight,
                                        inv_d, box_size=n, pad=opts.pad, r_padded=grid.r_padded,
                                        adaptive_fraction=opts.adaptive_fraction, ov=ov, angpix=apix,
                                        masked_images=xm, centres_px=centre,
                                        log_prior_r=None if prior_r is None else xp.broadcast_to(
                                            prior_r, (len(sel), len(prior_r))))
            new_eulers[at], new_shifts[at], pmax[at], n_sig[at] = found[:4]
            new_shifts[at] += centre
            noise.extend(found[4])
            orientation_mass += found[5]
    noise = sum_noise(noise)
    noise["direction_mass"] = orientation_mass.reshape(-1, len(sampling.psi)).sum(axis=1)
    return ParticleExpectation(data, weight, new_eulers, new_shifts, pmax, n_sig, noise, c, cc)


def _ctf_plane(optics: Optics, ctf: CtfParams, apply_ctf: bool, xp, real):
    if apply_ctf:
        return ctf_2d(optics, ctf, xp=xp, dtype=real)
    n = optics.box_size
    return xp.ones((len(ctf.defocus_u), n, n // 2 + 1), dtype=real)


def accuracy(volume, ctf: CtfParams, optics: Optics, eulers, sigma2, *, r_max: int, opts: RefineOptions,
             device: Device = Device(), seed: int = 0, apply_ctf: bool = True) -> tuple[float, float]:
    """Spec 5.4: (acc_rot in degrees, acc_trans in pixels) of particles with CTFs `ctf` (RELION: the
    first 100 of half 1) at poses `eulers` against `volume` (half 1's map), on the window of r_max,
    with the noise spectrum `sigma2`; `seed` picks the axis moved per particle."""
    xp = device.xp
    real = np.float64 if device.gpu is None else np.float32
    n = optics.box_size
    c = min(n, 2 * r_max)
    pix = HalfPlanePixels.of(c)
    grid = PaddedGrid(n, opts.pad, r_max)
    with device.use():
        vft = volume_to_ftc(xp.asarray(volume, dtype=real), pad=opts.pad, r_max=r_max)
        ct = window_2d(_ctf_plane(optics, ctf, apply_ctf, xp, real), c)
        noise_w = xp.asarray(inverse_sigma2_plane(sigma2, c).ravel()[pix.index], dtype=real)
        return accuracy_estimates(vft, np.asarray(eulers), ct, noise_w, pix, box_size=n, pad=opts.pad,
                                  r_padded=grid.r_padded, rng=np.random.default_rng(seed))


__all__ = ["RefineOptions", "RefineState", "initial_sigma2", "low_pass", "refine", "window_2d"]
