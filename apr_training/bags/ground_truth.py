"""Ground truth from a bag: ONE parser of the ``pose:/odom:/tf:`` spec and ONE matcher of image stamps to poses.

Specs: ``pose:/topic`` (``PoseStamped``, ``PoseWithCovarianceStamped`` or ``Odometry``), ``odom:/topic``
(``nav_msgs/Odometry``) and ``tf:PARENT->CHILD`` (the chain through ``/tf`` and ``/tf_static``, looked up with the one
TF buffer, :class:`apr_localizer.tf_buffer.TfBuffer`). Used by ``apr-eval-bag`` and by the bag → dataset extraction;
it is the union of what those two did before:

* stamps: a message is matched by ``header.stamp``, or by its bag time when the stamp is zero (or absent);
* pose/odom topics: the sample with the nearest stamp, valid within ``tolerance_s`` (ties: the earlier sample);
* TF: every dynamic edge of the chain is interpolated at the stamp (linear position, slerp) and needs a sample within
  ``tolerance_s`` (so a stamp just outside the sampled range holds the end sample); static edges always hold;
* ``sensor_offset`` (the camera pose in the ground-truth child frame, e.g. ``base_link -> camera``) is composed on
  the right of every ground-truth pose;
* the reported offset of a match is the distance (ms) to the nearest ground-truth sample (0 for static TF).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from apr_localizer.geometry import pose_compose
from apr_localizer.tf_buffer import TfBuffer

from .io import BagError, iter_messages, message_stamp_ns, pose_from_msg, read_tf, topic_types

__all__ = ["GT_POSE_MSGTYPES", "GroundTruth", "GroundTruthError", "GroundTruthSpec", "load_ground_truth", "parse_spec"]

# message types a ``pose:`` topic may carry (``odom:`` accepts only Odometry)
GT_POSE_MSGTYPES = (
    "geometry_msgs/msg/PoseStamped",
    "geometry_msgs/msg/PoseWithCovarianceStamped",
    "nav_msgs/msg/Odometry",
)
_SPEC_HELP = "pose:/topic, odom:/topic or tf:PARENT->CHILD (e.g. tf:map->camera_optical)"


class GroundTruthError(BagError, ValueError):
    """The ground-truth spec is malformed or the bag does not hold it (one sentence naming the bag and the spec)."""


@dataclass(frozen=True)
class GroundTruthSpec:
    """A parsed spec: ``kind`` is pose, odom or tf; ``topic`` for pose/odom; ``parent``/``child`` for tf."""

    kind: str
    topic: str = ""
    parent: str = ""
    child: str = ""

    def describe(self) -> str:
        return f"TF {self.parent} <- {self.child}" if self.kind == "tf" else self.topic


def parse_spec(spec: str) -> GroundTruthSpec:
    """Parse ``pose:/topic``, ``odom:/topic`` or ``tf:PARENT->CHILD`` (spaces around the parts are ignored)."""
    kind, sep, rest = spec.strip().partition(":")
    rest = rest.strip()
    if sep and kind in ("pose", "odom") and rest:
        return GroundTruthSpec(kind, topic=rest)
    if sep and kind == "tf":
        parent, arrow, child = rest.partition("->")
        if arrow and parent.strip() and child.strip():
            return GroundTruthSpec("tf", parent=parent.strip(), child=child.strip())
    raise GroundTruthError(f"ground truth {spec!r} is not understood; expected {_SPEC_HELP}")


def _nearest(ref: np.ndarray, stamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest reference stamp (ties: the earlier) and the distance (ns) to it."""
    i = np.searchsorted(ref, stamps)
    i0 = np.clip(i - 1, 0, len(ref) - 1)
    i1 = np.clip(i, 0, len(ref) - 1)
    pick = np.where(np.abs(ref[i1] - stamps) < np.abs(stamps - ref[i0]), i1, i0)
    return pick, np.abs(ref[pick] - stamps)


