"""The node on a robot's TF tree, as real processes: base pose, map -> odom, relocalize, cuVSLAM hints, namespaces.

Issue 10's "must show" list. The node runs the reference MS-Transformer (random weights, 7 scenes, torch CPU); this
process plays the robot: it publishes the camera extrinsic on ``/tf_static`` only, odometry ``odom -> base_link`` on
``/tf`` (moving or still), images, triggers; it computes the expected poses with the same :class:`Localizer`. Every
wait is on a count, stamp or value with a timeout; nothing asserts a duration.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped
from lifecycle_msgs.srv import GetState
from rcl_interfaces.msg import Parameter as ParameterMsg
from rcl_interfaces.msg import ParameterType, ParameterValue
from rcl_interfaces.srv import GetParameters, SetParameters
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_srvs.srv import Trigger

from apr_localizer import geometry, ros_convert
from apr_localizer.node_logic import yaw_of
from apr_training.ros_harness import (
    WAIT_S,
    NodeProcess,
    RosHarness,
    diag_values,
    send_until,
    wait_until,
    write_params,
)

pytestmark = pytest.mark.ros
tf2_msgs = pytest.importorskip("tf2_msgs.msg")
TFMessage = tf2_msgs.TFMessage

REPO_ROOT = Path(__file__).resolve().parents[1]
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
STATIC = QoSProfile(
    depth=10,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
    history=HistoryPolicy.KEEP_LAST,
)
# A forward-looking camera: optical frame (z forward, x right, y down) 0.2 m ahead of and 0.5 m above base_link.
BASE_T_CAMERA = np.r_[0.2, 0.0, 0.5, geometry.quat_from_ros([-0.5, 0.5, -0.5, 0.5])]
ODOM_YAW = 0.3
TOLERANCE_S = 2.0


# --------------------------------------------------------------------------------------------- fixtures
def _params(checkpoint: Path, **extra) -> dict:
    params = {
        "autostart": True,
        "model": {"path": str(checkpoint)},
        "backend": "torch",
        "device": "cpu",
        "threads": 1,
        "diagnostics_period_s": 0.25,
    }
    params.update(extra)
    return params


def _now() -> Time:
    return ros_convert.ns_to_time(time.time_ns())


def _ns(stamp: Time) -> int:
    return ros_convert.time_to_ns(stamp)


def _static_tf(harness: RosHarness, child: str):
    pub = harness.publisher(TFMessage, "/tf_static", STATIC)
    tf = ros_convert.transform_stamped(BASE_T_CAMERA, "base_link", child, _now())
    pub.publish(ros_convert.tf_message([tf]))
    return pub


class Odometry:
    """Publishes odom -> base_link on /tf at 50 Hz: still, or moving at ``speed`` m/s along the heading ODOM_YAW."""

    def __init__(self, harness: RosHarness) -> None:
        self.pub = harness.publisher(TFMessage, "/tf", QoSProfile(depth=100))
        self.speed = 0.0
        self.x0, self.t0 = 0.0, time.time_ns()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def pose_at(self, t_ns: int) -> np.ndarray:
        with self.lock:
            d = self.x0 + self.speed * (t_ns - self.t0) * 1e-9
        q = np.array([np.cos(ODOM_YAW / 2), 0.0, 0.0, np.sin(ODOM_YAW / 2)])
        return np.r_[1.0 + d * np.cos(ODOM_YAW), -2.0 + d * np.sin(ODOM_YAW), 0.0, q]

    def set_speed(self, speed: float) -> None:
        now = time.time_ns()
        with self.lock:
            self.x0 += self.speed * (now - self.t0) * 1e-9
            self.t0, self.speed = now, speed

    def _run(self) -> None:
        while not self.stop.wait(0.02):
            t = time.time_ns()
            tf = ros_convert.transform_stamped(self.pose_at(t), "odom", "base_link", ros_convert.ns_to_time(t))
            self.pub.publish(ros_convert.tf_message([tf]))


def _set_param(harness: RosHarness, node: str, name: str, value) -> tuple[bool, str]:
    if isinstance(value, float):
        pv = ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=value)
    else:
        pv = ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=value)
    req = SetParameters.Request(parameters=[ParameterMsg(name=name, value=pv)])
    result = harness.call(SetParameters, f"{node}/set_parameters", req).results[0]
    return result.successful, result.reason


def _with_stamp(msgs: list, stamp: Time):
    return next((m for m in msgs if m.header.stamp == stamp), None)


def _publish_image(pub, rgb: np.ndarray, frame_id: str = "cam") -> Time:
    """Publish ``rgb`` stamped now; return the stamp."""
    stamp = _now()
    pub.publish(ros_convert.rgb_to_image(rgb, stamp=stamp, frame_id=frame_id))
    return stamp


def _quat_mean(qs: np.ndarray) -> np.ndarray:
    """Markley's average of unit quaternions (eigenvector of sum q q^T), w >= 0: independent of geometry.py."""
    w, v = np.linalg.eigh(np.einsum("ni,nj->ij", qs, qs))
    q = v[:, np.argmax(w)]
    return q if q[0] >= 0 else -q


