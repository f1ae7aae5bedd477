"""Pose-estimation metrics, reports (text / Markdown / JSON) and TUM trajectory files; pure numpy.

Errors use :mod:`apr_localizer.geometry` only (model_spec.md §5): position error ``‖x_est − x_gt‖₂`` in metres and
orientation error ``2·acos(|⟨q̂_est, q̂_gt⟩|)`` in degrees, with the dot product clamped so that it is never NaN.

Unlike the upstream evaluation (``nanmedian``, which silently drops NaN frames), an estimate with a non-finite value
or a zero quaternion is **counted** (``n_invalid``): it is excluded from the medians and means (which are over the
valid estimates) and counts as a miss in every threshold fraction (whose denominator is all frames).

::

    rep = per_scene_metrics(est, gt, scenes, pred_scenes, latency_ms={"total": t}, name="MS-Transformer")
    report = EvalReport([rep, rep_iapr], info={...})
    print(format_text(report)); Path("report.md").write_text(format_markdown(report)); report.write_json("r.json")
    write_tum("chess_gt.txt", timestamps, gt_poses)          # "timestamp tx ty tz qx qy qz qw" (ROS order)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apr_localizer import geometry
from apr_localizer.fileio import atomic_write_text

__all__ = [
    "DEFAULT_THRESHOLDS",
    "EvalReport",
    "MethodReport",
    "SceneMetrics",
    "TUM_HEADER",
    "format_candidates",
    "format_markdown",
    "format_robot",
    "format_text",
    "frame_errors",
    "latency_stats",
    "per_scene_metrics",
    "read_tum",
    "render_table",
    "threshold_label",
    "valid_poses",
    "write_tum",
]

#: What a robot needs (:mod:`.robot`): a frame is "wrong" beyond HINT_M or HINT_DEG (AUROC; hint success within
#: both), within WINDOW_M (cuVSLAM's localizer search window), "ok" within OK_M and OK_DEG (coverage at PRECISION,
#: risk–coverage at COVERAGES).
HINT_M, HINT_DEG, WINDOW_M, OK_M, OK_DEG, PRECISION = 0.5, 10.0, 1.5, 1.0, 15.0, 0.95
COVERAGES: tuple[float, ...] = tuple(c / 10 for c in range(1, 11))
#: (metres, degrees) pairs; a frame is "within" a pair when both errors are at most the bounds.
DEFAULT_THRESHOLDS: tuple[tuple[float, float], ...] = ((0.1, 1.0), (0.25, 2.0), (0.5, 5.0), (5.0, 10.0))
TUM_HEADER = "# timestamp tx ty tz qx qy qz qw"
_QUAT_EPS = 1e-12
ALL_SCENES = "all"


def threshold_label(metres: float, degrees: float) -> str:
    """Key of a threshold pair in reports, e.g. ``"0.25m/2deg"``."""
    return f"{metres:g}m/{degrees:g}deg"


# ------------------------------------------------------------------------------------------------- per frame
def valid_poses(poses: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: the pose ``(N, 7)`` is finite and its quaternion is non-zero."""
    p = np.asarray(poses, dtype=np.float64).reshape(-1, 7)
    finite = np.all(np.isfinite(p), axis=1)
    qn = np.linalg.norm(np.where(np.isfinite(p[:, 3:]), p[:, 3:], 0.0), axis=1)
    return finite & (qn >= _QUAT_EPS)


