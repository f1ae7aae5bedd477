"""The localizer node as a real process: lifecycle, poses/TF/covariance, relocalize, bad inputs, flood, SIGINT.

The node runs ``localizer_node --ros-args --params-file <tmp yaml>`` (or ``python -m apr_localizer.node``) with the
reference MS-Transformer checkpoint (random weights, 7 scenes) on the torch CPU backend; this test process publishes
images and subscribes to the outputs through :class:`ros_harness.RosHarness` on a private ROS domain, and runs the
same :class:`Localizer` directly to check the published poses. Every wait is on a count or predicate with a timeout.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped
from rcl_interfaces.msg import Parameter as ParameterMsg
from rcl_interfaces.msg import ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_srvs.srv import Trigger

from apr_localizer import geometry, ros_convert
from apr_training.ros_harness import (
    WAIT_S,
    NodeProcess,
    RosHarness,
    diag_values,
    send_until,
    wait_until,
    write_params,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
NODE = "apr_localizer"
IMAGE_TOPIC = "/test/camera/image_raw"
CAMERA_FRAME = "cam_optical"
POS_VAR = [0.1, 0.2, 0.3]
ROT_VAR = [0.01, 0.02, 0.03]
ATOL = 1e-4
RELIABLE = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)

try:
    from tf2_msgs.msg import TFMessage
except ImportError:  # pragma: no cover - the infra build provides it
    TFMessage = None


# --------------------------------------------------------------------------------------------- fixtures
def _base_params(checkpoint: Path, **extra) -> dict:
    params = {
        "autostart": False,
        "model": {"path": str(checkpoint)},
        "backend": "torch",
        "device": "cpu",
        "threads": 1,
        "image_topic": IMAGE_TOPIC,
        "qos": "reliable",
        "qos_depth": 1,
        "map_frame": "map",
        "camera_frame": "",
        "base_frame": "",
        "output_pose": "camera",  # these tests check the camera pose itself (the base pose: test_node_integration)
        "min_confidence": 0.0,
        "covariance": {"position": POS_VAR, "orientation": ROT_VAR, "scale_by_confidence": True},
        "publish_tf": True,
        "tf_mode": "map_to_camera",
        "relocalize": {"samples": 3, "timeout_s": 30.0},
        "initialpose_topic": "/initialpose",
        "diagnostics_period_s": 0.25,
    }
    params.update(extra)
    return params


class Outputs:
    """Subscriptions of the test process to everything the main node publishes."""

    def __init__(self, h: RosHarness):
        self.h = h
        self.poses = h.subscribe(PoseStamped, f"/{NODE}/pose", RELIABLE)
        self.pose_covs = h.subscribe(PoseWithCovarianceStamped, f"/{NODE}/pose_with_covariance", RELIABLE)
        self.tfs = h.subscribe(TFMessage, "/tf", QoSProfile(depth=100)) if TFMessage is not None else []
        self.diags = h.subscribe(DiagnosticArray, "/diagnostics", 50)
        self.initialposes = h.subscribe(PoseWithCovarianceStamped, "/initialpose", RELIABLE)
        self.image_pub = h.publisher(Image, IMAGE_TOPIC, RELIABLE)

    def diag(self) -> dict[str, str] | None:
        """Return the latest diagnostics of the node."""
        msgs = self.h.snapshot(self.diags)
        for msg in reversed(msgs):
            values = diag_values(msg, NODE)
            if values is not None:
                return values
        return None

    def wait_diag(self, predicate, what: str, timeout: float = WAIT_S) -> dict[str, str]:
        def check():
            d = self.diag()
            return d if d is not None and predicate(d) else None

        return wait_until(check, timeout, what)

    def publish_and_wait_pose(self, msg: Image, timeout: float = WAIT_S) -> PoseStamped:
        """Publish one image and wait for the pose carrying its stamp."""
        self.image_pub.publish(msg)
        return wait_until(lambda: _with_stamp(self.h.snapshot(self.poses), msg.header.stamp), timeout, "the pose")


def _with_stamp(msgs: list, stamp: Time):
    for m in msgs:
        if m.header.stamp == stamp:
            return m
    return None


def _count_stamp(msgs: list, stamp: Time) -> int:
    return sum(m.header.stamp == stamp for m in msgs)


def _now() -> Time:
    return ros_convert.ns_to_time(time.time_ns())


@pytest.fixture(scope="module")
def main_node(tmp_path_factory, node_env, harness, checkpoint):
    """Start the node (autostart false), configure + activate it from this process; SIGINT must exit 0."""
    tmp = tmp_path_factory.mktemp("main_node")
    params = write_params(tmp / "params.yaml", _base_params(checkpoint))
    # the shipped defaults first, the test's values on top (the later --params-file wins)
    node = NodeProcess([REPO_ROOT / "config" / "localizer.yaml", params], node_env, tmp / "node.log")
    outputs = Outputs(harness)
    try:
        assert harness.lifecycle_state(NODE) == "unconfigured"
        assert harness.change_state(NODE, "configure"), node.log()
        assert harness.change_state(NODE, "activate"), node.log()
        harness.wait_subscribers(outputs.image_pub)
        yield node, outputs
    finally:
        code = node.stop()
        log = node.log()
    assert code == 0, log
    assert "shut down" in log


# --------------------------------------------------------------------------------------------- tests: main node
@pytest.mark.ros
def test_lifecycle_transitions_from_another_process(main_node, harness, frames):
    node, out = main_node
    assert harness.lifecycle_state(NODE) == "active"
    assert harness.change_state(NODE, "deactivate")
    assert harness.lifecycle_state(NODE) == "inactive"
    harness.wait_no_subscribers(out.image_pub)  # the image subscription is released on deactivate
    out.wait_diag(lambda d: d["state"] == "inactive", "diagnostics reporting inactive")
    assert harness.change_state(NODE, "activate")
    assert harness.lifecycle_state(NODE) == "active"
    harness.wait_subscribers(out.image_pub)
    pose = out.publish_and_wait_pose(ros_convert.rgb_to_image(frames[0], stamp=_now(), frame_id=CAMERA_FRAME))
    assert pose.header.frame_id == "map"
    assert node.alive()


@pytest.mark.ros
def test_one_pose_covariance_and_tf_per_image_matching_direct_localizer(main_node, harness, frames, direct):
    node, out = main_node
    stamps = [Time(sec=1_000 + i, nanosec=123_456 * (i + 1)) for i in range(len(frames))]
    for rgb, stamp in zip(frames, stamps):
        out.publish_and_wait_pose(ros_convert.rgb_to_image(rgb, "rgb8", stamp=stamp, frame_id=CAMERA_FRAME))
    for stamp in stamps:
        wait_until(lambda s=stamp: _with_stamp(harness.snapshot(out.pose_covs), s), WAIT_S, "pose_with_covariance")
        if TFMessage is not None:
            wait_until(
                lambda s=stamp: any(t.header.stamp == s for m in harness.snapshot(out.tfs) for t in m.transforms),
                WAIT_S,
                "the TF",
            )
    poses, covs, tfs = harness.snapshot(out.poses), harness.snapshot(out.pose_covs), harness.snapshot(out.tfs)
    for rgb, stamp in zip(frames, stamps):
        est = direct.localize(rgb)
        expected = np.concatenate([est.pose[:3], geometry.quat_to_ros(est.pose[3:])])
        assert _count_stamp(poses, stamp) == 1 and _count_stamp(covs, stamp) == 1
        pose = _with_stamp(poses, stamp)
        assert pose.header.frame_id == "map"
        p, o = pose.pose.position, pose.pose.orientation
        np.testing.assert_allclose([p.x, p.y, p.z, o.x, o.y, o.z, o.w], expected, atol=ATOL)

        cov_msg = _with_stamp(covs, stamp)
        assert cov_msg.header.frame_id == "map"
        np.testing.assert_allclose(ros_convert.pose_from_msg(cov_msg.pose.pose), est.pose, atol=ATOL)
        cov = np.asarray(cov_msg.pose.covariance).reshape(6, 6)
        np.testing.assert_allclose(np.diag(cov), np.r_[POS_VAR, ROT_VAR] / max(est.confidence, 1e-3), rtol=1e-3)
        assert np.count_nonzero(cov - np.diag(np.diag(cov))) == 0

        if TFMessage is not None:
            matching = [t for m in tfs for t in m.transforms if t.header.stamp == stamp]
            assert len(matching) == 1
            tf = matching[0]
            assert (tf.header.frame_id, tf.child_frame_id) == ("map", CAMERA_FRAME)
            np.testing.assert_allclose(ros_convert.transform_from_msg(tf), est.pose, atol=ATOL)
    assert node.alive()


def _set_param(harness: RosHarness, name: str, value) -> tuple[bool, str]:
    if isinstance(value, float):
        pv = ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=value)
    else:
        pv = ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=value)
    req = SetParameters.Request(parameters=[ParameterMsg(name=name, value=pv)])
    result = harness.call(SetParameters, f"/{NODE}/set_parameters", req).results[0]
    return result.successful, result.reason


@pytest.mark.ros
def test_parameters_are_validated_and_relocalize_times_out_without_images(main_node, harness):
    node, out = main_node
    ok, reason = _set_param(harness, "tf_mode", "map_to_nowhere")
    assert not ok and "tf_mode must be one of" in reason
    ok, reason = _set_param(harness, "min_confidence", 1.5)  # outside the descriptor's range
    assert not ok
    assert _set_param(harness, "relocalize.timeout_s", 0.5)[0]
    try:
        response = harness.call(Trigger, f"/{NODE}/relocalize", Trigger.Request())
    finally:
        assert _set_param(harness, "relocalize.timeout_s", 30.0)[0]
    assert not response.success
    assert "got 0 of 3" in response.message and "nothing published" in response.message
    assert harness.count(out.initialposes) == 0


@pytest.mark.ros
def test_estimates_below_min_confidence_are_counted_not_published(main_node, harness, frames):
    node, out = main_node
    base = int(out.wait_diag(lambda d: True, "diagnostics")["low_confidence"])
    assert _set_param(harness, "min_confidence", 1.0)[0]  # dynamic: applies to the next frame
    try:
        stamp = _now()
        out.image_pub.publish(ros_convert.rgb_to_image(frames[0], stamp=stamp, frame_id=CAMERA_FRAME))
        out.wait_diag(lambda d: int(d["low_confidence"]) == base + 1, "the low-confidence count")
    finally:
        assert _set_param(harness, "min_confidence", 0.0)[0]
    following = out.publish_and_wait_pose(ros_convert.rgb_to_image(frames[0], stamp=_now(), frame_id=CAMERA_FRAME))
    assert following.header.stamp != stamp
    assert _with_stamp(harness.snapshot(out.poses), stamp) is None  # the pose of a later frame came, not this one


@pytest.mark.ros
def test_relocalize_publishes_exactly_one_initialpose(main_node, harness, frames, direct):
    node, out = main_node
    stop = threading.Event()

    def stream() -> None:  # 10 Hz of frame 0 with fresh stamps while the service collects
        while not stop.wait(0.1):
            out.image_pub.publish(ros_convert.rgb_to_image(frames[0], stamp=_now(), frame_id=CAMERA_FRAME))

    before = harness.count(out.initialposes)
    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    try:
        response = harness.call(Trigger, f"/{NODE}/relocalize", Trigger.Request(), timeout=60.0)
    finally:
        stop.set()
        thread.join()
    assert response.success, response.message
    assert "n=3" in response.message and "scene" in response.message and "spread" in response.message
    harness.wait_count(out.initialposes, before + 1, what="/initialpose")
    # "exactly one": the node's own counter says one relocalization; no second message follows it
    out.wait_diag(lambda d: d["relocalizations"] == "1", "relocalizations == 1 in diagnostics")
    n_diag = harness.count(out.diags)
    harness.wait_count(out.diags, n_diag + 2, what="two more diagnostics")
    assert harness.count(out.initialposes) == before + 1
    msg = harness.snapshot(out.initialposes)[-1]
    assert msg.header.frame_id == "map"
    est = direct.localize(frames[0])
    np.testing.assert_allclose(ros_convert.pose_from_msg(msg.pose.pose), est.pose, atol=ATOL)  # identical frames
    assert est.scene_name in response.message
    cov = np.diag(np.asarray(msg.pose.covariance).reshape(6, 6))
    assert np.all(cov >= np.r_[POS_VAR, ROT_VAR] / max(est.confidence, 1e-3) * (1 - 1e-6))


def _raw_msg(encoding: str, width: int, height: int, step: int, data_len: int) -> Image:
    msg = Image(height=height, width=width, encoding=encoding, step=step)
    msg.header.frame_id = CAMERA_FRAME
    msg.header.stamp = _now()
    msg.data = ros_convert.uint8_array(bytes(data_len))
    return msg


BAD_IMAGES = [  # (what, _raw_msg arguments (encoding, width, height, step, data bytes), expected reason)
    ("unknown encoding", ("16UC3", 64, 48, 64 * 6, 64 * 6 * 48), "not supported"),
    ("truncated data", ("rgb8", 640, 480, 1920, 1920 * 100), "truncated"),
    ("zero size", ("rgb8", 0, 0, 0, 0), "empty"),
    ("step smaller than width", ("rgb8", 640, 480, 100, 1920 * 480), "step"),
    ("50 megapixels", ("rgb8", 8660, 5774, 8660 * 3, 4096), "megapixels"),  # rejected from the header alone
]


@pytest.mark.ros
def test_bad_inputs_are_counted_and_the_node_keeps_localizing(main_node, harness, frames):
    node, out = main_node
    base = int(out.wait_diag(lambda d: True, "diagnostics")["rejected_messages"])
    for k, (what, spec, reason) in enumerate(BAD_IMAGES, start=1):
        out.image_pub.publish(_raw_msg(*spec))
        d = out.wait_diag(lambda d, n=base + k: int(d["rejected_messages"]) >= n, f"rejection of {what}")
        assert int(d["rejected_messages"]) == base + k, d
        assert reason in d["last_reject_reason"], (what, d["last_reject_reason"])
        assert node.alive(), node.log()
    pose = out.publish_and_wait_pose(ros_convert.rgb_to_image(frames[1], stamp=_now(), frame_id=CAMERA_FRAME))
    assert pose.header.frame_id == "map"
    assert "dropped an input image" in node.log()  # logged (throttled)


@pytest.mark.ros
def test_hostile_headers_are_rejected_truncated_and_never_reach_tf(main_node, harness, frames):
    node, out = main_node
    base = int(out.wait_diag(lambda d: True, "diagnostics")["rejected_messages"])
    long_encoding = _raw_msg("x" * 65536, 64, 48, 64 * 3, 64 * 3 * 48)
    long_frame = ros_convert.rgb_to_image(frames[0], stamp=_now(), frame_id="f" * 65536)
    future = ros_convert.rgb_to_image(frames[0], stamp=ros_convert.ns_to_time(time.time_ns() + 3600 * 10**9))
    zero = ros_convert.rgb_to_image(frames[0], stamp=Time(sec=0, nanosec=0), frame_id=CAMERA_FRAME)
    for k, (msg, reason) in enumerate(
        [(long_encoding, "not supported"), (long_frame, "header.frame_id"), (future, "future"), (zero, "zero")], 1
    ):
        out.image_pub.publish(msg)
        d = out.wait_diag(lambda d, n=base + k: int(d["rejected_messages"]) >= n, f"rejection {k}")
        assert reason in d["last_reject_reason"] and len(d["last_reject_reason"]) < 400, d["last_reject_reason"]
        assert all(len(v) < 400 for v in d.values() if isinstance(v, str))
    # stamps.invalid receive_time: the zero-stamped frame is localized with the receive time, flagged, never on TF
    assert _set_param(harness, "stamps.invalid", "receive_time")[0]
    try:
        sent_ns = time.time_ns()
        out.image_pub.publish(ros_convert.rgb_to_image(frames[0], stamp=Time(sec=0, nanosec=0), frame_id=CAMERA_FRAME))
        d = out.wait_diag(lambda d: int(d["stamps_replaced"]) >= 1, "stamps_replaced")
        pose = wait_until(
            lambda: next(
                (p for p in harness.snapshot(out.poses) if ros_convert.time_to_ns(p.header.stamp) >= sent_ns), None
            ),
            WAIT_S,
            "the pose of the re-stamped frame",
        )
    finally:
        assert _set_param(harness, "stamps.invalid", "reject")[0]
    restamped = pose.header.stamp
    assert not any(t.header.stamp == restamped for m in harness.snapshot(out.tfs) for t in m.transforms)
    assert not any(len(t.child_frame_id) > 255 for m in harness.snapshot(out.tfs) for t in m.transforms)
    assert node.alive()


@pytest.mark.ros
@pytest.mark.slow
def test_flood_200hz_drops_are_counted_and_memory_stays_flat(main_node, harness, frames):
    import psutil

    node, out = main_node
    proc = psutil.Process(node.pid)
    before = out.wait_diag(lambda d: True, "diagnostics")
    msg = ros_convert.rgb_to_image(frames[2], stamp=_now(), frame_id=CAMERA_FRAME)
    rate, duration = 200.0, 20.0
    start_ns = time.time_ns()
    t0 = time.monotonic()
    sent, rss = 0, []
    while (now := time.monotonic() - t0) < duration:
        due = sent / rate
        if due > now:
            time.sleep(due - now)
        msg.header.stamp = _now()
        out.image_pub.publish(msg)
        sent += 1
        if sent % int(rate) == 0:
            rss.append(proc.memory_info().rss)
    elapsed = time.monotonic() - t0
    flood_poses = [p for p in harness.snapshot(out.poses) if ros_convert.time_to_ns(p.header.stamp) >= start_ns]
    after = out.wait_diag(
        lambda d: (
            int(d["frames_received"]) + int(d["dropped_in_transport"])
            >= int(before["frames_received"]) + int(before["dropped_in_transport"]) + int(0.95 * sent)
        ),
        "diagnostics accounting for the flood",
    )
    assert node.alive(), node.log()

    processed = int(after["frames_processed"]) - int(before["frames_processed"])
    dropped = int(after["dropped_frames"]) - int(before["dropped_frames"])
    print(
        f"\nflood: sent {sent} in {elapsed:.1f} s ({sent / elapsed:.0f} Hz); node processed {processed} "
        f"({processed / elapsed:.1f} Hz), dropped {dropped} (unprocessed {after['dropped_unprocessed']}, "
        f"in transport {after['dropped_in_transport']}); latency p50/p90/p99 {after['latency_ms_p50']}/"
        f"{after['latency_ms_p90']}/{after['latency_ms_p99']} ms; RSS MB {[round(r / 2**20) for r in rss]}"
    )
    # Counts, not the machine's speed: the flood outpaced the node (the condition for dropping), every frame is
    # accounted for as processed or dropped, and the node kept publishing at its own pace.
    assert processed < sent
    assert dropped > 0 and processed + dropped >= 0.95 * sent
    assert len(flood_poses) >= 10
    baseline, final = rss[3], rss[-1]  # after a few seconds of warm-up under load, and at the end
    assert final < baseline * 1.05 + 16 * 2**20, f"RSS grew from {baseline / 2**20:.0f} to {final / 2**20:.0f} MB"
    pose = out.publish_and_wait_pose(ros_convert.rgb_to_image(frames[3], stamp=_now(), frame_id=CAMERA_FRAME))
    assert pose.header.frame_id == "map"


# --------------------------------------------------------------------------------------------- other configurations
@pytest.mark.ros
def test_compressed_input_base_frame_hint_and_autostart(tmp_path, node_env, harness, checkpoint, frames, direct):
    base_xyz, base_q_xyzw = [0.1, -0.05, 0.5], [-0.5, 0.5, -0.5, 0.5]  # optical frame on a base (REP-103)
    params = _base_params(
        checkpoint,
        autostart=True,
        image_topic="/test2/image",
        image_transport="compressed",
        qos="sensor_data",  # best effort subscription (the reliable test publisher matches it)
        camera_frame="camera_optical",
        base_frame="base_link",
        output_pose="base",
        extrinsic_source="parameters",  # the hand-typed override (the TF source: test_node_integration)
        base_to_camera={"xyz": base_xyz, "quat_xyzw": base_q_xyzw},
        tf_mode="map_to_base",  # base_link has no other parent here
        hint={"enable": True, "trigger_topic": "/test2/trigger", "output_topic": "/test2/hint"},
    )
    name = "apr_localizer_compressed"  # renamed (-r __node:=): the main node is still running on this domain
    params_file = write_params(tmp_path / "params.yaml", params, node_name=name)
    node = NodeProcess(params_file, node_env, tmp_path / "node.log", extra_args=["-r", f"__node:={name}"])
    try:
        poses = harness.subscribe(PoseStamped, f"/{name}/pose", RELIABLE)
        hints = harness.subscribe(PoseWithCovarianceStamped, "/test2/hint", RELIABLE)
        tfs = harness.subscribe(TFMessage, "/tf", QoSProfile(depth=100)) if TFMessage is not None else []
        diags = harness.subscribe(DiagnosticArray, "/diagnostics", 50)
        pub = harness.publisher(CompressedImage, "/test2/image/compressed", RELIABLE)
        trigger = harness.publisher(PoseWithCovarianceStamped, "/test2/trigger", 10)
        harness.wait_subscribers(pub, timeout=60.0)  # autostart: configure + activate on its own
        harness.wait_subscribers(trigger)
        assert harness.lifecycle_state(name) == "active"

        garbage = CompressedImage(format="jpeg")
        garbage.data = ros_convert.uint8_array(b"\xff\xd8\xff\xe0 this is not a jpeg at all")
        # best-effort subscription: the first message after discovery may be lost, so it is resent until counted
        send_until(
            lambda: pub.publish(garbage),
            lambda _: any(
                (d := diag_values(m, name)) and int(d["rejected_messages"]) >= 1 for m in harness.snapshot(diags)
            ),
            what="the garbage CompressedImage to be rejected",
        )

        trigger.publish(PoseWithCovarianceStamped())  # cuVSLAM's trigger_hint type
        # The trigger and the images travel on different topics: keep sending frames until the hint comes back.
        sent_stamps = []
        deadline = time.monotonic() + WAIT_S
        while not harness.count(hints) and time.monotonic() < deadline:
            sent_stamps.append(_now())
            pub.publish(ros_convert.rgb_to_compressed(frames[1], "png", stamp=sent_stamps[-1], frame_id="ignored"))
            wait_until(lambda s=sent_stamps[-1]: _with_stamp(harness.snapshot(poses), s), WAIT_S, "the PNG's pose")
        hint = harness.wait_count(hints, 1, what="the hint")[0]
        stamp = hint.header.stamp
        assert stamp in sent_stamps
        pose = _with_stamp(harness.snapshot(poses), stamp)
        est = direct.localize(frames[1])  # PNG is lossless: same pixels, same estimate
        base_t_camera = np.r_[base_xyz, geometry.quat_from_ros(base_q_xyzw)]
        expected = geometry.camera_to_base(est.pose, base_t_camera)
        assert pose.header.frame_id == "map"
        np.testing.assert_allclose(ros_convert.pose_from_msg(pose.pose), expected, atol=ATOL)
        if TFMessage is not None:
            tf = wait_until(
                lambda: next((t for m in harness.snapshot(tfs) for t in m.transforms if t.header.stamp == stamp), None),
                WAIT_S,
                "the map -> base_link TF",
            )
            assert (tf.header.frame_id, tf.child_frame_id) == ("map", "base_link")
            np.testing.assert_allclose(ros_convert.transform_from_msg(tf), expected, atol=ATOL)
        assert hint.header.frame_id == "map"
        np.testing.assert_allclose(ros_convert.pose_from_msg(hint.pose.pose), expected, atol=ATOL)
        assert harness.count(hints) == 1
        assert node.alive()
    finally:
        code = node.stop()
    assert code == 0, node.log()


@pytest.mark.ros
def test_bad_model_fails_configure_and_the_node_stays_up(tmp_path, node_env, harness):
    bad = tmp_path / "broken_model.pth"
    bad.write_bytes(b"this is not a checkpoint")
    params = write_params(tmp_path / "params.yaml", {"autostart": True, "model": {"path": str(bad)}})
    name = "apr_localizer_bad_model"
    # python -m apr_localizer.node (the fallback to the console script), renamed beside the main node
    node = NodeProcess(params, node_env, tmp_path / "node.log", extra_args=["-r", f"__node:={name}"], module=True)
    try:
        node.wait_log("configure failed", timeout=60.0)
        diags = harness.subscribe(DiagnosticArray, "/diagnostics", 50)
        d = wait_until(
            lambda: next((v for m in harness.snapshot(diags) if (v := diag_values(m, name))), None),
            WAIT_S,
            "diagnostics of the unconfigured node",
        )
        assert d["state"] == "unconfigured" and d["_level"] == 2 and "configure failed" in d["_message"]
        assert harness.lifecycle_state(name) == "unconfigured"
        assert not harness.change_state(name, "configure")
        assert harness.lifecycle_state(name) == "unconfigured"
        assert node.alive()
    finally:
        code = node.stop()
    log = node.log()
    assert code == 0, log
    lines = [line for line in log.splitlines() if "configure failed" in line]
    assert lines and str(bad) in lines[0] and "Traceback" not in log


@pytest.mark.ros
def test_invalid_parameter_values_in_a_params_file_keep_the_node_up_and_refuse_configure(tmp_path, node_env, harness):
    name = "apr_localizer_bad_params"
    params = {"autostart": True, "backend": "tensorflow", "image_topic": "bad topic!!", "max_rate_hz": 5}
    params_file = write_params(tmp_path / "params.yaml", params, node_name=name)
    node = NodeProcess(params_file, node_env, tmp_path / "node.log", extra_args=["-r", f"__node:={name}"])
    try:
        node.wait_log("configure failed", timeout=60.0)
        log = node.log()
        assert "backend must be one of" in log and "parameter image_topic" in log
        assert "max_rate_hz has the wrong type" in log and "decimal point" in log
        diags = harness.subscribe(DiagnosticArray, "/diagnostics", 50)
        d = wait_until(
            lambda: next((v for m in harness.snapshot(diags) if (v := diag_values(m, name))), None),
            WAIT_S,
            "diagnostics of the node with bad parameters",
        )
        assert d["_level"] == 2 and "parameter" in d["_message"]
        assert harness.lifecycle_state(name) == "unconfigured"
        assert not harness.change_state(name, "configure")
        assert node.alive()
    finally:
        code = node.stop()
    assert code == 0, node.log()


@pytest.mark.ros
def test_relocalize_under_a_multithreaded_executor_in_process(node_env, harness, checkpoint, frames, direct):
    """Composed into a MultiThreadedExecutor, ~/relocalize waits in its own callback group while images flow."""
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from apr_localizer.node import LocalizerNode

    name, topic = "apr_localizer_inproc", "/test3/image"
    context = Context()
    rclpy.init(context=context, domain_id=int(node_env["ROS_DOMAIN_ID"]))
    overrides = [
        Parameter("model.path", value=str(checkpoint)),
        Parameter("backend", value="torch"),
        Parameter("device", value="cpu"),
        Parameter("threads", value=1),
        Parameter("image_topic", value=topic),
        Parameter("publish_tf", value=False),
        Parameter("output_pose", value="camera"),
        Parameter("relocalize.samples", value=2),
        Parameter("initialpose_topic", value="/test3/initialpose"),
    ]
    node = LocalizerNode(name, context=context, parameter_overrides=overrides)
    executor = MultiThreadedExecutor(num_threads=3, context=context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    stop = threading.Event()
    try:
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        initialposes = harness.subscribe(PoseWithCovarianceStamped, "/test3/initialpose", RELIABLE)
        pub = harness.publisher(Image, topic, RELIABLE)
        harness.wait_subscribers(pub)

        def stream() -> None:
            while not stop.wait(0.1):
                pub.publish(ros_convert.rgb_to_image(frames[2], stamp=_now(), frame_id=CAMERA_FRAME))

        threading.Thread(target=stream, daemon=True).start()
        response = harness.call(Trigger, f"/{name}/relocalize", Trigger.Request(), timeout=60.0)
        assert response.success, response.message
        msg = harness.wait_count(initialposes, 1, what="/test3/initialpose")[0]
        np.testing.assert_allclose(ros_convert.pose_from_msg(msg.pose.pose), direct.localize(frames[2]).pose, atol=ATOL)
    finally:
        stop.set()
        node.trigger_shutdown()
        executor.shutdown()
        node.destroy_node()
        context.try_shutdown()
        spinner.join(timeout=10.0)


# --------------------------------------------------------------------------------------------- config and launch
def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_config_file_declares_exactly_the_node_parameters_with_their_defaults():
    import yaml

    from apr_localizer import node_params

    data = yaml.safe_load((REPO_ROOT / "config" / "localizer.yaml").read_text())
    params = _flatten(data["/**"]["ros__parameters"])
    params.pop("use_sim_time")
    declared = {p.name: p.default for p in node_params.PARAMS}
    defaults = node_params.NodeConfig()
    for p in node_params.PARAMS:  # NodeConfig's defaults are the declared ones
        assert getattr(defaults, p.field) == p.default, p.name
    assert set(params) == set(declared)
    for name, value in params.items():
        assert type(value) is type(declared[name]), name  # same ROS parameter type (5 vs 5.0 matters)
        assert value == declared[name], name
        assert node_params.validate(name, value) is None


def test_launch_file_compiles_and_names_existing_files_and_executable():
    import ast
    import re

    path = REPO_ROOT / "launch" / "localize.launch.py"
    source = path.read_text()
    compile(source, str(path), "exec")  # byte-compiles (launch/launch_ros cannot be installed here)
    tree = ast.parse(source)
    constants = {
        t.id: n.value.value
        for n in tree.body
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
        for t in n.targets
        if isinstance(t, ast.Name)
    }

    def value(node):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return constants.get(node.id)
        return None

    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    node_calls = [c for c in calls if getattr(c.func, "id", "") == "LifecycleNode"]
    assert len(node_calls) == 1
    keywords = {kw.arg: value(kw.value) for kw in node_calls[0].keywords if kw.arg in ("package", "executable")}
    package_xml = (REPO_ROOT / "package.xml").read_text()
    assert f"<name>{keywords['package']}</name>" in package_xml
    setup_py = (REPO_ROOT / "setup.py").read_text()
    assert re.search(rf'"{keywords["executable"]}\s*=\s*apr_localizer\.node:main"', setup_py)

    joined = [
        [value(a) for a in c.args[1:]]
        for c in calls
        if isinstance(c.func, ast.Attribute) and c.func.attr == "join" and len(c.args) > 1
    ]
    data_paths = [parts for parts in joined if parts and parts[0] in ("config", "launch", "rviz")]
    assert data_paths, "the launch file names no config file"
    for parts in data_paths:
        assert all(isinstance(p, str) for p in parts)
        assert (REPO_ROOT.joinpath(*parts)).is_file(), parts
        assert re.search(rf'glob\("{parts[0]}/\*\.{parts[-1].rsplit(".", 1)[-1]}"\)', setup_py)  # installed

    assert ["rviz", "localizer.rviz"] in data_paths  # the shipped RViz2 config
    arguments = {value(c.args[0]) for c in calls if getattr(c.func, "id", "") == "DeclareLaunchArgument"}
    assert arguments >= {"model", "params_file", "image_topic", "namespace", "use_sim_time", "log_level"}
    assert arguments >= {"rviz", "managed", "publish_tf", "tf_mode", "base_frame", "output_pose"}
