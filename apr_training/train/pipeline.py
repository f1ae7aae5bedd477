"""``apr-train pipeline``: one command from a recorded space (a label-CSV dataset) to the model file the node loads.

Stages, each resumable, each finished stage marked by ``<out>/stages/<stage>.json`` (written atomically):

1. ``split``: whole sequences held out for validation (``data.val_sequences`` / ``data.val_fraction`` of the
   config) → ``<out>/split_train.csv``, ``<out>/split_val.csv``;
2. ``ms-transformer`` → ``<out>/ms-transformer/best.safetensors`` (selected on the validation split);
3. ``pae``: pose auto-encoder distilled from it → ``<out>/pae/``;
4. ``iapr``: the refiner on pairs matched to the APR's validation errors (``data.pair_mode``) → ``<out>/iapr/``;
5. ``calibrate``: every uncertainty score of :mod:`apr_localizer.uncertainty` on the validation split through
   :meth:`Localizer.run_steps`; the one with the best AUROC for "error > 0.5 m or > 10°" is fitted into a
   :class:`~apr_localizer.uncertainty.Calibration` → ``<out>/calibration.json``;
6. ``package``: ``<out>/model.safetensors`` (APR + PAE + iAPR, the calibration and the training camera from
   ``<data>/intrinsics.json`` in its metadata) and ``<out>/report.json``; the held-out accuracy and uncertainty are
   printed.

Time budget (``--time-budget MIN``): :data:`BUDGET_SHARES` of it go to the MS-Transformer, PAE and iAPR trainers
(each stops on its share, its cosine schedule sized from its measured step time); the rest is left for start-up,
validation, calibration and packaging. A killed run continues with ``--resume``: finished stages are skipped, a
trainer continues from its ``last_state.pt``, calibration and packaging are redone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apr_localizer.fileio import atomic_write_text

from .task import TrainError

__all__ = ["BUDGET_SHARES", "STAGES", "PipelineOptions", "pipeline_main", "run_pipeline"]

log = logging.getLogger("apr_training.train")

TrainMain = Callable[[list[str]], int]  # apr-train's main(argv) -> exit code
STAGES = ("split", "ms-transformer", "pae", "iapr", "calibrate", "package")
#: Fractions of ``--time-budget`` per trainer; the remaining 10 % cover start-up, validation, calibration, packaging.
BUDGET_SHARES = {"ms-transformer": 0.65, "pae": 0.05, "iapr": 0.20}
WRONG_POSITION_M, WRONG_ORIENTATION_DEG = 0.5, 10.0  # "wrong" for the AUROC (issue 11)
OK_POSITION_M, OK_ORIENTATION_DEG = 1.0, 15.0  # "ok" for coverage_at_95_precision


@dataclass
class PipelineOptions:
    """Inputs of :func:`run_pipeline` (what ``apr-train pipeline`` parses)."""

    data: Path | None  # root the CSV image paths are relative to; None: each CSV's folder
    labels: list[Path]  # one or more label CSVs (e.g. one per extracted mapping-run bag)
    out: Path
    time_budget_min: float | None = None
    device: str = "auto"
    resume: bool = False
    config: str = "robot"
    overrides: list[str] = field(default_factory=list)
    iterations: int = 3  # the node's default iapr_iterations
    backbone_weights: str | None = None
    init: Path | None = None  # MS-Transformer initial weights: a warm restart of an earlier run (new cosine cycle)
    max_steps: int | None = None  # per trainer (smoke runs and tests)
    progress: bool = True
    fp16: bool = False  # model.safetensors with float16 weights (half the size; what the demo ships)
    calibration_frames: int = 1000  # at most this many validation frames (evenly strided) for the calibration
    command: str | None = None  # recorded in the model's provenance (how to reproduce it)


# --------------------------------------------------------------------------------------------- stage markers
def _marker(out: Path, stage: str) -> Path:
    return out / "stages" / f"{stage}.json"


def _done(out: Path, stage: str) -> bool:
    return _marker(out, stage).is_file()


def _mark(out: Path, stage: str, info: dict[str, Any]) -> None:
    (out / "stages").mkdir(parents=True, exist_ok=True)
    atomic_write_text(_marker(out, stage), json.dumps({"stage": stage, "time": time.time(), **info}, indent=2) + "\n")


# --------------------------------------------------------------------------------------------- stages
def _root(opts: PipelineOptions) -> Path:
    """Dataset root of the merged labels: ``--data``, else the deepest folder holding every CSV's folder."""
    import os

    if opts.data is not None:
        return opts.data
    return Path(os.path.commonpath([str(p.resolve().parent) for p in opts.labels]))


