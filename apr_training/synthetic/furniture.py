"""Box furniture of the synthetic scenes: :class:`Box`, the free-floor layout and each style's furnishing.

Split out of :mod:`.scenes` unchanged (the random draws happen in the same order, so scenes are bit-identical).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["Box", "Layout", "furnish"]


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


# --------------------------------------------------------------------------------------------------- furniture
class Layout:
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


def furnish(style: str, lay: Layout) -> None:
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
