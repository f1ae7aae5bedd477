"""ROS 2 lifecycle node: camera images in, map poses (+ covariance, TF, diagnostics) out.

Console script ``localizer_node`` (also ``python -m apr_localizer.node``)::

    localizer_node --ros-args --params-file config/localizer.yaml -p model.path:=/path/model.safetensors

Lifecycle
    * ``configure``: read the parameters, load the model (:meth:`Localizer.from_files`) and warm it up, create the
      lifecycle publishers, start the worker thread. A model that cannot be loaded fails
      the transition (``FAILURE``, back to *unconfigured*) with one log sentence.
    * ``activate``: enable the publishers, create the image subscription, the hint trigger subscription and the
      ``~/relocalize`` service.
    * ``deactivate``: destroy the subscriptions and the service, drop the pending frame, abort a running relocalize.
    * ``cleanup`` / ``shutdown``: stop the worker, destroy the publishers, close the model.
    * With ``autostart`` (default true) ``main`` runs configure + activate at start.

Threading
    The image subscription is *raw* (serialized bytes); its callback only puts the newest message into a 1-slot
    mailbox (replacing an unprocessed frame counts a drop; frames the DDS history overwrote before the callback saw
    them are counted from gaps in the publisher's sequence numbers). ONE worker thread owns the :class:`Localizer`
    and does deserialize → decode → localize → publish, so replaced frames are never even deserialized. Nothing
    queues up beyond the DDS history depth (``qos_depth``) and that single slot. ``main`` spins a
    ``SingleThreadedExecutor`` (a ``MultiThreadedExecutor`` costs about 4x the CPU per 900 KB image in rclpy). The
    blocking ``~/relocalize`` service therefore takes frames straight from the image subscription while it waits;
    under a ``MultiThreadedExecutor`` (the node's subscription and service have their own callback groups) it lets
    the executor deliver them instead. Either way it cannot deadlock, and SIGINT ends the wait at once.

Outputs, all stamped with the input image's ``header.stamp`` and in ``map_frame``
    * ``~/pose`` (``PoseStamped``) and ``~/pose_with_covariance`` (``PoseWithCovarianceStamped``): the pose of the
      *tracked frame*: ``base_frame`` when set (via the ``base_to_camera`` extrinsic), else the camera.
    * TF (``publish_tf``): ``tf_mode`` ``map_to_camera`` (map → camera), ``map_to_base`` (map → base) or
      ``map_to_odom`` (map → odom, AMCL style; needs ``tf2_ros`` for the odom → base lookup at the image stamp, and
      falls back to ``map_to_base`` with a warning when it is missing). With ``tf2_ros`` the standard
      ``TransformBroadcaster`` is used, otherwise ``tf2_msgs/TFMessage`` is published on ``/tf`` (depth 100, the
      same wire format).
    * ``/diagnostics`` (``DiagnosticArray``, every ``diagnostics_period_s``, in every lifecycle state): state,
      backend, device, input/output rate, receive→publish latency and inference time percentiles (p50/p90/p99 ms),
      dropped/stale/rejected/low-confidence/non-finite counts and the last rejection reason; ERROR with the reason
      when configure failed.
    * ``initialpose_topic`` (``PoseWithCovarianceStamped``, AMCL convention): once per successful ``~/relocalize``
      (std_srvs/Trigger: fuse ``relocalize.samples`` confident estimates: position median, quaternion average).
    * Hint mode (``hint.enable``): a message on ``hint.trigger_topic`` (std_msgs/Empty, or std_msgs/Bool with
      ``data: true``) publishes the next confident estimate on ``hint.output_topic``.

Estimates that are non-finite or below ``min_confidence`` are never published (counted). Malformed images are
logged (throttled), counted and dropped; they never stop the node.

Covariance: see :func:`apr_localizer.ros_convert.covariance_from_diagonal` (diagonal from ``covariance.position``
and ``covariance.orientation``, divided by the confidence when ``covariance.scale_by_confidence``).
"""

from __future__ import annotations

import collections
import dataclasses
import signal
import sys
import threading
import time
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.exceptions import InvalidHandle, InvalidParameterTypeException, ParameterException
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleState, TransitionCallbackReturn
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.parameter import Parameter
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
)
from rclpy.serialization import deserialize_message
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Bool, Empty
from std_srvs.srv import Trigger

from apr_localizer import geometry, ros_convert
from apr_localizer.imaging import ImageDecodeError

try:  # tf2_ros is not installable from PyPI; use it when the environment has it (a real ROS 2 install)
    import tf2_ros

    HAVE_TF2_ROS = True
except ImportError:  # pragma: no cover - depends on the environment
    tf2_ros = None
    HAVE_TF2_ROS = False

__all__ = ["HAVE_TF2_ROS", "LatestMailbox", "LocalizerNode", "NodeConfig", "main"]

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
TRANSPORTS = ("raw", "compressed")
QOS_CHOICES = ("reliable", "sensor_data")
TF_MODES = ("map_to_camera", "map_to_base", "map_to_odom")
HINT_TYPES = ("empty", "bool")
_LOG_THROTTLE_S = 5.0


# --------------------------------------------------------------------------------------------- mailbox
class LatestMailbox:
    """A 1-slot mailbox: ``put`` replaces an unread item (counted as a drop); ``get`` blocks until one is there."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = None
        self._has_item = False
        self._closed = False
        self.dropped = 0

    def put(self, item: Any) -> bool:
        """Store ``item`` as the newest one; return True when it replaced an unprocessed item."""
        with self._cond:
            replaced = self._has_item
            if replaced:
                self.dropped += 1
            self._item, self._has_item = item, True
            self._cond.notify()
            return replaced

    def get(self, timeout: float | None = None) -> Any | None:
        """Take the newest item, waiting up to ``timeout`` seconds; None on timeout or when closed."""
        with self._cond:
            if not self._has_item and not self._closed:
                self._cond.wait(timeout)
            if not self._has_item:
                return None
            item, self._item, self._has_item = self._item, None, False
            return item

    def clear(self) -> int:
        """Discard a pending item (counted as a drop); return how many were discarded (0 or 1)."""
        with self._cond:
            n = int(self._has_item)
            self.dropped += n
            self._item, self._has_item = None, False
            return n

    def close(self) -> None:
        """Wake every waiter; later ``get`` calls return at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