# --------------------------------------------------------------------------------------------- robot on a TF tree
@pytest.mark.slow
def test_base_pose_from_tf_static_map_to_odom_and_relocalize(tmp_path, node_env, harness, checkpoint, frames, direct):
    name, cam = "apr_robot", "robot_cam_optical"
    params = _params(
        checkpoint,
        image_topic="/robot/image",
        publish_tf=True,
        tf_mode="map_to_odom",
        tf_rate_hz=10.0,
        transform_tolerance_s=TOLERANCE_S,
        initialpose_topic="/robot/initialpose",
        relocalize={"samples": 3, "timeout_s": 6.0},
    )
    params_file = write_params(tmp_path / "params.yaml", params, node_name=name)
    odom = Odometry(harness)
    odom.set_speed(0.5)
    static_pub = _static_tf(harness, cam)
    tf_log: list[tuple[int, object]] = []  # (receive time ns, TransformStamped)

    def on_tf(msg) -> None:
        with harness.lock:
            tf_log.extend((time.time_ns(), t) for t in msg.transforms)

    harness.node.create_subscription(TFMessage, "/tf", on_tf, QoSProfile(depth=500))
    poses = harness.subscribe(PoseStamped, f"/{name}/pose", RELIABLE)
    diags = harness.subscribe(DiagnosticArray, "/diagnostics", 100)
    initialposes = harness.subscribe(PoseWithCovarianceStamped, "/robot/initialpose", RELIABLE)
    image_pub = harness.publisher(Image, "/robot/image", RELIABLE)
    node = NodeProcess(params_file, node_env, tmp_path / "node.log", extra_args=["-r", f"__node:={name}"])
    sent: dict[int, int] = {}  # stamp ns -> image index
    images = [*frames, *(np.ascontiguousarray(np.roll(frames[0], k, axis=a)) for k, a in ((0, 0), (8, 1), (-8, 0)))]
    scenes = {direct.localize(images[i]).scene_name for i in (4, 5, 6)}
    assert len(scenes) == 1, f"the shifted copies of frame 0 should share a scene, got {scenes}"

    def send(i: int) -> PoseStamped:
        stamp = _now()
        sent[_ns(stamp)] = i
        image_pub.publish(ros_convert.rgb_to_image(images[i], stamp=stamp, frame_id=cam))
        return wait_until(lambda: _with_stamp(harness.snapshot(poses), stamp), WAIT_S, "the pose")

    def send_first(i: int) -> PoseStamped:
        """Send the first image after discovery, again (new stamp) every 5 s until one gets a pose: best effort."""
        stamp, pose = send_until(
            lambda: _publish_image(image_pub, images[i], cam),
            lambda s: _with_stamp(harness.snapshot(poses), s),
            what="the first pose",
        )
        sent[_ns(stamp)] = i
        return pose

    try:
        harness.wait_subscribers(image_pub, timeout=90.0)
        harness.wait_subscribers(static_pub)
        harness.wait_subscribers(odom.pub)
        # 1. the published pose is the BASE pose: the extrinsic came from /tf_static alone
        pose = send_first(0)
        est = direct.localize(frames[0])
        expected = geometry.camera_to_base(est.pose, BASE_T_CAMERA)
        assert pose.header.frame_id == "map"
        got = ros_convert.pose_from_msg(pose.pose)
        np.testing.assert_allclose(got[:3], expected[:3], atol=1e-4)
        assert geometry.rotation_error_deg(got[3:], expected[3:]) < 0.01
        assert abs(np.angle(np.exp(1j * (yaw_of(got[3:]) - yaw_of(expected[3:]))))) < 1e-4  # the robot's heading

        # 2. map -> odom composed with odom -> base at the image stamp gives the estimated map -> base
        stamp_ns = _ns(pose.header.stamp)
        first = wait_until(
            lambda: next((t for r, t in harness.snapshot(tf_log) if t.child_frame_id == "odom" and r > stamp_ns), None),
            WAIT_S,
            "map -> odom after the estimate",
        )
        assert first.header.frame_id == "map"
        map_t_odom = ros_convert.transform_from_msg(first)
        # The node interpolates odom -> base at the image stamp: exact (1 mm). Only when its buffer had no sample on
        # one side of the stamp (the node's /tf subscription started after the image was taken, about one run in
        # four here), it takes the nearest sample, counted as tf_not_interpolated: then within one odometry period
        # of motion (50 Hz at 0.5 m/s = 10 mm).
        # map -> odom is stamped now + the tolerance; diagnostics 0.3 s later surely read the counter after it
        sent_at = _ns(first.header.stamp) - int(TOLERANCE_S * 1e9) + 300_000_000
        d = wait_until(
            lambda: next(
                (v for m in harness.snapshot(diags) if _ns(m.header.stamp) >= sent_at and (v := diag_values(m, name))),
                None,
            ),
            WAIT_S,
            "diagnostics sent after the first map -> odom",
        )
        atol = 1e-3 if int(d["tf_not_interpolated"]) == 0 else 2e-3 + 0.5 * 0.02
        np.testing.assert_allclose(
            geometry.pose_compose(map_t_odom, odom.pose_at(stamp_ns))[:3], expected[:3], atol=atol
        )
        # ... and keeps coming between estimates, future-dated by the tolerance
        n0 = sum(t.child_frame_id == "odom" for _, t in harness.snapshot(tf_log))
        wait_until(
            lambda: sum(t.child_frame_id == "odom" for _, t in harness.snapshot(tf_log)) >= n0 + 5,
            WAIT_S,
            "5 re-published map -> odom transforms",
        )
        repub = [(r, t) for r, t in harness.snapshot(tf_log) if t.child_frame_id == "odom"][n0:]
        for received, t in repub:
            ahead = (_ns(t.header.stamp) - received) * 1e-9
            assert TOLERANCE_S - 1.5 < ahead <= TOLERANCE_S + 0.1, ahead  # stamped now + tolerance when sent
            np.testing.assert_allclose(ros_convert.transform_from_msg(t), map_t_odom, atol=1e-9)
        # no TF message ever gave the camera frame a (second) parent
        assert not any(t.child_frame_id == cam for _, t in harness.snapshot(tf_log))

        # 3. relocalize while odom shows motion: every sample rejected
        stop = threading.Event()

        def stream() -> None:
            k = 0
            while not stop.is_set():
                send(k % 4)
                k += 1

        streamer = threading.Thread(target=stream, daemon=True)
        streamer.start()
        try:
            moving = harness.call(Trigger, f"/{name}/relocalize", Trigger.Request(), timeout=60.0)
        finally:
            stop.set()
            streamer.join(timeout=WAIT_S)
        assert not moving.success and "rejected while odom showed motion" in moving.message, moving.message

        # 4. standing still, different frames: the fused pose is the median / average of the samples used
        odom.set_speed(0.0)
        time.sleep(0.5)  # let the still odometry cover the motion window (values, not timing, are asserted)
        client = harness.node.create_client(Trigger, f"/{name}/relocalize")
        future = client.call_async(Trigger.Request())
        k = 0
        while not future.done() and k < 200:
            send(4 + k % 3)  # three shifted copies of frame 0: different poses, one scene
            k += 1
        response = wait_until(future.result, WAIT_S, "the relocalize response")
        assert response.success and "n=3 of 3" in response.message, response.message
        fused_msg = harness.wait_count(initialposes, 1, what="/robot/initialpose")[-1]
        used = sorted(s for s in sent if s <= _ns(fused_msg.header.stamp))[-3:]  # the 3 samples, newest last
        base_poses = np.stack(
            [geometry.camera_to_base(direct.localize(images[sent[s]]).pose, BASE_T_CAMERA) for s in used]
        )
        fused = ros_convert.pose_from_msg(fused_msg.pose.pose)
        np.testing.assert_allclose(fused[:3], np.median(base_poses[:, :3], axis=0), atol=1e-4)
        assert geometry.rotation_error_deg(fused[3:], _quat_mean(base_poses[:, 3:])) < 0.05
        heading = yaw_of(_quat_mean(base_poses[:, 3:]))  # the robot's heading from the ground-truth extrinsic
        assert abs(np.angle(np.exp(1j * (yaw_of(fused[3:]) - heading)))) < 1e-3  # what AMCL reads from initialpose
        assert np.ptp(base_poses[:, 0]) > 1e-3  # the samples really differ
        assert fused_msg.header.frame_id == "map"

        # 5. while a relocalize waits (no images), get_state and the parameter services answer
        client2 = harness.node.create_client(Trigger, f"/{name}/relocalize")
        pending = client2.call_async(Trigger.Request())
        assert harness.call(GetState, f"/{name}/get_state", GetState.Request()).current_state.label == "active"
        got_params = harness.call(GetParameters, f"/{name}/get_parameters", GetParameters.Request(names=["tf_mode"]))
        assert got_params.values[0].string_value == "map_to_odom"
        assert not pending.done()  # both answered while the relocalize was still collecting
        late = wait_until(pending.result, WAIT_S, "the pending relocalize's answer")
        assert not late.success and "got 0 of 3" in late.message
        assert node.alive()
    finally:
        odom.stop.set()
        code = node.stop()
    assert code == 0, node.log()


