"""apr-eval-bag (offline and live through the node), the bag player/recorder and TF ground truth.

The bags are written here with rosbags: 160x120 frames made from the reference images, and ground truth built from
the estimates of the same :class:`Localizer` (reference checkpoint, torch CPU, 1 thread) so that the answer is
known: even frames carry the estimate itself (zero error), odd frames the estimate shifted by 0.5 m in x and rotated
by 8 degrees about z, and the last two images have no ground truth within the tolerance.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from apr_localizer import geometry

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_TOPIC = "/cam/image_raw"
INFO_TOPIC = "/cam/camera_info"
GT_TOPIC = "/gt/pose"
N_FRAMES = 14
N_NO_GT = 2  # the last frames: ground truth 0.2 s away
T0_NS = 1_700_000_000_000_000_000
PERIOD_NS = 100_000_000  # 10 Hz
SHIFT_M = 0.5
SHIFT_DEG = 8.0
ODOM = np.array([1.0, -2.0, 0.5, *geometry.quat_normalize([0.9, 0.1, -0.2, 0.3])])  # static map -> odom
BACKEND = ["--backend", "torch", "--device", "cpu", "--threads", "1"]


# --------------------------------------------------------------------------------------------- bag fixtures
def _ts():
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_KILTED)


def _header(ts, ns: int, frame: str):
    T = ts.types
    return T["std_msgs/msg/Header"](
        stamp=T["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9), frame_id=frame
    )


def _pose_msgs(ts, pose: np.ndarray):
    T = ts.types
    q = geometry.quat_to_ros(pose[3:])
    return (
        T["geometry_msgs/msg/Point"](x=float(pose[0]), y=float(pose[1]), z=float(pose[2])),
        T["geometry_msgs/msg/Quaternion"](x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])),
    )


def _image_msg(ts, rgb: np.ndarray, ns: int, compressed: bool):
    T = ts.types
    if compressed:
        from apr_localizer.imaging import encode_compressed

        data = np.frombuffer(encode_compressed(rgb, "jpeg", 95), np.uint8).copy()
        return "sensor_msgs/msg/CompressedImage", T["sensor_msgs/msg/CompressedImage"](
            header=_header(ts, ns, "cam"), format="jpeg", data=data
        )
    h, w = rgb.shape[:2]
    return "sensor_msgs/msg/Image", T["sensor_msgs/msg/Image"](
        header=_header(ts, ns, "cam"),
        height=h,
        width=w,
        encoding="rgb8",
        is_bigendian=0,
        step=w * 3,
        data=rgb.reshape(-1).copy(),
    )


def _camera_info(ts, ns: int):
    T = ts.types
    return T["sensor_msgs/msg/CameraInfo"](
        header=_header(ts, ns, "cam"),
        height=120,
        width=160,
        distortion_model="plumb_bob",
        d=np.zeros(5),
        k=np.array([100.0, 0, 80, 0, 100.0, 60, 0, 0, 1]),
        r=np.eye(3).reshape(-1),
        p=np.zeros(12),
        binning_x=0,
        binning_y=0,
        roi=T["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False),
    )


def _shifted(pose: np.ndarray) -> np.ndarray:
    """``pose`` moved by SHIFT_M along map x and rotated by SHIFT_DEG about its own z axis."""
    half = math.radians(SHIFT_DEG) / 2
    rot = np.array([0, 0, 0, math.cos(half), 0, 0, math.sin(half)])
    out = geometry.pose_compose(pose, rot)
    out[0] += SHIFT_M
    return out


def _odom_to_cam(map_T_cam: np.ndarray) -> np.ndarray:
    return geometry.pose_compose(geometry.pose_inverse(ODOM), map_T_cam)


def _stamp(i: int) -> int:
    return T0_NS + i * PERIOD_NS


def write_eval_bag(
    path: Path,
    frames: list[np.ndarray],
    gt: list[np.ndarray],
    compressed: bool = False,
    tf: bool = False,
    storage: str = "sqlite3",
) -> Path:
    """Images (+ camera info) at 10 Hz; ground truth as PoseStamped (1 ms after the image) or as TF.

    With ``tf``: a static map -> odom and a dynamic odom -> cam at the image stamps (so the chain map -> cam at the
    image stamp is the ground truth exactly); the frames without ground truth get no TF (the chain cannot be
    extrapolated that far).
    """
    from rosbags.rosbag2 import StoragePlugin, Writer

    ts = _ts()
    T = ts.types
    odom = ODOM
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(path, version=9, storage_plugin=plugin) as w:
        msgtype = "sensor_msgs/msg/CompressedImage" if compressed else "sensor_msgs/msg/Image"
        topic = IMAGE_TOPIC + "/compressed" if compressed else IMAGE_TOPIC
        ci = w.add_connection(topic, msgtype, typestore=ts)
        cc = w.add_connection(INFO_TOPIC, "sensor_msgs/msg/CameraInfo", typestore=ts)
        if tf:
            ctf = w.add_connection("/tf", "tf2_msgs/msg/TFMessage", typestore=ts)
            cst = w.add_connection("/tf_static", "tf2_msgs/msg/TFMessage", typestore=ts)
            pos, q = _pose_msgs(ts, odom)
            static = T["geometry_msgs/msg/TransformStamped"](
                header=_header(ts, T0_NS, "map"),
                child_frame_id="odom",
                transform=T["geometry_msgs/msg/Transform"](
                    translation=T["geometry_msgs/msg/Vector3"](x=pos.x, y=pos.y, z=pos.z), rotation=q
                ),
            )
            w.write(
                cst,
                T0_NS - 1,
                ts.serialize_cdr(T["tf2_msgs/msg/TFMessage"](transforms=[static]), "tf2_msgs/msg/TFMessage"),
            )
        else:
            cg = w.add_connection(GT_TOPIC, "geometry_msgs/msg/PoseStamped", typestore=ts)
        for i, rgb in enumerate(frames):
            t = _stamp(i)
            kind, msg = _image_msg(ts, rgb, t, compressed)
            w.write(ci, t, ts.serialize_cdr(msg, kind))
            w.write(cc, t, ts.serialize_cdr(_camera_info(ts, t), "sensor_msgs/msg/CameraInfo"))
            no_gt = i >= len(frames) - N_NO_GT
            gt_ns = t + (200_000_000 if no_gt else 1_000_000)
            if tf and not no_gt:
                pos, q = _pose_msgs(ts, _odom_to_cam(gt[i]))
                tfm = T["geometry_msgs/msg/TransformStamped"](
                    header=_header(ts, t, "odom"),
                    child_frame_id="cam",
                    transform=T["geometry_msgs/msg/Transform"](
                        translation=T["geometry_msgs/msg/Vector3"](x=pos.x, y=pos.y, z=pos.z), rotation=q
                    ),
                )
                w.write(
                    ctf, t, ts.serialize_cdr(T["tf2_msgs/msg/TFMessage"](transforms=[tfm]), "tf2_msgs/msg/TFMessage")
                )
            elif not tf:
                pos, q = _pose_msgs(ts, gt[i])
                ps = T["geometry_msgs/msg/PoseStamped"](
                    header=_header(ts, gt_ns, "map"), pose=T["geometry_msgs/msg/Pose"](position=pos, orientation=q)
                )
                w.write(cg, gt_ns, ts.serialize_cdr(ps, "geometry_msgs/msg/PoseStamped"))
    return path


@pytest.fixture(scope="module")
def frames(reference_dir) -> list[np.ndarray]:
    from PIL import Image as PILImage

    imgs = [
        np.asarray(PILImage.open(reference_dir / "raw_images" / f"raw_{i}.png").convert("RGB").resize((160, 120)))
        for i in range(4)
    ]
    return [imgs[i % 4] for i in range(N_FRAMES)]


@pytest.fixture(scope="module")
def estimates(checkpoint, frames):
    """Localize every frame with the Localizer as the CLI and the node run it (torch CPU, 1 thread)."""
    import torch

    from apr_localizer.localizer import Localizer, LocalizerOptions

    threads = torch.get_num_threads()
    loc = Localizer.from_files(checkpoint, options=LocalizerOptions(backend="torch", device="cpu", threads=1))
    try:
        out = [loc.localize(f) for f in frames]
    finally:
        loc.close()
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def ground_truth(estimates) -> list[np.ndarray]:
    return [e.pose.copy() if i % 2 == 0 else _shifted(e.pose) for i, e in enumerate(estimates)]


@pytest.fixture(scope="module")
def eval_bag(tmp_path_factory, frames, ground_truth) -> Path:
    return write_eval_bag(tmp_path_factory.mktemp("bags") / "eval_bag", frames, ground_truth)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _expected_errors(n_eval: int) -> tuple[np.ndarray, np.ndarray]:
    odd = np.arange(n_eval) % 2 == 1
    return np.where(odd, SHIFT_M, 0.0), np.where(odd, SHIFT_DEG, 0.0)


# --------------------------------------------------------------------------------------------- helpers (no ROS)
def test_header_stamp_is_patched_in_the_cdr_buffer():
    from rosbags.typesys import Stores, get_typestore

    from apr_training.bags.player import cdr_header_stamp_ns, set_cdr_header_stamp

    ts = get_typestore(Stores.ROS2_KILTED)
    _, msg = _image_msg(ts, np.zeros((2, 3, 3), np.uint8), 5_123_456_789, compressed=False)
    raw = ts.serialize_cdr(msg, "sensor_msgs/msg/Image")
    assert cdr_header_stamp_ns(raw) == 5_123_456_789
    patched = set_cdr_header_stamp(raw, 7_000_000_042)
    back = ts.deserialize_cdr(bytes(patched), "sensor_msgs/msg/Image")
    assert (back.header.stamp.sec, back.header.stamp.nanosec) == (7, 42)
    assert back.header.frame_id == "cam" and back.width == 3 and len(patched) == len(raw)


def test_ground_truth_lookup_nearest_and_tf_interpolation(tmp_path, frames, ground_truth):
    from apr_training.bags.ground_truth import GroundTruthError, load_ground_truth

    bag = write_eval_bag(tmp_path / "pose_bag", frames[:4], ground_truth[:4])
    gt = load_ground_truth(bag, f"pose:{GT_TOPIC}", tolerance_s=0.02)
    pose, dt = gt.lookup(_stamp(0))
    np.testing.assert_allclose(pose, ground_truth[0], atol=1e-12)
    assert dt == pytest.approx(1.0)  # nearest sample is 1 ms later
    assert gt.lookup(_stamp(2))[0] is None  # frame 2 of 4: its ground truth lies 0.2 s away (no-GT frames)
    assert load_ground_truth(bag, f"pose:{GT_TOPIC}", tolerance_s=0.5).lookup(_stamp(2))[0] is not None

    tf_bag = write_eval_bag(tmp_path / "tf_bag", frames[:6], ground_truth[:6], tf=True)
    tf = load_ground_truth(tf_bag, "tf:map->cam", tolerance_s=0.06)
    for i in range(3):
        np.testing.assert_allclose(tf.lookup(_stamp(i))[0], ground_truth[i], atol=1e-9)
    a, b = _odom_to_cam(ground_truth[1]), _odom_to_cam(ground_truth[2])
    for frac in (0.25, 0.5):  # between two samples of odom -> cam: linear position + slerp, then map -> odom
        mid, dt = tf.lookup(_stamp(1) + int(frac * PERIOD_NS))
        edge = np.concatenate([a[:3] + frac * (b[:3] - a[:3]), geometry.quat_slerp(a[3:], b[3:], frac)])
        np.testing.assert_allclose(mid, geometry.pose_compose(ODOM, edge), atol=1e-9)
        assert dt == pytest.approx(frac * PERIOD_NS * 1e-6)  # the offset is the distance to the nearest sample
    # every dynamic edge needs a sample within the tolerance (apr_localizer.tf_buffer): 50 ms away is too far at 20 ms
    assert load_ground_truth(tf_bag, "tf:map->cam", 0.02).lookup(_stamp(1) + PERIOD_NS // 2)[0] is None
    assert tf.lookup(_stamp(0) - 10**9)[0] is None  # before the first sample, beyond the tolerance
    assert tf.lookup(_stamp(4))[0] is None  # 0.1 s after the last sample > 0.02 s tolerance
    np.testing.assert_allclose(tf.lookup(_stamp(3) + 10**7)[0], ground_truth[3], atol=1e-9)  # held within 0.02 s

    with pytest.raises(GroundTruthError, match="TF has no frame 'nowhere'"):
        load_ground_truth(tf_bag, "tf:map->nowhere")
    with pytest.raises(GroundTruthError, match=f"has no topic /missing; topics are: .*{GT_TOPIC}"):
        load_ground_truth(bag, "pose:/missing")
    with pytest.raises(GroundTruthError, match="is not understood; expected pose:/topic"):
        load_ground_truth(bag, "/gt/pose")


# --------------------------------------------------------------------------------------------- offline
def test_offline_evaluation_has_the_known_answer(tmp_path, eval_bag, checkpoint, estimates):
    from apr_training.cli.eval_bag import main

    out = tmp_path / "offline"
    scene = estimates[1].scene_name
    argv = [
        "offline",
        "--model",
        str(checkpoint),
        "--bag",
        str(eval_bag),
        "--image-topic",
        IMAGE_TOPIC,
        "--gt",
        f"pose:{GT_TOPIC}",
        "--scene",
        scene,
        "--out",
        str(out),
        "--warmup",
        "0",
        "--quiet",
        *BACKEND,
    ]
    assert main(argv) == 0
    n_eval = N_FRAMES - N_NO_GT
    report = json.loads((out / "report.json").read_text())
    assert report["info"]["frames"] == n_eval and report["info"]["frames_without_gt"] == N_NO_GT
    assert report["info"]["images_read"] == N_FRAMES
    (method,) = report["methods"]
    assert method["name"] == "MS-Transformer"
    overall = method["overall"]
    pos, rot = _expected_errors(n_eval)
    assert overall["n"] == n_eval and overall["n_invalid"] == 0
    assert overall["median_position_m"] == pytest.approx(np.median(pos), abs=1e-5)
    assert overall["mean_position_m"] == pytest.approx(pos.mean(), abs=1e-5)
    assert overall["mean_orientation_deg"] == pytest.approx(rot.mean(), abs=1e-3)
    assert overall["within"]["0.1m/1deg"] == pytest.approx(0.5)
    assert overall["within"]["0.5m/5deg"] == pytest.approx(0.5)  # the shifted frames are 8 deg off
    assert overall["within"]["5m/10deg"] == pytest.approx(1.0)
    expected_acc = np.mean([e.scene_name == scene for e in estimates[:n_eval]])
    assert overall["scene_accuracy"] == pytest.approx(expected_acc)
    assert {"decode", "preprocess", "apr", "postprocess", "total"} <= set(overall["latency_ms"])
    assert overall["latency_ms"]["total"]["n"] == n_eval and overall["latency_ms"]["total"]["median"] > 0
    hint_ok = (pos <= 0.5) & (rot <= 10)
    assert method["hint"]["within_0_5m_10deg"] == pytest.approx(hint_ok.mean())
    assert method["hint"]["within_1_5m"] == pytest.approx((pos <= 1.5).mean())
    unc = method["uncertainty"]  # uncalibrated model: step_size, undefined for the APR estimate alone
    assert unc["score"] == "step_size" and unc["auroc"] is None and unc["within_1sigma"] is None

    rows = _read_csv(out / "frames.csv")
    assert [int(r["frame"]) for r in rows] == list(range(n_eval))
    for i, r in enumerate(rows):
        assert int(r["stamp_ns"]) == _stamp(i)
        assert float(r["apr_pos_err_m"]) == pytest.approx(pos[i], abs=1e-5)
        assert float(r["apr_rot_err_deg"]) == pytest.approx(rot[i], abs=1e-3)
        est = [float(r[f"apr_{c}"]) for c in ("x", "y", "z", "qw", "qx", "qy", "qz")]
        np.testing.assert_allclose(est, estimates[i].pose, atol=1e-6)
    table = (out / "table.txt").read_text()
    assert "MS-Transformer" in table and f"{scene}" in table and "frames_without_gt: 2" in table
    assert "# Evaluation report" in (out / "report.md").read_text()
    gt_lines = [ln for ln in (out / "tum" / "gt.txt").read_text().splitlines() if not ln.startswith("#")]
    assert len(gt_lines) == n_eval and float(gt_lines[0].split()[0]) == pytest.approx(_stamp(0) * 1e-9)
    assert (out / "tum" / "apr.txt").is_file() and not (out / "tum" / "iapr.txt").exists()
    for name in ("error_cdf.png", "trajectory.png", "errors.png"):
        assert (out / "plots" / name).stat().st_size > 1000


def test_offline_stride_and_input_errors(tmp_path, eval_bag, checkpoint, capsys):
    from apr_training.cli.eval_bag import main

    out = tmp_path / "stride"
    base = [
        "offline",
        "--model",
        str(checkpoint),
        "--bag",
        str(eval_bag),
        "--gt",
        f"pose:{GT_TOPIC}",
        "--warmup",
        "0",
        "--quiet",
        "--no-plots",
        *BACKEND,
    ]
    assert main([*base, "--image-topic", IMAGE_TOPIC, "--stride", "2", "--limit", "5", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    overall = report["methods"][0]["overall"]
    assert overall["n"] == 5 and overall["median_position_m"] == pytest.approx(0.0, abs=1e-5)  # even frames only
    assert [int(r["frame"]) for r in _read_csv(out / "frames.csv")] == [0, 2, 4, 6, 8]
    assert overall["scene_accuracy"] is None  # no --scene
    scored = [*base, "--image-topic", IMAGE_TOPIC, "--limit", "4", "--scores", "scene_prob,pae_gap"]
    assert main([*scored, "--out", str(tmp_path / "scores")]) == 0
    cands = json.loads((tmp_path / "scores" / "report.json").read_text())["uncertainty_candidates"]
    assert [c["score"] for c in cands] == ["scene_prob", "pae_gap"] and all(c["cost_ms_per_frame"] >= 0 for c in cands)
    with pytest.raises(SystemExit):
        main([*scored[:-1], "mystery", "--out", str(tmp_path / "bad_scores")])

    capsys.readouterr()
    assert main([*base, "--image-topic", "/nope", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "has no topic /nope" in err and IMAGE_TOPIC in err
    assert main([*base, "--image-topic", IMAGE_TOPIC, "--scene", "atlantis", "--out", str(tmp_path / "y")]) == 2
    assert "not one of the model's scenes" in capsys.readouterr().err
    bad = [*base, "--image-topic", IMAGE_TOPIC, "--out", str(tmp_path / "z")]
    bad[bad.index("--model") + 1] = str(tmp_path / "missing.safetensors")
    assert main(bad) == 2


def test_offline_reads_mcap_bags_and_bare_mcap_files(tmp_path, frames, ground_truth, checkpoint, offline_run):
    from apr_training.cli.eval_bag import main

    bag = write_eval_bag(tmp_path / "mcap_bag", frames[:4], ground_truth[:4], storage="mcap")
    (mcap_file,) = bag.glob("*.mcap")
    reference = _offline_poses(offline_run)
    for i, source in enumerate((bag, mcap_file)):
        out = tmp_path / f"out{i}"
        argv = [
            "offline",
            "--model",
            str(checkpoint),
            "--bag",
            str(source),
            "--image-topic",
            IMAGE_TOPIC,
            "--gt",
            f"pose:{GT_TOPIC}",
            "--out",
            str(out),
            "--warmup",
            "0",
            "--quiet",
            "--no-plots",
            *BACKEND,
        ]
        assert main(argv) == 0
        rows = _read_csv(out / "frames.csv")
        assert len(rows) == 2  # of 4 frames, the last two have no ground truth within the tolerance
        for stamp, (pose, pos_err, _) in _offline_poses(out).items():
            np.testing.assert_allclose(pose, reference[stamp][0], atol=1e-6)
            assert pos_err == pytest.approx(reference[stamp][1], abs=1e-6)


# --------------------------------------------------------------------------------------------- player (real rclpy)
@pytest.mark.ros
def test_bag_player_restamps_publishes_clock_and_recorder_writes_a_bag(tmp_path, eval_bag, ros_env, monkeypatch):
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import CameraInfo, Image

    from apr_training.bags.io import bag_topics
    from apr_training.bags.player import BagPlayer
    from apr_training.bags.recorder import TopicRecorder
    from apr_training.ros_harness import RosHarness

    monkeypatch.setenv("ROS_DOMAIN_ID", ros_env["ROS_DOMAIN_ID"])
    with RosHarness(name="player_test") as session:
        recorder = TopicRecorder(session.node, {IMAGE_TOPIC: Image, INFO_TOPIC: CameraInfo, "/clock": Clock}, raw=False)
        player = BagPlayer(eval_bag, session.node, [IMAGE_TOPIC, INFO_TOPIC], rate=4.0, restamp=True, clock=True)
        player.wait_for_subscribers(timeout=20.0)
        result = player.play()
        assert result.count(IMAGE_TOPIC) == N_FRAMES and result.count(INFO_TOPIC) == N_FRAMES
        span = (N_FRAMES - 1) * PERIOD_NS * 1e-9
        assert result.bag_span_s == pytest.approx(span)
        # the player's log (not the machine's speed): bag order, and no message sent before its scheduled time
        log = result.messages
        assert [m.bag_time_ns for m in log] == sorted(m.bag_time_ns for m in log)
        assert [m.send_time_ns for m in log] == sorted(m.send_time_ns for m in log)
        assert min(m.lateness_ms for m in log) > -1.0
        due = [m.send_time_ns - m.lateness_ms * 1e6 for m in log]  # the schedule the player logged
        for m, d in zip(log, due):  # rate 4: scheduled a quarter of the bag time after the first message
            assert d - due[0] == pytest.approx((m.bag_time_ns - log[0].bag_time_ns) / 4.0, abs=2e6)
        assert recorder.wait_for(lambda r: sum(x.topic != "/clock" for x in r) >= 2 * N_FRAMES, 20.0)
        images = recorder.messages(IMAGE_TOPIC)
        infos = recorder.messages(INFO_TOPIC)
        clocks = recorder.messages("/clock")
        played = result.on(IMAGE_TOPIC)
        for i, (msg, log) in enumerate(zip(images, played)):
            stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
            assert log.stamp_ns == _stamp(i) and stamp == log.sent_stamp_ns == log.send_time_ns
            assert abs(stamp - time.time_ns()) < 60 * 10**9  # wall-clock time, not the bag's 2023 stamps
        info_stamps = [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for m in infos]
        assert info_stamps == [m.sent_stamp_ns for m in played]  # image and camera info share the new stamp
        assert bytes(images[3].data) == bytes(np.asarray(_first_frames(eval_bag, 4)[3]).reshape(-1))
        assert len(clocks) >= 3
        clock_ns = [c.clock.sec * 10**9 + c.clock.nanosec for c in clocks]
        assert clock_ns == sorted(clock_ns) and _stamp(0) <= clock_ns[0] <= clock_ns[-1] <= _stamp(N_FRAMES) + 10**9
        recorder.close()
        out = recorder.write_bag(tmp_path / "recorded")
    topics = bag_topics(out)
    assert topics[IMAGE_TOPIC] == ("sensor_msgs/msg/Image", N_FRAMES)
    assert topics[INFO_TOPIC][1] == N_FRAMES


def _first_frames(bag: Path, n: int) -> list[np.ndarray]:
    from apr_training.bags.io import iter_images

    return [f.rgb for f in iter_images(bag, IMAGE_TOPIC, limit=n)]


# --------------------------------------------------------------------------------------------- live (node process)
def _run_cli(args: list[str], env: dict[str, str], timeout: float = 240.0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "apr_training.cli.eval_bag", *args]
    return subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def _offline_poses(out: Path) -> dict[int, tuple[np.ndarray, float, float]]:
    """Stamp → (estimate, position error, orientation error) of an offline run's frames.csv."""
    return {
        int(r["stamp_ns"]): (
            np.array([float(r[f"apr_{c}"]) for c in ("x", "y", "z", "qw", "qx", "qy", "qz")]),
            float(r["apr_pos_err_m"]),
            float(r["apr_rot_err_deg"]),
        )
        for r in _read_csv(out / "frames.csv")
    }


