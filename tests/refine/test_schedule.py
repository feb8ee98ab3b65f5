"""RELION's auto-refine schedule: accuracy estimates, pose-change monitor, sampling updates, convergence."""

import math

import numpy as np
import pytest

from omlrelion.fourier.projector import volume_to_ftc
from omlrelion.geometry.grids import PaddedGrid
from omlrelion.pipeline.phantom import phantom_volume
from omlrelion.refine.expectation import HalfPlanePixels
from omlrelion.refine.schedule import Schedule, accuracy_estimates, hidden_variable_changes


def _accuracy(noise_scale: float, xp=np, seed: int = 3):
    n, r_max = 32, 12
    vft = volume_to_ftc(phantom_volume(n, 5.0, seed=2).astype(np.float64), pad=2.0, r_max=r_max)
    pix = HalfPlanePixels.of(2 * r_max)
    rng = np.random.default_rng(0)
    eulers = np.column_stack([rng.uniform(-180, 180, 20), rng.uniform(10, 170, 20), rng.uniform(-180, 180, 20)])
    ctf = np.ones((20, 2 * r_max, r_max + 1))
    w = np.full(len(pix.index), noise_scale)
    grid = PaddedGrid(n, 2.0, r_max)
    return accuracy_estimates(xp.asarray(vft), eulers, xp.asarray(ctf), xp.asarray(w), pix, box_size=n, pad=2.0,
                              r_padded=grid.r_padded, rng=np.random.default_rng(seed))


def test_accuracy_gets_finer_as_the_noise_drops():
    """Less noise (larger 1/sigma2) makes a smaller pose change detectable; far too much noise gives the caps."""
    coarse = _accuracy(1e3)
    fine = _accuracy(1e5)
    assert fine[0] < coarse[0] and fine[1] < coarse[1]
    assert _accuracy(1e-12) == pytest.approx((30.0, 10.0))