# --------------------------------------------------------------------------------------------- namespace, QoS, hints
@pytest.mark.slow
def test_namespaced_best_effort_hint_refused_map_to_camera_and_error_diagnostics(
    tmp_path, node_env, harness, checkpoint, frames, direct
):
    ns, name, cam = "/robot1", "apr_localizer", "ns_cam_optical"
    params = _params(checkpoint, publish_tf=True, tf_mode="map_to_camera", hint={"enable": True})
    params_file = write_params(tmp_path / "params.yaml", params)  # /** with the shipped (relative) topic defaults
    static_pub = _static_tf(harness, cam)
    tfs = harness.subscribe(TFMessage, "/tf", QoSProfile(depth=500))
    poses = harness.subscribe(PoseStamped, f"{ns}/{name}/pose", RELIABLE)
    hints = harness.subscribe(PoseWithCovarianceStamped, f"{ns}/visual_slam/initial_pose", RELIABLE)
    diags = harness.subscribe(DiagnosticArray, "/diagnostics", 100)
    image_pub = harness.publisher(Image, f"{ns}/camera/image_raw", qos_profile_sensor_data)  # best effort
    trigger = harness.publisher(PoseWithCovarianceStamped, f"{ns}/visual_slam/trigger_hint", RELIABLE)
    node = NodeProcess(
        [REPO_ROOT / "config" / "localizer.yaml", params_file],
        node_env,
        tmp_path / "node.log",
        extra_args=["-r", f"__ns:={ns}"],
    )

    def diag():
        for m in reversed(harness.snapshot(diags)):
            d = diag_values(m, name)
            if d is not None and d.get("image_topic") == f"{ns}/camera/image_raw":
                return d
        return None

    try:
        harness.wait_subscribers(image_pub, timeout=90.0)
        harness.wait_subscribers(trigger)
        harness.wait_subscribers(static_pub)
        # best-effort images are received with the default QoS (the first after discovery may be lost: resent);
        # the namespaced pose is the base pose
        _, pose = send_until(
            lambda: _publish_image(image_pub, frames[1], cam),
            lambda s: _with_stamp(harness.snapshot(poses), s),
            what="the namespaced pose",
        )
        expected = geometry.camera_to_base(direct.localize(frames[1]).pose, BASE_T_CAMERA)
        np.testing.assert_allclose(ros_convert.pose_from_msg(pose.pose)[:3], expected[:3], atol=1e-4)
        # map_to_camera is refused: the camera frame already has base_link as its parent
        d = wait_until(lambda: (v := diag()) and int(v["tf_refused"]) >= 1 and v, WAIT_S, "tf_refused")
        assert "already has parent base_link" in d["last_reject_reason"]
        assert "refused" in node.log() and "two parents" in node.log()
        assert not any(t.child_frame_id == cam for m in harness.snapshot(tfs) for t in m.transforms)

        # one cuVSLAM trigger (PoseWithCovarianceStamped) -> one base-pose hint
        trigger.publish(PoseWithCovarianceStamped())
        deadline = time.monotonic() + WAIT_S
        stamps = []
        while not harness.count(hints) and time.monotonic() < deadline:
            stamps.append(_now())
            image_pub.publish(ros_convert.rgb_to_image(frames[2], stamp=stamps[-1], frame_id=cam))
            wait_until(lambda s=stamps[-1]: _with_stamp(harness.snapshot(poses), s), WAIT_S, "a pose")
        hint = harness.wait_count(hints, 1, what="the hint")[0]
        assert hint.header.stamp in stamps and hint.header.frame_id == "map"
        expected = geometry.camera_to_base(direct.localize(frames[2]).pose, BASE_T_CAMERA)
        np.testing.assert_allclose(ros_convert.pose_from_msg(hint.pose.pose)[:3], expected[:3], atol=1e-4)
        for _ in range(2):  # more frames, no new trigger: no new hint
            s = _now()
            image_pub.publish(ros_convert.rgb_to_image(frames[2], stamp=s, frame_id=cam))
            wait_until(lambda s=s: _with_stamp(harness.snapshot(poses), s), WAIT_S, "a pose")
        assert harness.count(hints) == 1

        # a parameter that would kill a timer is refused at run time; the node keeps running
        ok, reason = _set_param(harness, f"{ns}/{name}", "image_topic", "bad topic!!")
        assert not ok and "parameter image_topic" in reason
        ok, reason = _set_param(harness, f"{ns}/{name}", "max_rate_hz", 0.002)
        assert not ok and "max_rate_hz" in reason

        # every frame fails (zero stamps): diagnostics go to ERROR
        n_diag = harness.count(diags)
        for _ in range(12):
            bad = ros_convert.rgb_to_image(frames[0], stamp=Time(sec=0, nanosec=0), frame_id=cam)
            image_pub.publish(bad)
            time.sleep(0.1)
            d = diag()
            if harness.count(diags) > n_diag + 4 and d is not None and d["_level"] == 2:
                break
        d = wait_until(lambda: (v := diag()) and v["_level"] == 2 and v, WAIT_S, "an ERROR diagnostic")
        assert "every frame fails" in d["_message"] and "zero" in d["_message"]
        assert node.alive()
    finally:
        code = node.stop()
    assert code == 0, node.log()