def frame_errors(est_poses, gt_poses) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame ``(position error m, orientation error deg, valid)``, each ``(N,)``.

    ``est_poses``/``gt_poses`` are ``(N, 7)`` ``[x, y, z, qw, qx, qy, qz]`` (quaternions need not be unit). Invalid
    estimates (non-finite or zero quaternion) get NaN errors and ``valid = False``. Invalid ground truth raises
    ``ValueError``.
    """
    est = np.asarray(est_poses, dtype=np.float64).reshape(-1, 7)
    gt = np.asarray(gt_poses, dtype=np.float64).reshape(-1, 7)
    if est.shape != gt.shape:
        raise ValueError(f"estimates {est.shape} and ground truth {gt.shape} must have the same (N, 7) shape")
    bad_gt = ~valid_poses(gt)
    if bad_gt.any():
        raise ValueError(
            f"ground-truth pose {int(np.flatnonzero(bad_gt)[0])} is non-finite or has a zero quaternion; "
            "expected valid ground truth for every frame"
        )
    valid = valid_poses(est)
    pos = np.full(len(est), np.nan)
    rot = np.full(len(est), np.nan)
    if valid.any():
        pos[valid], rot[valid] = geometry.pose_errors(est[valid], gt[valid])
    return pos, rot, valid


def latency_stats(values_ms) -> dict[str, float]:
    """``{n, mean, median, p90, p99, max}`` in ms over the finite values (NaN statistics when there are none)."""
    v = np.asarray(values_ms, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"n": 0, "mean": math.nan, "median": math.nan, "p90": math.nan, "p99": math.nan, "max": math.nan}
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {
        "n": int(len(v)),
        "mean": float(v.mean()),
        "median": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": float(v.max()),
    }


# ------------------------------------------------------------------------------------------------- reports
@dataclass
class SceneMetrics:
    """Accuracy (and optional latency) of one method on one scene, or on all frames (``scene == "all"``).

    Medians and means are over the ``n - n_invalid`` valid estimates (NaN when there are none); ``within`` maps
    :func:`threshold_label` keys to the fraction of **all** ``n`` frames inside both bounds; ``scene_accuracy`` is
    the fraction of frames whose predicted scene is the true one (``None`` without predictions); ``latency_ms`` maps
    a stage name to :func:`latency_stats`.
    """

    scene: str
    n: int
    n_invalid: int
    median_position_m: float
    median_orientation_deg: float
    mean_position_m: float
    mean_orientation_deg: float
    within: dict[str, float]
    scene_accuracy: float | None = None
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scene": self.scene,
            "n": self.n,
            "n_invalid": self.n_invalid,
            "median_position_m": self.median_position_m,
            "median_orientation_deg": self.median_orientation_deg,
            "mean_position_m": self.mean_position_m,
            "mean_orientation_deg": self.mean_orientation_deg,
            "within": dict(self.within),
            "scene_accuracy": self.scene_accuracy,
            "latency_ms": {k: dict(v) for k, v in self.latency_ms.items()},
        }


@dataclass
class MethodReport:
    """One method (e.g. "MS-Transformer", "+ iAPR (3 it.)") over a test set: per-scene and pooled metrics."""

    name: str
    scenes: list[SceneMetrics]
    overall: SceneMetrics
    thresholds: tuple[tuple[float, float], ...] = DEFAULT_THRESHOLDS
    hint: dict[str, float] | None = None  # robot.robot_metrics: hint success (added by the evaluators)
    uncertainty: dict[str, Any] | None = None  # robot.robot_metrics: AUROC, coverage, within kσ
    risk_coverage: list[dict[str, float]] = field(default_factory=list)

    @property
    def mean_of_medians(self) -> tuple[float, float]:
        """``(metres, degrees)``: the mean over scenes of the per-scene medians (the papers' "average" row)."""
        pos = [s.median_position_m for s in self.scenes if math.isfinite(s.median_position_m)]
        rot = [s.median_orientation_deg for s in self.scenes if math.isfinite(s.median_orientation_deg)]
        return (float(np.mean(pos)) if pos else math.nan, float(np.mean(rot)) if rot else math.nan)

    def scene(self, name: str) -> SceneMetrics:
        """Metrics of scene ``name`` (``"all"`` gives :attr:`overall`)."""
        if name == ALL_SCENES:
            return self.overall
        for s in self.scenes:
            if s.scene == name:
                return s
        raise KeyError(f"method {self.name!r} has no scene {name!r}; scenes: {[s.scene for s in self.scenes]}")

    def to_dict(self) -> dict[str, Any]:
        pos, rot = self.mean_of_medians
        out: dict[str, Any] = {
            "name": self.name,
            "thresholds": [{"key": threshold_label(m, d), "m": m, "deg": d} for m, d in self.thresholds],
            "mean_of_medians": {"position_m": pos, "orientation_deg": rot},
        }
        if self.hint is not None:
            out.update(hint=dict(self.hint), uncertainty=dict(self.uncertainty or {}))
            out["risk_coverage"] = [dict(r) for r in self.risk_coverage]
        out.update(overall=self.overall.to_dict(), scenes=[s.to_dict() for s in self.scenes])
        return out


def _scene_metrics(
    scene: str,
    pos: np.ndarray,
    rot: np.ndarray,
    valid: np.ndarray,
    correct: np.ndarray | None,
    latency: Mapping[str, np.ndarray],
    thresholds: Sequence[tuple[float, float]],
) -> SceneMetrics:
    n = len(pos)
    vp, vr = pos[valid], rot[valid]
    within = {}
    for m, d in thresholds:
        hit = valid & (np.nan_to_num(pos, nan=np.inf) <= m) & (np.nan_to_num(rot, nan=np.inf) <= d)
        within[threshold_label(m, d)] = float(hit.mean()) if n else math.nan
    return SceneMetrics(
        scene=scene,
        n=int(n),
        n_invalid=int(n - valid.sum()),
        median_position_m=float(np.median(vp)) if len(vp) else math.nan,
        median_orientation_deg=float(np.median(vr)) if len(vr) else math.nan,
        mean_position_m=float(np.mean(vp)) if len(vp) else math.nan,
        mean_orientation_deg=float(np.mean(vr)) if len(vr) else math.nan,
        within=within,
        scene_accuracy=None if correct is None else (float(correct.mean()) if n else math.nan),
        latency_ms={stage: latency_stats(v) for stage, v in latency.items()},
    )


def per_scene_metrics(
    est_poses,
    gt_poses,
    scenes: Sequence[str],
    pred_scenes: Sequence[str] | None = None,
    latency_ms: Mapping[str, Sequence[float] | np.ndarray] | None = None,
    *,
    name: str = "estimate",
    thresholds: Sequence[tuple[float, float]] = DEFAULT_THRESHOLDS,
    scene_order: Sequence[str] | None = None,
) -> MethodReport:
    """Per-scene and pooled accuracy of one method.

    Args:
        est_poses: ``(N, 7)`` estimates ``[x, y, z, qw, qx, qy, qz]`` (may contain non-finite rows).
        gt_poses: ``(N, 7)`` ground truth (must be valid).
        scenes: ``(N,)`` true scene name of every frame.
        pred_scenes: ``(N,)`` predicted scene names, for the scene-classification accuracy.
        latency_ms: stage name → ``(N,)`` per-frame times in ms (median/p90/p99 per scene and overall).
        name: the method's name in reports.
        thresholds: ``(metres, degrees)`` pairs for the "within" fractions.
        scene_order: order of the scenes in the report (e.g. the model's scene names); scenes without frames are
            left out. Default: order of first appearance.

    """
    pos, rot, valid = frame_errors(est_poses, gt_poses)
    n = len(pos)
    scene_arr = np.asarray([str(s) for s in scenes], dtype=object)
    if len(scene_arr) != n:
        raise ValueError(f"scenes has {len(scene_arr)} entries for {n} poses; expected one scene name per frame")
    correct = None
    if pred_scenes is not None:
        pred = np.asarray([str(s) for s in pred_scenes], dtype=object)
        if len(pred) != n:
            raise ValueError(f"pred_scenes has {len(pred)} entries for {n} poses; expected one per frame")
        correct = pred == scene_arr
    latency = {}
    for stage, values in (latency_ms or {}).items():
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if len(v) != n:
            raise ValueError(f"latency_ms[{stage!r}] has {len(v)} values for {n} poses; expected one per frame")
        latency[stage] = v
    present = list(dict.fromkeys(scene_arr.tolist()))
    order = [s for s in scene_order if s in present] if scene_order is not None else []
    order += [s for s in present if s not in order]
    per_scene = []
    for s in order:
        m = scene_arr == s
        per_scene.append(
            _scene_metrics(
                s,
                pos[m],
                rot[m],
                valid[m],
                None if correct is None else correct[m],
                {k: v[m] for k, v in latency.items()},
                thresholds,
            )
        )
    overall = _scene_metrics(ALL_SCENES, pos, rot, valid, correct, latency, thresholds)
    return MethodReport(name, per_scene, overall, tuple((float(m), float(d)) for m, d in thresholds))


@dataclass
class EvalReport:
    """Several methods evaluated on the same frames (e.g. MS-Transformer alone and + iAPR with 1..N iterations)."""

    methods: list[MethodReport]
    info: dict[str, Any] = field(default_factory=dict)
    candidates: list[dict[str, Any]] = field(default_factory=list)  # robot.candidates_summary rows (apr-eval --scores)

    def method(self, name: str) -> MethodReport:
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(f"no method {name!r} in the report; methods: {[m.name for m in self.methods]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; NaN and infinities become ``null``."""
        out: dict[str, Any] = {"info": self.info, "methods": [m.to_dict() for m in self.methods]}
        if self.candidates:
            out["uncertainty_candidates"] = self.candidates
        return _json_safe(out)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_text(path, self.to_json() + "\n")
        return path


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ------------------------------------------------------------------------------------------------- formatting
def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False) -> str:
    """Aligned plain-text table (first column left-aligned, the others right-aligned) or a Markdown table."""
    rows = [[str(c) for c in r] for r in rows]
    if markdown:
        esc = [[c.replace("|", "\\|") for c in r] for r in [list(headers), *rows]]
        lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(headers) - 1)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
        return "\n".join(lines)
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(list(headers)), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]).rstrip()


