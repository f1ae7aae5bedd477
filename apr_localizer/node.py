"""ROS 2 lifecycle node: camera images in, the robot's (base) pose in the map out; a thin shell over ROS-free parts.

Console script ``localizer_node`` (also ``python -m apr_localizer.node``)::

    localizer_node --ros-args --params-file config/localizer.yaml -p model.path:=/path/model.safetensors

Parameters: :mod:`apr_localizer.node_params` (table, validation, defaults; ``config/localizer.yaml`` documents them).
Invalid values are refused at run time with one sentence; invalid values from a params file keep the node up in
*unconfigured* with an ERROR diagnostic until they are fixed.

Lifecycle: ``configure`` loads the model, subscribes to ``/tf`` + ``/tf_static`` (a :class:`TfBuffer`), creates the
publishers and the worker thread; ``activate`` subscribes to the images, the camera info and the hint trigger, offers
``~/relocalize`` and starts the map → odom timer; ``deactivate``/``cleanup``/``shutdown`` undo that. ``autostart``
configures and activates at start (turn it off under nav2_lifecycle_manager; there is no bond: ``bond_timeout: 0.0``).

Threads: the image callback stores the newest serialized frame in a :class:`LatestMailbox`; one worker owns the
:class:`Localizer` and does deserialize → checks → localize → publish. ``~/relocalize`` is an async service: it
yields to the executor while the worker collects samples, so every other callback keeps running.

Outputs (stamped with the image stamp, in ``map_frame`` or the scene's frame; ``output_pose`` base by default):
``~/pose``, ``~/pose_with_covariance``, ``initialpose`` (fused on ``~/relocalize``), ``visual_slam/initial_pose``
(one per ``visual_slam/trigger_hint``), ``/tf`` (``publish_tf``: ``map_to_odom`` re-published at ``tf_rate_hz`` and
future-dated by ``transform_tolerance_s``; ``map_to_base``/``map_to_camera`` only when that frame has no other
parent) and ``/diagnostics``.

Uncertainty: with a calibrated model (the bundle's ``uncertainty`` metadata) every covariance is the estimate's
calibrated ``diag(σp², σp², σp², σo², σo², σo²)`` (x y z roll pitch yaw), and an estimate whose σ exceeds
``gating.max_sigma_position_m`` / ``gating.max_sigma_orientation_deg`` is gated: nothing is published for it (pose,
TF, hints), ``~/relocalize`` never sees it, diagnostics count it (``gated``). Uncalibrated models publish the
configured ``covariance.*`` (optionally divided by the scene confidence) and are never gated.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.exceptions import InvalidParameterTypeException, ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleState, TransitionCallbackReturn
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.serialization import deserialize_message
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_srvs.srv import Trigger

from apr_localizer import geometry, node_logic, ros_convert
from apr_localizer.imaging import ImageDecodeError, quote
from apr_localizer.mailbox import LatestMailbox, SequenceGaps
from apr_localizer.node_params import (
    MAX_ECHO_CHARS,
    PARAMS,
    NodeConfig,
    config_from_values,
    cross_check,
    validate,
)
from apr_localizer.relocalize import Collector, MotionLimits, Sample, odom_speed, outcome, widen_covariance
from apr_localizer.tf_buffer import TfBuffer

__all__ = ["LocalizerNode", "main"]

_LOG_THROTTLE_S = 5.0
_RELIABLE10 = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
_TF_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
_TF_STATIC_QOS = QoSProfile(
    depth=100,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
    history=HistoryPolicy.KEEP_LAST,
)


class _Yield:
    """Awaitable that hands control back to the executor once (rclpy resumes the task on its next iteration)."""

    def __await__(self):
        yield


class LocalizerNode(LifecycleNode):
    """Lifecycle node wrapping :class:`apr_localizer.localizer.Localizer` (see the module docstring)."""

    def __init__(self, node_name: str = "apr_localizer", **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self._param_errors = self._declare_parameters()
        self._cfg = self._read_config()
        self._cfg_lock = threading.Lock()
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.add_post_set_parameters_callback(self._after_set_parameters)

        self._stats = node_logic.Stats()
        self._mailbox = LatestMailbox()
        self._localizer: Any = None
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        self._abort = threading.Event()  # a signal during configure
        self._active = threading.Event()
        self._tf = TfBuffer(cache_s=self._cfg.tf_cache_s)
        self._map_odom = node_logic.MapOdomFilter()
        self._map_odom_lock = threading.Lock()
        self._camera_frame_hint = ""
        self._camera_info: tuple[tuple[float, ...], int, int] | None = None
        self._trained_camera: dict | None = None
        self._gaps = SequenceGaps()
        self._image_type: type = Image
        self._pubs: dict[str, Any] = {}
        self._subs: dict[str, Any] = {}
        self._srv: Any = None
        self._tf_timer: Any = None
        self._service_group = MutuallyExclusiveCallbackGroup()
        self._collector: Collector | None = None
        self._collector_lock = threading.Lock()
        self._hint_pending = threading.Event()
        self._last_error = ""
        self._diag_last = (time.monotonic(), dict(self._stats.c))
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(
            self.get_parameter("diagnostics_period_s").value,
            self._publish_diagnostics,
            clock=Clock(clock_type=ClockType.STEADY_TIME),
        )
        self.get_logger().info("created; state unconfigured")

    # ------------------------------------------------------------------------------------ parameters
    def _declare_parameters(self) -> dict[str, str]:
        """Declare every parameter; return {name: one-sentence problem} for the values that cannot be used."""
        errors: dict[str, str] = {}
        for p in PARAMS:
            desc = ParameterDescriptor(description=p.description, read_only=p.read_only)
            try:
                self.declare_parameter(p.name, p.default, desc)
            except InvalidParameterTypeException as exc:
                hint = " (write floating-point values with a decimal point, e.g. 5.0)" if "DOUBLE" in str(exc) else ""
                errors[p.name] = f"parameter {p.name} has the wrong type: {exc.args[0]}{hint}"
                self.declare_parameter(p.name, p.default, desc, ignore_override=True)
        for p in PARAMS:
            reason = validate(p.name, self.get_parameter(p.name).value)
            if reason is not None:
                errors[p.name] = reason
        for reason in errors.values():
            self.get_logger().error(f"invalid parameter: {reason}; configure is refused until it is fixed")
        return errors

    @property
    def lifecycle_label(self) -> str:
        """Label of the current lifecycle state (``unconfigured``, ``inactive``, ``active``, ``finalized``, ...)."""
        return self._state_machine.current_state[1]

    @property
    def config(self) -> NodeConfig:
        """The current parameter snapshot."""
        with self._cfg_lock:
            return self._cfg

    def _read_config(self) -> NodeConfig:
        return config_from_values({p.name: self.get_parameter(p.name).value for p in PARAMS})

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        for p in params:
            reason = validate(p.name, p.value)
            if reason is not None:
                return SetParametersResult(successful=False, reason=reason)
        merged = {**{q.name: self.get_parameter(q.name).value for q in PARAMS}, **{p.name: p.value for p in params}}
        reason = cross_check(config_from_values(merged))
        return SetParametersResult(successful=reason is None, reason=reason or "")

    def _after_set_parameters(self, params: list[Parameter]) -> None:
        dynamic = {p.name for p in PARAMS if p.dynamic}
        for p in params:
            self._param_errors.pop(p.name, None)
        with self._cfg_lock:
            values = dict(self._cfg.values)
            values.update({p.name: p.value for p in params if p.name in dynamic})
            self._cfg = config_from_values(values)

    # ------------------------------------------------------------------------------------ lifecycle
    def request_abort(self) -> None:
        """Abort a configure in progress and end a pending ``~/relocalize`` (a signal arrived)."""
        self._abort.set()
        self.abort_waits()

    def abort_waits(self) -> None:
        """End a running ``~/relocalize`` collection now (it then answers with what it has)."""
        with self._collector_lock:
            if self._collector is not None:
                self._collector.done.set()

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load and warm up the model, subscribe to TF, create the publishers, start the worker."""
        cfg = self._read_config()
        problem = next(iter(self._param_errors.values()), None) or cross_check(cfg)
        if problem is None and not cfg.model_path:
            problem = "parameter model.path is empty; set it to a .safetensors or .pth model file"
        if problem is not None:
            return self._configure_failed(problem)
        try:
            localizer = self._load_localizer(cfg)
        except Exception as exc:  # ModelLoadError and anything a broken model file can raise
            return self._configure_failed(f"cannot load model {quote(cfg.model_path, 256)}: {quote(str(exc), 256)}")
        if localizer is None:
            return self._configure_failed("aborted by a signal")
        with self._cfg_lock:
            self._cfg = cfg
        self._localizer = localizer
        self._trained_camera = localizer.bundle.camera  # load_model also reads it from older models' provenance
        self._tf = TfBuffer(cache_s=cfg.tf_cache_s)
        self._map_odom = node_logic.MapOdomFilter()
        try:
            self._create_publishers(cfg)
        except Exception as exc:
            self._release_configured()
            return self._configure_failed(f"cannot create the publishers: {quote(str(exc), 256)}")
        self._stats = node_logic.Stats()
        self._diag_last = (time.monotonic(), dict(self._stats.c))
        self._mailbox = LatestMailbox()
        self._stop.clear()
        self._worker = threading.Thread(target=self._worker_loop, name="apr_localizer_worker", daemon=True)
        self._worker.start()
        self._last_error = ""
        self.get_logger().info(
            f"configured: model {cfg.model_path} on {localizer.backend_name}/{localizer.device}, "
            f"{len(localizer.scene_names)} scenes, output_pose {cfg.output_pose}, publish_tf {cfg.publish_tf}"
        )
        return super().on_configure(state)

    def _configure_failed(self, reason: str) -> TransitionCallbackReturn:
        self._last_error = f"configure failed: {reason}"
        self.get_logger().error(self._last_error)
        return TransitionCallbackReturn.FAILURE

    def _load_localizer(self, cfg: NodeConfig) -> Any:
        """Load + warm up; None when a signal arrived meanwhile (the model is released again)."""
        from apr_localizer.localizer import Localizer, LocalizerOptions

        options = LocalizerOptions(
            backend=cfg.backend,
            device=cfg.device,
            precision=cfg.precision,
            iapr_iterations=cfg.iapr_iterations,
            threads=cfg.threads,
            cache_dir=cfg.cache_dir or None,
            cuda_graphs=cfg.cuda_graphs,
            tf32=cfg.tf32,
            calibration_dir=cfg.int8_calibration_dir or None,
        )
        loc = Localizer.from_files(
            cfg.model_path,
            cfg.model_iapr_path or None,
            cfg.model_pae_path or None,
            options=options,
            orientation=cfg.model_orientation or None,
        )
        try:
            if not self._abort.is_set():
                loc.warmup()
        except BaseException:
            loc.close()
            raise
        if self._abort.is_set():
            loc.close()
            return None
        return loc

    def _create_publishers(self, cfg: NodeConfig) -> None:
        pub = self.create_lifecycle_publisher
        self._pubs["pose"] = pub(PoseStamped, "~/pose", _RELIABLE10)
        self._pubs["pose_cov"] = pub(PoseWithCovarianceStamped, "~/pose_with_covariance", _RELIABLE10)
        self._pubs["initialpose"] = pub(PoseWithCovarianceStamped, cfg.initialpose_topic, _RELIABLE10)
        if cfg.hint_enable:
            self._pubs["hint"] = pub(PoseWithCovarianceStamped, cfg.hint_output_topic, _RELIABLE10)
        if ros_convert.HAVE_TF2_MSGS:
            self._pubs["tf"] = pub(ros_convert.TFMessage, "/tf", _TF_QOS)
            self._subs["tf"] = self.create_subscription(ros_convert.TFMessage, "/tf", self._on_tf, _TF_QOS)
            self._subs["tf_static"] = self.create_subscription(
                ros_convert.TFMessage, "/tf_static", lambda m: self._on_tf(m, static=True), _TF_STATIC_QOS
            )
        elif cfg.publish_tf or cfg.extrinsic_source == "tf":
            self.get_logger().warning("tf2_msgs is not importable: no TF input or output (build it: make venv)")

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Enable publishers; subscribe to images, camera info and hints; offer ~/relocalize; start the TF timer."""
        cfg = self.config
        reliability = ReliabilityPolicy.RELIABLE if cfg.qos == "reliable" else qos_profile_sensor_data.reliability
        qos = QoSProfile(depth=cfg.qos_depth, reliability=reliability, history=HistoryPolicy.KEEP_LAST)
        self._image_type = CompressedImage if cfg.image_transport == "compressed" else Image
        self._mailbox.clear()
        self._gaps = SequenceGaps()
        try:
            self._subs["image"] = self.create_subscription(
                self._image_type,
                cfg.subscribed_topic,
                self._on_image,  # type: ignore[arg-type]  # raw=True: the callback gets the serialized bytes
                qos,
                raw=True,
            )
            if self._trained_camera is not None and cfg.camera_info_check != "off":
                self._subs["camera_info"] = self.create_subscription(
                    CameraInfo, cfg.camera_info, self._on_camera_info, qos_profile_sensor_data
                )
            if cfg.hint_enable:
                self._subs["hint"] = self.create_subscription(
                    PoseWithCovarianceStamped,
                    cfg.hint_trigger_topic,
                    lambda _m: self._hint_pending.set(),
                    qos_profile_sensor_data,  # best effort: matches a reliable or a best-effort trigger publisher
                )
            self._srv = self.create_service(
                Trigger, "~/relocalize", self._on_relocalize, callback_group=self._service_group
            )
            if cfg.tf_mode == "map_to_odom":  # publish_tf is dynamic: the timer checks it
                self._tf_timer = self.create_timer(1.0 / cfg.tf_rate_hz, self._republish_map_odom)
        except Exception as exc:  # rclpy refuses a name the validation let through: fail the transition
            self._release_active()
            self.get_logger().error(f"activate failed: {quote(str(exc), 256)}")
            return TransitionCallbackReturn.FAILURE
        self._active.set()
        self.get_logger().info(
            f"active: subscribed to {self._resolved(cfg.subscribed_topic)} "
            f"({self._image_type.__name__}, qos {cfg.qos} depth {cfg.qos_depth})"
        )
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Destroy the subscriptions, service and timer; drop the pending frame; end a running relocalize."""
        self._release_active()
        self.get_logger().info("deactivated")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop the worker, destroy the publishers and TF subscriptions, close the model."""
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

    def _release_active(self) -> None:
        self._active.clear()
        self._hint_pending.clear()
        self.abort_waits()
        for key in ("image", "camera_info", "hint"):
            sub = self._subs.pop(key, None)
            if sub is not None:
                self.destroy_subscription(sub)
        if self._srv is not None:
            self.destroy_service(self._srv)
            self._srv = None
        if self._tf_timer is not None:
            self.destroy_timer(self._tf_timer)
            self._tf_timer = None
        self._mailbox.clear()

    def _release_configured(self) -> None:
        self._stop.set()
        self._mailbox.close()
        if self._worker is not None:
            self._worker.join(timeout=30.0)
            if self._worker.is_alive():
                self.get_logger().error("worker thread did not stop within 30 s")
            self._worker = None
        for pub in self._pubs.values():
            self.destroy_lifecycle_publisher(pub)
        self._pubs.clear()
        for sub in self._subs.values():
            self.destroy_subscription(sub)
        self._subs.clear()
        if self._localizer is not None:
            try:
                self._localizer.close()
            finally:
                self._localizer = None

    # ------------------------------------------------------------------------------------ callbacks
    def _on_image(self, data: bytes, info: dict) -> None:
        """Store the serialized message (frames that get replaced are never deserialized)."""
        lost = self._transport_gap(info)
        self._stats.add(received=1, lost_in_transport=lost)
        self._mailbox.put((data, self._image_type, time.monotonic(), self.get_clock().now().nanoseconds))

    def _transport_gap(self, info: dict) -> int:
        seq, gid = info.get("publication_sequence_number"), info.get("publisher_gid")
        if not seq or not gid:
            return 0
        return self._gaps.lost(bytes(gid.get("data", b"")) if isinstance(gid, dict) else bytes(gid), int(seq))

    def _on_tf(self, msg: Any, static: bool = False) -> None:
        """Feed the TF buffer, without our own map edges (another map parent is not part of the robot's tree)."""
        cfg = self.config
        own = {(cfg.map_frame, c) for c in (cfg.odom_frame, cfg.base_frame, self._camera_frame_hint)}
        node_logic.feed_tf(self._tf, msg, static, own)

    def _on_camera_info(self, msg: CameraInfo) -> None:
        self._camera_info = (tuple(float(v) for v in msg.k), int(msg.width), int(msg.height))

    async def _on_relocalize(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        """Collect ``relocalize.samples`` still, confident estimates without blocking the executor; fuse; publish."""
        cfg = self.config
        if not self._active.is_set():
            response.success, response.message = False, "the node is not active; activate it first"
            return response
        collector = Collector(cfg.relocalize_samples)
        with self._collector_lock:
            if self._collector is not None:
                response.success, response.message = False, "a relocalize request is already running"
                return response
            self._collector = collector
        deadline = time.monotonic() + cfg.relocalize_timeout_s
        try:
            while self._active.is_set() and not collector.done.is_set() and time.monotonic() < deadline:
                await _Yield()
                if not collector.done.is_set():
                    collector.done.wait(0.002)  # keeps an idle executor from spinning hot on this task
        finally:
            with self._collector_lock:
                self._collector = None
        fused, response.message = outcome(collector, cfg.relocalize_timeout_s, self._resolved(cfg.initialpose_topic))
        response.success = fused is not None
        if fused is not None:
            cov = widen_covariance(self._covariance(cfg, fused.mean_confidence, fused.sigma), fused)
            stamp = ros_convert.ns_to_time(fused.stamp_ns)
            self._pubs["initialpose"].publish(
                ros_convert.pose_with_covariance_stamped(fused.pose, cov, fused.frame_id, stamp)
            )
            self._stats.add(relocalizations=1)
            self.get_logger().info(response.message)
        return response

    # ------------------------------------------------------------------------------------ worker
    def _worker_loop(self) -> None:
        last_start = -1e9
        while not self._stop.is_set():
            rate = self.config.max_rate_hz
            wait = last_start + 1.0 / rate - time.monotonic() if rate > 0.0 else 0.0
            if wait > 0.0:  # bounded (max_rate_hz >= 0.1) and re-read every 0.25 s, so a new rate applies at once
                self._stop.wait(min(wait, 0.25))
                continue
            item = self._mailbox.get(timeout=0.25)
            if item is None or not self._active.is_set():
                continue
            cfg = self.config
            last_start = time.monotonic()
            try:
                data, msg_type, received, received_ns = item
                self._process(data, msg_type, received, received_ns, cfg)
            except Exception as exc:  # never let one frame kill the worker
                self._stats.fail("processing_errors", f"{type(exc).__name__}: {quote(str(exc), 256)}")
                self.get_logger().error(
                    f"frame processing failed: {type(exc).__name__}: {quote(str(exc), 256)}",
                    throttle_duration_sec=_LOG_THROTTLE_S,
                )

    def _reject(self, reason: str, counter: str = "rejected") -> None:
        self._stats.fail(counter, reason)
        self.get_logger().warning(f"dropped an input image: {reason}", throttle_duration_sec=_LOG_THROTTLE_S)

    def _check_frame(self, msg: Any, received_ns: int, cfg: NodeConfig) -> node_logic.HeaderCheck | None:
        """Header and camera_info checks (:func:`node_logic.check_header`); None when rejected (and counted)."""
        h = msg.header
        now_ns = self.get_clock().now().nanoseconds
        check = node_logic.check_header(h.stamp.sec, h.stamp.nanosec, h.frame_id, received_ns, now_ns, cfg)
        if check.problem is not None:
            self._reject(check.problem, check.counter)
            return None
        self._stats.add(stamps_replaced=int(check.replaced))
        self._camera_frame_hint = check.frame
        if self._camera_info is not None and self._trained_camera is not None and cfg.camera_info_check != "off":
            k, w, h = self._camera_info
            mismatch = node_logic.intrinsics_mismatch(self._trained_camera, k, w, h, cfg.camera_info_tolerance)
            if mismatch is not None:
                if cfg.camera_info_check == "refuse":
                    self._reject(mismatch)
                    return None
                self.get_logger().warning(mismatch, throttle_duration_sec=60.0)
        return check

    def _process(self, data: bytes, msg_type: type, received: float, received_ns: int, cfg: NodeConfig) -> None:
        try:
            msg: Any = deserialize_message(data, msg_type)
        except Exception as exc:  # a CDR buffer that does not hold a msg_type
            self._reject(f"cannot deserialize a {msg_type.__name__} message: {quote(str(exc), 256)}")
            return
        del data
        check = self._check_frame(msg, received_ns, cfg)
        if check is None:
            return
        try:
            rgb = ros_convert.msg_to_rgb(msg, cfg.max_image_pixels)
        except ImageDecodeError as exc:
            self._reject(str(exc))
            return
        except Exception as exc:  # anything else a malformed message can trigger
            self._reject(f"{type(exc).__name__}: {quote(str(exc), 256)}")
            return
        try:
            est = self._localizer.localize(rgb)
        except ImageDecodeError as exc:  # decodable but unusable for the network (e.g. too small: ImageSizeError)
            self._reject(str(exc))
            return
        del rgb
        with self._stats.lock:
            self._stats.c["processed"] += 1
            self._stats.inference_ms.append(float(est.timings_ms.get("total", float("nan"))))
        if not est.is_finite():
            self._stats.fail("non_finite", "the estimate has NaN/inf entries")
            return
        if est.confidence < cfg.min_confidence:
            self._stats.add(low_confidence=1)
            return
        if cfg.allowed_scenes and est.scene_name not in cfg.allowed_scenes:
            self._stats.add(filtered_scene=1)
            return
        if est.sigma_position_m is not None:
            gated = node_logic.gate(
                est.sigma_position_m,
                est.sigma_orientation_rad,
                cfg.gating_max_sigma_position_m,
                cfg.gating_max_sigma_orientation_deg,
            )
            self._stats.sigma(est.sigma_position_m, est.sigma_orientation_rad, gated)
            if gated is not None:
                return
        self._publish_estimate(cfg, est, check, received)

    def _publish_estimate(self, cfg: NodeConfig, est: Any, check: node_logic.HeaderCheck, received: float) -> None:
        """Scene frame/alignment, base pose, publish pose + covariance (+ TF), feed relocalize and hints."""
        stamp_ns, camera_frame = check.stamp_ns, check.frame
        stamp = ros_convert.ns_to_time(stamp_ns)
        frame = cfg.scene_frames.get(est.scene_name, cfg.map_frame)
        align = cfg.scene_alignment.get(est.scene_name)
        map_t_camera = np.asarray(est.pose, dtype=np.float64)
        if align is not None:
            map_t_camera = geometry.pose_compose(align, map_t_camera)
        map_t_base = None
        if cfg.output_pose == "base" or (cfg.publish_tf and cfg.tf_mode != "map_to_camera"):
            base_t_camera = self._extrinsic(cfg, camera_frame, stamp_ns)
            if base_t_camera is None:
                return
            map_t_base = geometry.camera_to_base(map_t_camera, base_t_camera)
        tracked = map_t_base if map_t_base is not None and cfg.output_pose == "base" else map_t_camera
        sigma = None if est.sigma_position_m is None else (est.sigma_position_m, est.sigma_orientation_rad)
        cov = self._covariance(cfg, est.confidence, sigma)
        self._pubs["pose"].publish(ros_convert.pose_stamped(tracked, frame, stamp))
        self._pubs["pose_cov"].publish(ros_convert.pose_with_covariance_stamped(tracked, cov, frame, stamp))
        if cfg.publish_tf and not check.replaced and frame == cfg.map_frame and "tf" in self._pubs:
            self._publish_tf(cfg, stamp_ns, camera_frame, map_t_camera, map_t_base)
        with self._collector_lock:
            collector = self._collector
        if collector is not None:
            sample = Sample(tracked, est.scene_name, float(est.confidence), stamp_ns, frame, sigma)
            self._offer_sample(cfg, collector, sample)
        if self._hint_pending.is_set() and "hint" in self._pubs:
            self._hint_pending.clear()
            self._pubs["hint"].publish(ros_convert.pose_with_covariance_stamped(tracked, cov, frame, stamp))
            self._stats.add(hints=1)
        delay_s = (self.get_clock().now().nanoseconds - stamp_ns) * 1e-9
        self._stats.published(est.scene_name, est.confidence, (time.monotonic() - received) * 1e3, delay_s)

    def _extrinsic(self, cfg: NodeConfig, camera_frame: str, stamp_ns: int) -> np.ndarray | None:
        """base_T_camera from the override parameters or from TF at the image stamp (None: counted failure)."""
        if cfg.extrinsic_source == "parameters":
            return cfg.base_t_camera_override
        try:
            return self._tf.lookup_one(cfg.base_frame, camera_frame, stamp_ns, cfg.tf_lookup_tolerance_s)
        except LookupError as exc:
            self._stats.fail("tf_failures", f"no TF {cfg.base_frame} <- {camera_frame}: {quote(str(exc), 256)}")
            self.get_logger().warning(
                f"no base <- camera extrinsic: {quote(str(exc), 256)}; publish it on /tf_static, or set "
                "extrinsic_source parameters, or output_pose camera",
                throttle_duration_sec=_LOG_THROTTLE_S,
            )
            return None

    def _covariance(self, cfg: NodeConfig, confidence: float, sigma: tuple[float, float] | None = None) -> np.ndarray:
        """Calibrated ``σ²`` (position axes σp², rotation axes σo²) when ``sigma`` is given, else the configured one."""
        if sigma is not None:
            return ros_convert.covariance_from_diagonal(
                [sigma[0] ** 2] * 3, [sigma[1] ** 2] * 3, scale_by_confidence=False
            )
        return ros_convert.covariance_from_diagonal(
            cfg.covariance_position,
            cfg.covariance_orientation,
            confidence,
            scale_by_confidence=cfg.covariance_scale_by_confidence,
        )

    def _offer_sample(self, cfg: NodeConfig, collector: Collector, sample: Sample) -> None:
        limits = MotionLimits(
            cfg.relocalize_max_linear_speed,
            cfg.relocalize_max_angular_speed,
            cfg.relocalize_motion_window_s,
            cfg.tf_lookup_tolerance_s,
            cfg.relocalize_require_odom,
        )
        speed = odom_speed(
            self._tf, cfg.odom_frame, cfg.base_frame or "", sample.stamp_ns, limits.window_s, limits.tolerance_s
        )
        if collector.offer(sample, speed, limits) == "moving":
            self._stats.add(relocalize_rejected_moving=1)
        if collector.done.is_set() and self.executor is not None:
            self.executor.wake()

    # ------------------------------------------------------------------------------------ TF output
    def _publish_tf(self, cfg: NodeConfig, stamp_ns: int, camera_frame: str, map_t_camera, map_t_base) -> None:
        mode = cfg.tf_mode
        if mode == "map_to_odom":
            self._wait_for_tf(cfg.odom_frame, cfg.base_frame, stamp_ns, cfg.tf_lookup_tolerance_s)
            try:
                odom_t_base = self._tf.lookup_one(cfg.odom_frame, cfg.base_frame, stamp_ns, cfg.tf_lookup_tolerance_s)
                if not self._tf.brackets(cfg.odom_frame, cfg.base_frame, stamp_ns):
                    # no odometry on one side of the image stamp (none yet after it, or none before it just after
                    # start-up): the nearest sample stands in, off by the motion in between
                    self._stats.add(tf_not_interpolated=1)
                    self.get_logger().warning(
                        "odom -> base has no sample on one side of the image stamp (within tf_lookup_tolerance_s): "
                        "map -> odom uses the nearest one",
                        throttle_duration_sec=_LOG_THROTTLE_S,
                    )
            except LookupError as exc:
                self._stats.fail("tf_failures", f"no TF {cfg.odom_frame} <- {cfg.base_frame} at the image stamp")
                self.get_logger().warning(
                    f"map -> odom not updated: {quote(str(exc), 256)}", throttle_duration_sec=_LOG_THROTTLE_S
                )
                return
            opts = node_logic.filter_options(cfg)
            with self._map_odom_lock:
                if self._map_odom.update(geometry.map_to_odom(map_t_base, odom_t_base), opts) == "jump":
                    self._stats.add(jumps_rejected=1)
                    return
            self._republish_map_odom()
            return
        child, pose = (camera_frame, map_t_camera) if mode == "map_to_camera" else (cfg.base_frame, map_t_base)
        others = self._tf.parents_of(child) - {cfg.map_frame}
        if others:
            self._stats.fail("tf_refused", f"{child} already has parent {sorted(others)[0]}")
            self.get_logger().error(
                f"tf_mode {mode} refused: frame {child} already has the parent {sorted(others)[0]} in TF, and a "
                "frame cannot have two parents; use tf_mode map_to_odom",
                throttle_duration_sec=_LOG_THROTTLE_S,
            )
            return
        tf = ros_convert.transform_stamped(pose, cfg.map_frame, child, ros_convert.ns_to_time(stamp_ns))
        self._pubs["tf"].publish(ros_convert.tf_message([tf]))

    def _wait_for_tf(self, target: str, source: str, stamp_ns: int, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until TF between the frames reaches ``stamp_ns`` (like tf2's message filter).

        The lookup then interpolates instead of taking the last sample before the stamp; runs on the worker thread.
        """
        deadline = time.monotonic() + timeout_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                newest = self._tf.lookup_latest(target, source)[1]
                if newest == 0 or newest >= stamp_ns:  # 0: every edge between them is static
                    return
            except LookupError:
                pass
            self._stop.wait(0.005)

    def _republish_map_odom(self) -> None:
        """Send the current map -> odom stamped now + transform_tolerance_s (AMCL semantics)."""
        cfg = self.config
        with self._map_odom_lock:
            current = self._map_odom.current
        if current is None or "tf" not in self._pubs or not cfg.publish_tf:
            return
        stamp_ns = self.get_clock().now().nanoseconds + int(cfg.transform_tolerance_s * 1e9)
        tf = ros_convert.transform_stamped(current, cfg.map_frame, cfg.odom_frame, ros_convert.ns_to_time(stamp_ns))
        self._pubs["tf"].publish(ros_convert.tf_message([tf]))

    # ------------------------------------------------------------------------------------ diagnostics
    def _resolved(self, topic: str) -> str:
        """Return the fully qualified topic name, or the name as given when rclpy cannot expand it."""
        try:
            return self.resolve_topic_name(topic)[:MAX_ECHO_CHARS]
        except Exception:
            return topic[:MAX_ECHO_CHARS]  # validated: a topic name of at most 255 characters

    def _publish_diagnostics(self) -> None:
        """Publish the status: ERROR when configure failed or a parameter is invalid; WARN/ERROR when frames fail."""
        now, cfg, loc = time.monotonic(), self.config, self._localizer
        t0, before = self._diag_last
        window, values, counts = node_logic.diagnostic_report(
            self._stats,
            before,
            now - t0,
            self._mailbox.dropped,
            cfg.diagnostics_min_rate_hz,
            cfg.diagnostics_max_delay_s,
        )
        self._diag_last = (now, counts)
        topic, state = self._resolved(cfg.subscribed_topic), self.lifecycle_label
        if self._last_error and loc is None:
            level, message = node_logic.ERROR, self._last_error
        elif self._param_errors and loc is None:
            level, message = node_logic.ERROR, next(iter(self._param_errors.values()))
        elif not self._active.is_set():
            level, message = node_logic.OK, state
        else:
            level, message = node_logic.diagnostic_level(window, topic)
        head = {
            "state": state,
            "backend": loc.backend_name if loc is not None else "",
            "device": loc.device if loc is not None else "",
            "image_topic": topic,
        }
        status = DiagnosticStatus(
            name=f"{self.get_name()}: localizer",
            hardware_id=f"apr_localizer:{self.get_fully_qualified_name()}"[:MAX_ECHO_CHARS],
            level=bytes([level]),
            message=message[: 2 * MAX_ECHO_CHARS],
        )
        status.values = [KeyValue(key=k, value=str(v)[: 2 * MAX_ECHO_CHARS]) for k, v in {**head, **values}.items()]
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(msg)


# --------------------------------------------------------------------------------------------- entry point
def main(args: list[str] | None = None) -> int:
    """Run the node until SIGINT/SIGTERM; return the process exit code (0 on a clean shutdown).

    A signal aborts a configure in progress (between its steps) and a pending ``~/relocalize``, and ends the spin; the
    node and the context are then shut down, so no shared-memory segment is left behind. Further signals repeat the
    abort and never raise: an exception thrown into the main thread could leave the node half-built (its DDS
    participant, and the participant's shared-memory segments, never destroyed) or skip the clean-up.
    """
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()
    node: LocalizerNode | None = None

    def request_stop(signum: int, _frame: Any) -> None:
        stop.set()
        if node is not None:
            node.request_abort()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    executor = SingleThreadedExecutor()
    try:
        try:
            node = LocalizerNode()
        except ParameterException as exc:
            rclpy.logging.get_logger("apr_localizer").fatal(f"invalid parameter: {quote(str(exc), 256)}")
            return 2
        executor.add_node(node)
        if node.get_parameter("autostart").value and not stop.is_set():
            if node.trigger_configure() == TransitionCallbackReturn.SUCCESS and not stop.is_set():
                node.trigger_activate()
            elif not stop.is_set():
                node.get_logger().error("autostart: configure failed; the node stays unconfigured")
        while not stop.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the clean-up below must not be interrupted again
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
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
