"""The files the evaluators write: report.json/md and table.txt, frames.csv, TUM trajectories and plots.

``apr-eval`` (label CSV) and ``apr-eval-bag`` (bag) write the same kinds of files from an :class:`EvalRun`; only the
leading per-frame columns, the TUM file layout (per scene/sequence vs one trajectory) and the plot grouping differ:

* ``report.json`` (every number; ``methods[].name``, ``methods[].mean_of_medians.{position_m,orientation_deg}``),
  ``report.md``, ``table.txt``;
* ``frames.csv``: label runs ``frame, scene, seq, img_path``, bag runs ``frame, stamp_ns, stamp_s, gt_offset_ms``;
  then ``pred_scene, confidence, gt_x..gt_qz``, per method ``<key>_x..<key>_qz, <key>_pos_err_m,
  <key>_rot_err_deg`` (keys ``apr``, ``iapr1``, ...), the stage times and each method's total;
* ``tum/``: label runs ``<scene>_{gt,apr,iapr}.txt`` (+ ``<scene>_<seq>_*`` for scenes with several sequences; the CSV
  row index as timestamp), bag runs ``{gt,apr,iapr}.txt`` (the image stamp in seconds);
* ``plots/``: error CDF, top-down trajectory and errors over the frame index (per scene for label runs), and
  ``risk_coverage.png`` (:func:`plots.plot_risk_coverage`, every method whose uncertainty score was computed).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apr_localizer.fileio import atomic_write_text

from . import metrics
from .robot import robot_metrics
from .runner import EvalRun, frame_uncertainty, method_key, method_name

__all__ = [
    "POSE_COMPONENTS",
    "fmt",
    "method_columns",
    "plot_risk_coverage",
    "plot_run",
    "write_csv",
    "write_frames_csv",
    "write_outputs",
    "write_reports",
    "write_tum_files",
]

POSE_COMPONENTS = ("x", "y", "z", "qw", "qx", "qy", "qz")
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _safe(name: str) -> str:
    return _SAFE.sub("_", name).strip("_") or "scene"


def fmt(v: float) -> str:
    """Format a CSV number: ``nan`` or 9 significant digits."""
    return "nan" if not np.isfinite(v) else f"{v:.9g}"


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """Write a CSV (Unix line ends) atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())
    return path


def write_reports(out: Path, report: metrics.EvalReport, extra_text: str = "", extra_md: str = "") -> str:
    """Write report.json, report.md and table.txt (each with its extra section); return the text table."""
    report.write_json(out / "report.json")
    md = metrics.format_markdown(report) + ("\n" + extra_md if extra_md else "")
    text = metrics.format_text(report) + ("\n" + extra_text if extra_text else "")
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "table.txt", text)
    return text


def method_columns(run: EvalRun) -> tuple[list[str], Any]:
    """Per-method CSV columns: every method's estimate and errors, the stage times and each method's total.

    Returns ``(header, row(i) -> list[str])``.
    """
    K = run.iterations
    header: list[str] = []
    errs = []
    for k in range(K + 1):
        key = method_key(k)
        header += [f"{key}_{c}" for c in POSE_COMPONENTS] + [f"{key}_pos_err_m", f"{key}_rot_err_deg"]
        errs.append(metrics.frame_errors(run.poses[k], run.gt)[:2])
    stages = [run.load_stage, "preprocess", "apr"] + (["encoder"] if K and run.timings["encoder"].any() else [])
    stages += [f"step{k}" for k in range(1, K + 1)]
    header += [f"{s}_ms" for s in stages] + [f"{method_key(k)}_total_ms" for k in range(K + 1)]
    totals = [run.latency(k)["total"] for k in range(K + 1)]

    def row(i: int) -> list[str]:
        out: list[str] = []
        for k in range(K + 1):
            out += [fmt(v) for v in run.poses[k, i]] + [fmt(errs[k][0][i]), fmt(errs[k][1][i])]
        return out + [fmt(run.timings[s][i]) for s in stages] + [fmt(t[i]) for t in totals]

    return header, row


def write_frames_csv(path: Path, run: EvalRun) -> Path:
    """``frames.csv``: one row per evaluated frame (columns in the module docstring)."""
    comps, suffix = method_columns(run)
    pred = run.pred_scene_names
    t = run.table
    lead = ["frame", "scene", "seq", "img_path"] if t is not None else ["frame", "stamp_ns", "stamp_s", "gt_offset_ms"]
    header = [*lead, "pred_scene", "confidence", *(f"gt_{c}" for c in POSE_COMPONENTS), *comps]
    rows = []
    for i in range(len(run)):
        if t is not None:
            row: list[Any] = [int(run.index[i]), t.scene[i], t.seq[i], t.img_path[i]]
        else:
            stamp = int(run.stamps_ns[i])
            row = [int(run.index[i]), stamp, f"{stamp * 1e-9:.9f}", fmt(run.gt_offset_ms[i])]
        rows.append([*row, pred[i], fmt(run.confidence[i]), *(fmt(v) for v in run.gt[i]), *suffix(i)])
    return write_csv(path, header, rows)