# --------------------------------------------------------------------------------------------- parameters
@dataclasses.dataclass(frozen=True)
class NodeConfig:
    """A snapshot of the node's parameters (see config/localizer.yaml for their meaning)."""

    model_path: str = ""
    iapr_path: str = ""
    pae_path: str = ""
    backend: str = "auto"
    device: str = "auto"
    precision: str = "fp32"
    iapr_iterations: int = 3
    threads: int = 0
    cache_dir: str = ""
    image_topic: str = "/camera/image_raw"
    image_transport: str = "raw"
    qos: str = "reliable"
    qos_depth: int = 1
    map_frame: str = "map"
    camera_frame: str = ""
    base_frame: str = ""
    odom_frame: str = "odom"
    base_to_camera: tuple[float, ...] = (0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0)  # pose [x,y,z,qw,qx,qy,qz]
    min_confidence: float = 0.0
    covariance_position: tuple[float, float, float] = (0.25, 0.25, 0.25)
    covariance_orientation: tuple[float, float, float] = (0.0305, 0.0305, 0.0305)
    covariance_scale_by_confidence: bool = True
    max_rate_hz: float = 0.0
    max_frame_age_s: float = 0.0
    max_image_pixels: int = ros_convert.DEFAULT_MAX_PIXELS
    publish_tf: bool = True
    tf_mode: str = "map_to_camera"
    tf_lookup_timeout_s: float = 0.05
    relocalize_samples: int = 5
    relocalize_timeout_s: float = 10.0
    initialpose_topic: str = "/initialpose"
    hint_enable: bool = False
    hint_trigger_topic: str = "visual_slam/trigger_hint"
    hint_trigger_type: str = "empty"
    hint_output_topic: str = ""
    diagnostics_period_s: float = 1.0

    @property
    def subscribed_topic(self) -> str:
        """The image topic actually subscribed (``<image_topic>/compressed`` for the compressed transport)."""
        if self.image_transport == "compressed" and not self.image_topic.rstrip("/").endswith("/compressed"):
            return self.image_topic.rstrip("/") + "/compressed"
        return self.image_topic


@dataclasses.dataclass(frozen=True)
class _Param:
    """One declared parameter: name, :class:`NodeConfig` field (None: assembled in ``_read_config``), default."""

    name: str
    field: str | None
    default: Any
    description: str
    descriptor: dict = dataclasses.field(default_factory=dict)  # extra ParameterDescriptor kwargs
    dynamic: bool = False  # applied to the next frame; otherwise at the next configure/activate


def _int_range(lo: int, hi: int) -> dict:
    return {"integer_range": [IntegerRange(from_value=lo, to_value=hi, step=1)]}


def _float_range(lo: float, hi: float) -> dict:
    return {"floating_point_range": [FloatingPointRange(from_value=lo, to_value=hi, step=0.0)]}


