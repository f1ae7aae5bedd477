"""The localizer node's parameters: one table (name, default, meaning, check) and their validation (ROS-free).

Every value is checked for what it will be used for, at start-up (also values from a params file), at configure and
at run time (``set_parameters`` is refused with the sentence :func:`validate` returns): topic names by the ROS 2
naming rules, frame ids as tf2 accepts them, numbers finite and inside a range that keeps every wait bounded,
quaternions with a usable norm. Nothing a parameter can hold may raise later in a timer or callback.

Parameters that ROS cannot hold as maps are strings: ``scenes.frames`` (``"scene:frame, ..."``), ``scenes.allowed``
(``"scene, ..."``) and ``scenes.alignment`` (``"scene: x y z qx qy qz qw; ..."``, the model frame's pose in the
scene's published frame).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from apr_localizer import geometry
from apr_localizer.imaging import quote

__all__ = [
    "BACKENDS",
    "PARAMS",
    "TF_MODES",
    "NodeConfig",
    "Param",
    "config_from_values",
    "cross_check",
    "frame_id_problem",
    "parse_scene_alignment",
    "parse_scene_frames",
    "parse_scene_list",
    "topic_name_problem",
    "validate",
]

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
TRANSPORTS = ("raw", "compressed")
QOS_CHOICES = ("sensor_data", "reliable")
TF_MODES = ("map_to_odom", "map_to_base", "map_to_camera")
OUTPUT_POSES = ("base", "camera")
EXTRINSIC_SOURCES = ("tf", "parameters")
STAMP_POLICIES = ("reject", "receive_time")
CAMERA_INFO_CHECKS = ("warn", "refuse", "off")
MAX_NAME_LEN = 255
MAX_ECHO_CHARS = 256  # longest diagnostics value; user-controlled values are echoed through imaging.quote

_Check = Callable[[str, Any], "str | None"]


# --------------------------------------------------------------------------------------------- name rules
_TOPIC_TOKEN = re.compile(r"^(~|\{[A-Za-z_][A-Za-z0-9_]*\}|[A-Za-z_][A-Za-z0-9_]*)$")
_FRAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]*$")


def topic_name_problem(name: Any) -> str | None:
    """Why ``name`` is not a valid ROS 2 topic name (relative, absolute or ``~/`` private), or None."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty topic name"
    if len(name) > MAX_NAME_LEN:
        return f"must be at most {MAX_NAME_LEN} characters long"
    if name.endswith("/"):
        return "must not end with '/'"
    if "~" in name[1:]:
        return "may contain '~' only as its first character"
    if name.startswith("~") and len(name) > 1 and name[1] != "/":
        return "must continue '~' with '/'"
    tokens = name.lstrip("/").split("/")
    for tok in tokens:
        if not tok:
            return "must not contain '//'"
        if not _TOPIC_TOKEN.fullmatch(tok):
            return f"has an invalid token {quote(tok, 64)} (letters, digits and '_', not starting with a digit)"
    return None


def frame_id_problem(frame: Any) -> str | None:
    """Why ``frame`` is not a usable tf2 frame id (non-empty, no leading '/', no spaces, <= 255 characters)."""
    if not isinstance(frame, str) or not frame:
        return "must be a non-empty frame id"
    if len(frame) > MAX_NAME_LEN:
        return f"must be at most {MAX_NAME_LEN} characters long"
    if frame.startswith("/"):
        return "must not start with '/' (tf2 frame ids are relative)"
    if not _FRAME_RE.fullmatch(frame):
        return "may contain only letters, digits, '_', '.', '-' and '/'"
    return None


# --------------------------------------------------------------------------------------------- checks
def _choice(options: tuple[str, ...]) -> _Check:
    def check(name: str, value: Any) -> str | None:
        if value not in options:
            return f"parameter {name} must be one of {', '.join(options)}, got {quote(value, 64)}"
        return None

    return check


def _topic(optional: bool = False) -> _Check:
    def check(name: str, value: Any) -> str | None:
        if optional and value == "":
            return None
        problem = topic_name_problem(value)
        return None if problem is None else f"parameter {name} {problem}, got {quote(value, 64)}"

    return check