def _check_live(out: Path, proc: subprocess.CompletedProcess, offline: dict[int, tuple]) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    live = report["info"]["live"]
    n_gt = N_FRAMES - N_NO_GT
    assert live["images_played"] == N_FRAMES and live["node_exit_code"] == 0
    # every played image got a pose, or the node counted the frames it dropped
    assert live["poses_received"] == N_FRAMES or N_FRAMES - live["poses_received"] <= live["node_dropped_frames"]
    assert live["poses_received"] >= N_FRAMES // 2
    assert live["frames_without_gt"] == N_NO_GT
    assert live["poses_not_matching_an_image"] == 0
    lat = live["end_to_end_latency_ms"]
    assert lat["n"] == live["evaluated_frames"] > 0 and 0 < lat["median"] <= lat["p90"] <= lat["max"] < 10_000
    rows = _read_csv(out / "frames.csv")
    assert len(rows) == live["evaluated_frames"] <= n_gt
    for r in rows:  # the node's poses (and errors) equal the offline run's (same model, backend and threads)
        pose = np.array([float(r[f"live_{c}"]) for c in ("x", "y", "z", "qw", "qx", "qy", "qz")])
        ref_pose, ref_pos_err, ref_rot_err = offline[int(r["stamp_ns"])]
        np.testing.assert_allclose(pose, ref_pose, atol=1e-4)
        assert float(r["live_pos_err_m"]) == pytest.approx(ref_pos_err, abs=1e-4)
        assert float(r["live_rot_err_deg"]) == pytest.approx(ref_rot_err, abs=1e-2)
        assert float(r["end_to_end_ms"]) > 0
    method = report["methods"][0]
    assert method["name"] == "localizer_node (live)" and method["overall"]["n"] == len(rows)
    assert "Live replay through localizer_node" in (out / "table.txt").read_text()
    assert "node exit code" in proc.stdout and "end-to-end latency" in proc.stdout
    assert (out / "played.csv").is_file() and (out / "node_params.yaml").is_file()
    assert "shut down" in (out / "node.log").read_text()
    assert (out / "plots" / "latency.png").stat().st_size > 1000
    return report


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory, eval_bag, checkpoint) -> Path:
    from apr_training.cli.eval_bag import main

    out = tmp_path_factory.mktemp("offline_ref")
    argv = [
        "offline",
        "--model",
        str(checkpoint),
        "--bag",
        str(eval_bag),
        "--image-topic",
        IMAGE_TOPIC,
        "--gt",
        f"pose:{GT_TOPIC}",
        "--out",
        str(out),
        "--warmup",
        "0",
        "--quiet",
        "--no-plots",
        *BACKEND,
    ]
    assert main(argv) == 0
    return out


