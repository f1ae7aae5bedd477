"""Smooth handheld-like camera trajectories through a scene's free space.

A trajectory is a uniform cubic B-spline through random waypoints in the walkable area (kept ``margin`` metres from
walls and furniture footprints), traversed at a slowly varying speed (arc-length parametrised). The camera looks
roughly horizontal: yaw follows the direction of motion plus a smooth random offset (looking around), pitch and roll
are small smooth oscillations. Everything is a deterministic function of the seed, and :meth:`Trajectory.pose_at`
evaluates the pose at any time (used to publish ground truth at a different rate than images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from apr_localizer.geometry import matrix_to_quat

from .scenes import Scene, stable_seed

__all__ = ["Trajectory", "TrajectoryParams", "camera_rotation", "make_trajectory", "sequence_trajectory"]

# optical axes in the body frame (x forward, y left, z up): optical x = right, y = down, z = forward
_BODY_FROM_OPTICAL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


@dataclass(frozen=True)
class TrajectoryParams:
    """Trajectory shape parameters (metres, seconds, degrees)."""

    speed: float = 0.35  # nominal walking speed (m/s)
    speed_variation: float = 0.3  # relative amplitude of the slow speed oscillation
    max_lateral_acc: float = 0.35  # slows down in curves: v <= sqrt(a / curvature)
    max_longitudinal_acc: float = 0.3
    min_speed: float = 0.05
    margin: float = 0.45  # clearance of the camera path to furniture footprints
    wall_margin: float = 0.8  # clearance of the camera path to the walls
    height: tuple[float, float] = (1.15, 1.7)
    waypoint_spacing: tuple[float, float] = (1.0, 3.0)
    max_turn_deg: float = 100.0  # preferred limit on the turn at a waypoint (exceeded only when stuck)
    heading_smoothing_s: float = 0.5  # Gaussian sigma of the heading low-pass (the camera turns ahead of corners)
    max_angular_rate_deg: float = 120.0  # limit on the camera's angular speed (checked on the final trajectory)
    look_at_weight: float = 0.6  # how much the camera turns from the direction of motion to look into the room
    yaw_amplitude_deg: float = 25.0
    pitch_deg: tuple[float, float] = (-14.0, 4.0)
    roll_amplitude_deg: float = 3.0
    cell: float = 0.05


def camera_rotation(yaw, pitch, roll) -> np.ndarray:
    """Return the camera-to-map rotation ``(..., 3, 3)`` of the optical frame.

    ``yaw`` is about map z (0 = looking along +x), ``pitch`` positive looks up, ``roll`` is about the viewing
    direction; all in radians.
    """
    yaw, pitch, roll = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (yaw, pitch, roll)))
    cy, sy = np.cos(yaw), np.sin(yaw)
    cp, sp = np.cos(pitch), np.sin(pitch)
    cr, sr = np.cos(roll), np.sin(roll)
    zero, one = np.zeros_like(yaw), np.ones_like(yaw)
    rz = np.stack([np.stack([cy, -sy, zero], -1), np.stack([sy, cy, zero], -1), np.stack([zero, zero, one], -1)], -2)
    # tilt the forward (body x) axis up by ``pitch``: rotation about body y by -pitch
    ry = np.stack([np.stack([cp, zero, -sp], -1), np.stack([zero, one, zero], -1), np.stack([sp, zero, cp], -1)], -2)
    rx = np.stack([np.stack([one, zero, zero], -1), np.stack([zero, cr, -sr], -1), np.stack([zero, sr, cr], -1)], -2)
    return rz @ ry @ rx @ _BODY_FROM_OPTICAL


class _Sinusoids:
    """Smooth random signal: sum of sinusoids with random frequencies and phases."""

    def __init__(self, rng: np.random.Generator, amplitude: float, freqs: tuple[float, float], n: int = 3):
        w = rng.uniform(0.5, 1.0, n)
        self.amp = amplitude * w / w.sum()
        self.freq = rng.uniform(*freqs, n)
        self.phase = rng.uniform(0, 2 * math.pi, n)

    def __call__(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)[..., None]
        return np.sum(self.amp * np.sin(2 * math.pi * self.freq * t + self.phase), axis=-1)


def _bspline(ctrl: np.ndarray, u) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Uniform cubic B-spline position, first and second derivative (per unit ``u``) at ``u`` in ``[0, K - 3]``."""
    k = len(ctrl)
    u = np.clip(np.asarray(u, dtype=np.float64).reshape(-1), 0.0, k - 3)
    i = np.minimum(np.floor(u).astype(np.int64), k - 4)
    s = (u - i)[:, None]
    s2, s3 = s * s, s * s * s
    b = ((1 - s) ** 3 / 6, (3 * s3 - 6 * s2 + 4) / 6, (-3 * s3 + 3 * s2 + 3 * s + 1) / 6, s3 / 6)
    db = (-((1 - s) ** 2) / 2, (3 * s2 - 4 * s) / 2, (-3 * s2 + 2 * s + 1) / 2, s2 / 2)
    ddb = (1 - s, 3 * s - 2, 1 - 3 * s, s)
    p = sum(b[j] * ctrl[i + j] for j in range(4))
    dp = sum(db[j] * ctrl[i + j] for j in range(4))
    ddp = sum(ddb[j] * ctrl[i + j] for j in range(4))
    return p, dp, ddp


