"""The expectation step on a batch of particles (spec `relion-refinement.md`, 3.4-3.8), one pass.

For particles b, orientations r and trial shifts t (RELION's half-transform pixels k of the current
window, noise weights w(k) = 1/sigma2(shell), zero at DC and on the redundant kx = 0, ky < 0 half):

    D2[b, t, r] = sum_k w/2 |CTF_b P_r - X_b phi_t|^2
                = A[b, r] + B[b] - Re( M[b, t, :] @ P[r, :] )

with A = (w CTF^2 / 2) @ |P|^2, B = sum_k w |X|^2 / 2, M = w CTF conj(X phi_t) and
phi_t(k) = exp(-2 pi i k.t / N): two matrix products (projections x particle-shifts), the form
that runs at the GPU's GEMM rate. Then the offset prior, the weights exp(-(D2 - min) + log prior),
the significant set (sorted weights up to `adaptive_fraction` of their sum: RELION's threshold),
and per particle the best hidden point, its posterior Pmax and the number of significant
samples. Arrays are NumPy or CuPy alike (one code path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from omlrelion.backend import get_xp, to_numpy
from omlrelion.geometry.grids import rfft_freqs, signed_freqs


EVALUATIONS = [0]     # (particle, orientation, shift) squared differences computed so far (benchmarks read it)


@dataclass(frozen=True)
class HalfPlanePixels:
    """The pixels of a side-n half transform (corner layout) that enter the likelihood.

    index : flat positions into (n, n//2+1); kx, ky : their frequencies; shell : round(|k|).
    Kept: 0 < |k| < n/2 + 1, not (kx = 0 and ky < 0). DC is dropped here (RELION gives it w = 0).
    """

    n: int
    index: np.ndarray
    kx: np.ndarray
    ky: np.ndarray
    shell: np.ndarray

    @classmethod
    def of(cls, n: int) -> HalfPlanePixels:
        ky = signed_freqs(n, np).astype(np.int64)[:, None] * np.ones((1, n // 2 + 1), np.int64)
        kx = rfft_freqs(n, np).astype(np.int64)[None, :] * np.ones((n, 1), np.int64)
        r = np.sqrt(kx**2 + ky**2)
        keep = (r > 0) & (r < n / 2 + 1) & ~((kx == 0) & (ky < 0))
        return cls(n, np.flatnonzero(keep), kx[keep], ky[keep], np.rint(r[keep]).astype(np.int64))


def squared_differences(projections, images, ctf, noise_weight, shifts_px, pixels: HalfPlanePixels, *,
                        box_size: int):
    """D2[b, t, r] for images (B, n, n//2+1), projections (R, n, n//2+1), ctf (B, n, n//2+1) real,
    noise_weight (K,) = 1/sigma2 on `pixels`, shifts_px (T, 2) x, y in pixels of the box N."""
    xp = get_xp(images)
    idx = xp.asarray(pixels.index)
    real = images.real.dtype
    p = projections.reshape(len(projections), -1)[:, idx]                   # (R, K)
    x = images.reshape(len(images), -1)[:, idx]                             # (B, K)
    c = ctf.reshape(len(ctf), -1)[:, idx].astype(real)                      # (B, K)
    w = xp.asarray(noise_weight, dtype=real)
    a = (0.5 * w * c * c) @ (p.real**2 + p.imag**2).T                       # (B, R)
    b = (0.5 * w * (x.real**2 + x.imag**2)).sum(axis=1)                     # (B,)
    kx, ky = xp.asarray(pixels.kx, dtype=real), xp.asarray(pixels.ky, dtype=real)
    t = xp.asarray(shifts_px, dtype=real)
    arg = (2 * math.pi / box_size) * (t[:, 0, None] * kx[None] + t[:, 1, None] * ky[None])   # (T, K)
    conj_phi = (xp.cos(arg) + 1j * xp.sin(arg)).astype(images.dtype)      # conj(exp(-i arg))
    m = (w * c * xp.conj(x))[:, None, :] * conj_phi[None]                  # (B, T, K)
    cross = (m.reshape(-1, m.shape[-1]) @ p.T).real.reshape(len(x), len(t), len(p))
    EVALUATIONS[0] += len(x) * len(t) * len(p)
    return a[:, None, :] + b[:, None, None] - cross


def offset_log_prior(old_offsets_px, shifts_px, *, angpix: float, sigma_offset_A: float, xp=np):
    """log pi_t[b, t] = -|o_b + t|^2 apix^2 / (2 sigma_offset^2) (prior centred on the box centre)."""
    o = xp.asarray(old_offsets_px, dtype=np.float64)[:, None, :] + xp.asarray(shifts_px, dtype=np.float64)[None]
    return -(o**2).sum(axis=-1) * angpix**2 / (2 * sigma_offset_A**2)


def significant_threshold(weights, fraction: float = 0.999):
    """Per row of `weights` (B, H), non-negative: the smallest weight among the largest ones summing
    past `fraction` of the row sum (RELION's adaptive significance threshold).

    Only weights >= (1 - fraction) sum / H can be significant (the H - k smaller ones of a row sum to
    less than 1 - fraction of it), so only those are sorted, packed into the first columns of a
    (B, K) array, K the largest count of a row; the result is the one a sort of whole rows gives."""
    xp = get_xp(weights)
    b, h = weights.shape
    total = weights.sum(axis=1)
    floor = (1.0 - fraction) * total / h
    cand = weights >= floor[:, None]
    count = cand.sum(axis=1)
    k_max = max(int(count.max()), 1)
    if k_max < h // 2:
        rows, cols = xp.nonzero(cand)
        slot = (xp.cumsum(cand, axis=1) - 1)[rows, cols]
        packed = xp.zeros((b, k_max), dtype=weights.dtype)
        packed[rows, slot] = weights[rows, cols]
    else:
        packed = weights
    s = -xp.sort(-packed, axis=1)
    csum = xp.cumsum(s, axis=1)
    k = (csum < fraction * total[:, None]).sum(axis=1)                      # first position past the fraction
    k = xp.minimum(k, xp.maximum(count, 1) - 1) if packed is not weights else xp.minimum(k, h - 1)
    return xp.take_along_axis(s, k[:, None], axis=1)[:, 0]


@dataclass
class EStepResult:
    """Per particle: best orientation and shift indices, Pmax, significant samples, posteriors."""

    best_orientation: np.ndarray
    best_shift: np.ndarray
    pmax: np.ndarray
    n_significant: np.ndarray
    posterior: object                # (B, T, R) on the arrays' device, zero below the threshold


def expectation(projections, images, ctf, noise_weight, shifts_px, pixels: HalfPlanePixels, *, box_size: int,
                log_prior=None, adaptive_fraction: float = 0.999) -> EStepResult:
    """One pass of the E-step for a batch: D2, weights with the prior, significance, best point.

    log_prior : optional (B, T, R) or broadcastable (e.g. `offset_log_prior(...)[:, :, None]`).
    """
    xp = get_xp(images)
    d2 = squared_differences(projections, images, ctf, noise_weight, shifts_px, pixels, box_size=box_size)
    bsz, nt, nr = d2.shape
    logw = -(d2 - d2.reshape(bsz, -1).min(axis=1)[:, None, None])
    if log_prior is not None:
        logw = logw + xp.asarray(log_prior, dtype=logw.dtype)
    logw -= logw.reshape(bsz, -1).max(axis=1)[:, None, None]
    w = xp.where(logw > -88.0 if logw.dtype == np.float32 else logw > -700.0, xp.exp(logw), 0.0)
    flat = w.reshape(bsz, -1)
    total = flat.sum(axis=1)
    if not bool(xp.all(xp.isfinite(total) & (total > 0))):
        raise FloatingPointError("E-step: a particle's weights sum to zero or are not finite")
    theta = significant_threshold(flat, adaptive_fraction)
    keep = flat >= theta[:, None]
    post = xp.where(keep, flat / total[:, None], 0.0).reshape(bsz, nt, nr)
    best = xp.argmax(flat, axis=1)
    return EStepResult(best_orientation=to_numpy(best % nr), best_shift=to_numpy(best // nr),
                       pmax=to_numpy(flat.max(axis=1) / total), n_significant=to_numpy(keep.sum(axis=1)),
                       posterior=post)


@dataclass
class FinePass:
    """A batch's second (oversampled) pass: the fine orientations and shifts of the batch (the union of
    its particles' children) and, per particle, its posterior over them and its best point."""

    eulers: np.ndarray               # (Rf, 3)
    shifts_px: np.ndarray            # (Tf, 2)
    posterior: object                # (B, Tf, Rf), zero below each threshold and off each particle's pairs
    projections: object              # (Rf, n, n//2+1)
    best_euler: np.ndarray           # (B, 3)
    best_shift: np.ndarray           # (B, 2)
    pmax: np.ndarray                 # (B,)
    n_significant: np.ndarray        # (B,)


def fine_pass(volume_ftc, images, ctf, noise_weight, pixels: HalfPlanePixels, sampling, coarse_posterior,
              shifts_px, *, box_size: int, pad: float, r_padded: int, log_prior_t=None, log_prior_r=None,
              adaptive_fraction: float = 0.999, ov: int = 1, orientation_index=None) -> FinePass:
    """RELION's pass 2 for a batch (spec 3.7): every coarse orientation with a significant (orientation,
    shift) pair gives its 4^ov 2^ov fine orientations, and each significant coarse shift of it its 4^ov
    fine shifts; a particle's D2 counts on its own pairs only. The batch shares one set of projections
    (the union of its particles' children) and one matrix product.

    images, ctf : (B, n, n//2+1); coarse_posterior : (B, T, R) of the first pass; log_prior_t (B, T)
    and log_prior_r (B, R): the coarse shifts' and orientations' log priors, inherited by their
    children. orientation_index: the `sampling.eulers()` index of each coarse column (a local
    search's subset; default: all, in order)."""
    from omlrelion.fourier.projector import extract_slices
    from omlrelion.geometry.euler import euler_to_matrix
    from omlrelion.refine.sampling import oversampled_orientations, oversampled_shifts

    xp = get_xp(images)
    sig = coarse_posterior > 0                                               # (B, T, R)
    t_used = np.flatnonzero(to_numpy(sig.any(axis=(0, 2))))
    r_used = np.flatnonzero(to_numpy(sig.any(axis=(0, 1))))
    r_index = r_used if orientation_index is None else np.asarray(orientation_index)[r_used]
    fine_r = oversampled_orientations(sampling, r_index, ov)                 # (nr, k_r, 3)
    fine_t = oversampled_shifts(np.asarray(shifts_px)[t_used], sampling.offset_step_px, ov)   # (nt, k_t, 2)
    k_r, k_t = fine_r.shape[1], fine_t.shape[1]
    eulers, shifts = fine_r.reshape(-1, 3), fine_t.reshape(-1, 2)
    t_d, r_d = xp.asarray(np.repeat(t_used, k_t)), xp.asarray(np.repeat(r_used, k_r))
    allowed = sig[:, t_d][:, :, r_d]                                         # (B, Tf, Rf)
    n = images.shape[-2]
    proj = extract_slices(volume_ftc, xp.asarray(euler_to_matrix(eulers)), box_size=n, pad=pad, r_padded=r_padded)
    logw = -squared_differences(proj, images, ctf, noise_weight, shifts, pixels, box_size=box_size)
    if log_prior_t is not None:
        logw = logw + xp.asarray(log_prior_t, dtype=logw.dtype)[:, t_d][:, :, None]
    if log_prior_r is not None:
        logw = logw + xp.asarray(log_prior_r, dtype=logw.dtype)[:, r_d][:, None, :]
    logw = xp.where(allowed, logw, -xp.inf)
    b = len(images)
    flat = logw.reshape(b, -1)
    flat = flat - flat.max(axis=1)[:, None]
    limit = -88.0 if flat.dtype == np.float32 else -700.0
    w = xp.where(flat > limit, xp.exp(flat), 0.0)
    total = w.sum(axis=1)
    if not bool(xp.all(xp.isfinite(total) & (total > 0))):
        raise FloatingPointError("E-step: a particle's fine-pass weights sum to zero or are not finite")
    theta = significant_threshold(w, adaptive_fraction)
    keep = (w >= theta[:, None]) & (w > 0)
    post = xp.where(keep, w / total[:, None], 0.0).reshape(logw.shape)
    best = to_numpy(xp.argmax(w, axis=1))
    bt, br = np.divmod(best, len(eulers))
    return FinePass(eulers, shifts, post, proj, eulers[br], shifts[bt], to_numpy(w.max(axis=1) / total),
                    to_numpy(keep.sum(axis=1)))


def fine_pass_parts(volume_ftc, images, ctf, noise_weight, pixels, sampling, coarse_posterior, shifts_px, *,
                    max_elements: int = 2**25, log_prior_t=None, log_prior_r=None, **kwargs):
    """`fine_pass` on a batch split into parts whose (B, Tf, Rf) posterior stays within `max_elements`:
    yields (rows of the batch, FinePass of those rows)."""
    xp = get_xp(images)
    b = len(images)
    log_prior_t = None if log_prior_t is None else xp.asarray(log_prior_t)
    log_prior_r = None if log_prior_r is None else xp.asarray(log_prior_r)
    sig = coarse_posterior > 0
    ov = kwargs.get("ov", 1)
    size = b * int(sig.any(axis=(0, 2)).sum()) * int(sig.any(axis=(0, 1)).sum()) * 2 ** (5 * ov)
    if size > max_elements and b > 1:
        for rows in (np.arange(b // 2), np.arange(b // 2, b)):
            for sub, part in fine_pass_parts(
                    volume_ftc, images[rows], ctf[rows], noise_weight, pixels, sampling, coarse_posterior[rows],
                    shifts_px, max_elements=max_elements,
                    log_prior_t=None if log_prior_t is None else log_prior_t[xp.asarray(rows)],
                    log_prior_r=None if log_prior_r is None else log_prior_r[xp.asarray(rows)], **kwargs):
                yield rows[sub], part
        return
    yield np.arange(b), fine_pass(volume_ftc, images, ctf, noise_weight, pixels, sampling, coarse_posterior,
                                  shifts_px, log_prior_t=log_prior_t, log_prior_r=log_prior_r, **kwargs)


__all__ = ["EStepResult", "FinePass", "fine_pass", "fine_pass_parts", "HalfPlanePixels", "expectation", "offset_log_prior", "significant_threshold",
           "squared_differences"]
