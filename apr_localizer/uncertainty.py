"""Per-frame uncertainty: a score that ranks estimates by how likely they are wrong, calibrated into sigmas.

A *score* is computed per frame from what the inference loop already produced (higher = less trustworthy):

* ``scene_prob``: ``1 − p(scene)`` of the scene classifier;
* ``step_size``: the size of the last iAPR step, ``‖Δt‖ + rot_weight · angle(Δq)`` (m; rad weighted in m/rad). A
  refiner that still moves the estimate has not converged;
* ``apr_iapr_gap``: the distance between the APR estimate and the final refined estimate (same metric);
* ``pae_gap``: disagreement between the image latents and the pose auto-encoder's latents of the APR estimate,
  ``(‖PAE_t(p) − l_t‖ / ‖l_t‖ + ‖PAE_rot(p) − l_rot‖ / ‖l_rot‖) / 2`` (:func:`pae_gap`): an image unlike the
  training images gives latents that no pose of the scene explains. Needs the bundle's PAE (one small MLP pass).

For the estimate after ``k`` refinement steps (:meth:`Localizer.run_steps`) a score is what it would be if the loop
stopped at ``k``: ``step_size`` is the size of step ``k`` and ``apr_iapr_gap`` the distance from the APR estimate
(both NaN for ``k = 0``, the APR estimate alone); ``scene_prob`` and ``pae_gap`` do not depend on ``k``.

A :class:`Calibration` maps a score to per-axis standard deviations (position in m, orientation in rad), fitted on a
held-out validation split by :func:`fit_calibration` and stored in the model bundle's metadata. The metrics a robot
needs from a score (AUROC for "wrong", risk–coverage, coverage at a precision, fraction within k sigma) are here too,
so that training, evaluation and the node share one definition.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from . import geometry

__all__ = [
    "SCORES",
    "Calibration",
    "CalibrationError",
    "auroc",
    "coverage_at_precision",
    "fit_calibration",
    "pae_gap",
    "risk_coverage",
    "score_frame",
    "within_sigma",
]

SCORES = ("scene_prob", "step_size", "apr_iapr_gap", "pae_gap")
DEFAULT_SCORE = "step_size"  # the score reported by uncalibrated models
MAX_KNOTS = 256
MAX_SIGMA_POSITION_M = 1e4
MAX_SIGMA_ORIENTATION_RAD = 10.0
_FIELDS = ("score", "knots", "sigma_position_m", "sigma_orientation_rad", "rot_weight", "frames")


class CalibrationError(ValueError):
    """An uncertainty calibration cannot be fitted or read (one sentence)."""


def _pose_distance(a: np.ndarray, b: np.ndarray, rot_weight: float) -> float:
    dt = float(np.linalg.norm(np.asarray(a[:3], float) - np.asarray(b[:3], float)))
    dq = math.radians(float(geometry.rotation_error_deg(np.asarray(a[3:], float), np.asarray(b[3:], float))))
    return dt + rot_weight * dq


def pae_gap(
    pae_latent_t: np.ndarray, pae_latent_rot: np.ndarray, latent_t: np.ndarray, latent_rot: np.ndarray
) -> float:
    """Mean relative distance between the PAE's latents of a pose and the image latents (each ``(D,)``)."""
    gaps = []
    for a, b in ((pae_latent_t, latent_t), (pae_latent_rot, latent_rot)):
        a64, b64 = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
        gaps.append(float(np.linalg.norm(a64 - b64)) / max(float(np.linalg.norm(b64)), 1e-12))
    return 0.5 * (gaps[0] + gaps[1])


def score_frame(
    name: str, poses: Sequence[np.ndarray], confidence: float, rot_weight: float = 1.0, pae: float = math.nan
) -> float:
    """Score ``name`` of one frame from its step poses ``[APR, step 1, …, step N]`` (each ``(7,)``) and scene prob.

    ``step_size`` and ``apr_iapr_gap`` need at least one refinement step (NaN otherwise); ``pae_gap`` is passed in
    as ``pae`` (computed by :func:`pae_gap`, NaN when the model has no PAE).
    """
    if name == "scene_prob":
        return 1.0 - float(confidence)
    if name == "pae_gap":
        return float(pae)
    if name not in SCORES:
        raise CalibrationError(f"uncertainty score '{name}' is not one of {', '.join(SCORES)}")
    if len(poses) < 2:
        return math.nan
    if name == "step_size":
        return _pose_distance(poses[-1], poses[-2], rot_weight)
    return _pose_distance(poses[-1], poses[0], rot_weight)