def _gaussian_smooth(x: np.ndarray, sigma_samples: float) -> np.ndarray:
    if sigma_samples < 0.5:
        return x
    r = min(int(math.ceil(3 * sigma_samples)), len(x) - 1)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma_samples) ** 2)
    k /= k.sum()
    # odd reflection at the ends keeps the end slopes (no artificial start/stop)
    padded = np.concatenate([2 * x[0] - x[r:0:-1], x, 2 * x[-1] - x[-2 : -r - 2 : -1]])
    return np.convolve(padded, k, mode="valid")


class Trajectory:
    """Camera trajectory: ``pose_at(t)`` gives camera-to-map poses ``(N, 7)`` ``[x, y, z, qw, qx, qy, qz]``.

    The path is a cubic B-spline over ``ctrl`` (K, 3). Speed follows a slow random oscillation around
    ``params.speed`` and slows down in curves (lateral and longitudinal acceleration limits). Yaw is the direction
    of motion turned partly towards a target wandering around ``look_center`` (so the camera looks into the room),
    low-pass filtered in time, plus a smooth random look-around offset; pitch and roll are small smooth
    oscillations. ``duration`` may be shorter than the time needed to traverse the whole path.
    """

    _DT = 0.02  # time step of the internal tables (s)

    def __init__(
        self,
        ctrl: np.ndarray,
        duration: float,
        params: TrajectoryParams,
        rng: np.random.Generator,
        look_center: tuple[float, float] | None = None,
        look_extent: tuple[float, float] = (0.0, 0.0),
    ):
        self.ctrl = np.asarray(ctrl, dtype=np.float64)
        self.duration = float(duration)
        self.params = params
        # arc length, curvature and a speed profile along the path (ds = 1 cm)
        u_dense = np.linspace(0.0, len(self.ctrl) - 3, 256 * (len(self.ctrl) - 3) + 1)
        pts, _, _ = _bspline(self.ctrl, u_dense)
        s_dense = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
        self.length = float(s_dense[-1])
        n = max(int(self.length / 0.01), 2)
        s = np.linspace(0.0, self.length, n + 1)
        u = np.interp(s, s_dense, u_dense)
        _, dp, ddp = _bspline(self.ctrl, u)
        speed_u = np.maximum(np.linalg.norm(dp, axis=1), 1e-9)
        kappa = np.linalg.norm(np.cross(dp, ddp), axis=1) / speed_u**3
        wavelength, phase = rng.uniform(3.0, 8.0), rng.uniform(0, 2 * math.pi)
        v = params.speed * (1.0 + params.speed_variation * np.sin(2 * math.pi * s / wavelength + phase))
        v = np.minimum(v, np.sqrt(params.max_lateral_acc / np.maximum(kappa, 1e-9)))
        v = np.maximum(v, params.min_speed)
        ds = np.diff(s)
        v[0] = min(v[0], params.speed * 0.5)
        for i in range(1, len(v)):  # forward: accelerate at most a_long
            v[i] = min(v[i], math.sqrt(v[i - 1] ** 2 + 2 * params.max_longitudinal_acc * ds[i - 1]))
        for i in range(len(v) - 2, -1, -1):  # backward: brake at most a_long
            v[i] = min(v[i], math.sqrt(v[i + 1] ** 2 + 2 * params.max_longitudinal_acc * ds[i]))
        t = np.concatenate([[0.0], np.cumsum(2.0 * ds / (v[1:] + v[:-1]))])
        self.path_duration = float(t[-1])
        # uniform time tables
        self._t = np.arange(0.0, self.path_duration + self._DT, self._DT)
        # u(t) is piecewise linear between table knots; a short low-pass keeps accelerations physical
        self._u = _gaussian_smooth(np.interp(np.interp(self._t, t, s), s_dense, u_dense), 0.1 / self._DT)
        self._du = np.gradient(self._u, self._DT)
        _, dp_t, _ = _bspline(self.ctrl, self._u)
        heading = np.arctan2(dp_t[:, 1], dp_t[:, 0])
        if look_center is not None and params.look_at_weight > 0:
            # look towards a target wandering around the room centre, fading out when it is behind or too close
            amp = np.asarray(look_extent, dtype=np.float64)
            f = rng.uniform(0.01, 0.04, 2)
            ph = rng.uniform(0, 2 * math.pi, 2)
            tx = look_center[0] + amp[0] * np.sin(2 * math.pi * f[0] * self._t + ph[0])
            ty = look_center[1] + amp[1] * np.sin(2 * math.pi * f[1] * self._t + ph[1])
            pos, _, _ = _bspline(self.ctrl, self._u)
            vx, vy = tx - pos[:, 0], ty - pos[:, 1]
            delta = np.remainder(np.arctan2(vy, vx) - heading + math.pi, 2 * math.pi) - math.pi
            w = params.look_at_weight * np.clip((math.radians(150) - np.abs(delta)) / math.radians(60), 0.0, 1.0)
            w *= np.clip((np.hypot(vx, vy) - 0.5) / 1.0, 0.0, 1.0)
            heading = heading + w * delta
        self._heading = _gaussian_smooth(np.unwrap(heading), params.heading_smoothing_s / self._DT)
        self._yaw = _Sinusoids(rng, math.radians(params.yaw_amplitude_deg), (0.02, 0.09))
        pmin, pmax = (math.radians(a) for a in params.pitch_deg)
        self._pitch_mid, self._pitch = (pmin + pmax) / 2, _Sinusoids(rng, (pmax - pmin) / 2, (0.03, 0.15))
        self._roll = _Sinusoids(rng, math.radians(params.roll_amplitude_deg), (0.05, 0.3))

    def positions_at(self, t) -> np.ndarray:
        """Camera positions ``(N, 3)`` at times ``t`` (s, clipped to ``[0, duration]``)."""
        t = np.clip(np.atleast_1d(np.asarray(t, dtype=np.float64)), 0.0, self.duration)
        return _bspline(self.ctrl, self._u_at(t))[0]

    def _u_at(self, t: np.ndarray) -> np.ndarray:
        """Spline parameter at times ``t``: cubic Hermite interpolation of the time table (C1 in time)."""
        x = t / self._DT
        i = np.clip(np.floor(x).astype(np.int64), 0, len(self._t) - 2)
        h = np.clip(x - i, 0.0, 1.0)
        h2, h3 = h * h, h * h * h
        return (
            (2 * h3 - 3 * h2 + 1) * self._u[i]
            + (h3 - 2 * h2 + h) * self._DT * self._du[i]
            + (-2 * h3 + 3 * h2) * self._u[i + 1]
            + (h3 - h2) * self._DT * self._du[i + 1]
        )

    def pose_at(self, t) -> np.ndarray:
        """Poses ``(N, 7)`` at times ``t`` (s, clipped to ``[0, duration]``)."""
        t = np.clip(np.atleast_1d(np.asarray(t, dtype=np.float64)), 0.0, self.duration)
        p = _bspline(self.ctrl, self._u_at(t))[0]
        yaw = np.interp(t, self._t, self._heading) + self._yaw(t)
        pitch = self._pitch_mid + self._pitch(t)
        roll = self._roll(t)
        q = matrix_to_quat(camera_rotation(yaw, pitch, roll))
        return np.concatenate([p, q], axis=1)

    def sample(self, n_frames: int, fps: float, t0: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``n_frames`` at ``fps`` from ``t0``: ``(times (n,), poses (n, 7))``."""
        times = t0 + np.arange(int(n_frames), dtype=np.float64) / float(fps)
        return times, self.pose_at(times)


def _segment_free(free: np.ndarray, xs: np.ndarray, ys: np.ndarray, a: np.ndarray, b: np.ndarray, cell: float) -> bool:
    n = max(int(np.linalg.norm(b - a) / (cell * 0.5)), 2)
    pts = a + (b - a) * np.linspace(0.0, 1.0, n)[:, None]
    ix = np.clip(np.round((pts[:, 0] - xs[0]) / cell).astype(int), 0, len(xs) - 1)
    iy = np.clip(np.round((pts[:, 1] - ys[0]) / cell).astype(int), 0, len(ys) - 1)
    return bool(free[iy, ix].all())


def _acceptable(traj: Trajectory, scene: Scene, params: TrajectoryParams) -> bool:
    """Clearance and angular-speed limits hold along the used part of the trajectory (sampled at 50 Hz)."""
    times = np.arange(0.0, traj.duration + 1e-9, 0.02)
    poses = traj.pose_at(times)
    if (scene.point_clearance(poses[:, :2], max(params.wall_margin - params.margin, 0.0)) < params.margin).any():
        return False
    dots = np.abs(np.sum(poses[1:, 3:] * poses[:-1, 3:], axis=1)).clip(0.0, 1.0)
    rate = np.degrees(2 * np.arccos(dots)) / 0.02
    return bool(rate.max() <= params.max_angular_rate_deg)


def make_trajectory(scene: Scene, duration: float, seed: int, params: TrajectoryParams | None = None) -> Trajectory:
    """Build a trajectory of ``duration`` seconds in ``scene``, deterministic from ``seed``.

    Raises ``RuntimeError`` if the scene has no walkable area for the requested margin.
    """
    params = params or TrajectoryParams()
    if duration <= 0:
        raise ValueError(f"trajectory duration must be positive, got {duration}")
    rng = np.random.default_rng(seed)
    wall_offset = max(params.wall_margin - params.margin, 0.0)
    clear, xs, ys = scene.clearance_map(params.cell, wall_offset)
    # waypoints keep a bit more clearance than the path so that the smoothed curve stays clear
    way_free = clear >= params.margin + 0.15
    path_free = clear >= params.margin + 0.1
    n_lab, labels = cv2.connectedComponents(way_free.astype(np.uint8), connectivity=4)
    if n_lab <= 1:
        raise RuntimeError(f"scene {scene.name!r} has no walkable area with margin {params.margin} m")
    biggest = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    cells = np.argwhere(labels == biggest)
    cand_xy = np.stack([xs[cells[:, 1]], ys[cells[:, 0]]], axis=1)
    zmin, zmax = params.height
    lo, hi = scene.room_min, scene.room_max
    look_center = ((lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2)
    look_extent = (0.3 * (hi[0] - lo[0]) / 2, 0.3 * (hi[1] - lo[1]) / 2)
    motion_seed = stable_seed("motion", seed)

    def extend(pts: list[np.ndarray], heading: float | None, length: float) -> tuple[float | None, float]:
        """Append waypoints until the polyline grows by ``length``; prefer turns <= max_turn_deg."""
        grown = 0.0
        while grown < length:
            best, best_turn = None, math.inf
            for _ in range(4):
                picks = cand_xy[rng.integers(len(cand_xy), size=48)]
                step = picks - pts[-1]
                dist = np.hypot(step[:, 0], step[:, 1])
                ok = (dist >= params.waypoint_spacing[0]) & (dist <= params.waypoint_spacing[1])
                for q, st in zip(picks[ok], step[ok]):
                    turn = (
                        0.0 if heading is None else abs(math.remainder(math.atan2(st[1], st[0]) - heading, 2 * math.pi))
                    )
                    if turn < best_turn and _segment_free(path_free, xs, ys, pts[-1], q, params.cell):
                        best, best_turn = q, turn
                        if turn <= math.radians(params.max_turn_deg):
                            break
                if best is not None and best_turn <= math.radians(params.max_turn_deg):
                    break
            if best is None:
                return heading, -1.0  # stuck: no visible waypoint
            st = best - pts[-1]
            heading = math.atan2(st[1], st[0])
            grown += float(np.hypot(*st))
            pts.append(best)
        return heading, grown

    for _attempt in range(100):
        pts = [cand_xy[rng.integers(len(cand_xy))]]
        heading, grown = extend(pts, None, params.speed * duration + 2.0)
        traj = None
        while grown >= 0:
            z = np.random.default_rng(stable_seed("height", seed, len(pts))).uniform(zmin + 0.05, zmax - 0.05, len(pts))
            poly = np.concatenate([np.asarray(pts), z[:, None]], axis=1)
            ctrl = np.concatenate([poly[:1], poly, poly[-1:]])  # doubled ends: start near the first waypoint
            traj = Trajectory(ctrl, duration, params, np.random.default_rng(motion_seed), look_center, look_extent)
            if traj.path_duration >= duration + 0.1:
                break
            heading, grown = extend(pts, heading, max(params.speed * (duration - traj.path_duration), 1.0) + 1.0)
        if grown >= 0 and traj is not None and _acceptable(traj, scene, params):
            return traj
    raise RuntimeError(
        f"could not build a {duration:.1f} s trajectory in scene {scene.name!r} with margin {params.margin} m "
        f"(seed {seed}); lower the margin or the duration"
    )


def sequence_trajectory(
    scene: Scene, seq: int, duration: float, seed: int = 0, params: TrajectoryParams | None = None
) -> Trajectory:
    """Trajectory of sequence number ``seq`` of ``scene`` in a dataset generated with ``seed``.

    Every sequence number gives a different trajectory (train and test sequences use different numbers), all
    covering the same walkable area.
    """
    return make_trajectory(scene, duration, stable_seed("trajectory", scene.name, scene.seed, seed, int(seq)), params)
