"""Shared fixtures: array backends, random generators, the golden data folder, GPU skips."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from omlrelion.backend import gpu_count

N_GPUS = gpu_count()
REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and N_GPUS < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "multigpu" in item.keywords and N_GPUS < 2:
            item.add_marker(pytest.mark.skip(reason="needs >= 2 GPUs"))
        if "relion" in item.keywords and shutil.which("relion_reconstruct") is None:
            item.add_marker(pytest.mark.skip(reason="RELION programs not on the PATH"))


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    return pytest.importorskip(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(20261128)


def shared_data() -> Path:
    """The golden reference folder (RELION-simulated sets), from OMLRELION_DATA or ../shared/data."""
    return Path(os.environ.get("OMLRELION_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def relion_sim64() -> Path:
    folder = shared_data() / "relion_sim64"
    if not (folder / "particles.star").is_file():
        pytest.skip(f"golden data not found in {folder} (set OMLRELION_DATA)")
    return folder


@pytest.fixture
def map_term_sums(rng):
    """Float64 padded sums (box 32, r_max 14) whose MAP term dwarfs the low shells' weights, as in a
    refinement: weights 5 (1 + r) (x U(0.5, 1.5)), tau2 falling from 1e-1 to 1e-8.
    Returns (PaddedGrid, data_ftc, weight_ftc, tau2)."""
    from omlrelion.geometry.grids import PaddedGrid

    n, r_max = 32, 14
    grid = PaddedGrid(n, 2.0, r_max)
    c = grid.size // 2
    k = np.arange(-c, c + 1)
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + np.arange(grid.half)[None, None, :] ** 2) / 2.0
    inside = r <= r_max
    weight = np.where(inside, 5.0 * (1 + r) * rng.uniform(0.5, 1.5, size=r.shape), 0.0)
    data = np.where(inside, weight * (rng.normal(size=r.shape) + 1j * rng.normal(size=r.shape)) / (1 + r) ** 2, 0)
    return grid, data, weight, np.logspace(-1, -8, r_max + 1)


@pytest.fixture
def padded_sums(rng):
    """Factory: Hermitian-repaired padded sums (data, weight; float64) of random CTF-like slices.

    `padded_sums(box_size, r_max=None, n_images=150)` -> (PaddedGrid, data_ftc, weight_ftc).
    """
    from omlrelion.fourier.backprojector import insert_slices
    from omlrelion.fourier.symmetrise import hermitian_repair
    from omlrelion.geometry.euler import euler_to_matrix
    from omlrelion.geometry.grids import PaddedGrid

    def make(box_size, r_max=None, n_images=150):
        grid = PaddedGrid(box_size, 2.0, box_size // 2 if r_max is None else r_max)
        data = np.zeros(grid.shape, np.complex128)
        weight = np.zeros(grid.shape, np.float64)
        nh = box_size // 2 + 1
        f = rng.normal(size=(n_images, box_size, nh)) + 1j * rng.normal(size=(n_images, box_size, nh))
        w = rng.uniform(0.05, 1.0, size=f.shape)
        rotations = euler_to_matrix(rng.uniform([-180, 0, -180], [180, 180, 180], size=(n_images, 3)))
        insert_slices(data, weight, f * w, w * w, rotations, pad=2.0, r_padded=grid.r_padded)
        hermitian_repair(data, weight)
        return grid, data, weight

    return make


@pytest.fixture
def read_only_folder():
    """Factory: `with read_only_folder(parent) as folder:` a folder with mode 0o500.

    Skips the test where permissions are not enforced (running as root).
    """
    from contextlib import contextmanager

    @contextmanager
    def make(parent: Path):
        folder = parent / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        try:
            try:
                (folder / "probe").touch()
            except PermissionError:
                yield folder
            else:
                (folder / "probe").unlink()
                pytest.skip("directory permissions are not enforced here (running as root)")
        finally:
            folder.chmod(0o700)

    return make
