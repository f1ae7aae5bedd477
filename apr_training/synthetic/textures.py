"""Procedural surface textures of the synthetic scenes: a style's colour palette, ten texture kinds, posters.

Every generator takes ``(rng, palette, th, tw, texels_per_metre)`` and returns a ``(th, tw, 3)`` float32 texture;
:data:`TEXTURES` maps the kind names of the scene styles to them. Split out of :mod:`.scenes` unchanged (the random
draws happen in the same order, so scenes are bit-identical).
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["TEXTURES", "Palette", "add_posters"]


class Palette:
    def __init__(self, style: Any, rng: np.random.Generator):  # style: scenes._Style
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


TEXTURES: dict[str, Callable] = {
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


def add_posters(
    img: np.ndarray, rng: np.random.Generator, pal: Palette, res: float, count: int, v_range: tuple[float, float]
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
