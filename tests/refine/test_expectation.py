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
    from omlrelion.refine.sampling import Sampling, oversampled_orientations, oversampled_shifts

    n = 24
    vft = volume_to_ftc(phantom_volume(n, 6.0, seed=2).astype(np.float64), pad=2.0)
    s = Sampling(1, 1.0, 1.0)
    pix = HalfPlanePixels.of(n)
    image = rng.normal(size=(n, n // 2 + 1)) + 1j * rng.normal(size=(n, n // 2 + 1))
    coarse = np.zeros((len(s.shifts), len(s.eulers())))
    coarse[0, 3], coarse[2, 3], coarse[1, 40] = 0.5, 0.3, 0.2
    f = fine_pass(vft, image[None], np.ones((1, n, n // 2 + 1)), np.ones(len(pix.index)), pix, s, coarse[None],
                  s.shifts, box_size=n, pad=2.0, r_padded=n)
    assert f.eulers.shape == (16, 3) and f.shifts_px.shape == (12, 2)        # 2 orientations x 8, 3 shifts x 4
    assert f.posterior.shape == (1, 12, 16)                                   # the particle's own points
    children = {i: {tuple(np.round(e, 6)) for e in oversampled_orientations(s, [i])[0]} for i in (3, 40)}
    shifts = {i: {tuple(np.round(t, 6)) for t in oversampled_shifts(s.shifts[[i]], 1.0)[0]} for i in (0, 1, 2)}
    points = f.points(0)
    # orientation 40 was significant only with shift 1: its children get no mass with shifts 0 and 2
    assert all((e in children[3] and t in shifts[0] | shifts[2]) or (e in children[40] and t in shifts[1])
               for t, e in points)
    assert sum(points.values()) == pytest.approx(1.0, abs=2e-3) and f.n_significant[0] == len(points)
    assert 0 < f.pmax[0] <= 1


def test_fine_pass_of_a_batch_equals_each_particle_alone(rng):
    """The batch shares projections (the union of its particles' children); each particle's posterior,
    best pose and Pmax must not depend on its batch-mates."""
    from omlrelion.fourier.projector import volume_to_ftc
    from omlrelion.pipeline.phantom import phantom_volume
    from omlrelion.refine.expectation import fine_pass
    from omlrelion.refine.sampling import Sampling

    n = 24
    vft = volume_to_ftc(phantom_volume(n, 6.0, seed=2).astype(np.float64), pad=2.0)
    s = Sampling(1, 1.0, 1.0)
    pix = HalfPlanePixels.of(n)
    b, t, r = 3, len(s.shifts), len(s.eulers())
    images = rng.normal(size=(b, n, n // 2 + 1)) + 1j * rng.normal(size=(b, n, n // 2 + 1))
    ctf = rng.uniform(0.2, 1.0, size=(b, n, n // 2 + 1))
    coarse = np.zeros((b, t, r))
    coarse[0, 0, 3], coarse[0, 2, 3], coarse[1, 1, 40], coarse[1, 4, 41], coarse[2, 3, 100] = 0.5, 0.3, 0.2, 0.6, 1
    prior_t = rng.normal(size=(b, t))
    kw = dict(box_size=n, pad=2.0, r_padded=n)
    together = fine_pass(vft, images, ctf, np.full(len(pix.index), 0.3), pix, s, coarse, s.shifts,
                         log_prior_t=prior_t, **kw)
    for i in range(b):
        alone = fine_pass(vft, images[i:i + 1], ctf[i:i + 1], np.full(len(pix.index), 0.3), pix, s, coarse[i:i + 1],
                          s.shifts, log_prior_t=prior_t[i:i + 1], **kw)
        np.testing.assert_allclose(together.best_euler[i], alone.best_euler[0])
        np.testing.assert_allclose(together.best_shift[i], alone.best_shift[0])
        assert together.pmax[i] == pytest.approx(alone.pmax[0], rel=1e-10)
        assert together.n_significant[i] == alone.n_significant[0]
        # the same posterior mass on the same (orientation, shift) points
        mine, ref = together.points(i), alone.points(0)
        assert mine.keys() == ref.keys()
        assert all(mine[k] == pytest.approx(ref[k], rel=1e-10) for k in ref)


def _brute_force_fine_pass(vft, image, ctf, w, pix, s, coarse, prior_t, prior_r, n):
    """One particle's second pass by definition: every child pair of its significant coarse pairs,
    D2 from `squared_differences`, weights with the inherited priors, RELION's threshold."""
    from omlrelion.fourier.projector import extract_slices
    from omlrelion.refine.sampling import oversampled_orientations, oversampled_shifts

    points = []
    for t, r in zip(*np.nonzero(coarse)):
        for e in oversampled_orientations(s, [r])[0]:
            for sh in oversampled_shifts(s.shifts[[t]], s.offset_step_px)[0]:
                proj = extract_slices(vft, euler_to_matrix(e[None]), box_size=n, pad=2.0, r_padded=n)
                d2 = squared_differences(proj, image[None], ctf[None], w, sh[None], pix, box_size=n)[0, 0, 0]
                points.append((tuple(np.round(sh, 6)), tuple(np.round(e, 6)), -d2 + prior_t[t] + prior_r[r]))
    logw = np.array([p[2] for p in points])
    wt = np.exp(logw - logw.max())
    theta = significant_threshold(wt[None], 0.999)[0]
    keep = wt >= theta
    post = {(p[0], p[1]): v for p, v, k in zip(points, wt / wt.sum(), keep) if k}
    return post, wt.max() / wt.sum()


def _random_batch(rng, pix, b, t, r, *, amplitude: float, pairs: int, among=None):
    """Random image transforms, CTFs and noise weights of b particles and a coarse posterior (b, t, r)
    with 1 to `pairs` significant (shift, orientation) pairs each (orientations from `among`)."""
    n = pix.n
    images = amplitude * (rng.normal(size=(b, n, n // 2 + 1)) + 1j * rng.normal(size=(b, n, n // 2 + 1)))
    ctf = rng.uniform(0.2, 1.0, size=(b, n, n // 2 + 1))
    w = rng.uniform(0.5, 1.5, size=len(pix.index))
    coarse = np.zeros((b, t, r))
    for i in range(b):
        k = 1 + i % pairs
        value = rng.uniform(0.1, 1, k)
        shifts = rng.integers(0, t, k)
        coarse[i, shifts, rng.integers(0, r, k) if among is None else rng.choice(among, k)] = value
    return images, ctf, w, coarse


@pytest.mark.parametrize("max_elements", [2**26, 1])
def test_fine_pass_equals_the_definition_particle_by_particle(rng, max_elements):
    """Each particle's posterior, Pmax and best point against a brute-force evaluation of its own
    points, with shift and orientation priors; max_elements 1 puts every particle in its own part."""
    from omlrelion.fourier.projector import volume_to_ftc
    from omlrelion.pipeline.phantom import phantom_volume
    from omlrelion.refine.expectation import fine_pass_parts
    from omlrelion.refine.sampling import Sampling

    n = 16
    vft = volume_to_ftc(phantom_volume(n, 4.0, seed=3).astype(np.float64), pad=2.0)
    s = Sampling(1, 1.0, 1.0)
    pix = HalfPlanePixels.of(n)
    b, t, r = 5, len(s.shifts), len(s.eulers())
    # 1 to 4 significant pairs on a few shared orientations
    images, ctf, w, coarse = _random_batch(rng, pix, b, t, r, amplitude=0.01, pairs=4, among=[2, 7, 30, 31, 90])
    prior_t, prior_r = rng.normal(size=(b, t)), rng.normal(size=(b, r))
    parts = list(fine_pass_parts(vft, images, ctf, w, pix, s, coarse, s.shifts, max_elements=max_elements,
                                 box_size=n, pad=2.0, r_padded=n, log_prior_t=prior_t, log_prior_r=prior_r))
    assert sorted(np.concatenate([rows for rows, _ in parts]).tolist()) == list(range(b))
    assert (len(parts) == b) == (max_elements == 1)
    for rows, f in parts:
        for j, i in enumerate(rows):
            want, pmax = _brute_force_fine_pass(vft, images[i], ctf[i], w, pix, s, coarse[i], prior_t[i],
                                                prior_r[i], n)
            got = f.points(j)
            assert got.keys() == want.keys()
            assert all(got[k] == pytest.approx(want[k], rel=1e-9) for k in want)
            assert f.pmax[j] == pytest.approx(pmax, rel=1e-9) and f.n_significant[j] == len(want)
            best = max(want, key=want.get)
            np.testing.assert_allclose(f.best_shift[j], best[0], atol=1e-6)
            np.testing.assert_allclose(f.best_euler[j], best[1], atol=1e-6)


@pytest.mark.gpu
def test_fine_pass_on_gpu_float32_matches_cpu_float64(rng):
    import cupy as cp

    from omlrelion.fourier.projector import volume_to_ftc
    from omlrelion.pipeline.phantom import phantom_volume
    from omlrelion.refine.expectation import fine_pass_parts
    from omlrelion.refine.sampling import Sampling

    n = 24
    vol = phantom_volume(n, 6.0, seed=2).astype(np.float64)
    s = Sampling(1, 1.0, 1.0)
    pix = HalfPlanePixels.of(n)
    b, t, r = 40, len(s.shifts), len(s.eulers())
    images, ctf, w, coarse = _random_batch(rng, pix, b, t, r, amplitude=0.05, pairs=6)
    prior_t = rng.normal(size=(b, t))
    kw = dict(box_size=n, pad=2.0, r_padded=n, log_prior_t=prior_t, max_elements=2**16)
    cpu = {int(i): (f, j) for rows, f in fine_pass_parts(volume_to_ftc(vol, pad=2.0), images, ctf, w, pix, s,
                                                          coarse, s.shifts, **kw) for j, i in enumerate(rows)}
    gpu = fine_pass_parts(volume_to_ftc(cp.asarray(vol, dtype=np.float32), pad=2.0),
                          cp.asarray(images.astype(np.complex64)), cp.asarray(ctf.astype(np.float32)),
                          cp.asarray(w.astype(np.float32)), pix, s, cp.asarray(coarse), s.shifts, **kw)
    seen = 0
    for rows, f in gpu:
        for j, i in enumerate(rows):
            ref, k = cpu[int(i)]
            np.testing.assert_allclose(f.best_euler[j], ref.best_euler[k])
            np.testing.assert_allclose(f.best_shift[j], ref.best_shift[k])
            assert f.pmax[j] == pytest.approx(ref.pmax[k], rel=1e-3)
            mine, want = f.points(j), ref.points(k)
            assert sum(abs(mine.get(key, 0.0) - want.get(key, 0.0)) for key in mine.keys() | want.keys()) < 1e-3
            seen += 1
    assert seen == b


def test_accumulate_noise_sums_are_the_posterior_weighted_residuals(rng):
    """Brute force: sum over (b, t, r) of gamma |CTF P_r - X_b phi_t|^2 per shell, and the batch's slices
    equal the particles' slices added one by one."""
    from omlrelion.geometry.grids import PaddedGrid
    from omlrelion.refine.maximization import accumulate, phase_ramps, shell_index

    n, b, t, r = 16, 3, 4, 5
    grid = PaddedGrid(n, 2.0, n // 2)
    images = rng.normal(size=(b, n, n // 2 + 1)) + 1j * rng.normal(size=(b, n, n // 2 + 1))
    ctf = rng.uniform(-1, 1, size=(b, n, n // 2 + 1))
    proj = rng.normal(size=(r, n, n // 2 + 1)) + 1j * rng.normal(size=(r, n, n // 2 + 1))
    post = rng.uniform(size=(b, t, r)) * (rng.uniform(size=(b, t, r)) < 0.4)
    eulers = rng.uniform(-180, 180, size=(r, 3))
    shifts = rng.uniform(-2, 2, size=(t, 2))
    inv = rng.uniform(0.5, 2.0, size=(n, n // 2 + 1))
    kw = dict(box_size=n, pad=2.0, r_padded=grid.r_padded, projections=proj, angpix=1.5)
    data, weight = np.zeros(grid.shape, complex), np.zeros(grid.shape)
    sums = accumulate(data, weight, images, ctf, inv, post, eulers, shifts, old_offsets_px=np.ones((b, 2)), **kw)
    phi = phase_ramps(shifts, n, n, np, complex)
    shells = shell_index(n)
    ky = np.where(np.arange(n) <= n // 2, np.arange(n), np.arange(n) - n)[:, None] * np.ones((1, n // 2 + 1))
    use = ~((np.arange(n // 2 + 1)[None, :] == 0) & (ky < 0)) & (shells < n // 2 + 1)
    want = np.zeros(n // 2 + 1)
    for i in range(b):
        for j in range(t):
            for k in range(r):
                res = post[i, j, k] * np.abs(ctf[i] * proj[k] - images[i] * phi[j]) ** 2
                want += np.bincount(shells[use], weights=res[use], minlength=n // 2 + 1)[:n // 2 + 1]
    np.testing.assert_allclose(sums["sigma2_sum"], want, rtol=1e-10)
    assert sums["gamma_sum"] == pytest.approx(post.sum())
    assert sums["offset_sum"] == pytest.approx(
        sum(post[i, j].sum() * ((1 + shifts[j]) ** 2).sum() for i in range(b) for j in range(t)) * 1.5**2)
    d1, w1 = np.zeros(grid.shape, complex), np.zeros(grid.shape)
    for i in range(b):
        accumulate(d1, w1, images[i:i + 1], ctf[i:i + 1], inv, post[i:i + 1], eulers, shifts, **kw)
    np.testing.assert_allclose(data, d1, atol=1e-12)
    np.testing.assert_allclose(weight, w1, atol=1e-12)


def test_significant_threshold_equals_a_sort_of_whole_rows(rng):
    """Sorting only the weights that can be significant gives the threshold of a full sort, for peaked,
    flat, single-point and float32 rows."""
    def full_sort(w, fraction):
        s = -np.sort(-w, axis=1)
        csum = np.cumsum(s, axis=1)
        k = np.minimum((csum < fraction * csum[:, -1:]).sum(axis=1), w.shape[1] - 1)
        return np.take_along_axis(s, k[:, None], axis=1)[:, 0]

    peaked = np.exp(-rng.uniform(0, 60, size=(7, 5000)))
    flat = np.ones((2, 300))
    single = np.zeros((2, 400))
    single[0, 17], single[1, [3, 9]] = 1.0, (0.4, 0.6)
    for w in (peaked, flat, single, peaked.astype(np.float32), np.exp(-rng.uniform(0, 3, size=(4, 1000)))):
        for fraction in (0.999, 0.9, 0.5):
            np.testing.assert_array_equal(significant_threshold(w, fraction), full_sort(w, fraction))
