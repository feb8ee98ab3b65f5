"""The maximization step's sums for one half set (spec `relion-refinement.md`, 4.1-4.2, 4.5).

For each particle and each orientation r holding significant posterior mass, the shifts are summed
in 2D first (RELION's order) and one slice is inserted:

    Fimg_r(k) = w(k) CTF(k) X(k) sum_t gamma[t, r] phi_t(k),   Fwgt_r(k) = w(k) CTF(k)^2 sum_t gamma[t, r]

with w(k) = 1/sigma2(shell), the DC pixel included, phi_t(k) = exp(-2 pi i k.t / N). The noise
sums add gamma |CTF P_r - X phi_t|^2 per shell; the offset sums gamma |o + t|^2. Arrays are NumPy
or CuPy alike.
"""

from __future__ import annotations

import math

import numpy as np

from omlrelion.backend import get_xp, to_numpy
from omlrelion.fourier.backprojector import insert_slices
from omlrelion.geometry.euler import euler_to_matrix
from omlrelion.geometry.grids import rfft_freqs, signed_freqs


def shell_index(n: int) -> np.ndarray:
    """round(|k|) on the (n, n//2+1) corner-layout half plane of a side-n image."""
    ky = signed_freqs(n, np).astype(np.float64)[:, None]
    kx = rfft_freqs(n, np).astype(np.float64)[None, :]
    return np.rint(np.sqrt(kx**2 + ky**2)).astype(np.int64)


def inverse_sigma2_plane(sigma2, n: int) -> np.ndarray:
    """1/sigma2(round(|k|)) on the (n, n//2+1) half plane; shells past the array take its last value."""
    sigma2 = np.asarray(sigma2, dtype=np.float64)
    return 1.0 / sigma2[np.minimum(shell_index(n), len(sigma2) - 1)]


def phase_ramps(shifts_px, n: int, box_size: int, xp, dtype):
    """(T, n, n//2+1) exp(-2 pi i k.t / N) for trial shifts t (x, y) in pixels of the box N."""
    ky = xp.asarray(signed_freqs(n, np), dtype=np.float64)[:, None]
    kx = xp.asarray(rfft_freqs(n, np), dtype=np.float64)[None, :]
    t = xp.asarray(shifts_px, dtype=np.float64)
    arg = (-2 * math.pi / box_size) * (t[:, 0, None, None] * kx[None] + t[:, 1, None, None] * ky[None])
    return (xp.cos(arg) + 1j * xp.sin(arg)).astype(dtype)


