"""``apr-eval``: accuracy and latency of a model on a label CSV, as in the papers (batch 1, scene withheld).

::

    apr-eval --model model.safetensors --data /data/7scenes --labels 7scenes_test.csv --out eval/ --iterations 3

For every frame the image is read, preprocessed and run through the APR graph **once** (scene = the classifier's
argmax: the ground-truth scene is withheld); then ``N`` iAPR refinement steps run on the cached image latents and
the estimate after every step is recorded. One pass therefore gives "MS-Transformer" (0 iterations) and
"iAPR (k it.)" for k = 1..N, each with its own latency (APR latency + the first k steps).

Outputs in ``--out``:

* ``report.json`` (every number), ``report.md``, ``table.txt`` (also printed);
* ``frames.csv``: per frame the ground truth, every method's estimate and errors, the predicted scene and timings;
* ``plots/error_cdf.png``, ``plots/trajectory_<scene>.png``, ``plots/errors_<scene>.png``;
* ``tum/<scene>_{gt,apr,iapr}.txt`` (``iapr`` = after N iterations; and ``tum/<scene>_<seq>_*.txt`` for scenes with
  several sequences): ``timestamp tx ty tz qx qy qz qw`` with the CSV row index as timestamp, so
  ``evo_ape tum tum/chess_gt.txt tum/chess_iapr.txt`` compares them frame by frame.

Latency stages (ms): ``load`` (image file read + decode; not part of ``total``), ``preprocess``, ``apr``, ``iapr``
(the iAPR's own encoder when it has one + k refinement steps), ``postprocess``, ``total``. GPU stages are
synchronised, so each stage's time is its own.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import logging
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apr_localizer import __version__, geometry
from apr_localizer.backends.base import BACKENDS, BackendError
from apr_localizer.localizer import Localizer, LocalizerOptions, ModelLoadError

from ..datasets.labels import LabelError, LabelTable, read_labels, validate_images
from . import metrics

__all__ = ["EvalError", "EvalRun", "build_report", "main", "method_key", "method_name", "run_frames", "write_outputs"]

log = logging.getLogger(__name__)


class EvalError(RuntimeError):
    """The evaluation cannot run (one sentence naming the file or option)."""


def method_name(k: int) -> str:
    """Display name of the estimate after ``k`` refinement iterations."""
    return "MS-Transformer" if k == 0 else f"iAPR ({k} it.)"


def method_key(k: int) -> str:
    """Short key (CSV columns, file names) of the estimate after ``k`` iterations: ``apr``, ``iapr1``, ..."""
    return "apr" if k == 0 else f"iapr{k}"


@dataclass
class EvalRun:
    """Raw results of :func:`run_frames` on ``N`` frames with ``K`` refinement iterations.

    Attributes:
        table: the evaluated label rows (``N``).
        rows: ``(N,)`` index of every frame in the label CSV (0-based data rows).
        poses: ``(K+1, N, 7)`` estimate after ``k`` iterations (unit quaternion, ``w >= 0``; NaN when invalid).
        pred_scene: ``(N,)`` predicted scene id; ``confidence``: ``(N,)`` its probability.
        timings: stage → ``(N,)`` ms: ``load``, ``preprocess``, ``apr``, ``encoder`` (0 unless the iAPR has its own
            MS-Transformer), ``step1..stepK``, ``post0..postK``.
        scene_names: the model's scene names (ids → names).

    """

    table: LabelTable
    rows: np.ndarray
    poses: np.ndarray
    pred_scene: np.ndarray
    confidence: np.ndarray
    timings: dict[str, np.ndarray]
    scene_names: list[str]
    iterations: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def gt(self) -> np.ndarray:
        return self.table.pose

    @property
    def pred_scene_names(self) -> list[str]:
        return [self.scene_names[i] if 0 <= i < len(self.scene_names) else str(i) for i in self.pred_scene.tolist()]

    def latency(self, k: int) -> dict[str, np.ndarray]:
        """Per-stage latency ``(N,)`` of the method with ``k`` iterations (``total`` excludes ``load``)."""
        t = self.timings
        out = {"load": t["load"], "preprocess": t["preprocess"], "apr": t["apr"]}
        if k > 0:
            out["iapr"] = t["encoder"] + sum(t[f"step{i}"] for i in range(1, k + 1))
        out["postprocess"] = t[f"post{k}"]
        out["total"] = out["preprocess"] + out["apr"] + out.get("iapr", 0.0) + out["postprocess"]
        return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _to_pose(pose: torch.Tensor) -> np.ndarray:
    """First row of a ``(B,7)`` tensor as float64 with a unit ``w >= 0`` quaternion (NaN row when invalid)."""
    p = pose[0].detach().to("cpu", torch.float64).numpy()
    try:
        return np.concatenate([p[:3], geometry.quat_normalize(p[3:])])
    except ValueError:  # zero or non-finite quaternion
        return np.full(7, np.nan)


def run_frames(
    localizer: Localizer, table: LabelTable, iterations: int, rows: np.ndarray | None = None, progress: bool = True
) -> EvalRun:
    """Localize every frame of ``table`` once (batch 1, scene withheld) and record all ``0..iterations`` estimates.

    ``rows`` are the frames' indices in the original CSV (default ``0..N-1``). Needs a refiner when
    ``iterations > 0``.
    """
    from tqdm import tqdm

    from ..datasets.torch_datasets import load_rgb

    backend = localizer.backend
    if iterations > 0 and not backend.has_refiner:
        raise EvalError(f"--iterations {iterations} needs an iAPR model; this model has none (use --iterations 0)")
    n, K = len(table), int(iterations)
    device = localizer.device
    poses = np.full((K + 1, n, 7), np.nan)
    pred = np.zeros(n, dtype=np.int64)
    conf = np.zeros(n)
    names = ["load", "preprocess", "apr", "encoder", *(f"step{i}" for i in range(1, K + 1))]
    names += [f"post{k}" for k in range(K + 1)]
    timings = {k: np.zeros(n) for k in names}
    paths = validate_images(table)
    bar = tqdm(total=n, desc="apr-eval", unit="frame", disable=not progress, file=sys.stderr)
    for i, path in enumerate(paths):
        t0 = time.perf_counter()
        try:
            rgb = load_rgb(path)
        except ValueError as e:
            raise EvalError(str(e)) from None
        t1 = time.perf_counter()
        x = localizer.preprocess(rgb)
        _sync(device)
        t2 = time.perf_counter()
        out = backend.run_apr(x)
        _sync(device)
        t3 = time.perf_counter()
        timings["load"][i] = (t1 - t0) * 1e3
        timings["preprocess"][i] = (t2 - t1) * 1e3
        timings["apr"][i] = (t3 - t2) * 1e3
        scene_t = out["scene"]
        steps = [out["pose"]]
        if K > 0:
            lt, lr = out["latent_t"], out["latent_rot"]
            if backend.needs_encoder:
                ts = time.perf_counter()
                lt, lr = backend.run_encoder(x, scene_t)
                _sync(device)
                timings["encoder"][i] = (time.perf_counter() - ts) * 1e3
            pose = out["pose"]
            for k in range(1, K + 1):
                ts = time.perf_counter()
                pose = backend.run_refine(lt, lr, pose, scene_t)
                _sync(device)
                timings[f"step{k}"][i] = (time.perf_counter() - ts) * 1e3
                steps.append(pose)
        for k, p in enumerate(steps):
            ts = time.perf_counter()
            poses[k, i] = _to_pose(p)
            timings[f"post{k}"][i] = (time.perf_counter() - ts) * 1e3
        s = int(scene_t[0])
        pred[i] = s
        conf[i] = float(torch.exp(out["scene_log_probs"][0, s].float()))
        bar.update(1)
    bar.close()
    return EvalRun(
        table=table,
        rows=np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64),
        poses=poses,
        pred_scene=pred,
        confidence=conf,
        timings=timings,
        scene_names=list(localizer.scene_names),
        iterations=K,
    )


def build_report(
    run: EvalRun, info: dict[str, Any] | None = None, thresholds=metrics.DEFAULT_THRESHOLDS
) -> metrics.EvalReport:
    """One :class:`~.metrics.MethodReport` per iteration count ``0..K`` (scenes in model order)."""
    methods = [
        metrics.per_scene_metrics(
            run.poses[k],
            run.gt,
            run.table.scene,
            run.pred_scene_names,
            run.latency(k),
            name=method_name(k),
            thresholds=thresholds,
            scene_order=run.scene_names,
        )
        for k in range(run.iterations + 1)
    ]
    return metrics.EvalReport(methods, dict(info or {}))


_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _safe(name: str) -> str:
    return _SAFE.sub("_", name).strip("_") or "scene"


def _fmt(v: float) -> str:
    return "nan" if not np.isfinite(v) else f"{v:.9g}"


POSE_COMPONENTS = ("x", "y", "z", "qw", "qx", "qy", "qz")


def method_columns(run: Any, first_stage: str) -> tuple[list[str], Any]:
    """Build the per-frame CSV columns shared by ``apr-eval`` and ``apr-eval-bag``.

    Columns: every method's estimate and errors, the stage times (``first_stage`` is ``load`` or ``decode``) and
    each method's total. Returns ``(header, row(i) -> list[str])`` for a run with ``iterations``,
    ``poses (K+1,N,7)``, ``gt``, ``timings`` and ``latency(k)``.
    """
    K = run.iterations
    header: list[str] = []
    errs = []
    for k in range(K + 1):
        key = method_key(k)
        header += [f"{key}_{c}" for c in POSE_COMPONENTS] + [f"{key}_pos_err_m", f"{key}_rot_err_deg"]
        errs.append(metrics.frame_errors(run.poses[k], run.gt)[:2])
    stages = [first_stage, "preprocess", "apr"] + (["encoder"] if K and run.timings["encoder"].any() else [])
    stages += [f"step{k}" for k in range(1, K + 1)]
    header += [f"{s}_ms" for s in stages] + [f"{method_key(k)}_total_ms" for k in range(K + 1)]
    totals = [run.latency(k)["total"] for k in range(K + 1)]

    def row(i: int) -> list[str]:
        out: list[str] = []
        for k in range(K + 1):
            out += [_fmt(v) for v in run.poses[k, i]] + [_fmt(errs[k][0][i]), _fmt(errs[k][1][i])]
        return out + [_fmt(run.timings[s][i]) for s in stages] + [_fmt(t[i]) for t in totals]

    return header, row


def write_frames_csv(path: Path, run: EvalRun) -> Path:
    """Per-frame CSV: ground truth, each method's estimate and errors, predicted scene, confidence, timings (ms).

    Columns: ``frame`` (CSV row), ``scene``, ``seq``, ``img_path``, ``pred_scene``, ``confidence``, ``gt_x..gt_qz``;
    per method ``<key>_x..<key>_qz``, ``<key>_pos_err_m``, ``<key>_rot_err_deg`` (keys ``apr``, ``iapr1``, ...);
    stage times ``load_ms``, ``preprocess_ms``, ``apr_ms``, [``encoder_ms``], ``step1_ms``...; ``<key>_total_ms``.
    """
    comps, suffix = method_columns(run, "load")
    header = ["frame", "scene", "seq", "img_path", "pred_scene", "confidence", *(f"gt_{c}" for c in POSE_COMPONENTS)]
    pred = run.pred_scene_names
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header + comps)
        t = run.table
        for i in range(len(t)):
            row: list[Any] = [int(run.rows[i]), t.scene[i], t.seq[i], t.img_path[i], pred[i], _fmt(run.confidence[i])]
            w.writerow(row + [_fmt(v) for v in t.pose[i]] + suffix(i))
    return path


def write_tum_files(out: Path, run: EvalRun) -> list[Path]:
    """``<out>/<scene>_{gt,apr,iapr}.txt`` per scene, plus ``<scene>_<seq>_*`` for scenes with several sequences."""
    t = run.table
    kinds = {"gt": run.gt, "apr": run.poses[0]}
    if run.iterations > 0:
        kinds["iapr"] = run.poses[run.iterations]
    scenes = np.asarray(t.scene, dtype=object)
    seqs = np.asarray(t.seq, dtype=object)
    written = []
    for scene in dict.fromkeys(t.scene):
        groups = [(_safe(scene), scenes == scene)]
        scene_seqs = list(dict.fromkeys(seqs[scenes == scene].tolist()))
        if len(scene_seqs) > 1:
            groups += [(f"{_safe(scene)}_{_safe(q)}", (scenes == scene) & (seqs == q)) for q in scene_seqs]
        for stem, mask in groups:
            for kind, poses in kinds.items():
                p = out / f"{stem}_{kind}.txt"
                metrics.write_tum(p, run.rows[mask].astype(np.float64), poses[mask])
                written.append(p)
    return written


def write_plots(out: Path, run: EvalRun, plane: str = "xy") -> list[Path]:
    """Error CDF (all methods, all frames), per-scene top-down trajectory and errors over the frame index."""
    from . import plots

    K = run.iterations
    errs = {method_name(k): metrics.frame_errors(run.poses[k], run.gt)[:2] for k in range(K + 1)}
    written = [plots.plot_error_cdf(errs, out / "error_cdf.png", "Error CDF (all frames)", metrics.DEFAULT_THRESHOLDS)]
    shown = [0] + ([K] if K > 0 else [])
    scenes = np.asarray(run.table.scene, dtype=object)
    for scene in dict.fromkeys(run.table.scene):
        m = scenes == scene
        est = {method_name(k): run.poses[k][m] for k in shown}
        written.append(
            plots.plot_trajectory(
                run.gt[m],
                est,
                out / f"trajectory_{_safe(scene)}.png",
                f"{scene}: top-down",
                plane,
                groups=np.asarray(run.table.seq, dtype=object)[m],
            )
        )
        e = {method_name(k): (errs[method_name(k)][0][m], errs[method_name(k)][1][m]) for k in shown}
        written.append(
            plots.plot_errors_over_frames(e, out / f"errors_{_safe(scene)}.png", f"{scene}: errors", run.rows[m])
        )
    return written


def write_outputs(
    out: Path, run: EvalRun, report: metrics.EvalReport, plots: bool = True, plane: str = "xy"
) -> dict[str, list[Path]]:
    """Write every output file of ``apr-eval`` into ``out``; returns them grouped by kind."""
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[Path]] = {"report": [report.write_json(out / "report.json")]}
    md = out / "report.md"
    md.write_text(metrics.format_markdown(report), encoding="utf-8")
    txt = out / "table.txt"
    txt.write_text(metrics.format_text(report), encoding="utf-8")
    files["report"] += [md, txt, write_frames_csv(out / "frames.csv", run)]
    files["tum"] = write_tum_files(out / "tum", run)
    files["plots"] = write_plots(out / "plots", run, plane) if plots else []
    return files


# ------------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="apr-eval",
        description="Evaluate an MS-Transformer (+ iAPR) model on a label CSV: median errors per scene, threshold "
        "accuracy, scene accuracy, latency; report.json/md, table.txt, frames.csv, plots and TUM trajectories.",
    )
    p.add_argument("--model", required=True, help="our model bundle (.safetensors) or an official APR/iAPR .pth")
    p.add_argument("--iapr", help="official iAPR checkpoint (.pth), refining the --model estimates")
    p.add_argument("--pae", help="official pose auto-encoder checkpoint (.pth), kept with the model")
    p.add_argument("--scene-names", help="comma-separated scene names for official checkpoints (model order)")
    p.add_argument("--data", required=True, help="dataset root the CSV's img_path column is relative to")
    p.add_argument("--labels", required=True, help="label CSV (scene,split,seq,img_path,t1,t2,t3,q1,q2,q3,q4)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--split", help="evaluate only the rows of this split (e.g. test); default: every row")
    p.add_argument("--backend", default="auto", choices=("auto", *BACKENDS), help="inference engine (default: auto)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16", "int8"), help="(default: fp32)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of the engine (0 = physical cores)")
    p.add_argument("--cache-dir", help="ONNX/TensorRT engine cache directory (default: the backend's)")
    p.add_argument(
        "--iterations",
        type=int,
        help="iAPR iterations N; methods 0..N are compared from one APR pass per frame (default: the iAPR "
        "config's num_iterations, 0 without an iAPR)",
    )
    p.add_argument("--limit", type=int, help="evaluate at most this many frames (after --stride)")
    p.add_argument("--stride", type=int, default=1, help="evaluate every k-th row of the CSV (default: 1)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up runs before timing, 0 = none (default: 2)")
    p.add_argument(
        "--plane",
        default="xy",
        choices=("xy", "xz", "yz", "auto"),
        help="trajectory plot plane; auto = the two widest ground-truth axes (default: xy)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no printed table")
    return p


def _select_rows(table: LabelTable, split: str | None, stride: int, limit: int | None) -> np.ndarray:
    idx = np.arange(len(table))
    if split is not None:
        idx = idx[np.asarray(table.split, dtype=object) == split]
        if not len(idx):
            raise EvalError(f"{table.source}: no rows with split {split!r} (splits: {sorted(set(table.split))})")
    idx = idx[::stride]
    if limit is not None:
        idx = idx[:limit]
    if not len(idx):
        raise EvalError(f"{table.source}: no frames left to evaluate")
    return idx


def main(argv: Sequence[str] | None = None) -> int:
    """``apr-eval`` entry point; returns the exit status (0 ok, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.stride < 1:
        parser.error(f"--stride must be >= 1, got {args.stride}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if args.iterations is not None and args.iterations < 0:
        parser.error(f"--iterations must be >= 0, got {args.iterations}")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    out = Path(args.out)
    try:
        scene_names = [s.strip() for s in args.scene_names.split(",")] if args.scene_names else None
        options = LocalizerOptions(
            backend=args.backend,
            device=args.device,
            precision=args.precision,
            iapr_iterations=args.iterations or 0,
            threads=args.threads,
            cache_dir=args.cache_dir,
        )
        loc = Localizer.from_files(args.model, args.iapr, args.pae, options=options, scene_names=scene_names)
        has_refiner = loc.bundle.iapr is not None
        iterations = args.iterations
        if iterations is None:
            iterations = int(loc.bundle.iapr.config.num_iterations) if has_refiner else 0
        if iterations > 0 and not has_refiner:
            raise EvalError(
                f"--iterations {iterations} needs an iAPR model, but {args.model} has none (pass --iapr or use 0)"
            )
        full = read_labels(args.labels, args.data, scene_names=loc.scene_names)
        rows = _select_rows(full, args.split, args.stride, args.limit)
        table = full.take(rows)
        validate_images(table)
        if args.warmup > 0:
            loc.backend.warmup(args.warmup)
        started = time.perf_counter()
        run = run_frames(loc, table, iterations, rows=rows, progress=not args.quiet)
        elapsed = time.perf_counter() - started
    except (ModelLoadError, BackendError, LabelError, FileNotFoundError, EvalError) as e:
        print(f"apr-eval: error: {e}", file=sys.stderr)
        return 2
    describe = loc.describe()
    info: dict[str, Any] = {
        "model": str(args.model),
        "iapr": str(args.iapr or ""),
        "pae": str(args.pae or ""),
        "labels": str(args.labels),
        "data": str(args.data),
        "backend": loc.backend_name,
        "device": loc.device,
        "precision": args.precision,
        "frames": len(table),
        "stride": args.stride,
        "limit": args.limit,
        "split": args.split or "all",
        "iterations": iterations,
        "scene_selection": "classifier argmax (ground-truth scene withheld), batch 1",
        "tum_timestamps": "label CSV row index (0-based), in seconds",
        "wall_time_s": round(elapsed, 3),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "apr_localizer": __version__,
        "torch": torch.__version__,
        "model_scenes": list(loc.scene_names),
        "localizer": describe,
        "command": ["apr-eval", *(sys.argv[1:] if argv is None else list(argv))],
    }
    report = build_report(run, info)
    write_outputs(out, run, report, plots=not args.no_plots, plane=args.plane)
    loc.close()
    if not args.quiet:
        print(metrics.format_text(report), end="")
        print(f"apr-eval: wrote {out}/report.json, report.md, table.txt, frames.csv, tum/, plots/")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