def _split(opts: PipelineOptions, root: Path) -> None:
    """Merge the label CSVs (image paths made relative to ``root``) and hold out whole sequences for validation."""
    import os

    from apr_training.datasets.labels import read_labels, write_labels

    from .config import apply_overrides, load_config
    from .helpers import write_val_split

    rows = []
    for csv in opts.labels:
        table = read_labels(csv, dataset_root=opts.data)  # --data, else the CSV's own folder
        rows += [r._replace(img_path=os.path.relpath(table.image_path(i), root)) for i, r in enumerate(table.rows())]
    write_labels(opts.out / "labels.csv", rows)
    cfg = apply_overrides(load_config(opts.config, "ms-transformer"), opts.overrides)
    train_csv, val_csv, _ = write_val_split(opts.out / "labels.csv", root, opts.out, cfg)
    _mark(opts.out, "split", {"train": str(train_csv), "val": str(val_csv)})


def _train(opts: PipelineOptions, train_main: TrainMain, trainer: str, extra: list[str]) -> Path:
    """Run (or resume) one trainer through ``apr-train``'s own entry point; return its best model file."""
    run_dir = opts.out / trainer
    argv = [trainer, "--config", opts.config, "--data", str(opts.data), "--labels", str(opts.out / "split_train.csv"),
            "--val-labels", str(opts.out / "split_val.csv"), "--out", str(run_dir), "--device", opts.device,
            *extra]  # fmt: skip
    for item in opts.overrides:
        argv += ["--set", item]
    if opts.time_budget_min is not None:
        argv += ["--set", f"run.time_budget_s={opts.time_budget_min * 60.0 * BUDGET_SHARES[trainer]:.1f}"]
    if opts.max_steps is not None:
        argv += ["--max-steps", str(opts.max_steps)]
    if trainer == "ms-transformer":
        argv += ["--backbone-weights", opts.backbone_weights] if opts.backbone_weights else []
        argv += ["--init", str(opts.init)] if opts.init is not None else []
    if not opts.progress:
        argv.append("--no-progress")
    if (run_dir / "last_state.pt").is_file():
        argv.append("--resume")
        log.info("pipeline: %s continues from %s", trainer, run_dir / "last_state.pt")
    elif run_dir.exists():
        argv.append("--overwrite")  # killed before its first saved state: start the stage afresh
    print(f"== pipeline: {trainer} -> {run_dir}", flush=True)
    rc = train_main(argv)
    best = run_dir / "best.safetensors"
    if rc != 0 or not best.is_file():
        raise TrainError(f"pipeline: the {trainer} stage failed (exit code {rc}); see the messages above")
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    _mark(opts.out, trainer, {"model": str(best), "stopped": summary.get("stopped"), "steps": summary.get("steps"),
                              "wall_time_s": summary.get("wall_time_s")})  # fmt: skip
    return best


def measure_validation(model: Path, opts: PipelineOptions) -> dict[str, Any]:
    """Run the model's inference loop on every validation frame: per-step poses, candidate scores and GT.

    Returns arrays ``gt (N,7)``, ``steps (N,K+1,7)`` and ``scores {name: (N,)}`` (score of the final estimate).
    """
    from tqdm import tqdm

    from apr_localizer.checkpoints import load_model
    from apr_localizer.localizer import Localizer, LocalizerOptions
    from apr_localizer.uncertainty import SCORES
    from apr_training.datasets.labels import read_labels
    from apr_training.datasets.torch_datasets import load_rgb

    bundle = load_model(model)
    has_pae = bundle.pae is not None or getattr(bundle.iapr, "pae", None) is not None
    loc = Localizer(bundle, LocalizerOptions(backend="torch", device=opts.device, iapr_iterations=opts.iterations))
    val = read_labels(opts.out / "split_val.csv", dataset_root=opts.data, scene_names=list(bundle.scene_names))
    if len(val) > opts.calibration_frames > 0:  # evenly strided: every held-out sequence stays represented
        val = val.take(np.linspace(0, len(val) - 1, opts.calibration_frames).round().astype(int))
    steps, scores = [], {n: [] for n in SCORES if n != "pae_gap" or has_pae}
    pae_ms = []
    for i in tqdm(range(len(val)), desc="calibrate", disable=not opts.progress, leave=False):
        ests = loc.run_steps(load_rgb(val.image_path(i, opts.data)), all_scores=True)
        steps.append(np.stack([e.pose for e in ests]))
        pae_ms.append(ests[-1].timings_ms.get("uncertainty", math.nan))
        for name in scores:
            scores[name].append(ests[-1].scores[name])
    loc.close()
    gt = val.camera_to_world_pose().copy()  # the Localizer's estimates are camera-to-map whatever the labels say
    gt[:, 3:] /= np.linalg.norm(gt[:, 3:], axis=1, keepdims=True)
    return {"gt": gt, "steps": np.stack(steps), "scores": {k: np.asarray(v) for k, v in scores.items()},
            "pae_ms": float(np.nanmedian(pae_ms)) if pae_ms else math.nan}  # fmt: skip