# --------------------------------------------------------------------------------------------- signals
def test_a_signal_during_configure_aborts_it_and_a_second_one_exits_cleanly(tmp_path, node_env, checkpoint):
    name = "apr_signal"
    params_file = write_params(tmp_path / "params.yaml", _params(checkpoint), node_name=name)
    # Segments that exist before the node starts belong to other participants (e.g. this module's harness, which the
    # node maps once it discovers it): only the node's own segments must be gone after it exits.
    others = {str(p) for p in Path("/dev/shm").glob("fast*")}
    node = NodeProcess(params_file, node_env, tmp_path / "node.log", extra_args=["-r", f"__node:={name}"])
    node.wait_log("created", timeout=60.0)
    maps = Path(f"/proc/{node.pid}/maps").read_text()  # Fast DDS shared-memory segments of this process
    mapped = {line.split()[-1] for line in maps.splitlines() if "/dev/shm/fast" in line and "port" not in line}
    segments = mapped - others
    assert segments, "the node maps no Fast DDS segment (FASTDDS_DEFAULT_PROFILES_FILE enables shared memory)"
    node.proc.send_signal(signal.SIGINT)
    node.proc.send_signal(signal.SIGINT)
    code = node.proc.wait(timeout=60.0)
    node.stop()
    text = node.log()
    assert code == 0, text
    assert not [s for s in segments if Path(s).exists()]  # no shared memory left behind
    assert "active: subscribed" not in text  # never activated
    assert "aborted by a signal" in text or "configured:" not in text  # the configure in progress was aborted
    assert "Traceback" not in text


