"""Grids: array axes, frequency indices and RELION's padded Fourier grid.

Arrays are indexed ``[..., z, y, x]``; vectors are ``(x, y, z)``. The real-space origin of a box of
side n is index ``n // 2`` on every axis. On an rfft grid of a side-n array, the last axis holds
``kx = 0 .. n//2`` and the other axes the signed frequency ``k = i if i < n//2 + 1 else i - n``
(for even n the Nyquist row n/2 counts as positive, as in RELION).

The padded 3D accumulation grid of a reconstruction (RELION's BackProjector) for an output box
`box_size`, padding factor `pad` and outermost radius `r_max` (unpadded Fourier pixels) has
``r_padded = round(pad * r_max)`` and odd side ``size = 2 * (r_padded + 1) + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

from omlrelion.units import relion_round


def signed_freqs(n: int, xp):
    """Signed frequencies of the n rows of a (full) FFT axis, RELION's rule, as int32."""
    i = xp.arange(n, dtype=xp.int32)
    return xp.where(i < n // 2 + 1, i, i - n)


def rfft_freqs(n: int, xp):
    """Frequencies of the n//2+1 columns of an rfft axis, as int32."""
    return xp.arange(n // 2 + 1, dtype=xp.int32)


def radial_distance(n: int, xp, *, dtype=None, z_range=None):
    """(n, n, n) distance in voxels of every voxel from the box centre n//2 (only the z-planes
    z_range[0] .. z_range[1]-1 when given)."""
    c = xp.arange(n, dtype=dtype or xp.float64) - n // 2
    cz = c if z_range is None else c[z_range[0]:z_range[1]]
    return xp.sqrt(cz[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)


@dataclass(frozen=True)
class PaddedGrid:
    """RELION's odd padded Fourier grid for one reconstruction.

    Attributes
    ----------
    box_size : output map edge N, px.
    pad : padding factor.
    r_max : outermost Fourier radius in pixels of the unpadded box.
    """

    box_size: int
    pad: float
    r_max: int

    @property
    def r_padded(self) -> int:
        """Sphere radius R in padded voxels: round(pad * r_max)."""
        return relion_round(self.pad * self.r_max)

    @property
    def size(self) -> int:
        """Odd side P = 2 (R + 1) + 1 of the padded grid."""
        return 2 * (self.r_padded + 1) + 1

    @property
    def half(self) -> int:
        """Length P//2 + 1 of the stored x axis (R + 2)."""
        return self.size // 2 + 1

    @property
    def shape(self) -> tuple[int, int, int]:
        """(P, P, P//2+1): shape of the half-grid arrays (data, weight)."""
        return (self.size, self.size, self.half)

    @property
    def r2_sphere(self) -> int:
        """R^2, the integer squared radius used by every sphere test of the reconstruction."""
        return self.r_padded**2

    @property
    def final_size(self) -> int:
        """Even side Q of the final inverse FFT: round(pad * N), made even."""
        q = relion_round(self.pad * self.box_size)
        return q + q % 2


def fft_friendly_size(n: int, primes=(2, 3, 5, 7)) -> int:
    """The smallest m >= n whose prime factors are all in `primes` (fast cuFFT/pocketfft sizes)."""
    m = max(1, n)
    while True:
        rest = m
        for p in primes:
            while rest % p == 0:
                rest //= p
        if rest == 1:
            return m
        m += 1