_D = NodeConfig()
_RO = {"read_only": True}
_PARAMS: list[_Param] = [
    _Param("autostart", None, True, "Configure and activate right after start-up.", _RO),
    _Param("model.path", "model_path", "", "Model weights: our .safetensors or an official MS-Transformer .pth.", _RO),
    _Param("model.iapr_path", "iapr_path", "", "Optional iAPR (relative pose regressor) checkpoint.", _RO),
    _Param("model.pae_path", "pae_path", "", "Optional pose auto-encoder checkpoint.", _RO),
    _Param("backend", "backend", _D.backend, f"Inference engine, one of {BACKENDS}."),
    _Param("device", "device", _D.device, "auto, cpu, cuda or cuda:N."),
    _Param("precision", "precision", _D.precision, f"One of {PRECISIONS}."),
    _Param("iapr_iterations", "iapr_iterations", 3, "iAPR refinement steps (0 = APR only).", _int_range(0, 50)),
    _Param("threads", "threads", 0, "CPU inference threads (0 = engine default).", _int_range(0, 256)),
    _Param("cache_dir", "cache_dir", "", "Engine cache directory (TensorRT/ONNX); empty = default."),
    _Param("image_topic", "image_topic", _D.image_topic, "Input image topic."),
    _Param("image_transport", "image_transport", "raw", "raw (Image) or compressed (<image_topic>/compressed)."),
    _Param("qos", "qos", "reliable", "Image subscription QoS: reliable or sensor_data (best effort)."),
    _Param("qos_depth", "qos_depth", 1, "Image subscription history depth.", _int_range(1, 1000)),
    _Param("map_frame", "map_frame", "map", "Frame of the published poses (the model's world frame)."),
    _Param("camera_frame", "camera_frame", "", "Camera optical frame; empty = the image's frame_id."),
    _Param("base_frame", "base_frame", "", "Robot base frame; empty = report the camera pose."),
    _Param("odom_frame", "odom_frame", "odom", "Odometry frame for tf_mode map_to_odom."),
    _Param("base_to_camera.xyz", None, [0.0, 0.0, 0.0], "Camera position in base_frame, metres [x, y, z]."),
    _Param("base_to_camera.quat_xyzw", None, [0.0, 0.0, 0.0, 1.0], "Camera orientation in base_frame [x, y, z, w]."),
    _Param(
        "min_confidence",
        "min_confidence",
        0.0,
        "Publish only estimates whose scene probability is >= this.",
        _float_range(0.0, 1.0),
        dynamic=True,
    ),
    _Param(
        "covariance.position", None, list(_D.covariance_position), "Position variances [x, y, z] in m^2.", dynamic=True
    ),
    _Param(
        "covariance.orientation",
        None,
        list(_D.covariance_orientation),
        "Orientation variances [roll, pitch, yaw] in rad^2.",
        dynamic=True,
    ),
    _Param(
        "covariance.scale_by_confidence",
        "covariance_scale_by_confidence",
        True,
        "Divide the covariance diagonal by the estimate's confidence.",
        dynamic=True,
    ),
    _Param(
        "max_rate_hz",
        "max_rate_hz",
        0.0,
        "Processed frames per second at most (0 = unlimited).",
        _float_range(0.0, 1000.0),
        dynamic=True,
    ),
    _Param(
        "max_frame_age_s",
        "max_frame_age_s",
        0.0,
        "Drop frames older than this (0 = no limit).",
        _float_range(0.0, 3600.0),
        dynamic=True,
    ),
    _Param(
        "max_image_pixels",
        "max_image_pixels",
        _D.max_image_pixels,
        "Reject images with more pixels.",
        _int_range(1, 1_000_000_000),
        dynamic=True,
    ),
    _Param("publish_tf", "publish_tf", True, "Broadcast the pose on TF (see tf_mode).", dynamic=True),
    _Param("tf_mode", "tf_mode", _D.tf_mode, f"One of {TF_MODES}."),
    _Param(
        "tf_lookup_timeout_s",
        "tf_lookup_timeout_s",
        _D.tf_lookup_timeout_s,
        "Timeout of the odom -> base lookup (tf_mode map_to_odom).",
        _float_range(0.0, 10.0),
        dynamic=True,
    ),
    _Param(
        "relocalize.samples",
        "relocalize_samples",
        5,
        "Confident estimates fused by ~/relocalize.",
        _int_range(1, 1000),
        dynamic=True,
    ),
    _Param(
        "relocalize.timeout_s",
        "relocalize_timeout_s",
        10.0,
        "How long ~/relocalize waits for its samples.",
        _float_range(0.1, 600.0),
        dynamic=True,
    ),
    _Param("initialpose_topic", "initialpose_topic", "/initialpose", "Where ~/relocalize publishes its pose."),
    _Param("hint.enable", "hint_enable", False, "Publish the next confident estimate on each hint trigger."),
    _Param("hint.trigger_topic", "hint_trigger_topic", _D.hint_trigger_topic, "Hint trigger topic."),
    _Param("hint.trigger_type", "hint_trigger_type", "empty", "empty (std_msgs/Empty) or bool (std_msgs/Bool)."),
    _Param("hint.output_topic", "hint_output_topic", "", "Hint output topic; empty = initialpose_topic."),
    _Param(
        "diagnostics_period_s",
        "diagnostics_period_s",
        1.0,
        "Period of /diagnostics.",
        {**_float_range(0.05, 60.0), **_RO},
    ),
]
_DYNAMIC = {p.name for p in _PARAMS if p.dynamic}


def _validate(name: str, value: Any) -> str | None:
    """One sentence on why ``value`` is not acceptable for parameter ``name``, or None."""
    choices = {
        "backend": BACKENDS,
        "precision": PRECISIONS,
        "image_transport": TRANSPORTS,
        "qos": QOS_CHOICES,
        "tf_mode": TF_MODES,
        "hint.trigger_type": HINT_TYPES,
    }
    if name in choices and value not in choices[name]:
        return f"parameter {name} must be one of {', '.join(choices[name])}, got {value!r}"
    if name == "device" and not (value in ("auto", "cpu", "cuda") or _is_cuda_index(value)):
        return f"parameter device must be auto, cpu, cuda or cuda:N, got {value!r}"
    if name in ("map_frame", "odom_frame") and not value:
        return f"parameter {name} must not be empty"
    if name in ("image_topic", "initialpose_topic") and not value:
        return f"parameter {name} must not be empty"
    if name in ("base_to_camera.xyz", "covariance.position", "covariance.orientation"):
        arr = np.asarray(value, dtype=np.float64)
        if arr.shape != (3,) or not np.all(np.isfinite(arr)):
            return f"parameter {name} must be a list of 3 finite numbers, got {list(value)}"
        if name.startswith("covariance.") and np.any(arr < 0):
            return f"parameter {name} must contain variances >= 0, got {list(value)}"
    if name == "base_to_camera.quat_xyzw":
        arr = np.asarray(value, dtype=np.float64)
        if arr.shape != (4,) or not np.all(np.isfinite(arr)) or np.linalg.norm(arr) < 1e-6:
            return f"parameter {name} must be a non-zero quaternion [x, y, z, w], got {list(value)}"
    return None


def _is_cuda_index(value: str) -> bool:
    return isinstance(value, str) and value.startswith("cuda:") and value[5:].isdigit()


# --------------------------------------------------------------------------------------------- statistics
class _Stats:
    """Thread-safe counters and latency window for diagnostics."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received = 0
        self.processed = 0
        self.published = 0
        self.stale = 0
        self.rejected = 0
        self.last_reject_reason = ""
        self.low_confidence = 0
        self.non_finite = 0
        self.inference_errors = 0
        self.lost_in_transport = 0
        self.tf_failures = 0
        self.relocalizations = 0
        self.hints = 0
        self.last_scene = ""
        self.last_confidence = float("nan")
        self.latency_ms: collections.deque[float] = collections.deque(maxlen=600)
        self.inference_ms: collections.deque[float] = collections.deque(maxlen=600)

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)


@dataclasses.dataclass
class _Sample:
    pose: np.ndarray  # tracked-frame pose in the map (7,)
    scene_name: str
    confidence: float
    stamp: Any  # builtin_interfaces/Time


class _Collector:
    """Gathers confident estimates for one ~/relocalize call."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.samples: list[_Sample] = []
        self.done = threading.Event()

    def offer(self, sample: _Sample) -> None:
        if len(self.samples) < self.n:
            self.samples.append(sample)
        if len(self.samples) >= self.n:
            self.done.set()