def _frame(optional: bool = False) -> _Check:
    def check(name: str, value: Any) -> str | None:
        if optional and value == "":
            return None
        problem = frame_id_problem(value)
        return None if problem is None else f"parameter {name} {problem}, got {quote(value, 64)}"

    return check


def _number(lo: float, hi: float, zero_ok: bool = False, integer: bool = False) -> _Check:
    kind = "an integer" if integer else "a finite number"

    def check(name: str, value: Any) -> str | None:
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or not math.isfinite(float(value)):
            return f"parameter {name} must be {kind} in [{lo:g}, {hi:g}], got {quote(value, 64)}"
        if zero_ok and value == 0:
            return None
        if not lo <= value <= hi:
            extra = " or 0" if zero_ok else ""
            return f"parameter {name} must be in [{lo:g}, {hi:g}]{extra}, got {value!r}"
        return None

    return check


def _vector(n: int, lo: float, hi: float) -> _Check:
    def check(name: str, value: Any) -> str | None:
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            arr = np.zeros(0)
        if arr.shape != (n,) or not np.all(np.isfinite(arr)) or np.any(arr < lo) or np.any(arr > hi):
            return f"parameter {name} must be a list of {n} numbers in [{lo:g}, {hi:g}], got {quote(value, 64)}"
        return None

    return check


def _quaternion(name: str, value: Any) -> str | None:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    bad = arr.shape != (4,) or not np.all(np.isfinite(arr)) or np.any(np.abs(arr) > 1e6)
    if bad or np.linalg.norm(arr) < 1e-6:
        return (
            f"parameter {name} must be a quaternion [x, y, z, w] of finite numbers with a norm in [1e-6, 1e6], "
            f"got {quote(value, 64)}"
        )
    return None


def _boolean(name: str, value: Any) -> str | None:
    return None if isinstance(value, bool) else f"parameter {name} must be true or false, got {value!r}"


def _text(name: str, value: Any) -> str | None:
    if not isinstance(value, str) or len(value) > 4096 or "\x00" in value:
        return f"parameter {name} must be a string of at most 4096 characters"
    return None


def _device(name: str, value: Any) -> str | None:
    if value in ("auto", "cpu", "cuda") or (isinstance(value, str) and re.fullmatch(r"cuda:\d{1,2}", value)):
        return None
    return f"parameter {name} must be auto, cpu, cuda or cuda:N, got {quote(value, 64)}"


def _scene_check(parser: Callable[[str], Any]) -> _Check:
    def check(name: str, value: Any) -> str | None:
        if not isinstance(value, str) or len(value) > 65536:
            return f"parameter {name} must be a string of at most 65536 characters"
        try:
            parser(value)
        except ValueError as exc:
            return f"parameter {name}: {exc}"
        return None

    return check


# --------------------------------------------------------------------------------------------- scene tables
def parse_scene_list(text: str) -> tuple[str, ...]:
    """Split ``"a, b"`` into ``("a", "b")`` (an empty string gives no entries)."""
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    for s in items:
        if len(s) > MAX_NAME_LEN:
            raise ValueError(f"scene name {quote(s, 64)} is longer than {MAX_NAME_LEN} characters")
    return items


def parse_scene_frames(text: str) -> dict[str, str]:
    """``"scene:frame, scene2:frame2"`` → ``{scene: frame}``; every frame must be a valid frame id."""
    table: dict[str, str] = {}
    for entry in parse_scene_list(text):
        scene, sep, frame = (s.strip() for s in entry.partition(":"))
        if not sep or not scene:
            raise ValueError(f"entry {quote(entry, 64)} must be 'scene:frame'")
        problem = frame_id_problem(frame)
        if problem is not None:
            raise ValueError(f"the frame of scene {quote(scene, 64)} {problem}")
        table[scene] = frame
    return table