# ------------------------------------------------------------------------------------------------ calibration
@dataclass(frozen=True)
class Calibration:
    """Piecewise-linear, non-decreasing map score → (sigma position m, sigma orientation rad), clamped at the ends."""

    score: str
    knots: tuple[float, ...]
    sigma_position_m: tuple[float, ...]
    sigma_orientation_rad: tuple[float, ...]
    rot_weight: float = 1.0
    frames: int = 0

    def __post_init__(self) -> None:
        n = len(self.knots)
        if self.score not in SCORES:
            raise CalibrationError(f"uncertainty score '{self.score}' is not one of {', '.join(SCORES)}")
        if not 1 <= n <= MAX_KNOTS or len(self.sigma_position_m) != n or len(self.sigma_orientation_rad) != n:
            raise CalibrationError(f"a calibration needs 1..{MAX_KNOTS} knots with one sigma pair each")
        arrays = (self.knots, self.sigma_position_m, self.sigma_orientation_rad, (self.rot_weight,))
        if not all(math.isfinite(v) for a in arrays for v in a):
            raise CalibrationError("calibration values must be finite")
        if any(b < a for a, b in zip(self.knots, self.knots[1:])):
            raise CalibrationError("calibration knots must be non-decreasing")
        if min(self.sigma_position_m) <= 0 or min(self.sigma_orientation_rad) <= 0:
            raise CalibrationError("calibrated sigmas must be positive")
        if (
            max(self.sigma_position_m) > MAX_SIGMA_POSITION_M
            or max(self.sigma_orientation_rad) > MAX_SIGMA_ORIENTATION_RAD
        ):
            raise CalibrationError(
                f"calibrated sigmas must be at most {MAX_SIGMA_POSITION_M:g} m and {MAX_SIGMA_ORIENTATION_RAD:g} rad"
            )
        if not 0.0 <= self.rot_weight <= 1e6 or self.frames < 0:
            raise CalibrationError("calibration rot_weight must be in [0, 1e6] and frames non-negative")

    def sigma(self, score: float) -> tuple[float, float]:
        """Sigmas ``(position m, orientation rad)`` for a score; a NaN score gets the largest sigmas."""
        if not math.isfinite(score):
            return max(self.sigma_position_m), max(self.sigma_orientation_rad)
        k = np.asarray(self.knots)
        return (
            float(np.interp(score, k, self.sigma_position_m)),
            float(np.interp(score, k, self.sigma_orientation_rad)),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        """Read a calibration from bundle metadata (validated; one-sentence :class:`CalibrationError`)."""
        if not isinstance(d, Mapping):
            raise CalibrationError("uncertainty metadata is not a JSON object")
        unknown = sorted(str(k)[:40] for k in d if k not in _FIELDS)
        if unknown:
            raise CalibrationError(f"uncertainty metadata has unknown keys {unknown[:3]} (known: {', '.join(_FIELDS)})")
        for key in ("knots", "sigma_position_m", "sigma_orientation_rad"):
            if not isinstance(d.get(key), (list, tuple)):
                raise CalibrationError(f"uncertainty metadata {key} must be a list of numbers")
        if not all(isinstance(d.get(k, 0), (int, float)) and not isinstance(d.get(k, 0), bool) for k in _FIELDS[4:]):
            raise CalibrationError("uncertainty metadata rot_weight and frames must be numbers")
        try:
            return cls(
                score=str(d["score"])[:64],
                knots=_numbers(d["knots"]),
                sigma_position_m=_numbers(d["sigma_position_m"]),
                sigma_orientation_rad=_numbers(d["sigma_orientation_rad"]),
                rot_weight=float(d.get("rot_weight", 1.0)),
                frames=int(d.get("frames", 0)),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            if isinstance(e, CalibrationError):
                raise
            raise CalibrationError(f"uncertainty metadata is malformed ({type(e).__name__}: {e})"[:200]) from None


def _numbers(values: Sequence[Any]) -> tuple[float, ...]:
    """At most ``MAX_KNOTS + 1`` floats (more fail the knot-count check); booleans and strings are refused."""
    out = []
    for v in values[: MAX_KNOTS + 1]:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise CalibrationError("uncertainty metadata lists must hold numbers only")
        out.append(float(v))
    return tuple(out)


def _isotonic(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted non-decreasing least-squares fit (pool adjacent violators)."""
    vals: list[float] = []
    wts: list[float] = []
    counts: list[int] = []
    for yi, wi in zip(y.tolist(), w.tolist()):
        vals.append(yi)
        wts.append(wi)
        counts.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            wsum = wts[-2] + wts[-1]
            v = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / wsum
            c = counts[-2] + counts[-1]
            del vals[-1], wts[-1], counts[-1]
            vals[-1], wts[-1], counts[-1] = v, wsum, c
    return np.repeat(vals, counts)


def fit_calibration(
    score: str,
    scores: np.ndarray,
    position_error_m: np.ndarray,
    orientation_error_rad: np.ndarray,
    bins: int = 10,
    rot_weight: float = 1.0,
    min_sigma_position_m: float = 0.01,
    min_sigma_orientation_rad: float = math.radians(0.5),
    ceiling: tuple[float, float, float] | None = None,
) -> Calibration:
    """Fit score → per-axis sigma on held-out frames (equal-count score bins, isotonic in the score).

    In a bin, an isotropic 3-D Gaussian error with per-axis sigma has ``E‖e‖² = 3σ²``, so ``σ = sqrt(mean(e²)/3)``
    for the position error (m) and for the rotation angle (rad, as a rotation vector). Frames with a NaN score are
    left out. Scores beyond the validation range are clamped to the last bin's sigmas, unless ``ceiling``
    ``(score, sigma position m, sigma orientation rad)`` names the sigmas of a frame that carries no information
    (e.g. the room size): it becomes the last knot (when above the fitted ones), so out-of-distribution scores grow
    towards it.
    """
    s = np.asarray(scores, float).reshape(-1)
    ep = np.asarray(position_error_m, float).reshape(-1)
    eo = np.asarray(orientation_error_rad, float).reshape(-1)
    if not len(s) == len(ep) == len(eo):
        raise CalibrationError("scores and errors must have one value per frame")
    ok = np.isfinite(s) & np.isfinite(ep) & np.isfinite(eo)
    s, ep, eo = s[ok], ep[ok], eo[ok]
    if len(s) < 2 * bins or bins < 1:
        raise CalibrationError(f"calibration needs at least {2 * max(bins, 1)} frames with finite scores, got {len(s)}")
    order = np.argsort(s, kind="stable")
    s, ep, eo = s[order], ep[order], eo[order]
    groups = np.array_split(np.arange(len(s)), bins)
    w = np.array([len(g) for g in groups], float)
    knots = np.array([np.median(s[g]) for g in groups])
    sp = np.sqrt(np.array([np.mean(ep[g] ** 2) for g in groups]) / 3.0)
    so = np.sqrt(np.array([np.mean(eo[g] ** 2) for g in groups]) / 3.0)
    sp = np.maximum(_isotonic(sp, w), min_sigma_position_m)
    so = np.maximum(_isotonic(so, w), min_sigma_orientation_rad)
    if ceiling is not None and ceiling[0] > knots[-1]:
        knots = np.r_[knots, ceiling[0]]
        sp, so = np.r_[sp, max(ceiling[1], sp[-1])], np.r_[so, max(ceiling[2], so[-1])]
    return Calibration(
        score,
        tuple(float(v) for v in knots),
        tuple(float(v) for v in sp),
        tuple(float(v) for v in so),
        rot_weight,
        int(len(s)),
    )


# ------------------------------------------------------------------------------------------------ metrics
def auroc(scores: np.ndarray, wrong: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for detecting ``wrong`` frames (ties count one half; NaN if one class)."""
    s = np.asarray(scores, float).reshape(-1)
    y = np.asarray(wrong, bool).reshape(-1)
    s = np.where(np.isfinite(s), s, np.inf)  # no score = least trusted
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="stable")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def risk_coverage(scores: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage and risk (fraction not ok) when publishing the most confident frames first.

    Returns ``(coverage, risk)`` at every distinct score threshold (frames with equal scores enter together).
    """
    s = np.asarray(scores, float).reshape(-1)
    good = np.asarray(ok, bool).reshape(-1)
    s = np.where(np.isfinite(s), s, np.inf)
    order = np.argsort(s, kind="stable")
    s, good = s[order], good[order]
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True]) + 1  # end index of each tie group
    n_ok = np.cumsum(good)[ends - 1]
    coverage = ends / len(s)
    risk = 1.0 - n_ok / ends
    return coverage, risk


def coverage_at_precision(scores: np.ndarray, ok: np.ndarray, precision: float = 0.95) -> float:
    """Largest fraction of frames that can be published, most confident first, with ≥ ``precision`` of them ok."""
    if len(np.asarray(scores).reshape(-1)) == 0:
        return 0.0
    coverage, risk = risk_coverage(scores, ok)
    good = coverage[(1.0 - risk) >= precision - 1e-12]
    return float(good.max()) if len(good) else 0.0


def within_sigma(errors: np.ndarray, sigmas: np.ndarray, k: float = 1.0) -> float:
    """Fraction of per-axis errors with ``|e| ≤ k·σ`` (``errors`` ``(N,A)``, ``sigmas`` ``(N,)`` or ``(N,A)``)."""
    e = np.abs(np.asarray(errors, float))
    sg = np.asarray(sigmas, float)
    if sg.ndim == 1 and e.ndim == 2:
        sg = sg[:, None]
    return float(np.mean(e <= k * sg)) if e.size else math.nan
