"""Relocalize fusion: equals an independent median/average; samples taken in motion are rejected."""

from __future__ import annotations

import numpy as np
import pytest

from apr_localizer import geometry
from apr_localizer.relocalize import Collector, MotionLimits, Sample, fuse, odom_speed, widen_covariance
from apr_localizer.tf_buffer import TfBuffer

S = 1_000_000_000


def _quat(yaw: float) -> np.ndarray:
    return np.array([np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)])


def test_fuse_is_the_median_position_and_the_average_quaternion_of_the_majority_scene():
    rng = np.random.default_rng(0)
    poses = [np.r_[rng.normal(size=3), _quat(y)] for y in (0.1, 0.12, 0.15, 0.2, 0.11)]
    samples = [Sample(p, "lab", 0.9, (i + 1) * S) for i, p in enumerate(poses)]
    samples.append(Sample(np.r_[50.0, 50.0, 50.0, _quat(2.0)], "office", 0.99, 99 * S))  # outvoted scene
    fused = fuse(samples)
    stack = np.stack(poses)
    np.testing.assert_allclose(fused.pose[:3], np.median(stack[:, :3], axis=0), atol=1e-12)
    yaw = 2 * np.arctan2(fused.pose[6], fused.pose[3])
    assert yaw == pytest.approx(np.mean([0.1, 0.12, 0.15, 0.2, 0.11]), abs=1e-3)
    assert fused.scene == "lab" and fused.n_used == 5 and fused.stamp_ns == 5 * S
    pos_err, _ = geometry.pose_errors(stack, fused.pose[None])
    assert fused.position_spread_m == pytest.approx(pos_err.max())
    cov = widen_covariance(np.diag([1e-4] * 6).reshape(36), fused).reshape(6, 6)
    assert cov[0, 0] == pytest.approx(fused.position_spread_m**2)
    with pytest.raises(ValueError):
        fuse([])


def test_odom_speed_and_the_collector_reject_samples_taken_in_motion():
    buf = TfBuffer()
    for k in range(31):  # still for 1 s, then 0.5 m/s along x for 2 s
        t = k * S // 10
        x = 0.0 if t <= S else 0.5 * (t - S) / S
        buf.add_transform("odom", "base_link", t, np.r_[x, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    still = odom_speed(buf, "odom", "base_link", S, 0.2, 0.05)
    moving = odom_speed(buf, "odom", "base_link", 2 * S, 0.2, 0.05)
    assert still == pytest.approx((0.0, 0.0)) and moving[0] == pytest.approx(0.5)
    assert odom_speed(buf, "odom", "base_link", 60 * S, 0.2, 0.05) is None  # no odometry then
    limits = MotionLimits(max_linear=0.05, max_angular=0.05)
    col = Collector(2)
    pose = np.r_[0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert col.offer(Sample(pose, "s", 1.0, 2 * S), moving, limits) == "moving"
    assert col.offer(Sample(pose, "s", 1.0, S), still, limits) == "accepted"
    assert col.offer(Sample(pose, "s", 1.0, S), None, MotionLimits(require_odom=True)) == "unknown"
    assert col.offer(Sample(pose, "s", 1.0, S), None, limits) == "accepted" and col.done.is_set()
    assert col.rejected_moving == 1 and col.rejected_unknown_motion == 1 and len(col.snapshot()) == 2


def test_fused_sigma_is_the_median_of_calibrated_samples_and_widens_the_covariance():
    poses = [np.r_[0.1 * i, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0] for i in range(3)]
    calibrated = [Sample(p, "a", 1.0, i, sigma=(0.2 * (i + 1), 0.05 * (i + 1))) for i, p in enumerate(poses)]
    fused = fuse(calibrated)
    assert fused.sigma == pytest.approx((0.4, 0.1))
    base = np.diag([0.4**2] * 3 + [0.1**2] * 3).reshape(36)
    cov = widen_covariance(base, fused).reshape(6, 6)
    assert cov[0, 0] == pytest.approx(0.4**2) and cov[5, 5] == pytest.approx(0.1**2)  # spread 0.1 m < sigma
    mixed = [*calibrated, Sample(poses[0], "a", 1.0, 9)]
    assert fuse(mixed).sigma is None  # an uncalibrated sample: the configured covariance applies
