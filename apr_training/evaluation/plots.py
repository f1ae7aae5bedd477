"""Evaluation plots (matplotlib, Agg, PNG): error CDFs, top-down trajectories, errors over frame index, risk–coverage.

Every function takes plain numpy arrays, writes one PNG and returns its path. Figures are built with
``matplotlib.figure.Figure`` (Agg canvas) rather than pyplot: no global backend switch, no display needed, nothing
kept alive after saving, safe in threads. Errors come from :func:`.metrics.frame_errors`; invalid (NaN) errors are
left out of the curves and counted in the legend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from apr_localizer.fileio import atomic_path

__all__ = [
    "PLANES",
    "plot_error_cdf",
    "plot_errors_over_frames",
    "plot_latency",
    "plot_risk_coverage",
    "plot_trajectory",
    "resolve_plane",
]

PLANES = {"xy": (0, 1), "xz": (0, 2), "yz": (1, 2)}
_AXIS = "xyz"
_DPI = 120


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=_DPI, format=path.suffix.lstrip(".") or "png")
    return path


def _finite(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    return v[np.isfinite(v)]


def plot_error_cdf(
    errors: Mapping[str, tuple[Sequence[float] | np.ndarray, Sequence[float] | np.ndarray]],
    path: str | Path,
    title: str = "",
    thresholds: Sequence[tuple[float, float]] = (),
) -> Path:
    """Cumulative distribution of position (m) and orientation (°) errors, one line per method.

    Args:
        errors: method name → ``(position errors (N,), orientation errors (N,))``; NaN = invalid estimate.
        path: output PNG.
        title: figure title.
        thresholds: ``(metres, degrees)`` pairs drawn as dotted vertical lines.

    The y axis is the fraction of **all** frames (invalid estimates never reach the curve's top).

    """
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for (label, unit), idx, ax in zip((("Position error", "m"), ("Orientation error", "°")), (0, 1), axes):
        upper = 0.0
        for name, errs in errors.items():
            raw = np.asarray(errs[idx], dtype=np.float64).reshape(-1)
            v = np.sort(_finite(raw))
            n_bad = len(raw) - len(v)
            if not len(raw):
                continue
            y = np.arange(1, len(v) + 1) / len(raw)
            legend = name + (f" ({n_bad} invalid)" if n_bad else "")
            ax.step(np.concatenate([[0.0], v]), np.concatenate([[0.0], y]), where="post", label=legend)
            if len(v):
                upper = max(upper, float(np.percentile(v, 99)))
        for th in thresholds:
            ax.axvline(th[idx], color="0.6", linestyle=":", linewidth=0.8)
        ax.set_xlim(0.0, upper * 1.05 if upper > 0 else 1.0)
        ax.set_ylim(0.0, 1.0)
        ax.set_xlabel(f"{label} ({unit})")
        ax.set_ylabel("Fraction of frames")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def resolve_plane(gt_positions, plane: str = "xy") -> tuple[int, int]:
    """Axis indices of a top-down plane: ``"xy"``, ``"xz"``, ``"yz"`` or ``"auto"`` (the two widest GT axes)."""
    if plane == "auto":
        p = np.asarray(gt_positions, dtype=np.float64).reshape(-1, 3)
        spread = np.ptp(p, axis=0) if len(p) else np.zeros(3)
        a, b = sorted(np.argsort(-spread, kind="stable")[:2].tolist())
        return a, b
    if plane not in PLANES:
        raise ValueError(f"plane {plane!r} is not one of auto, {', '.join(PLANES)}")
    return PLANES[plane]


def plot_trajectory(
    gt_poses,
    estimates: Mapping[str, np.ndarray],
    path: str | Path,
    title: str = "",
    plane: str = "xy",
    groups: Sequence[str] | None = None,
) -> Path:
    """Top-down view of the ground-truth trajectory and estimates (positions only).

    Args:
        gt_poses: ``(N, 7)`` (or ``(N, 3)``) ground truth in frame order.
        estimates: method name → ``(N, 7)`` estimates of the same frames (NaN rows are skipped).
        path: output PNG.
        title: figure title.
        plane: ``"xy"`` (default), ``"xz"``, ``"yz"`` or ``"auto"`` (see :func:`resolve_plane`).
        groups: ``(N,)`` sequence label per frame: the ground-truth line is broken between sequences.

    Estimates are drawn as dots with thin grey lines to their ground-truth positions, so outliers are visible.

    """
    gt = np.asarray(gt_poses, dtype=np.float64)[:, :3]
    a, b = resolve_plane(gt, plane)
    fig = Figure(figsize=(6.4, 6.0))
    ax = fig.subplots()
    labels = np.asarray(["" for _ in range(len(gt))] if groups is None else [str(g) for g in groups], dtype=object)
    for j, grp in enumerate(dict.fromkeys(labels.tolist())):
        m = labels == grp
        ax.plot(gt[m, a], gt[m, b], "-", color="k", linewidth=1.4, label="ground truth" if j == 0 else None, zorder=3)
        ax.plot(gt[m, a][:1], gt[m, b][:1], "o", color="k", markersize=5, zorder=4)  # start of each sequence
    markers = ["o", "s", "^", "D", "v", "P"]
    for i, (name, est) in enumerate(estimates.items()):
        e = np.asarray(est, dtype=np.float64)[:, :3]
        ok = np.all(np.isfinite(e), axis=1)
        if i == 0 and ok.any():  # error segments for the first (reference) method only, to keep it readable
            segments = np.stack([gt[ok][:, [a, b]], e[ok][:, [a, b]]], axis=1)  # (M, 2 points, 2 coordinates)
            ax.add_collection(LineCollection(list(segments), colors="0.75", linewidths=0.5, zorder=1))
        size = 3.0 if len(e) <= 1000 else 1.5
        ax.plot(e[ok, a], e[ok, b], markers[i % len(markers)], markersize=size, alpha=0.8, label=name, zorder=2)
    ax.set_xlabel(f"{_AXIS[a]} (m)")
    ax.set_ylabel(f"{_AXIS[b]} (m)")
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title or "Trajectory (top-down)")
    return _save(fig, path)


def plot_errors_over_frames(
    errors: Mapping[str, tuple[Sequence[float] | np.ndarray, Sequence[float] | np.ndarray]],
    path: str | Path,
    title: str = "",
    frame_index: Sequence[float] | None = None,
) -> Path:
    """Position and orientation error against the frame index, one line per method (NaN = gap).

    ``frame_index`` gives the x values (e.g. the CSV row of every frame); default ``0..N-1``.
    """
    fig = Figure(figsize=(10, 5.6))
    axes = fig.subplots(2, 1, sharex=True)
    for name, (pos, rot) in errors.items():
        pos = np.asarray(pos, dtype=np.float64).reshape(-1)
        rot = np.asarray(rot, dtype=np.float64).reshape(-1)
        x = np.arange(len(pos)) if frame_index is None else np.asarray(frame_index, dtype=np.float64)
        style = {"linewidth": 0.9, "marker": "." if len(pos) <= 300 else None, "markersize": 4, "label": name}
        axes[0].plot(x, pos, **style)
        axes[1].plot(x, rot, **style)
    axes[0].set_ylabel("Position error (m)")
    axes[1].set_ylabel("Orientation error (°)")
    axes[1].set_xlabel("Frame index" if frame_index is None else "Frame (label CSV row)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0.0)
    axes[0].legend(loc="upper right", fontsize=8)
    if title:
        axes[0].set_title(title)
    return _save(fig, path)


def plot_latency(latency_ms, frame_index, path: str | Path, title: str) -> Path:
    """Histogram of the end-to-end latency and the latency over the image index (one PNG)."""
    lat = np.asarray(latency_ms, dtype=np.float64)
    fig = Figure(figsize=(11, 4.2))
    ax0, ax1 = fig.subplots(1, 2)
    finite = lat[np.isfinite(lat)]
    if len(finite):
        ax0.hist(finite, bins=min(50, max(5, len(finite) // 3)), color="tab:blue", alpha=0.8)
        for pct, style in ((50, "-"), (90, "--"), (99, ":")):
            v = float(np.percentile(finite, pct))
            ax0.axvline(v, color="k", linestyle=style, linewidth=0.9, label=f"p{pct} {v:.1f} ms")
        ax0.legend(fontsize=8)
    ax0.set_xlabel("End-to-end latency (ms)")
    ax0.set_ylabel("Frames")
    ax0.grid(True, alpha=0.3)
    ax1.plot(frame_index, lat, ".-", linewidth=0.8, markersize=3)
    ax1.set_xlabel("Image index in the bag")
    ax1.set_ylabel("End-to-end latency (ms)")
    ax1.set_ylim(bottom=0.0)
    ax1.grid(True, alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def plot_risk_coverage(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "", precision: float = 0.95
) -> Path:
    """Risk (fraction of published frames not ok) against coverage, most confident frames first; one line per method.

    ``curves`` maps a method name (with its score) to ``(coverage (M,), risk (M,))`` from
    :func:`apr_localizer.uncertainty.risk_coverage`; the dotted line is the risk allowed at ``precision``.
    """
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.subplots()
    for name, (coverage, risk) in curves.items():
        ax.step(np.r_[0.0, coverage], np.r_[risk[:1] if len(risk) else [0.0], risk], where="post", label=name)
    ax.axhline(1.0 - precision, color="0.5", linestyle=":", linewidth=0.9, label=f"{100 * (1 - precision):.0f}% risk")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("Coverage (fraction of frames published, most confident first)")
    ax.set_ylabel("Risk (fraction of published frames not ok)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title or "Risk–coverage")
    return _save(fig, path)
