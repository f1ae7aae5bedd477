"""What a robot needs from an estimate: hint success, an uncertainty that ranks and bounds the error, risk–coverage.

Per method (one estimate per frame, its uncertainty score and, for a calibrated model, per-axis sigmas):

* **hint success**: ``within_0_5m_10deg`` = fraction of frames with position error ≤ 0.5 m **and** orientation error
  ≤ 10°; ``within_1_5m`` = fraction with position error ≤ 1.5 m (the search window of cuVSLAM's localizer);
* **uncertainty**: ``auroc`` of the score for detecting a *wrong* frame (error > 0.5 m or > 10°);
  ``coverage_at_95_precision`` = the largest fraction of frames that can be published, most confident (lowest score)
  first, while ≥ 95 % of them are *ok* (within 1 m and 15°); ``within_1sigma`` / ``within_2sigma`` = the fraction
  of all per-axis errors within 1σ / 2σ (null without a calibration);
* **risk–coverage**: publishing the most confident ``c`` % of frames (c = 10..100), the median errors and the
  fraction ok of the published frames.

Per-axis errors (one definition, :func:`axis_errors`): position ``x̂ − x`` per map axis (m) against ``σ_p``;
orientation as the rotation vector (rad) of the error rotation ``q̂ ⊗ q⁻¹`` (expressed in the map frame, as a ROS
pose covariance is), its three components against ``σ_o``. A frame's six axes all count; an invalid (non-finite)
estimate is wrong, not ok and outside every sigma. A NaN score counts as the least trusted. Every frame counts in
every fraction (denominator = all frames). The metric functions are :mod:`apr_localizer.uncertainty`'s; the
thresholds and the tables are :mod:`.metrics`' (which holds every report field and its formatting).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from apr_localizer import geometry, uncertainty

from . import metrics

__all__ = [
    "AXES",
    "COVERAGES",
    "FrameUncertainty",
    "RobotMetrics",
    "axis_errors",
    "candidates_summary",
    "robot_metrics",
    "risk_coverage_table",
]

HINT_M, HINT_DEG = metrics.HINT_M, metrics.HINT_DEG  # "wrong" outside these (AUROC); hint success inside
WINDOW_M = metrics.WINDOW_M  # cuVSLAM localizer search window
OK_M, OK_DEG = metrics.OK_M, metrics.OK_DEG  # an "ok" published frame (coverage at 95 % precision, risk–coverage)
PRECISION = metrics.PRECISION
COVERAGES = metrics.COVERAGES
AXES = ("x", "y", "z", "rx", "ry", "rz")


@dataclass(frozen=True)
class FrameUncertainty:
    """Per-frame uncertainty of one method: score ``(N,)`` (higher = less trusted) and sigmas ``(N,)`` or None."""

    score_name: str
    scores: np.ndarray
    sigma_position_m: np.ndarray | None = None
    sigma_orientation_rad: np.ndarray | None = None


@dataclass
class RobotMetrics:
    """Hint success, uncertainty summary and risk–coverage rows of one method (JSON-ready dicts)."""

    hint: dict[str, float]
    uncertainty: dict[str, Any]
    risk_coverage: list[dict[str, float]]
    curve: tuple[np.ndarray, np.ndarray] | None = None  # (coverage, risk) at every distinct score, for the plot


def axis_errors(est_poses: np.ndarray, gt_poses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis errors ``(position (N,3) m, rotation vector (N,3) rad)`` of ``(N,7)`` estimates (NaN if invalid)."""
    est = np.asarray(est_poses, np.float64).reshape(-1, 7)
    gt = np.asarray(gt_poses, np.float64).reshape(-1, 7)
    valid = metrics.valid_poses(est)
    pos = np.full((len(est), 3), np.nan)
    rot = np.full((len(est), 3), np.nan)
    if valid.any():
        pos[valid] = est[valid, :3] - gt[valid, :3]
        qe = geometry.quat_normalize(est[valid, 3:], canonical=False)
        qg = geometry.quat_normalize(gt[valid, 3:], canonical=False)
        rot[valid] = geometry.quat_to_rotvec(geometry.quat_multiply(qe, geometry.quat_conjugate(qg)))
    return pos, rot


def _order(scores: np.ndarray) -> np.ndarray:
    """Most confident first (lowest score; NaN last; ties in frame order)."""
    s = np.asarray(scores, float)
    return np.argsort(np.where(np.isfinite(s), s, np.inf), kind="stable")