@pytest.mark.ros
def test_live_replay_through_the_node_matches_offline(tmp_path, eval_bag, checkpoint, offline_run, ros_env):
    out = tmp_path / "live"
    env = dict(ros_env)
    env.pop("ROS_LOG_DIR")  # the command must set a temporary one itself (and say so)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    proc = _run_cli(
        [
            "live",
            "--model",
            str(checkpoint),
            "--bag",
            str(eval_bag),
            "--image-topic",
            IMAGE_TOPIC,
            "--gt",
            f"pose:{GT_TOPIC}",
            "--out",
            str(out),
            *BACKEND,
        ],
        env,
    )
    report = _check_live(out, proc, _offline_poses(offline_run))
    pos, rot = _expected_errors(N_FRAMES - N_NO_GT)
    for r in _read_csv(out / "frames.csv"):  # the known answer, as offline
        assert float(r["live_pos_err_m"]) == pytest.approx(pos[int(r["frame"])], abs=1e-4)
        assert float(r["live_rot_err_deg"]) == pytest.approx(rot[int(r["frame"])], abs=1e-2)
        assert float(r["sigma_position_m"]) > 0 and float(r["sigma_orientation_rad"]) > 0  # the published covariance
    (method,) = report["methods"]
    hint_ok = (pos <= 0.5) & (rot <= 10)
    got = [int(r["frame"]) for r in _read_csv(out / "frames.csv")]
    assert method["hint"]["within_0_5m_10deg"] == pytest.approx(hint_ok[got].mean())
    unc = method["uncertainty"]
    assert unc["score"] == "published_sigma" and not unc["calibrated"] and unc["within_2sigma"] is None
    assert "apr-eval-bag: set ROS_LOG_DIR=" in proc.stderr
    live = report["info"]["live"]
    assert live["stamps"] == "restamped with the send time"
    assert report["info"]["played_topics"] == [IMAGE_TOPIC, INFO_TOPIC]  # camera_info found next to the images
    params = (out / "node_params.yaml").read_text()
    assert str(checkpoint.resolve()) in params and "autostart: true" in params and IMAGE_TOPIC in params


