"""Pixel geometry shared by the projector and the back-projector.

A 2D rfft pixel (row i, column j) of an n x n image has x = j and the signed y of `grids`. Its
position on the padded 3D grid is ``p = pad * (x * A[0] + y * A[1])`` (that is ``pad * A.T @
(x, y, 0)``, A from `geometry.euler`). Positions with p_x < 0 are folded to -p with the value
conjugated: only the x >= 0 half of the 3D transform is stored.
"""

from __future__ import annotations

from omlrelion.geometry.grids import rfft_freqs, signed_freqs


def image_pixel_xy(n: int, xp, dtype):
    """(x, y) of the n*(n//2+1) rfft pixels, flattened row-major, and the 'insertable' mask.

    The mask drops the x = 0 pixel of rows with negative y (Hermitian twins of pixels already
    present), as RELION's back-projector does.
    """
    y = signed_freqs(n, xp)[:, None] + 0 * rfft_freqs(n, xp)[None, :]
    x = rfft_freqs(n, xp)[None, :] + 0 * y
    keep = ~((x == 0) & (y < 0))
    return x.ravel().astype(dtype), y.ravel().astype(dtype), keep.ravel()


def slice_positions(rotations, n: int, pad: float, xp, dtype):
    """(m, n*(n//2+1), 3) positions (x, y, z) on the padded grid of the rfft pixels of m images."""
    x, y, _ = image_pixel_xy(n, xp, dtype)
    a = xp.asarray(rotations, dtype=dtype) * dtype(pad)
    return x[None, :, None] * a[:, None, 0, :] + y[None, :, None] * a[:, None, 1, :]
