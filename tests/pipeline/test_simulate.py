"""`pipeline.simulate`: determinism, the Euler and shift conventions end to end, noise level,
round trips through omlrelion's and RELION's reconstruct, atomic outputs, the phantom."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import map_coordinates

from omlrelion.errors import InputError
from omlrelion.geometry.euler import euler_to_matrix
from omlrelion.io.mrc import ImageStack, read_map, write_map
from omlrelion.io.star import read_particles, write_star
from omlrelion.pipeline import simulate as simulate_module
from omlrelion.pipeline.phantom import phantom_volume
from omlrelion.pipeline.simulate import SimulateParams, simulate

APIX = 2.0


def _images(star_path):
    particles = read_particles(star_path)
    with ImageStack(particles.image_stacks[0]) as stack:
        return particles, stack.read(particles.image_indices)


def _sphere_correlation(a, b):
    n = a.shape[0]
    c = np.arange(n) - n // 2
    inside = c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2 < (n // 2) ** 2
    return np.corrcoef(a[inside], b[inside])[0, 1]


def _real_space_projection(volume, a):
    """image(x, y) = sum_z V(a.T @ (x, y, z)) about index n//2 (linear interpolation, no Fourier code)."""
    n = volume.shape[0]
    c = np.arange(n, dtype=np.float64) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    r = a.T @ np.stack([x.ravel(), y.ravel(), z.ravel()])
    values = map_coordinates(volume.astype(np.float64), [r[2] + n // 2, r[1] + n // 2, r[0] + n // 2],
                             order=1, mode="constant")
    return values.reshape(n, n, n).sum(axis=0)


def _pose_star(path, eulers_deg, shifts_px=None, defocus=None):
    """A bare STAR table of poses (and shifts in A, defocus) for --orientations."""
    eulers_deg = np.asarray(eulers_deg, dtype=np.float64)
    table = pd.DataFrame({"rlnAngleRot": eulers_deg[:, 0], "rlnAngleTilt": eulers_deg[:, 1],
                          "rlnAnglePsi": eulers_deg[:, 2]})
    if shifts_px is not None:
        table["rlnOriginXAngst"] = np.asarray(shifts_px, dtype=np.float64)[:, 0] * APIX
        table["rlnOriginYAngst"] = np.asarray(shifts_px, dtype=np.float64)[:, 1] * APIX
    if defocus is not None:
        table["rlnDefocusU"], table["rlnDefocusV"], table["rlnDefocusAngle"] = defocus
    write_star(path, {"particles": table})
    return path


def test_same_seed_gives_identical_bytes_whatever_the_batch(tmp_path):
    params = SimulateParams(n_particles=21, box_size=16, shift_max_px=2.0, snr=0.5, bfactor=50.0)
    simulate("phantom", tmp_path / "a", params, seed=5)
    simulate("phantom", tmp_path / "b", replace(params, batch_size=4), seed=5)
    simulate("phantom", tmp_path / "c", params, seed=6)
    a, b, c = ((tmp_path / f"{k}.mrcs").read_bytes() for k in "abc")
    assert a == b
    assert a != c
    star_a = (tmp_path / "a.star").read_text()
    assert star_a == (tmp_path / "b.star").read_text().replace("@b.mrcs", "@a.mrcs")
    assert star_a != (tmp_path / "c.star").read_text().replace("@c.mrcs", "@a.mrcs")


def test_star_columns_optics_and_half_sets(tmp_path):
    summary = simulate("phantom", tmp_path / "sim", SimulateParams(n_particles=9, box_size=16, shift_max_px=1.5,
                                                                   bfactor=30.0, snr=0), seed=1)
    particles, images = _images(tmp_path / "sim.star")
    assert summary["n_particles"] == 9 and images.shape == (9, 16, 16)
    table = particles.table
    assert list(table.columns) == ["rlnImageName", "rlnOpticsGroup", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi",
                                   "rlnOriginXAngst", "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV",
                                   "rlnDefocusAngle", "rlnCtfBfactor", "rlnRandomSubset"]
    assert table["rlnImageName"].tolist()[:2] == ["000001@sim.mrcs", "000002@sim.mrcs"]
    assert particles.random_subset.tolist() == [1, 2, 1, 2, 1, 2, 1, 2, 1]
    optics = particles.optics[0]
    assert (optics.angpix, optics.box_size, optics.voltage_kv, optics.cs_mm, optics.amp_contrast) == (
        APIX, 16, 300.0, 2.7, 0.1)
    assert particles.optics_table["rlnImageDimensionality"].tolist() == [2]
    assert np.all(np.abs(particles.shifts_px) <= 1.5)
    assert np.all((particles.defocus_u >= 10000) & (particles.defocus_u <= 30000))
    astig = particles.defocus_u - particles.defocus_v
    assert np.all((astig >= 0) & (astig <= 600))
    assert np.all((particles.defocus_angle_deg >= 0) & (particles.defocus_angle_deg < 180))
    np.testing.assert_array_equal(particles.ctf_bfactor, 30.0)
    np.testing.assert_array_equal(read_map(tmp_path / "sim_phantom.mrc")[0], phantom_volume(16, APIX, 0))


def test_no_ctf_writes_no_defocus_and_random_orientations_are_uniform(tmp_path):
    simulate("phantom", tmp_path / "sim", SimulateParams(n_particles=4000, box_size=8, ctf=False, snr=0), seed=2)
    particles = read_particles(tmp_path / "sim.star")
    assert "rlnDefocusU" not in particles.table.columns
    rot, tilt, psi = particles.eulers_deg.T
    assert rot.min() >= -180 and rot.max() < 180 and psi.min() >= -180 and psi.max() < 180
    cos_tilt = np.cos(np.deg2rad(tilt))  # uniform on [-1, 1]: mean 0, variance 1/3
    assert abs(cos_tilt.mean()) < 0.03 and abs(cos_tilt.var() - 1 / 3) < 0.02
    assert abs(np.mean(rot)) < 6 and abs(np.var(rot) - 360**2 / 12) < 600


def test_projection_matches_real_space_projection(tmp_path):
    # pins the Euler convention end to end: image(x, y) = sum_z V(A.T (x, y, z)) about n//2
    n = 40
    simulate("phantom", tmp_path / "sim", SimulateParams(n_particles=3, box_size=n, ctf=False, snr=0), seed=3)
    particles, images = _images(tmp_path / "sim.star")
    volume = phantom_volume(n, APIX, 0)
    for eulers, image in zip(particles.eulers_deg, images):
        reference = _real_space_projection(volume, euler_to_matrix(eulers))
        assert np.corrcoef(reference.ravel(), image.ravel())[0, 1] > 0.99, eulers
        assert image.sum() == pytest.approx(reference.sum(), rel=0.05)
        # the test tells the convention from its transpose (A in place of A.T: 0.95-0.97 here)
        transposed = _real_space_projection(volume, euler_to_matrix(eulers).T)
        assert np.corrcoef(transposed.ravel(), image.ravel())[0, 1] < 0.99, eulers


def test_origin_moves_the_particle_centre_to_centre_minus_origin(tmp_path):
    eulers = [[30.0, 60.0, -45.0]] * 2
    origin = (3, -2)
    defocus = ([15000.0, 15000.0], [14000.0, 14000.0], [20.0, 20.0])
    star = _pose_star(tmp_path / "poses.star", eulers, [(0, 0), origin], defocus)
    simulate("phantom", tmp_path / "sim", SimulateParams(box_size=32, orientations=star, snr=0), seed=0)
    particles, (centred, shifted) = _images(tmp_path / "sim.star")
    np.testing.assert_allclose(particles.shifts_px, [(0, 0), origin], atol=1e-12)
    np.testing.assert_array_equal(particles.defocus_v, [14000.0, 14000.0])
    # circular cross-correlation: its peak is the translation from `centred` to `shifted`
    xcorr = np.fft.irfft2(np.fft.rfft2(shifted) * np.conj(np.fft.rfft2(centred)), s=centred.shape)
    dy, dx = np.unravel_index(np.argmax(xcorr), xcorr.shape)
    n = centred.shape[0]
    assert ((dx + n // 2) % n - n // 2, (dy + n // 2) % n - n // 2) == (-origin[0], -origin[1])
    scale = np.abs(centred).max()
    np.testing.assert_allclose(shifted, np.roll(centred, (-origin[1], -origin[0]), axis=(0, 1)),
                               atol=1e-5 * scale)


def test_noise_variance_is_signal_variance_over_snr(tmp_path):
    params = SimulateParams(n_particles=40, box_size=32, shift_max_px=2.0)
    simulate("phantom", tmp_path / "clean", replace(params, snr=0.0), seed=4)
    simulate("phantom", tmp_path / "inf", replace(params, snr=float("inf")), seed=4)
    summary = simulate("phantom", tmp_path / "noisy", replace(params, snr=0.25), seed=4)
    assert (tmp_path / "clean.mrcs").read_bytes() == (tmp_path / "inf.mrcs").read_bytes()
    _, clean = _images(tmp_path / "clean.star")
    _, noisy = _images(tmp_path / "noisy.star")
    noise = (noisy - clean).astype(np.float64)
    assert summary["signal_variance"] == pytest.approx(clean.astype(np.float64).var(), rel=1e-6)
    assert noise.var() == pytest.approx(clean.astype(np.float64).var() / 0.25, rel=0.02)
    assert abs(noise.mean()) < 0.02 * noise.std()


def test_round_trip_through_omlrelion_reconstruct(tmp_path):
    from omlrelion.pipeline.steps import ReconstructOptions, reconstruct
    from omlrelion.reconstruct.insert import CtfMode

    n = 32
    simulate("phantom", tmp_path / "sim", SimulateParams(n_particles=1500, box_size=n, shift_max_px=2.0, snr=0),
             seed=7)
    reconstruct(tmp_path / "sim.star", tmp_path / "map.mrc", ReconstructOptions(ctf=CtfMode(apply=True)),
                show_progress=False)
    volume, angpix = read_map(tmp_path / "map.mrc")
    assert angpix == pytest.approx(APIX)
    assert _sphere_correlation(volume, phantom_volume(n, APIX, 0)) > 0.95


@pytest.mark.relion
@pytest.mark.skipif(shutil.which("relion_reconstruct") is None, reason="relion_reconstruct not on the PATH")
def test_relion_reconstruct_reads_the_output(tmp_path):
    n = 32
    simulate("phantom", tmp_path / "sim", SimulateParams(n_particles=600, box_size=n, shift_max_px=2.0, snr=0),
             seed=8)
    done = subprocess.run(["relion_reconstruct", "--i", "sim.star", "--o", "relion.mrc", "--ctf"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    volume, _ = read_map(tmp_path / "relion.mrc")
    assert _sphere_correlation(volume, phantom_volume(n, APIX, 0)) > 0.9


@pytest.mark.gpu
def test_gpu_matches_cpu(tmp_path):
    from omlrelion.backend import Device

    params = SimulateParams(n_particles=50, box_size=32, shift_max_px=2.0, snr=0.5, bfactor=40.0)
    simulate("phantom", tmp_path / "cpu", params, seed=1)
    summary = simulate("phantom", tmp_path / "gpu", params, device=Device(0), seed=1)
    assert summary["device"]["spec"] == "gpu:0"
    assert (tmp_path / "cpu.star").read_text() == (tmp_path / "gpu.star").read_text().replace("@gpu.", "@cpu.")
    _, cpu = _images(tmp_path / "cpu.star")
    _, gpu = _images(tmp_path / "gpu.star")
    np.testing.assert_allclose(gpu, cpu, atol=1e-4 * np.abs(cpu).max())


def test_map_file_and_array_inputs(tmp_path):
    volume = phantom_volume(16, 1.5, 3)
    write_map(tmp_path / "in.mrc", volume, 1.5)
    simulate(tmp_path / "in.mrc", tmp_path / "file", SimulateParams(n_particles=5, snr=0), seed=1)
    simulate(volume, tmp_path / "array", SimulateParams(n_particles=5, snr=0, angpix=1.5), seed=1)
    assert read_particles(tmp_path / "file.star").optics[0].angpix == 1.5
    assert (tmp_path / "file.mrcs").read_bytes() == (tmp_path / "array.mrcs").read_bytes()
    assert not (tmp_path / "file_phantom.mrc").exists()
    with pytest.raises(InputError, match="--angpix"):
        simulate(volume, tmp_path / "x", SimulateParams(n_particles=5), seed=1)
    with pytest.raises(InputError, match="--box"):
        simulate(tmp_path / "in.mrc", tmp_path / "x", SimulateParams(n_particles=5, box_size=32), seed=1)


def test_failed_write_leaves_no_output(tmp_path, monkeypatch):
    def broken_write_star(path, blocks):
        raise InputError(f"{path}: disk full")

    monkeypatch.setattr(simulate_module, "write_star", broken_write_star)
    with pytest.raises(InputError, match="disk full"):
        simulate("phantom", tmp_path / "sim", SimulateParams(n_particles=3, box_size=16), seed=0)
    assert list(tmp_path.iterdir()) == []


def test_phantom_is_deterministic_smooth_compact_and_asymmetric():
    a = phantom_volume(48, APIX, seed=1)
    assert a.dtype == np.float32 and a.shape == (48, 48, 48)
    np.testing.assert_array_equal(a, phantom_volume(48, APIX, seed=1))
    assert not np.array_equal(a, phantom_volume(48, APIX, seed=2))
    assert a.max() == pytest.approx(1.0)
    c = np.arange(48) - 24
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    mass = a.sum()
    centre = [float((a * g).sum() / mass) for g in (x, y, z)]
    assert np.allclose(centre, 0, atol=1.0)
    support = r[a > 0.02 * a.max()]
    assert 0.25 * 48 < support.max() < 0.36 * 48
    assert a[r > 0.4 * 48].max() < 1e-3
    for flipped in (a[::-1], a[:, ::-1], a[:, :, ::-1], a.transpose(0, 2, 1)):
        assert np.corrcoef(a.ravel(), flipped.ravel())[0, 1] < 0.9
    with pytest.raises(InputError, match="--box"):
        phantom_volume(15, APIX)