# --------------------------------------------------------------------------------------------- multi-scene frames
def test_scene_frames_alignment_and_allowed_scenes(tmp_path, node_env, harness, checkpoint, frames, direct):
    name, topic = "apr_scenes", "/scenes/image"
    est = [direct.localize(f) for f in frames[:3]]
    names = [e.scene_name for e in est]
    assert len(set(names)) == 3, f"frames 0-2 should fall in three scenes, got {names}"
    align_xyzw = [0.0, 0.0, np.sqrt(0.5), np.sqrt(0.5)]  # 90 degrees about z, then 1 2 3 m
    params = _params(
        checkpoint,
        image_topic=topic,
        output_pose="camera",  # no robot here: the camera pose, explicitly
        base_frame="",
        scenes={
            "frames": f"{names[0]}:{names[0]}_map",
            "alignment": f"{names[0]}: 1 2 3 " + " ".join(str(v) for v in align_xyzw),
            "allowed": f"{names[0]}, {names[1]}",
        },
    )
    params_file = write_params(tmp_path / "params.yaml", params, node_name=name)
    poses = harness.subscribe(PoseStamped, f"/{name}/pose", RELIABLE)
    diags = harness.subscribe(DiagnosticArray, "/diagnostics", 100)
    image_pub = harness.publisher(Image, topic, RELIABLE)
    node = NodeProcess(params_file, node_env, tmp_path / "node.log", extra_args=["-r", f"__node:={name}"])
    try:
        harness.wait_subscribers(image_pub, timeout=90.0)
        # the subscription is best effort: the first image after discovery may be lost, and is resent
        stamps = [
            send_until(
                lambda: _publish_image(image_pub, frames[0]),
                lambda s: _with_stamp(harness.snapshot(poses), s),
                what="pose 0",
            )[0]
        ]
        stamps.append(_publish_image(image_pub, frames[1]))
        wait_until(lambda: _with_stamp(harness.snapshot(poses), stamps[1]), WAIT_S, "pose 1")
        stamps.append(_publish_image(image_pub, frames[2]))
        wait_until(
            lambda: any((d := diag_values(m, name)) and int(d["filtered_scene"]) >= 1 for m in harness.snapshot(diags)),
            WAIT_S,
            "the third scene to be filtered",
        )
        first, second = (_with_stamp(harness.snapshot(poses), s) for s in stamps[:2])
        align = np.r_[1.0, 2.0, 3.0, geometry.quat_from_ros(align_xyzw)]
        assert first.header.frame_id == f"{names[0]}_map"
        expected = geometry.pose_compose(align, est[0].pose)
        np.testing.assert_allclose(ros_convert.pose_from_msg(first.pose)[:3], expected[:3], atol=1e-4)
        assert geometry.rotation_error_deg(ros_convert.pose_from_msg(first.pose)[3:], expected[3:]) < 0.01
        assert second.header.frame_id == "map"
        np.testing.assert_allclose(ros_convert.pose_from_msg(second.pose)[:3], est[1].pose[:3], atol=1e-4)
        assert _with_stamp(harness.snapshot(poses), stamps[2]) is None
        assert node.alive()
    finally:
        code = node.stop()
    assert code == 0, node.log()