def parse_scene_alignment(text: str) -> dict[str, np.ndarray]:
    """``"scene: x y z qx qy qz qw; ..."`` → ``{scene: frame_T_model (7,) [x, y, z, qw, qx, qy, qz]}``."""
    table: dict[str, np.ndarray] = {}
    for entry in (e.strip() for e in text.split(";") if e.strip()):
        scene, sep, numbers = (s.strip() for s in entry.partition(":"))
        try:
            values = [float(v) for v in numbers.replace(",", " ").split()]
        except ValueError:
            values = []
        if not sep or not scene or len(values) != 7:
            raise ValueError(f"entry {quote(entry, 64)} must be 'scene: x y z qx qy qz qw'")
        xyz, q_xyzw = values[:3], values[3:]
        if not all(math.isfinite(v) and abs(v) <= 1e6 for v in xyz) or _quaternion("q", q_xyzw) is not None:
            raise ValueError(
                f"the alignment of scene {quote(scene, 64)} needs finite numbers and a non-zero quaternion"
            )
        table[scene] = np.concatenate([xyz, geometry.quat_normalize(geometry.quat_from_ros(q_xyzw))])
    return table


# --------------------------------------------------------------------------------------------- the table
@dataclasses.dataclass(frozen=True)
class Param:
    """One declared parameter: ``name`` (dotted), ``default`` (its ROS type), meaning, check, when it applies."""

    name: str
    default: Any
    description: str
    check: _Check
    dynamic: bool = False  # applied to the next frame; otherwise at the next configure/activate
    read_only: bool = False  # only at start-up

    @property
    def field(self) -> str:
        """The :class:`NodeConfig` field of this parameter."""
        return self.name.replace(".", "_")