@pytest.mark.ros
@pytest.mark.slow
def test_live_compressed_images_tf_ground_truth_and_recorded_stamps(
    tmp_path, frames, ground_truth, checkpoint, ros_env
):
    from apr_training.cli.eval_bag import main

    bag = write_eval_bag(tmp_path / "jpeg_tf_bag", frames, ground_truth, compressed=True, tf=True)
    topic = IMAGE_TOPIC + "/compressed"
    offline = tmp_path / "offline"
    assert (
        main(
            [
                "offline",
                "--model",
                str(checkpoint),
                "--bag",
                str(bag),
                "--image-topic",
                topic,
                "--gt",
                "tf:map->cam",
                "--out",
                str(offline),
                "--warmup",
                "0",
                "--quiet",
                "--no-plots",
                *BACKEND,
            ]
        )
        == 0
    )
    assert json.loads((offline / "report.json").read_text())["info"]["frames_without_gt"] == N_NO_GT
    out = tmp_path / "live"
    extra = tmp_path / "extra.yaml"
    extra.write_text("/**:\n  ros__parameters:\n    publish_tf: false\n    min_confidence: 0.0\n")
    proc = _run_cli(
        [
            "live",
            "--model",
            str(checkpoint),
            "--bag",
            str(bag),
            "--image-topic",
            topic,
            "--gt",
            "tf:map->cam",
            "--out",
            str(out),
            "--keep-stamps",
            "--rate",
            "1.5",
            "--params",
            str(extra),
            "--camera-info-topic",
            "none",
            *BACKEND,
        ],
        ros_env,
    )
    report = _check_live(out, proc, _offline_poses(offline))
    assert report["info"]["live"]["stamps"] == "recorded stamps kept (--keep-stamps)"
    assert report["info"]["played_topics"] == [topic]
    assert str(extra) in report["info"]["node_params_files"]
    log = (out / "node.log").read_text()
    assert "CompressedImage" in log


