"""``apr-eval``: accuracy and latency of a model on a label CSV, as in the papers (batch 1, scene withheld).

::

    apr-eval --model model.safetensors --data /data/7scenes --labels 7scenes_test.csv --out eval/ --iterations 3

Every frame runs through :func:`apr_training.evaluation.runner.run_frames` (the APR graph once, then ``N`` iAPR steps:
"MS-Transformer" and "iAPR (k it.)" for k = 1..N from one pass). Outputs in ``--out``: ``report.json``,
``report.md``, ``table.txt`` (also printed), ``frames.csv``, ``plots/`` and ``tum/<scene>_{gt,apr,iapr}.txt``
(:mod:`apr_training.evaluation.report`). Every method also gets hint success, its uncertainty (AUROC, coverage at
95 % precision, within 1σ/2σ when calibrated) and a risk–coverage table and plot (:mod:`..evaluation.robot`);
``--scores all`` compares the candidate uncertainty scores (AUROC, cost per frame). Exit status: 0 ok, 2 bad input.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apr_localizer.fileio import atomic_write_text

from ..datasets.labels import LabelError, LabelTable, validate_images
from ..evaluation import metrics, paper
from ..evaluation.report import write_outputs
from ..evaluation.runner import EvalError, LabelSource, build_report, run_frames
from .args import (
    add_engine_args,
    add_iterations_arg,
    add_model_args,
    add_output_args,
    add_scores_arg,
    parse_scores,
    run_cli,
    scene_names,
)

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="apr-eval",
        description="Evaluate an MS-Transformer (+ iAPR) model on a label CSV: median errors per scene, threshold "
        "accuracy, scene accuracy, latency; report.json/md, table.txt, frames.csv, plots and TUM trajectories.",
    )
    add_model_args(p)
    p.add_argument("--data", required=True, help="dataset root the CSV's img_path column is relative to")
    p.add_argument(
        "--labels",
        required=True,
        nargs="+",
        help="label CSV(s) (scene,split,seq,img_path,t1..q4); several (e.g. the per-scene test files) are evaluated "
        "as one set with a per-scene table",
    )
    p.add_argument(
        "--thresholds",
        help="METRES/DEGREES pairs, e.g. 5cm/5deg,0.25/2 (default 0.1/1,0.25/2,0.5/5,5/10; with --paper "
        "5cm/5deg,0.25/2,0.5/5,5/10)",
    )
    p.add_argument(
        "--paper",
        action="store_true",
        help="also print and write paper.md: per-scene medians beside the published numbers, average row = mean of "
        "the per-scene medians (evaluate the final-epoch last.safetensors)",
    )
    add_scores_arg(p)
    p.add_argument("--split", help="evaluate only the rows of this split (e.g. test); default: every row")
    add_engine_args(p)
    add_iterations_arg(
        p,
        "iAPR iterations N; methods 0..N are compared from one APR pass per frame (default: the iAPR config's "
        "num_iterations, 0 without an iAPR)",
    )
    p.add_argument("--limit", type=int, help="evaluate at most this many frames (after --stride)")
    p.add_argument("--stride", type=int, default=1, help="evaluate every k-th row of the CSV (default: 1)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up runs before timing, 0 = none (default: 2)")
    add_output_args(p)
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


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import torch

    from apr_localizer import __version__
    from apr_localizer.localizer import Localizer, LocalizerOptions

    names = scene_names(args.scene_names)
    options = LocalizerOptions(
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        iapr_iterations=args.iterations or 0,
        threads=args.threads,
        cache_dir=args.cache_dir,
    )
    loc = Localizer.from_files(args.model, args.iapr, args.pae, options=options, scene_names=names)
    try:
        has_refiner = loc.bundle.iapr is not None
        iterations = args.iterations
        if iterations is None:
            iterations = int(loc.bundle.iapr.config.num_iterations) if loc.bundle.iapr is not None else 0
        if iterations > 0 and not has_refiner:
            raise EvalError(
                f"--iterations {iterations} needs an iAPR model, but {args.model} has none (pass --iapr or use 0)"
            )
        full = paper.read_label_csvs(args.labels, args.data, scene_names=loc.scene_names)
        rows = _select_rows(full, args.split, args.stride, args.limit)
        table = full.take(rows)
        validate_images(table)
        if args.warmup > 0:
            loc.backend.warmup(args.warmup)
        started = time.perf_counter()
        source = LabelSource(table, rows)
        run = run_frames(loc, source, iterations, progress=not args.quiet, candidates=args.scores)
        elapsed = time.perf_counter() - started
        describe, backend, device = loc.describe(), loc.backend_name, loc.device
    finally:
        loc.close()
    info: dict[str, Any] = {
        "model": str(args.model),
        "iapr": str(args.iapr or ""),
        "pae": str(args.pae or ""),
        "labels": ", ".join(args.labels),
        "data": str(args.data),
        "backend": backend,
        "device": device,
        "precision": args.precision,
        "frames": len(table),
        "stride": args.stride,
        "limit": args.limit,
        "split": args.split or "all",
        "iterations": iterations,
        "uncertainty_score": run.score_name,
        "calibrated": run.sigmas is not None,
        "scene_selection": "classifier argmax (ground-truth scene withheld), batch 1",
        "tum_timestamps": "label CSV row index (0-based), in seconds",
        "wall_time_s": round(elapsed, 3),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "apr_localizer": __version__,
        "torch": torch.__version__,
        "model_scenes": list(run.scene_names),
        "localizer": describe,
        "command": ["apr-eval", *argv],
    }
    report = build_report(run, info, thresholds=args.thresholds)
    out = Path(args.out)
    write_outputs(out, run, report, plots=not args.no_plots, plane=args.plane)
    if args.paper:
        dataset = paper.detect_dataset(table.scenes)
        atomic_write_text(out / "paper.md", paper.paper_table(report.methods, dataset, markdown=True))
        if not args.quiet:
            print(paper.paper_table(report.methods, dataset), end="")
    if not args.quiet:
        print(metrics.format_text(report), end="")
        print(f"apr-eval: wrote {out}/report.json, report.md, table.txt, frames.csv, tum/, plots/")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``apr-eval`` entry point; returns the exit status (0 ok, 2 bad input)."""
    from apr_localizer.backends.base import BackendError
    from apr_localizer.localizer import ModelLoadError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.stride < 1:
        parser.error(f"--stride must be >= 1, got {args.stride}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if args.iterations is not None and args.iterations < 0:
        parser.error(f"--iterations must be >= 0, got {args.iterations}")
    try:
        args.scores = parse_scores(args.scores)
        default = paper.PAPER_THRESHOLDS if args.paper else metrics.DEFAULT_THRESHOLDS
        args.thresholds = paper.parse_thresholds(args.thresholds) if args.thresholds else default
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    errors: dict[type[BaseException], int] = {
        ModelLoadError: 2,
        BackendError: 2,
        LabelError: 2,
        FileNotFoundError: 2,
        EvalError: 2,
    }
    return run_cli("apr-eval", lambda: _run(args, argv), errors)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
