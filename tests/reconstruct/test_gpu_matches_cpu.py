"""The CuPy float32 path against the NumPy float64 reference on fresh random inputs."""

import numpy as np
import pytest

from omlrelion.backend import Device, to_numpy
from omlrelion.pipeline.steps import ReconstructOptions, reconstruct
from omlrelion.reconstruct.gridding import reconstruct_map
from omlrelion.reconstruct.insert import CtfMode

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("skip_gridding", [False, True])
def test_reconstruct_map_gpu_float32_vs_cpu_float64(padded_sums, skip_gridding):
    import cupy as cp

    grid, data, weight = padded_sums(48, n_images=300)
    ref = reconstruct_map(data, weight, box_size=48, skip_gridding=skip_gridding)
    gpu = reconstruct_map(cp.asarray(data.astype(np.complex64)), cp.asarray(weight.astype(np.float32)),
                          box_size=48, skip_gridding=skip_gridding)
    assert gpu.dtype == np.float32
    assert np.linalg.norm(to_numpy(gpu) - ref) / np.linalg.norm(ref) <= 1e-4


def test_whole_reconstruction_gpu_vs_cpu(relion_sim64, tmp_path):
    import mrcfile

    opts = ReconstructOptions(ctf=CtfMode(apply=True))
    reconstruct(relion_sim64 / "particles.star", tmp_path / "cpu.mrc", opts, show_progress=False)
    reconstruct(relion_sim64 / "particles.star", tmp_path / "gpu.mrc", opts, device=Device(0), show_progress=False)
    cpu = mrcfile.read(tmp_path / "cpu.mrc").astype(np.float64)
    gpu = mrcfile.read(tmp_path / "gpu.mrc").astype(np.float64)
    assert np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu) <= 1e-4


def _gpus(n):
    from omlrelion.backend import gpu_count

    if gpu_count() < n:
        pytest.skip(f"needs {n} GPUs")
    return [Device(i) for i in range(n)]


@pytest.mark.parametrize("n_gpus,strided,fft_size", [(1, False, None), (1, False, 100), (2, True, None),
                                                     (2, False, None)])
def test_packed_columns_gpu_float32_vs_cpu_float64(padded_sums, n_gpus, strided, fft_size):
    """The packed column engine on one or two GPUs (float32) against the dense float64 reference."""
    import cupy as cp

    from omlrelion.reconstruct.columns import reconstruct_map_columns

    devices = _gpus(n_gpus)
    grid, data, weight = padded_sums(48, n_images=300)
    ref = reconstruct_map(data, weight, box_size=48, fft_size=fft_size)
    with devices[0].use():
        gpu = reconstruct_map_columns(cp.asarray(data.astype(np.complex64)), cp.asarray(weight.astype(np.float32)),
                                      devices=devices, box_size=48, strided=strided, fft_size=fft_size,
                                      chunk_voxels=20000, plane_chunk=7)
    assert gpu.dtype == np.float32
    assert np.linalg.norm(gpu - ref) / np.linalg.norm(ref) <= 1e-4


@pytest.mark.parametrize("n_gpus", [1, 2])
def test_packed_columns_gpu_skip_gridding_and_map_term(padded_sums, n_gpus):
    import cupy as cp

    from omlrelion.reconstruct.columns import reconstruct_map_columns

    devices = _gpus(n_gpus)
    grid, data, weight = padded_sums(40, r_max=14)
    tau2 = np.linspace(2.0, 0.1, grid.r_max + 1) ** 2
    for kw in ({"skip_gridding": True}, {"tau2": tau2}):
        ref = reconstruct_map(data, weight, box_size=40, r_max=14, **kw)
        gpu = reconstruct_map_columns(cp.asarray(data.astype(np.complex64)), cp.asarray(weight.astype(np.float32)),
                                      devices=devices, box_size=40, r_max=14, **kw)
        assert np.linalg.norm(gpu - ref) / np.linalg.norm(ref) <= 1e-4


def test_whole_reconstruction_packed_plan_on_gpu(relion_sim64, tmp_path):
    """`reconstruct` with --storage packed on all visible GPUs gives the CPU map."""
    import mrcfile

    from omlrelion.backend import gpu_count

    devices = [Device(i) for i in range(gpu_count())]
    opts = ReconstructOptions(ctf=CtfMode(apply=True))
    reconstruct(relion_sim64 / "particles.star", tmp_path / "cpu.mrc", opts, show_progress=False)
    packed = ReconstructOptions(ctf=CtfMode(apply=True), storage="packed", strided=len(devices) > 1)
    summary = reconstruct(relion_sim64 / "particles.star", tmp_path / "gpu.mrc", packed, device=devices,
                          show_progress=False)
    assert summary["plan"]["storage"] == "packed" and summary["plan"]["n_devices"] == len(devices)
    cpu = mrcfile.read(tmp_path / "cpu.mrc").astype(np.float64)
    gpu = mrcfile.read(tmp_path / "gpu.mrc").astype(np.float64)
    assert np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu) <= 1e-4


def test_compact_kernel_fft_and_direct_on_gpu_vs_cpu(padded_sums):
    """The compact kernel on one GPU (float32): FFT on P, FFT on a friendly side and the direct stencil
    against the float64 CPU map of the same kernel."""
    import cupy as cp

    from omlrelion.reconstruct.columns import reconstruct_map_columns

    grid, data, weight = padded_sums(40, n_images=300)
    ref = reconstruct_map_columns(data, weight, devices=[Device()], box_size=40, kernel="compact")
    for kw in ({}, {"fft_size": 90}, {"convolution": "direct"}):
        gpu = reconstruct_map_columns(cp.asarray(data.astype(np.complex64)), cp.asarray(weight.astype(np.float32)),
                                      devices=[Device(0)], box_size=40, kernel="compact", **kw)
        assert np.linalg.norm(gpu - ref) / np.linalg.norm(ref) <= 1e-4, kw