@pytest.mark.ros
@pytest.mark.slow
def test_live_fails_clearly_when_the_model_cannot_be_loaded(tmp_path, eval_bag, ros_env):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a model at all")
    out = tmp_path / "live_bad"
    proc = _run_cli(
        [
            "live",
            "--model",
            str(bad),
            "--bag",
            str(eval_bag),
            "--image-topic",
            IMAGE_TOPIC,
            "--gt",
            f"pose:{GT_TOPIC}",
            "--out",
            str(out),
            "--startup-timeout",
            "60",
            *BACKEND,
        ],
        ros_env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "configure failed" in proc.stderr and str(bad) in proc.stderr
    # failed on the node's diagnostics (exit 2), not on the start-up timeout (exit 3, "apr-eval-bag: timeout:")
    assert "apr-eval-bag: timeout" not in proc.stderr and "did not become active" not in proc.stderr
    assert "shut down" in (out / "node.log").read_text()  # the node was stopped with SIGINT

    proc = _run_cli(
        [
            "live",
            "--model",
            str(bad),
            "--bag",
            str(eval_bag),
            "--image-topic",
            "/nope",
            "--gt",
            f"pose:{GT_TOPIC}",
            "--out",
            str(out),
        ],
        ros_env,
        timeout=60,
    )
    assert proc.returncode == 2 and "has no topic /nope" in proc.stderr


def test_replay_launch_file_compiles_and_names_existing_things():
    import ast
    import re

    path = REPO_ROOT / "launch" / "replay_eval.launch.py"
    source = path.read_text()
    compile(source, str(path), "exec")  # launch/launch_ros cannot be installed here: byte-compile only
    tree = ast.parse(source)
    constants = {
        t.id: n.value.value
        for n in tree.body
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    assert f"<name>{constants['PACKAGE']}</name>" in (REPO_ROOT / "package.xml").read_text()
    setup_py = (REPO_ROOT / "setup.py").read_text()
    assert re.search(rf'"{constants["EXECUTABLE"]}\s*=\s*apr_localizer\.node:main"', setup_py)
    assert re.search(r'glob\("launch/\*\.py"\)', setup_py)  # installed with the package
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    joined = [
        [getattr(a, "value", None) for a in c.args[1:]]
        for c in calls
        if isinstance(c.func, ast.Attribute) and c.func.attr == "join" and len(c.args) > 1
    ]
    assert ["config", "localizer.yaml"] in joined and (REPO_ROOT / "config" / "localizer.yaml").is_file()
    arguments = {c.args[0].value for c in calls if getattr(c.func, "id", "") == "DeclareLaunchArgument"}
    assert arguments >= {"bag", "model", "params_file", "rate", "image_topic"}
    assert '"ros2", "bag", "play"' in source and '"--clock"' in source and '"use_sim_time": True' in source
    assert "OnStateTransition" in source and 'goal_state="active"' in source
