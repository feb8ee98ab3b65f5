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
    """Part of a batch's second (oversampled) pass, each particle on its own points.

    The part shares one list of fine orientations (`eulers`, `projections`: the children of its
    particles' significant coarse orientations) and one of fine shifts (`shifts_px`). Particle b's
    points are the slots `t_index[b]` x `r_index[b]` into those lists (the children of its own
    significant coarse shifts and orientations; padded slots hold the list's length and no
    posterior), and `posterior[b]` is over them: zero below its threshold and off its own
    significant pairs."""

    eulers: np.ndarray               # (Rf, 3)
    shifts_px: np.ndarray            # (Tf, 2)
    posterior: object                # (B, Tb, Rb) on the slots, zero below each threshold and off each particle's pairs
    t_index: object                  # (B, Tb) int: each slot's row of shifts_px (Tf: padding)
    r_index: object                  # (B, Rb) int: each slot's row of eulers / projections (Rf: padding)
    projections: object              # (Rf, n, n//2+1)
    parents: np.ndarray              # (Rf,) the sampling's coarse orientation of each fine one
    best_euler: np.ndarray           # (B, 3)
    best_shift: np.ndarray           # (B, 2)
    pmax: np.ndarray                 # (B,)
    n_significant: np.ndarray        # (B,)

    def orientation_mass(self, n_orientations: int) -> np.ndarray:
        """(n_orientations,) the posterior mass of the part's particles on each coarse orientation of
        the sampling (its fine children's mass added up)."""
        xp = get_xp(self.posterior)
        mass = self.posterior.sum(axis=1)                                  # (B, Rb)
        ok = self.r_index < len(self.eulers)
        parent = xp.asarray(self.parents)[xp.where(ok, self.r_index, 0)]
        return to_numpy(xp.bincount(parent[ok], weights=mass[ok].astype(xp.float64), minlength=n_orientations))

    def points(self, b: int) -> dict:
        """Particle b's posterior mass as {((x, y) shift, (rot, tilt, psi)): value} (rounded to 1e-6)."""
        post, ti, ri = (to_numpy(a[b]) for a in (self.posterior, self.t_index, self.r_index))
        return {(tuple(np.round(self.shifts_px[ti[i]], 6)), tuple(np.round(self.eulers[ri[j]], 6))): post[i, j]
                for i, j in zip(*np.nonzero(post))}


def _own_slots(mask, xp):
    """(B, H) bool -> (B, K) the True columns of each row in ascending order, padded with H; K the
    largest count of a row (at least 1)."""
    b, h = mask.shape
    k = max(int(mask.sum(axis=1).max()) if b else 0, 1)
    col = xp.arange(h, dtype=xp.int64)[None, :]
    return xp.sort(xp.where(mask, col, h + col), axis=1)[:, :k]


@dataclass
class _FineLists:
    """A batch's fine points: the children of the coarse shifts and orientations significant for any
    of its particles, their projections and phase factors on the likelihood's pixels."""

    eulers: np.ndarray               # (Rf, 3)
    shifts: np.ndarray               # (Tf, 2)
    projections: object              # (Rf, n, n//2+1)
    p: object                        # (Rf, K) the projections on the pixels
    conj_phi: object                 # (Tf, K) exp(+2 pi i k.t / N)
    t_pos: object                    # (T,) a coarse shift's position in the used list (k_t children from k_t pos)
    r_pos: object                    # (R,) likewise for the coarse orientations
    k_t: int
    k_r: int
    parents: np.ndarray              # (Rf,) the coarse orientation (index into sampling.eulers()) of each


def _fine_lists(volume_ftc, sig, sampling, shifts_px, pixels: HalfPlanePixels, images, *, box_size: int, pad: float,
                r_padded: int, ov: int, orientation_index=None) -> _FineLists:
    from omlrelion.fourier.projector import extract_slices
    from omlrelion.geometry.euler import euler_to_matrix
    from omlrelion.refine.sampling import oversampled_orientations, oversampled_shifts

    xp = get_xp(images)
    _, n_t, n_r = sig.shape
    t_used = np.flatnonzero(to_numpy(sig.any(axis=(0, 2))))
    r_used = np.flatnonzero(to_numpy(sig.any(axis=(0, 1))))
    r_index = r_used if orientation_index is None else np.asarray(orientation_index)[r_used]
    fine_r = oversampled_orientations(sampling, r_index, ov)                 # (nr, k_r, 3)
    fine_t = oversampled_shifts(np.asarray(shifts_px)[t_used], sampling.offset_step_px, ov)   # (nt, k_t, 2)
    eulers, shifts = fine_r.reshape(-1, 3), fine_t.reshape(-1, 2)
    t_pos, r_pos = np.zeros(n_t, np.int64), np.zeros(n_r, np.int64)
    t_pos[t_used], r_pos[r_used] = np.arange(len(t_used)), np.arange(len(r_used))
    n = images.shape[-2]
    proj = extract_slices(volume_ftc, xp.asarray(euler_to_matrix(eulers)), box_size=n, pad=pad, r_padded=r_padded)
    real = images.real.dtype
    kx, ky = xp.asarray(pixels.kx, dtype=real), xp.asarray(pixels.ky, dtype=real)
    t = xp.asarray(shifts, dtype=real)
    arg = (2 * math.pi / box_size) * (t[:, 0, None] * kx[None] + t[:, 1, None] * ky[None])   # (Tf, K)
    return _FineLists(eulers, shifts, proj, proj.reshape(len(proj), -1)[:, xp.asarray(pixels.index)],
                      (xp.cos(arg) + 1j * xp.sin(arg)).astype(images.dtype), xp.asarray(t_pos), xp.asarray(r_pos),
                      fine_t.shape[1], fine_r.shape[1], np.repeat(r_index, fine_r.shape[1]))


