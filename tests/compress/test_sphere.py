"""Sphere packing: exact index tables, bit-exact round trips, z-chunks, elementwise steps on packed arrays."""

import math

import numpy as np
import pytest

from omlrelion.compress import (SpherePacking, check_outside_zero, dense_bytes, footprint_report, pack, packed_bytes,
                                packed_frequencies, packed_r2, packed_rows_view, unpack)
from omlrelion.geometry.grids import PaddedGrid, signed_freqs

DTYPES = [np.float32, np.float64, np.complex64, np.complex128]
SIZES = [7, 9, 15, 32 + 1, 65]


def _r2_dense(size, rows):
    """Brute-force |k|^2 of the (P, ny, H) slab with y-rows `rows` (FFTW indices)."""
    k = signed_freqs(size, np).astype(np.int64)
    kx = np.arange(size // 2 + 1)
    return k[:, None, None] ** 2 + k[np.asarray(rows, dtype=np.int64)][None, :, None] ** 2 + kx[None, None, :] ** 2


def _inside(size, rows, r2_max, inclusive):
    r2 = _r2_dense(size, rows)
    return r2 <= r2_max if inclusive else r2 < r2_max


def _row_sets(size):
    """All rows, a contiguous slab, a strided slab (as reconstruct.slab_fft lays them out)."""
    return {"all": np.arange(size), "contiguous": np.arange(size // 3, size // 3 + max(1, size // 2)),
            "strided": np.arange(1, size, 3)}


def _r2_values(size):
    corner = 2 * (size // 2) ** 2 + (size // 2) ** 2     # |k|^2 of the farthest voxel
    return sorted({0, 1, 2, 5, (size // 4) ** 2, (size // 2 - 1) ** 2, (size // 2) ** 2, corner - 1, corner,
                   corner + 7})


def _random(rng, shape, dtype, special=True):
    """Random values, with special bit patterns (-0, inf, nan, subnormals) mixed in when `special`."""
    dtype = np.dtype(dtype)
    real = dtype.type(0).real.dtype
    a = rng.standard_normal(shape).astype(real)
    if np.issubdtype(dtype, np.complexfloating):
        a = a + 1j * rng.standard_normal(shape).astype(real)
    a = a.astype(dtype)
    flat = a.reshape(-1)
    if special and flat.size >= 5:
        flat[rng.choice(flat.size, 5, replace=False)] = [-0.0, np.inf, np.nan, np.finfo(real).smallest_subnormal,
                                                         -np.finfo(real).max]
    return a


def _zero_outside(a, inside):
    return np.where(inside, a, a.dtype.type(0))


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


def test_tables_match_brute_force():
    for size in SIZES:
        for rows in _row_sets(size).values():
            for r2_max in _r2_values(size):
                for inclusive in (True, False):
                    pk = SpherePacking(size, rows, r2_max, inclusive)
                    inside = _inside(size, rows, r2_max, inclusive)
                    assert pk.dense_shape == inside.shape
                    np.testing.assert_array_equal(pk.counts, inside.sum(axis=2))
                    # the stored voxels of every row are a prefix of the row
                    np.testing.assert_array_equal(np.arange(pk.half) < pk.counts[:, :, None], inside)
                    assert pk.offsets[0] == 0 and pk.offsets.dtype == np.int64
                    np.testing.assert_array_equal(np.diff(pk.offsets), pk.counts.ravel())
                    assert pk.n_packed == inside.sum()
                    assert pk.packed_fraction == pytest.approx(inside.mean())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inclusive", [True, False])
def test_round_trip_bit_exact(rng, dtype, inclusive):
    for size in SIZES:
        for rows in _row_sets(size).values():
            for r2_max in _r2_values(size):
                pk = SpherePacking(size, rows, r2_max, inclusive)
                dense = _zero_outside(_random(rng, pk.dense_shape, dtype), _inside(size, rows, r2_max, inclusive))
                assert check_outside_zero(dense, pk)
                packed = pack(dense, pk)
                assert packed.dtype == np.dtype(dtype) and packed.shape == (pk.n_packed,)
                back = unpack(packed, pk)
                assert back.dtype == np.dtype(dtype) and back.shape == pk.dense_shape
                np.testing.assert_array_equal(_bits(back), _bits(dense))


def test_pack_drops_outside_and_unpack_writes_zeros(rng):
    size, rows = 15, np.arange(2, 13, 2)
    pk = SpherePacking(size, rows, 20, True)
    dense = _random(rng, pk.dense_shape, np.complex64)
    dense[~np.isfinite(dense)] = 1.0
    assert not check_outside_zero(dense, pk)
    back = unpack(pack(dense, pk), pk, out=np.full(pk.dense_shape, 7 + 7j, np.complex64))
    inside = _inside(size, rows, 20, True)
    np.testing.assert_array_equal(back, np.where(inside, dense, 0))
    assert check_outside_zero(back, pk)
    nan_outside = np.zeros(pk.dense_shape)
    nan_outside[~inside.astype(bool)] = np.nan
    assert not check_outside_zero(nan_outside, pk)


@pytest.mark.parametrize("dtype", DTYPES)
def test_z_chunks(rng, dtype):
    for size in (9, 33):
        for rows in _row_sets(size).values():
            pk = SpherePacking(size, rows, (size // 2 - 1) ** 2, True)
            dense = _zero_outside(_random(rng, pk.dense_shape, dtype), _inside(size, rows, pk.r2_max, True))
            packed = pack(dense, pk)
            full = unpack(packed, pk)
            bounds = [0, 1, size // 3, size // 2, size - 1, size]
            repacked = np.zeros_like(packed)
            buffer = np.full((size, pk.ny, pk.half), np.nan, dtype=np.result_type(dtype, np.complex64))
            for z0, z1 in zip(bounds[:-1], bounds[1:]):
                chunk = unpack(packed, pk, z_range=(z0, z1))
                np.testing.assert_array_equal(_bits(chunk), _bits(full[z0:z1]))
                # reuse of a (larger, complex) FFT buffer: a view of its first planes
                view = unpack(packed, pk, z_range=(z0, z1), out=buffer[: z1 - z0])
                assert np.shares_memory(view, buffer)
                np.testing.assert_array_equal(view, full[z0:z1].astype(buffer.dtype))
                assert pack(chunk, pk, out=repacked, z_range=(z0, z1)) is repacked
                np.testing.assert_array_equal(_bits(packed_rows_view(repacked, pk, (z0, z1))),
                                              _bits(packed[pk.z_slice(z0, z1)]))
            np.testing.assert_array_equal(_bits(repacked), _bits(packed))
            # a strided view as the destination (x axis every other element of a wider buffer)
            wide = np.zeros((3, pk.ny, 2 * pk.half), dtype=dtype)
            unpack(packed, pk, z_range=(2, 5), out=wide[:, :, ::2])
            np.testing.assert_array_equal(_bits(np.ascontiguousarray(wide[:, :, ::2])), _bits(full[2:5]))
            assert not wide[:, :, 1::2].any()


def test_elementwise_on_packed_equals_dense_then_pack(rng):
    size, r2_sphere = 33, 15**2
    for rows in _row_sets(size).values():
        pk = SpherePacking(size, rows, r2_sphere, True)          # as decenter keeps: |k|^2 <= R^2
        inside = _inside(size, rows, r2_sphere, True)
        fw = (rng.uniform(0.1, 2.0, pk.dense_shape) * inside).astype(np.float32)
        wn = (rng.uniform(0.1, 2.0, pk.dense_shape) * inside).astype(np.float32)
        data = _zero_outside(_random(rng, pk.dense_shape, np.complex64, special=False), inside)
        c = rng.uniform(0.5, 1.5, pk.dense_shape).astype(np.float32)     # dense everywhere, like |C|
        fw_p, wn_p, data_p, c_p = pack(fw, pk), pack(wn, pk), pack(data, pk), pack(c, pk)
        np.testing.assert_array_equal(_bits(wn_p * fw_p), _bits(pack(wn * fw, pk)))
        np.testing.assert_array_equal(_bits(data_p * wn_p), _bits(pack(data * wn, pk)))
        # the gridding update: divide on the strict interior only
        strict = _r2_dense(size, rows) < r2_sphere
        dense_update = np.where(strict, wn / np.maximum(c, np.float32(1e-6)), wn)
        packed_update = np.where(packed_r2(pk) < r2_sphere, wn_p / np.maximum(c_p, np.float32(1e-6)), wn_p)
        np.testing.assert_array_equal(_bits(packed_update), _bits(pack(dense_update, pk)))
        np.testing.assert_array_equal(_bits(unpack(packed_update, pk)), _bits(dense_update * inside))


def test_packed_frequencies():
    size = 15
    k = signed_freqs(size, np).astype(np.int64)
    for rows in _row_sets(size).values():
        pk = SpherePacking(size, rows, 30, False)
        kz = np.broadcast_to(k[:, None, None], pk.dense_shape)
        ky = np.broadcast_to(k[rows][None, :, None], pk.dense_shape)
        kx = np.broadcast_to(np.arange(pk.half)[None, None, :], pk.dense_shape)
        got = packed_frequencies(pk)
        for a, b in zip(got, (kz, ky, kx)):
            np.testing.assert_array_equal(a, pack(np.ascontiguousarray(b), pk))
        np.testing.assert_array_equal(packed_r2(pk), pack(_r2_dense(size, rows), pk))
        for z_range in [(4, 9), (5, 12), (6, 8), (0, 15), (3, 3)]:      # planes 6..8 (|kz| = 6, 7) are empty
            part = packed_frequencies(pk, z_range=z_range)
            for a, b in zip(part, got):
                np.testing.assert_array_equal(a, b[pk.z_slice(*z_range)])


def test_packing_tables_and_equality():
    a = SpherePacking(9, [0, 1, 2], 10, True)
    assert a == SpherePacking(9, np.array([0, 1, 2]), 10, True)
    assert hash(a) == hash(SpherePacking(9, range(3), 10, True))
    assert a != SpherePacking(9, [0, 1, 2], 10, False)
    assert a != SpherePacking(9, [0, 1, 3], 10, True)
    assert a.to(np).offsets is a.offsets
    with pytest.raises(ValueError):
        a.offsets[0] = 1
    with pytest.raises(AttributeError, match="immutable"):
        a.r2_max = 3
    po = a.plane_offsets()
    assert po.shape == (10,) and po[-1] == a.n_packed
    assert a.z_slice(2, 5) == slice(int(po[2]), int(po[5]))
    empty = SpherePacking(9, np.arange(0), 10, True)
    assert empty.n_packed == 0 and empty.packed_fraction == 0.0 and empty.dense_shape == (9, 0, 5)
    assert unpack(pack(np.zeros(empty.dense_shape), empty), empty).shape == (9, 0, 5)
    nothing = SpherePacking(9, range(9), 0, False)
    assert nothing.n_packed == 0
    assert SpherePacking(9, range(9), 0, True).n_packed == 1     # the DC voxel alone


def test_errors():
    pk = SpherePacking(9, range(4), 10, True)
    dense = np.zeros(pk.dense_shape, np.complex64)
    packed = pack(dense, pk)
    with pytest.raises(ValueError, match="shape"):
        pack(np.zeros((9, 5, 5)), pk)
    with pytest.raises(ValueError, match="out="):
        pack(dense[:3], pk, z_range=(0, 3))
    with pytest.raises(ValueError, match="cannot hold"):
        unpack(packed, pk, out=np.zeros(pk.dense_shape, np.float32))
    with pytest.raises(ValueError, match="cannot hold"):
        pack(dense, pk, out=np.zeros(pk.n_packed, np.float32))
    with pytest.raises(ValueError, match="z_range"):
        unpack(packed, pk, z_range=(3, 10))
    with pytest.raises(ValueError, match="shape"):
        unpack(packed[:-1], pk)
    with pytest.raises(ValueError, match="rows"):
        SpherePacking(9, [0, 9], 10, True)
    with pytest.raises(ValueError, match="rows"):
        SpherePacking(9, [[0, 1]], 10, True)
    with pytest.raises(ValueError, match="r2_max"):
        SpherePacking(9, [0], -1, True)
    with pytest.raises(ValueError, match="r2_max"):
        SpherePacking(9, [0], 2.5, True)


def test_memory_helpers():
    pk = SpherePacking.full(15, 36, True)
    assert dense_bytes(pk.dense_shape, np.complex64) == 15 * 15 * 8 * 8
    assert packed_bytes(pk, np.float32) == 4 * pk.n_packed
    assert pk.index_bytes == 8 * (15 * 15 + 1)
    assert dense_bytes((1603, 1603, 802), np.float64) == 1603 * 1603 * 802 * 8     # no int32 overflow


def test_footprint_report_matches_spec_table():
    # reconstruction spec, section 7, N = 800: 74 GB dense (data, weight, Fconv, Fw, Wn, Mconv in
    # float32), 33.7 GB for the three Fourier arrays packed plus one dense FFT buffer
    rep = footprint_report(800, 2, 400, 1)
    assert rep["padded_size"] == 1603 and rep["half_grid_voxels"] == 1603 * 1603 * 802
    assert rep["dense_bytes"]["data"] == 1603 * 1603 * 802 * 8
    assert rep["dense_bytes"]["Mconv"] == 1603**3 * 4
    assert rep["dense_total_bytes"] / 1e9 == pytest.approx(74.2, abs=0.05)
    assert rep["packed_total_bytes"] / 1e9 == pytest.approx(33.7, abs=0.05)
    assert rep["packed_fraction"] == pytest.approx(0.521, abs=5e-4)
    two = footprint_report(800, 2, 400, 2)
    assert two["packed_voxels"] == rep["packed_voxels"]
    assert two["packed_bytes"]["data"] == rep["packed_bytes"]["data"]
    assert sum(d["rows"] for d in two["per_device"]) == 1603
    assert two["packed_peak_device_bytes"] < 0.51 * rep["packed_total_bytes"]
    strided = footprint_report(800, 2, 400, 3, strided=True)
    assert strided["packed_voxels"] == rep["packed_voxels"]


def test_footprint_report_counts_match_a_packing():
    for box_size, r_max, n_devices, strided in [(16, 8, 1, False), (20, 6, 3, False), (24, 12, 2, True)]:
        rep = footprint_report(box_size, 2, r_max, n_devices, np.float64, strided=strided)
        grid = PaddedGrid(box_size, 2.0, r_max)
        pk = SpherePacking.full(grid.size, grid.r2_sphere, True)
        assert rep["packed_voxels"] == pk.n_packed
        assert rep["packed_bytes"]["data"] == packed_bytes(pk, np.complex128)
        bounds = np.linspace(0, grid.size, n_devices + 1).round().astype(int)    # reconstruct.slab_fft's split
        for g, dev in enumerate(rep["per_device"]):
            rows = np.arange(g, grid.size, n_devices) if strided else np.arange(bounds[g], bounds[g + 1])
            assert dev["packed_voxels"] == SpherePacking(grid.size, rows, grid.r2_sphere, True).n_packed
            assert dev["fft_buffer"] == grid.size * rows.size * grid.half * 16
        assert rep["dtype"] == "float64"


@pytest.mark.parametrize("box_size", [64, 128, 200])
def test_packed_fraction_full_resolution(box_size):
    # pad 2, r_max = N/2: R = N, P = 2N + 3. The stored region (cells of the voxels with x >= 0
    # inside |k| <= R) has volume (2 pi / 3) R^3 + (pi / 2) R^2: the half ball plus the half-voxel
    # slab of the x = 0 disc.
    grid = PaddedGrid(box_size, 2.0, box_size // 2)
    assert grid.size == 2 * box_size + 3
    r = grid.r_padded
    pk = SpherePacking.full(grid.size, grid.r2_sphere, True)
    analytic = (2 * math.pi / 3 * r**3 + math.pi / 2 * r**2) / (grid.size**2 * grid.half)
    assert pk.packed_fraction == pytest.approx(analytic, rel=0.01)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernels_match_numpy(rng, dtype):
    cp = pytest.importorskip("cupy")
    from omlrelion.compress import sphere

    for size in (9, 33, 65):
        for rows in _row_sets(size).values():
            for inclusive in (True, False):
                pk = SpherePacking(size, rows, (size // 2 - 1) ** 2, inclusive)
                dense = _random(rng, pk.dense_shape, dtype)
                packed = pack(dense, pk)
                packed_gpu = pack(cp.asarray(dense), pk)
                np.testing.assert_array_equal(_bits(cp.asnumpy(packed_gpu)), _bits(packed))
                # the kernel against the xp (boolean-mask) version run on cupy
                ref = cp.empty_like(packed_gpu)
                sphere._pack_mask(cp.asarray(dense), pk, ref, 0, size)
                np.testing.assert_array_equal(_bits(cp.asnumpy(ref)), _bits(packed))
                np.testing.assert_array_equal(_bits(cp.asnumpy(unpack(packed_gpu, pk))), _bits(unpack(packed, pk)))
                buf = cp.full((size, pk.ny, 2 * pk.half), cp.nan, dtype=np.result_type(dtype, np.complex64))
                view = unpack(packed_gpu, pk, z_range=(1, 4), out=buf[:3, :, ::2])
                np.testing.assert_array_equal(cp.asnumpy(view), unpack(packed, pk)[1:4])
                repacked = cp.zeros_like(packed_gpu)
                for z0, z1 in ((0, 3), (3, size)):
                    pack(unpack(packed_gpu, pk, z_range=(z0, z1)), pk, out=repacked, z_range=(z0, z1))
                np.testing.assert_array_equal(_bits(cp.asnumpy(repacked)), _bits(packed))
                assert check_outside_zero(unpack(packed_gpu, pk), pk)
                for a, b in zip(packed_frequencies(pk, cp), packed_frequencies(pk)):
                    np.testing.assert_array_equal(cp.asnumpy(a), b)
