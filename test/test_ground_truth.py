"""The one ground-truth parser/matcher (apr_training.bags.ground_truth).

Mostly the cases where apr-eval-bag and the bag → dataset extraction used to disagree: zero header stamps, a sensor
offset, TF gaps and the reported offset.
"""

from __future__ import annotations

import numpy as np
import pytest

from apr_localizer import geometry
from apr_training.bags import io as bagio
from apr_training.bags.ground_truth import GroundTruthError, load_ground_truth, parse_spec

T0 = 1_700_000_000_000_000_000
PERIOD = 100_000_000  # 10 Hz


def _pose(i: int) -> np.ndarray:
    q = geometry.quat_normalize([1.0, 0.05 * i, -0.02 * i, 0.1])
    return np.array([0.1 * i, -0.2 * i, 1.0, *q])


def _pose_bag(path, stamps, bag_times):
    with bagio.BagWriter(path, "sqlite3") as bw:
        for i, (stamp, t) in enumerate(zip(stamps, bag_times)):
            msg = bagio.make_pose_stamped(_pose(i), 0, "map")
            msg.header.stamp = bagio.ns_to_time(stamp)
            bw.write("/gt", msg, t)
    return path


def test_zero_header_stamps_fall_back_to_the_bag_time(tmp_path):
    # apr-eval-bag matched by header.stamp only (zero stamps never matched); the extraction fell back to bag time
    times = [T0 + i * PERIOD for i in range(4)]
    gt = load_ground_truth(_pose_bag(tmp_path / "zero", [0] * 4, times), "pose:/gt", 0.02)
    poses, ok, offset = gt.match(times)
    assert ok.all() and np.all(offset == 0.0)
    np.testing.assert_allclose(poses, [_pose(i) for i in range(4)], atol=1e-12)
    # a non-zero header stamp wins over the bag time
    gt = load_ground_truth(_pose_bag(tmp_path / "stamped", [t + 5_000_000 for t in times], times), "pose:/gt")
    pose, offset_ms = gt.lookup(times[1])
    np.testing.assert_allclose(pose, _pose(1), atol=1e-12)
    assert offset_ms == pytest.approx(5.0)


def test_sensor_offset_is_composed_on_the_right(tmp_path):
    # only the extraction applied a sensor offset; now every consumer can
    times = [T0 + i * PERIOD for i in range(3)]
    bag = _pose_bag(tmp_path / "b", times, times)
    offset = np.array([0.1, 0.0, 0.3, 0.5, -0.5, 0.5, -0.5])
    poses, ok, _ = load_ground_truth(bag, "pose:/gt", sensor_offset=offset).match(times)
    assert ok.all()
    want = geometry.pose_compose(np.array([_pose(i) for i in range(3)]), offset.reshape(1, 7))
    np.testing.assert_allclose(poses, want, atol=1e-12)


def test_tf_needs_a_sample_within_the_tolerance_and_reports_the_nearest_offset(tmp_path):
    # apr-eval-bag interpolated across any gap and reported offset 0; the extraction (and the TF buffer) needs a
    # sample of every dynamic edge within the tolerance and reports the distance to the nearest sample
    bag = tmp_path / "tf"
    with bagio.BagWriter(bag, "mcap") as bw:
        for i in range(3):
            t = T0 + i * PERIOD
            bw.write("/tf", bagio.make_tf_message([bagio.make_transform(_pose(i), t, "map", "cam")]), t)
    mid = T0 + PERIOD // 2  # 50 ms from both samples
    quarter = T0 + PERIOD // 4  # 25 ms from the first
    strict = load_ground_truth(bag, "tf:map->cam", 0.02)
    assert strict.lookup(mid)[0] is None
    loose = load_ground_truth(bag, "tf:map->cam", 0.03)
    pose, offset_ms = loose.lookup(quarter)
    a, b = _pose(0), _pose(1)
    want = np.concatenate([a[:3] + 0.25 * (b[:3] - a[:3]), geometry.quat_slerp(a[3:], b[3:], 0.25)])
    np.testing.assert_allclose(pose, want, atol=1e-9)
    assert offset_ms == pytest.approx(25.0)
    assert loose.lookup(T0 + 2 * PERIOD + 20_000_000)[0] is not None  # held 20 ms past the last sample
    assert loose.lookup(T0 + 2 * PERIOD + 40_000_000)[0] is None
    with pytest.raises(GroundTruthError, match="TF has no frame 'nowhere'"):
        load_ground_truth(bag, "tf:map->nowhere")


def test_one_spec_parser_and_one_sentence_errors(tmp_path):
    assert parse_spec(" tf: map -> cam ").describe() == "TF map <- cam"
    for bad in ("/gt/pose", "tf:map", "odom:", "foo:/x"):
        with pytest.raises(GroundTruthError, match="is not understood; expected pose:/topic, odom:/topic or tf:"):
            parse_spec(bad)
    times = [T0]
    bag = _pose_bag(tmp_path / "b", times, times)
    with pytest.raises(GroundTruthError, match="has no topic /missing; topics are: /gt"):
        load_ground_truth(bag, "pose:/missing")
    with pytest.raises(GroundTruthError, match="'odom:' expects nav_msgs/msg/Odometry"):
        load_ground_truth(bag, "odom:/gt")
    with pytest.raises(GroundTruthError, match="has no topic /tf or /tf_static"):
        load_ground_truth(bag, "tf:map->cam")
    with pytest.raises(GroundTruthError, match="tolerance must be >= 0 s"):
        load_ground_truth(bag, "pose:/gt", -1.0)
