"""Fourier layouts and RELION's FFT scaling: the one owner of these conventions.

Scaling: forward transforms divide by the number of real samples, inverse ones do not
(numpy's ``norm="forward"``). ``*_ft`` arrays are rfft half transforms in corner (FFTW) layout, DC
at ``[0, 0, 0]``, last axis ``n//2 + 1``. ``*_ftc`` arrays are RELION's projector-centred layout on
the odd padded grid of `geometry.grids.PaddedGrid`: shape ``(P, P, P//2+1)``, logical ``x`` at
index ``x``, logical ``y, z`` at index ``+ (P//2)``, DC at ``[P//2, P//2, 0]``.

Real-space origin: index ``n//2``. `rfft2_centred` returns transforms whose phases refer to that
origin (RELION's CenterFFTbySign right after the forward FFT).
"""

from __future__ import annotations

import math

from omlrelion.backend import fft_module, get_xp
from omlrelion.geometry.grids import rfft_freqs, signed_freqs


def _checkerboard(shape, xp, dtype):
    """(-1)^(sum of indices) over `shape` (RELION's centring by sign)."""
    sign = xp.ones((), dtype=dtype)
    for axis, n in enumerate(shape):
        idx = xp.arange(n) % 2
        s = (1 - 2 * idx).astype(dtype)
        sign = sign * s.reshape((n,) + (1,) * (len(shape) - axis - 1))
    return sign


def centre_by_sign(a_ft, ndim: int):
    """Multiply the last `ndim` axes by (-1)^(i+j[+k]): moves the real-space origin by n/2.

    Valid for even sides only (never used on the odd padded grid).
    """
    xp = get_xp(a_ft)
    return a_ft * _checkerboard(a_ft.shape[-ndim:], xp, a_ft.real.dtype)


def rfft2_centred(images):
    """(..., n, n) real images, origin at n//2 -> (..., n, n//2+1) transforms, RELION scale.

    n must be even; float32 gives complex64 and float64 complex128 (NumPy >= 2 and CuPy alike).
    """
    xp = get_xp(images)
    return centre_by_sign(fft_module(xp).rfft2(images, norm="forward"), 2)


def irfft2_centred(images_ft, n: int):
    """Inverse of `rfft2_centred` for even n: (..., n, n//2+1) -> (..., n, n) real."""
    xp = get_xp(images_ft)
    return fft_module(xp).irfft2(centre_by_sign(images_ft, 2), s=(n, n), axes=(-2, -1), norm="forward")


def shift_2d(images_ft, shifts_px):
    """Translate images by +shifts_px (x, y) pixels: F(k) * exp(-2 pi i k.o / n).

    images_ft : (m, n, n//2+1) complex, corner layout; shifts_px : (m, 2) (x, y) in pixels.
    RELION's convention: a particle with rlnOriginX/YAngst = o is centred by shifting it by +o.
    """
    xp = get_xp(images_ft)
    n = images_ft.shape[-2]
    real = images_ft.real.dtype
    ky = signed_freqs(n, xp).astype(real)[None, :, None]
    kx = rfft_freqs(n, xp).astype(real)[None, None, :]
    o = xp.asarray(shifts_px, dtype=real)
    phase = (-2.0 * math.pi / n) * (kx * o[:, 0, None, None] + ky * o[:, 1, None, None])
    return images_ft * (xp.cos(phase) + 1j * xp.sin(phase)).astype(images_ft.dtype)


def decentre(a_ftc, r2_max: int):
    """Projector-centred (P, P, H) -> FFTW corner layout of the same odd P; zero |k|^2 > r2_max.

    Works for complex data and real weights alike; returns a new array.
    """
    xp = get_xp(a_ftc)
    out = xp.fft.ifftshift(a_ftc, axes=(0, 1))
    out *= sphere_mask_ft(out.shape[0], r2_max, xp, strict=False)
    return out


def radius2_ft(size: int, xp, dtype=None):
    """|k|^2 on the (size, size, size//2+1) corner-layout rfft grid, as a broadcastable triple sum."""
    dtype = dtype or xp.int64
    k = signed_freqs(size, xp).astype(dtype)
    kx = rfft_freqs(size, xp).astype(dtype)
    return k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2


def sphere_mask_ft(size: int, r2_max: int, xp, *, strict: bool):
    """Boolean (size, size, size//2+1) mask of |k|^2 < r2_max (strict) or <= r2_max."""
    r2 = radius2_ft(size, xp)
    return r2 < r2_max if strict else r2 <= r2_max


def window_ft(a_ft, new_size: int):
    """Fourier crop/pad of a corner-layout rfft cube: same signed frequencies, no scaling.

    a_ft : (m, m, m//2+1) -> (new_size, new_size, new_size//2+1). When enlarging, only input voxels
    with |k|^2 <= (m//2)^2 are copied (RELION's windowFourierTransform).
    """
    xp = get_xp(a_ft)
    m = a_ft.shape[0]
    out = xp.zeros((new_size, new_size, new_size // 2 + 1), dtype=a_ft.dtype)
    kx_len = min(m // 2 + 1, new_size // 2 + 1)
    k_out = signed_freqs(new_size, xp)
    if new_size <= m:
        rows = xp.where(k_out < 0, k_out + m, k_out)
        out[...] = a_ft[rows[:, None], rows[None, :], :kx_len]
        return out
    k_in = signed_freqs(m, xp)
    rows = xp.where(k_in < 0, k_in + new_size, k_in)
    src = a_ft * sphere_mask_ft(m, (m // 2) ** 2, xp, strict=False)
    out[rows[:, None], rows[None, :], :kx_len] = src[:, :, :kx_len]
    return out