def accumulate(data, weight, images, ctf, inv_sigma2, posterior, eulers, shifts_px, *, box_size: int, pad: float,
               r_padded: int, projections=None, old_offsets_px=None, angpix: float = 1.0, noise_images=None,
               slots=None):
    """Add one batch's posterior-weighted slices to a half's sums (in place) and return its other sums.

    images : (B, n, n//2+1) unmasked image transforms on the current window; ctf likewise (real);
    inv_sigma2 : (n, n//2+1) 1/sigma2 per pixel (DC included); posterior : (B, T, R) (zero where
    not significant); eulers (R, 3) degrees; shifts_px (T, 2). With `slots` = (t_index (B, Tb),
    r_index (B, Rb)) the posterior is (B, Tb, Rb) on each particle's own shifts and orientations
    (`expectation.FinePass`). With `projections` (R, n, n//2+1) the noise sums per shell are also
    made, from `noise_images` (the likelihood's masked images; default `images`). old_offsets_px
    (B, 2): the offsets the trial shifts are relative to.

    The whole batch goes at once: its (particle, orientation) pairs with posterior mass, their
    shift sums sum_t gamma phi_t as one matrix product, one slice insertion for all pairs.

    Returns dict: sigma2_sum (n_shells,), sigma2_count (n_shells,) (pixels x posterior mass per
    shell), offset_sum (sum gamma |o + t|^2 A^2), gamma_sum.
    """
    xp = get_xp(images)
    n = images.shape[-2]
    cplx = images.dtype
    n_shells = n // 2 + 1
    n_t = len(shifts_px)
    out = {"sigma2_sum": np.zeros(n_shells), "sigma2_count": np.zeros(n_shells), "offset_sum": 0.0,
           "gamma_sum": 0.0}
    g = xp.asarray(posterior)                                                # (B, T, R) or (B, Tb, Rb)
    mass = g.sum(axis=1)                                                     # (B, R)
    bb, jj = xp.nonzero(mass > 0)
    if bb.size == 0:
        return out
    gp = g[bb, :, jj]                                                        # (P, T) or (P, Tb)
    gamma_t = g.sum(axis=2)                                                  # (B, T) or (B, Tb)
    rr = jj
    if slots is not None:                 # onto the batch's shift list (a particle's slots are distinct)
        t_index, r_index = slots
        rr = r_index[bb, jj]
        dense = xp.zeros((len(bb), n_t + 1), dtype=gp.dtype)
        dense[xp.arange(len(bb))[:, None], t_index[bb]] = gp
        gp = dense[:, :n_t]
        dense = xp.zeros((len(g), n_t + 1), dtype=gamma_t.dtype)
        dense[xp.arange(len(g))[:, None], t_index] = gamma_t
        gamma_t = dense[:, :n_t]
    phi = phase_ramps(shifts_px, n, box_size, xp, cplx).reshape(n_t, -1)    # (T, K)
    gp = gp.astype(cplx)
    ramp = (gp @ phi).reshape(len(bb), n, -1)                                # sum_t gamma phi_t per pair
    w = xp.asarray(inv_sigma2, dtype=images.real.dtype)
    m = mass[bb, jj][:, None, None].astype(w.dtype)
    f_img = (w * ctf * images)[bb] * ramp
    f_wgt = (w * ctf * ctf)[bb] * m
    insert_slices(data, weight, f_img, f_wgt, euler_to_matrix(np.asarray(eulers)[to_numpy(rr)]), pad=pad,
                  r_padded=r_padded)
    del f_img, f_wgt
    gamma_t = to_numpy(gamma_t)                                              # (B, T)
    t = np.asarray(shifts_px, dtype=np.float64)
    o = np.zeros((len(images), 2)) if old_offsets_px is None else np.asarray(old_offsets_px, dtype=np.float64)
    out["gamma_sum"] = float(gamma_t.sum())
    out["offset_sum"] = float((gamma_t * ((o[:, None, :] + t[None]) ** 2).sum(axis=-1)).sum()) * angpix**2
    if projections is not None:
        # sum_t gamma |c P - X phi_t|^2 = mass (c^2 |P|^2 + |X|^2) - 2 c Re(P conj(X) sum_t gamma conj(phi_t))
        xn = images if noise_images is None else noise_images
        ramp_c = (gp @ xp.conj(phi)).reshape(ramp.shape)
        c, x, pr = ctf[bb], xn[bb], projections[rr]
        resid = m * (c * c * (pr.real**2 + pr.imag**2) + (x.real**2 + x.imag**2)) \
            - 2 * c * (pr * xp.conj(x) * ramp_c).real
        ky = signed_freqs(n, np)[:, None] * np.ones((1, n // 2 + 1), np.int64)
        kx = rfft_freqs(n, np)[None, :] * np.ones((n, 1), np.int64)
        shells = shell_index(n)
        use = ~((kx == 0) & (ky < 0)) & (shells < n_shells)
        per_pixel = to_numpy(resid.sum(axis=0)).astype(np.float64)
        out["sigma2_sum"] = np.bincount(shells[use], weights=per_pixel[use], minlength=n_shells)[:n_shells]
        out["sigma2_count"] = out["gamma_sum"] * np.bincount(shells[use], minlength=n_shells)[:n_shells]
    return out


def update_sigma2(old, sums_list) -> np.ndarray:
    """sigma2(shell) = sum / (2 count) over the batches' sums; shells with nothing keep the old value."""
    total = sum(s["sigma2_sum"] for s in sums_list)
    count = sum(s["sigma2_count"] for s in sums_list)
    new = np.array(old, dtype=np.float64, copy=True)
    n = min(len(new), len(total))
    ok = count[:n] > 0
    new[:n][ok] = total[:n][ok] / (2 * count[:n][ok])
    for r in range(1, len(new)):                    # RELION: values < 1e-14 copy the previous shell
        if new[r] < 1e-14:
            new[r] = new[r - 1]
    return new


def update_sigma_offset(sums_list, *, floor_A2: float = 2.0) -> float:
    """sigma_offset (A) from sum gamma |o + t|^2 / (2 sum gamma), floored at 2 A^2 (RELION)."""
    gamma = sum(s["gamma_sum"] for s in sums_list)
    value = sum(s["offset_sum"] for s in sums_list) / (2 * gamma) if gamma > 0 else floor_A2
    return math.sqrt(max(value, floor_A2))


__all__ = ["accumulate", "inverse_sigma2_plane", "phase_ramps", "shell_index", "update_sigma2", "update_sigma_offset"]
