"""A small gold-standard refinement from a low-passed start recovers the simulated poses and detail."""

import numpy as np
import pytest

from omlrelion.ctf.ctf import CtfParams
from omlrelion.ctf.optics import Optics
from omlrelion.fourier.projector import volume_to_ftc
from omlrelion.geometry.euler import euler_to_matrix
from omlrelion.pipeline.phantom import phantom_volume
from omlrelion.pipeline.simulate import project_images
from omlrelion.reconstruct.fsc import fsc
from omlrelion.refine.autorefine import RefineOptions, refine


def _random_rotations(rng, m):
    q = rng.normal(size=(m, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
                     np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
                     np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1)], 1)


def _simulated(rng, m, *, snr: float, n: int = 32, angpix: float = 5.0, truth=None):
    """m particles of the phantom (or of `truth`) at random poses and shifts (+-1.5 px), CTF 1-3 um,
    noise at `snr`."""
    truth = phantom_volume(n, angpix, seed=5).astype(np.float64) if truth is None else truth
    rotations = _random_rotations(rng, m)
    shifts = rng.uniform(-1.5, 1.5, size=(m, 2))
    optics = Optics(angpix=angpix, voltage_kv=300, cs_mm=2.7, amp_contrast=0.1, box_size=n)
    defocus = rng.uniform(10000, 30000, m)
    ctf = CtfParams(defocus, defocus, np.zeros(m), np.zeros(m), np.zeros(m), np.ones(m))
    clean = project_images(volume_to_ftc(truth, pad=2.0), rotations, shifts, optics, ctf, pad=2.0, r_padded=n)
    images = clean + rng.normal(scale=clean.std() / np.sqrt(snr), size=clean.shape)
    halves = np.where(np.arange(m) % 2 == 0, 1, 2)
    return truth, rotations, shifts, optics, ctf, images, halves


def test_refinement_recovers_poses_and_a_consistent_resolution(rng):
    """200 particles of box 32 at SNR 2 from a start low-passed to 20 A, order 2 (15 degrees), no
    oversampling: poses within the grid's reach (the nearest grid orientation is 7.4 degrees off in
    the median for random poses), shifts to half a pixel, and a gold-standard resolution that the
    truth confirms (half map against truth FSC above 0.5 there, as FSC 0.5 between halves implies
    about 0.7)."""
    n = 32
    truth, rotations, shifts, optics, ctf, images, halves = _simulated(rng, 200, snr=2.0, n=n)
    opts = RefineOptions(healpix_order=2, offset_range_px=2.0, offset_step_px=1.0, ini_high_A=20.0, incr_size=3,
                         n_iter=3, batch=50, schedule=False)
    state = refine(images, ctf, optics, halves, truth, opts)
    found = euler_to_matrix(state.eulers)
    cos = (np.einsum("mij,mij->m", found, rotations) - 1) / 2
    errors = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    assert np.median(errors) < 15.0 and np.mean(errors < 30.0) > 0.8
    assert np.median(np.linalg.norm(state.shifts_px - shifts, axis=1)) <= 0.5
    last = state.history[-1]
    assert len(state.history) == 3 and last["current_size"] <= n
    assert fsc(state.maps[0], truth)[last["r_star"]] > 0.5
    assert fsc(state.maps[1], truth)[last["r_star"]] > 0.5
    assert 0.0 < last["ave_pmax"] <= 1.0


def test_schedule_goes_to_finer_local_searches_and_improves_the_poses(rng):
    """After an iteration without resolution gain the order goes up; from auto_local_order on each
    particle is searched around its pose (3 sigma, sigma = 2 fine steps): the poses get closer than
    the global order-2 grid allows."""
    truth, rotations, _, optics, ctf, images, halves = _simulated(rng, 100, snr=2.0)
    opts = RefineOptions(healpix_order=2, offset_range_px=2.0, offset_step_px=1.0, ini_high_A=20.0, incr_size=3,
                         n_iter=4, batch=50, auto_local_order=3, max_order=4, perturb=0.0)   # the floor is the fixed grid's
    state = refine(images, ctf, optics, halves, truth, opts)
    orders = [h["healpix_order"] for h in state.history]
    assert orders[0] == 2 and orders == sorted(orders) and orders[-1] > 2
    assert all(h["local"] == (h["healpix_order"] >= 3) for h in state.history)
    cos = (np.einsum("mij,mij->m", euler_to_matrix(state.eulers), rotations) - 1) / 2
    errors = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    assert np.median(errors) < 7.4          # the median distance to the nearest order-2 orientation


