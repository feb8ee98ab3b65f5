"""A synthetic, protein-like test map, so that demos and tests need no external data.

`phantom_volume` sums a few hundred Gaussian "atoms" placed in an irregular, compact cluster of
ellipsoidal lobes (diameter about 0.6 of the box), centred on the box centre N//2. The map is
smooth (every atom is at least 1.25 px and 1.5 A wide), has no symmetry and depends only on
(box_size, angpix, seed).
"""

from __future__ import annotations

import math

import numpy as np

from omlrelion.backend import REAL
from omlrelion.errors import InputError

__all__ = ["phantom_volume"]

N_ATOMS = 400
N_LOBES = 5
MIN_BOX_SIZE = 8


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix from a random unit quaternion (uniform on SO(3))."""
    q = rng.standard_normal(4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def _atom_positions(rng: np.random.Generator) -> np.ndarray:
    """(N_ATOMS, 3) (x, y, z) positions in a lobed cluster of radius about 1, centroid at 0."""
    centres = [np.zeros(3)]
    for _ in range(N_LOBES - 1):  # each lobe hangs off a random earlier one
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        centres.append(centres[rng.integers(len(centres))] + rng.uniform(0.35, 0.6) * direction)
    axes = rng.uniform(0.25, 0.5, size=(N_LOBES, 3))
    volumes = axes.prod(axis=1)
    counts = np.floor(N_ATOMS * volumes / volumes.sum()).astype(int)
    counts[0] += N_ATOMS - counts.sum()
    points = []
    for centre, ax, count in zip(centres, axes, counts):
        u = rng.standard_normal((count, 3))
        u *= (rng.uniform(size=(count, 1)) ** (1 / 3)) / np.linalg.norm(u, axis=1, keepdims=True)
        points.append(centre + (u * ax) @ _random_rotation(rng).T)
    points = np.concatenate(points)
    points -= points.mean(axis=0)
    return points / np.linalg.norm(points, axis=1).max()


def phantom_volume(box_size: int, angpix: float, seed: int = 0) -> np.ndarray:
    """A smooth, asymmetric blob map of Gaussian atoms.

    Parameters
    ----------
    box_size : int
        Edge N of the cubic map, px; even and >= 8.
    angpix : float
        Pixel size, A/px (> 0); atoms are at least 1.5 A (and 1.25 px) wide (Gaussian sigma).
    seed : int
        Seed of the numpy Generator that places the atoms; the map is a function of
        (box_size, angpix, seed) alone.

    Returns
    -------
    float32 array, (N, N, N)
        The map indexed [z, y, x], peak value 1, near zero outside the particle; the atom centres
        span a diameter of 0.54 N about index N//2 (about 0.6 N with the atoms' width).

    Raises
    ------
    InputError
        Odd or too small box, non-positive pixel size.
    """
    if isinstance(box_size, bool) or int(box_size) != box_size or box_size < MIN_BOX_SIZE or box_size % 2:
        raise InputError(f"--box {box_size}: the phantom's box size must be an even integer >= {MIN_BOX_SIZE}")
    if not (math.isfinite(angpix) and angpix > 0):
        raise InputError(f"--angpix {angpix}: the pixel size must be > 0 A/px")
    n = int(box_size)
    rng = np.random.default_rng(seed)
    xyz = _atom_positions(rng) * (0.27 * n)
    amplitudes = rng.uniform(0.6, 1.4, size=len(xyz))
    sigma = max(0.03 * n, 1.25, 1.5 / angpix)
    grid = np.arange(n, dtype=np.float64) - n // 2
    # separable Gaussians: V[z, y, x] = sum_a amp_a gz[a, z] gy[a, y] gx[a, x], in chunks of atoms
    g = np.exp(-((grid[None, None, :] - xyz[:, :, None]) ** 2) / (2 * sigma * sigma))  # (a, 3, n)
    volume = np.zeros((n * n, n))
    for start in range(0, len(xyz), 64):
        sl = slice(start, start + 64)
        zy = (amplitudes[sl, None, None] * g[sl, 2, :, None] * g[sl, 1, None, :]).reshape(-1, n * n)
        volume += zy.T @ g[sl, 0, :]
    volume = volume.reshape(n, n, n)
    return (volume / volume.max()).astype(REAL)