# --------------------------------------------------------------------------------------------- camera_info check
def test_camera_info_is_checked_against_the_training_camera_in_the_model(tmp_path, node_env, harness, frames):
    from model_fixtures import random_ms_transformer
    from sensor_msgs.msg import CameraInfo

    from apr_localizer.checkpoints import save_model

    trained = {"fx": 500.0, "fy": 500.0, "cx": 320.0, "cy": 240.0, "width": 640, "height": 480}
    model = save_model(
        tmp_path / "model.safetensors", random_ms_transformer(num_scenes=3), provenance={"camera": trained}
    )
    name, topic = "apr_caminfo", "/caminfo/cam/image_raw"
    params = _params(
        model,
        image_topic=topic,
        output_pose="camera",
        base_frame="",
        camera_info_check="refuse",
        camera_info_tolerance=0.05,
    )
    params_file = write_params(tmp_path / "params.yaml", params, node_name=name)
    poses = harness.subscribe(PoseStamped, f"/{name}/pose", RELIABLE)
    diags = harness.subscribe(DiagnosticArray, "/diagnostics", 100)
    image_pub = harness.publisher(Image, topic, RELIABLE)
    info_pub = harness.publisher(CameraInfo, "/caminfo/cam/camera_info", RELIABLE)

    def info(fx: float) -> CameraInfo:  # the live camera runs at half the training resolution
        return CameraInfo(width=320, height=240, k=[fx, 0.0, 160.0, 0.0, 250.0, 120.0, 0.0, 0.0, 1.0])

    node = NodeProcess(params_file, node_env, tmp_path / "node.log", extra_args=["-r", f"__node:={name}"])
    try:
        harness.wait_subscribers(image_pub, timeout=90.0)
        harness.wait_subscribers(info_pub)
        small = np.ascontiguousarray(frames[0][::2, ::2])

        def send(fx: float) -> None:
            """Send CameraInfo then the image, each time, as a camera driver does (a lone first message can be lost)."""
            info_pub.publish(info(fx))
            image_pub.publish(ros_convert.rgb_to_image(small, stamp=_now(), frame_id="cam"))

        d = wait_until(
            lambda: (
                send(400.0)  # 20 % off the scaled training focal length (250)
                or next(
                    (
                        v
                        for m in reversed(harness.snapshot(diags))
                        if (v := diag_values(m, name)) and int(v["rejected_messages"]) >= 1
                    ),
                    None,
                )
            ),
            WAIT_S,
            "a frame refused for its camera_info",
            poll=0.3,
        )
        assert "camera_info fx" in d["last_reject_reason"]  # refused: one sentence naming the value
        wait_until(
            lambda: send(250.0) or harness.count(poses),
            WAIT_S,
            "a pose once camera_info matches",
            poll=0.3,
        )
        assert node.alive()
    finally:
        code = node.stop()
    assert code == 0, node.log()


