"""A ROS-free TF buffer: the frame tree from ``/tf`` and ``/tf_static``, looked up at any stamp.

Used by the node (extrinsics, odom→base at the image stamp) and by the bag tools (ground truth from TF). Each child
frame has one parent edge; dynamic edges are interpolated (linear translation, slerp rotation), static edges hold one
transform. Poses are ``[x, y, z, qw, qx, qy, qz]`` (w-first, :mod:`apr_localizer.geometry`); ``lookup(target, source)``
returns ``target <- source`` (the source frame's pose in the target frame).

For a running node: ``cache_s`` bounds the history of dynamic edges (like tf2's cache time),
:meth:`TfBuffer.lookup_latest` looks up at the newest stamp every edge of the chain has, and
:meth:`TfBuffer.parents_of` tells every parent a frame was ever given (a second parent means two publishers
disagree about the tree). All methods are thread-safe.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from .geometry import pose_compose, pose_inverse, quat_from_ros, quat_normalize, quat_slerp

__all__ = ["TfBuffer", "stamp_to_ns", "transform_msg_pose"]


def transform_msg_pose(transform: Any) -> np.ndarray:
    """``geometry_msgs/Transform`` (or anything with ``translation``/``rotation``) → pose ``(7,)``, unit w-first q."""
    t, r = transform.translation, transform.rotation
    return np.concatenate([[t.x, t.y, t.z], quat_normalize(quat_from_ros([r.x, r.y, r.z, r.w]))])


def stamp_to_ns(stamp: Any) -> int:
    """``builtin_interfaces/Time`` (anything with ``sec`` and ``nanosec``) → integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


class _Edge:
    """Transforms ``parent <- child`` over time (sorted on demand)."""

    def __init__(self, parent: str, static: bool, cache_ns: int | None = None):
        self.parent = parent
        self.static = static
        self.cache_ns = cache_ns
        self._t: list[int] = []
        self._p: list[np.ndarray] = []
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, t_ns: int, pose: np.ndarray) -> None:
        if self.static:
            self._t, self._p = [t_ns], [pose]
        else:
            self._t.append(t_ns)
            self._p.append(pose)
            if self.cache_ns is not None and len(self._t) % 32 == 0:
                self._prune()
        self._arrays = None

    def _prune(self) -> None:
        """Drop samples older than the newest one minus the cache time (keeping at least two)."""
        assert self.cache_ns is not None
        horizon = max(self._t) - self.cache_ns
        keep = [i for i, t in enumerate(self._t) if t >= horizon]
        if len(keep) < 2:
            keep = sorted(range(len(self._t)), key=self._t.__getitem__)[-2:]
        self._t = [self._t[i] for i in keep]
        self._p = [self._p[i] for i in keep]

    def latest(self) -> int:
        """Newest stamp (ns) of a dynamic edge; a static edge returns the largest int64 (valid at any time)."""
        return int(np.iinfo(np.int64).max) if self.static else int(self.arrays()[0][-1])

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            t = np.asarray(self._t, dtype=np.int64)
            p = np.asarray(self._p, dtype=np.float64).reshape(-1, 7)
            order = np.argsort(t, kind="stable")
            t, p = t[order], p[order]
            keep = np.concatenate([t[1:] != t[:-1], [True]])  # duplicate stamps: the last one wins
            self._arrays = (t[keep], p[keep])
        return self._arrays

    def at(self, stamps: np.ndarray, tol_ns: int) -> tuple[np.ndarray, np.ndarray]:
        """Return poses ``(N, 7)`` at ``stamps`` and a validity mask (the nearest sample is within ``tol_ns``).

        Stamps between two samples are interpolated, stamps just outside the range take the end sample.
        """
        t, p = self.arrays()
        n = len(stamps)
        if self.static:
            return np.repeat(p[-1:], n, axis=0), np.ones(n, bool)
        i = np.searchsorted(t, stamps, side="right")  # t[i-1] <= s < t[i]
        i0 = np.clip(i - 1, 0, len(t) - 1)
        i1 = np.clip(i, 0, len(t) - 1)
        d0 = np.abs(stamps - t[i0])
        d1 = np.abs(t[i1] - stamps)
        valid = np.minimum(d0, d1) <= tol_ns
        span = (t[i1] - t[i0]).astype(np.float64)
        alpha = np.where(span > 0, (stamps - t[i0]) / np.where(span > 0, span, 1.0), 0.0).clip(0.0, 1.0)
        trans = p[i0, :3] + alpha[:, None] * (p[i1, :3] - p[i0, :3])
        rot = quat_slerp(p[i0, 3:], p[i1, 3:], alpha)
        return np.concatenate([trans, rot], axis=1), valid