@pytest.mark.gpu
def test_refinement_on_gpu_finds_the_cpu_poses(rng):
    from omlrelion.backend import Device

    truth, _, _, optics, ctf, images, halves = _simulated(rng, 80, snr=4.0)
    opts = RefineOptions(healpix_order=2, offset_range_px=2.0, offset_step_px=1.0, ini_high_A=20.0, n_iter=1,
                         schedule=False, zero_mask=True, flatten_solvent=True, low_resol_join_A=40.0,
                         particle_diameter_A=140.0)
    cpu = refine(images, ctf, optics, halves, truth, opts)
    gpu = refine(images, ctf, optics, halves, truth, opts, device=Device(0))
    same = np.all(np.isclose(cpu.eulers, gpu.eulers), axis=1)
    assert same.mean() > 0.9                          # float32 may break near-ties differently
    rel = np.linalg.norm(gpu.maps[0] - cpu.maps[0]) / np.linalg.norm(cpu.maps[0])
    assert rel < 0.05


@pytest.mark.gpu
def test_images_kept_on_the_gpu_give_the_results_of_images_copied_per_batch(rng, monkeypatch):
    """`resident_images` copies the set to the GPU once; without room each batch is copied when used:
    the same computation on the same float32 values: the same poses, and maps equal up to the order
    of the GPU's atomic sums."""
    from omlrelion.backend import Device
    from omlrelion.refine import autorefine

    truth, _, _, optics, ctf, images, halves = _simulated(rng, 60, snr=4.0)
    images = images.astype(np.float32)
    opts = RefineOptions(healpix_order=1, offset_range_px=2.0, offset_step_px=1.0, ini_high_A=20.0, n_iter=1,
                         zero_mask=True, batch=25)
    resident = autorefine.resident_images(images, Device(0))
    assert type(resident).__module__.startswith("cupy")
    np.testing.assert_array_equal(resident.get(), images)
    kept = refine(images, ctf, optics, halves, truth, opts, device=Device(0))
    monkeypatch.setattr(autorefine, "resident_images", lambda images, device: images)
    copied = refine(images, ctf, optics, halves, truth, opts, device=Device(0))
    same = np.all(np.isclose(kept.eulers, copied.eulers), axis=1).mean()
    rel = np.linalg.norm(kept.maps[0] - copied.maps[0]) / np.linalg.norm(copied.maps[0])
    assert same > 0.95 and rel < 1e-4, (same, rel)


