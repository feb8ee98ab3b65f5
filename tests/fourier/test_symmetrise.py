"""Hermitian repair and point-group symmetrisation of the projector-centred accumulators."""

import shutil
import subprocess

import numpy as np
import pytest

from omlrelion.errors import InputError
from omlrelion.fourier.symmetrise import _operators, _symmetrise_xp, hermitian_repair, symmetrise
from omlrelion.geometry.symmetry import point_group_matrices


@pytest.fixture
def rng():
    return np.random.default_rng(20240531)


def _grid(rng, radius, dtype=np.complex128):
    """Random (P, P, H) data and positive weight for R = radius (not Hermitian-consistent)."""
    size = 2 * (radius + 1) + 1
    shape = (size, size, size // 2 + 1)
    real = np.float32 if dtype == np.complex64 else np.float64
    data = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    weight = rng.uniform(0.5, 2.0, shape).astype(real)
    return data, weight


def _logical(size):
    c = size // 2
    return np.arange(size) - c, c


# ------------------------------------------------------------------------------------------------
# slow references: RELION's loops (backprojector.cpp), one voxel at a time, in float64


def _relion_floor(v):
    t = int(v)  # C cast: truncation
    return t if (v == t or v > 0) else int(v - 1)


def _reference_hermitian(data, weight):
    data, weight = data.astype(np.complex128), weight.astype(np.float64)
    logical, c = _logical(data.shape[0])
    for iz in logical:
        for iy in range(0 if iz < 0 else 1, c + 1):
            a, b = (iz + c, iy + c, 0), (-iz + c, -iy + c, 0)
            fsum = data[a] + np.conj(data[b])
            data[a], data[b] = fsum, np.conj(fsum)
            wsum = weight[a] + weight[b]
            weight[a] = weight[b] = wsum
    return data, weight


def _reference_symmetrise(data, weight, matrices, radius):
    data, weight = data.astype(np.complex128), weight.astype(np.float64)
    size = data.shape[0]
    logical, c = _logical(size)
    sum_data, sum_weight = data.copy(), weight.copy()

    def lin(a, lo, hi):
        return lo + (hi - lo) * a

    def trilinear(arr, z0, y0, x0, fx, fy, fz):
        dx00 = lin(fx, arr[z0, y0, x0], arr[z0, y0, x0 + 1])
        dx01 = lin(fx, arr[z0 + 1, y0, x0], arr[z0 + 1, y0, x0 + 1])
        dx10 = lin(fx, arr[z0, y0 + 1, x0], arr[z0, y0 + 1, x0 + 1])
        dx11 = lin(fx, arr[z0 + 1, y0 + 1, x0], arr[z0 + 1, y0 + 1, x0 + 1])
        return lin(fz, lin(fy, dx00, dx10), lin(fy, dx01, dx11))

    for r in matrices:
        if np.abs(r - np.eye(3)).max() <= 1e-6:
            continue
        for k in logical:
            for i in logical:
                for j in range(data.shape[2]):
                    x, y, z = float(j), float(i), float(k)
                    if x * x + y * y + z * z > radius * radius:
                        continue
                    xp = x * r[0, 0] + y * r[0, 1] + z * r[0, 2]
                    yp = x * r[1, 0] + y * r[1, 1] + z * r[1, 2]
                    zp = x * r[2, 0] + y * r[2, 1] + z * r[2, 2]
                    neg = xp < 0
                    if neg:
                        xp, yp, zp = -xp, -yp, -zp
                    x0, y0, z0 = _relion_floor(xp), _relion_floor(yp), _relion_floor(zp)
                    fx, fy, fz = xp - x0, yp - y0, zp - z0
                    corner = (z0 + c, y0 + c, x0)
                    d = trilinear(data, *corner, fx, fy, fz)
                    sum_data[k + c, i + c, j] += np.conj(d) if neg else d
                    sum_weight[k + c, i + c, j] += trilinear(weight, *corner, fx, fy, fz)
    return sum_data, sum_weight


def _sphere(size, radius):
    logical, _ = _logical(size)
    z, y = logical[:, None, None], logical[None, :, None]
    x = np.arange(size // 2 + 1)[None, None, :]
    return z * z + y * y + x * x <= radius * radius


# ------------------------------------------------------------------------------------------------
# hermitian_repair


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_hermitian_repair_matches_relion_loop(rng, dtype):
    data, weight = _grid(rng, 4, dtype)
    ref_data, ref_weight = _reference_hermitian(data, weight)
    out_data, out_weight = data.copy(), weight.copy()
    assert hermitian_repair(out_data, out_weight) is None
    assert out_data.dtype == dtype and out_weight.dtype == weight.dtype
    if dtype == np.complex128:
        np.testing.assert_array_equal(out_data, ref_data)
        np.testing.assert_array_equal(out_weight, ref_weight)
    else:
        np.testing.assert_allclose(out_data, ref_data, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out_weight, ref_weight, rtol=1e-6)


def test_hermitian_repair_plane_is_consistent_and_weight_doubles(rng):
    data, weight = _grid(rng, 4, np.complex64)
    before_data, before_weight = data.copy(), weight.copy()
    hermitian_repair(data, weight)
    size = data.shape[0]
    c = size // 2
    plane, wplane = data[:, :, 0], weight[:, :, 0]
    mirror = np.conj(plane[::-1, ::-1])
    off_dc = np.ones((size, size), bool)
    off_dc[c, c] = False
    np.testing.assert_array_equal(plane[off_dc], mirror[off_dc])  # data[a] == conj(data[b])
    np.testing.assert_array_equal(wplane, wplane[::-1, ::-1])
    assert plane[c, c] == before_data[c, c, 0] and wplane[c, c] == before_weight[c, c, 0]  # DC alone
    np.testing.assert_array_equal(data[:, :, 1:], before_data[:, :, 1:])  # x > 0 untouched
    np.testing.assert_array_equal(weight[:, :, 1:], before_weight[:, :, 1:])
    # a sum, not an average: every pair now holds w_a + w_b on both sides, so the plane total
    # (without DC) doubles and the Hermitian-expanded total counts each insertion once per side
    w0 = before_weight[:, :, 0].astype(np.float64)
    total = w0.sum() - w0[c, c]
    np.testing.assert_allclose(wplane.astype(np.float64)[off_dc].sum(), 2 * total, rtol=1e-6)


def test_hermitian_repair_completes_one_sided_insertions():
    """Contributions inserted on one side of x = 0 only end up on both, conjugated."""
    radius = 3
    size = 2 * (radius + 1) + 1
    c = size // 2
    data = np.zeros((size, size, size // 2 + 1), np.complex64)
    weight = np.zeros(data.shape, np.float32)
    data[c + 1, c + 2, 0] = 1 + 2j          # logical (x, y, z) = (0, 2, 1)
    weight[c + 1, c + 2, 0] = 3
    hermitian_repair(data, weight)
    assert data[c - 1, c - 2, 0] == 1 - 2j and weight[c - 1, c - 2, 0] == 3
    assert data[c + 1, c + 2, 0] == 1 + 2j and weight[c + 1, c + 2, 0] == 3
    assert np.count_nonzero(data) == 2 and np.count_nonzero(weight) == 2


# ------------------------------------------------------------------------------------------------
# symmetrise against the per-voxel reference


@pytest.mark.parametrize("symbol", ["C4", "C3", "D2", "D5", "T", "O", "I1", "I3", "Ci", "C2v", "Td"])
def test_symmetrise_matches_relion_loop(rng, symbol):
    radius = 4
    data, weight = _grid(rng, radius)
    hermitian_repair(data, weight)
    mats = point_group_matrices(symbol)
    ref_data, ref_weight = _reference_symmetrise(data, weight, mats, radius)
    out_data, out_weight = symmetrise(data, weight, mats, radius)
    # same operations in the same order: equal to the last bit in float64
    np.testing.assert_allclose(out_data, ref_data, rtol=1e-14, atol=1e-13)
    np.testing.assert_allclose(out_weight, ref_weight, rtol=1e-14, atol=1e-13)


@pytest.mark.parametrize("symbol", ["C3", "I2"])
def test_symmetrise_float32_close_to_float64_reference(rng, symbol):
    radius = 4
    data, weight = _grid(rng, radius, np.complex64)
    hermitian_repair(data, weight)
    mats = point_group_matrices(symbol)
    ref_data, ref_weight = _reference_symmetrise(data, weight, mats, radius)
    out_data, out_weight = symmetrise(data, weight, mats, radius)
    assert out_data.dtype == np.complex64 and out_weight.dtype == np.float32
    scale = len(mats)
    np.testing.assert_allclose(out_data, ref_data, rtol=0, atol=2e-6 * scale)
    np.testing.assert_allclose(out_weight, ref_weight, rtol=0, atol=2e-6 * scale)


def test_symmetrise_smaller_radius_and_chunking(rng):
    data, weight = _grid(rng, 5)
    hermitian_repair(data, weight)
    mats = point_group_matrices("D3")
    ref = _reference_symmetrise(data, weight, mats, 3)
    for chunk in (1, 7, 1 << 22):
        out = symmetrise(data, weight, mats, 3, chunk_voxels=chunk)
        np.testing.assert_allclose(out[0], ref[0], rtol=1e-14, atol=1e-13)
        np.testing.assert_allclose(out[1], ref[1], rtol=1e-14, atol=1e-13)


def test_symmetrise_leaves_inputs_and_outside_sphere_alone(rng):
    radius = 4
    data, weight = _grid(rng, radius, np.complex64)
    before = data.copy(), weight.copy()
    out_data, out_weight = symmetrise(data, weight, point_group_matrices("O"), radius)
    np.testing.assert_array_equal(data, before[0])
    np.testing.assert_array_equal(weight, before[1])
    outside = ~_sphere(data.shape[0], radius)
    np.testing.assert_array_equal(out_data[outside], data[outside])
    np.testing.assert_array_equal(out_weight[outside], weight[outside])
    assert out_data is not data and out_weight is not weight


def test_identity_only_is_a_copy(rng):
    data, weight = _grid(rng, 3, np.complex64)
    for mats in (point_group_matrices("C1"), np.zeros((0, 3, 3))):
        out_data, out_weight = symmetrise(data, weight, mats, 3)
        np.testing.assert_array_equal(out_data, data)
        np.testing.assert_array_equal(out_weight, weight)


# ------------------------------------------------------------------------------------------------
# known answers: symmetric maps come back as |G| times themselves


def _symmetric_half_transform(rng, symbol, size):
    """rfft (projector-centred) of a real (size^3) volume made symmetric under an integer group."""
    mats = np.rint(point_group_matrices(symbol)).astype(int)
    vol = rng.standard_normal((size, size, size))
    logical, c = _logical(size)
    z, y, x = np.meshgrid(logical, logical, logical, indexing="ij")
    r = np.stack([x, y, z])  # (3, size, size, size) as (x, y, z)
    sym = np.zeros_like(vol)
    for m in mats:
        gx, gy, gz = np.einsum("ij,j...->i...", m, r) + c
        sym += vol[gz, gy, gx]
    ft = np.fft.rfftn(np.fft.ifftshift(sym), norm="forward")
    return np.fft.fftshift(ft, axes=(0, 1))


@pytest.mark.parametrize("symbol", ["C4", "D2", "D4", "O"])
def test_symmetric_map_is_returned_times_group_order(rng, symbol):
    radius = 5
    size = 2 * (radius + 1) + 1
    data = _symmetric_half_transform(rng, symbol, size)
    weight = np.abs(data) ** 2 + 1.0
    hermitian_symmetric_plane = data[:, :, 0]
    np.testing.assert_allclose(hermitian_symmetric_plane, np.conj(hermitian_symmetric_plane[::-1, ::-1]),
                               atol=1e-12)
    mats = point_group_matrices(symbol)
    out_data, out_weight = symmetrise(data, weight, mats, radius)
    inside = _sphere(size, radius)
    order = len(mats)
    np.testing.assert_allclose(out_data[inside], order * data[inside], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out_weight[inside], order * weight[inside], rtol=1e-10)
    np.testing.assert_array_equal(out_data[~inside], data[~inside])


@pytest.mark.parametrize("symbol", ["C3", "T", "I3", "I4"])
def test_isotropic_map_is_returned_times_group_order(symbol):
    """A smooth isotropic map: only the trilinear blur separates the result from |G| times it."""
    radius = 8
    size = 2 * (radius + 1) + 1
    logical, _ = _logical(size)
    z, y = logical[:, None, None], logical[None, :, None]
    x = np.arange(size // 2 + 1)[None, None, :]
    gauss = np.exp(-(x * x + y * y + z * z) / (2 * 4.0**2)).astype(np.float32)
    data = gauss.astype(np.complex64)
    weight = gauss.copy()
    mats = point_group_matrices(symbol)
    out_data, out_weight = symmetrise(data, weight, mats, radius)
    inside = _sphere(size, radius)
    order = len(mats)
    # trilinear error <= (1/8) sum_i |d2f/dk_i2| <= 3 / (8 sigma^2) ~ 0.023 of the peak per sample
    np.testing.assert_allclose(out_weight[inside], order * weight[inside], rtol=0, atol=0.025 * order)
    np.testing.assert_allclose(out_data[inside], order * data[inside], rtol=0, atol=0.025 * order)
    assert np.abs(out_data.imag).max() == 0


# ------------------------------------------------------------------------------------------------
# input checks


def test_bad_inputs_raise(rng):
    data, weight = _grid(rng, 3, np.complex64)
    mats = point_group_matrices("C2")
    with pytest.raises(InputError):
        symmetrise(data[:, :, :-1], weight[:, :, :-1], mats, 3)   # not (P, P, P//2+1)
    with pytest.raises(InputError):
        symmetrise(data, weight[:-1], mats, 3)                    # shapes differ
    with pytest.raises(InputError):
        symmetrise(data, weight.astype(np.float64), mats, 3)      # precision mismatch
    with pytest.raises(InputError):
        symmetrise(data.real.copy(), weight, mats, 3)             # data must be complex
    with pytest.raises(InputError):
        symmetrise(data, weight, mats, 4)                         # beyond the grid's R
    with pytest.raises(InputError):
        symmetrise(data, weight, mats, 2.5)                       # not an integer
    with pytest.raises(InputError):
        symmetrise(data, weight, mats[:, :2], 3)                  # not (n, 3, 3)
    with pytest.raises(InputError):
        symmetrise(data, weight, 1.5 * mats, 3)                   # not orthogonal
    with pytest.raises(InputError):
        hermitian_repair(data[:-1, :-1], weight[:-1, :-1])        # even P
    with pytest.raises(InputError):
        hermitian_repair(data, weight.astype(np.complex64))


def test_integral_float_radius_accepted(rng):
    data, weight = _grid(rng, 3)
    mats = point_group_matrices("C2")
    a = symmetrise(data, weight, mats, 3)
    b = symmetrise(data, weight, mats, np.float64(3.0))
    np.testing.assert_array_equal(a[0], b[0])


# ------------------------------------------------------------------------------------------------
# RELION ground truth: relion_reconstruct --write_debug_output writes data and weight after
# BackProjector::symmetrise. The C1 run gives the Hermitian-repaired accumulators; a run with
# --sym G gives the same accumulators point-group symmetrised.

STAR = """
data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
_rlnAmplitudeContrast #3
_rlnSphericalAberration #4
_rlnVoltage #5
_rlnImagePixelSize #6
_rlnImageSize #7
_rlnImageDimensionality #8
1 opticsGroup1 0.1 2.7 300.0 2.0 {box} 2


data_particles

loop_
_rlnImageName #1
_rlnAngleRot #2
_rlnAngleTilt #3
_rlnAnglePsi #4
_rlnOriginXAngst #5
_rlnOriginYAngst #6
_rlnOpticsGroup #7
"""


@pytest.fixture(scope="module")
def relion_particles(tmp_path_factory):
    mrcfile = pytest.importorskip("mrcfile")
    folder = tmp_path_factory.mktemp("relion_sym")
    rng = np.random.default_rng(7)
    box, count = 10, 40
    with mrcfile.new(folder / "stack.mrcs") as m:
        m.set_data(rng.standard_normal((count, box, box)).astype(np.float32))
        m.voxel_size = 2.0
    angles = rng.uniform([-180, 0, -180], [180, 180, 180], size=(count, 3))
    rows = [f"{i + 1:06d}@stack.mrcs {a:.6f} {b:.6f} {c:.6f} 0.0 0.0 1" for i, (a, b, c) in enumerate(angles)]
    (folder / "particles.star").write_text(STAR.format(box=box) + "\n".join(rows) + "\n")
    return folder, box


def _relion_accumulators(folder, symbol):
    mrcfile = pytest.importorskip("mrcfile")
    root = f"sym_{symbol}"
    subprocess.run(["relion_reconstruct", "--i", "particles.star", "--o", f"{root}.mrc", "--sym", symbol,
                    "--write_debug_output"], cwd=folder, check=True, capture_output=True, timeout=300)
    data = (mrcfile.read(folder / f"{root}_data_real.mrc").astype(np.float64)
            + 1j * mrcfile.read(folder / f"{root}_data_imag.mrc").astype(np.float64))
    return data, mrcfile.read(folder / f"{root}_weight.mrc").astype(np.float64)


@pytest.mark.relion
@pytest.mark.skipif(shutil.which("relion_reconstruct") is None, reason="RELION (relion_reconstruct) not installed")
@pytest.mark.parametrize("symbol", ["C4", "C3", "D2", "T", "O", "I1", "I3", "Td"])
def test_matches_relion_reconstruct(relion_particles, symbol):
    folder, box = relion_particles
    radius = 2 * (box // 2)  # pad 2, r_max = box / 2
    c1_data, c1_weight = _relion_accumulators(folder, "C1")
    ref_data, ref_weight = _relion_accumulators(folder, symbol)
    assert c1_data.shape == (2 * radius + 3, 2 * radius + 3, radius + 2)
    mats = point_group_matrices(symbol)
    for dtype, tol in ((np.complex128, 2e-7), (np.complex64, 2e-6)):
        real = np.float32 if dtype == np.complex64 else np.float64
        out_data, out_weight = symmetrise(c1_data.astype(dtype), c1_weight.astype(real), mats, radius)
        # RELION computes in double and writes float32 files
        np.testing.assert_allclose(out_data, ref_data, rtol=0, atol=tol * np.abs(ref_data).max())
        np.testing.assert_allclose(out_weight, ref_weight, rtol=0, atol=tol * np.abs(ref_weight).max())


# ------------------------------------------------------------------------------------------------
# GPU: the same code on cupy arrays


def _cupy():
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception:  # no driver
        pytest.skip("no CUDA device")
    return cp


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
@pytest.mark.parametrize("symbol", ["C7", "O", "I3", "D2h", "Td"])
def test_cupy_matches_numpy(rng, dtype, symbol):
    """CUDA kernel and xp code on cupy both reproduce the numpy result bit for bit (no FMA)."""
    cp = _cupy()
    radius = 6
    data, weight = _grid(rng, radius, dtype)
    mats = point_group_matrices(symbol)
    host = data.copy(), weight.copy()
    hermitian_repair(*host)
    dev = cp.asarray(data), cp.asarray(weight)
    hermitian_repair(*dev)
    np.testing.assert_array_equal(cp.asnumpy(dev[0]), host[0])
    np.testing.assert_array_equal(cp.asnumpy(dev[1]), host[1])
    ref = symmetrise(*host, mats, radius)
    out = symmetrise(*dev, cp.asarray(mats), radius)  # CUDA kernel
    assert isinstance(out[0], cp.ndarray) and out[0].dtype == dtype and out[1].dtype == weight.dtype
    np.testing.assert_array_equal(cp.asnumpy(out[0]), ref[0])
    np.testing.assert_array_equal(cp.asnumpy(out[1]), ref[1])
    operators = _operators(mats, radius)
    out_xp = _symmetrise_xp(*dev, operators, radius, 1000)  # vectorised xp code on cupy
    np.testing.assert_array_equal(cp.asnumpy(out_xp[0]), ref[0])
    np.testing.assert_array_equal(cp.asnumpy(out_xp[1]), ref[1])


@pytest.mark.gpu
def test_cupy_kernel_on_a_larger_grid(rng):
    cp = _cupy()
    radius = 24
    data, weight = _grid(rng, radius, np.complex64)
    hermitian_repair(data, weight)
    mats = point_group_matrices("I1")
    ref = symmetrise(data, weight, mats, radius - 3)
    out = symmetrise(cp.asarray(data), cp.asarray(weight), mats, radius - 3)
    np.testing.assert_array_equal(cp.asnumpy(out[0]), ref[0])
    np.testing.assert_array_equal(cp.asnumpy(out[1]), ref[1])
