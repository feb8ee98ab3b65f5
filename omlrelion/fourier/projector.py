"""Projection: central slices out of a padded 3D half transform (trilinear), and the map's
padded transform they are taken from (RELION's Projector::computeFourierTransformMap).

Same geometry as the back-projector (`fourier.interp`): `extract_slices` is its adjoint for the
real inner product on the inserted pixels.
"""

from __future__ import annotations

from omlrelion.backend import fft_module, get_xp
from omlrelion.fourier.interp import image_pixel_xy, slice_positions
from omlrelion.geometry.grids import PaddedGrid, radial_distance


def volume_to_ftc(volume, *, pad: float = 2.0, r_max: int | None = None):
    """(N, N, N) real map -> projector-centred padded half transform, sphere |k| <= R kept.

    The map is divided by sinc^2(r / (N pad)) (the trilinear interpolation's gridding
    pre-correction), zero-padded to round(pad N) (made even) about its centre, transformed with
    RELION's scaling and multiplied by pad^3 N so that a central slice is on the scale of the
    2D transforms of the images it projects to (`fourier.layout.rfft2_centred`).
    """
    xp = get_xp(volume)
    n = volume.shape[0]
    grid = PaddedGrid(n, pad, n // 2 if r_max is None else r_max)
    q = grid.final_size
    r = radial_distance(n, xp, dtype=volume.dtype) / (n * pad)
    sinc = xp.sinc(r)
    padded = xp.zeros((q, q, q), dtype=volume.dtype)
    lo = q // 2 - n // 2
    padded[lo:lo + n, lo:lo + n, lo:lo + n] = volume / (sinc * sinc)
    ft = fft_module(xp).rfftn(xp.fft.ifftshift(padded), norm="forward") * (pad**3 * n)
    half, c = grid.half, grid.size // 2
    out = xp.zeros(grid.shape, dtype=ft.dtype)
    k = xp.arange(-c, c + 1)
    src = xp.where(k < 0, k + q, k) % q
    kx = min(half, q // 2 + 1)
    out[:, :, :kx] = ft[src[:, None], src[None, :], :kx]
    kk = k.astype(xp.int64)
    r2 = kk[:, None, None] ** 2 + kk[None, :, None] ** 2 + xp.arange(half)[None, None, :] ** 2
    out[r2 > grid.r2_sphere] = 0
    # rows beyond the even grid's range (|k| > q/2) hold nothing
    return out.astype(xp.result_type(volume.dtype, xp.complex64), copy=False)


def extract_slices(volume_ftc, rotations, *, box_size: int, pad: float, r_padded: int):
    """Central slices of a projector-centred padded half transform, trilinear.

    Parameters
    ----------
    volume_ftc : complex (P, P, P//2+1), projector-centred (see `fourier.layout`).
    rotations : (m, 3, 3) RELION matrices A.
    box_size : n, the image side.

    Returns
    -------
    complex (m, n, n//2+1) image transforms, corner layout; zero outside the sphere
    pad^2 (x^2 + y^2) <= r_padded^2 (the back-projector's pixel test).
    """
    xp = get_xp(volume_ftc)
    real = volume_ftc.real.dtype.type
    size, half = volume_ftc.shape[0], volume_ftc.shape[2]
    c = size // 2
    m, n = len(rotations), box_size
    p = slice_positions(xp.asarray(rotations), n, pad, xp, real)             # (m, k, 3)
    x, y, _ = image_pixel_xy(n, xp, xp.float64)
    ok = xp.broadcast_to((x * x + y * y) * (pad * pad) <= r_padded * r_padded, p.shape[:-1]).copy()
    flip = p[..., 0] < 0
    p = xp.where(flip[..., None], -p, p)
    p0 = xp.floor(p)
    f = p - p0
    p0 = p0.astype(xp.int64)
    ok &= (p0[..., 0] + 1 < half) & (xp.abs(p0[..., 1:]).max(axis=-1) < c)
    p0 = xp.where(ok[..., None], p0, 0)
    flat = volume_ftc.reshape(-1)
    base = ((p0[..., 2] + c) * size + (p0[..., 1] + c)) * half + p0[..., 0]
    out = xp.zeros(p.shape[:-1], dtype=volume_ftc.dtype)
    for dz in (0, 1):
        fz = f[..., 2] if dz else 1 - f[..., 2]
        for dy in (0, 1):
            fy = f[..., 1] if dy else 1 - f[..., 1]
            for dx in (0, 1):
                fx = f[..., 0] if dx else 1 - f[..., 0]
                out += (fz * fy * fx) * flat[base + (dz * size + dy) * half + dx]
    out = xp.where(flip, xp.conj(out), out) * ok
    return out.reshape(m, n, n // 2 + 1)
