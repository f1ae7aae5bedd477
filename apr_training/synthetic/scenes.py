"""Procedural indoor scenes: a room (box interior) with box furniture, per-surface procedural textures and lights.

A scene is generated deterministically from ``(name, seed)``. ``name`` picks a style preset (room size, palette,
furniture, texture kinds); the seed draws the layout, colours and textures. The map frame is z-up (REP-103) with the
floor at ``z = 0`` and the room centred on the origin.

Geometry is a list of boxes; ``boxes[0]`` is the room (seen from inside), the others are furniture (optionally
rotated about the vertical axis by ``yaw``). Every box has six faces, so surface id ``6 * box + face`` with faces
ordered ``-x, +x, -y, +y, -z, +z`` in the box's own frame. Each surface owns a texture in one flat atlas; a linear map
(``surf_a``, ``surf_b``) takes a world point on the surface to its texel coordinates.
"""

from __future__ import annotations

import colorsys
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "FACE_NAMES",
    "SCENE_STYLES",
    "Box",
    "Lighting",
    "PointLight",
    "Scene",
    "make_scene",
    "stable_seed",
    "vary_lighting",
]

FACE_NAMES = ("-x", "+x", "-y", "+y", "-z", "+z")
TEXELS_PER_M = 80.0


def stable_seed(*parts: object) -> int:
    """Return a 63-bit seed from printable parts, identical across processes and Python versions (unlike ``hash``)."""
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --------------------------------------------------------------------------------------------------- lighting
@dataclass(frozen=True)
class PointLight:
    """Point light in the map frame; contribution ``colour * intensity * max(0, n.l) / (1 + (d / falloff)^2)``."""

    position: tuple[float, float, float]
    colour: tuple[float, float, float] = (1.0, 1.0, 1.0)
    intensity: float = 1.0
    falloff: float = 3.0