def test_accuracy_steps_are_the_first_past_a_one_percent_likelihood():
    """Brute force for one particle: move the drawn Euler angle (or shift along the drawn axis) step by
    step, project (or phase-shift) anew and stop at the first weighted difference above ln 100."""
    from omlrelion.fourier.projector import extract_slices
    from omlrelion.geometry.euler import euler_to_matrix
    from omlrelion.refine.maximization import phase_ramps
    from omlrelion.refine.schedule import ANGLE_STEPS_DEG, LOG_LIKELIHOOD_DROP, SHIFT_STEPS_PX

    n, r_max, c, w = 32, 12, 24, 3e4
    vft = volume_to_ftc(phantom_volume(n, 5.0, seed=2).astype(np.float64), pad=2.0, r_max=r_max)
    pix = HalfPlanePixels.of(c)
    euler = np.array([[30.0, 70.0, -40.0]])
    ctf = np.full((1, c, c // 2 + 1), 0.8)
    r_padded = PaddedGrid(n, 2.0, r_max).r_padded
    got = accuracy_estimates(vft, euler, ctf, np.full(len(pix.index), w), pix, box_size=n, pad=2.0,
                             r_padded=r_padded, rng=np.random.default_rng(11))
    draw = np.random.default_rng(11)
    axis, shift_axis = draw.integers(0, 3, size=1)[0], draw.integers(0, 2, size=1)[0]

    def drop(a, b):
        d = (a - b).ravel()[pix.index]
        return 0.5 * w * 0.64 * (np.abs(d) ** 2).sum()

    p0 = extract_slices(vft, euler_to_matrix(euler), box_size=c, pad=2.0, r_padded=r_padded)[0]
    want_rot = 30.0
    for step in ANGLE_STEPS_DEG:
        moved = euler.copy()
        moved[0, axis] += step
        if drop(extract_slices(vft, euler_to_matrix(moved), box_size=c, pad=2.0, r_padded=r_padded)[0], p0) \
                > LOG_LIKELIHOOD_DROP:
            want_rot = step
            break
    want_trans = 10.0
    for step in SHIFT_STEPS_PX:
        t = np.zeros((1, 2))
        t[0, shift_axis] = step
        if drop(p0 * phase_ramps(t, c, n, np, complex)[0], p0) > LOG_LIKELIHOOD_DROP:
            want_trans = step
            break
    assert want_rot < 30.0 and want_trans < 10.0
    assert got == pytest.approx((want_rot, want_trans))


@pytest.mark.gpu
def test_accuracy_on_gpu_equals_cpu():
    cp = pytest.importorskip("cupy")
    assert _accuracy(1e4, xp=cp) == pytest.approx(_accuracy(1e4), rel=0.05)


def test_hidden_variable_changes():
    eulers = np.array([[10.0, 40.0, 0.0], [0.0, 90.0, 30.0]])
    angle, offset = hidden_variable_changes(eulers, eulers, np.zeros((2, 2)), np.zeros((2, 2)), angpix=2.0)
    assert angle == pytest.approx(0.0, abs=1e-6) and offset == 0.0
    moved = eulers.copy()
    moved[:, 2] += 6.0                                  # psi about the z axis: rows x and y turn 6 degrees, z stays
    angle, offset = hidden_variable_changes(eulers, moved, np.zeros((2, 2)), np.full((2, 2), 1.0), angpix=2.0)
    assert angle == pytest.approx(4.0, abs=1e-6)
    assert offset == pytest.approx(math.sqrt(2 * 2 * 4.0 / 4))      # sqrt(sum |do|^2 / 2n) in A


def test_sampling_goes_finer_only_after_no_gain_and_small_changes():
    s = Schedule(order=2, offset_range_px=5.0, offset_step_px=2.0, acc_rot_deg=3.0, acc_trans_px=1.0)
    assert not s.update_sampling(ov=1, angpix=2.0, offset_change_A=1.0, max_order=8, auto_local_order=4)
    s.iter_wo_gain = 1
    assert not s.update_sampling(ov=1, angpix=2.0, offset_change_A=1.0, max_order=8, auto_local_order=4)
    s.iter_wo_large_changes = 1
    assert s.update_sampling(ov=1, angpix=2.0, offset_change_A=1.0, max_order=8, auto_local_order=4)
    # step' = min(1.5, 0.75 * 2 A) * 2 = 3 A; range' = max(min(5 * 1, 1.3 * 10), 1.5 * 3) = 5 A (<= 4 steps)
    assert s.order == 3 and not s.local
    assert s.offset_step_px == pytest.approx(1.5) and s.offset_range_px == pytest.approx(2.5)
    assert s.iter_wo_gain == 0 and s.iter_wo_large_changes == 0 and math.isinf(s.smallest_angle_change)
    s.iter_wo_gain = s.iter_wo_large_changes = 1
    assert s.update_sampling(ov=1, angpix=2.0, offset_change_A=1.0, max_order=8, auto_local_order=4)
    assert s.order == 4 and s.local
    # the fine step of order 4 (1.875 deg) is below 0.75 * acc_rot = 2.25: fine enough, no change
    s.iter_wo_gain = s.iter_wo_large_changes = 1
    assert not s.update_sampling(ov=1, angpix=2.0, offset_change_A=1.0, max_order=8, auto_local_order=4)
    assert s.fine_enough and s.order == 4 and s.converged()


def test_pose_change_counter():
    s = Schedule(order=2, offset_range_px=5.0, offset_step_px=2.0)
    s.record_changes(20.0, 5.0, ov=1, angpix=1.0)             # first iteration: large by definition
    assert s.iter_wo_large_changes == 0
    s.record_changes(10.0, 3.0, ov=1, angpix=1.0)             # still dropping by more than 3%
    assert s.iter_wo_large_changes == 0
    s.record_changes(9.9, 2.95, ov=1, angpix=1.0)             # within 3% of the smallest so far
    assert s.iter_wo_large_changes == 1
    s.record_changes(1.0, 0.3, ov=1, angpix=1.0)              # below 40% of the fine steps (3 deg, 1 A)
    assert s.iter_wo_large_changes == 2


def test_r_max_grows_by_an_eighth_of_the_box_while_the_fsc_is_high_at_the_edge():
    """RELION (ml_optimiser): after every iteration, FSC > 0.2 at shell current_size/2 - 1; the next
    r_max is then r* + round(N/8) instead of r* + incr_size when <Pmax> > 0.1, never past Nyquist.
    The test is made again every iteration (a low FSC at the edge clears it)."""
    from omlrelion.refine.autorefine import high_fsc_at_limit, next_r_max

    curve = np.concatenate([np.ones(10), np.linspace(0.9, 0.0, 23)])       # 33 shells of a box of 64
    assert high_fsc_at_limit(curve, 20)                                    # shell 9: 1.0
    assert not high_fsc_at_limit(curve, 60)                                # shell 29: below 0.2
    assert not high_fsc_at_limit(curve, 100)                               # past the curve
    assert next_r_max(12, 10, 64) == 22
    assert next_r_max(12, 10, 64, high_fsc_at_limit=True, mean_pmax=0.5) == 20
    assert next_r_max(12, 10, 64, high_fsc_at_limit=True, mean_pmax=0.05) == 22
    assert next_r_max(30, 10, 64) == 32
