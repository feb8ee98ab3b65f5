"""A gold-standard refinement loop on particle images in memory (a first, reduced auto-refine).

Per iteration and half set: the projector of the half's map at the current r_max, the one-pass
E-step over the whole (symmetry-free) HEALPix grid of a fixed order and a disc of trial shifts
around the box centre, the posterior-weighted back-projection with 1/sigma2 weights, and the
noise and offset updates; then the halves' FSC from their sums, tau2 from that FSC, and each
half's MAP reconstruction (`reconstruct_map`, no gridding, RELION's refine default). The next
r_max is RELION's: the last shell with FSC >= 0.5 plus `incr_size`.

With `oversampling` 1 (the default) each particle's significant coarse points are refined on the
2x finer grid (RELION's second pass), evaluated here on the same image size as the first pass.

Sampling schedule (reduced 5.5): after an iteration without resolution gain the HEALPix order goes
up by one, to `max_order`; from `auto_local_order` on, each particle is searched within 3 sigma of
its last pose (sigma = 2 fine steps). `final=True` runs RELION's last iteration on all data.

The first pass of a global search runs on RELION's coarse image size (`coarse_size`), the second on
the current size.

What this loop does not do yet (spec `relion-refinement.md`): the random perturbation, the offset-range update and the pose-change and accuracy
conditions of the schedule, convergence (5.4, 5.6, 5.7), masked images, solvent flattening, norm
and scale corrections, re-centring on the previous offsets and symmetry. `omlrelion refine`
(`cli/refine.py`) writes RELION's file names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from omlrelion.backend import Device, get_xp, to_numpy
from omlrelion.ctf.ctf import CtfParams, ctf_2d
from omlrelion.ctf.optics import Optics
from omlrelion.fourier.layout import rfft2_centred
from omlrelion.fourier.projector import extract_slices, volume_to_ftc
from omlrelion.fourier.symmetrise import hermitian_repair
from omlrelion.geometry.euler import euler_to_matrix
from omlrelion.geometry.grids import PaddedGrid, signed_freqs
from omlrelion.reconstruct.fsc import (
    MINRES_MAP,
    fsc_from_sums,
    resolution_shell,
    tau2_from_fsc,
)
from omlrelion.reconstruct.gridding import reconstruct_map
from omlrelion.refine.expectation import HalfPlanePixels, expectation, fine_pass, offset_log_prior
from omlrelion.refine.maximization import (
    accumulate,
    inverse_sigma2_plane,
    shell_index,
    update_sigma2,
    update_sigma_offset,
)
from omlrelion.refine.sampling import Sampling, angular_step, local_orientations
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
    batch: int = 64
    oversampling: int = 1            # RELION's default: a second pass on the 2x finer grid (0: one pass)
    schedule: bool = True            # finer HEALPix order after an iteration without resolution gain
    max_order: int = 5               # ... up to this order
    auto_local_order: int = 4        # from this order on, local searches around each particle's pose
    particle_diameter_A: float | None = None   # sets the first pass's coarse image size; None: (N - 5) apix


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
    order: int | None = None            # the HEALPix order of the next iteration
    local: bool = False                 # local searches (sigma = 2 fine steps) instead of global
    iter_wo_gain: int = 0               # iterations since the resolution last improved
    last_sums: list = None              # the last iteration's (data, weight) per half, and its grid
    last_grid: PaddedGrid = None


def window_2d(a_ft, c: int):
    """(..., N, N//2+1) corner-layout transforms -> the frequencies of a side-c window."""
    n = a_ft.shape[-2]
    k = signed_freqs(c, np)
    rows = np.where(k < 0, k + n, k)
    return a_ft[..., rows, :c // 2 + 1]


def initial_sigma2(images_ft) -> np.ndarray:
    """Per-shell noise power (spec 5.9): mean |F|^2 / 2 - |mean F|^2 / 2 (negative values: previous shell)."""
    n = images_ft.shape[-2]
    shells = shell_index(n).ravel()
    n_shells = n // 2 + 1
    keep = shells < n_shells
    power = np.mean(np.abs(images_ft) ** 2, axis=0).ravel()
    mean_power = np.abs(images_ft.mean(axis=0)).ravel() ** 2
    count = np.bincount(shells[keep], minlength=n_shells)
    s = (np.bincount(shells[keep], weights=power[keep], minlength=n_shells)
         - np.bincount(shells[keep], weights=mean_power[keep], minlength=n_shells)) / (2 * np.maximum(count, 1))
    for r in range(len(s)):
        if s[r] <= 0:
            s[r] = s[r - 1] if r > 0 else s[s > 0].min()
    return s


def low_pass(volume, *, angpix: float, resolution_A: float) -> np.ndarray:
    """Zero the map's Fourier components beyond `resolution_A` (sharp cut, as RELION's ini_high)."""
    n = volume.shape[0]
    f = np.fft.rfftn(volume)
    k = np.fft.fftfreq(n) * n
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + np.arange(n // 2 + 1)[None, None, :] ** 2)
    f[r > n * angpix / resolution_A] = 0
    return np.fft.irfftn(f, s=volume.shape, axes=(0, 1, 2))


def fine_pass_batch(vft, images, ctf, noise_weight, pixels, sampling, coarse_posterior, log_prior_t, data, weight,
                    inv_sigma2, *, box_size: int, pad: float, r_padded: int, adaptive_fraction: float = 0.999,
                    ov: int = 1, noise_sums: bool = True, angpix: float = 1.0):
    """RELION's second pass for every particle of a batch, each back-projected into (data, weight).

    images, ctf: (B, c, c//2+1) on the current window; coarse_posterior (B, T, R) of the first pass on
    `sampling`'s grid; log_prior_t (B, T) host array. With `noise_sums`, the M-step's noise sums are
    made too. Returns (eulers (B, 3), shifts (B, 2), pmax (B,), n_significant (B,), list of sums).
    """
    b = len(images)
    eulers, shifts = np.zeros((b, 3)), np.zeros((b, 2))
    pmax, n_sig, sums = np.zeros(b), np.zeros(b, dtype=np.int64), []
    for j in range(b):
        f = fine_pass(vft, images[j], ctf[j], noise_weight, pixels, sampling, coarse_posterior[j], sampling.shifts,
                      box_size=box_size, pad=pad, r_padded=r_padded, log_prior_t=log_prior_t[j],
                      adaptive_fraction=adaptive_fraction, ov=ov)
        eulers[j], shifts[j], pmax[j], n_sig[j] = f.best_euler, f.best_shift, f.pmax, f.n_significant
        sums.append(accumulate(data, weight, images[j:j + 1], ctf[j:j + 1], inv_sigma2, f.posterior[None], f.eulers,
                               f.shifts_px, box_size=box_size, pad=pad, r_padded=r_padded,
                               projections=f.projections if noise_sums else None, angpix=angpix))
    return eulers, shifts, pmax, n_sig, sums


def coarse_size(box_size: int, angpix: float, current_size: int, order: int, particle_diameter_A: float) -> int:
    """RELION's image size of the first (coarse) pass: 2 ceil(N apix / d_c), d_c = (step / 360) pi D / 1.2
    with the coarse angular step of the order, at most the current size (spec 3.7)."""
    d_c = angular_step(order) / 360.0 * np.pi * particle_diameter_A / 1.2
    return int(min(current_size, 2 * int(np.ceil(box_size * angpix / d_c))))


def _local_particle(state: RefineState, i: int, vft, image, ctf, noise_w, pix, sampling, log_prior_t,
                    sigma_deg: float, *, opts: RefineOptions, grid: PaddedGrid, box_size: int):
    """One particle's local search (spec 3.5, 3.10): the orientations within 3 sigma of its last best
    pose with their Gaussian prior, then the second pass on them. Updates the particle's pose in
    `state`; returns (posterior (T, R), eulers (R, 3), shifts (T, 2), projections) for the M-step."""
    xp = get_xp(image)
    index, log_prior_r = local_orientations(sampling, state.eulers[i], sigma_deg)
    eulers = sampling.eulers()[index]
    n = image.shape[-2]
    proj = extract_slices(vft, xp.asarray(euler_to_matrix(eulers)), box_size=n, pad=opts.pad, r_padded=grid.r_padded)
    prior = log_prior_t[None, :, None] + log_prior_r[None, None, :]
    e = expectation(proj, image[None], ctf[None], noise_w, sampling.shifts, pix, box_size=box_size,
                    log_prior=prior, adaptive_fraction=opts.adaptive_fraction)
    if opts.oversampling <= 0:
        state.eulers[i], state.shifts_px[i] = eulers[e.best_orientation[0]], sampling.shifts[e.best_shift[0]]
        state.pmax[i], state.n_significant[i] = e.pmax[0], e.n_significant[0]
        return e.posterior[0], eulers, sampling.shifts, proj
    f = fine_pass(vft, image, ctf, noise_w, pix, sampling, e.posterior[0], sampling.shifts, box_size=box_size,
                  pad=opts.pad, r_padded=grid.r_padded, log_prior_t=log_prior_t,
                  adaptive_fraction=opts.adaptive_fraction, ov=opts.oversampling, orientation_index=index)
    state.eulers[i], state.shifts_px[i] = f.best_euler, f.best_shift
    state.pmax[i], state.n_significant[i] = f.pmax, f.n_significant
    return f.posterior, f.eulers, f.shifts_px, f.projections


def refine(images, ctf: CtfParams, optics: Optics, halves, initial_map, opts: RefineOptions, *,
           device: Device = Device(), state: RefineState | None = None, final: bool = False,
           on_iteration=None) -> RefineState:
    """Run `opts.n_iter` iterations on images (M, N, N) with half sets `halves` (M,) in {1, 2}.

    final: RELION's last iteration, on all the data up to Nyquist (current size N; the caller joins
    the halves' sums, `state.last_sums`, for the final map). on_iteration: called with the state after
    every iteration (e.g. to write its files).
    """
    images = np.asarray(images)
    m, n = images.shape[0], images.shape[-1]
    halves = np.asarray(halves)
    xp = device.xp
    real = np.float64 if device.gpu is None else np.float32
    cplx = np.result_type(real, np.complex64)
    images_ft = rfft2_centred(images.astype(np.float64))
    ctf_full = ctf_2d(optics, ctf, dtype=np.float64)
    if state is None:
        start = low_pass(np.asarray(initial_map, dtype=np.float64), angpix=optics.angpix,
                         resolution_A=opts.ini_high_A)
        sigma2 = [initial_sigma2(images_ft[halves == h]) for h in (1, 2)]
        state = RefineState(maps=[start, start.copy()], sigma2=sigma2,
                            sigma_offset_A=[opts.sigma_offset_A] * 2,
                            r_star=relion_round(n * optics.angpix / opts.ini_high_A),
                            eulers=np.zeros((m, 3)), shifts_px=np.zeros((m, 2)), pmax=np.zeros(m),
                            n_significant=np.zeros(m, dtype=np.int64))
    if state.order is None:
        state.order = opts.healpix_order
        state.local = opts.healpix_order >= opts.auto_local_order
    for _ in range(opts.n_iter):
        if opts.schedule and not final and state.history and state.iter_wo_gain >= 1 and state.order < opts.max_order:
            state.order, state.iter_wo_gain = state.order + 1, 0
            state.local = state.order >= opts.auto_local_order
        sampling = Sampling(state.order, opts.offset_range_px, opts.offset_step_px)
        eulers, shifts = sampling.eulers(), sampling.shifts
        sigma_local = 2 * angular_step(state.order + max(opts.oversampling, 0))
        rotations = None if state.local else euler_to_matrix(eulers)
        r_max = n // 2 if final else min(n // 2, state.r_star + opts.incr_size)
        c = min(n, 2 * r_max)
        grid = PaddedGrid(n, opts.pad, r_max)
        pix = HalfPlanePixels.of(c)
        sums, stats = [], []
        for h in (1, 2):
            idx = np.flatnonzero(halves == h)
            sig = state.sigma2[h - 1]
            inv = inverse_sigma2_plane(sig, c)
            with device.use():
                vft = xp.asarray(volume_to_ftc(state.maps[h - 1], pad=opts.pad, r_max=r_max).astype(cplx))
                cc = c if state.local or opts.oversampling <= 0 else coarse_size(
                    n, optics.angpix, c, state.order, opts.particle_diameter_A or (n - 5) * optics.angpix)
                proj_c = proj = None
                if not state.local:
                    proj_c = extract_slices(vft, xp.asarray(rotations), box_size=cc, pad=opts.pad,
                                            r_padded=grid.r_padded)
                    if cc == c or opts.oversampling <= 0:
                        proj = proj_c
                pix_c = HalfPlanePixels.of(cc)
                noise_c = xp.asarray(inverse_sigma2_plane(sig, cc).ravel()[pix_c.index], dtype=real)
                data = xp.zeros(grid.shape, dtype=cplx)
                weight = xp.zeros(grid.shape, dtype=real)
                noise_w = xp.asarray(inv.ravel()[pix.index], dtype=real)
                inv_d = xp.asarray(inv, dtype=real)
                batch_stats = []
                for start_i in range(0, len(idx), opts.batch):
                    sel = idx[start_i:start_i + opts.batch]
                    x = xp.asarray(window_2d(images_ft[sel], c).astype(cplx))
                    ct = xp.asarray(window_2d(ctf_full[sel], c).astype(real))
                    prior = offset_log_prior(np.zeros((len(sel), 2)), shifts, angpix=optics.angpix,
                                             sigma_offset_A=state.sigma_offset_A[h - 1], xp=xp)[:, :, None]
                    if state.local:
                        for j, i in enumerate(sel):
                            post, eul, sh, pr = _local_particle(state, i, vft, x[j], ct[j], noise_w, pix, sampling,
                                                                to_numpy(prior[j, :, 0]), sigma_local, opts=opts,
                                                                grid=grid, box_size=n)
                            batch_stats.append(accumulate(data, weight, x[j:j + 1], ct[j:j + 1], inv_d, post[None],
                                                          eul, sh, box_size=n, pad=opts.pad, r_padded=grid.r_padded,
                                                          projections=pr, angpix=optics.angpix))
                        continue
                    if cc < c:          # the first pass on the coarse image size (spec 3.7)
                        e = expectation(proj_c, xp.asarray(window_2d(images_ft[sel], cc).astype(cplx)),
                                        xp.asarray(window_2d(ctf_full[sel], cc).astype(real)), noise_c, shifts, pix_c,
                                        box_size=n, log_prior=prior, adaptive_fraction=opts.adaptive_fraction)
                    else:
                        e = expectation(proj, x, ct, noise_w, shifts, pix, box_size=n, log_prior=prior,
                                        adaptive_fraction=opts.adaptive_fraction)
                    if opts.oversampling <= 0:
                        state.eulers[sel] = eulers[e.best_orientation]
                        state.shifts_px[sel] = shifts[e.best_shift]
                        state.pmax[sel] = e.pmax
                        state.n_significant[sel] = e.n_significant
                        batch_stats.append(accumulate(data, weight, x, ct, inv_d, e.posterior, eulers, shifts,
                                                      box_size=n, pad=opts.pad, r_padded=grid.r_padded,
                                                      projections=proj, angpix=optics.angpix))
                        continue
                    found = fine_pass_batch(vft, x, ct, noise_w, pix, sampling, e.posterior, to_numpy(prior[:, :, 0]),
                                            data, weight, inv_d, box_size=n, pad=opts.pad, r_padded=grid.r_padded,
                                            adaptive_fraction=opts.adaptive_fraction, ov=opts.oversampling,
                                            angpix=optics.angpix)
                    state.eulers[sel], state.shifts_px[sel], state.pmax[sel], state.n_significant[sel] = found[:4]
                    batch_stats.extend(found[4])
                hermitian_repair(data, weight)
                sums.append((to_numpy(data).astype(np.complex128), to_numpy(weight).astype(np.float64)))
            stats.append(batch_stats)
        curve = fsc_from_sums(sums[0][0], sums[0][1], sums[1][0], sums[1][1], grid=grid)
        spectra = []
        for h in (1, 2):
            data, weight = sums[h - 1]
            tau2, sigma2_ref, ssnr = tau2_from_fsc(weight, curve, grid=grid, whole_data=False)
            spectra.append({"tau2": tau2.tolist(), "sigma2_ref": sigma2_ref.tolist(), "ssnr": ssnr.tolist()})
            state.maps[h - 1] = reconstruct_map(data, weight, box_size=n, pad=opts.pad, r_max=r_max,
                                                skip_gridding=True, tau2=tau2, minres_map=MINRES_MAP)
            state.sigma2[h - 1] = update_sigma2(state.sigma2[h - 1], stats[h - 1])
            state.sigma_offset_A[h - 1] = update_sigma_offset(stats[h - 1])
        r_new = resolution_shell(curve)
        state.iter_wo_gain = state.iter_wo_gain + 1 if r_new <= state.r_star else 0
        state.r_star = r_new
        state.last_sums, state.last_grid = sums, grid
        state.history.append({"r_max": r_max, "current_size": c, "fsc": curve.tolist(), "r_star": state.r_star,
                              "resolution_A": n * optics.angpix / state.r_star, "ave_pmax": float(state.pmax.mean()),
                              "halves": spectra, "healpix_order": state.order, "local": state.local,
                              "coarse_size": cc})
        log.info("refine iteration %d: r_max %d, resolution %.2f A, <Pmax> %.3f", len(state.history), r_max,
                 n * optics.angpix / state.r_star, state.pmax.mean())
        if on_iteration is not None:
            on_iteration(state)
    return state


__all__ = ["RefineOptions", "RefineState", "initial_sigma2", "low_pass", "refine", "window_2d"]
