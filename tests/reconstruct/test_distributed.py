"""The slab-decomposed FFT and sums-to-map step on G simulated devices equal the single-device ones."""

import numpy as np
import pytest

from omlrelion.backend import Device
from omlrelion.reconstruct.distributed import reconstruct_map_distributed
from omlrelion.reconstruct.gridding import reconstruct_map
from omlrelion.reconstruct.slab_fft import SlabFFT


@pytest.mark.parametrize("n", [15, 16])
@pytest.mark.parametrize("n_devices", [1, 2, 3, 4])
@pytest.mark.parametrize("strided", [False, True])
def test_slab_fft_equals_numpy(rng, n, n_devices, strided):
    fft = SlabFFT(n, [Device()] * n_devices, strided=strided)
    volume = rng.normal(size=(n, n, n))
    ref = np.fft.rfftn(volume, norm="forward")
    np.testing.assert_allclose(fft.gather_fourier(fft.forward(fft.scatter_real(volume))), ref, atol=1e-13)
    np.testing.assert_allclose(fft.gather_real(fft.inverse(fft.scatter_fourier(ref))), volume, atol=1e-13)


@pytest.mark.parametrize("n_devices", [1, 2, 3, 4])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("skip_gridding", [False, True])
def test_distributed_map_equals_single_device(padded_sums, n_devices, strided, skip_gridding):
    grid, data, weight = padded_sums(32)
    ref = reconstruct_map(data, weight, box_size=32, skip_gridding=skip_gridding)
    ours = reconstruct_map_distributed(data, weight, devices=[Device()] * n_devices, box_size=32,
                                       skip_gridding=skip_gridding, strided=strided)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= 1e-10


@pytest.mark.parametrize("n_devices", [2, 3])
def test_distributed_with_maxres_and_map_term(padded_sums, n_devices):
    grid, data, weight = padded_sums(34, r_max=9)
    tau2 = np.linspace(2.0, 0.0, grid.r_max + 1) ** 2
    ref = reconstruct_map(data, weight, box_size=34, r_max=9, tau2=tau2)
    ours = reconstruct_map_distributed(data, weight, devices=[Device()] * n_devices, box_size=34, r_max=9, tau2=tau2)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= 1e-10


@pytest.mark.parametrize("n_devices", [1, 2, 3])
@pytest.mark.parametrize("skip_gridding", [False, True])
def test_packed_storage_gives_the_dense_result_bit_for_bit(padded_sums, n_devices, skip_gridding):
    grid, data, weight = padded_sums(32)
    tau2 = np.linspace(3.0, 0.5, grid.r_max + 1) ** 2
    kwargs = dict(devices=[Device()] * n_devices, box_size=32, skip_gridding=skip_gridding, tau2=tau2)
    dense = reconstruct_map_distributed(data, weight, storage="dense", **kwargs)
    packed = reconstruct_map_distributed(data, weight, storage="packed", **kwargs)
    np.testing.assert_array_equal(packed, dense)
    with pytest.raises(ValueError, match="storage"):
        reconstruct_map_distributed(data, weight, storage="zip", **kwargs)


@pytest.mark.parametrize("n_devices", [1, 2])
def test_coarse_maxres_grid_smaller_than_half_the_final_grid(padded_sums, n_devices):
    """r_max 7 at box 40: P = 31 while the final grid has Q = 80 (Q/2 >= P)."""
    grid, data, weight = padded_sums(40, r_max=7)
    assert grid.final_size // 2 >= grid.size
    ref = reconstruct_map(data, weight, box_size=40, r_max=7)
    ours = reconstruct_map_distributed(data, weight, devices=[Device()] * n_devices, box_size=40, r_max=7)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= 1e-10
