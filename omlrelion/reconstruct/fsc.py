"""Fourier shell correlation, resolution and the signal power tau^2 derived from it.

FSC as relion_postprocess's getFSC: both maps transformed with RELION's scaling on the N grid,
sums over the stored rfft half (both Hermitian twins of the x = 0 plane counted), shell
s = round(|k|) for s <= N/2. Resolution of shell s is N * angpix / s Angstrom.
"""

from __future__ import annotations

import numpy as np

from omlrelion.backend import fft_module, get_xp, to_numpy
from omlrelion.fourier.layout import radius2_ft
from omlrelion.geometry.grids import PaddedGrid
from omlrelion.units import relion_round


def fsc(map1, map2) -> np.ndarray:
    """(N//2 + 1,) float64 FSC of two (N, N, N) maps; FSC[0] is the DC term's correlation."""
    xp = get_xp(map1, map2)
    n = map1.shape[0]
    f1 = fft_module(xp).rfftn(map1, norm="forward")
    f2 = fft_module(xp).rfftn(map2, norm="forward")
    shell = xp.floor(xp.sqrt(radius2_ft(n, xp, xp.float64)) + 0.5).astype(xp.int64).ravel()
    keep = shell <= n // 2
    s = shell[keep]
    num = xp.bincount(s, weights=(xp.conj(f1) * f2).real.ravel()[keep].astype(xp.float64), minlength=n // 2 + 1)
    d1 = xp.bincount(s, weights=(xp.abs(f1) ** 2).ravel()[keep].astype(xp.float64), minlength=n // 2 + 1)
    d2 = xp.bincount(s, weights=(xp.abs(f2) ** 2).ravel()[keep].astype(xp.float64), minlength=n // 2 + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = to_numpy(num / xp.sqrt(d1 * d2))
    return np.nan_to_num(out, nan=0.0)


def resolution_at(curve, *, box_size: int, angpix: float, threshold: float = 0.143) -> float:
    """Resolution (A) of the last shell before the FSC first drops below `threshold`.

    Shell 0 is skipped; returns inf if already shell 1 is below, and Nyquist if it never drops.
    """
    curve = np.asarray(curve)
    last = 0
    for s in range(1, len(curve)):
        if curve[s] < threshold:
            break
        last = s
    return float("inf") if last == 0 else box_size * angpix / last


def tau2_from_fsc(weight_ftc, curve, *, grid: PaddedGrid, whole_data: bool = True, fudge: float = 1.0):
    """RELION's updateSSNRarrays: per-shell tau^2 from an FSC and the (centred) weight sums.

    weight_ftc : real (P, P, P//2+1) projector-centred, symmetrised weights.
    curve : FSC per shell (missing shells count as 0). whole_data: FSC of the full set (3.1).
    Returns (tau2, sigma2, ssnr), each (r_max + 1,) float64.
    """
    xp = get_xp(weight_ftc)
    c = grid.size // 2
    k = np.arange(-c, c + 1)
    r2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + np.arange(grid.half)[None, None, :] ** 2
    inside = np.flatnonzero(r2 < grid.r2_sphere)
    shell = np.floor(np.sqrt(r2.ravel()[inside]) / grid.pad + 0.5).astype(np.int64)
    n_shells = grid.r_max + 1
    w = weight_ftc.reshape(-1)[xp.asarray(inside)].astype(xp.float64)
    s_sum = to_numpy(xp.bincount(xp.asarray(shell), weights=grid.pad**3 * w, minlength=n_shells))[:n_shells]
    n_cnt = np.bincount(shell, minlength=n_shells)[:n_shells].astype(np.float64)
    sigma2 = np.where(s_sum > 1e-10, n_cnt / np.where(s_sum > 1e-10, s_sum, 1.0), 0.0)
    f = np.zeros(n_shells)
    curve = np.asarray(curve, dtype=np.float64)
    f[:min(n_shells, len(curve))] = curve[:n_shells]
    f = np.maximum(0.001, f)
    if whole_data:
        f = np.sqrt(2 * f / (1 + f))
    f = np.minimum(0.999, f)
    ssnr = fudge * f / (1 - f)
    return ssnr * sigma2, sigma2, ssnr


MINRES_MAP = 5  # RELION's --minres_map: no MAP term and no resolution below this shell


def fsc_from_sums(data1, weight1, data2, weight2, *, grid: PaddedGrid) -> np.ndarray:
    """RELION's gold-standard FSC of two halves' sums (calculateDownSampledFourierShellCorrelation).

    Each padded voxel goes to the cell round(k / pad) of the unpadded grid; cell average =
    sum(data) / sum(weight); FSC over cells with |k| <= r_max, shell round(|k|); FSC[0] = 1 and
    shells beyond r_max are 0. Returns (box_size//2 + 1,) float64.
    """
    xp = get_xp(data1, weight1, data2, weight2)
    c, half, r = grid.size // 2, grid.half, grid.r_max
    k = relion_round(np.arange(-c, c + 1) / grid.pad)
    kx = relion_round(np.arange(half) / grid.pad)
    down, dh = 2 * (r + 1) + 1, r + 2
    cell = xp.asarray((((k[:, None, None] + r + 1) * down + (k[None, :, None] + r + 1)) * dh
                       + kx[None, None, :]).ravel())
    size = down * down * dh

    def average(data, weight):
        s = xp.bincount(cell, weights=data.real.ravel().astype(xp.float64), minlength=size) \
            + 1j * xp.bincount(cell, weights=data.imag.ravel().astype(xp.float64), minlength=size)
        w = xp.bincount(cell, weights=weight.ravel().astype(xp.float64), minlength=size)
        return to_numpy(xp.where(w > 0, s / xp.where(w > 0, w, 1.0), 0.0))

    a1, a2 = average(data1, weight1), average(data2, weight2)
    g = np.arange(-(r + 1), r + 2)
    radius = np.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + np.arange(dh)[None, None, :] ** 2).ravel()
    keep = radius <= r
    shell = relion_round(radius[keep])
    n_shells = grid.box_size // 2 + 1
    num = np.bincount(shell, weights=(a1[keep] * np.conj(a2[keep])).real, minlength=n_shells)[:n_shells]
    d1 = np.bincount(shell, weights=np.abs(a1[keep]) ** 2, minlength=n_shells)[:n_shells]
    d2 = np.bincount(shell, weights=np.abs(a2[keep]) ** 2, minlength=n_shells)[:n_shells]
    curve = np.where(d1 * d2 > 0, num / np.sqrt(np.where(d1 * d2 > 0, d1 * d2, 1.0)), 0.0)
    curve[0] = 1.0
    return curve


def resolution_shell(curve, *, fudge: float = 1.0) -> int:
    """RELION's r*: last shell with SSNR >= 1 before the first below (jumping to a later shell > r*+3
    that still has SSNR > 1), at least MINRES_MAP."""
    f = np.clip(np.asarray(curve, dtype=np.float64), 0.001, 0.999)
    ssnr = fudge * f / (1 - f)
    r = 0
    for s in range(1, len(ssnr)):
        if ssnr[s] < 1:
            break
        r = s
    for s in range(len(ssnr) - 1, r + 3, -1):
        if ssnr[s] > 1:
            r = s
            break
    return max(r, MINRES_MAP)