def _fuse(samples: list[_Sample]) -> tuple[np.ndarray, str, int, float, float]:
    """Fuse samples of the most frequent scene: (pose (7,), scene, n used, position spread m, rotation spread deg).

    Position: per-axis median; orientation: :func:`geometry.quat_average`. Spreads are the largest distance of a
    used sample from the fused pose.
    """
    scenes = collections.Counter(s.scene_name for s in samples)
    scene, _ = scenes.most_common(1)[0]
    used = [s for s in samples if s.scene_name == scene]
    poses = np.stack([s.pose for s in used])
    position = np.median(poses[:, :3], axis=0)
    quat = geometry.quat_average(poses[:, 3:7])
    fused = np.concatenate([position, quat])
    pos_err, rot_err = geometry.pose_errors(poses, fused[None, :])
    return fused, scene, len(used), float(np.max(pos_err)), float(np.max(rot_err))


# --------------------------------------------------------------------------------------------- the node
class LocalizerNode(LifecycleNode):
    """Lifecycle node wrapping :class:`apr_localizer.localizer.Localizer` (see the module docstring)."""

    def __init__(self, node_name: str = "apr_localizer", **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self._cfg = NodeConfig()
        self._cfg_lock = threading.Lock()
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.add_post_set_parameters_callback(self._after_set_parameters)
        for p in _PARAMS:
            note = "" if p.dynamic or p.descriptor.get("read_only") else " Applied at the next configure/activate."
            self.declare_parameter(
                p.name, p.default, ParameterDescriptor(description=p.description + note, **p.descriptor)
            )

        self._stats = _Stats()
        self._mailbox = LatestMailbox()
        self._localizer = None
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        self._active = threading.Event()
        self._effective_tf_mode = self._cfg.tf_mode
        self._base_T_camera = np.array(self._cfg.base_to_camera)
        self._warned_no_frame = False
        self._last_seq: dict[bytes, int] = {}
        self._image_type: type = Image

        self._pubs: dict[str, Any] = {}
        self._tf_broadcaster = None
        self._tf_buffer = None
        self._tf_listener = None
        self._image_sub = None
        self._hint_sub = None
        self._relocalize_srv = None
        self._image_group = MutuallyExclusiveCallbackGroup()
        self._service_group = MutuallyExclusiveCallbackGroup()

        self._collector: _Collector | None = None
        self._collector_lock = threading.Lock()
        self._hint_pending = threading.Event()
        self._last_error = ""
        self._diag_last = (time.monotonic(), 0, 0)
        # /diagnostics runs in every lifecycle state (a node stuck in unconfigured reports why), on a steady clock
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(
            self.get_parameter("diagnostics_period_s").value,
            self._publish_diagnostics,
            clock=Clock(clock_type=ClockType.STEADY_TIME),
        )
        self.get_logger().info(f"created; state unconfigured (tf2_ros {'found' if HAVE_TF2_ROS else 'not found'})")

    # ------------------------------------------------------------------------------------ parameters
    @property
    def lifecycle_label(self) -> str:
        """Label of the current lifecycle state (``unconfigured``, ``inactive``, ``active``, ``finalized``, ...)."""
        return self._state_machine.current_state[1]

    @property
    def config(self) -> NodeConfig:
        """The current parameter snapshot."""
        with self._cfg_lock:
            return self._cfg

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        for p in params:
            reason = _validate(p.name, p.value)
            if reason is not None:
                return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    def _after_set_parameters(self, params: list[Parameter]) -> None:
        if any(p.name in _DYNAMIC for p in params) and hasattr(self, "_stats"):
            fresh = self._read_config()
            with self._cfg_lock:
                self._cfg = dataclasses.replace(
                    self._cfg, **{f.name: getattr(fresh, f.name) for f in _dynamic_fields()}
                )

    def _read_config(self) -> NodeConfig:
        """Build a :class:`NodeConfig` from the current parameter values."""
        get = self.get_parameter
        values: dict[str, Any] = {}
        for p in _PARAMS:
            if p.field is not None:
                values[p.field] = get(p.name).value
        xyz = [float(v) for v in get("base_to_camera.xyz").value]
        q_wxyz = geometry.quat_from_ros([float(v) for v in get("base_to_camera.quat_xyzw").value])
        values["base_to_camera"] = tuple(np.concatenate([xyz, geometry.quat_normalize(q_wxyz)]).tolist())
        values["covariance_position"] = tuple(float(v) for v in get("covariance.position").value)
        values["covariance_orientation"] = tuple(float(v) for v in get("covariance.orientation").value)
        return NodeConfig(**values)

    # ------------------------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load and warm up the model, create the publishers, start the worker."""
        log = self.get_logger()
        cfg = self._read_config()
        if not cfg.model_path:
            return self._configure_failed("parameter model.path is empty; set it to a .safetensors or .pth model file")
        tf_mode = cfg.tf_mode
        if tf_mode == "map_to_odom" and not HAVE_TF2_ROS:
            log.warning(
                "tf_mode map_to_odom needs tf2_ros to look up odom -> base, and tf2_ros is not installed here; "
                "falling back to tf_mode map_to_base"
            )
            tf_mode = "map_to_base"
        if tf_mode in ("map_to_base", "map_to_odom") and not cfg.base_frame:
            return self._configure_failed(f"tf_mode {tf_mode} needs parameter base_frame, which is empty")
        if cfg.publish_tf and not HAVE_TF2_ROS and not ros_convert.HAVE_TF2_MSGS:
            log.warning("publish_tf is true but neither tf2_ros nor tf2_msgs is importable; TF will not be published")
        try:
            localizer = self._load_localizer(cfg)
        except Exception as exc:  # ModelLoadError and anything a broken model file can raise
            return self._configure_failed(f"cannot load model {cfg.model_path!r}: {exc}")

        with self._cfg_lock:
            self._cfg = cfg
        self._localizer = localizer
        self._effective_tf_mode = tf_mode
        self._base_T_camera = np.asarray(cfg.base_to_camera, dtype=np.float64)
        try:
            self._create_publishers(cfg, tf_mode)
        except Exception as exc:  # e.g. an invalid topic name in initialpose_topic / hint.output_topic
            self._release_configured()
            return self._configure_failed(f"cannot create the publishers: {exc}")
        self._stats = _Stats()
        self._mailbox = LatestMailbox()
        self._stop.clear()
        self._worker = threading.Thread(target=self._worker_loop, name="apr_localizer_worker", daemon=True)
        self._worker.start()
        self._diag_last = (time.monotonic(), 0, 0)
        self._last_error = ""
        log.info(
            f"configured: model {cfg.model_path} on {localizer.backend_name}/{localizer.device}, "
            f"{len(localizer.scene_names)} scenes"
        )
        return super().on_configure(state)

    def _configure_failed(self, reason: str) -> TransitionCallbackReturn:
        self._last_error = f"configure failed: {reason}"
        self.get_logger().error(self._last_error)
        return TransitionCallbackReturn.FAILURE

    def _load_localizer(self, cfg: NodeConfig):
        from apr_localizer.localizer import Localizer, LocalizerOptions

        options = LocalizerOptions(
            backend=cfg.backend,
            device=cfg.device,
            precision=cfg.precision,
            iapr_iterations=cfg.iapr_iterations,
            threads=cfg.threads,
            cache_dir=cfg.cache_dir or None,
        )
        loc = Localizer.from_files(
            model=cfg.model_path, iapr=cfg.iapr_path or None, pae=cfg.pae_path or None, options=options
        )
        try:
            loc.warmup()
        except BaseException:
            loc.close()
            raise
        return loc

    def _create_publishers(self, cfg: NodeConfig, tf_mode: str) -> None:
        reliable10 = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
        self._pubs["pose"] = self.create_lifecycle_publisher(PoseStamped, "~/pose", reliable10)
        self._pubs["pose_cov"] = self.create_lifecycle_publisher(
            PoseWithCovarianceStamped, "~/pose_with_covariance", reliable10
        )
        self._pubs["initialpose"] = self.create_lifecycle_publisher(
            PoseWithCovarianceStamped, cfg.initialpose_topic, reliable10
        )
        if cfg.hint_enable:
            topic = cfg.hint_output_topic or cfg.initialpose_topic
            if topic == cfg.initialpose_topic:
                self._pubs["hint"] = self._pubs["initialpose"]
            else:
                self._pubs["hint"] = self.create_lifecycle_publisher(PoseWithCovarianceStamped, topic, reliable10)
        if HAVE_TF2_ROS or ros_convert.HAVE_TF2_MSGS:  # created even if publish_tf is false: it is dynamic
            if HAVE_TF2_ROS:
                self._tf_broadcaster = tf2_ros.TransformBroadcaster(self)
            elif ros_convert.HAVE_TF2_MSGS:
                tf_qos = QoSProfile(
                    depth=100,
                    reliability=ReliabilityPolicy.RELIABLE,
                    durability=DurabilityPolicy.VOLATILE,
                    history=HistoryPolicy.KEEP_LAST,
                )
                self._pubs["tf"] = self.create_lifecycle_publisher(ros_convert.TFMessage, "/tf", tf_qos)
        if tf_mode == "map_to_odom" and HAVE_TF2_ROS:
            self._tf_buffer = tf2_ros.Buffer()
            self._tf_listener = tf2_ros.TransformListener(self._tf_buffer, self, spin_thread=False)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Enable publishers; create the image and hint subscriptions and the ~/relocalize service."""
        cfg = self.config
        if cfg.qos == "sensor_data":
            qos = QoSProfile(
                depth=cfg.qos_depth,
                reliability=qos_profile_sensor_data.reliability,
                durability=qos_profile_sensor_data.durability,
                history=HistoryPolicy.KEEP_LAST,
            )
        else:
            qos = QoSProfile(
                depth=cfg.qos_depth, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST
            )
        msg_type = CompressedImage if cfg.image_transport == "compressed" else Image
        self._mailbox.clear()
        self._last_seq = {}
        self._image_type = msg_type
        try:
            self._image_sub = self.create_subscription(
                msg_type, cfg.subscribed_topic, self._on_image, qos, callback_group=self._image_group, raw=True
            )
            if cfg.hint_enable:
                trigger_type = Bool if cfg.hint_trigger_type == "bool" else Empty
                self._hint_sub = self.create_subscription(
                    trigger_type, cfg.hint_trigger_topic, self._on_hint_trigger, 10, callback_group=self._image_group
                )
            self._relocalize_srv = self.create_service(
                Trigger, "~/relocalize", self._on_relocalize, callback_group=self._service_group
            )
        except Exception as exc:  # e.g. an invalid image_topic; rclpy would swallow it silently
            self._release_active()
            self.get_logger().error(f"activate failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        self._active.set()
        self.get_logger().info(
            f"active: subscribed to {self.resolve_topic_name(cfg.subscribed_topic)} "
            f"({msg_type.__name__}, qos {cfg.qos} depth {cfg.qos_depth})"
        )
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Destroy subscriptions and the service; drop the pending frame; abort a running relocalize."""
        self._release_active()
        self.get_logger().info("deactivated")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop the worker, destroy the publishers, close the model."""
        self._release_configured()
        self.get_logger().info("cleaned up")
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Release everything that the current state holds."""
        self._release_active()
        self._release_configured()
        self.get_logger().info("shut down")
        return super().on_shutdown(state)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Release everything and go back to unconfigured."""
        self.get_logger().error(f"error while in state {state.label}; releasing resources")
        self._release_active()
        self._release_configured()
        return TransitionCallbackReturn.SUCCESS

    def abort_waits(self) -> None:
        """End a running ``~/relocalize`` wait now (it then answers with what it has); used on SIGINT."""
        with self._collector_lock:
            if self._collector is not None:
                self._collector.done.set()

    def _release_active(self) -> None:
        self._active.clear()
        self._hint_pending.clear()
        self.abort_waits()
        for attr in ("_image_sub", "_hint_sub"):
            sub = getattr(self, attr)
            if sub is not None:
                self.destroy_subscription(sub)
                setattr(self, attr, None)
        if self._relocalize_srv is not None:
            self.destroy_service(self._relocalize_srv)
            self._relocalize_srv = None
        self._mailbox.clear()

    def _release_configured(self) -> None:
        self._stop.set()
        self._mailbox.close()
        if self._worker is not None:
            self._worker.join(timeout=30.0)
            if self._worker.is_alive():
                self.get_logger().error("worker thread did not stop within 30 s")
            self._worker = None
        for pub in {id(p): p for p in self._pubs.values()}.values():
            self.destroy_lifecycle_publisher(pub)
        self._pubs.clear()
        if self._tf_broadcaster is not None:
            self.destroy_publisher(self._tf_broadcaster.pub_tf)
            self._tf_broadcaster = None
        if self._tf_listener is not None:
            self._tf_listener.unregister()
            self._tf_listener = None
            self._tf_buffer = None
        if self._localizer is not None:
            try:
                self._localizer.close()
            finally:
                self._localizer = None

    # ------------------------------------------------------------------------------------ callbacks
    def _on_image(self, data: bytes, info: dict) -> None:
        """Store the serialized message (raw subscription: frames that get replaced are never deserialized)."""
        lost = self._transport_gap(info)
        with self._stats.lock:
            self._stats.received += 1
            self._stats.lost_in_transport += lost
        self._mailbox.put((data, self._image_type, time.monotonic()))

    def _transport_gap(self, info: dict) -> int:
        """Messages a publisher sent that never reached this callback (DDS history overwrites), from sequence gaps."""
        seq, gid = info.get("publication_sequence_number"), info.get("publisher_gid")
        if not seq or not gid:
            return 0
        key = bytes(gid.get("data", b"")) if isinstance(gid, dict) else bytes(gid)
        last = self._last_seq.get(key)
        self._last_seq[key] = seq
        if len(self._last_seq) > 64:  # publishers come and go; keep the map bounded
            self._last_seq = {key: seq}
        return max(0, seq - last - 1) if last is not None and seq > last else 0

    def _on_hint_trigger(self, msg: Empty | Bool) -> None:
        if isinstance(msg, Bool) and not msg.data:
            return
        self._hint_pending.set()

    def _on_relocalize(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        cfg = self.config
        if not self._active.is_set():
            response.success, response.message = False, "the node is not active; activate it first"
            return response
        collector = _Collector(cfg.relocalize_samples)
        with self._collector_lock:
            if self._collector is not None:
                response.success, response.message = False, "a relocalize request is already running"
                return response
            self._collector = collector
        # A single-threaded executor cannot run the image callback while this one waits: take the frames from the
        # subscription here instead. A MultiThreadedExecutor delivers them through its other threads.
        pump = not isinstance(self.executor, MultiThreadedExecutor)
        deadline = time.monotonic() + cfg.relocalize_timeout_s
        try:
            while self._active.is_set() and not collector.done.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0.0:
                    break
                if pump:
                    self._pump_images()
                collector.done.wait(min(remaining, 0.005 if pump else 0.1))
        finally:
            with self._collector_lock:
                self._collector = None
        samples = list(collector.samples)
        if len(samples) < collector.n:
            response.success = False
            response.message = (
                f"got {len(samples)} of {collector.n} confident estimates within {cfg.relocalize_timeout_s:g} s "
                f"(min_confidence {cfg.min_confidence:g}); nothing published"
            )
            return response
        fused, scene, n_used, pos_spread, rot_spread = _fuse(samples)
        mean_conf = float(np.mean([s.confidence for s in samples if s.scene_name == scene]))
        cov = self._covariance(cfg, mean_conf)
        # widen the configured covariance with the observed spread of the fused samples
        diag = cov.reshape(6, 6).diagonal().copy()
        diag[:3] = np.maximum(diag[:3], pos_spread**2)
        diag[3:] = np.maximum(diag[3:], np.radians(rot_spread) ** 2)
        msg = ros_convert.pose_with_covariance_stamped(
            fused, np.diag(diag).reshape(36), cfg.map_frame, samples[-1].stamp
        )
        self._pubs["initialpose"].publish(msg)
        self._stats.add(relocalizations=1)
        response.success = True
        response.message = (
            f"published {self.resolve_topic_name(cfg.initialpose_topic)} from n={n_used} of {len(samples)} "
            f"estimates, scene {scene}, spread {pos_spread:.3f} m / {rot_spread:.2f} deg, "
            f"position [{fused[0]:.3f}, {fused[1]:.3f}, {fused[2]:.3f}]"
        )
        self.get_logger().info(response.message)
        return response

    def _pump_images(self) -> None:
        """Take the waiting image messages straight from the subscription and hand them to :meth:`_on_image`."""
        sub = self._image_sub
        if sub is None:
            return
        try:
            with sub.handle:
                while (taken := sub.handle.take_message(sub.msg_type, sub.raw)) is not None:
                    self._on_image(*taken)
        except InvalidHandle:  # destroyed by a concurrent deactivate
            pass

    # ------------------------------------------------------------------------------------ worker
    def _worker_loop(self) -> None:
        next_allowed = 0.0
        while not self._stop.is_set():
            cfg = self.config
            if cfg.max_rate_hz > 0.0:
                wait = next_allowed - time.monotonic()
                if wait > 0.0 and self._stop.wait(wait):
                    break
            item = self._mailbox.get(timeout=0.25)
            if item is None or not self._active.is_set():
                continue
            cfg = self.config  # parameters may have changed while waiting
            started = time.monotonic()
            if cfg.max_rate_hz > 0.0:
                next_allowed = started + 1.0 / cfg.max_rate_hz
            try:
                self._process(*item, cfg)
            except Exception as exc:  # never let one frame kill the worker
                self._stats.add(inference_errors=1)
                self.get_logger().error(
                    f"frame processing failed: {type(exc).__name__}: {exc}", throttle_duration_sec=_LOG_THROTTLE_S
                )

    def _reject(self, reason: str) -> None:
        with self._stats.lock:
            self._stats.rejected += 1
            self._stats.last_reject_reason = reason
        self.get_logger().warning(f"dropped an input image: {reason}", throttle_duration_sec=_LOG_THROTTLE_S)

    def _process(self, data: bytes, msg_type: type, received: float, cfg: NodeConfig) -> None:
        try:
            msg = deserialize_message(data, msg_type)
        except Exception as exc:  # a CDR buffer that does not hold a msg_type
            self._reject(f"cannot deserialize a {msg_type.__name__} message: {exc}")
            return
        del data
        stamp = msg.header.stamp
        stamp_ns = ros_convert.time_to_ns(stamp)
        if cfg.max_frame_age_s > 0.0 and stamp_ns > 0:
            age = (self.get_clock().now().nanoseconds - stamp_ns) * 1e-9
            if age > cfg.max_frame_age_s:
                self._stats.add(stale=1)
                self.get_logger().warning(
                    f"dropped a stale image ({age:.2f} s old > max_frame_age_s {cfg.max_frame_age_s:g}); "
                    "replaying a bag needs use_sim_time",
                    throttle_duration_sec=_LOG_THROTTLE_S,
                )
                return
        try:
            rgb = ros_convert.msg_to_rgb(msg, cfg.max_image_pixels)
        except ImageDecodeError as exc:
            self._reject(str(exc))
            return
        except Exception as exc:  # anything else a malformed message can trigger
            self._reject(f"{type(exc).__name__}: {exc}")
            return
        est = self._localizer.localize(rgb)
        del rgb
        with self._stats.lock:
            self._stats.processed += 1
            self._stats.inference_ms.append(float(est.timings_ms.get("total", float("nan"))))
        if not est.is_finite():
            self._stats.add(non_finite=1)
            self.get_logger().warning("estimate has NaN/inf entries; not published", throttle_duration_sec=5.0)
            return
        if est.confidence < cfg.min_confidence:
            self._stats.add(low_confidence=1)
            return

        camera_frame = cfg.camera_frame or msg.header.frame_id
        if not camera_frame:
            camera_frame = "camera"
            if not self._warned_no_frame:
                self._warned_no_frame = True
                self.get_logger().warning("images have no frame_id and camera_frame is empty; using 'camera'")
        map_T_camera = np.asarray(est.pose, dtype=np.float64)
        map_T_base = geometry.camera_to_base(map_T_camera, self._base_T_camera) if cfg.base_frame else None
        tracked = map_T_base if map_T_base is not None else map_T_camera
        cov = self._covariance(cfg, est.confidence)

        self._pubs["pose"].publish(ros_convert.pose_stamped(tracked, cfg.map_frame, stamp))
        self._pubs["pose_cov"].publish(ros_convert.pose_with_covariance_stamped(tracked, cov, cfg.map_frame, stamp))
        if cfg.publish_tf:
            self._publish_tf(cfg, stamp, camera_frame, map_T_camera, map_T_base)

        sample = _Sample(tracked, est.scene_name, float(est.confidence), ros_convert.time_copy(stamp))
        with self._collector_lock:
            if self._collector is not None:
                self._collector.offer(sample)
        if self._hint_pending.is_set() and "hint" in self._pubs:
            self._hint_pending.clear()
            self._pubs["hint"].publish(ros_convert.pose_with_covariance_stamped(tracked, cov, cfg.map_frame, stamp))
            self._stats.add(hints=1)
        with self._stats.lock:
            self._stats.published += 1
            self._stats.last_scene = est.scene_name
            self._stats.last_confidence = float(est.confidence)
            self._stats.latency_ms.append((time.monotonic() - received) * 1e3)

    def _covariance(self, cfg: NodeConfig, confidence: float) -> np.ndarray:
        return ros_convert.covariance_from_diagonal(
            cfg.covariance_position,
            cfg.covariance_orientation,
            confidence,
            scale_by_confidence=cfg.covariance_scale_by_confidence,
        )

    def _publish_tf(self, cfg: NodeConfig, stamp, camera_frame: str, map_T_camera, map_T_base) -> None:
        mode = self._effective_tf_mode
        if mode == "map_to_camera":
            tf = ros_convert.transform_stamped(map_T_camera, cfg.map_frame, camera_frame, stamp)
        elif mode == "map_to_base":
            tf = ros_convert.transform_stamped(map_T_base, cfg.map_frame, cfg.base_frame, stamp)
        else:
            odom_T_base = self._lookup_odom_to_base(cfg, stamp)
            if odom_T_base is None:
                return
            map_T_odom = geometry.map_to_odom(map_T_base, odom_T_base)
            tf = ros_convert.transform_stamped(map_T_odom, cfg.map_frame, cfg.odom_frame, stamp)
        if self._tf_broadcaster is not None:
            self._tf_broadcaster.sendTransform(tf)
        elif "tf" in self._pubs:
            self._pubs["tf"].publish(ros_convert.tf_message([tf]))

    def _lookup_odom_to_base(self, cfg: NodeConfig, stamp) -> np.ndarray | None:
        try:
            tf = self._tf_buffer.lookup_transform(
                cfg.odom_frame,
                cfg.base_frame,
                rclpy.time.Time.from_msg(stamp),
                timeout=rclpy.duration.Duration(seconds=cfg.tf_lookup_timeout_s),
            )
        except Exception as exc:  # tf2 lookup/extrapolation/connectivity errors
            self._stats.add(tf_failures=1)
            self.get_logger().warning(
                f"no TF {cfg.odom_frame} -> {cfg.base_frame} at the image stamp ({exc}); map -> odom not published",
                throttle_duration_sec=_LOG_THROTTLE_S,
            )
            return None
        return ros_convert.transform_from_msg(tf)

    # ------------------------------------------------------------------------------------ diagnostics
    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        s = self._stats
        with s.lock:
            received, published = s.received, s.published
            lat = np.array(s.latency_ms, dtype=np.float64)
            inf = np.array(s.inference_ms, dtype=np.float64)
            values = {
                "frames_received": s.received,
                "frames_processed": s.processed,
                "poses_published": s.published,
                "dropped_frames": self._mailbox.dropped + s.lost_in_transport,
                "dropped_unprocessed": self._mailbox.dropped,
                "dropped_in_transport": s.lost_in_transport,
                "stale_frames": s.stale,
                "rejected_messages": s.rejected,
                "last_reject_reason": s.last_reject_reason,
                "low_confidence": s.low_confidence,
                "non_finite": s.non_finite,
                "processing_errors": s.inference_errors,
                "tf_failures": s.tf_failures,
                "relocalizations": s.relocalizations,
                "hints_published": s.hints,
                "last_scene": s.last_scene,
                "last_confidence": f"{s.last_confidence:.4f}",
            }
        t0, r0, p0 = self._diag_last
        dt = max(now - t0, 1e-6)
        self._diag_last = (now, received, published)
        in_rate, out_rate = (received - r0) / dt, (published - p0) / dt
        loc = self._localizer
        active = self._active.is_set()
        state = self.lifecycle_label
        head = {
            "state": state,
            "backend": loc.backend_name if loc is not None else "",
            "device": loc.device if loc is not None else "",
            "image_topic": self.resolve_topic_name(self.config.subscribed_topic),
            "input_rate_hz": f"{in_rate:.2f}",
            "output_rate_hz": f"{out_rate:.2f}",
        }
        for name, arr in (("latency_ms", lat), ("inference_ms", inf)):
            for pct in (50, 90, 99):
                head[f"{name}_p{pct}"] = f"{np.percentile(arr, pct):.2f}" if arr.size else "nan"
        status = DiagnosticStatus(name=f"{self.get_name()}: localizer", hardware_id=head["device"])
        if self._last_error and loc is None:
            status.level, status.message = DiagnosticStatus.ERROR, self._last_error
        elif not active:
            status.level, status.message = DiagnosticStatus.OK, state
        elif received == r0:
            status.level, status.message = DiagnosticStatus.WARN, f"no images on {head['image_topic']}"
        elif values["rejected_messages"] and values["last_reject_reason"] and published == p0:
            status.level, status.message = DiagnosticStatus.WARN, f"rejecting images: {values['last_reject_reason']}"
        else:
            status.level, status.message = DiagnosticStatus.OK, f"localizing at {out_rate:.1f} Hz"
        status.values = [KeyValue(key=k, value=str(v)) for k, v in {**head, **values}.items()]
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(msg)


def _dynamic_fields() -> list[dataclasses.Field]:
    names = {p.field for p in _PARAMS if p.dynamic and p.field is not None}
    names |= {"covariance_position", "covariance_orientation"}
    return [f for f in dataclasses.fields(NodeConfig) if f.name in names]


# --------------------------------------------------------------------------------------------- entry point
def main(args: list[str] | None = None) -> int:
    """Run the node until SIGINT/SIGTERM; return the process exit code (0 on a clean shutdown).

    rclpy's own signal handlers are replaced so that the lifecycle ``shutdown`` transition (which releases the model
    and publishes the transition event) still runs while the context is valid.
    """
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()
    node: LocalizerNode | None = None

    def request_stop(signum: int, _frame: Any) -> None:
        stop.set()
        if node is not None:
            node.abort_waits()  # a blocking ~/relocalize must not delay the shutdown

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    executor = SingleThreadedExecutor()
    try:
        try:
            node = LocalizerNode()
        except InvalidParameterTypeException as exc:
            hint = " (write floating-point values with a decimal point, e.g. 5.0)" if "DOUBLE" in str(exc) else ""
            rclpy.logging.get_logger("apr_localizer").fatal(f"invalid parameter type: {exc.args[0]}{hint}")
            return 2
        except ParameterException as exc:  # values rejected by the descriptors or _validate
            rclpy.logging.get_logger("apr_localizer").fatal(f"invalid parameter value: {exc.args[0]}")
            return 2
        executor.add_node(node)
        if node.get_parameter("autostart").value and not stop.is_set():
            if node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                node.trigger_activate()
            else:
                node.get_logger().error("autostart: configure failed; the node stays unconfigured")
        while not stop.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            if node.lifecycle_label in ("unconfigured", "inactive", "active"):
                node.trigger_shutdown()
            executor.remove_node(node)
            node.destroy_node()
        executor.shutdown()
        rclpy.try_shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