def write_tum_files(out: Path, run: EvalRun) -> list[Path]:
    """TUM trajectories of the ground truth, the APR and the last iAPR estimate (layout in the module docstring)."""
    kinds = {"gt": run.gt, "apr": run.poses[0]}
    if run.iterations > 0:
        kinds["iapr"] = run.poses[run.iterations]
    written = []
    if run.table is None:
        stamps_s = run.stamps_ns.astype(np.float64) * 1e-9
        for kind, poses in kinds.items():
            metrics.write_tum(out / f"{kind}.txt", stamps_s, poses)
            written.append(out / f"{kind}.txt")
        return written
    scenes = np.asarray(run.table.scene, dtype=object)
    seqs = np.asarray(run.table.seq, dtype=object)
    for scene in dict.fromkeys(run.table.scene):
        groups = [(_safe(scene), scenes == scene)]
        scene_seqs = list(dict.fromkeys(seqs[scenes == scene].tolist()))
        if len(scene_seqs) > 1:
            groups += [(f"{_safe(scene)}_{_safe(q)}", (scenes == scene) & (seqs == q)) for q in scene_seqs]
        for stem, mask in groups:
            for kind, poses in kinds.items():
                p = out / f"{stem}_{kind}.txt"
                metrics.write_tum(p, run.index[mask].astype(np.float64), poses[mask])
                written.append(p)
    return written


def plot_run(out: Path, gt: np.ndarray, estimates: Mapping[str, np.ndarray], title: str, plane: str) -> list[Path]:
    """Error CDF, top-down trajectory and errors over the image index of one trajectory (bag runs, live)."""
    from . import plots

    errs = {name: metrics.frame_errors(p, gt)[:2] for name, p in estimates.items()}
    written = [plots.plot_error_cdf(errs, out / "error_cdf.png", f"{title}: error CDF", metrics.DEFAULT_THRESHOLDS)]
    written.append(plots.plot_trajectory(gt, dict(estimates), out / "trajectory.png", f"{title}: top-down", plane))
    written.append(plots.plot_errors_over_frames(errs, out / "errors.png", f"{title}: errors over the image index"))
    return written


def plot_risk_coverage(out: Path, run: EvalRun, title: str) -> Path | None:
    """``risk_coverage.png`` of every method with at least one finite score (None when there is none)."""
    from . import plots

    curves = {}
    for k in range(run.iterations + 1):
        unc = frame_uncertainty(run, k)
        curve = robot_metrics(run.poses[k], run.gt, unc).curve if unc is not None else None
        if curve is not None and unc is not None:
            curves[f"{method_name(k)} ({unc.score_name})"] = curve
    if not curves:
        return None
    return plots.plot_risk_coverage(curves, out / "risk_coverage.png", f"{title}: risk–coverage".lstrip(": "))


def _plot_label_run(out: Path, run: EvalRun, plane: str) -> list[Path]:
    """Error CDF (all methods, all frames), per-scene top-down trajectory and errors over the frame index."""
    from . import plots

    assert run.table is not None
    K = run.iterations
    errs = {method_name(k): metrics.frame_errors(run.poses[k], run.gt)[:2] for k in range(K + 1)}
    written = [plots.plot_error_cdf(errs, out / "error_cdf.png", "Error CDF (all frames)", metrics.DEFAULT_THRESHOLDS)]
    shown = [0] + ([K] if K > 0 else [])
    scenes = np.asarray(run.table.scene, dtype=object)
    for scene in dict.fromkeys(run.table.scene):
        m = scenes == scene
        est = {method_name(k): run.poses[k][m] for k in shown}
        seqs = np.asarray(run.table.seq, dtype=object)[m]
        path = out / f"trajectory_{_safe(scene)}.png"
        written.append(plots.plot_trajectory(run.gt[m], est, path, f"{scene}: top-down", plane, groups=seqs))
        e = {method_name(k): (errs[method_name(k)][0][m], errs[method_name(k)][1][m]) for k in shown}
        path = out / f"errors_{_safe(scene)}.png"
        written.append(plots.plot_errors_over_frames(e, path, f"{scene}: errors", run.index[m]))
    return written


def write_outputs(
    out: Path, run: EvalRun, report: metrics.EvalReport, plots: bool = True, plane: str = "xy", title: str = ""
) -> str:
    """Write every output file of an offline evaluation into ``out``; return the text table."""
    out.mkdir(parents=True, exist_ok=True)
    text = write_reports(out, report)
    write_frames_csv(out / "frames.csv", run)
    write_tum_files(out / "tum", run)
    if plots and len(run):
        if run.table is not None:
            _plot_label_run(out / "plots", run, plane)
        else:
            shown = [0] + ([run.iterations] if run.iterations > 0 else [])
            plot_run(out / "plots", run.gt, {method_name(k): run.poses[k] for k in shown}, title, plane)
        plot_risk_coverage(out / "plots", run, title)
    return text
