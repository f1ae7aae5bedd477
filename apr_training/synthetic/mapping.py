"""Mapping runs (the walk a deployment records to train on) and the coverage of a test trajectory by training frames.

A mapping run is a boustrophedon (lawn-mower) tour of a scene's free space: parallel lanes at most
``lane_spacing_m`` apart from edge to edge of the free space (sequence 1 along x, sequence 2 along y, further
sequences shifted by a fraction of the spacing so that they interleave), connected by shortest paths through the
free grid, walked at ``speed`` with the camera looking along the motion, turning in place at corners, and stopping
every ``sweep_spacing_m`` for a full 360° yaw sweep (look around), so that every part of the room is seen from every
direction. Pitch and height vary slowly.

:func:`coverage` measures how well training frames cover a test trajectory: the fraction of test frames that have
a training frame within ``0.5 m`` and ``20°`` (:func:`apr_localizer.geometry.pose_errors`, the project's one
pose-error definition).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from apr_localizer.geometry import matrix_to_quat, pose_errors

from .scenes import Scene, stable_seed
from .trajectory import camera_rotation

__all__ = ["Coverage", "MappingParams", "coverage", "mapping_poses", "mapping_tour"]


@dataclass(frozen=True)
class MappingParams:
    """Shape of a mapping run (metres, seconds, degrees)."""

    lane_spacing_m: float = 1.0
    speed: float = 0.3  # walking speed (m/s)
    sweep_spacing_m: float = 2.0  # a 360° look-around every this many metres along a lane
    turn_rate_deg: float = 60.0  # yaw rate of in-place turns and sweeps (deg/s)
    margin: float = 0.45  # clearance to furniture footprints
    wall_margin: float = 0.8  # clearance to walls
    height: tuple[float, float] = (1.2, 1.6)
    pitch_deg: tuple[float, float] = (-12.0, 2.0)
    min_run_m: float = 0.4  # free stretches of a lane shorter than this are skipped
    cell: float = 0.1


def _free_grid(scene: Scene, p: MappingParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Largest 4-connected component of the walkable grid: ``(free (ny, nx) bool, xs, ys)``."""
    import cv2

    clear, xs, ys = scene.clearance_map(p.cell, max(p.wall_margin - p.margin, 0.0))
    free = clear >= p.margin
    n, labels = cv2.connectedComponents(free.astype(np.uint8), connectivity=4)
    if n <= 1:
        raise RuntimeError(f"scene {scene.name!r} has no walkable area with margin {p.margin} m")
    biggest = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    return labels == biggest, xs, ys


def _bfs_path(free: np.ndarray, a: tuple[int, int], b: tuple[int, int]) -> list[tuple[int, int]] | None:
    """Shortest 8-connected grid path from cell ``a`` to ``b`` (``(row, col)``), or None."""
    prev = {a: a}
    todo = deque([a])
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)]
    while todo:
        cur = todo.popleft()
        if cur == b:
            path = [cur]
            while path[-1] != a:
                path.append(prev[path[-1]])
            return path[::-1]
        for dr, dc in steps:
            nxt = (cur[0] + dr, cur[1] + dc)
            if (0 <= nxt[0] < free.shape[0] and 0 <= nxt[1] < free.shape[1] and free[nxt] and nxt not in prev
                    and free[cur[0], nxt[1]] and free[nxt[0], cur[1]]):  # fmt: skip
                prev[nxt] = cur
                todo.append(nxt)
    return None


def _lane_runs(free: np.ndarray, along_x: bool, lanes: np.ndarray, min_cells: int) -> list[list[tuple[int, int]]]:
    """Free stretches of every lane as ``[start cell, end cell]`` in snake order."""
    runs = []
    for k, line in enumerate(lanes):
        cells = free[line, :] if along_x else free[:, line]
        edges = np.flatnonzero(np.diff(np.r_[0, cells.astype(np.int8), 0]))
        lane = []
        for s, e in zip(edges[::2], edges[1::2] - 1):
            if e - s + 1 >= min_cells:
                lane.append([(line, s), (line, e)] if along_x else [(s, line), (e, line)])
        if k % 2:
            lane = [r[::-1] for r in lane[::-1]]
        runs += lane
    return runs