@dataclass(frozen=True)
class Lighting:
    """Ambient term + point lights + exposure; ``shadows`` casts hard shadows from furniture."""

    ambient: tuple[float, float, float] = (0.3, 0.3, 0.3)
    lights: tuple[PointLight, ...] = ()
    exposure: float = 1.0
    shadows: bool = True

    def to_dict(self) -> dict:
        """JSON-friendly form."""
        return {
            "ambient": list(self.ambient),
            "lights": [
                {"position": list(p.position), "colour": list(p.colour), "intensity": p.intensity, "falloff": p.falloff}
                for p in self.lights
            ],
            "exposure": self.exposure,
            "shadows": self.shadows,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Lighting:
        """Inverse of :meth:`to_dict`."""
        return cls(
            ambient=tuple(float(v) for v in d["ambient"]),
            lights=tuple(
                PointLight(
                    tuple(float(v) for v in p["position"]),
                    tuple(float(v) for v in p["colour"]),
                    float(p["intensity"]),
                    float(p.get("falloff", 3.0)),
                )
                for p in d["lights"]
            ),
            exposure=float(d.get("exposure", 1.0)),
            shadows=bool(d.get("shadows", True)),
        )


def vary_lighting(base: Lighting, rng: np.random.Generator, amount: float = 1.0) -> Lighting:
    """Per-frame lighting variation: light intensities, colour tints, ambient level and exposure jitter.

    ``amount`` scales the variation (0 returns ``base`` unchanged).
    """
    if amount <= 0:
        return base
    lights = []
    for p in base.lights:
        tint = 1.0 + amount * rng.uniform(-0.08, 0.08, 3)
        lights.append(
            replace(
                p,
                colour=tuple(float(c) for c in np.clip(np.asarray(p.colour) * tint, 0.0, 1.5)),
                intensity=float(p.intensity * (1.0 + amount * rng.uniform(-0.35, 0.25))),
                position=tuple(float(c) for c in np.asarray(p.position) + amount * rng.uniform(-0.15, 0.15, 3)),
            )
        )
    ambient = (
        np.asarray(base.ambient) * (1.0 + amount * rng.uniform(-0.25, 0.2)) * (1 + amount * rng.uniform(-0.05, 0.05, 3))
    )
    return Lighting(
        ambient=tuple(float(c) for c in ambient),
        lights=tuple(lights),
        exposure=float(base.exposure * (1.0 + amount * rng.uniform(-0.15, 0.15))),
        shadows=base.shadows,
    )


# --------------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Box:
    """Box with centre, half extents (in its own frame) and rotation ``yaw`` (rad) about the map z axis."""

    kind: str
    center: tuple[float, float, float]
    half: tuple[float, float, float]
    yaw: float = 0.0

    def corners(self) -> np.ndarray:
        """Return the 8 corners in the map frame, ``(8, 3)``."""
        s = np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)], dtype=np.float64)
        local = s * np.asarray(self.half)
        c, sn = math.cos(self.yaw), math.sin(self.yaw)
        rot = np.array([[c, -sn, 0.0], [sn, c, 0.0], [0.0, 0.0, 1.0]])
        return local @ rot.T + np.asarray(self.center)

    def footprint_distance(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Horizontal distance (m) from map points ``(x, y)`` to the box footprint (0 inside)."""
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        px, py = x - self.center[0], y - self.center[1]
        lx, ly = c * px + s * py, -s * px + c * py
        dx = np.maximum(np.abs(lx) - self.half[0], 0.0)
        dy = np.maximum(np.abs(ly) - self.half[1], 0.0)
        return np.hypot(dx, dy)


@dataclass(frozen=True)
class _Style:
    """Scene style preset: room size ranges, palette, texture kinds per surface role, furniture builder."""

    room: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    hue: float
    hue_spread: float
    sat: tuple[float, float]
    val: tuple[float, float]
    floor: tuple[str, ...]
    walls: tuple[str, ...]
    ceiling: tuple[str, ...]
    objects: tuple[str, ...]
    posters: tuple[int, int]
    ambient_tint: tuple[float, float, float]
    furniture: str
    accent_sat: tuple[float, float] = (0.5, 0.9)


SCENE_STYLES: dict[str, _Style] = {
    "office": _Style(
        room=((6.5, 8.5), (5.0, 6.5), (2.7, 3.0)),
        hue=0.58,
        hue_spread=0.08,
        sat=(0.05, 0.35),
        val=(0.5, 0.9),
        floor=("noise", "tiles"),
        walls=("paint", "stripes", "bricks", "gradient"),
        ceiling=("panels",),
        objects=("noise", "gradient", "wood"),
        posters=(1, 3),
        ambient_tint=(0.95, 1.0, 1.05),
        furniture="office",
    ),
    "kitchen": _Style(
        room=((5.5, 7.5), (4.5, 6.0), (2.6, 2.9)),
        hue=0.08,
        hue_spread=0.06,
        sat=(0.2, 0.6),
        val=(0.55, 0.95),
        floor=("checker",),
        walls=("tiles", "paint", "stripes", "noise"),
        ceiling=("paint", "panels"),
        objects=("wood", "noise", "stripes"),
        posters=(0, 2),
        ambient_tint=(1.05, 1.0, 0.92),
        furniture="kitchen",
    ),
    "library": _Style(
        room=((7.0, 9.0), (5.5, 7.0), (2.9, 3.3)),
        hue=0.06,
        hue_spread=0.05,
        sat=(0.35, 0.7),
        val=(0.3, 0.75),
        floor=("wood",),
        walls=("wood", "stripes", "paint", "bricks"),
        ceiling=("panels", "wood"),
        objects=("wood", "books"),
        posters=(1, 2),
        ambient_tint=(1.08, 1.0, 0.85),
        furniture="library",
    ),
    "warehouse": _Style(
        room=((8.5, 10.5), (7.0, 9.0), (3.6, 4.2)),
        hue=0.13,
        hue_spread=0.1,
        sat=(0.05, 0.45),
        val=(0.4, 0.8),
        floor=("noise",),
        walls=("bricks", "stripes", "noise", "paint"),
        ceiling=("panels", "stripes"),
        objects=("wood", "stripes", "noise"),
        posters=(0, 2),
        ambient_tint=(1.0, 1.0, 0.97),
        furniture="warehouse",
    ),
    "studio": _Style(
        room=((6.0, 8.0), (5.0, 6.5), (2.8, 3.1)),
        hue=0.85,
        hue_spread=0.5,
        sat=(0.35, 0.85),
        val=(0.5, 0.95),
        floor=("wood", "checker"),
        walls=("gradient", "stripes", "paint", "checker"),
        ceiling=("paint",),
        objects=("noise", "stripes", "gradient"),
        posters=(2, 4),
        ambient_tint=(1.0, 0.95, 1.05),
        furniture="studio",
    ),
    "gallery": _Style(
        room=((7.5, 9.5), (6.0, 7.5), (3.0, 3.5)),
        hue=0.6,
        hue_spread=0.5,
        sat=(0.0, 0.08),
        val=(0.75, 0.97),
        floor=("checker", "noise"),
        walls=("paint",),
        ceiling=("panels",),
        objects=("noise", "gradient"),
        posters=(3, 5),
        ambient_tint=(1.0, 1.0, 1.0),
        furniture="gallery",
        accent_sat=(0.6, 1.0),
    ),
}


# --------------------------------------------------------------------------------------------------- scene
@dataclass(eq=False)
class Scene:
    """A generated scene: boxes (``boxes[0]`` is the room), surfaces with a texture atlas, and base lighting.

    Per-surface arrays (``S = 6 * len(boxes)``): ``surf_normal`` (S, 3) unit normal facing the visible side,
    ``surf_a`` (S, 2, 3) and ``surf_b`` (S, 2) map a world point to texel coordinates ``(u, v)`` (texel centres at
    integers), ``surf_offset`` / ``surf_w`` / ``surf_h`` (S,) locate the texture in the flat ``atlas`` (T, 3) float32
    (linear RGB albedo in [0, 1]).
    """

    name: str
    seed: int
    boxes: tuple[Box, ...]
    lighting: Lighting
    atlas: np.ndarray
    surf_offset: np.ndarray
    surf_w: np.ndarray
    surf_h: np.ndarray
    surf_a: np.ndarray
    surf_b: np.ndarray
    surf_normal: np.ndarray
    surface_names: tuple[str, ...]
    texels_per_m: float = TEXELS_PER_M
    _box_arrays: dict = field(default_factory=dict, repr=False)

    # --- room
    @property
    def room_min(self) -> np.ndarray:
        """Lower corner ``(3,)`` of the room interior."""
        r = self.boxes[0]
        return np.asarray(r.center) - np.asarray(r.half)

    @property
    def room_max(self) -> np.ndarray:
        """Upper corner ``(3,)`` of the room interior."""
        r = self.boxes[0]
        return np.asarray(r.center) + np.asarray(r.half)

    @property
    def objects(self) -> tuple[Box, ...]:
        """Furniture boxes (everything but the room)."""
        return self.boxes[1:]

    @property
    def num_surfaces(self) -> int:
        """Number of surfaces ``6 * len(boxes)``."""
        return 6 * len(self.boxes)

    def box_arrays(self) -> dict[str, np.ndarray]:
        """Float32 arrays of all boxes: ``center`` (B,3), ``half`` (B,3), ``cos``/``sin`` of yaw (B,)."""
        if not self._box_arrays:
            self._box_arrays.update(
                center=np.array([b.center for b in self.boxes], dtype=np.float32),
                half=np.array([b.half for b in self.boxes], dtype=np.float32),
                cos=np.array([math.cos(b.yaw) for b in self.boxes], dtype=np.float32),
                sin=np.array([math.sin(b.yaw) for b in self.boxes], dtype=np.float32),
            )
        return self._box_arrays

    def surface_id(self, box: int, face: int | str) -> int:
        """Surface id of ``face`` (index or one of ``FACE_NAMES``) of box ``box``."""
        f = FACE_NAMES.index(face) if isinstance(face, str) else int(face)
        if not 0 <= box < len(self.boxes) or not 0 <= f < 6:
            raise ValueError(f"surface (box {box}, face {face}) does not exist in scene {self.name!r}")
        return 6 * box + f

    # --- free space
    def clearance_map(self, cell: float = 0.05, wall_offset: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Horizontal clearance grid: distance (m) to the nearest wall or furniture footprint at each cell centre.

        Wall distances are reduced by ``wall_offset`` (so a threshold keeps that much more room from walls).
        Returns ``(clearance (ny, nx), xs (nx,), ys (ny,))`` with cell-centre coordinates.
        """
        lo, hi = self.room_min, self.room_max
        xs = np.arange(lo[0] + cell / 2, hi[0], cell)
        ys = np.arange(lo[1] + cell / 2, hi[1], cell)
        gx, gy = np.meshgrid(xs, ys)
        return self.point_clearance(np.stack([gx, gy], -1), wall_offset).reshape(gx.shape), xs, ys

    def point_clearance(self, xy: np.ndarray, wall_offset: float = 0.0) -> np.ndarray:
        """Exact horizontal clearance (m) of map points ``(N, 2)`` to walls (minus ``wall_offset``) and furniture."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        lo, hi = self.room_min, self.room_max
        d = np.minimum.reduce([xy[:, 0] - lo[0], hi[0] - xy[:, 0], xy[:, 1] - lo[1], hi[1] - xy[:, 1]]) - wall_offset
        for b in self.objects:
            d = np.minimum(d, b.footprint_distance(xy[:, 0], xy[:, 1]))
        return d

    # --- textures
    def texel_coords(self, surface: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Texel coordinates ``(u, v)`` of world points ``(N, 3)`` on surfaces ``(N,)``."""
        a = self.surf_a[surface]
        p = np.asarray(points, dtype=np.float32)
        u = np.einsum("nj,nj->n", a[:, 0], p) + self.surf_b[surface, 0]
        v = np.einsum("nj,nj->n", a[:, 1], p) + self.surf_b[surface, 1]
        return u, v

    def albedo_at(self, surface, points) -> np.ndarray:
        """Bilinear albedo ``(N, 3)`` in [0, 1] of world points ``(N, 3)`` lying on surfaces ``(N,)``."""
        surface = np.asarray(surface, dtype=np.int64).reshape(-1)
        u, v = self.texel_coords(surface, np.asarray(points).reshape(-1, 3))
        return sample_atlas(self, surface, u, v)


def sample_atlas(scene: Scene, surface: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear texture lookup ``(N, 3)`` float32 at texel coordinates ``u, v`` (N,) of surfaces ``(N,)``."""
    w = scene.surf_w[surface]
    h = scene.surf_h[surface]
    u = np.clip(u, 0.0, (w - 1).astype(np.float32))
    v = np.clip(v, 0.0, (h - 1).astype(np.float32))
    u0 = u.astype(np.int64)  # u >= 0, so truncation is floor
    v0 = v.astype(np.int64)
    fu = (u - u0).astype(np.float32)[:, None]
    fv = (v - v0).astype(np.float32)[:, None]
    du = (u0 + 1 < w).astype(np.int64)
    dv = np.where(v0 + 1 < h, w, 0)
    i00 = scene.surf_offset[surface] + v0 * w + u0
    at = scene.atlas
    top = at[i00] + fu * (at[i00 + du] - at[i00])
    bot = at[i00 + dv] + fu * (at[i00 + dv + du] - at[i00 + dv])
    return top + fv * (bot - top)


# --------------------------------------------------------------------------------------------------- colours
class _Palette:
    def __init__(self, style: _Style, rng: np.random.Generator):
        self.style = style
        self.rng = rng

    def base(self, val: tuple[float, float] | None = None, sat: tuple[float, float] | None = None) -> np.ndarray:
        s = self.style
        h = (s.hue + self.rng.uniform(-s.hue_spread, s.hue_spread)) % 1.0
        sat_ = self.rng.uniform(*(sat or s.sat))
        val_ = self.rng.uniform(*(val or s.val))
        return np.array(colorsys.hsv_to_rgb(h, sat_, val_), dtype=np.float32)

    def accent(self) -> np.ndarray:
        h = self.rng.uniform(0.0, 1.0)
        return np.array(
            colorsys.hsv_to_rgb(h, self.rng.uniform(*self.style.accent_sat), self.rng.uniform(0.45, 1.0)),
            dtype=np.float32,
        )

    def contrast(self, c: np.ndarray) -> np.ndarray:
        """Return a colour that differs clearly in value from ``c``."""
        v = float(np.max(c))
        target = (0.15, 0.45) if v > 0.6 else (0.7, 0.98)
        return self.base(val=target)


# --------------------------------------------------------------------------------------------------- textures
def _grid(th: int, tw: int, res: float) -> tuple[np.ndarray, np.ndarray]:
    """Texel-centre coordinates in metres, ``u`` (1, tw) and ``v`` (th, 1)."""
    u = ((np.arange(tw, dtype=np.float32) + 0.5) / res)[None, :]
    v = ((np.arange(th, dtype=np.float32) + 0.5) / res)[:, None]
    return u, v


def _value_noise(rng: np.random.Generator, th: int, tw: int, cell: float, octaves: int = 3) -> np.ndarray:
    """Smooth value noise in [0, 1], ``(th, tw)`` float32; ``cell`` is the coarsest lattice spacing in texels."""
    out = np.zeros((th, tw), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        c = max(cell / (2**o), 1.5)
        gh, gw = int(th / c) + 3, int(tw / c) + 3
        lat = rng.random((gh, gw), dtype=np.float32)
        ys = np.arange(th, dtype=np.float32) / c
        xs = np.arange(tw, dtype=np.float32) / c
        y0, x0 = ys.astype(np.int64), xs.astype(np.int64)
        fy, fx = ys - y0, xs - x0
        fy, fx = (fy * fy * (3 - 2 * fy))[:, None], (fx * fx * (3 - 2 * fx))[None, :]
        a = lat[y0][:, x0]
        b = lat[y0][:, x0 + 1]
        cc = lat[y0 + 1][:, x0]
        d = lat[y0 + 1][:, x0 + 1]
        out += amp * ((a * (1 - fx) + b * fx) * (1 - fy) + (cc * (1 - fx) + d * fx) * fy)
        total += amp
        amp *= 0.5
    return out / total


def _mix(c1: np.ndarray, c2: np.ndarray, t: np.ndarray) -> np.ndarray:
    t = t[..., None]
    return c1 * (1 - t) + c2 * t


def _tex_paint(rng, pal, th, tw, res):
    c = pal.base()
    n = _value_noise(rng, th, tw, res * 0.8, 3)
    return c * (0.88 + 0.24 * n[..., None])


def _tex_noise(rng, pal, th, tw, res):
    c1, c2 = pal.base(), pal.base()
    if np.abs(c1 - c2).max() < 0.15:
        c2 = pal.contrast(c1)
    n = _value_noise(rng, th, tw, res * rng.uniform(0.15, 0.6), 4)
    return _mix(c1, c2, np.clip((n - 0.5) * 2.2 + 0.5, 0, 1))


def _tex_checker(rng, pal, th, tw, res):
    c1 = pal.base()
    c2 = pal.contrast(c1)
    s = rng.uniform(0.25, 0.6)
    u, v = _grid(th, tw, res)
    ph = rng.uniform(0, s, 2)
    m = ((np.floor((u + ph[0]) / s) + np.floor((v + ph[1]) / s)) % 2).astype(np.float32)
    out = _mix(c1, c2, m)
    return out * (0.93 + 0.14 * _value_noise(rng, th, tw, res * 0.3, 2)[..., None])


def _tex_tiles(rng, pal, th, tw, res):
    c = pal.base()
    grout = pal.contrast(c) * 0.9
    s = rng.uniform(0.15, 0.45)
    u, v = _grid(th, tw, res)
    iu, iv = np.floor(u / s), np.floor(v / s)
    key = (iu * 7919 + iv * 104729) % 97
    jitter = (0.9 + 0.2 * (np.sin(key * 12.9898) * 0.5 + 0.5)).astype(np.float32)
    out = c * jitter[..., None]
    line = ((u % s) < 0.012) | ((v % s) < 0.012)
    out = np.where(line[..., None], grout, out)
    return out.astype(np.float32)


def _tex_stripes(rng, pal, th, tw, res):
    n = int(rng.integers(2, 4))
    cols = [pal.base()]
    for _ in range(n - 1):
        cols.append(pal.accent() if rng.random() < 0.4 else pal.contrast(cols[-1]))
    period = rng.uniform(0.12, 0.7)
    ang = float(rng.choice([0.0, math.pi / 2, math.pi / 4, rng.uniform(0, math.pi)]))
    u, v = _grid(th, tw, res)
    coord = u * math.cos(ang) + v * math.sin(ang)
    idx = (np.floor(coord / period * n) % n).astype(np.int64)
    out = np.stack(cols)[idx]
    return out * (0.94 + 0.12 * _value_noise(rng, th, tw, res * 0.4, 2)[..., None])


def _tex_gradient(rng, pal, th, tw, res):
    c1, c2 = pal.base(), pal.accent()
    ang = rng.uniform(0, 2 * math.pi)
    u, v = _grid(th, tw, res)
    coord = u * math.cos(ang) + v * math.sin(ang)
    t = (coord - coord.min()) / max(float(coord.max() - coord.min()), 1e-6)
    t = 0.5 + 0.5 * np.sin(t * math.pi * rng.uniform(1.0, 3.0) + rng.uniform(0, 6.28))
    return _mix(c1, c2, t.astype(np.float32)) * (0.92 + 0.16 * _value_noise(rng, th, tw, res * 0.5, 3)[..., None])


def _tex_wood(rng, pal, th, tw, res):
    light = np.array(
        colorsys.hsv_to_rgb(rng.uniform(0.05, 0.11), rng.uniform(0.4, 0.7), rng.uniform(0.55, 0.85)), np.float32
    )
    dark = light * rng.uniform(0.45, 0.7)
    plank = rng.uniform(0.12, 0.3)
    along_u = rng.random() < 0.5
    u, v = _grid(th, tw, res)
    a, b = (u, v) if along_u else (v, u)  # grain runs along a, planks stacked along b
    a, b = np.broadcast_to(a, (th, tw)), np.broadcast_to(b, (th, tw))
    pid = np.floor(b / plank)
    shift = (np.sin(pid * 78.233) * 43758.5453) % 1.0
    n = _value_noise(rng, th, tw, res * 0.25, 3)
    rings = 0.5 + 0.5 * np.sin((b * 25.0 + n * 6.0 + shift * 10.0) * rng.uniform(1.5, 3.0) + a * 0.8)
    tone = (0.85 + 0.3 * shift).astype(np.float32)
    out = _mix(dark, light, (rings**2).astype(np.float32)) * tone[..., None]
    seam = (b % plank) < 0.008
    return np.where(seam[..., None], dark * 0.6, out).astype(np.float32)


def _tex_bricks(rng, pal, th, tw, res):
    c = pal.base()
    mortar = pal.contrast(c)
    bw, bh = rng.uniform(0.2, 0.35), rng.uniform(0.06, 0.12)
    u, v = _grid(th, tw, res)
    row = np.floor(v / bh)
    uu = u + (row % 2) * bw * 0.5
    col = np.floor(uu / bw)
    key = np.sin(row * 12.9898 + col * 78.233) * 43758.5453 % 1.0
    out = c * (0.8 + 0.4 * key[..., None]).astype(np.float32)
    line = ((uu % bw) < 0.012) | ((v % bh) < 0.01)
    out = np.where(line[..., None], mortar, out)
    return out.astype(np.float32) * (0.93 + 0.14 * _value_noise(rng, th, tw, res * 0.2, 2)[..., None])


def _tex_panels(rng, pal, th, tw, res):
    c = pal.base(val=(0.75, 0.95), sat=(0.0, 0.1))
    line_c = c * rng.uniform(0.5, 0.7)
    s = rng.uniform(0.5, 0.7)
    u, v = _grid(th, tw, res)
    line = ((u % s) < 0.02) | ((v % s) < 0.02)
    key = (np.floor(u / s) * 3 + np.floor(v / s) * 5) % 7
    lamp = (key == 0) & ((u % s) > 0.1) & ((v % s) > 0.1) & ((u % s) < s - 0.08) & ((v % s) < s - 0.08)
    out = np.broadcast_to(c, (th, tw, 3)).copy()
    out[np.broadcast_to(lamp, (th, tw))] = np.minimum(c * 1.2, 1.0)
    out[np.broadcast_to(line, (th, tw))] = line_c
    return out * (0.95 + 0.1 * _value_noise(rng, th, tw, res * 0.3, 2)[..., None])


def _tex_books(rng, pal, th, tw, res):
    """Shelf front: horizontal boards with book spines of random widths and colours."""
    out = np.empty((th, tw, 3), np.float32)
    board = np.array(colorsys.hsv_to_rgb(rng.uniform(0.05, 0.1), 0.55, rng.uniform(0.35, 0.6)), np.float32)
    out[:] = board * 0.6
    shelf_h = rng.uniform(0.3, 0.42)
    n_rows = max(int(th / (shelf_h * res)), 1)
    for r in range(n_rows):
        y0 = int(r * shelf_h * res + 0.03 * res)
        y1 = int((r + 1) * shelf_h * res)
        out[max(y0 - int(0.03 * res), 0) : y0] = board
        x = 0
        while x < tw:
            w = int(rng.uniform(0.02, 0.07) * res) + 1
            top = y0 + int(rng.uniform(0.0, 0.1) * res)
            col = pal.accent() * rng.uniform(0.5, 0.95) if rng.random() < 0.7 else pal.base()
            out[top:y1, x : x + w] = col
            x += w + (int(rng.uniform(0.05, 0.3) * res) if rng.random() < 0.08 else 0)
    return out


_TEXTURES: dict[str, Callable] = {
    "paint": _tex_paint,
    "noise": _tex_noise,
    "checker": _tex_checker,
    "tiles": _tex_tiles,
    "stripes": _tex_stripes,
    "gradient": _tex_gradient,
    "wood": _tex_wood,
    "bricks": _tex_bricks,
    "panels": _tex_panels,
    "books": _tex_books,
}


def _add_posters(
    img: np.ndarray, rng: np.random.Generator, pal: _Palette, res: float, count: int, v_range: tuple[float, float]
) -> np.ndarray:
    """Paste ``count`` framed posters with random shapes onto a wall texture ``(th, tw, 3)`` float32."""
    th, tw = img.shape[:2]
    pil = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    placed: list[tuple[int, int, int, int]] = []
    border = max(int(0.04 * res), 2)
    for _ in range(count * 10):
        if len(placed) >= count:
            break
        w = int(rng.uniform(0.5, 1.3) * res)
        h = int(rng.uniform(0.4, 1.0) * res)
        x0 = int(rng.uniform(0.1 * res, max(tw - w - 0.1 * res, 0.1 * res + 1)))
        y0 = int(rng.uniform(*v_range) * res)
        if y0 - border < 0 or y0 + h + border >= th or x0 - border < 0 or x0 + w + border >= tw:
            continue
        box = (x0 - 3 * border, y0 - 3 * border, x0 + w + 3 * border, y0 + h + 3 * border)
        if any(not (box[2] < p[0] or box[0] > p[2] or box[3] < p[1] or box[1] > p[3]) for p in placed):
            continue
        placed.append(box)
        frame = np.array([0.1, 0.1, 0.1]) if rng.random() < 0.5 else pal.accent() * 0.5
        bg = pal.accent() if rng.random() < 0.5 else pal.base(val=(0.8, 1.0), sat=(0.0, 0.2))
        framed = Image.new("RGB", (w + 2 * border, h + 2 * border), _rgb8(frame))
        inner = Image.new("RGB", (w, h), _rgb8(bg))
        draw = ImageDraw.Draw(inner)
        for _ in range(int(rng.integers(3, 9))):
            col = _rgb8(pal.accent())
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            r = rng.uniform(0.08, 0.35) * min(w, h)
            kind = rng.integers(0, 4)
            if kind == 0:
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=col)
            elif kind == 1:
                draw.rectangle((cx - r, cy - r * rng.uniform(0.3, 1.0), cx + r, cy + r), fill=col)
            elif kind == 2:
                a = rng.uniform(0, 2 * math.pi)
                pts = [(cx + r * math.cos(a + k * 2.094), cy + r * math.sin(a + k * 2.094)) for k in range(3)]
                draw.polygon(pts, fill=col)
            else:
                xy = (rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0, h))
                draw.line(xy, fill=col, width=max(int(r / 4), 2))
        framed.paste(inner, (border, border))
        pil.paste(framed, (x0 - border, y0 - border))
    return np.asarray(pil).astype(np.float32) / 255.0


def _rgb8(c: np.ndarray) -> tuple[int, int, int]:
    c = np.clip(np.asarray(c, dtype=np.float64), 0, 1)
    return int(c[0] * 255 + 0.5), int(c[1] * 255 + 0.5), int(c[2] * 255 + 0.5)


# --------------------------------------------------------------------------------------------------- furniture
class _Layout:
    """Places furniture boxes in a room while keeping a connected walkable area."""

    def __init__(self, rng: np.random.Generator, half_x: float, half_y: float, height: float):
        self.rng = rng
        self.hx, self.hy, self.h = half_x, half_y, height
        self.boxes: list[Box] = []
        self.groups: list[list[Box]] = []

    def _fits(self, parts: list[Box], gap: float) -> bool:
        for p in parts:
            cs = p.corners()
            if (np.abs(cs[:, 0]) > self.hx - 0.01).any() or (np.abs(cs[:, 1]) > self.hy - 0.01).any():
                return False
            if cs[:, 2].max() > self.h + 1e-6:
                return False
        for q in self.boxes:
            for p in parts:
                # conservative test: footprint corner distances both ways
                cp, cq = p.corners(), q.corners()
                if (
                    (q.footprint_distance(cp[:, 0], cp[:, 1]) < gap).any()
                    or (p.footprint_distance(cq[:, 0], cq[:, 1]) < gap).any()
                    or _centre_inside(p, q)
                    or _centre_inside(q, p)
                ):
                    return False
        return True

    def _walkable(self, extra: list[Box]) -> bool:
        """Check that the free area (clearance >= 0.55 m) stays large and connected with ``extra`` added."""
        cell = 0.1
        xs = np.arange(-self.hx + cell / 2, self.hx, cell)
        ys = np.arange(-self.hy + cell / 2, self.hy, cell)
        gx, gy = np.meshgrid(xs, ys)
        d = np.minimum.reduce([gx + self.hx, self.hx - gx, gy + self.hy, self.hy - gy])
        for b in self.boxes + extra:
            d = np.minimum(d, b.footprint_distance(gx, gy))
        free = (d >= 0.55).astype(np.uint8)
        if free.sum() < 0.3 * free.size:
            return False
        n, labels = cv2.connectedComponents(free, connectivity=4)
        if n <= 1:
            return False
        counts = np.bincount(labels.ravel())[1:]
        return counts.max() >= 0.9 * free.sum()

    def add(self, parts: list[Box], gap: float = 0.05) -> bool:
        if self._fits(parts, gap) and self._walkable(parts):
            self.boxes.extend(parts)
            self.groups.append(parts)
            return True
        return False

    # ---- placement helpers
    def against_wall(
        self, make: Callable[[float, float, float], list[Box]], width: float, depth: float, tries: int = 30
    ) -> bool:
        """Place a group built by ``make(x, y, yaw)`` with its back to a random wall (local +y faces the room)."""
        for _ in range(tries):
            wall = int(self.rng.integers(0, 4))
            gap = self.rng.uniform(0.01, 0.06)
            if wall in (0, 1):  # walls at y = -hy / +hy, object extends along x
                span = self.hx - width / 2 - 0.05
                if span <= 0:
                    continue
                x = self.rng.uniform(-span, span)
                y = (-self.hy + gap + depth / 2) if wall == 0 else (self.hy - gap - depth / 2)
                yaw = 0.0 if wall == 0 else math.pi
            else:  # walls at x = -hx / +hx, object extends along y
                span = self.hy - width / 2 - 0.05
                if span <= 0:
                    continue
                y = self.rng.uniform(-span, span)
                x = (-self.hx + gap + depth / 2) if wall == 2 else (self.hx - gap - depth / 2)
                yaw = -math.pi / 2 if wall == 2 else math.pi / 2
            if self.add(make(x, y, yaw)):
                return True
        return False

    def free(
        self,
        make: Callable[[float, float, float], list[Box]],
        radius: float,
        tries: int = 40,
        clearance: float = 0.9,
        yaw_choices: tuple[float, ...] | None = None,
    ) -> bool:
        """Place a group built by ``make(x, y, yaw)`` in the room interior with ``clearance`` to other furniture."""
        for _ in range(tries):
            x = self.rng.uniform(-self.hx + radius + clearance, self.hx - radius - clearance)
            y = self.rng.uniform(-self.hy + radius + clearance, self.hy - radius - clearance)
            yaw = (
                (float(self.rng.choice(yaw_choices)) + self.rng.normal(0, 0.05))
                if yaw_choices
                else float(self.rng.uniform(-math.pi, math.pi))
            )
            if self.add(make(x, y, yaw), gap=clearance):
                return True
        return False


def _centre_inside(p: Box, q: Box) -> bool:
    return bool(q.footprint_distance(np.array([p.center[0]]), np.array([p.center[1]]))[0] == 0.0)


def _rot(x: float, y: float, yaw: float, lx: float, ly: float) -> tuple[float, float]:
    """Map position of local offset ``(lx, ly)`` of a group at ``(x, y, yaw)``."""
    c, s = math.cos(yaw), math.sin(yaw)
    return x + c * lx - s * ly, y + s * lx + c * ly


def _block(kind: str, w: float, d: float, h: float, z0: float = 0.0):
    def make(x, y, yaw):
        return [Box(kind, (x, y, z0 + h / 2), (w / 2, d / 2, h / 2), yaw)]

    return make


def _table(kind: str, w: float, d: float, h: float, top: float = 0.04, leg: float = 0.06):
    def make(x, y, yaw):
        parts = [Box(kind + "_top", (x, y, h - top / 2), (w / 2, d / 2, top / 2), yaw)]
        for sx in (-1, 1):
            for sy in (-1, 1):
                px, py = _rot(x, y, yaw, sx * (w / 2 - leg), sy * (d / 2 - leg))
                parts.append(Box(kind + "_leg", (px, py, (h - top) / 2), (leg / 2, leg / 2, (h - top) / 2), yaw))
        return parts

    return make


def _sofa(w: float, d: float):
    def make(x, y, yaw):
        bx, by = _rot(x, y, yaw, 0.0, -d / 2 + 0.1)
        return [
            Box("sofa_seat", (x, y, 0.22), (w / 2, d / 2, 0.22), yaw),
            Box("sofa_back", (bx, by, 0.45 + 0.2), (w / 2, 0.1, 0.2), yaw),
        ]

    return make


def _furnish(style: str, lay: _Layout) -> None:
    r = lay.rng
    u = r.uniform
    if style == "office":
        for _ in range(int(r.integers(2, 4))):
            lay.free(_table("desk", u(1.2, 1.8), u(0.7, 0.9), u(0.72, 0.76)), 0.9, yaw_choices=(0.0, math.pi / 2))
        for _ in range(int(r.integers(2, 4))):
            lay.against_wall(_block("cabinet", w := u(0.8, 1.4), d := u(0.45, 0.6), u(0.9, 1.3)), w, d)
        for _ in range(int(r.integers(1, 3))):
            lay.against_wall(_block("shelf", w := u(0.8, 1.6), d := u(0.3, 0.4), u(1.8, 2.2)), w, d)
        if r.random() < 0.7:
            lay.free(_block("pillar", s := u(0.35, 0.55), s, lay.h), 0.3)
    elif style == "kitchen":
        for _ in range(int(r.integers(2, 4))):
            lay.against_wall(_block("counter", w := u(1.5, 2.8), d := u(0.6, 0.65), 0.9), w, d)
        lay.against_wall(_block("fridge", w := u(0.7, 0.9), d := u(0.65, 0.75), u(1.8, 2.0)), w, d)
        lay.free(_block("island", u(1.4, 2.0), u(0.8, 1.0), 0.9), 1.0, yaw_choices=(0.0, math.pi / 2))
        for _ in range(int(r.integers(1, 3))):
            lay.against_wall(_block("wall_cabinet", w := u(0.8, 1.5), d := 0.35, 0.7, z0=u(1.5, 1.6)), w, d)
        if r.random() < 0.5:
            lay.free(_table("table", u(0.8, 1.2), u(0.8, 1.2), 0.75), 0.7)
    elif style == "library":
        for _ in range(int(r.integers(4, 7))):
            lay.against_wall(_block("bookshelf", w := u(1.0, 2.0), d := u(0.3, 0.4), u(2.0, 2.4)), w, d)
        for _ in range(int(r.integers(1, 3))):
            lay.free(_table("reading_table", u(1.6, 2.2), u(0.8, 1.0), 0.76), 1.1, yaw_choices=(0.0, math.pi / 2))
        for _ in range(int(r.integers(0, 3))):
            lay.free(_block("pillar", s := u(0.4, 0.6), s, lay.h), 0.35)
    elif style == "warehouse":
        for _ in range(int(r.integers(2, 5))):
            lay.free(_block("pillar", s := u(0.4, 0.6), s, lay.h), 0.35, clearance=1.2)
        for _ in range(int(r.integers(3, 7))):
            s = u(0.6, 1.2)
            lay.free(_block("crate", s, s * u(0.8, 1.2), s * u(0.6, 1.0)), s, clearance=0.8)
        for _ in range(int(r.integers(2, 4))):
            lay.against_wall(_block("rack", w := u(1.8, 3.0), d := u(0.6, 0.9), u(2.2, 3.0)), w, d)
    elif style == "studio":
        lay.against_wall(_sofa(w := u(1.8, 2.4), d := u(0.8, 0.95)), w, d)
        lay.free(_table("low_table", u(0.8, 1.2), u(0.5, 0.7), 0.45), 0.7)
        for _ in range(int(r.integers(1, 3))):
            lay.against_wall(_block("cabinet", w := u(0.6, 1.2), d := u(0.4, 0.5), u(0.8, 1.6)), w, d)
        lay.free(_block("pillar", s := u(0.3, 0.5), s, lay.h), 0.3)
        if r.random() < 0.6:
            lay.free(_block("plinth", s := u(0.4, 0.7), s, u(0.5, 1.1)), 0.5)
    elif style == "gallery":
        for _ in range(int(r.integers(2, 5))):
            lay.free(_block("pedestal", s := u(0.4, 0.6), s, u(0.9, 1.2)), 0.4, clearance=1.1)
        for _ in range(int(r.integers(1, 3))):
            lay.free(_block("bench", u(1.2, 1.8), u(0.4, 0.5), 0.45), 0.9, yaw_choices=(0.0, math.pi / 2))
        for _ in range(int(r.integers(0, 3))):
            lay.free(_block("pillar", s := u(0.4, 0.6), s, lay.h), 0.35, clearance=1.2)
    else:  # pragma: no cover - guarded by make_scene
        raise ValueError(f"no furniture builder for style {style!r}")


# --------------------------------------------------------------------------------------------------- assembly
def _face_frame(box: Box, face: int, room: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Return normal, texel map (A (2, 3), b (2,)) and texture size (w, h) of one box face, at TEXELS_PER_M."""
    res = TEXELS_PER_M
    axis, sign = face // 2, (-1.0 if face % 2 == 0 else 1.0)
    c, s = math.cos(box.yaw), math.sin(box.yaw)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    e = np.eye(3)
    normal = rot @ e[axis] * sign * (-1.0 if room else 1.0)
    half = np.asarray(box.half)
    centre = np.asarray(box.center)
    if axis == 2:
        tw, th = half[0] * 2, half[1] * 2
        a_u, a_v = rot @ e[0], rot @ e[1]
        b_u = res * (half[0] - a_u @ centre) - 0.5
        b_v = res * (half[1] - a_v @ centre) - 0.5
    else:
        tu_axis = 1 - axis
        tw, th = half[tu_axis] * 2, half[2] * 2
        a_u = rot @ e[tu_axis]
        a_v = -e[2]
        b_u = res * (half[tu_axis] - a_u @ centre) - 0.5
        b_v = res * (half[2] + centre[2]) - 0.5
    a = np.stack([a_u, a_v]) * res
    w = max(int(math.ceil(tw * res)), 2)
    h = max(int(math.ceil(th * res)), 2)
    return normal, a, np.array([b_u, b_v]), np.array([w, h]), w, h


def _build(name: str, seed: int) -> Scene:
    style = SCENE_STYLES[name]
    rng = np.random.default_rng(stable_seed("scene", name, seed))
    lx, ly, lz = (float(rng.uniform(*r)) for r in style.room)
    room = Box("room", (0.0, 0.0, lz / 2), (lx / 2, ly / 2, lz / 2))
    lay = _Layout(rng, lx / 2, ly / 2, lz)
    _furnish(style.furniture, lay)
    boxes = (room, *lay.boxes)
    pal = _Palette(style, rng)

    textures: list[np.ndarray] = []
    normals, amats, bvecs, names = [], [], [], []
    wall_kinds = list(rng.permutation(np.array(style.walls, dtype=object)))
    while len(wall_kinds) < 4:
        wall_kinds.append(rng.choice(np.array(style.walls, dtype=object)))
    group_of = {}
    for gi, g in enumerate(lay.groups):
        for b in g:
            group_of[id(b)] = gi
    group_kind = [str(rng.choice(np.array(style.objects, dtype=object))) for _ in lay.groups]
    for bi, box in enumerate(boxes):
        is_room = bi == 0
        for f in range(6):
            n, a, b, _, w, h = _face_frame(box, f, is_room)
            normals.append(n)
            amats.append(a)
            bvecs.append(b)
            names.append(f"{box.kind}{'' if is_room else bi}:{FACE_NAMES[f]}")
            if is_room:
                if f == 4:
                    kind = str(rng.choice(np.array(style.floor, dtype=object)))
                elif f == 5:
                    kind = str(rng.choice(np.array(style.ceiling, dtype=object)))
                else:
                    kind = str(wall_kinds[f])
                tex = _TEXTURES[kind](rng, pal, h, w, TEXELS_PER_M)
                if f < 4:
                    count = int(rng.integers(style.posters[0], style.posters[1] + 1))
                    if count:
                        tex = _add_posters(tex, rng, pal, TEXELS_PER_M, count, (0.35, max(0.4, box.half[2] - 0.6)))
            else:
                hidden = (f == 4 and box.center[2] - box.half[2] < 0.01) or (
                    f == 5 and box.center[2] + box.half[2] > boxes[0].half[2] * 2 - 0.01
                )
                if hidden:
                    tex = np.broadcast_to(pal.base(), (2, 2, 3))
                    w = h = 2
                    # shrink the texel map to the 2x2 texture (any point maps inside after clipping)
                else:
                    kind = group_kind[group_of[id(box)]]
                    if kind == "books" and not (f < 4 and box.kind == "bookshelf"):
                        kind = "wood"
                    tex = _TEXTURES[kind](rng, pal, h, w, TEXELS_PER_M)
            tex = np.ascontiguousarray(np.clip(tex, 0.0, 1.0), dtype=np.float32)
            if tex.shape[:2] != (h, w):  # pragma: no cover - generators honour the size
                raise RuntimeError(f"texture for {names[-1]} has shape {tex.shape}, expected {(h, w)}")
            textures.append(tex)

    sizes = np.array([t.shape[0] * t.shape[1] for t in textures], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    atlas = np.concatenate([t.reshape(-1, 3) for t in textures]).astype(np.float32)

    lighting = _make_lighting(rng, style, lx, ly, lz)
    return Scene(
        name=name,
        seed=seed,
        boxes=boxes,
        lighting=lighting,
        atlas=atlas,
        surf_offset=offsets,
        surf_w=np.array([t.shape[1] for t in textures], dtype=np.int64),
        surf_h=np.array([t.shape[0] for t in textures], dtype=np.int64),
        surf_a=np.array(amats, dtype=np.float32),
        surf_b=np.array(bvecs, dtype=np.float32),
        surf_normal=np.array(normals, dtype=np.float32),
        surface_names=tuple(names),
    )


def _make_lighting(rng: np.random.Generator, style: _Style, lx: float, ly: float, lz: float) -> Lighting:
    n = int(rng.integers(1, 3))
    lights = []
    for i in range(n):
        x = rng.uniform(-lx / 2 + 1.0, lx / 2 - 1.0) if n == 1 else (i - 0.5) * lx / 2 + rng.uniform(-0.5, 0.5)
        y = rng.uniform(-ly / 2 + 1.0, ly / 2 - 1.0)
        warm = rng.uniform(-0.08, 0.08)
        lights.append(
            PointLight(
                position=(float(x), float(y), float(lz - 0.3)),
                colour=(1.0 + warm, 1.0, 1.0 - warm),
                intensity=float(rng.uniform(0.9, 1.2) * (1.2 if n == 1 else 0.85)),
                falloff=float(max(lx, ly) * 0.5),
            )
        )
    amb = rng.uniform(0.28, 0.38) * np.asarray(style.ambient_tint)
    return Lighting(ambient=tuple(float(a) for a in amb), lights=tuple(lights), exposure=1.0, shadows=True)


@lru_cache(maxsize=8)
def _cached_scene(name: str, seed: int) -> Scene:
    return _build(name, seed)


def make_scene(name: str, seed: int = 0) -> Scene:
    """Return the scene ``name`` (one of :data:`SCENE_STYLES`) generated from ``seed``; cached per process.

    The returned object is shared between callers: treat it as read-only.
    """
    if name not in SCENE_STYLES:
        raise ValueError(f"unknown synthetic scene {name!r}; known scenes are: {', '.join(SCENE_STYLES)}")
    return _cached_scene(name, int(seed))
