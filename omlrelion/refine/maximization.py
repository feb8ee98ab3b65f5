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
               r_padded: int, projections=None, old_offsets_px=None, angpix: float = 1.0):
    """Add one batch's posterior-weighted slices to a half's sums (in place) and return its other sums.

    images : (B, n, n//2+1) unmasked image transforms on the current window; ctf likewise (real);
    inv_sigma2 : (n, n//2+1) 1/sigma2 per pixel (DC included); posterior : (B, T, R) (zero where
    not significant); eulers (R, 3) degrees; shifts_px (T, 2). With `projections` (R, n, n//2+1)
    the noise sums per shell are also made.

    Returns dict: sigma2_sum (n_shells,), sigma2_count (n_shells,) (pixels x posterior mass per
    shell), offset_sum (sum gamma |o + t|^2 A^2), gamma_sum.
    """
    xp = get_xp(images)
    n = images.shape[-2]
    cplx = images.dtype
    phi = phase_ramps(shifts_px, n, box_size, xp, cplx)                       # (T, n, h)
    w = xp.asarray(inv_sigma2, dtype=images.real.dtype)
    shells = xp.asarray(shell_index(n))
    n_shells = n // 2 + 1
    out = {"sigma2_sum": np.zeros(n_shells), "sigma2_count": np.zeros(n_shells), "offset_sum": 0.0,
           "gamma_sum": 0.0}
    # pixels per shell of the half plane, non-redundant (kx = 0, ky < 0 excluded), DC in shell 0
    ky = signed_freqs(n, np)[:, None] * np.ones((1, n // 2 + 1), np.int64)
    kx = rfft_freqs(n, np)[None, :] * np.ones((n, 1), np.int64)
    use = xp.asarray(~((kx == 0) & (ky < 0)) & (shell_index(n) < n_shells))
    t = np.asarray(shifts_px, dtype=np.float64)
    o = np.zeros((len(images), 2)) if old_offsets_px is None else np.asarray(old_offsets_px, dtype=np.float64)
    for b in range(len(images)):
        g = posterior[b]                                                    # (T, R)
        mass_r = g.sum(axis=0)
        rows = xp.flatnonzero(mass_r > 0)
        if rows.size == 0:
            continue
        gr = g[:, rows]                                                     # (T, m)
        ramp = xp.tensordot(gr.T.astype(cplx), phi, axes=1)                # (m, n, h): sum_t gamma phi_t
        f_img = (w * ctf[b] * images[b])[None] * ramp
        f_wgt = (w * ctf[b] * ctf[b])[None] * mass_r[rows][:, None, None].astype(w.dtype)
        insert_slices(data, weight, f_img, f_wgt, euler_to_matrix(to_numpy(eulers)[to_numpy(rows)]), pad=pad,
                      r_padded=r_padded)
        gamma_t = to_numpy(g.sum(axis=1))
        out["gamma_sum"] += float(gamma_t.sum())
        out["offset_sum"] += float((gamma_t * ((o[b] + t) ** 2).sum(axis=1)).sum()) * angpix**2
        if projections is not None:
            tt, rr = xp.nonzero(g > 0)
            resid = xp.abs(ctf[b][None] * projections[rr] - images[b][None] * phi[tt]) ** 2   # (m', n, h)
            gw = g[tt, rr][:, None, None] * resid * use[None]
            out["sigma2_sum"] += to_numpy(xp.bincount(xp.broadcast_to(shells, gw.shape).ravel(),
                                                      weights=gw.ravel(), minlength=n_shells))[:n_shells]
            cnt = xp.bincount(shells.ravel(), weights=use.ravel().astype(np.float64), minlength=n_shells)
            out["sigma2_count"] += float(g.sum()) * to_numpy(cnt)[:n_shells]
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
