"""CPU ray caster for the synthetic scenes (numpy, vectorised, deterministic).

Camera: pinhole ``(fx, fy, cx, cy)`` with pixel centres at integer coordinates (OpenCV convention: a camera point
``(X, Y, Z)`` projects to ``u = fx X / Z + cx``, ``v = fy Y / Z + cy``), ROS optical frame (x right, y down,
z forward). ``pose`` is camera-to-map ``[x, y, z, qw, qx, qy, qz]`` (``apr_localizer.geometry`` conventions).

Rays are cast per pixel with the slab test against the room (exit distance, the camera is inside) and every furniture
box (entry distance), culled to each box's projected screen rectangle. Shading is Lambertian: albedo (bilinear from
the scene's texture atlas) times ``ambient + sum_i colour_i * intensity_i * max(0, n.l_i) / (1 + (d_i / falloff_i)^2)``
with optional hard shadows from furniture, times the exposure; the result is clipped and rounded to 8 bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from apr_localizer.geometry import quat_to_matrix

from .scenes import Lighting, Scene, sample_atlas

__all__ = ["Intrinsics", "RenderResult", "project_points", "render_buffers", "render_frame"]

_NEAR = 1e-4


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels (no distortion)."""

    fx: float
    fy: float
    cx: float
    cy: float

    @classmethod
    def from_hfov(cls, width: int, height: int, hfov_deg: float = 60.0) -> Intrinsics:
        """Square pixels, principal point at the image centre ``((W - 1) / 2, (H - 1) / 2)``."""
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        if not 1.0 < hfov_deg < 179.0:
            raise ValueError(f"hfov_deg must be in (1, 179) degrees, got {hfov_deg}")
        f = (width / 2.0) / math.tan(math.radians(hfov_deg) / 2.0)
        return cls(f, f, (width - 1) / 2.0, (height - 1) / 2.0)

    @property
    def matrix(self) -> np.ndarray:
        """3x3 camera matrix K."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    def to_dict(self, width: int, height: int) -> dict:
        """JSON form (also what ``intrinsics.json`` holds)."""
        return {
            "model": "pinhole",
            "width": int(width),
            "height": int(height),
            "fx": self.fx,
            "fy": self.fy,
            "cx": self.cx,
            "cy": self.cy,
            "distortion_model": "plumb_bob",
            "D": [0.0, 0.0, 0.0, 0.0, 0.0],
            "K": self.matrix.reshape(-1).tolist(),
            "frame": "ROS optical frame: x right, y down, z forward; pixel centres at integer coordinates",
        }

    @classmethod
    def from_dict(cls, d: dict) -> Intrinsics:
        """Inverse of :meth:`to_dict` (extra keys ignored)."""
        return cls(float(d["fx"]), float(d["fy"]), float(d["cx"]), float(d["cy"]))


@dataclass
class RenderResult:
    """Rendered buffers.

    ``rgb`` (H, W, 3) uint8, ``depth`` (H, W) float32 z-depth in metres, ``surface_id`` (H, W) int32
    (``6 * box + face``, see :mod:`.scenes`).
    """

    rgb: np.ndarray
    depth: np.ndarray
    surface_id: np.ndarray


@lru_cache(maxsize=16)
def _pixel_grid(fx: float, fy: float, cx: float, cy: float, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Camera-frame ray directions with z = 1: ``x`` (H, W) and ``y`` (H, W) float32 (read-only)."""
    u = (np.arange(width, dtype=np.float64) - cx) / fx
    v = (np.arange(height, dtype=np.float64) - cy) / fy
    x = np.broadcast_to(u[None, :], (height, width)).astype(np.float32)
    y = np.broadcast_to(v[:, None], (height, width)).astype(np.float32)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def project_points(points, pose, intrinsics: Intrinsics) -> tuple[np.ndarray, np.ndarray]:
    """Project map points ``(N, 3)`` into the camera at ``pose``.

    Returns pixel coordinates ``(N, 2)`` (u, v) and z-depths ``(N,)``.
    """
    pose = np.asarray(pose, dtype=np.float64).reshape(7)
    r = quat_to_matrix(pose[3:])
    pc = (np.asarray(points, dtype=np.float64).reshape(-1, 3) - pose[:3]) @ r
    z = pc[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = np.stack([intrinsics.fx * pc[:, 0] / z + intrinsics.cx, intrinsics.fy * pc[:, 1] / z + intrinsics.cy], 1)
    return uv, z


def _screen_rect(corners_cam: np.ndarray, k: Intrinsics, width: int, height: int) -> tuple[int, int, int, int] | None:
    """Pixel rectangle ``(v0, v1, u0, u1)`` covering a box with camera-frame corners ``(8, 3)``; None if off-screen.

    Boxes that reach behind the camera get the full frame.
    """
    z = corners_cam[:, 2]
    if (z <= _NEAR).all():
        return None
    if (z <= 0.05).any():
        return 0, height, 0, width
    u = k.fx * corners_cam[:, 0] / z + k.cx
    v = k.fy * corners_cam[:, 1] / z + k.cy
    u0, u1 = max(int(math.floor(u.min())) - 1, 0), min(int(math.ceil(u.max())) + 2, width)
    v0, v1 = max(int(math.floor(v.min())) - 1, 0), min(int(math.ceil(v.max())) + 2, height)
    if u0 >= u1 or v0 >= v1:
        return None
    return v0, v1, u0, u1


def render_buffers(
    scene: Scene,
    pose,
    intrinsics: Intrinsics,
    width: int,
    height: int,
    light: Lighting | None = None,
) -> RenderResult:
    """Render colour, z-depth and surface ids of ``scene`` seen from ``pose`` (camera-to-map, 7 values)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    pose = np.asarray(pose, dtype=np.float64).reshape(-1)
    if pose.shape != (7,) or not np.all(np.isfinite(pose)):
        raise ValueError(f"pose must be 7 finite values [x, y, z, qw, qx, qy, qz], got {pose.tolist()}")
    light = scene.lighting if light is None else light
    o = pose[:3]
    lo, hi = scene.room_min, scene.room_max
    if np.any(o <= lo) or np.any(o >= hi):
        raise ValueError(
            f"camera position {np.round(o, 3).tolist()} is outside the room of scene {scene.name!r} "
            f"({np.round(lo, 3).tolist()} .. {np.round(hi, 3).tolist()})"
        )
    rot = quat_to_matrix(pose[3:])
    r32 = rot.astype(np.float32)
    xc, yc = _pixel_grid(
        float(intrinsics.fx), float(intrinsics.fy), float(intrinsics.cx), float(intrinsics.cy), int(width), int(height)
    )
    d = [r32[i, 0] * xc + r32[i, 1] * yc + r32[i, 2] for i in range(3)]  # world ray directions (H, W), z_cam = 1

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = [np.float32(1.0) / di for di in d]
        # --- room: exit distance
        t_axes = []
        neg = []
        for a in range(3):
            n = np.signbit(d[a])
            bound = np.where(n, np.float32(lo[a] - o[a]), np.float32(hi[a] - o[a]))
            t_axes.append(bound * inv[a])
            neg.append(n)
        tx, ty, tz = t_axes
        axis = np.where(tx <= ty, np.where(tx <= tz, 0, 2), np.where(ty <= tz, 1, 2)).astype(np.int32)
        t_best = np.minimum(np.minimum(tx, ty), tz)
        room_face = 2 * axis + 1 - np.choose(axis, neg).astype(np.int32)
        box_id = np.zeros((height, width), np.int32)

        # --- furniture: entry distance, culled to the projected rectangle
        for bi, box in enumerate(scene.boxes[1:], start=1):
            corners_cam = (box.corners() - o) @ rot
            rect = _screen_rect(corners_cam, intrinsics, width, height)
            if rect is None:
                continue
            v0, v1, u0, u1 = rect
            sl = (slice(v0, v1), slice(u0, u1))
            c, s = math.cos(box.yaw), math.sin(box.yaw)
            rel = o - np.asarray(box.center)
            ol = (c * rel[0] + s * rel[1], -s * rel[0] + c * rel[1], rel[2])
            if box.yaw == 0.0:
                invl = (inv[0][sl], inv[1][sl], inv[2][sl])
            else:
                dx, dy = d[0][sl], d[1][sl]
                invl = (np.float32(1.0) / (c * dx + s * dy), np.float32(1.0) / (-s * dx + c * dy), inv[2][sl])
            t_near = t_far = None
            for a in range(3):
                t1 = np.float32(-box.half[a] - ol[a]) * invl[a]
                t2 = np.float32(box.half[a] - ol[a]) * invl[a]
                lo_a, hi_a = np.minimum(t1, t2), np.maximum(t1, t2)
                t_near = lo_a if t_near is None else np.maximum(t_near, lo_a)
                t_far = hi_a if t_far is None else np.minimum(t_far, hi_a)
            tb = t_best[sl]
            hit = (t_near <= t_far) & (t_near > _NEAR) & (t_near < tb)
            np.copyto(tb, t_near, where=hit)
            np.copyto(box_id[sl], np.int32(bi), where=hit)

    # --- surfaces
    depth = t_best
    face = room_face
    obj = box_id > 0
    px = o[0] + d[0] * depth
    py = o[1] + d[1] * depth
    pz = o[2] + d[2] * depth
    if obj.any():
        ba = scene.box_arrays()
        b = box_id[obj]
        rx = px[obj] - ba["center"][b, 0]
        ry = py[obj] - ba["center"][b, 1]
        rz = pz[obj] - ba["center"][b, 2]
        c, s = ba["cos"][b], ba["sin"][b]
        loc = np.stack([c * rx + s * ry, -s * rx + c * ry, rz], 1)
        ratio = np.abs(loc) / ba["half"][b]
        ax = np.argmax(ratio, axis=1)
        sign_pos = np.take_along_axis(loc, ax[:, None], 1)[:, 0] > 0
        face = face.copy()
        face[obj] = 2 * ax + sign_pos
    surface = (6 * box_id + face).astype(np.int32)

    flat_s = surface.reshape(-1)
    p = np.stack([px.reshape(-1), py.reshape(-1), pz.reshape(-1)], 1)
    u, v = scene.texel_coords(flat_s, p)
    albedo = sample_atlas(scene, flat_s, u, v)
    shade = _shade(scene, flat_s, p, light)
    rgb = albedo * shade * np.float32(light.exposure)
    rgb = np.clip(rgb * np.float32(255.0) + np.float32(0.5), 0, 255).astype(np.uint8).reshape(height, width, 3)
    return RenderResult(rgb=rgb, depth=depth.astype(np.float32, copy=False), surface_id=surface)


def _shade(scene: Scene, surface: np.ndarray, p: np.ndarray, light: Lighting) -> np.ndarray:
    """Irradiance factor ``(N, 3)`` float32 at points ``p`` (N, 3) on ``surface`` (N,)."""
    n = scene.surf_normal[surface]
    out = np.empty((len(p), 3), np.float32)
    out[:] = np.asarray(light.ambient, np.float32)
    for lt in light.lights:
        lv = np.asarray(lt.position, np.float32) - p
        dist2 = np.einsum("ij,ij->i", lv, lv)
        dist = np.sqrt(dist2)
        ndl = np.einsum("ij,ij->i", n, lv) / np.maximum(dist, 1e-6)
        lit = np.nonzero(ndl > 0)[0]
        if len(lit) == 0:
            continue
        w = ndl[lit] * np.float32(lt.intensity) / (1.0 + dist2[lit] / np.float32(lt.falloff**2))
        if light.shadows and len(scene.boxes) > 1:
            w *= ~_occluded(scene, p[lit] + n[lit] * np.float32(1e-3), lv[lit], np.asarray(lt.position, np.float64))
        out[lit] += w[:, None] * np.asarray(lt.colour, np.float32)
    return out


def _occluded(scene: Scene, origin: np.ndarray, seg: np.ndarray, light_pos: np.ndarray) -> np.ndarray:
    """Whether the segments ``origin -> origin + seg`` (N, 3), which end at ``light_pos``, hit any furniture box.

    Boxes entirely below the light are culled first: a segment through such a box has its "slope" coordinates
    ``(p - light)_xy / (light_z - p_z)`` inside the bounding rectangle of the box corners' slopes.
    """
    blocked = np.zeros(len(origin), bool)
    lz = float(light_pos[2])
    below = origin[:, 2] < np.float32(lz)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        down = np.maximum(np.float32(lz) - origin[:, 2], np.float32(1e-6))
        slope_x = (origin[:, 0] - np.float32(light_pos[0])) / down
        slope_y = (origin[:, 1] - np.float32(light_pos[1])) / down
        for box in scene.boxes[1:]:
            corners = box.corners()
            if corners[:, 2].max() < lz - 1e-3:
                cs = (corners[:, :2] - light_pos[:2]) / (lz - corners[:, 2:3])
                cand = below & (slope_x >= cs[:, 0].min()) & (slope_x <= cs[:, 0].max())
                cand &= (slope_y >= cs[:, 1].min()) & (slope_y <= cs[:, 1].max())
                idx = np.nonzero(cand & ~blocked)[0]
            else:
                wedge = _xy_wedge(corners[:, :2] - light_pos[:2])
                if wedge is None:  # the light is above the box footprint: no cheap cull
                    idx = np.nonzero(~blocked)[0]
                else:
                    (ax, ay), (bx, by), r2 = wedge
                    qx = origin[:, 0] - np.float32(light_pos[0])
                    qy = origin[:, 1] - np.float32(light_pos[1])
                    cand = (ax * qy - ay * qx >= 0) & (qx * by - qy * bx >= 0) & (qx * qx + qy * qy >= r2)
                    idx = np.nonzero(cand & ~blocked)[0]
            if len(idx) == 0:
                continue
            blocked[idx] = _segment_hits_box(box, origin[idx], seg[idx])
    return blocked


def _xy_wedge(rel: np.ndarray):
    """Horizontal wedge from the light that contains a box footprint with corners ``rel`` (K, 2) relative to the light.

    Returns ``((ax, ay), (bx, by), r2)``: a point ``q`` (relative to the light) can be behind the box only if
    ``cross(a, q) >= 0``, ``cross(q, b) >= 0`` and ``|q|^2 >= r2``; None when the light is inside the footprint.
    """
    mid = rel.mean(axis=0)
    ang = np.arctan2(mid[0] * rel[:, 1] - mid[1] * rel[:, 0], rel @ mid)  # signed angle of each corner from mid
    if np.abs(ang).max() >= math.pi / 2 - 1e-3 or np.linalg.norm(mid) < 1e-6:
        return None
    a, b = rel[np.argmin(ang)], rel[np.argmax(ang)]
    # nearest distance to the footprint is at least the distance along mid to the nearest corner projection
    r = max(float((rel @ mid).min() / np.linalg.norm(mid)), 0.0)
    return (float(a[0]), float(a[1])), (float(b[0]), float(b[1])), r * r


def _segment_hits_box(box, origin: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Slab test of segments ``origin + t * seg``, ``t`` in (0, 1), against one box; ``(N,)`` bool."""
    c, s = math.cos(box.yaw), math.sin(box.yaw)
    rx = origin[:, 0] - np.float32(box.center[0])
    ry = origin[:, 1] - np.float32(box.center[1])
    rz = origin[:, 2] - np.float32(box.center[2])
    if box.yaw == 0.0:
        lx, ly, dx, dy = rx, ry, seg[:, 0], seg[:, 1]
    else:
        lx, ly = c * rx + s * ry, -s * rx + c * ry
        dx, dy = c * seg[:, 0] + s * seg[:, 1], -s * seg[:, 0] + c * seg[:, 1]
    t_near = t_far = None
    for lo_, da, h in ((lx, dx, box.half[0]), (ly, dy, box.half[1]), (rz, seg[:, 2], box.half[2])):
        inv = np.float32(1.0) / da
        t1 = (np.float32(-h) - lo_) * inv
        t2 = (np.float32(h) - lo_) * inv
        a, b = np.minimum(t1, t2), np.maximum(t1, t2)
        t_near = a if t_near is None else np.maximum(t_near, a)
        t_far = b if t_far is None else np.minimum(t_far, b)
    return (t_near <= t_far) & (t_far > 0) & (t_near < 1.0)


def render_frame(
    scene: Scene,
    pose,
    intrinsics: Intrinsics,
    width: int,
    height: int,
    light: Lighting | None = None,
    *,
    with_depth: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Render ``scene`` from ``pose``: (H, W, 3) uint8 RGB, or ``(rgb, depth (H, W) float32 metres)``."""
    r = render_buffers(scene, pose, intrinsics, width, height, light)
    return (r.rgb, r.depth) if with_depth else r.rgb
