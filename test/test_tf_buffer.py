"""TfBuffer: interpolation, static vs dynamic edges, bounded history, latest lookups, second-parent detection."""

from __future__ import annotations

import numpy as np
import pytest

from apr_localizer import geometry
from apr_localizer.tf_buffer import TfBuffer

IDENTITY = np.array([0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
S = 1_000_000_000


def _pose(x: float, yaw: float = 0.0) -> np.ndarray:
    return np.array([x, 0.0, 0.0, np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)])


def test_interpolates_dynamic_and_composes_with_static_edges():
    buf = TfBuffer()
    buf.add_transform("odom", "base_link", 1 * S, _pose(0.0))
    buf.add_transform("odom", "base_link", 3 * S, _pose(2.0))
    cam = np.r_[0.1, 0.0, 0.5, geometry.quat_from_ros([-0.5, 0.5, -0.5, 0.5])]
    buf.add_transform("base_link", "camera", 0, cam, static=True)
    pose = buf.lookup_one("odom", "camera", 2 * S, tolerance_s=1.5)
    np.testing.assert_allclose(pose, geometry.pose_compose(_pose(1.0), cam), atol=1e-12)
    with pytest.raises(LookupError):
        buf.lookup_one("odom", "camera", 10 * S, tolerance_s=0.5)  # 7 s after the newest sample
    np.testing.assert_allclose(buf.lookup_one("camera", "base_link", 0), geometry.pose_inverse(cam), atol=1e-12)


def test_latest_lookup_uses_the_newest_common_stamp():
    buf = TfBuffer()
    for t in range(5):
        buf.add_transform("map", "odom", t * S, _pose(float(t)))
    buf.add_transform("odom", "base_link", 2 * S, _pose(10.0))
    buf.add_transform("odom", "base_link", 3 * S, _pose(20.0))
    pose, stamp = buf.lookup_latest("map", "base_link")
    assert stamp == 3 * S
    np.testing.assert_allclose(pose[:3], [23.0, 0.0, 0.0], atol=1e-12)
    buf.add_transform("base_link", "camera", 0, IDENTITY, static=True)
    assert buf.lookup_latest("base_link", "camera")[1] == 0  # all static: stamp 0


def test_brackets_says_whether_a_lookup_interpolates_or_takes_an_end_sample():
    buf = TfBuffer()
    buf.add_transform("odom", "base_link", 2 * S, _pose(2.0))
    buf.add_transform("odom", "base_link", 4 * S, _pose(4.0))
    buf.add_transform("base_link", "camera", 0, IDENTITY, static=True)
    assert buf.brackets("odom", "camera", 3 * S) and buf.brackets("camera", "odom", 2 * S)  # static edges: any time
    assert buf.brackets("odom", "base_link", 4 * S) and buf.brackets("camera", "camera", 0)
    for t_ns, end in ((1 * S + S // 2, 2.0), (4 * S + S // 2, 4.0)):  # before the first, after the last sample
        assert not buf.brackets("odom", "camera", t_ns)
        np.testing.assert_allclose(buf.lookup_one("odom", "camera", t_ns, tolerance_s=1.0)[:3], [end, 0, 0])
    with pytest.raises(LookupError):
        buf.brackets("odom", "nowhere", 3 * S)


def test_history_is_bounded_by_the_cache_time():
    buf = TfBuffer(cache_s=2.0)
    for t in range(200):
        buf.add_transform("odom", "base_link", t * S // 10, _pose(t / 10))
    stamps = buf.stamps("odom", "base_link")
    assert stamps[-1] == 199 * S // 10
    assert stamps[0] >= stamps[-1] - 2 * S - 32 * S // 10  # pruned in batches of 32 samples
    assert len(stamps) < 60


def test_parents_of_reports_a_second_parent_and_unknown_frames_raise():
    buf = TfBuffer()
    buf.add_transform("base_link", "camera_optical", 0, IDENTITY, static=True)
    assert buf.parents_of("camera_optical") == {"base_link"} and buf.parent("camera_optical") == "base_link"
    buf.add_transform("map", "camera_optical", S, IDENTITY)
    assert buf.parents_of("/camera_optical") == {"base_link", "map"}
    assert buf.parent("map") is None and buf.parents_of("nowhere") == set()
    with pytest.raises(LookupError, match="no frame"):
        buf.lookup_one("map", "nowhere", 0)
    with pytest.raises(ValueError):
        buf.add_transform("a", "a", 0, IDENTITY)
