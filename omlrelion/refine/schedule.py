"""RELION's auto-refine schedule (spec `relion-refinement.md`, 5.4-5.7).

- `accuracy_estimates`: how far one Euler angle (or the offset along x or y) must move a particle's
  reference projection before its likelihood drops to 1% (sum_k CTF^2 |P - P'|^2 / (2 sigma2) >
  ln 100), averaged over particles: acc_rot (degrees) and acc_trans (pixels).
- `hidden_variable_changes`: mean angular distance between successive poses and the RMS per-axis
  offset change.
- `Schedule`: the counters and flags that decide when the sampling gets finer (5.5) and when the
  refinement has converged (5.7). It is global: both halves sample identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from omlrelion.backend import get_xp, to_numpy
from omlrelion.geometry.euler import euler_to_matrix
from omlrelion.refine.sampling import angular_step

LOG_LIKELIHOOD_DROP = math.log(100.0)          # 4.605: the likelihood ratio 1%
ANGLE_STEPS_DEG = np.concatenate([np.arange(0.05, 1.0, 0.05), np.arange(1.0, 5.0, 0.25), np.arange(5.0, 30.01, 1.0)])
SHIFT_STEPS_PX = np.concatenate([np.arange(0.1, 2.0, 0.1), np.arange(2.0, 10.01, 0.5)])


def accuracy_estimates(volume_ftc, eulers, ctf, noise_weight, pixels, *, box_size: int, pad: float, r_padded: int,
                       rng: np.random.Generator) -> tuple[float, float]:
    """(acc_rot in degrees, acc_trans in pixels) for particles at poses `eulers` (P, 3).

    ctf : (P, c, c//2+1) on the current window; noise_weight : 1/sigma2 on `pixels` (DC excluded).
    Per particle one randomly chosen Euler angle is increased over `ANGLE_STEPS_DEG` until the
    weighted squared difference passes ln 100 (30 degrees when it never does); the offset likewise
    along x or y over `SHIFT_STEPS_PX` (10 px at most)."""
    from omlrelion.fourier.projector import extract_slices

    xp = get_xp(volume_ftc)
    p = len(eulers)
    n = ctf.shape[-2]
    idx = xp.asarray(pixels.index)
    real = ctf.dtype
    w = xp.asarray(noise_weight, dtype=real)
    c2 = ctf.reshape(p, -1)[:, idx] ** 2 * w                                           # (P, K)
    axis = rng.integers(0, 3, size=p)
    steps = len(ANGLE_STEPS_DEG)
    moved = np.repeat(np.asarray(eulers, dtype=np.float64)[:, None, :], steps + 1, axis=1)   # (P, L+1, 3)
    moved[np.arange(p), 1:, axis] += ANGLE_STEPS_DEG[None, :]
    proj = extract_slices(volume_ftc, xp.asarray(euler_to_matrix(moved.reshape(-1, 3))), box_size=n, pad=pad,
                          r_padded=r_padded).reshape(p, steps + 1, -1)[:, :, idx]          # (P, L+1, K)
    d = 0.5 * (c2[:, None, :] * xp.abs(proj[:, 1:] - proj[:, :1]) ** 2).sum(axis=-1)    # (P, L)
    acc_rot = _first_past(to_numpy(d), ANGLE_STEPS_DEG)
    # a shift t multiplies P by exp(-2 pi i k.t / N): |P - P phi|^2 = |P|^2 |1 - phi|^2 = 2 |P|^2 (1 - cos)
    k = xp.asarray(np.where(rng.integers(0, 2, size=p)[:, None] == 0, pixels.kx[None], pixels.ky[None]), dtype=real)
    p2 = xp.abs(proj[:, 0]) ** 2 * c2                                                   # (P, K)
    t = xp.asarray(SHIFT_STEPS_PX, dtype=real)
    dt = (p2[:, None, :] * (1 - xp.cos((2 * math.pi / box_size) * t[None, :, None] * k[:, None, :]))).sum(axis=-1)
    acc_trans = _first_past(to_numpy(dt), SHIFT_STEPS_PX)
    return float(acc_rot.mean()), float(acc_trans.mean())


def _first_past(values: np.ndarray, steps: np.ndarray) -> np.ndarray:
    past = values > LOG_LIKELIHOOD_DROP
    first = np.where(past.any(axis=1), past.argmax(axis=1), len(steps) - 1)
    return steps[first]


def hidden_variable_changes(old_eulers, new_eulers, old_shifts_px, new_shifts_px, *, angpix: float,
                            symmetry=None):
    """(mean angle in degrees between corresponding rows of the old and new rotation matrices, averaged
    over the three axes and the particles; RMS per-axis offset change sqrt(sum |do|^2 / 2n) in A).

    symmetry : the point group's matrices (identity first); each particle's new pose is then compared
    in the symmetry-equivalent form A R closest to its old one (the same projections).
    """
    a, b = euler_to_matrix(np.asarray(old_eulers)), euler_to_matrix(np.asarray(new_eulers))
    mates = np.eye(3)[None] if symmetry is None else np.asarray(symmetry, dtype=np.float64)
    per_mate = []
    for r in mates:
        cos = np.clip(np.einsum("nij,nij->ni", a, b @ r), -1.0, 1.0)
        per_mate.append(np.degrees(np.arccos(cos)).mean(axis=1))
    angle = float(np.min(per_mate, axis=0).mean()) if len(a) else 0.0
    d = (np.asarray(new_shifts_px) - np.asarray(old_shifts_px)) * angpix
    offset = float(np.sqrt((d**2).sum() / (2 * max(len(d), 1))))
    return angle, offset


@dataclass
class Schedule:
    """Sampling and convergence state (shared by both halves)."""

    order: int
    offset_range_px: float
    offset_step_px: float
    local: bool = False
    iter_wo_gain: int = 0
    iter_wo_large_changes: int = 0
    smallest_angle_change: float = math.inf
    smallest_offset_change: float = math.inf
    fine_enough: bool = False
    acc_rot_deg: float = 999.0
    acc_trans_px: float = 999.0

    def fine_step_deg(self, ov: int) -> float:
        return angular_step(self.order + ov)

    def record_changes(self, angle_deg: float, offset_A: float, *, ov: int, angpix: float) -> None:
        """5.6: count an iteration without large pose changes (each change within 3% of the smallest
        so far, or below 40% of the fine step), then update the smallest values."""
        fine_offset_A = self.offset_step_px * angpix / 2**ov
        small_angle = 1.03 * angle_deg >= self.smallest_angle_change or angle_deg < 0.4 * self.fine_step_deg(ov)
        small_offset = 1.03 * offset_A >= self.smallest_offset_change or offset_A < 0.4 * fine_offset_A
        self.iter_wo_large_changes = self.iter_wo_large_changes + 1 if small_angle and small_offset else 0
        self.smallest_angle_change = min(self.smallest_angle_change, angle_deg)
        self.smallest_offset_change = min(self.smallest_offset_change, offset_A)

    def converged(self) -> bool:
        """5.7: fine enough sampling, and the last iteration gained no resolution and moved no poses much."""
        return self.fine_enough and self.iter_wo_gain >= 1 and self.iter_wo_large_changes >= 1

    def update_sampling(self, *, ov: int, angpix: float, offset_change_A: float, max_order: int,
                        auto_local_order: int) -> bool:
        """5.5: after an iteration without resolution gain and without large pose changes, either
        declare the sampling fine enough (fine step < 0.75 acc_rot, or `max_order` reached) or go one
        HEALPix order up with offsets from the translational accuracy. Returns True on a change."""
        if not (self.iter_wo_gain >= 1 and self.iter_wo_large_changes >= 1):
            return False
        if self.fine_step_deg(ov) < 0.75 * self.acc_rot_deg or self.order >= max_order:
            self.fine_enough = True
            return False
        self.order += 1
        step_A = min(1.5, 0.75 * self.acc_trans_px * angpix) * 2**ov          # coarse step, A
        old_step_A, old_range_A = self.offset_step_px * angpix, self.offset_range_px * angpix
        range_A = max(min(5 * offset_change_A, 1.3 * old_range_A), 1.5 * step_A)
        if range_A > 4 * step_A:
            range_A /= 2
            if range_A > 4 * step_A:
                step_A = range_A / 4
        if step_A <= old_step_A:
            self.offset_step_px, self.offset_range_px = step_A / angpix, range_A / angpix
        self.iter_wo_gain = self.iter_wo_large_changes = 0
        self.smallest_angle_change = self.smallest_offset_change = math.inf
        self.local = self.order >= auto_local_order
        return True


__all__ = ["Schedule", "accuracy_estimates", "hidden_variable_changes"]
