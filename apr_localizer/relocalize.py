"""Relocalization on demand (ROS-free): collect confident estimates while the robot stands still, fuse them.

``~/relocalize`` opens a :class:`Collector`; the worker offers every confident estimate to it (with a calibrated
model only the estimates that pass the sigma gate: gated estimates never reach it). A sample is rejected
when odometry shows the robot moving at its stamp (:func:`odom_speed`: the odom → base displacement over
``window_s`` around the stamp). :func:`fuse` takes the samples of the most frequent scene: per-axis median position,
:func:`geometry.quat_average` orientation, stamped with the newest sample (the robot stood still, so that is where
the fused pose holds; AMCL moves it forward to "now" through odom itself).
"""

from __future__ import annotations

import collections
import dataclasses
import threading

import numpy as np

from apr_localizer import geometry
from apr_localizer.tf_buffer import TfBuffer

__all__ = ["Collector", "Fused", "MotionLimits", "Sample", "fuse", "odom_speed", "outcome", "widen_covariance"]


@dataclasses.dataclass
class Sample:
    """One confident estimate: ``pose`` ``(7,)`` of the output frame in ``frame_id``, its scene, confidence, stamp.

    ``sigma`` is the calibrated ``(position m, orientation rad)`` per-axis sigma, None for uncalibrated models.
    """

    pose: np.ndarray
    scene_name: str
    confidence: float
    stamp_ns: int
    frame_id: str = "map"
    sigma: tuple[float, float] | None = None


@dataclasses.dataclass(frozen=True)
class MotionLimits:
    """Speeds above which a sample counts as taken in motion; ``require_odom``: reject when odom cannot tell."""

    max_linear: float = 0.05  # m/s
    max_angular: float = 0.05  # rad/s
    window_s: float = 0.2
    tolerance_s: float = 0.1
    require_odom: bool = False


def odom_speed(
    buffer: TfBuffer, odom_frame: str, base_frame: str, stamp_ns: int, window_s: float, tolerance_s: float
) -> tuple[float, float] | None:
    """Linear (m/s) and angular (rad/s) speed of ``base_frame`` in ``odom_frame`` over ``window_s`` ending at the stamp.

    None when the buffer has no odom → base transform within ``tolerance_s`` of both ends of the window.
    """
    t1 = int(stamp_ns)
    t0 = t1 - int(round(window_s * 1e9))
    try:
        poses, ok = buffer.lookup(odom_frame, base_frame, [t0, t1], tolerance_s)
    except (LookupError, ValueError):
        return None
    if not bool(np.all(ok)):
        return None
    rel = geometry.relative_pose(poses[0], poses[1])
    dist = float(np.linalg.norm(rel[:3]))
    angle = float(np.radians(geometry.rotation_error_deg(poses[0, 3:], poses[1, 3:])))
    return dist / window_s, angle / window_s


class Collector:
    """Gathers ``n`` samples for one relocalize call; counts the ones rejected for motion."""

    def __init__(self, n: int) -> None:
        self.n = int(n)
        self.samples: list[Sample] = []
        self.rejected_moving = 0
        self.rejected_unknown_motion = 0
        self.done = threading.Event()
        self._lock = threading.Lock()

    def offer(self, sample: Sample, speed: tuple[float, float] | None, limits: MotionLimits) -> str:
        """Add ``sample`` unless ``speed`` (from :func:`odom_speed`) shows motion; return accepted/moving/unknown."""
        with self._lock:
            if self.done.is_set():
                return "done"
            if speed is None and limits.require_odom:
                self.rejected_unknown_motion += 1
                return "unknown"
            if speed is not None and (speed[0] > limits.max_linear or speed[1] > limits.max_angular):
                self.rejected_moving += 1
                return "moving"
            self.samples.append(sample)
            if len(self.samples) >= self.n:
                self.done.set()
            return "accepted"

    def snapshot(self) -> list[Sample]:
        with self._lock:
            return list(self.samples)


@dataclasses.dataclass(frozen=True)
class Fused:
    """A fused pose ``(7,)`` of ``scene`` from ``n_used`` samples, their spread, and the newest sample's stamp.

    ``sigma``: the median calibrated sigmas ``(position m, orientation rad)`` of the used samples (None when any of
    them is uncalibrated).
    """

    pose: np.ndarray
    scene: str
    frame_id: str
    n_used: int
    position_spread_m: float
    rotation_spread_deg: float
    stamp_ns: int
    mean_confidence: float
    sigma: tuple[float, float] | None = None


def fuse(samples: list[Sample]) -> Fused:
    """Fuse the samples of the most frequent scene (ties: the first seen): median position, averaged quaternion.

    Spreads are the largest distance of a used sample from the fused pose. Raises ``ValueError`` without samples.
    """
    if not samples:
        raise ValueError("cannot fuse zero relocalization samples")
    scene, _ = collections.Counter(s.scene_name for s in samples).most_common(1)[0]
    used = [s for s in samples if s.scene_name == scene]
    poses = np.stack([np.asarray(s.pose, dtype=np.float64) for s in used])
    fused = np.concatenate([np.median(poses[:, :3], axis=0), geometry.quat_average(poses[:, 3:7])])
    pos_err, rot_err = geometry.pose_errors(poses, fused[None, :])
    newest = max(used, key=lambda s: s.stamp_ns)
    sigmas = [s.sigma for s in used if s.sigma is not None]
    sigma = None
    if len(sigmas) == len(used):
        med = np.median(np.asarray(sigmas, dtype=np.float64), axis=0)
        sigma = (float(med[0]), float(med[1]))
    return Fused(
        pose=fused,
        scene=scene,
        frame_id=newest.frame_id,
        n_used=len(used),
        position_spread_m=float(np.max(pos_err)),
        rotation_spread_deg=float(np.max(rot_err)),
        stamp_ns=newest.stamp_ns,
        mean_confidence=float(np.mean([s.confidence for s in used])),
        sigma=sigma,
    )


def widen_covariance(covariance: np.ndarray, fused: Fused) -> np.ndarray:
    """Row-major 6x6 ``(36,)`` covariance whose diagonal is at least the squared spread of the fused samples."""
    diag = np.asarray(covariance, dtype=np.float64).reshape(6, 6).diagonal().copy()
    diag[:3] = np.maximum(diag[:3], fused.position_spread_m**2)
    diag[3:] = np.maximum(diag[3:], np.radians(fused.rotation_spread_deg) ** 2)
    return np.diag(diag).reshape(36)


def outcome(collector: Collector, timeout_s: float, topic: str) -> tuple[Fused | None, str]:
    """Return the fused pose of a finished collection (None when it fell short) and the one-sentence answer."""
    samples = collector.snapshot()
    moving = f", {collector.rejected_moving} rejected while odom showed motion" if collector.rejected_moving else ""
    if len(samples) < collector.n:
        return None, (
            f"got {len(samples)} of {collector.n} confident estimates within {timeout_s:g} s{moving}; nothing published"
        )
    fused = fuse(samples)
    p = fused.pose
    return fused, (
        f"published {topic} from n={fused.n_used} of {len(samples)} estimates{moving}, scene {fused.scene}, "
        f"spread {fused.position_spread_m:.3f} m / {fused.rotation_spread_deg:.2f} deg, "
        f"position [{p[0]:.3f}, {p[1]:.3f}, {p[2]:.3f}]"
    )