def _m(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.3f}"


def _deg(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.2f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else ("n/a" if not math.isfinite(v) else f"{100 * v:.1f}%")


def _ms(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.1f}"


def _cell(pos: float, rot: float) -> str:
    return f"{_m(pos)} m / {_deg(rot)}°"


def _comparison(report: EvalReport, markdown: bool) -> str:
    """Paper-style table: one row per scene, one column per method, median errors; mean-of-medians row."""
    methods = report.methods
    scenes = list(dict.fromkeys(s.scene for m in methods for s in m.scenes))
    headers = ["Scene", "Frames", *(m.name for m in methods)]
    rows = []
    for sc in scenes:
        cells, n = [], ""
        for m in methods:
            try:
                s = m.scene(sc)
            except KeyError:
                cells.append("-")
                continue
            n = str(s.n)
            extra = f" ({s.n_invalid} invalid)" if s.n_invalid else ""
            cells.append(_cell(s.median_position_m, s.median_orientation_deg) + extra)
        rows.append([sc, n, *cells])
    rows.append(["Average (mean of medians)", "", *(_cell(*m.mean_of_medians) for m in methods)])
    rows.append(
        [
            "All frames (median)",
            str(methods[0].overall.n) if methods else "",
            *(_cell(m.overall.median_position_m, m.overall.median_orientation_deg) for m in methods),
        ]
    )
    return render_table(headers, rows, markdown)


def _details(method: MethodReport, markdown: bool) -> str:
    th = [threshold_label(m, d) for m, d in method.thresholds]
    th_names = [f"≤{m:g}m,{d:g}°" for m, d in method.thresholds]
    headers = [
        "Scene",
        "Frames",
        "Invalid",
        "Med. pos (m)",
        "Med. rot (°)",
        "Mean pos (m)",
        "Mean rot (°)",
        *th_names,
        "Scene acc.",
        "Latency ms (med/p90/p99)",
    ]
    rows = []
    for s in [*method.scenes, method.overall]:
        lat = s.latency_ms.get("total")
        lat_s = "-" if not lat else f"{_ms(lat['median'])}/{_ms(lat['p90'])}/{_ms(lat['p99'])}"
        rows.append(
            [
                s.scene,
                str(s.n),
                str(s.n_invalid),
                _m(s.median_position_m),
                _deg(s.median_orientation_deg),
                _m(s.mean_position_m),
                _deg(s.mean_orientation_deg),
                *(_pct(s.within.get(k)) for k in th),
                _pct(s.scene_accuracy),
                lat_s,
            ]
        )
    return render_table(headers, rows, markdown)


def _latency(report: EvalReport, markdown: bool) -> str:
    headers = ["Method", "Stage", "Median", "p90", "p99", "Mean", "Max"]
    rows = []
    for m in report.methods:
        for stage, st in m.overall.latency_ms.items():
            rows.append([m.name, stage, *(_ms(st[k]) for k in ("median", "p90", "p99", "mean", "max"))])
    return render_table(headers, rows, markdown) if rows else ""


def _facts(info: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Scalar, non-empty entries of ``info`` (nested values stay in the JSON report only)."""
    return [(k, v) for k, v in info.items() if not isinstance(v, (Mapping, list, tuple)) and v not in (None, "")]


def _rpct(v: Any) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.1f}%"


def _rnum(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _hint_table(methods: Sequence[MethodReport], markdown: bool) -> str:
    headers = ["Method", "≤0.5m & 10°", "≤1.5m", "Score", "AUROC", "Coverage @95%", "Within 1σ", "Within 2σ"]
    rows = []
    for m in methods:
        u, hint = m.uncertainty or {}, m.hint or {}
        sig = (
            [_rpct(u.get("within_1sigma")), _rpct(u.get("within_2sigma"))]
            if u.get("calibrated")
            else ["not calibrated"] * 2
        )
        rows.append(
            [
                m.name,
                _rpct(hint.get("within_0_5m_10deg")),
                _rpct(hint.get("within_1_5m")),
                str(u.get("score") or "-"),
                _rnum(u.get("auroc")),
                _rpct(u.get("coverage_at_95_precision")),
                *sig,
            ]
        )
    return render_table(headers, rows, markdown)


def _risk_table(methods: Sequence[MethodReport], markdown: bool) -> str:
    shown = [m for m in methods if m.risk_coverage]
    if not shown:
        return ""
    headers = ["Coverage", *(f"{m.name}: med. pos / rot, ok" for m in shown)]
    rows = []
    for i, c in enumerate(COVERAGES):
        cells = []
        for m in shown:
            r = m.risk_coverage[i]
            med = f"{_rnum(r['median_position_m'])} m / {_rnum(r['median_orientation_deg'], 1)}°"
            cells.append(f"{med}, {_rpct(r['ok_fraction'])}")
        rows.append([f"{100 * c:.0f}%", *cells])
    return render_table(headers, rows, markdown)


def format_robot(methods: Sequence[MethodReport], markdown: bool = False) -> list[str]:
    """Titles and tables of the hint/uncertainty summary and the risk–coverage table (empty without hint metrics)."""
    methods = [m for m in methods if m.hint]
    if not methods:
        return []
    h = "## " if markdown else ""
    parts = [
        f"{h}Hint success and uncertainty (wrong: > {HINT_M:g} m or > {HINT_DEG:g}°; coverage: ≥ "
        f"{100 * PRECISION:.0f}% within {OK_M:g} m & {OK_DEG:g}°; within kσ: per-axis errors)",
        _hint_table(methods, markdown),
    ]
    risk = _risk_table(methods, markdown)
    if risk:
        parts += [
            f"{h}Risk–coverage (most confident frames first; medians and fraction within {OK_M:g} m & {OK_DEG:g}°)",
            risk,
        ]
    return parts


def format_candidates(rows: Sequence[Mapping[str, Any]], markdown: bool = False) -> list[str]:
    """Title and table of the candidate-score comparison (one row per candidate and method)."""
    if not rows:
        return []
    headers = ["Score", "Method", "AUROC", "Coverage @95%", "Cost (ms/frame)"]
    table = []
    for r in rows:
        for m in r["methods"]:
            table.append(
                [
                    r["score"],
                    m["method"],
                    _rnum(m["auroc"]),
                    _rpct(m["coverage_at_95_precision"]),
                    _rnum(r["cost_ms_per_frame"], 3),
                ]  # fmt: skip
            )
    h = "## " if markdown else ""
    return [
        f"{h}Uncertainty candidates (AUROC for > {HINT_M:g} m or > {HINT_DEG:g}°)",
        render_table(headers, table, markdown),
    ]


def _robot_parts(report: EvalReport, markdown: bool) -> list[str]:
    """Hint success, uncertainty, risk–coverage and candidate-score tables (:mod:`.robot`), when computed."""
    return format_robot(report.methods, markdown) + format_candidates(report.candidates, markdown)


def format_text(report: EvalReport) -> str:
    """Plain-text report: run facts, the method comparison, per-method details and per-stage latency."""
    parts = ["\n".join(f"{k}: {v}" for k, v in _facts(report.info))]
    parts += ["Median errors per scene", _comparison(report, False)]
    parts += _robot_parts(report, False)
    for m in report.methods:
        parts += [f"{m.name}: details", _details(m, False)]
    lat = _latency(report, False)
    if lat:
        parts += ["Latency per stage (ms, all frames)", lat]
    return "\n\n".join(p for p in parts if p) + "\n"


def format_markdown(report: EvalReport) -> str:
    """Markdown report with the same content as :func:`format_text`."""
    parts = ["# Evaluation report"]
    if _facts(report.info):
        parts.append("\n".join(f"- **{k}**: `{v}`" for k, v in _facts(report.info)))
    parts += ["## Median errors per scene", _comparison(report, True)]
    parts += _robot_parts(report, True)
    for m in report.methods:
        parts += [f"## {m.name}", _details(m, True)]
    lat = _latency(report, True)
    if lat:
        parts += ["## Latency per stage (ms, all frames)", lat]
    parts.append(
        "Errors: position ‖x̂ − x‖ (m), orientation 2·acos(|⟨q̂, q⟩|) (°, clamped). Medians and means are over valid "
        "estimates; invalid (non-finite) estimates are counted separately and are misses in the threshold columns."
    )
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------- TUM files
def write_tum(path: str | Path, timestamps, poses, skip_invalid: bool = True) -> int:
    """Write a TUM trajectory ``timestamp tx ty tz qx qy qz qw`` (ROS quaternion order) for evo.

    ``poses`` are ``(N, 7)`` w-first; quaternions are normalised. Invalid poses are skipped (``skip_invalid``) or
    raise ``ValueError``. Returns the number of poses written. Values use Python's round-trip float format.
    """
    ts = np.asarray(timestamps, dtype=np.float64).reshape(-1)
    p = np.asarray(poses, dtype=np.float64).reshape(-1, 7)
    if len(ts) != len(p):
        raise ValueError(f"{len(ts)} timestamps for {len(p)} poses; expected one timestamp per pose")
    valid = valid_poses(p)
    if not skip_invalid and not valid.all():
        raise ValueError(f"pose {int(np.flatnonzero(~valid)[0])} is non-finite or has a zero quaternion")
    lines = [TUM_HEADER]
    if valid.any():
        q = geometry.quat_to_ros(geometry.quat_normalize(p[valid, 3:], canonical=False))
        for t, xyz, qr in zip(ts[valid], p[valid, :3], q):
            lines.append(" ".join(repr(float(v)) for v in (t, *xyz, *qr)))
    atomic_write_text(path, "\n".join(lines) + "\n")
    return int(valid.sum())


def read_tum(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a TUM trajectory: ``(timestamps (N,), poses (N, 7) w-first)``; ``#`` lines are comments."""
    path = Path(path)
    ts, poses = [], []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.replace(",", " ").split()
        if len(fields) != 8:
            raise ValueError(
                f"line {no} of {path} has {len(fields)} values; expected 8 (timestamp tx ty tz qx qy qz qw)"
            )
        v = [float(f) for f in fields]
        ts.append(v[0])
        poses.append([*v[1:4], *geometry.quat_from_ros(v[4:8])])
    return np.asarray(ts, dtype=np.float64), np.asarray(poses, dtype=np.float64).reshape(-1, 7)
