"""E-step: squared differences against a per-pixel loop, the significance rule, and pose recovery."""

import numpy as np
import pytest

from omlrelion.geometry.euler import euler_to_matrix
from omlrelion.refine.expectation import (
    HalfPlanePixels,
    expectation,
    offset_log_prior,
    significant_threshold,
    squared_differences,
)


def test_squared_differences_equal_the_definition(rng):
    n, n_box = 8, 16
    pix = HalfPlanePixels.of(n)
    shape = (n, n // 2 + 1)
    proj = rng.normal(size=(3, *shape)) + 1j * rng.normal(size=(3, *shape))
    img = rng.normal(size=(2, *shape)) + 1j * rng.normal(size=(2, *shape))
    ctf = rng.uniform(-1, 1, size=(2, *shape))
    w = rng.uniform(0.5, 2.0, size=len(pix.index))
    shifts = np.array([[0.0, 0.0], [1.5, -2.0], [-3.0, 0.5]])
    d2 = squared_differences(proj, img, ctf, w, shifts, pix, box_size=n_box)
    assert d2.shape == (2, 3, 3)
    for b in range(2):
        for t, (tx, ty) in enumerate(shifts):
            for r in range(3):
                total = 0.0
                for j, flat in enumerate(pix.index):
                    iy, ix = divmod(int(flat), n // 2 + 1)
                    phi = np.exp(-2j * np.pi * (pix.kx[j] * tx + pix.ky[j] * ty) / n_box)
                    total += w[j] / 2 * abs(ctf[b, iy, ix] * proj[r, iy, ix] - img[b, iy, ix] * phi) ** 2
                assert d2[b, t, r] == pytest.approx(total, rel=1e-12)


def test_half_plane_pixels_drop_dc_and_the_redundant_half():
    pix = HalfPlanePixels.of(6)
    assert 0 not in pix.index                                  # DC
    assert not np.any((pix.kx == 0) & (pix.ky < 0))
    assert np.all(np.hypot(pix.kx, pix.ky) < 4)


def test_significant_threshold_rule():
    w = np.array([[0.05, 0.5, 0.15, 0.3], [1.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(significant_threshold(w, 0.9), [0.15, 1.0])
    np.testing.assert_allclose(significant_threshold(w, 0.999), [0.05, 1.0])


def test_offset_prior_is_centred_on_the_box_centre():
    lp = offset_log_prior(np.array([[2.0, 0.0]]), np.array([[-2.0, 0.0], [0.0, 0.0]]), angpix=2.0,
                          sigma_offset_A=10.0)
    np.testing.assert_allclose(lp, [[0.0, -(4 * 4) / 200]])


def test_pose_recovery_on_simulated_particles(rng):
    """Noisy CTF-modulated projections of a phantom at grid orientations and shifts: the E-step with
    the true map finds each particle's orientation and shift."""
    from omlrelion.ctf.ctf import CtfParams, ctf_2d
    from omlrelion.ctf.optics import Optics
    from omlrelion.fourier.layout import rfft2_centred
    from omlrelion.fourier.projector import extract_slices, volume_to_ftc
    from omlrelion.pipeline.phantom import phantom_volume
    from omlrelion.pipeline.simulate import project_images
    from omlrelion.refine.sampling import Sampling

    n, angpix, m = 32, 4.0, 12
    vol = phantom_volume(n, angpix, seed=3)
    vft = volume_to_ftc(vol.astype(np.float64), pad=2.0)
    r_padded = 2 * (n // 2)
    sampling = Sampling(order=1, offset_range_px=2.0, offset_step_px=1.0)
    eulers, shifts = sampling.eulers(), sampling.shifts
    truth_r = rng.choice(len(eulers), m, replace=False)
    truth_t = rng.choice(len(shifts), m)
    optics = Optics(angpix=angpix, voltage_kv=300, cs_mm=2.7, amp_contrast=0.1, box_size=n)
    ctf = CtfParams(*(np.full(m, v) for v in (15000.0, 14000.0, 30.0, 0.0, 0.0, 1.0)))
    clean = project_images(vft, euler_to_matrix(eulers[truth_r]), shifts[truth_t], optics, ctf, pad=2.0,
                           r_padded=r_padded)
    sigma = clean.std() * 1.0                                  # SNR about 1
    images = rfft2_centred(clean + rng.normal(scale=sigma, size=clean.shape))
    pix = HalfPlanePixels.of(n)
    noise_weight = np.full(len(pix.index), 1.0 / (sigma**2 / (2 * n * n)))   # sigma2 per component, FT scale
    proj = extract_slices(vft, euler_to_matrix(eulers), box_size=n, pad=2.0, r_padded=r_padded)
    ctf_arr = ctf_2d(optics, ctf, dtype=np.float64)
    prior = offset_log_prior(np.zeros((m, 2)), shifts, angpix=angpix, sigma_offset_A=20.0)[:, :, None]
    out = expectation(proj, images, ctf_arr, noise_weight, shifts, pix, box_size=n, log_prior=prior)
    np.testing.assert_array_equal(out.best_orientation, truth_r)
    np.testing.assert_array_equal(out.best_shift, truth_t)
    assert np.all(out.pmax > 0.5) and np.all(out.n_significant >= 1)
    post = out.posterior.sum(axis=(1, 2))
    assert np.all((post > 0.99) & (post <= 1 + 1e-12))


@pytest.mark.gpu
def test_squared_differences_gpu_float32_vs_cpu_float64(rng):
    import cupy as cp

    n = 32
    pix = HalfPlanePixels.of(n)
    shape = (n, n // 2 + 1)
    proj = rng.normal(size=(50, *shape)) + 1j * rng.normal(size=(50, *shape))
    img = proj[:4] * 0.8 + 0.3 * (rng.normal(size=(4, *shape)) + 1j * rng.normal(size=(4, *shape)))
    ctf = rng.uniform(-1, 1, size=(4, *shape))
    w = rng.uniform(0.5, 2.0, size=len(pix.index))
    shifts = rng.uniform(-3, 3, size=(9, 2))
    ref = squared_differences(proj, img, ctf, w, shifts, pix, box_size=n)
    gpu = squared_differences(cp.asarray(proj.astype(np.complex64)), cp.asarray(img.astype(np.complex64)),
                              cp.asarray(ctf.astype(np.float32)), cp.asarray(w.astype(np.float32)), shifts, pix,
                              box_size=n)
    assert np.max(np.abs(cp.asnumpy(gpu) - ref)) / np.max(np.abs(ref)) <= 1e-4
    out = expectation(cp.asarray(proj.astype(np.complex64)), cp.asarray(img.astype(np.complex64)),
                      cp.asarray(ctf.astype(np.float32)), cp.asarray(w.astype(np.float32)), shifts, pix, box_size=n)
    cpu = expectation(proj, img, ctf, w, shifts, pix, box_size=n)
    np.testing.assert_array_equal(out.best_orientation, cpu.best_orientation)


def test_fine_pass_only_evaluates_children_of_significant_pairs(rng):
    from omlrelion.fourier.projector import volume_to_ftc
    from omlrelion.pipeline.phantom import phantom_volume
    from omlrelion.refine.expectation import fine_pass
    from omlrelion.refine.sampling import Sampling

    n = 24
    vft = volume_to_ftc(phantom_volume(n, 6.0, seed=2).astype(np.float64), pad=2.0)
    s = Sampling(1, 1.0, 1.0)
    pix = HalfPlanePixels.of(n)
    image = rng.normal(size=(n, n // 2 + 1)) + 1j * rng.normal(size=(n, n // 2 + 1))
    coarse = np.zeros((len(s.shifts), len(s.eulers())))
    coarse[0, 3], coarse[2, 3], coarse[1, 40] = 0.5, 0.3, 0.2
    f = fine_pass(vft, image, np.ones((n, n // 2 + 1)), np.ones(len(pix.index)), pix, s, coarse, s.shifts,
                  box_size=n, pad=2.0, r_padded=n)
    assert f.eulers.shape == (16, 3) and f.shifts_px.shape == (12, 2)        # 2 orientations x 8, 3 shifts x 4
    post = np.asarray(f.posterior)
    # orientation 40 was significant only with shift 1: its children get no mass with shifts 0 and 2
    assert not post[:4, 8:].any() and not post[8:, 8:].any()
    assert post.sum() == pytest.approx(1.0, abs=2e-3) and 1 <= f.n_significant <= post.size
    assert 0 < f.pmax <= 1