_P = Param
PARAMS: tuple[Param, ...] = (
    _P(
        "autostart",
        True,
        "Configure and activate right after start-up (false under a lifecycle manager).",
        _boolean,
        read_only=True,
    ),
    _P("model.path", "", "Model weights: our .safetensors or an official MS-Transformer .pth.", _text, read_only=True),
    _P("model.iapr_path", "", "Optional iAPR (relative pose regressor) checkpoint.", _text, read_only=True),
    _P("model.pae_path", "", "Optional pose auto-encoder checkpoint.", _text, read_only=True),
    _P(
        "model.orientation",
        "",
        "Quaternion convention of the model: empty = from the model file; world_to_camera for official Cambridge "
        "Landmarks checkpoints.",
        _choice(("", *geometry.ORIENTATIONS)),
        read_only=True,
    ),
    _P("backend", "auto", f"Inference engine, one of {', '.join(BACKENDS)}.", _choice(BACKENDS)),
    _P("device", "auto", "auto, cpu, cuda or cuda:N.", _device),
    _P("precision", "fp32", f"One of {', '.join(PRECISIONS)}.", _choice(PRECISIONS)),
    _P("iapr_iterations", 3, "iAPR refinement steps (0 = APR only), 0..50.", _number(0, 50, integer=True)),
    _P("threads", 0, "CPU inference threads (0 = engine default), 0..256.", _number(0, 256, integer=True)),
    _P("cache_dir", "", "Engine cache directory (TensorRT/ONNX); empty = default.", _text),
    _P("cuda_graphs", False, "torch on CUDA: run APR + refinement as one captured CUDA graph.", _boolean),
    _P("tf32", False, "Allow TF32 math for fp32 on CUDA (faster; fp32 means fp32 when false).", _boolean),
    _P(
        "int8_calibration_dir",
        "",
        "Directory of camera images (png/jpg) that calibrate precision int8 (TensorRT); empty = none.",
        _text,
    ),
    _P("image_topic", "camera/image_raw", "Input image topic (relative: follows the node's namespace).", _topic()),
    _P("image_transport", "raw", "raw (Image) or compressed (<image_topic>/compressed).", _choice(TRANSPORTS)),
    _P("qos", "sensor_data", "Image QoS: sensor_data (best effort, REP-2003) or reliable.", _choice(QOS_CHOICES)),
    _P("qos_depth", 1, "Image subscription history depth, 1..100.", _number(1, 100, integer=True)),
    _P("camera_info_topic", "", "CameraInfo topic; empty = camera_info beside image_topic.", _topic(optional=True)),
    _P(
        "camera_info_check",
        "warn",
        "Training intrinsics vs camera_info: warn, refuse (frames) or off.",
        _choice(CAMERA_INFO_CHECKS),
    ),
    _P(
        "camera_info_tolerance",
        0.1,
        "Relative focal length / principal point difference tolerated, 0..1.",
        _number(0.0, 1.0),
    ),
    _P("map_frame", "map", "Frame of the published poses (the model's world frame).", _frame()),
    _P("camera_frame", "", "Camera optical frame; empty = the image's frame_id.", _frame(optional=True)),
    _P("base_frame", "base_link", "Robot base frame (REP-105).", _frame(optional=True)),
    _P("odom_frame", "odom", "Odometry frame (tf_mode map_to_odom, relocalize motion check).", _frame()),
    _P(
        "output_pose",
        "base",
        "Pose carried by ~/pose*, initialpose and hints: base (default) or camera.",
        _choice(OUTPUT_POSES),
    ),
    _P(
        "extrinsic_source",
        "tf",
        "base<-camera from tf (/tf_static, /tf) or from parameters (override).",
        _choice(EXTRINSIC_SOURCES),
    ),
    _P(
        "base_to_camera.xyz",
        [0.0, 0.0, 0.0],
        "Override extrinsic: camera position in base_frame [x, y, z] m.",
        _vector(3, -1e4, 1e4),
    ),
    _P("base_to_camera.quat_xyzw", [0.0, 0.0, 0.0, 1.0], "Override extrinsic: orientation [x, y, z, w].", _quaternion),
    _P(
        "min_confidence",
        0.0,
        "Publish only estimates whose scene probability is >= this, 0..1.",
        _number(0.0, 1.0),
        dynamic=True,
    ),
    _P(
        "covariance.position",
        [0.25, 0.25, 0.25],
        "Position variances [x, y, z] in m^2 (0..1e6) of uncalibrated models (calibrated: sigma^2).",
        _vector(3, 0.0, 1e6),
        dynamic=True,
    ),
    _P(
        "covariance.orientation",
        [0.0305, 0.0305, 0.0305],
        "Orientation variances [roll, pitch, yaw] rad^2 (0..1e6) of uncalibrated models (calibrated: sigma^2).",
        _vector(3, 0.0, 1e6),
        dynamic=True,
    ),
    _P(
        "covariance.scale_by_confidence",
        True,
        "Divide the covariance diagonal by the estimate's confidence.",
        _boolean,
        dynamic=True,
    ),
    _P(
        "gating.max_sigma_position_m",
        1.0,
        "Calibrated models: publish nothing when the position sigma (m) exceeds this (0 = off), 0..1e4.",
        _number(0.001, 1e4, zero_ok=True),
        dynamic=True,
    ),
    _P(
        "gating.max_sigma_orientation_deg",
        15.0,
        "Calibrated models: publish nothing when the orientation sigma (deg) exceeds this (0 = off), 0..180.",
        _number(0.001, 180.0, zero_ok=True),
        dynamic=True,
    ),
    _P(
        "max_rate_hz",
        0.0,
        "Processed frames per second at most: 0 (unlimited) or 0.1..1000.",
        _number(0.1, 1000.0, zero_ok=True),
        dynamic=True,
    ),
    _P(
        "max_frame_age_s",
        0.0,
        "Drop frames whose stamp is older than this: 0 (no limit) or 0.001..3600.",
        _number(0.001, 3600.0, zero_ok=True),
        dynamic=True,
    ),
    _P(
        "stamps.max_future_s",
        1.0,
        "Reject stamps further than this in the future, 0..3600.",
        _number(0.0, 3600.0),
        dynamic=True,
    ),
    _P(
        "stamps.invalid",
        "reject",
        "Zero/future stamps: reject, or receive_time (replaced, flagged, no TF).",
        _choice(STAMP_POLICIES),
        dynamic=True,
    ),
    _P(
        "max_image_pixels",
        40_000_000,
        "Reject images with more pixels, 1..1e9.",
        _number(1, 1_000_000_000, integer=True),
        dynamic=True,
    ),
    _P(
        "publish_tf",
        False,
        "Broadcast TF (see tf_mode); off by default so no tree is ever broken.",
        _boolean,
        dynamic=True,
    ),
    _P("tf_mode", "map_to_odom", f"One of {', '.join(TF_MODES)}.", _choice(TF_MODES)),
    _P("tf_rate_hz", 20.0, "map -> odom re-publication rate, 0.1..200 Hz.", _number(0.1, 200.0)),
    _P(
        "transform_tolerance_s",
        0.5,
        "map -> odom is future-dated by this (AMCL semantics), 0..10 s.",
        _number(0.0, 10.0),
        dynamic=True,
    ),
    _P("tf_planar", False, "map -> odom keeps only x, y, yaw (2-D robots).", _boolean, dynamic=True),
    _P(
        "tf_jump.max_position_m",
        0.0,
        "Reject a map -> odom change larger than this (0 = off), 0..1e4 m.",
        _number(0.0, 1e4),
        dynamic=True,
    ),
    _P(
        "tf_jump.max_yaw_deg",
        0.0,
        "Reject a map -> odom yaw change larger than this (0 = off), 0..180.",
        _number(0.0, 180.0),
        dynamic=True,
    ),
    _P(
        "tf_jump.accept_after",
        3,
        "Accept a jump once this many consecutive estimates agree on it, 1..100.",
        _number(1, 100, integer=True),
        dynamic=True,
    ),
    _P(
        "tf_smoothing",
        1.0,
        "Weight of a new map -> odom estimate (1 = no smoothing), 0.01..1.",
        _number(0.01, 1.0),
        dynamic=True,
    ),
    _P(
        "tf_lookup_tolerance_s",
        0.1,
        "How far from the image stamp a TF sample may be, 0..10 s.",
        _number(0.0, 10.0),
        dynamic=True,
    ),
    _P("tf_cache_s", 10.0, "How much TF history is kept, 1..600 s.", _number(1.0, 600.0)),
    _P(
        "relocalize.samples",
        5,
        "Confident estimates fused by ~/relocalize, 1..100.",
        _number(1, 100, integer=True),
        dynamic=True,
    ),
    _P("relocalize.timeout_s", 10.0, "How long ~/relocalize collects, 0.1..120 s.", _number(0.1, 120.0), dynamic=True),
    _P(
        "relocalize.max_linear_speed",
        0.05,
        "Samples taken faster than this (odom, m/s) are rejected, 0..100.",
        _number(0.0, 100.0),
        dynamic=True,
    ),
    _P(
        "relocalize.max_angular_speed",
        0.05,
        "Samples taken turning faster (odom, rad/s) are rejected, 0..100.",
        _number(0.0, 100.0),
        dynamic=True,
    ),
    _P(
        "relocalize.motion_window_s",
        0.2,
        "Odometry span around a sample used for its speed, 0.01..10 s.",
        _number(0.01, 10.0),
        dynamic=True,
    ),
    _P("relocalize.require_odom", False, "Reject samples whose motion odom cannot tell.", _boolean, dynamic=True),
    _P("initialpose_topic", "initialpose", "Where ~/relocalize publishes (AMCL's initialpose).", _topic()),
    _P("hint.enable", False, "Answer isaac_ros_visual_slam hint triggers.", _boolean),
    _P("hint.trigger_topic", "visual_slam/trigger_hint", "PoseWithCovarianceStamped trigger topic.", _topic()),
    _P("hint.output_topic", "visual_slam/initial_pose", "Base-pose answer topic.", _topic()),
    _P(
        "scenes.allowed",
        "",
        "Comma-separated scenes whose estimates are published; empty = all.",
        _scene_check(parse_scene_list),
        dynamic=True,
    ),
    _P(
        "scenes.frames",
        "",
        "'scene:frame, ...' frame of each scene's poses; default map_frame.",
        _scene_check(parse_scene_frames),
    ),
    _P(
        "scenes.alignment",
        "",
        "'scene: x y z qx qy qz qw; ...' frame_T_model applied before publishing.",
        _scene_check(parse_scene_alignment),
    ),
    _P("diagnostics_period_s", 1.0, "Period of /diagnostics, 0.05..60 s.", _number(0.05, 60.0), read_only=True),
    _P(
        "diagnostics.min_rate_hz",
        0.0,
        "WARN when the output rate is below this (0 = off), 0..1000.",
        _number(0.0, 1000.0),
        dynamic=True,
    ),
    _P(
        "diagnostics.max_delay_s",
        1.0,
        "WARN when capture -> publish delay exceeds this, 0.001..3600.",
        _number(0.001, 3600.0),
        dynamic=True,
    ),
)
PARAMS_BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}


