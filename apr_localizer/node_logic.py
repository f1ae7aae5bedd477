"""ROS-free decisions of the localizer node: stamp checks, the map → odom filter, camera checks, diagnostics level.

Kept out of :mod:`apr_localizer.node` so that each rule is a plain function with a plain unit test.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from apr_localizer import geometry
from apr_localizer.imaging import quote
from apr_localizer.node_params import MAX_ECHO_CHARS, NodeConfig, frame_id_problem
from apr_localizer.tf_buffer import TfBuffer, stamp_to_ns, transform_msg_pose

__all__ = [
    "COUNTERS",
    "DiagWindow",
    "Stats",
    "diagnostic_report",
    "FilterOptions",
    "HeaderCheck",
    "check_header",
    "feed_tf",
    "filter_options",
    "gate",
    "MapOdomFilter",
    "diagnostic_level",
    "intrinsics_mismatch",
    "planar",
    "stamp_problem",
    "yaw_of",
]

OK, WARN, ERROR = 0, 1, 2


# --------------------------------------------------------------------------------------------- stamps
def stamp_problem(sec: int, nanosec: int, now_ns: int, max_future_s: float, max_age_s: float) -> str | None:
    """Why an image stamp cannot be used (zero, negative, invalid, too far in the future, too old), or None."""
    if sec < 0 or not 0 <= nanosec < 1_000_000_000:
        return f"invalid header.stamp (sec {sec}, nanosec {nanosec})"
    stamp_ns = sec * 1_000_000_000 + nanosec
    if stamp_ns == 0:
        return "header.stamp is zero (the camera driver did not stamp the image)"
    if now_ns <= 0:  # use_sim_time before the first /clock message: no reference for future/age checks
        return None
    if stamp_ns > now_ns + int(max_future_s * 1e9):
        return (
            f"header.stamp is {(stamp_ns - now_ns) * 1e-9:.3g} s in the future (stamps.max_future_s {max_future_s:g})"
        )
    if max_age_s > 0.0 and now_ns - stamp_ns > int(max_age_s * 1e9):
        return f"stale image ({(now_ns - stamp_ns) * 1e-9:.3g} s old > max_frame_age_s {max_age_s:g})"
    return None


@dataclasses.dataclass(frozen=True)
class HeaderCheck:
    """Outcome of :func:`check_header`: the stamp to use (ns), whether it was replaced, the camera frame, or why not."""

    stamp_ns: int = 0
    replaced: bool = False
    frame: str = ""
    problem: str | None = None
    counter: str = "rejected"  # the diagnostics counter of the problem


def check_header(sec: int, nanosec: int, frame_id: str, received_ns: int, now_ns: int, cfg: NodeConfig) -> HeaderCheck:
    """Check an image header's stamp, age and camera frame.

    Zero/invalid/future stamps are rejected or, with ``stamps.invalid: receive_time``, replaced and flagged; the age
    limit is ``max_frame_age_s``; the camera frame is ``camera_frame`` or ``header.frame_id``.
    """
    stamp_ns, replaced = sec * 1_000_000_000 + nanosec, False
    problem = stamp_problem(sec, nanosec, now_ns, cfg.stamps_max_future_s, 0.0)
    if problem is not None:
        if cfg.stamps_invalid != "receive_time":
            return HeaderCheck(problem=problem)
        stamp_ns, replaced = received_ns, True
    stale = stamp_problem(stamp_ns // 1_000_000_000, stamp_ns % 1_000_000_000, now_ns, 3600.0, cfg.max_frame_age_s)
    if stale is not None:
        return HeaderCheck(problem=f"{stale}; replaying a bag needs use_sim_time", counter="stale")
    frame = cfg.camera_frame or frame_id
    frame_problem = frame_id_problem(frame)
    if frame_problem is not None:
        return HeaderCheck(problem=f"header.frame_id {quote(frame, 64)} {frame_problem} (or set camera_frame)")
    return HeaderCheck(stamp_ns, replaced, frame)


# --------------------------------------------------------------------------------------------- planar poses
def yaw_of(q_wxyz: Sequence[float] | np.ndarray) -> float:
    """Yaw (rad, about z) of a w-first quaternion."""
    w, x, y, z = (float(v) for v in q_wxyz)
    return math.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))


def planar(pose: np.ndarray) -> np.ndarray:
    """Pose ``(7,)`` reduced to x, y, yaw (z = 0, roll = pitch = 0)."""
    yaw = yaw_of(pose[3:7])
    return np.array([pose[0], pose[1], 0.0, math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)])


# --------------------------------------------------------------------------------------------- map -> odom
@dataclasses.dataclass(frozen=True)
class FilterOptions:
    """Planar mode, jump limits (0 = off), jumps needed to accept a new place, smoothing weight of a new value."""

    planar: bool = False
    max_position_m: float = 0.0
    max_yaw_deg: float = 0.0
    accept_after: int = 3
    smoothing: float = 1.0


def filter_options(cfg: NodeConfig) -> FilterOptions:
    """Return the map -> odom filter settings of a parameter snapshot."""
    return FilterOptions(
        cfg.tf_planar, cfg.tf_jump_max_position_m, cfg.tf_jump_max_yaw_deg, cfg.tf_jump_accept_after, cfg.tf_smoothing
    )


def feed_tf(buffer: TfBuffer, msg: Any, static: bool, skip: Collection[tuple[str, str]]) -> None:
    """Add a ``tf2_msgs/TFMessage`` to ``buffer``, skipping the ``(parent, child)`` edges in ``skip``.

    Also skipped: what tf2 would not accept (empty or over-long frame ids, a frame its own parent, non-finite values).
    """
    for tr in msg.transforms:
        parent, child = tr.header.frame_id, tr.child_frame_id
        if (parent, child) in skip or not 0 < len(parent) <= 255 or not 0 < len(child) <= 255 or parent == child:
            continue
        try:
            pose = transform_msg_pose(tr.transform)  # raises ValueError for a zero or non-finite quaternion
            stamp_ns = stamp_to_ns(tr.header.stamp)
            if np.all(np.isfinite(pose)):
                buffer.add_transform(parent, child, stamp_ns, pose, static)
        except (ValueError, OverflowError):
            continue


class MapOdomFilter:
    """The published map → odom: planar projection, jump rejection (until confirmed), exponential smoothing."""

    def __init__(self) -> None:
        self.current: np.ndarray | None = None
        self._jumps: list[np.ndarray] = []
        self.rejected_jumps = 0

    def _is_jump(self, a: np.ndarray, b: np.ndarray, opts: FilterOptions) -> bool:
        dpos = float(np.linalg.norm(a[:3] - b[:3]))
        dyaw = float(geometry.rotation_error_deg(a[3:], b[3:]))
        return (opts.max_position_m > 0 and dpos > opts.max_position_m) or (
            opts.max_yaw_deg > 0 and dyaw > opts.max_yaw_deg
        )

    def update(self, map_t_odom: np.ndarray, opts: FilterOptions) -> str:
        """Offer a new estimate; return ``accepted``, ``jump`` (held back) or ``relocated`` (a confirmed jump)."""
        candidate = planar(map_t_odom) if opts.planar else np.asarray(map_t_odom, dtype=np.float64)
        if self.current is None:
            self.current = candidate
            return "accepted"
        if self._is_jump(self.current, candidate, opts):
            agree = not self._jumps or not self._is_jump(self._jumps[-1], candidate, opts)
            self._jumps = [*self._jumps, candidate] if agree else [candidate]
            if len(self._jumps) < opts.accept_after:
                self.rejected_jumps += 1
                return "jump"
            self.current, self._jumps = candidate, []
            return "relocated"
        self._jumps = []
        a = opts.smoothing
        position = (1.0 - a) * self.current[:3] + a * candidate[:3]
        rotation = geometry.quat_slerp(self.current[3:], candidate[3:], a)
        self.current = np.concatenate([position, geometry.quat_normalize(rotation)])
        return "accepted"


# --------------------------------------------------------------------------------------------- camera_info
def intrinsics_mismatch(
    trained: Mapping[str, Any], k: Sequence[float], width: int, height: int, tolerance: float
) -> str | None:
    """Compare the training camera (``fx, fy, cx, cy, width, height``) with a CameraInfo ``K`` at its resolution.

    The training intrinsics are scaled to the live resolution (same aspect ratio expected); returns one sentence
    naming the first value off by more than ``tolerance`` (relative), or None. Missing keys: None (not checked).
    """
    try:
        tw, th = float(trained["width"]), float(trained["height"])
        ref = {k_: float(trained[k_]) for k_ in ("fx", "fy", "cx", "cy")}
    except (KeyError, TypeError, ValueError):
        return None
    if width <= 0 or height <= 0 or tw <= 0 or th <= 0:
        return None
    if abs(width / height - tw / th) > tolerance * tw / th:
        return (
            f"camera_info resolution {width}x{height} has another aspect ratio than the training data ({tw:g}x{th:g})"
        )
    sx, sy = width / tw, height / th
    live = {"fx": float(k[0]), "fy": float(k[4]), "cx": float(k[2]), "cy": float(k[5])}
    scaled = {"fx": ref["fx"] * sx, "fy": ref["fy"] * sy, "cx": ref["cx"] * sx, "cy": ref["cy"] * sy}
    for key, want in scaled.items():
        if not math.isfinite(live[key]) or abs(live[key] - want) > tolerance * max(abs(want), 1e-9):
            return (
                f"camera_info {key} {live[key]:.4g} differs from the training camera's {want:.4g} "
                f"by more than {tolerance:g}"
            )
    return None


# --------------------------------------------------------------------------------------------- uncertainty
def gate(
    sigma_position_m: float | None,
    sigma_orientation_rad: float | None,
    max_position_m: float,
    max_orientation_deg: float,
) -> str | None:
    """Why a calibrated estimate is too uncertain to publish (one sentence), or None (also when uncalibrated).

    A limit of 0 turns that axis' gate off.
    """
    if sigma_position_m is None or sigma_orientation_rad is None:
        return None
    if max_position_m > 0.0 and not sigma_position_m <= max_position_m:
        return f"sigma position {sigma_position_m:.3g} m above gating.max_sigma_position_m {max_position_m:g}"
    deg = math.degrees(sigma_orientation_rad)
    if max_orientation_deg > 0.0 and not deg <= max_orientation_deg:
        return f"sigma orientation {deg:.3g} deg above gating.max_sigma_orientation_deg {max_orientation_deg:g}"
    return None


# --------------------------------------------------------------------------------------------- diagnostics
@dataclasses.dataclass(frozen=True)
class DiagWindow:
    """Counts over one diagnostics period (deltas) and what the node is configured to expect."""

    received: int
    published: int
    failed: int  # rejected, processing errors, non-finite, TF failures
    out_rate_hz: float
    min_rate_hz: float
    delay_p90_s: float
    max_delay_s: float
    last_failure: str = ""
    gated: int = 0
    last_gated: str = ""  # calibrated estimates too uncertain to publish


def diagnostic_level(w: DiagWindow, topic: str) -> tuple[int, str]:
    """Level and message of an active node's status (like diagnostic_updater's frequency + timestamp checks)."""
    if w.received == 0:
        return WARN, f"no images on {topic}"
    if w.published == 0 and w.failed >= w.received:
        return ERROR, f"every frame fails: {w.last_failure or 'see the counters'}"
    if w.published == 0 and w.gated > 0:  # frames the mailbox replaced are not counted against the estimates
        return WARN, f"every estimate is gated as too uncertain: {w.last_gated or 'see the counters'}"
    if w.published == 0:
        return WARN, "frames arrive but no estimate is published (low confidence, stale, filtered or still running)"
    if w.min_rate_hz > 0.0 and w.out_rate_hz < w.min_rate_hz:
        return WARN, f"output rate {w.out_rate_hz:.2f} Hz below diagnostics.min_rate_hz {w.min_rate_hz:g}"
    if math.isfinite(w.delay_p90_s) and w.delay_p90_s > w.max_delay_s:
        return WARN, f"capture -> publish delay p90 {w.delay_p90_s:.3f} s above {w.max_delay_s:g} s"
    return OK, f"localizing at {w.out_rate_hz:.1f} Hz"


# --------------------------------------------------------------------------------------------- statistics
COUNTERS = (
    "received", "processed", "published", "stale", "rejected", "low_confidence", "filtered_scene", "non_finite",
    "processing_errors", "tf_failures", "tf_refused", "stamps_replaced", "jumps_rejected", "relocalizations",
    "relocalize_rejected_moving", "hints", "lost_in_transport", "gated", "tf_not_interpolated",
)  # fmt: skip


class Stats:
    """Thread-safe counters, last values and rolling windows (600 frames) of the node's timings."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.c = dict.fromkeys(COUNTERS, 0)
        self.last_failure = ""
        self.last_scene = ""
        self.last_confidence = float("nan")
        self.last_sigma = (float("nan"), float("nan"))  # of the last calibrated estimate: position m, orientation rad
        self.last_gated = ""
        self.latency_ms: collections.deque[float] = collections.deque(maxlen=600)
        self.inference_ms: collections.deque[float] = collections.deque(maxlen=600)
        self.delay_s: collections.deque[float] = collections.deque(maxlen=600)

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                self.c[k] += v

    def fail(self, counter: str, reason: str) -> None:
        """Count a failure and remember its reason (a sentence whose foreign values went through ``quote``)."""
        with self.lock:
            self.c[counter] += 1
            self.last_failure = str(reason)[:MAX_ECHO_CHARS]

    def sigma(self, position_m: float, orientation_rad: float, gated: str | None) -> None:
        """Remember a calibrated estimate's sigmas; count it as gated (with the reason) when ``gated``."""
        with self.lock:
            self.last_sigma = (float(position_m), float(orientation_rad))
            if gated is not None:
                self.c["gated"] += 1
                self.last_gated = gated

    def published(self, scene: str, confidence: float, latency_ms: float, delay_s: float) -> None:
        """Count a published estimate with its receive → publish latency and capture → publish delay."""
        with self.lock:
            self.c["published"] += 1
            self.last_scene = str(scene)[:128]  # scene names: at most 128 characters
            self.last_confidence = float(confidence)
            self.latency_ms.append(latency_ms)
            self.delay_s.append(delay_s)