# --------------------------------------------------------------------------------------------- parameter fuzzing
def _value(v) -> ParameterValue:
    if isinstance(v, bool):
        return ParameterValue(type=ParameterType.PARAMETER_BOOL, bool_value=v)
    if isinstance(v, int):
        return ParameterValue(type=ParameterType.PARAMETER_INTEGER, integer_value=v)
    if isinstance(v, float):
        return ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=v)
    if isinstance(v, str):
        return ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=v)
    if all(isinstance(x, float) for x in v):
        return ParameterValue(type=ParameterType.PARAMETER_DOUBLE_ARRAY, double_array_value=list(v))
    return ParameterValue(type=ParameterType.PARAMETER_STRING_ARRAY, string_array_value=list(v))


FUZZ_VALUES = [
    "bad topic!!", "", "x" * 65536, "/", "~", "a//b", "map\n", "scene: 1 2 3", "cuda:99999",
    float("nan"), float("inf"), -float("inf"), 1.8e308, -1.0, 0.0, 0.002, 1e9,
    -1, 0, 2**62, True, False,
    [1e200, 1e200, 0.0, 0.0], [float("nan")] * 3, [1.8e308, 0.1, 0.1], [0.0, 0.0, 0.0, 0.0], ["a", "b"],
]  # fmt: skip


def test_parameter_fuzzing_through_the_services_never_breaks_the_node(tmp_path, node_env, harness):
    from rclpy.parameter import parameter_value_to_python

    from apr_localizer.node_params import PARAMS, validate

    name = "apr_fuzz"
    params_file = write_params(tmp_path / "params.yaml", {"autostart": False, "diagnostics_period_s": 0.1}, name)
    diags = harness.subscribe(DiagnosticArray, "/diagnostics", 100)
    node = NodeProcess(params_file, node_env, tmp_path / "node.log", extra_args=["-r", f"__node:={name}"])
    writable = [p.name for p in PARAMS if not p.read_only]
    try:
        wait_until(lambda: harness.lifecycle_state(name) == "unconfigured", WAIT_S, "the node")
        accepted = 0
        for value in FUZZ_VALUES:
            req = SetParameters.Request(parameters=[ParameterMsg(name=n, value=_value(value)) for n in writable])
            results = harness.call(SetParameters, f"/{name}/set_parameters", req).results
            assert len(results) == len(writable)
            for r in results:
                assert r.successful or (r.reason and "\n" not in r.reason and len(r.reason) < 600), r.reason
            accepted += sum(r.successful for r in results)
            assert node.alive(), node.log()
        got = harness.call(GetParameters, f"/{name}/get_parameters", GetParameters.Request(names=writable)).values
        for n, v in zip(writable, got):
            assert validate(n, parameter_value_to_python(v)) is None, n  # whatever it holds now is usable
        n_diag = harness.count(diags)
        harness.wait_count(diags, n_diag + 3, what="diagnostics after the fuzzing")  # the timer still runs
        assert not harness.change_state(name, "configure")  # no model: refused cleanly
        assert node.alive() and accepted > 0
    finally:
        code = node.stop()
    log = node.log()
    assert code == 0, log
    assert "Traceback" not in log
