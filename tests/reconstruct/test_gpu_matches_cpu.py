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