class TfBuffer:
    """A minimal TF buffer: the frame tree from ``/tf`` and ``/tf_static``, looked up at arbitrary stamps."""

    def __init__(self, cache_s: float | None = None) -> None:
        self._edges: dict[str, _Edge] = {}  # keyed by child frame
        self._parents: dict[str, set[str]] = {}  # every parent each child frame was ever given
        self._cache_ns = None if cache_s is None else int(round(cache_s * 1e9))
        self._lock = threading.RLock()

    @staticmethod
    def _clean(frame: str) -> str:
        return frame.lstrip("/")

    @property
    def frames(self) -> set[str]:
        """All frame names (parents and children)."""
        with self._lock:
            return set(self._edges) | {e.parent for e in self._edges.values()}

    def parents_of(self, child: str) -> set[str]:
        """Every parent frame that ``child`` has been given (more than one: the tree had conflicting publishers)."""
        with self._lock:
            return set(self._parents.get(self._clean(child), ()))

    def parent(self, child: str) -> str | None:
        """Return the current parent of ``child`` (None for a root or an unknown frame)."""
        with self._lock:
            edge = self._edges.get(self._clean(child))
            return None if edge is None else edge.parent

    def add_transform(self, parent: str, child: str, t_ns: int, pose, static: bool = False) -> None:
        """Record ``parent <- child`` (the child's pose in the parent frame) at ``t_ns``."""
        parent, child = self._clean(parent), self._clean(child)
        if parent == child:
            raise ValueError(f"transform from frame {parent!r} to itself")
        with self._lock:
            self._parents.setdefault(child, set()).add(parent)
            edge = self._edges.get(child)
            if edge is None or edge.parent != parent or edge.static != static:
                edge = self._edges[child] = _Edge(parent, static, self._cache_ns)
            edge.add(int(t_ns), np.asarray(pose, dtype=np.float64).reshape(7))

    def add_message(self, msg: Any, static: bool = False) -> None:
        """Add every ``TransformStamped`` of a ``tf2_msgs/TFMessage``."""
        for tr in msg.transforms:
            self.add_transform(
                tr.header.frame_id,
                tr.child_frame_id,
                stamp_to_ns(tr.header.stamp),
                transform_msg_pose(tr.transform),
                static,
            )

    def _chain(self, frame: str) -> list[str]:
        chain = [frame]
        seen = {frame}
        while chain[-1] in self._edges:
            parent = self._edges[chain[-1]].parent
            if parent in seen:
                raise ValueError(f"TF frames form a loop through {parent!r}")
            chain.append(parent)
            seen.add(parent)
        return chain

    def _to_ancestor(self, chain: list[str], stop: str, stamps: np.ndarray, tol_ns: int):
        n = len(stamps)
        pose = np.tile(np.array([0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]), (n, 1))
        valid = np.ones(n, bool)
        for frame in chain:
            if frame == stop:
                break
            p, ok = self._edges[frame].at(stamps, tol_ns)
            pose = pose_compose(p, pose)  # parent <- frame <- ... <- source
            valid &= ok
        return pose, valid

    def lookup(self, target: str, source: str, stamps, tolerance_s: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
        """Return the poses ``(N, 7)`` of ``source`` in ``target`` (``target <- source``) at ``stamps`` (ns).

        Also returns a mask of the stamps where every dynamic edge of the chain has a sample within
        ``tolerance_s``.

        Raises ``LookupError`` if the frames are unknown or not connected.
        """
        with self._lock:
            return self._lookup(self._clean(target), self._clean(source), stamps, tolerance_s)

    def _path(self, target: str, source: str) -> tuple[list[str], list[str], str]:
        """Chains of both frames up to their root and the frame where they meet; caller holds the lock.

        Raises ``LookupError`` if a frame is unknown or the two are not connected.
        """
        known = self.frames
        for f in (target, source):
            if f not in known:
                raise LookupError(f"TF has no frame {f!r}; frames are: {', '.join(sorted(known)) or 'none'}")
        ct, cs = self._chain(target), self._chain(source)
        common = next((f for f in cs if f in set(ct)), None)
        if common is None:
            raise LookupError(f"TF frames {target!r} and {source!r} are not connected (roots {ct[-1]!r}, {cs[-1]!r})")
        return ct, cs, common

    def _edges_between(self, target: str, source: str) -> list[_Edge]:
        """Every edge on the path between the frames (static ones included); raises ``LookupError`` like lookup."""
        ct, cs, common = self._path(target, source)
        return [self._edges[f] for chain in (cs, ct) for f in chain[: chain.index(common)]]

    def _lookup(self, target: str, source: str, stamps, tolerance_s: float) -> tuple[np.ndarray, np.ndarray]:
        stamps = np.atleast_1d(np.asarray(stamps, dtype=np.int64))
        ct, cs, common = self._path(target, source)
        tol = int(round(min(tolerance_s, 9.0e9) * 1e9))  # inf: any sample
        a_src, v1 = self._to_ancestor(cs, common, stamps, tol)  # common <- source
        a_tgt, v2 = self._to_ancestor(ct, common, stamps, tol)  # common <- target
        return pose_compose(pose_inverse(a_tgt), a_src), v1 & v2

    def lookup_one(self, target: str, source: str, t_ns: int, tolerance_s: float = 0.02) -> np.ndarray:
        """Single pose ``(7,)``; raises ``LookupError`` when no transform is available within the tolerance."""
        pose, ok = self.lookup(target, source, [t_ns], tolerance_s)
        if not ok[0]:
            raise LookupError(f"no TF {target} <- {source} within {tolerance_s} s of t={t_ns} ns")
        return pose[0]

    def lookup_latest(self, target: str, source: str) -> tuple[np.ndarray, int]:
        """Pose ``(7,)`` of ``source`` in ``target`` at the newest stamp every dynamic edge between them has.

        Returns ``(pose, stamp_ns)`` (stamp 0 when every edge is static); raises ``LookupError`` like :meth:`lookup`.
        """
        with self._lock:
            target, source = self._clean(target), self._clean(source)
            if target == source:
                return np.array([0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]), 0
            edges = self._edges_between(target, source)
            stamp = min((e.latest() for e in edges), default=0)
            stamp = 0 if stamp == np.iinfo(np.int64).max else stamp
            pose, _ = self._lookup(target, source, [stamp], float("inf"))
            return pose[0], int(stamp)

    def brackets(self, target: str, source: str, t_ns: int) -> bool:
        """Whether every dynamic edge between the frames has a sample at or before ``t_ns`` and one at or after it.

        Only then does :meth:`lookup` interpolate; otherwise it takes an end sample (within its tolerance), which
        is off by the motion between that sample and ``t_ns``. Raises ``LookupError`` like :meth:`lookup`.
        """
        with self._lock:
            target, source = self._clean(target), self._clean(source)
            if target == source:
                return True
            dynamic = [e.arrays()[0] for e in self._edges_between(target, source) if not e.static]
            return all(t[0] <= t_ns <= t[-1] for t in dynamic)

    def stamps(self, target: str, source: str) -> np.ndarray:
        """Sorted stamps (ns) of the dynamic edges on the chain between the frames (empty if all static).

        Raises ``LookupError`` like :meth:`lookup`.
        """
        with self._lock:
            return self._stamps(target, source)

    def _stamps(self, target: str, source: str) -> np.ndarray:
        out = [e.arrays()[0] for e in self._edges_between(self._clean(target), self._clean(source)) if not e.static]
        return np.unique(np.concatenate(out)) if out else np.zeros(0, np.int64)
