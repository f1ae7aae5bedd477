"""node_logic: stamp checks, the map -> odom filter, camera_info check, diagnostics levels and report (no ROS)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from apr_localizer import geometry
from apr_localizer.mailbox import SequenceGaps
from apr_localizer.node_logic import (
    ERROR,
    OK,
    WARN,
    DiagWindow,
    FilterOptions,
    MapOdomFilter,
    Stats,
    diagnostic_level,
    diagnostic_report,
    gate,
    intrinsics_mismatch,
    planar,
    stamp_problem,
    yaw_of,
)

S = 1_000_000_000
NOW = 1_700_000_000 * S


@pytest.mark.parametrize(
    ("sec", "nanosec", "max_age", "expected"),
    [
        (0, 0, 0.0, "zero"),
        (-5, 0, 0.0, "invalid"),
        (1, 2_000_000_000, 0.0, "invalid"),
        (NOW // S + 3600 * 24 * 365 * 12, 0, 0.0, "future"),  # 2038
        (NOW // S - 10, 0, 1.0, "stale"),
        (NOW // S - 10, 0, 0.0, None),
        (NOW // S, 500, 1.0, None),
    ],
)
def test_stamp_problem(sec, nanosec, max_age, expected):
    problem = stamp_problem(sec, nanosec, NOW, 1.0, max_age)
    assert (problem is None) if expected is None else (expected in problem)


def test_stamp_problem_without_a_clock_yet_checks_only_the_stamp_itself():
    assert stamp_problem(NOW // S + 10**6, 0, 0, 1.0, 1.0) is None  # use_sim_time before the first /clock
    assert "zero" in stamp_problem(0, 0, 0, 1.0, 1.0)


def _pose(x: float, y: float, yaw: float, z: float = 0.0, roll: float = 0.0) -> np.ndarray:
    qz = np.array([math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)])
    qx = np.array([math.cos(roll / 2), math.sin(roll / 2), 0.0, 0.0])
    return np.r_[x, y, z, geometry.quat_multiply(qz, qx)]


def test_planar_keeps_x_y_yaw():
    p = planar(_pose(1.0, 2.0, 0.7, z=3.0, roll=0.2))
    assert p[2] == 0.0 and yaw_of(p[3:]) == pytest.approx(0.7)
    np.testing.assert_allclose(p[:2], [1.0, 2.0])
    assert geometry.rotation_error_deg(p[3:], _pose(0, 0, 0.7)[3:]) < 1e-6


def test_map_odom_filter_rejects_jumps_until_confirmed_and_smooths():
    f = MapOdomFilter()
    opts = FilterOptions(max_position_m=0.5, max_yaw_deg=10.0, accept_after=3, smoothing=1.0)
    assert f.update(_pose(0, 0, 0), opts) == "accepted"
    assert f.update(_pose(0.1, 0, 0), opts) == "accepted"
    np.testing.assert_allclose(f.current[:3], [0.1, 0, 0])
    assert f.update(_pose(5, 0, 0), opts) == "jump" and f.update(_pose(5, 0, 0), opts) == "jump"
    np.testing.assert_allclose(f.current[:3], [0.1, 0, 0])  # still the old place
    assert f.update(_pose(5.01, 0, 0), opts) == "relocated" and f.current[0] == pytest.approx(5.01)
    assert f.rejected_jumps == 2
    assert f.update(_pose(5, 0, 1.0), opts) == "jump"  # 57 degrees
    smooth = MapOdomFilter()
    half = FilterOptions(smoothing=0.5, planar=True)
    smooth.update(_pose(0, 0, 0), half)
    smooth.update(_pose(1, 0, 0.2, z=1.0), half)
    np.testing.assert_allclose(smooth.current[:3], [0.5, 0, 0], atol=1e-12)
    assert yaw_of(smooth.current[3:]) == pytest.approx(0.1)


def test_intrinsics_mismatch_scales_to_the_live_resolution():
    trained = {"fx": 500.0, "fy": 500.0, "cx": 320.0, "cy": 240.0, "width": 640, "height": 480}
    k_half = [250.0, 0, 160.0, 0, 250.0, 120.0, 0, 0, 1]
    assert intrinsics_mismatch(trained, k_half, 320, 240, 0.05) is None
    assert "fx" in intrinsics_mismatch(trained, [400.0, 0, 160.0, 0, 250.0, 120.0, 0, 0, 1], 320, 240, 0.05)
    assert "aspect ratio" in intrinsics_mismatch(trained, k_half, 320, 320, 0.05)
    assert intrinsics_mismatch({"fx": 1.0}, k_half, 320, 240, 0.05) is None  # incomplete metadata: not checked


@pytest.mark.parametrize(
    ("window", "level", "text"),
    [
        (DiagWindow(0, 0, 0, 0.0, 0.0, math.nan, 1.0), WARN, "no images"),
        (DiagWindow(10, 0, 10, 0.0, 0.0, math.nan, 1.0, "zero stamp"), ERROR, "every frame fails: zero stamp"),
        (DiagWindow(10, 0, 2, 0.0, 0.0, math.nan, 1.0), WARN, "no estimate is published"),
        (DiagWindow(10, 3, 0, 3.0, 5.0, 0.1, 1.0), WARN, "below"),
        (DiagWindow(10, 10, 0, 10.0, 5.0, 2.5, 1.0), WARN, "delay"),
        (DiagWindow(10, 10, 0, 10.0, 5.0, 0.1, 1.0), OK, "localizing"),
        (DiagWindow(10, 0, 2, 0.0, 0.0, math.nan, 1.0, "", 8, "sigma 3 m"), WARN, "gated as too uncertain: sigma 3 m"),
        (DiagWindow(30, 0, 0, 0.0, 0.0, math.nan, 1.0, "", 4), WARN, "every estimate is gated"),  # 26 frames replaced
    ],
)
def test_diagnostic_level(window, level, text):
    got_level, message = diagnostic_level(window, "/cam")
    assert got_level == level and text in message


def test_diagnostic_report_counts_since_the_last_report_and_truncates():
    stats = Stats()
    stats.add(received=5)
    stats.fail("rejected", "x" * 65536)
    stats.published("lab", 0.9, 12.0, 0.05)
    window, values, counts = diagnostic_report(stats, {}, 1.0, 2, 0.0, 1.0)
    assert window.received == 5 and window.published == 1 and window.failed == 1
    assert values["frames_received"] == 5 and values["dropped_frames"] == 2 and len(values["last_reject_reason"]) < 300
    assert values["capture_delay_ms_p50"] == "50.00" and values["latency_ms_p50"] == "12.00"
    stats.add(received=1)
    window, _, _ = diagnostic_report(stats, counts, 1.0, 2, 0.0, 1.0)
    assert window.received == 1 and window.published == 0


def test_sequence_gaps_count_skipped_numbers_per_publisher():
    gaps = SequenceGaps(max_publishers=2)
    assert gaps.lost(b"a", 1) == 0 and gaps.lost(b"a", 2) == 0 and gaps.lost(b"a", 6) == 3
    assert gaps.lost(b"b", 10) == 0 and gaps.lost(b"a", 5) == 0  # out of order: not a loss
    gaps.lost(b"c", 1)  # a third publisher resets the map
    assert gaps.lost(b"a", 100) == 0


def test_gate_by_calibrated_sigma():
    assert gate(None, None, 1.0, 15.0) is None  # uncalibrated: never gated
    assert gate(0.5, math.radians(10.0), 1.0, 15.0) is None
    assert "gating.max_sigma_position_m 1" in gate(1.5, math.radians(10.0), 1.0, 15.0)
    assert "gating.max_sigma_orientation_deg 15" in gate(0.5, math.radians(20.0), 1.0, 15.0)
    assert gate(float("nan"), 0.1, 1.0, 15.0) is not None  # NaN is never confident
    assert gate(1e3, 3.0, 0.0, 0.0) is None  # 0 = that gate off


def test_stats_count_gated_estimates_and_report_the_last_sigma():
    stats = Stats()
    stats.sigma(0.4, math.radians(5.0), None)
    stats.sigma(2.5, math.radians(40.0), "sigma position 2.5 m above gating.max_sigma_position_m 1")
    window, values, _ = diagnostic_report(stats, {}, 1.0, 0, 0.0, 1.0)
    assert window.gated == 1 and values["gated_frames"] == 1
    assert values["last_sigma_position_m"] == "2.5" and values["last_sigma_orientation_deg"] == "40"
    assert "2.5 m" in values["last_gated_reason"]
