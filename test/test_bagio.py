"""Bag I/O: rosbag2 bags written with rosbags (sqlite3 and mcap), type hashes, stamps, images, poses and TF."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from apr_localizer import geometry
from apr_localizer.imaging import decode_compressed, encode_compressed
from apr_localizer.tf_buffer import TfBuffer, stamp_to_ns
from apr_training.bags import io as bagio
from apr_training.synthetic.render import Intrinsics
from apr_training.synthetic.writer import render_sequence

TF_RIHS01 = "RIHS01_e369d0f05a23ae52508854b66f6aa0437f3449d652e8cbf22d5abe85d020f087"
T0 = 1_700_000_000_000_000_000
PERIOD = 100_000_000  # 10 Hz
W, H = 64, 48
K = Intrinsics.from_hfov(W, H, 60.0)


@pytest.fixture(scope="module")
def frames() -> list[bagio.PosedImage]:
    return [
        bagio.PosedImage(T0 + i * PERIOD, rgb, pose)
        for i, (_, pose, rgb) in enumerate(render_sequence("office", 9, 5, W, H, fps=10.0))
    ]


def _rand_pose(rng) -> np.ndarray:
    return np.concatenate([rng.normal(size=3), geometry.quat_normalize(rng.normal(size=4))])


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_write_bag_topics_counts_hashes_and_stamps(tmp_path, frames, storage):
    path = tmp_path / f"bag_{storage}"
    info = bagio.write_bag(path, frames, storage, compressed=True, intrinsics=K, tf="chain")
    n = len(frames)
    expected = {
        "/camera/image_raw": ("sensor_msgs/msg/Image", n),
        "/camera/image_raw/compressed": ("sensor_msgs/msg/CompressedImage", n),
        "/camera/camera_info": ("sensor_msgs/msg/CameraInfo", n),
        "/ground_truth/pose": ("geometry_msgs/msg/PoseStamped", n),
        "/tf": ("tf2_msgs/msg/TFMessage", n),
        "/tf_static": ("tf2_msgs/msg/TFMessage", 1),
    }
    assert info["storage"] == storage
    assert {t: (v["type"], v["count"]) for t, v in info["topics"].items()} == expected
    ts = bagio.typestore()
    for v in info["topics"].values():
        assert v["hash"] == ts.hash_rihs01(v["type"])
    assert info["topics"]["/tf"]["hash"] == TF_RIHS01
    assert info["start_ns"] == T0 and info["duration_s"] == pytest.approx((n - 1) * PERIOD / 1e9, abs=1e-8)
    assert info["message_count"] == 5 * n + 1

    meta = yaml.safe_load((path / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert meta["version"] == 9 and meta["storage_identifier"] == storage
    hashes = {
        t["topic_metadata"]["name"]: t["topic_metadata"]["type_description_hash"]
        for t in meta["topics_with_message_count"]
    }
    assert hashes["/tf"] == hashes["/tf_static"] == TF_RIHS01
    static_qos = next(
        t["topic_metadata"]["offered_qos_profiles"]
        for t in meta["topics_with_message_count"]
        if t["topic_metadata"]["name"] == "/tf_static"
    )
    assert static_qos[0]["durability"] == "transient_local"

    seen: dict[str, list[int]] = {}
    for m in bagio.iter_messages(path):
        seen.setdefault(m.topic, []).append(m.t_ns)
        if m.topic == "/tf_static":
            continue
        stamps = (
            [stamp_to_ns(tr.header.stamp) for tr in m.msg.transforms]
            if m.topic == "/tf"
            else [bagio.header_stamp_ns(m.msg)]
        )
        assert stamps == [m.t_ns]  # header stamps equal the bag time
    for topic in expected:
        if topic != "/tf_static":
            assert seen[topic] == [T0 + i * PERIOD for i in range(n)]


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_images_poses_and_camera_info_round_trip(tmp_path, frames, storage):
    path = tmp_path / "bag"
    bagio.write_bag(path, frames, storage, compressed=True, jpeg_quality=95, intrinsics=K)
    raw, jpeg, poses, infos = [], [], [], []
    for m in bagio.iter_messages(
        path, ["/camera/image_raw", "/camera/image_raw/compressed", "/ground_truth/pose", "/camera/camera_info"]
    ):
        if m.topic == "/camera/image_raw":
            assert (m.msg.encoding, m.msg.step, m.msg.header.frame_id) == ("rgb8", 3 * W, "camera_optical")
            raw.append(bagio.image_to_rgb(m.msg))
        elif m.topic.endswith("compressed"):
            assert m.msg.format == "jpeg"
            jpeg.append(bagio.image_to_rgb(m.msg, m.msgtype))
        elif m.topic == "/ground_truth/pose":
            assert m.msg.header.frame_id == "map"
            assert m.msg.pose.orientation.w == pytest.approx(geometry.quat_normalize(frames[len(poses)].pose[3:])[0])
            poses.append(bagio.pose_from_msg(m.msg))
        else:
            infos.append(m.msg)
    for f, r, j, p in zip(frames, raw, jpeg, poses, strict=True):
        np.testing.assert_array_equal(r, f.rgb)
        np.testing.assert_array_equal(j, decode_compressed(encode_compressed(f.rgb, "jpeg", 95), "jpeg"))
        assert np.abs(j.astype(int) - f.rgb).mean() < 10.0  # jpeg q95 with 4:2:0 chroma on a tiny textured image
        np.testing.assert_allclose(p, f.pose, atol=1e-12)
    k = np.asarray(infos[0].k)
    assert (infos[0].width, infos[0].height, infos[0].distortion_model) == (W, H, "plumb_bob")
    np.testing.assert_allclose([k[0], k[4], k[2], k[5]], [K.fx, K.fy, K.cx, K.cy])


def test_other_encodings_and_single_file_bags(tmp_path, frames):
    path = tmp_path / "bgr"
    bagio.write_bag(path, frames[:2], "mcap", encoding="bgr8", camera_info_topic=None, pose_topic=None, tf=None)
    info = bagio.bag_info(path)
    assert set(info["topics"]) == {"/camera/image_raw"}
    # the storage file alone (no metadata.yaml) is readable too
    (mcap_file,) = path.glob("*.mcap")
    msgs = list(bagio.iter_messages(mcap_file, ["/camera/image_raw"]))
    assert msgs[0].msg.encoding == "bgr8"
    np.testing.assert_array_equal(bagio.image_to_rgb(msgs[1].msg), frames[1].rgb)

    mono = tmp_path / "mono"
    bagio.write_bag(mono, frames[:1], "sqlite3", encoding="mono8", intrinsics=K)
    (db3,) = mono.glob("*.db3")
    m = next(bagio.iter_messages(db3, ["/camera/image_raw"]))
    grey = bagio.image_to_rgb(m.msg)
    assert grey.shape == (H, W, 3) and (grey[..., 0] == grey[..., 1]).all()


def test_errors_name_the_bag_and_topics(tmp_path, frames):
    path = tmp_path / "b"
    bagio.write_bag(path, frames[:1], "sqlite3", intrinsics=K)
    with pytest.raises(bagio.BagError, match=r"has no topic /nope; topics are: /camera/camera_info, /camera/image_raw"):
        list(bagio.iter_messages(path, ["/nope"]))
    with pytest.raises(bagio.BagError, match="does not exist"):
        bagio.bag_info(tmp_path / "missing")
    with pytest.raises(FileExistsError, match="already exists"):
        bagio.write_bag(path, frames[:1], "sqlite3")
    bagio.write_bag(path, frames[:1], "mcap", overwrite=True)
    assert bagio.bag_info(path)["storage"] == "mcap"
    with pytest.raises(ValueError, match="bag storage must be one of sqlite3, mcap"):
        bagio.BagWriter(tmp_path / "x", "rosbag1")
    with pytest.raises(ValueError, match="cannot read a pose from a sensor_msgs/msg/Image"):
        bagio.pose_from_msg(next(bagio.iter_messages(path, ["/camera/image_raw"])).msg)
    with pytest.raises(ValueError, match="cannot decode an image from a geometry_msgs/msg/PoseStamped"):
        bagio.image_to_rgb(bagio.make_pose_stamped(frames[0].pose, T0))
    with pytest.raises(ValueError, match="raw=True or compressed=True"):
        bagio.write_bag(tmp_path / "n", frames, raw=False)


def test_pose_messages_of_every_type():
    rng = np.random.default_rng(1)
    pose = _rand_pose(rng)
    ts = bagio.typestore()
    T = ts.types
    ps = bagio.make_pose_stamped(pose, T0)
    cov = T["geometry_msgs/msg/PoseWithCovarianceStamped"](
        header=ps.header, pose=T["geometry_msgs/msg/PoseWithCovariance"](pose=ps.pose, covariance=np.zeros(36))
    )
    odom = T["nav_msgs/msg/Odometry"](
        header=ps.header,
        child_frame_id="base_link",
        pose=cov.pose,
        twist=T["geometry_msgs/msg/TwistWithCovariance"](
            twist=T["geometry_msgs/msg/Twist"](
                linear=T["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0),
                angular=T["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0),
            ),
            covariance=np.zeros(36),
        ),
    )
    tr = bagio.make_transform(pose, T0, "map", "cam")
    for msg in (ps, cov, odom, tr, ps.pose, tr.transform):
        # serialise + deserialise through CDR like a bag would
        back = ts.deserialize_cdr(ts.serialize_cdr(msg, msg.__msgtype__), msg.__msgtype__)
        np.testing.assert_allclose(bagio.pose_from_msg(back), pose, atol=1e-12)
    q = geometry.quat_to_ros(pose[3:])
    np.testing.assert_allclose([ps.pose.orientation.x, ps.pose.orientation.w], [q[0], q[3]], atol=1e-15)  # x,y,z,w
    assert bagio.header_stamp_ns(ps) == T0 and bagio.header_stamp_ns(ps.pose) is None
    assert stamp_to_ns(bagio.ns_to_time(T0 + 123)) == T0 + 123


# ------------------------------------------------------------------------------------------------ TF buffer
def test_tf_chain_composition_static_and_dynamic():
    rng = np.random.default_rng(2)
    m_o, o_b, b_c = _rand_pose(rng), _rand_pose(rng), _rand_pose(rng)
    buf = TfBuffer()
    buf.add_transform("map", "odom", 0, m_o, static=True)
    buf.add_transform("/base_link", "camera", 0, b_c, static=True)  # leading slash ignored
    for t in range(0, 5):
        buf.add_transform("odom", "base_link", T0 + t * PERIOD, o_b)
    want = geometry.pose_compose(geometry.pose_compose(m_o, o_b), b_c)
    got, ok = buf.lookup("map", "camera", [T0, T0 + 2 * PERIOD])
    assert ok.all()
    np.testing.assert_allclose(got, np.stack([want, want]), atol=1e-12)
    # inverse direction and a lookup between two branches of the tree
    inv = buf.lookup_one("camera", "map", T0)
    np.testing.assert_allclose(geometry.pose_compose(inv, want)[:3], 0.0, atol=1e-12)
    side = buf.lookup_one("odom", "camera", T0)
    np.testing.assert_allclose(side, geometry.pose_compose(o_b, b_c), atol=1e-12)
    assert buf.frames == {"map", "odom", "base_link", "camera"}
    np.testing.assert_array_equal(buf.stamps("map", "camera"), [T0 + t * PERIOD for t in range(5)])


def test_tf_interpolation_and_tolerance():
    buf = TfBuffer()
    a = np.array([0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    yaw = math.radians(90)
    b = np.array([1.0, 2.0, -1.0, math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)])
    buf.add_transform("map", "cam", T0 + PERIOD, b)  # out of order on purpose
    buf.add_transform("map", "cam", T0, a)
    poses, ok = buf.lookup("map", "cam", [T0 + PERIOD // 4], tolerance_s=0.03)
    assert ok[0]
    np.testing.assert_allclose(poses[0, :3], [0.25, 0.5, -0.25], atol=1e-12)
    assert geometry.rotation_error_deg(poses[0, 3:], [1, 0, 0, 0]) == pytest.approx(22.5)
    # the nearest sample is 50 ms away: outside a 20 ms tolerance
    _, ok = buf.lookup("map", "cam", [T0 + PERIOD // 2], tolerance_s=0.02)
    assert not ok[0]
    # just outside the sampled range: the end sample within tolerance, nothing beyond
    poses, ok = buf.lookup("map", "cam", [T0 - 5_000_000, T0 + PERIOD + 5_000_000, T0 + 3 * PERIOD], 0.02)
    assert ok.tolist() == [True, True, False]
    np.testing.assert_allclose(poses[1], b, atol=1e-12)
    with pytest.raises(LookupError, match="no TF map <- cam within"):
        buf.lookup_one("map", "cam", T0 + 3 * PERIOD)


def test_tf_unknown_and_disconnected_frames():
    buf = TfBuffer()
    buf.add_transform("map", "a", T0, _rand_pose(np.random.default_rng(3)))
    buf.add_transform("world", "b", T0, _rand_pose(np.random.default_rng(4)))
    with pytest.raises(LookupError, match="TF has no frame 'c'; frames are: a, b, map, world"):
        buf.lookup("map", "c", [T0])
    with pytest.raises(LookupError, match="are not connected"):
        buf.lookup("a", "b", [T0])
    with pytest.raises(ValueError, match="to itself"):
        buf.add_transform("map", "map", T0, np.array([0, 0, 0, 1.0, 0, 0, 0]))


def test_read_tf_from_a_bag_with_tf_at_its_own_rate(tmp_path, frames):
    # TF at 50 Hz from the same trajectory, images at 10 Hz
    rng = np.random.default_rng(5)
    tf_poses = [(T0 + i * PERIOD // 5, _rand_pose(rng)) for i in range(5 * (len(frames) - 1) + 1)]
    path = tmp_path / "tf"
    bagio.write_bag(path, frames, "mcap", tf="camera", tf_poses=tf_poses, pose_topic=None)
    info = bagio.bag_info(path)
    assert info["topics"]["/tf"]["count"] == len(tf_poses)
    times = [m.t_ns for m in bagio.iter_messages(path, ["/tf"])]
    assert times == sorted(times) == [t for t, _ in tf_poses]
    buf = bagio.read_tf(path)
    got, ok = buf.lookup("map", "camera_optical", [t for t, _ in tf_poses])
    assert ok.all()
    np.testing.assert_allclose(got, np.stack([p for _, p in tf_poses]), atol=1e-12)
    with pytest.raises(bagio.BagError, match="has no TF topic"):
        bagio.read_tf(path, ["/tf_other"])