def mapping_tour(scene: Scene, seq_index: int, params: MappingParams | None = None) -> np.ndarray:
    """Waypoints ``(M, 2)`` (map x, y) of the lawn-mower tour of sequence ``seq_index`` (connections included)."""
    p = params or MappingParams()
    free, xs, ys = _free_grid(scene, p)
    along_x = seq_index % 2 == 1
    used = np.flatnonzero(free.any(axis=1) if along_x else free.any(axis=0))
    lo, hi = int(used.min()), int(used.max())
    step = p.lane_spacing_m / p.cell
    k = max(2, int(math.ceil((hi - lo) / step)) + 1)  # lanes from edge to edge of the free space, evenly spaced
    shift = (((seq_index - 1) // 2) * 0.618034) % 1.0 - 0.5  # later sequences interleave with the first two
    lanes = np.unique(np.clip(np.round(np.linspace(lo, hi, k) + shift * (hi - lo) / (k - 1)), lo, hi).astype(int))
    runs = _lane_runs(free, along_x, lanes, max(2, int(p.min_run_m / p.cell)))
    if not runs:
        raise RuntimeError(f"scene {scene.name!r}: no lane of a mapping run fits the free space")
    cells: list[tuple[int, int]] = list(runs[0])
    for run in runs[1:]:
        link = _bfs_path(free, cells[-1], run[0])
        if link is None:
            continue
        cells += link[1::4] + [run[0]] if len(link) > 1 else []
        cells.append(run[1])
    pts = np.array([[xs[c], ys[r]] for r, c in cells], float)
    keep = np.r_[True, np.linalg.norm(np.diff(pts, axis=0), axis=1) > 1e-9]
    return pts[keep]


def _keyframes(pts: np.ndarray, p: MappingParams) -> list[tuple[float, float, float, float]]:
    """``(t, x, y, yaw)`` keyframes: turn in place to each leg's heading, walk it, sweep 360° every few metres."""
    rate, speed = math.radians(p.turn_rate_deg), p.speed
    seg = pts[1] - pts[0]
    yaw = math.atan2(seg[1], seg[0])
    t, since_sweep, sweep_dir = 0.0, 0.0, 1.0
    keys = [(t, pts[0][0], pts[0][1], yaw)]
    for a, b in zip(pts[:-1], pts[1:]):
        d = b - a
        length = float(np.hypot(*d))
        turn = math.remainder(math.atan2(d[1], d[0]) - yaw, 2 * math.pi)
        if abs(turn) > 1e-6:
            t, yaw = t + abs(turn) / rate, yaw + turn
            keys.append((t, a[0], a[1], yaw))
        done = 0.0
        while since_sweep + (length - done) >= p.sweep_spacing_m:
            done += p.sweep_spacing_m - since_sweep
            x, y = a + d * (done / length)
            t += (p.sweep_spacing_m - since_sweep) / speed
            keys.append((t, x, y, yaw))
            t, yaw = t + 2 * math.pi / rate, yaw + sweep_dir * 2 * math.pi
            keys.append((t, x, y, yaw))
            sweep_dir, since_sweep = -sweep_dir, 0.0
        t += (length - done) / speed
        since_sweep += length - done
        keys.append((t, b[0], b[1], yaw))
    return keys


def mapping_poses(
    scene: Scene, seq_index: int, fps: float, seed: int = 0, params: MappingParams | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Sample the mapping run of sequence ``seq_index`` at ``fps``: ``(times (N,), poses (N, 7))`` camera-to-map."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    p = params or MappingParams()
    keys = np.array(_keyframes(mapping_tour(scene, seq_index, p), p))
    times = np.arange(0.0, keys[-1, 0] + 1e-9, 1.0 / fps)
    x, y, yaw = (np.interp(times, keys[:, 0], keys[:, i]) for i in (1, 2, 3))
    rng = np.random.default_rng(stable_seed("mapping", scene.name, scene.seed, seed, int(seq_index)))
    z0 = rng.uniform(*p.height)
    z = np.clip(z0 + 0.08 * np.sin(2 * math.pi * times / rng.uniform(20, 40) + rng.uniform(0, 6.3)), *p.height)
    mid, amp = (p.pitch_deg[0] + p.pitch_deg[1]) / 2, (p.pitch_deg[1] - p.pitch_deg[0]) / 2
    pitch = np.radians(mid + amp * np.sin(2 * math.pi * times / rng.uniform(8, 16) + rng.uniform(0, 6.3)))
    q = matrix_to_quat(camera_rotation(yaw, pitch, np.zeros_like(yaw)))
    return times, np.concatenate([np.stack([x, y, z], axis=1), q], axis=1)


@dataclass(frozen=True)
class Coverage:
    """Coverage of test frames by training frames (thresholds ``max_distance_m`` and ``max_angle_deg``)."""

    fraction: float  # test frames with a training frame within both thresholds
    covered: np.ndarray  # (N,) bool per test frame
    nearest_position_m: float  # median over test frames of the distance to the closest training position
    nearest_angle_deg: float  # median over test frames of the smallest angle to a training frame within the distance
    max_distance_m: float
    max_angle_deg: float

    def to_dict(self) -> dict[str, float]:
        return {"fraction": self.fraction, "frames": int(len(self.covered)),
                "nearest_position_median_m": self.nearest_position_m,
                "nearest_angle_within_distance_median_deg": self.nearest_angle_deg,
                "max_distance_m": self.max_distance_m, "max_angle_deg": self.max_angle_deg}  # fmt: skip


def coverage(
    test_poses: np.ndarray,
    train_poses: np.ndarray,
    max_distance_m: float = 0.5,
    max_angle_deg: float = 20.0,
    chunk: int = 256,
) -> Coverage:
    """Fraction of ``test_poses (N, 7)`` with a training pose in ``train_poses (M, 7)`` within both thresholds."""
    test = np.asarray(test_poses, np.float64).reshape(-1, 7)
    train = np.asarray(train_poses, np.float64).reshape(-1, 7)
    covered = np.zeros(len(test), bool)
    near_t = np.full(len(test), np.inf)
    near_r = np.full(len(test), np.inf)
    for s in range(0, len(test), chunk):
        block = test[s : s + chunk]
        if not len(train):
            break
        dt, dr = pose_errors(block[:, None, :], train[None, :, :])
        covered[s : s + chunk] = ((dt <= max_distance_m) & (dr <= max_angle_deg)).any(axis=1)
        near_t[s : s + chunk] = dt.min(axis=1)
        near_r[s : s + chunk] = np.where(dt <= max_distance_m, dr, np.inf).min(axis=1)
    frac = float(covered.mean()) if len(test) else math.nan
    med = lambda a: float(np.median(a)) if len(a) else math.nan  # noqa: E731
    return Coverage(frac, covered, med(near_t), med(near_r), max_distance_m, max_angle_deg)