def _percentiles(values: dict[str, Any], name: str, arr: np.ndarray, scale: float = 1.0) -> None:
    for pct in (50, 90, 99):
        values[f"{name}_p{pct}"] = f"{np.percentile(arr, pct) * scale:.2f}" if arr.size else "nan"


def diagnostic_report(
    stats: Stats, before: Mapping[str, int], dt: float, dropped_unprocessed: int, min_rate_hz: float, max_delay_s: float
) -> tuple[DiagWindow, dict[str, Any], dict[str, int]]:
    """Window (counts since ``before``, ``dt`` seconds ago), the key/value table and the counts to diff next time."""
    with stats.lock:
        counts = dict(stats.c)
        lat, inf, delay = (np.array(d, dtype=np.float64) for d in (stats.latency_ms, stats.inference_ms, stats.delay_s))
        last_failure, last_scene, last_conf = stats.last_failure, stats.last_scene, stats.last_confidence
        last_sigma, last_gated = stats.last_sigma, stats.last_gated
    dt = max(dt, 1e-6)
    d = {k: counts[k] - before.get(k, 0) for k in counts}
    window = DiagWindow(
        received=d["received"],
        published=d["published"],
        failed=d["rejected"] + d["processing_errors"] + d["non_finite"] + d["tf_failures"] + d["stale"],
        out_rate_hz=d["published"] / dt,
        min_rate_hz=min_rate_hz,
        delay_p90_s=float(np.percentile(delay, 90)) if delay.size else float("nan"),
        max_delay_s=max_delay_s,
        last_failure=last_failure,
        gated=d["gated"],
        last_gated=last_gated,
    )
    values: dict[str, Any] = {
        "input_rate_hz": f"{d['received'] / dt:.2f}",
        "output_rate_hz": f"{window.out_rate_hz:.2f}",
        **{("frames_" + k if k in ("received", "processed") else k): v for k, v in counts.items()},
        "poses_published": counts["published"],
        "dropped_frames": dropped_unprocessed + counts["lost_in_transport"],
        "dropped_unprocessed": dropped_unprocessed,
        "dropped_in_transport": counts["lost_in_transport"],
        "rejected_messages": counts["rejected"],
        "stale_frames": counts["stale"],
        "last_reject_reason": last_failure,
        "last_scene": last_scene,
        "last_confidence": f"{last_conf:.4f}",
        "gated_frames": counts["gated"],
        "last_sigma_position_m": f"{last_sigma[0]:.4g}",
        "last_sigma_orientation_deg": f"{math.degrees(last_sigma[1]):.4g}",
        "last_gated_reason": last_gated,
    }
    _percentiles(values, "latency_ms", lat)
    _percentiles(values, "inference_ms", inf)
    _percentiles(values, "capture_delay_ms", delay, 1e3)
    return window, values, counts
