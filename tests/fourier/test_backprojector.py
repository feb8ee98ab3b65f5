import numpy as np
import pytest

from omlrelion.backend import to_numpy
from omlrelion.fourier.backprojector import insert_slices
from omlrelion.fourier.interp import image_pixel_xy
from omlrelion.fourier.projector import extract_slices
from omlrelion.geometry.euler import euler_to_matrix
from omlrelion.geometry.grids import PaddedGrid


def _random_images(rng, m, n, dtype=np.float64):
    f = rng.normal(size=(m, n, n // 2 + 1)) + 1j * rng.normal(size=(m, n, n // 2 + 1))
    w = rng.uniform(0.1, 1.0, size=(m, n, n // 2 + 1))
    return f.astype(np.result_type(dtype, np.complex64)), w.astype(dtype)


def _insertable(n, pad, r_padded):
    x, y, keep = image_pixel_xy(n, np, np.float64)
    return (keep & ((x * x + y * y) * pad * pad <= r_padded**2)).reshape(n, n // 2 + 1)


def test_identity_slice_lands_on_z0_plane(rng):
    grid = PaddedGrid(16, 2.0, 8)
    f, w = _random_images(rng, 1, 16)
    data = np.zeros(grid.shape, np.complex128)
    weight = np.zeros(grid.shape, np.float64)
    insert_slices(data, weight, f, w, np.eye(3)[None], pad=2.0, r_padded=grid.r_padded)
    c = grid.size // 2
    # pixel (x, y) -> voxel (z=0, y=2y, x=2x): all weight on the z = 0 plane at even positions
    assert np.count_nonzero(weight[np.arange(grid.size) != c]) == 0
    assert weight[c, c + 2 * 3, 2 * 5] == pytest.approx(w[0, 3, 5])
    assert data[c, c - 2 * 4, 2 * 2] == pytest.approx(f[0, 16 - 4, 2])


def test_projector_is_adjoint_of_backprojector(rng):
    """Re<P v, y> == Re<v, B y> on the inserted pixels (trilinear, half grid with folding)."""
    n, pad = 24, 2.0
    grid = PaddedGrid(n, pad, n // 2)
    rotations = euler_to_matrix(rng.uniform([-180, 0, -180], [180, 180, 180], size=(5, 3)))
    vol = rng.normal(size=grid.shape) + 1j * rng.normal(size=grid.shape)
    y, _ = _random_images(rng, 5, n)
    y *= _insertable(n, pad, grid.r_padded)
    ones = np.ones(y.shape)
    data = np.zeros(grid.shape, np.complex128)
    weight = np.zeros(grid.shape, np.float64)
    insert_slices(data, weight, y, ones, rotations, pad=pad, r_padded=grid.r_padded)
    proj = extract_slices(vol, rotations, box_size=n, pad=pad, r_padded=grid.r_padded)
    lhs = np.vdot(proj, y).real
    rhs = np.vdot(vol, data).real
    assert lhs == pytest.approx(rhs, rel=1e-10)


def test_weights_sum_to_inserted_pixel_weights(rng):
    n = 32
    grid = PaddedGrid(n, 2.0, n // 2)
    rotations = euler_to_matrix(rng.uniform([-180, 0, -180], [180, 180, 180], size=(7, 3)))
    f, w = _random_images(rng, 7, n)
    data = np.zeros(grid.shape, np.complex128)
    weight = np.zeros(grid.shape, np.float64)
    insert_slices(data, weight, f, w, rotations, pad=2.0, r_padded=grid.r_padded)
    expected = (w * _insertable(n, 2.0, grid.r_padded)).sum()
    assert weight.sum() == pytest.approx(expected, rel=1e-12)


def test_nearest_neighbour_outside_the_trilinear_core(rng):
    n = 48
    grid = PaddedGrid(n, 2.0, n // 2)
    rotation = euler_to_matrix(np.array([[30.0, 0.0, 0.0]]))   # in-plane: positions off the lattice
    f, w = _random_images(rng, 1, n)
    insertable = _insertable(n, 2.0, grid.r_padded)
    data = np.zeros(grid.shape, np.complex128)
    weight = np.zeros(grid.shape, np.float64)
    insert_slices(data, weight, f, w, rotation, pad=2.0, r_padded=grid.r_padded, nn=True)
    assert weight.sum() == pytest.approx((w * insertable).sum(), rel=1e-12)
    c = grid.size // 2
    k = np.arange(grid.size) - c
    r2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + np.arange(grid.half)[None, None, :] ** 2
    outer = r2 > 22**2          # trilinear pixels (|p| < 20) spill no farther than 20 + sqrt(3)
    x, y, _ = image_pixel_xy(n, np, np.float64)
    n_outer_pixels = np.count_nonzero(insertable.ravel() & (4 * (x * x + y * y) >= 20**2))
    # one voxel per pixel (or fewer, where two pixels round to the same voxel); trilinear would use 4
    assert 0 < np.count_nonzero(weight[outer]) <= n_outer_pixels
    assert np.count_nonzero(weight[:, :, :][np.arange(grid.size) != c]) == 0   # stays in z = 0


@pytest.mark.gpu
@pytest.mark.parametrize("nn", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cuda_kernel_matches_numpy(rng, nn, dtype):
    import cupy as cp

    n = 48
    grid = PaddedGrid(n, 2.0, n // 2)
    rotations = euler_to_matrix(rng.uniform([-180, 0, -180], [180, 180, 180], size=(64, 3)))
    f, w = _random_images(rng, 64, n, np.float64)
    ref_d = np.zeros(grid.shape, np.complex128)
    ref_w = np.zeros(grid.shape, np.float64)
    insert_slices(ref_d, ref_w, f, w, rotations, pad=2.0, r_padded=grid.r_padded, nn=nn)
    cdtype = np.result_type(dtype, np.complex64)
    gd = cp.zeros(grid.shape, cdtype)
    gw = cp.zeros(grid.shape, dtype)
    insert_slices(gd, gw, cp.asarray(f.astype(cdtype)), cp.asarray(w.astype(dtype)), rotations,
                  pad=2.0, r_padded=grid.r_padded, nn=nn)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert np.linalg.norm(to_numpy(gw) - ref_w) / np.linalg.norm(ref_w) < tol
    assert np.linalg.norm(to_numpy(gd) - ref_d) / np.linalg.norm(ref_d) < tol


@pytest.mark.parametrize("nn", [False, True])
def test_matches_a_per_pixel_loop(rng, nn):
    """The vectorised insertion equals a plain loop over pixels written from the spec (section 4)."""
    import math

    n = 24
    grid = PaddedGrid(n, 2.0, n // 2)
    size, half, c, r = grid.size, grid.half, grid.size // 2, grid.r_padded
    rotations = euler_to_matrix(rng.uniform([-180, 0, -180], [180, 180, 180], size=(4, 3)))
    f, w = _random_images(rng, 4, n)
    data = np.zeros(grid.shape, np.complex128)
    weight = np.zeros(grid.shape, np.float64)
    insert_slices(data, weight, f, w, rotations, pad=2.0, r_padded=r, nn=nn)

    def relion_round(v):
        return math.floor(v + 0.5) if v >= 0 else -math.floor(-v + 0.5)

    ref_d = np.zeros(grid.shape, np.complex128)
    ref_w = np.zeros(grid.shape, np.float64)
    for k, a in enumerate(rotations * 2.0):
        for i in range(n):
            y = i if i < n // 2 + 1 else i - n
            for x in range(n // 2 + 1):
                if (x == 0 and y < 0) or 4 * (x * x + y * y) > r * r:
                    continue
                p, v, wt = x * a[0] + y * a[1], f[k, i, x], w[k, i, x]
                if nn and 4 * (x * x + y * y) >= 20**2:
                    q = [relion_round(t) for t in p]
                    if q[0] < 0:
                        q, v = [-t for t in q], np.conj(v)
                    ref_d[q[2] + c, q[1] + c, q[0]] += v
                    ref_w[q[2] + c, q[1] + c, q[0]] += wt
                    continue
                if p[0] < 0:
                    p, v = -p, np.conj(v)
                p0 = np.floor(p).astype(int)
                fr = p - p0
                for dz in (0, 1):
                    for dy in (0, 1):
                        for dx in (0, 1):
                            g = (fr[2] if dz else 1 - fr[2]) * (fr[1] if dy else 1 - fr[1]) * (fr[0] if dx else 1 - fr[0])
                            ref_d[p0[2] + dz + c, p0[1] + dy + c, p0[0] + dx] += g * v
                            ref_w[p0[2] + dz + c, p0[1] + dy + c, p0[0] + dx] += g * wt
    np.testing.assert_allclose(weight, ref_w, atol=1e-12)
    np.testing.assert_allclose(data, ref_d, atol=1e-12)
    del size, half