@pytest.mark.parametrize("oversampling", [0, 1])
def test_learned_direction_prior_weighs_global_searches(rng, oversampling):
    """RELION's pdf_direction (spec 3.5, 4.5): a direction without mass in the last E-step is not
    searched, a uniform prior changes nothing, and the E-step's mass per direction is what the
    M-step normalises into the next prior. refine() keeps one per half for the order it was learned at."""
    from omlrelion.refine.autorefine import direction_distribution, expect_particles, starting_sigma2
    from omlrelion.refine.sampling import Sampling
    from omlrelion.refine.schedule import Schedule

    truth, _, _, optics, ctf, images, halves = _simulated(rng, 40, snr=2.0)
    opts = RefineOptions(healpix_order=1, offset_range_px=1.0, offset_step_px=1.0, ini_high_A=20.0,
                         oversampling=oversampling, auto_local_order=9, particle_diameter_A=140.0)
    rows = np.arange(40)
    sampling = Sampling(1, 1.0, 1.0)
    n_dir = len(sampling.directions)
    kw = dict(schedule=Schedule(1, 1.0, 1.0), perturb=0.0, r_max=8, opts=opts)
    args = (images, ctf, optics, rows, truth, starting_sigma2(images, opts, angpix=optics.angpix), 10.0,
            np.zeros((40, 3)), np.zeros((40, 2)))
    free = expect_particles(*args, **kw)
    mass = free.noise["direction_mass"]
    # each particle's significant mass (at least the adaptive fraction 0.999 of it)
    assert mass.shape == (n_dir,) and 40 * 0.999 <= mass.sum() <= 40 + 1e-9
    uniform = expect_particles(*args, direction_prior=np.full(n_dir, 1.0 / n_dir), **kw)
    np.testing.assert_allclose(uniform.eulers, free.eulers)
    np.testing.assert_allclose(uniform.pmax, free.pmax, rtol=1e-9)
    allowed = np.zeros(n_dir)
    allowed[::3] = 1.0
    kept = expect_particles(*args, direction_prior=allowed / allowed.sum(), **kw)
    assert np.all(kept.noise["direction_mass"][allowed == 0] == 0)
    assert 40 * 0.999 <= kept.noise["direction_mass"].sum() <= 40 + 1e-9
    pdf = direction_distribution(mass)
    assert pdf.sum() == pytest.approx(1.0) and direction_distribution(np.zeros(n_dir)) is None
    state = refine(images, ctf, optics, halves, truth, RefineOptions(
        healpix_order=1, offset_range_px=1.0, offset_step_px=1.0, ini_high_A=20.0, n_iter=1, schedule=False,
        oversampling=oversampling))
    assert state.pdf_order == 1 and all(len(p) == n_dir and p.sum() == pytest.approx(1.0) for p in state.pdf_direction)


def test_coarse_size_follows_relion_and_the_first_pass_may_use_it(rng):
    from omlrelion.refine.autorefine import coarse_size

    # the spec's example: N 256, 1 A/px, D 200 A, order 2 -> 24 px in the first pass
    assert coarse_size(256, 1.0, 256, 2, 200.0) == 24
    assert coarse_size(256, 1.0, 20, 2, 200.0) == 20                    # never above the current size
    truth, rotations, _, optics, ctf, images, halves = _simulated(rng, 100, snr=2.0)
    opts = RefineOptions(healpix_order=2, offset_range_px=2.0, offset_step_px=1.0, ini_high_A=20.0, incr_size=3,
                         n_iter=2, batch=50, schedule=False, particle_diameter_A=300.0)
    state = refine(images, ctf, optics, halves, truth, opts)
    assert all(h["coarse_size"] < h["current_size"] for h in state.history)
    cos = (np.einsum("mij,mij->m", euler_to_matrix(state.eulers), rotations) - 1) / 2
    assert np.median(np.degrees(np.arccos(np.clip(cos, -1, 1)))) < 12.0


def test_auto_refine_converges_and_stops(rng):
    """--auto_refine: the loop stops on RELION's test (fine enough sampling, no resolution gain, no large
    pose changes) before its iteration limit, with the accuracy and changes recorded per iteration."""
    truth, rotations, _, optics, ctf, images, halves = _simulated(rng, 120, snr=2.0)
    opts = RefineOptions(healpix_order=1, offset_range_px=2.0, offset_step_px=1.0, ini_high_A=20.0, incr_size=3,
                         n_iter=20, auto_refine=True, auto_local_order=2, max_order=2, particle_diameter_A=140.0,
                         zero_mask=True, flatten_solvent=True)
    state = refine(images, ctf, optics, halves, truth, opts)
    assert state.converged and len(state.history) < 20
    assert state.schedule.fine_enough and state.schedule.iter_wo_gain >= 1
    assert all(h["acc_rot_deg"] < 999 for h in state.history[1:])
    cos = (np.einsum("mij,mij->m", euler_to_matrix(state.eulers), rotations) - 1) / 2
    assert np.median(np.degrees(np.arccos(np.clip(cos, -1, 1)))) < 15.0