def _own_points(lists: _FineLists, images, ctf, noise_weight, pixels: HalfPlanePixels, sig, *, log_prior_t=None,
                log_prior_r=None, adaptive_fraction: float = 0.999) -> FinePass:
    """Each particle of images (B, n, n//2+1) on its own fine points of `lists` (sig (B, T, R): its
    significant coarse pairs), one batched matrix product over the particles."""
    xp = get_xp(images)
    b, n_t, n_r = sig.shape
    k_t, k_r = lists.k_t, lists.k_r
    t_own, r_own = _own_slots(sig.any(axis=2), xp), _own_slots(sig.any(axis=1), xp)     # (B, Tc), (B, Rc)
    t_ok, r_ok = t_own < n_t, r_own < n_r
    t_own, r_own = xp.where(t_ok, t_own, 0), xp.where(r_ok, r_own, 0)
    # child q of the coarse point at position p of the used list is fine point p k + q
    t_slot = (lists.t_pos[t_own][:, :, None] * k_t + xp.arange(k_t)[None, None]).reshape(b, -1)   # (B, Tb)
    r_slot = (lists.r_pos[r_own][:, :, None] * k_r + xp.arange(k_r)[None, None]).reshape(b, -1)   # (B, Rb)
    allowed = sig[xp.arange(b)[:, None, None], t_own[:, :, None], r_own[:, None, :]]
    allowed &= t_ok[:, :, None] & r_ok[:, None, :]                           # (B, Tc, Rc)
    allowed = xp.broadcast_to(allowed[:, :, None, :, None], (b, allowed.shape[1], k_t, allowed.shape[2], k_r))
    allowed = allowed.reshape(b, t_slot.shape[1], r_slot.shape[1])

    idx = xp.asarray(pixels.index)
    real = images.real.dtype
    p = lists.p
    x = images.reshape(b, -1)[:, idx]                                        # (B, K)
    c = ctf.reshape(b, -1)[:, idx].astype(real)
    w = xp.asarray(noise_weight, dtype=real)
    a = xp.take_along_axis((0.5 * w * c * c) @ (p.real**2 + p.imag**2).T, r_slot, axis=1)   # (B, Rb)
    bx = (0.5 * w * (x.real**2 + x.imag**2)).sum(axis=1)                     # (B,)
    m = (w * c * xp.conj(x))[:, None, :] * lists.conj_phi[t_slot]           # (B, Tb, K)
    cross = xp.matmul(m, p[r_slot].transpose(0, 2, 1)).real                  # (B, Tb, Rb)
    del m
    EVALUATIONS[0] += int(cross.size)
    logw = cross - a[:, None, :] - bx[:, None, None]                        # -D2
    del cross
    if log_prior_t is not None:
        prior = xp.take_along_axis(xp.asarray(log_prior_t, dtype=logw.dtype), t_own, axis=1)
        logw += xp.repeat(prior, k_t, axis=1)[:, :, None]
    if log_prior_r is not None:
        prior = xp.take_along_axis(xp.asarray(log_prior_r, dtype=logw.dtype), r_own, axis=1)
        logw += xp.repeat(prior, k_r, axis=1)[:, None, :]
    logw = xp.where(allowed, logw, -xp.inf)
    flat = logw.reshape(b, -1)
    flat = flat - flat.max(axis=1)[:, None]
    limit = -88.0 if flat.dtype == np.float32 else -700.0
    wt = xp.where(flat > limit, xp.exp(flat), 0.0)
    total = wt.sum(axis=1)
    if not bool(xp.all(xp.isfinite(total) & (total > 0))):
        raise FloatingPointError("E-step: a particle's fine-pass weights sum to zero or are not finite")
    theta = significant_threshold(wt, adaptive_fraction)
    keep = (wt >= theta[:, None]) & (wt > 0)
    post = xp.where(keep, wt / total[:, None], 0.0).reshape(logw.shape)
    best = xp.argmax(wt, axis=1)
    rows = xp.arange(b)
    bt = to_numpy(t_slot[rows, best // r_slot.shape[1]])
    br = to_numpy(r_slot[rows, best % r_slot.shape[1]])
    t_index = xp.where(xp.repeat(t_ok, k_t, axis=1), t_slot, len(lists.shifts))
    r_index = xp.where(xp.repeat(r_ok, k_r, axis=1), r_slot, len(lists.eulers))
    return FinePass(lists.eulers, lists.shifts, post, t_index, r_index, lists.projections, lists.parents,
                    lists.eulers[br],
                    lists.shifts[bt], to_numpy(wt.max(axis=1) / total), to_numpy(keep.sum(axis=1)))


def fine_pass(volume_ftc, images, ctf, noise_weight, pixels: HalfPlanePixels, sampling, coarse_posterior,
              shifts_px, *, box_size: int, pad: float, r_padded: int, log_prior_t=None, log_prior_r=None,
              adaptive_fraction: float = 0.999, ov: int = 1, orientation_index=None) -> FinePass:
    """RELION's pass 2 (spec 3.7) for a batch: every coarse orientation with a significant (orientation,
    shift) pair of a particle gives its 4^ov 2^ov fine orientations, and each significant coarse shift
    of that pair its 4^ov fine shifts; each particle is evaluated on its own points only (the
    children of its significant coarse shifts x those of its significant coarse orientations), its
    D2 counting on its own significant pairs. One part: `fine_pass_parts` splits a batch.

    images, ctf : (B, n, n//2+1); coarse_posterior : (B, T, R) of the first pass; log_prior_t (B, T)
    and log_prior_r (B, R): the coarse shifts' and orientations' log priors, inherited by their
    children. orientation_index: the `sampling.eulers()` index of each coarse column (a local
    search's subset; default: all, in order)."""
    sig = coarse_posterior > 0
    lists = _fine_lists(volume_ftc, sig, sampling, shifts_px, pixels, images, box_size=box_size, pad=pad,
                        r_padded=r_padded, ov=ov, orientation_index=orientation_index)
    return _own_points(lists, images, ctf, noise_weight, pixels, sig, log_prior_t=log_prior_t,
                       log_prior_r=log_prior_r, adaptive_fraction=adaptive_fraction)


def fine_pass_parts(volume_ftc, images, ctf, noise_weight, pixels, sampling, coarse_posterior, shifts_px, *,
                    box_size: int, pad: float, r_padded: int, max_elements: int = 2**26, log_prior_t=None,
                    log_prior_r=None, adaptive_fraction: float = 0.999, ov: int = 1, orientation_index=None):
    """`fine_pass` on a batch in parts: yields (rows of the batch, FinePass of those rows).

    The batch's fine points are projected once. The particles go by their number of significant
    coarse points, most first, in parts of similar particles (a part's padding at most 2x on
    orientations), each part within `max_elements` of per-particle shifted images, projections and
    squared differences."""
    xp = get_xp(images)
    sig = coarse_posterior > 0
    lists = _fine_lists(volume_ftc, sig, sampling, shifts_px, pixels, images, box_size=box_size, pad=pad,
                        r_padded=r_padded, ov=ov, orientation_index=orientation_index)
    n_r = to_numpy(sig.any(axis=1).sum(axis=1)) * lists.k_r                 # (B,) fine orientations of each
    n_t = to_numpy(sig.any(axis=2).sum(axis=1)) * lists.k_t
    k = len(pixels.index)
    order = np.lexsort((-n_t, -n_r))
    log_prior_t = None if log_prior_t is None else xp.asarray(log_prior_t)
    log_prior_r = None if log_prior_r is None else xp.asarray(log_prior_r)
    start = 0
    while start < len(order):
        r_max, t_max, stop = n_r[order[start]], 0, start
        while stop < len(order) and 2 * n_r[order[stop]] >= r_max:
            t_next = max(t_max, n_t[order[stop]])
            if stop > start and (stop - start + 1) * (r_max * k + t_next * k + 3 * t_next * r_max) > max_elements:
                break
            t_max, stop = t_next, stop + 1
        rows = np.sort(order[start:stop])
        r = xp.asarray(rows)
        yield rows, _own_points(lists, images[r], ctf[r], noise_weight, pixels, sig[r],
                                log_prior_t=None if log_prior_t is None else log_prior_t[r],
                                log_prior_r=None if log_prior_r is None else log_prior_r[r],
                                adaptive_fraction=adaptive_fraction)
        start = stop


__all__ = ["EStepResult", "FinePass", "fine_pass", "fine_pass_parts", "HalfPlanePixels", "expectation", "offset_log_prior", "significant_threshold",
           "squared_differences"]