def validate(name: str, value: Any) -> str | None:
    """One sentence on why ``value`` is not acceptable for parameter ``name``, or None (unknown names: None)."""
    param = PARAMS_BY_NAME.get(name)
    if param is None:
        return None
    try:
        return param.check(name, value)
    except Exception as exc:  # a check must never raise; report instead
        return f"parameter {name} has an unusable value ({type(exc).__name__})"


# --------------------------------------------------------------------------------------------- the snapshot
@dataclasses.dataclass(frozen=True)
class NodeConfig:
    """A snapshot of the node's parameters (fields are the dotted names with '.' → '_'), plus parsed tables."""

    values: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {p.name: p.default for p in PARAMS})

    def __getattr__(self, field: str) -> Any:
        values = object.__getattribute__(self, "values")
        name = _FIELD_TO_NAME.get(field)
        if name is None:
            raise AttributeError(field)
        return values[name]

    @property
    def subscribed_topic(self) -> str:
        """The image topic subscribed (``<image_topic>/compressed`` for the compressed transport)."""
        topic = self.values["image_topic"]
        if self.values["image_transport"] == "compressed" and not topic.endswith("/compressed"):
            return topic + "/compressed"
        return topic

    @property
    def camera_info(self) -> str:
        """The CameraInfo topic: ``camera_info_topic`` or ``camera_info`` beside the image topic."""
        if self.values["camera_info_topic"]:
            return self.values["camera_info_topic"]
        head, sep, _ = self.values["image_topic"].rpartition("/")
        return f"{head}{sep}camera_info"

    @property
    def base_t_camera_override(self) -> np.ndarray:
        """The hand-typed extrinsic ``(7,)`` (w-first, normalised)."""
        q = geometry.quat_normalize(geometry.quat_from_ros(self.values["base_to_camera.quat_xyzw"]))
        return np.concatenate([np.asarray(self.values["base_to_camera.xyz"], dtype=np.float64), q])

    @property
    def allowed_scenes(self) -> tuple[str, ...]:
        return parse_scene_list(self.values["scenes.allowed"])

    @property
    def scene_frames(self) -> dict[str, str]:
        return parse_scene_frames(self.values["scenes.frames"])

    @property
    def scene_alignment(self) -> dict[str, np.ndarray]:
        return parse_scene_alignment(self.values["scenes.alignment"])


