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

import hashlib
import math
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np

from .furniture import Box, Layout, furnish
from .textures import TEXTURES, Palette, add_posters

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
    lay = Layout(rng, lx / 2, ly / 2, lz)
    furnish(style.furniture, lay)
    boxes = (room, *lay.boxes)
    pal = Palette(style, rng)

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
                tex = TEXTURES[kind](rng, pal, h, w, TEXELS_PER_M)
                if f < 4:
                    count = int(rng.integers(style.posters[0], style.posters[1] + 1))
                    if count:
                        tex = add_posters(tex, rng, pal, TEXELS_PER_M, count, (0.35, max(0.4, box.half[2] - 0.6)))
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
                    tex = TEXTURES[kind](rng, pal, h, w, TEXELS_PER_M)
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