def _errors(est: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from apr_localizer.geometry import pose_errors

    return pose_errors(est, gt)


def choose_and_fit(meas: dict[str, Any], train_positions: np.ndarray) -> tuple[Any, list[dict[str, Any]]]:
    """AUROC of every candidate score for "wrong" (> 0.5 m or > 10°); fit the best one; return ``(cal, table)``."""
    from apr_localizer.uncertainty import auroc, fit_calibration

    gt, final = meas["gt"], meas["steps"][:, -1]
    e_t, e_r = _errors(final, gt)
    wrong = (e_t > WRONG_POSITION_M) | (e_r > WRONG_ORIENTATION_DEG)
    table = []
    for name, s in meas["scores"].items():
        a = auroc(s, wrong)
        table.append(
            {
                "score": name,
                "auroc": None if math.isnan(a) else a,
                "finite_fraction": float(np.mean(np.isfinite(s))),
                "cost": f"one PAE pass, {meas['pae_ms']:.2f} ms/frame" if name == "pae_gap" else "none (loop outputs)",
            }
        )
    ranked = sorted(table, key=lambda r: (r["auroc"] is not None, r["auroc"] or 0.0, r["finite_fraction"]))
    best = ranked[-1]["score"]
    s = meas["scores"][best]
    n = int(np.isfinite(s).sum())
    bins = max(1, min(10, n // 10 if n >= 20 else n // 2))
    extent = float(np.linalg.norm(np.ptp(train_positions, axis=0))) if len(train_positions) else 10.0
    top = float(np.nanmax(s)) if n else 1.0
    ceiling = (2.0 * top, max(extent, 1.0), math.pi / 2) if top > 0 else None
    cal = fit_calibration(best, s, e_t, np.radians(e_r), bins=bins, ceiling=ceiling)
    return cal, table


def _summary(meas: dict[str, Any], cal: Any) -> dict[str, Any]:
    """Held-out accuracy (MS-Transformer vs iAPR per iteration) and uncertainty metrics of the calibrated score."""
    from apr_localizer.uncertainty import auroc, coverage_at_precision, within_sigma
    from apr_training.evaluation.robot import axis_errors

    gt, steps = meas["gt"], meas["steps"]
    acc = {}
    for k in range(steps.shape[1]):
        e_t, e_r = _errors(steps[:, k], gt)
        name = "ms_transformer" if k == 0 else f"iapr_{k}"
        acc[name] = {"position_median_m": float(np.median(e_t)), "orientation_median_deg": float(np.median(e_r)),
                     "within_0_5m_10deg": float(np.mean((e_t <= 0.5) & (e_r <= 10))),
                     "within_1_5m": float(np.mean(e_t <= 1.5))}  # fmt: skip
    final = steps[:, -1]
    e_t, e_r = _errors(final, gt)
    s = meas["scores"][cal.score]
    sig = np.array([cal.sigma(float(v)) for v in s])
    per_axis_p, per_axis_r = axis_errors(final, gt)  # the evaluation's one per-axis definition (map frame)
    a = auroc(s, (e_t > WRONG_POSITION_M) | (e_r > WRONG_ORIENTATION_DEG))
    unc = {"score": cal.score, "auroc": None if math.isnan(a) else a,
           "coverage_at_95_precision": coverage_at_precision(s, (e_t <= OK_POSITION_M) & (e_r <= OK_ORIENTATION_DEG)),
           "within_1sigma": 0.5 * (within_sigma(per_axis_p, sig[:, 0], 1) + within_sigma(per_axis_r, sig[:, 1], 1)),
           "within_2sigma": 0.5 * (within_sigma(per_axis_p, sig[:, 0], 2) + within_sigma(per_axis_r, sig[:, 1], 2)),
           "note": "in-sample: the calibration is fitted on the same validation frames"}  # fmt: skip
    return {"frames": int(len(gt)), "accuracy": acc, "uncertainty": unc}


def _calibrate(opts: PipelineOptions) -> dict[str, Any]:
    from apr_training.datasets.labels import read_labels

    print("== pipeline: calibrate (validation split, every candidate score)", flush=True)
    meas = measure_validation(opts.out / "iapr" / "best.safetensors", opts)
    train = read_labels(opts.out / "split_train.csv", dataset_root=opts.data)
    cal, table = choose_and_fit(meas, train.pose[:, :3])
    report = {"candidates": table, "chosen": cal.score, "calibration": cal.to_dict(), **_summary(meas, cal)}
    atomic_write_text(opts.out / "calibration.json", json.dumps(report, indent=2) + "\n")
    _mark(opts.out, "calibrate", {"score": cal.score})
    return report


def _camera(opts: PipelineOptions) -> dict[str, Any] | None:
    """``intrinsics.json`` of the dataset root, else of the first CSV folder that has one (apr-synth, extraction)."""
    for folder in [opts.data, *(p.parent for p in opts.labels)]:
        if folder is not None and (folder / "intrinsics.json").is_file():
            return json.loads((folder / "intrinsics.json").read_text(encoding="utf-8"))
    log.warning("pipeline: no intrinsics.json next to the data: the model carries no training camera")
    return None


def _package(opts: PipelineOptions, report: dict[str, Any]) -> Path:
    import torch

    from apr_localizer.checkpoints import load_model, save_model
    from apr_localizer.uncertainty import Calibration

    b = load_model(opts.out / "iapr" / "best.safetensors")
    cal = Calibration.from_dict(report["calibration"])
    prov = dict(b.provenance or {})
    prov["pipeline"] = {"labels": [str(p) for p in opts.labels], "config": opts.config, "overrides": opts.overrides,
                        "time_budget_min": opts.time_budget_min, "validation": report.get("accuracy")}  # fmt: skip
    if opts.command:
        prov["reproduce"] = opts.command
    path = opts.out / "model.safetensors"
    dtype = torch.float16 if opts.fp16 else torch.float32
    save_model(path, b.apr, b.iapr, b.pae, b.scene_names, b.preprocess, prov, dtype, uncertainty=cal,
               camera=_camera(opts), orientation=b.orientation)  # fmt: skip
    atomic_write_text(opts.out / "report.json", json.dumps(report, indent=2) + "\n")
    _mark(opts.out, "package", {"model": str(path)})
    return path


def format_report(report: dict[str, Any]) -> str:
    """Text table of the held-out accuracy and uncertainty (what the pipeline prints at the end)."""
    lines = [f"held-out validation frames: {report['frames']} (whole sequences never trained on)",
             f"{'method':<16}{'pos median m':>14}{'ori median deg':>16}{'<=0.5m&10deg':>14}{'<=1.5m':>9}"]  # fmt: skip
    for name, a in report["accuracy"].items():
        lines.append(f"{name:<16}{a['position_median_m']:>14.3f}{a['orientation_median_deg']:>16.2f}"
                     f"{a['within_0_5m_10deg']:>14.2f}{a['within_1_5m']:>9.2f}")  # fmt: skip
    lines.append("uncertainty candidates (AUROC for error > 0.5 m or > 10 deg):")
    for c in report["candidates"]:
        a = "n/a" if c["auroc"] is None else f"{c['auroc']:.3f}"
        lines.append(f"  {c['score']:<14}{a:>8}   cost: {c['cost']}")
    u = report["uncertainty"]
    a = "n/a (one class only)" if u["auroc"] is None else f"{u['auroc']:.3f}"
    lines.append(f"chosen: {u['score']}  AUROC {a}  coverage_at_95_precision "
                 f"{u['coverage_at_95_precision']:.2f}  within 1 sigma {u['within_1sigma']:.2f}  "
                 f"within 2 sigma {u['within_2sigma']:.2f} ({u['note']})")  # fmt: skip
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- driver
def run_pipeline(opts: PipelineOptions, train_main: TrainMain) -> dict[str, Any]:
    """Run every stage not yet marked done; return the report (also ``<out>/report.json``).

    ``train_main`` runs one trainer from ``apr-train`` arguments (:func:`apr_training.cli.train.main`; passed in so
    that this module does not import the command line that dispatches to it).
    """
    out = opts.out
    for csv in opts.labels:
        if not csv.is_file():
            raise TrainError(f"--labels {csv} does not exist; expected a label CSV")
    root = _root(opts)
    if any(_done(out, s) for s in STAGES) and not opts.resume:
        raise TrainError(
            f"--out {out} already holds a pipeline run; pass --resume to continue it or choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not _done(out, "split"):
        _split(opts, root)
    opts = dataclasses.replace(opts, data=root)  # the merged CSVs' image paths are relative to the root
    ms = out / "ms-transformer" / "best.safetensors"
    pae = out / "pae" / "best.safetensors"
    if not _done(out, "ms-transformer"):
        ms = _train(opts, train_main, "ms-transformer", [])
    if not _done(out, "pae"):
        pae = _train(opts, train_main, "pae", ["--teacher", str(ms)])
    if not _done(out, "iapr"):
        _train(opts, train_main, "iapr", ["--teacher", str(ms), "--pae", str(pae)])
    report = _calibrate(opts)
    path = _package(opts, report)
    report["wall_time_s_this_run"] = time.perf_counter() - t0
    print(format_report(report), flush=True)
    print(f"== pipeline: done; the node loads {path}", flush=True)
    return report


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``apr-train pipeline``."""
    p = argparse.ArgumentParser(prog="apr-train pipeline", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example: apr-train pipeline --data data/space --labels data/space/train.csv "
                                       "--out runs/space --time-budget 40")  # fmt: skip
    p.add_argument("--data", type=Path, help="dataset root the CSV image paths are relative to (default: each CSV's "
                   "own folder)")  # fmt: skip
    p.add_argument("--labels", type=Path, nargs="+", required=True,
                   help="label CSV(s) of the recorded space (several sequences per scene; e.g. one CSV per extracted "
                   "mapping-run bag)")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="output directory (model.safetensors, report.json, ...)")
    p.add_argument("--time-budget", type=float, help="minutes for the whole pipeline (65/5/20 %% to the trainers)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="training and calibration device")
    p.add_argument("--resume", action="store_true", help="continue a killed run in --out")
    p.add_argument("--config", default="robot", help="training config (default: config/training/robot.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--iterations", type=int, default=3, help="iAPR iterations evaluated and calibrated (node default)")
    p.add_argument("--backbone-weights", help="MS-Transformer backbone initialisation ('imagenet' or a file)")
    p.add_argument("--init", type=Path,
                   help="MS-Transformer initial weights, e.g. an earlier run's ms-transformer/best.safetensors: "
                   "more training time for a space already trained (a warm restart: a new warm-up and cosine "
                   "cycle; same labels and config, so that the split and its validation stay held out)")  # fmt: skip
    p.add_argument("--max-steps", type=int, help="per trainer (smoke runs)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--calibration-frames", type=int, default=1000, help="validation frames used for the calibration")
    p.add_argument("--fp16", action="store_true", help="write model.safetensors with float16 weights (half the size)")
    p.add_argument("--command", help="how to reproduce the model, recorded in its provenance")
    return p


def pipeline_main(argv: Sequence[str], train_main: TrainMain) -> int:
    """Entry point of ``apr-train pipeline``; returns the exit code."""
    from apr_localizer.checkpoints import CheckpointError
    from apr_localizer.uncertainty import CalibrationError
    from apr_training.datasets.labels import LabelError

    from .config import ConfigError

    a = build_parser().parse_args(list(argv))
    opts = PipelineOptions(data=a.data, labels=list(a.labels), out=a.out, time_budget_min=a.time_budget,
                           device=a.device, resume=a.resume, config=a.config, overrides=list(a.set),
                           iterations=a.iterations, backbone_weights=a.backbone_weights, init=a.init,
                           max_steps=a.max_steps,
                           progress=not a.no_progress, fp16=a.fp16, calibration_frames=a.calibration_frames,
                           command=a.command or "apr-train pipeline " + " ".join(argv))  # fmt: skip
    try:
        run_pipeline(opts, train_main)
    except (ConfigError, TrainError, LabelError, CheckpointError, CalibrationError, FileNotFoundError) as e:
        print(f"apr-train pipeline: error: {e}", file=sys.stderr)
        return 1
    return 0