def risk_coverage_table(
    scores: np.ndarray, pos_err: np.ndarray, rot_err_deg: np.ndarray, ok: np.ndarray
) -> list[dict[str, float]]:
    """Publish the ``ceil(c·N)`` most confident frames for ``c`` in :data:`COVERAGES`: medians and fraction ok."""
    n = len(ok)
    rows: list[dict[str, float]] = []
    if n == 0:
        return rows
    order = _order(scores)
    for c in COVERAGES:
        m = max(1, math.ceil(c * n - 1e-9))
        sel = order[:m]
        p, r = pos_err[sel], rot_err_deg[sel]
        rows.append(
            {
                "coverage": c,
                "frames": int(m),
                "median_position_m": float(np.median(p[np.isfinite(p)])) if np.isfinite(p).any() else math.nan,
                "median_orientation_deg": float(np.median(r[np.isfinite(r)])) if np.isfinite(r).any() else math.nan,
                "ok_fraction": float(np.mean(ok[sel])),
            }
        )
    return rows


def _within(errors: np.ndarray, sigmas: np.ndarray, k: float) -> tuple[float, dict[str, float]]:
    """Fraction of all ``(N,6)`` axis errors within ``k`` sigma, and per axis (NaN errors are outside)."""
    e = np.where(np.isfinite(errors), errors, np.inf)
    per_axis = {a: uncertainty.within_sigma(e[:, i], sigmas[:, i], k) for i, a in enumerate(AXES)}
    return uncertainty.within_sigma(e, sigmas, k), per_axis


def robot_metrics(est_poses: np.ndarray, gt_poses: np.ndarray, unc: FrameUncertainty | None) -> RobotMetrics:
    """Hint success, uncertainty (AUROC, coverage at 95 % precision, within 1σ/2σ) and risk–coverage of one method."""
    pos, rot, valid = metrics.frame_errors(est_poses, gt_poses)
    n = len(pos)
    p, r = np.nan_to_num(pos, nan=np.inf), np.nan_to_num(rot, nan=np.inf)
    good = valid & (p <= HINT_M) & (r <= HINT_DEG)
    ok = valid & (p <= OK_M) & (r <= OK_DEG)
    hint = {
        "within_0_5m_10deg": float(good.mean()) if n else math.nan,
        "within_1_5m": float((valid & (p <= WINDOW_M)).mean()) if n else math.nan,
    }
    unc_out: dict[str, Any] = {
        "score": unc.score_name if unc is not None else None,
        "calibrated": bool(unc is not None and unc.sigma_position_m is not None),
        "frames_scored": 0,
        "auroc": None,
        "coverage_at_95_precision": None,
        "within_1sigma": None,
        "within_2sigma": None,
    }
    if unc is None:
        return RobotMetrics(hint, unc_out, [])
    s = np.asarray(unc.scores, float).reshape(-1)
    if len(s) != n:
        raise ValueError(f"{len(s)} uncertainty scores for {n} frames; expected one per frame")
    scored = int(np.isfinite(s).sum())
    unc_out["frames_scored"] = scored
    rows: list[dict[str, float]] = []
    curve = None
    if scored:
        unc_out["auroc"] = uncertainty.auroc(s, ~good)
        unc_out["coverage_at_95_precision"] = uncertainty.coverage_at_precision(s, ok, PRECISION)
        rows = risk_coverage_table(s, pos, rot, ok)
        curve = uncertainty.risk_coverage(s, ok)
    if unc.sigma_position_m is not None and unc.sigma_orientation_rad is not None and n:
        ep, er = axis_errors(est_poses, gt_poses)
        sp = np.repeat(np.asarray(unc.sigma_position_m, float).reshape(-1, 1), 3, axis=1)
        so = np.repeat(np.asarray(unc.sigma_orientation_rad, float).reshape(-1, 1), 3, axis=1)
        errors, sigmas = np.concatenate([ep, er], axis=1), np.concatenate([sp, so], axis=1)
        for k, key in ((1.0, "within_1sigma"), (2.0, "within_2sigma")):
            unc_out[key], unc_out[f"{key}_axes"] = _within(errors, sigmas, k)
    return RobotMetrics(hint, unc_out, rows, curve)


def candidates_summary(
    names: Sequence[str], per_method: Mapping[str, list[dict[str, Any]]], cost_ms: Mapping[str, float]
) -> list[dict[str, Any]]:
    """``uncertainty_candidates`` rows: per candidate score its cost per frame and per-method AUROC/coverage."""
    return [{"score": n, "cost_ms_per_frame": cost_ms.get(n, math.nan), "methods": per_method[n]} for n in names]