@dataclass
class GroundTruth:
    """Ground-truth samples of a bag, matched to image stamps with :meth:`match` (arrays) or :meth:`lookup` (one).

    ``stamps_ns (M,)``/``poses (M, 7)`` hold the pose/odom samples sorted by stamp; ``tf`` the buffer for a tf spec.
    """

    spec: GroundTruthSpec
    tolerance_s: float
    sensor_offset: np.ndarray | None = None
    stamps_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    poses: np.ndarray = field(default_factory=lambda: np.zeros((0, 7)))
    tf: TfBuffer | None = None

    def __len__(self) -> int:
        return len(self.sample_stamps()) if self.tf is not None else len(self.stamps_ns)

    def sample_stamps(self) -> np.ndarray:
        """Sorted stamps (ns) of the ground-truth samples (the dynamic TF edges for a tf spec; empty if all static)."""
        if self.tf is not None:
            return self.tf.stamps(self.spec.parent, self.spec.child)
        return self.stamps_ns

    def match(self, stamps_ns: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ground truth at ``stamps_ns (N,)``: poses ``(N, 7)``, a validity mask ``(N,)`` and offsets ``(N,)`` in ms."""
        stamps = np.atleast_1d(np.asarray(stamps_ns, dtype=np.int64))
        tol_ns = int(round(self.tolerance_s * 1e9))
        if self.tf is not None:
            try:
                poses, ok = self.tf.lookup(self.spec.parent, self.spec.child, stamps, self.tolerance_s)
            except (LookupError, ValueError) as exc:
                raise GroundTruthError(f"ground truth {self.spec.describe()}: {exc}") from None
            ref = self.sample_stamps()
            offset = _nearest(ref, stamps)[1] if len(ref) else np.zeros(len(stamps), np.int64)
        else:
            pick, offset = _nearest(self.stamps_ns, stamps)
            poses, ok = self.poses[pick], offset <= tol_ns
        if self.sensor_offset is not None:
            poses = pose_compose(poses, self.sensor_offset.reshape(1, 7))
        return np.asarray(poses, dtype=np.float64).reshape(-1, 7), ok, offset.astype(np.float64) * 1e-6

    def lookup(self, stamp_ns: int) -> tuple[np.ndarray | None, float]:
        """``(pose (7,), offset_ms)`` at one stamp, or ``(None, offset_ms)`` when nothing lies within the tolerance."""
        poses, ok, offset = self.match([stamp_ns])
        return (poses[0].copy() if ok[0] else None), float(offset[0])


def load_ground_truth(
    bag: str | Path, spec: str | GroundTruthSpec, tolerance_s: float = 0.02, sensor_offset=None
) -> GroundTruth:
    """Read the ground truth named by ``spec`` from ``bag`` (see the module docstring for the matching rules)."""
    bag = Path(bag)
    src = parse_spec(spec) if isinstance(spec, str) else spec
    if tolerance_s < 0:
        raise GroundTruthError(f"the ground-truth tolerance must be >= 0 s, got {tolerance_s}")
    offset = None if sensor_offset is None else np.asarray(sensor_offset, dtype=np.float64).reshape(7)
    types = topic_types(bag)
    if src.kind == "tf":
        present = [t for t in ("/tf", "/tf_static") if t in types]
        if not present:
            raise GroundTruthError(f"bag {bag} has no topic /tf or /tf_static; topics are: {', '.join(sorted(types))}")
        buf = read_tf(bag, present)
        gt = GroundTruth(src, tolerance_s, offset, tf=buf)
        gt.match(np.zeros(0, np.int64))  # unknown or unconnected frames fail here, naming the frames
        return gt
    if src.topic not in types:
        raise GroundTruthError(f"bag {bag} has no topic {src.topic}; topics are: {', '.join(sorted(types))}")
    allowed = ("nav_msgs/msg/Odometry",) if src.kind == "odom" else GT_POSE_MSGTYPES
    if types[src.topic] not in allowed:
        raise GroundTruthError(
            f"ground-truth topic {src.topic} in bag {bag} has type {types[src.topic]}; '{src.kind}:' expects "
            f"{' or '.join(allowed)}"
        )
    stamps, poses = [], []
    for m in iter_messages(bag, [src.topic]):
        stamps.append(message_stamp_ns(m.msg, m.t_ns))
        poses.append(pose_from_msg(m.msg, m.msgtype))
    if not stamps:
        raise GroundTruthError(f"ground-truth topic {src.topic} in bag {bag} has no messages")
    t = np.asarray(stamps, dtype=np.int64)
    order = np.argsort(t, kind="stable")
    return GroundTruth(src, tolerance_s, offset, t[order], np.asarray(poses, dtype=np.float64)[order])