_FIELD_TO_NAME = {p.field: p.name for p in PARAMS}


def config_from_values(values: Mapping[str, Any]) -> NodeConfig:
    """Build a :class:`NodeConfig` from ``{name: value}`` (missing names: defaults; lists become tuples)."""
    merged = {p.name: p.default for p in PARAMS}
    for name, value in values.items():
        if name in merged:
            merged[name] = tuple(value) if isinstance(value, (list, tuple, np.ndarray)) else value
    return NodeConfig(values=merged)


def cross_check(cfg: NodeConfig) -> str | None:
    """Problems that involve several parameters (one sentence), or None."""
    needs_base = cfg.output_pose == "base" or (cfg.publish_tf and cfg.tf_mode in ("map_to_base", "map_to_odom"))
    if needs_base and not cfg.base_frame:
        return "parameter base_frame is empty but output_pose base or tf_mode map_to_base/map_to_odom needs it"
    if cfg.tf_mode == "map_to_odom" and cfg.base_frame == cfg.odom_frame:
        return "parameters base_frame and odom_frame must differ for tf_mode map_to_odom"
    if cfg.map_frame in (cfg.base_frame, cfg.odom_frame, cfg.camera_frame):
        return "parameter map_frame must differ from base_frame, odom_frame and camera_frame"
    return None
