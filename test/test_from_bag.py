"""Bag -> label-CSV dataset: rendered frames with known poses go through a rosbags bag and come back out."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from apr_localizer import geometry
from apr_localizer.imaging import decode_compressed, encode_compressed
from apr_training.bags import io as bagio
from apr_training.bags.ground_truth import parse_spec
from apr_training.cli.synth import synth_main
from apr_training.datasets.from_bag import ExtractError, extract_dataset
from apr_training.datasets.labels import LABEL_COLUMNS, read_labels
from apr_training.synthetic.render import Intrinsics
from apr_training.synthetic.writer import make_sequence_trajectory, render_sequence

T0 = 1_700_000_000_000_000_000
PERIOD = 100_000_000  # images at 10 Hz
N = 10
W, H = 64, 48
K = Intrinsics.from_hfov(W, H, 60.0)


@pytest.fixture(scope="module")
def traj():
    return make_sequence_trajectory("library", 4, N, 10.0)


@pytest.fixture(scope="module")
def frames() -> list[bagio.PosedImage]:
    return [
        bagio.PosedImage(T0 + i * PERIOD, rgb, pose)
        for i, (_, pose, rgb) in enumerate(render_sequence("library", 4, N, W, H, fps=10.0))
    ]


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == LABEL_COLUMNS
    return rows[1:]


def _check_rows(out, rows, frames_by_index, atol=1e-6, jpeg: int | None = None):
    for r, f in zip(rows, frames_by_index, strict=True):
        np.testing.assert_allclose([float(v) for v in r[4:]], f.pose, atol=atol)
        img = np.asarray(Image.open(out / r[3]))
        if jpeg:  # exactly the codec's round trip, and close to the rendered frame
            np.testing.assert_array_equal(img, decode_compressed(encode_compressed(f.rgb, "jpeg", jpeg), "jpeg"))
            assert np.abs(img.astype(int) - f.rgb).mean() < 10.0
        else:
            np.testing.assert_array_equal(img, f.rgb)


def test_pose_topic_round_trip_split_and_labels(tmp_path, frames):
    bag = tmp_path / "run1"
    bagio.write_bag(bag, frames, "sqlite3", intrinsics=K, tf=None)
    out = tmp_path / "ds"
    s = extract_dataset(bag, out, "/camera/image_raw", "pose:/ground_truth/pose", "lib", test_fraction=0.3)
    assert s["matched"] == N and s["written"] == {"train": 7, "test": 3}
    train, test = _read_csv(out / "lib_train.csv"), _read_csv(out / "lib_test.csv")
    assert [r[:3] for r in train] == [["lib", "train", "run1-train"]] * 7
    assert test[0][3] == "lib/run1-test/frame-000000.color.png"
    _check_rows(out, train + test, frames)
    table = read_labels(out / "lib_train.csv")
    assert table.scenes == ["lib"] and len(table) == 7
    intr = json.loads((out / "intrinsics.json").read_text())
    assert (intr["width"], intr["fx"], intr["cx"]) == (W, pytest.approx(K.fx), pytest.approx(K.cx))
    frames_csv = _read_csv_plain(out / "lib_frames.csv")
    assert frames_csv[0] == ["img_path", "split", "stamp_ns", "bag_time_ns", "gt_residual_ms"]
    assert frames_csv[1][2] == str(T0)

    # stride and a split time; an existing dataset needs overwrite
    with pytest.raises(FileExistsError, match="already holds label CSVs for scene 'lib'"):
        extract_dataset(bag, out, "/camera/image_raw", "pose:/ground_truth/pose", "lib")
    s = extract_dataset(
        bag, out, "/camera/image_raw", "pose:/ground_truth/pose", "lib", stride=2, split_time=0.5, overwrite=True
    )
    assert s["written"] == {"train": 3, "test": 2}  # frames 0, 2, 4 | 6, 8
    _check_rows(out, _read_csv(out / "lib_train.csv") + _read_csv(out / "lib_test.csv"), frames[::2])


def _read_csv_plain(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_tf_only_ground_truth_at_another_rate(tmp_path, frames, traj, storage):
    # TF at 50 Hz (every 20 ms) through a map->odom->base_link->camera chain, no pose topic
    tf_t = np.arange(0, 5 * (N - 1) + 1) * (PERIOD // 5)
    tf_poses = list(zip((T0 + tf_t).tolist(), traj.pose_at(tf_t / 1e9)))
    bag = tmp_path / "tf"
    bagio.write_bag(
        bag,
        frames,
        storage,
        compressed=True,
        raw=False,
        jpeg_quality=95,
        intrinsics=K,
        pose_topic=None,
        tf="chain",
        tf_poses=tf_poses,
    )
    out = tmp_path / "ds"
    # image stamps coincide with TF stamps: exact up to float rounding
    s = extract_dataset(bag, out, "/camera/image_raw/compressed", "tf:map->camera_optical", "lib", test_fraction=0.0)
    assert s["image_type"] == "sensor_msgs/msg/CompressedImage" and s["written"] == {"train": N, "test": 0}
    _check_rows(out, _read_csv(out / "lib_train.csv"), frames, jpeg=95)

    # images between TF samples: interpolated, close to the true continuous trajectory
    shifted = [bagio.PosedImage(f.stamp_ns + 7_000_000, f.rgb, None) for f in frames[:-1]]
    bag2 = tmp_path / "tf_shifted"
    bagio.write_bag(bag2, shifted, storage, intrinsics=K, pose_topic=None, tf="camera", tf_poses=tf_poses)
    s = extract_dataset(bag2, out, "/camera/image_raw", "tf:map->camera_optical", "shift", test_fraction=0.0)
    assert s["matched"] == N - 1 and s["max_gt_residual_ms"] == pytest.approx(7.0)
    rows = _read_csv(out / "shift_train.csv")
    got = np.array([[float(v) for v in r[4:]] for r in rows])
    want = traj.pose_at((np.arange(N - 1) * PERIOD + 7_000_000) / 1e9)
    assert geometry.position_error(got, want).max() < 2e-4
    assert geometry.rotation_error_deg(got[:, 3:], want[:, 3:]).max() < 0.05
    # without interpolation (nearest sample) the error would be larger: the test is sensitive
    nearest = traj.pose_at(np.round((np.arange(N - 1) * PERIOD + 7_000_000) / (PERIOD // 5)) * (PERIOD // 5) / 1e9)
    assert geometry.position_error(nearest, want).max() > 5 * geometry.position_error(got, want).max()


def test_odometry_source_with_sensor_offset(tmp_path, frames):
    offset = np.array([0.1, 0.0, 0.3, 0.5, -0.5, 0.5, -0.5])  # camera in base_link
    ts = bagio.typestore()
    T = ts.types
    bag = tmp_path / "odom"
    with bagio.BagWriter(bag, "mcap") as bw:
        for f in frames:
            base = geometry.pose_compose(f.pose, geometry.pose_inverse(offset))
            ps = bagio.make_pose_stamped(base, f.stamp_ns - 3_000_000, "odom")  # 3 ms before the image
            zero = T["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0)
            odom = T["nav_msgs/msg/Odometry"](
                header=ps.header,
                child_frame_id="base_link",
                pose=T["geometry_msgs/msg/PoseWithCovariance"](pose=ps.pose, covariance=np.zeros(36)),
                twist=T["geometry_msgs/msg/TwistWithCovariance"](
                    twist=T["geometry_msgs/msg/Twist"](linear=zero, angular=zero), covariance=np.zeros(36)
                ),
            )
            bw.write("/odom", odom, f.stamp_ns - 3_000_000)
            bw.write("/cam/image", bagio.make_image(f.rgb, f.stamp_ns, "cam", "bgr8"), f.stamp_ns)
    out = tmp_path / "ds"
    s = extract_dataset(bag, out, "/cam/image", "odom:/odom", "o", sensor_offset=offset, test_fraction=0.5)
    assert s["written"] == {"train": 5, "test": 5} and s["max_gt_residual_ms"] == pytest.approx(3.0)
    _check_rows(out, _read_csv(out / "o_train.csv") + _read_csv(out / "o_test.csv"), frames)
    assert not (out / "intrinsics.json").exists()  # no CameraInfo in this bag


def test_clear_errors(tmp_path, frames):
    bag = tmp_path / "b"
    bagio.write_bag(bag, frames[:3], "sqlite3", intrinsics=K, compressed=True, raw=False)
    out = tmp_path / "ds"
    with pytest.raises(
        ExtractError,
        match=r"has no topic /camera/image_raw \(did you mean "
        r"/camera/image_raw/compressed\?\); topics are: /camera/camera_info",
    ):
        extract_dataset(bag, out, "/camera/image_raw", "pose:/ground_truth/pose", "x")
    with pytest.raises(ExtractError, match="has no topic /gt; topics are:"):
        extract_dataset(bag, out, "/camera/image_raw/compressed", "pose:/gt", "x")
    with pytest.raises(ExtractError, match="has type sensor_msgs/msg/CameraInfo; expected sensor_msgs/msg/Image"):
        extract_dataset(bag, out, "/camera/camera_info", "pose:/ground_truth/pose", "x")
    with pytest.raises(ExtractError, match="'odom:' expects nav_msgs/msg/Odometry"):
        extract_dataset(bag, out, "/camera/image_raw/compressed", "odom:/ground_truth/pose", "x")
    with pytest.raises(ExtractError, match="TF has no frame 'cam'"):
        extract_dataset(bag, out, "/camera/image_raw/compressed", "tf:map->cam", "x")
    with pytest.raises(ValueError, match="ground truth 'pose' is not understood"):
        extract_dataset(bag, out, "/camera/image_raw/compressed", "pose", "x")
    with pytest.raises(ValueError, match="scene_name 'a/b' must be a plain name"):
        extract_dataset(bag, out, "/camera/image_raw/compressed", "pose:/ground_truth/pose", "a/b")

    # ground truth 1 s later than every image: nothing within 20 ms
    late = tmp_path / "late"
    with bagio.BagWriter(late, "sqlite3") as bw:
        for f in frames[:3]:
            bw.write("/img", bagio.make_image(f.rgb, f.stamp_ns, "cam"), f.stamp_ns)
            bw.write("/gt", bagio.make_pose_stamped(f.pose, f.stamp_ns + 10**9), f.stamp_ns + 10**9)
    with pytest.raises(
        ExtractError,
        match=r"no image on /img in bag .* has ground truth from /gt within 0.02 s "
        r"\(image stamps .* ground truth .*\)",
    ):
        extract_dataset(late, out, "/img", "pose:/gt", "x")
    s = extract_dataset(late, out, "/img", "pose:/gt", "x", tolerance_s=1.0, test_fraction=0.0)
    assert s["matched"] == 3


def test_parse_spec():
    assert parse_spec("pose:/a/b").topic == "/a/b"
    assert parse_spec("odom:/odom").kind == "odom"
    src = parse_spec("tf: map -> camera_link")
    assert (src.kind, src.parent, src.child) == ("tf", "map", "camera_link")
    for bad in ("tf:map", "foo:/x", "pose:", ""):
        with pytest.raises(ValueError, match="is not understood"):
            parse_spec(bad)


def test_cli_bag_info_and_extract(tmp_path, capsys):
    bag = tmp_path / "cli_bag"
    assert (
        synth_main(
            [
                "bag",
                "--out",
                str(bag),
                "--scene",
                "studio",
                "--frames",
                "4",
                "--size",
                "48x32",
                "--storage",
                "mcap",
                "--tf",
                "chain",
                "--tf-rate",
                "90",
                "--compressed",
            ]
        )
        == 0
    )
    info = bagio.bag_info(bag)
    assert info["topics"]["/camera/image_raw"]["count"] == 4
    assert info["topics"]["/tf"]["count"] == 10  # 0.1 s of trajectory at 90 Hz
    assert synth_main(["info", str(bag)]) == 0
    assert "/tf_static" in capsys.readouterr().out
    assert (
        synth_main(
            [
                "extract",
                str(bag),
                "--out",
                str(tmp_path / "ds"),
                "--image-topic",
                "/camera/image_raw",
                "--gt",
                "tf:map->camera_optical",
                "--scene",
                "studio",
                "--test-fraction",
                "0.25",
            ]
        )
        == 0
    )
    rows = _read_csv(tmp_path / "ds" / "studio_test.csv")
    assert len(rows) == 1
    gt = [bagio.pose_from_msg(m.msg) for m in bagio.iter_messages(bag, ["/ground_truth/pose"])]
    np.testing.assert_allclose([float(v) for v in rows[0][4:]], gt[-1], atol=1e-6)
    assert (
        synth_main(
            [
                "extract",
                str(bag),
                "--out",
                str(tmp_path / "ds"),
                "--image-topic",
                "/nope",
                "--gt",
                "pose:/ground_truth/pose",
                "--scene",
                "s",
            ]
        )
        == 2
    )
    assert "has no topic /nope" in capsys.readouterr().err
