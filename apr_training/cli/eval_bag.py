r"""``apr-eval-bag``: accuracy and latency of a model on a ROS 2 bag, offline or live through the localizer node.

::

    apr-eval-bag offline --model M.safetensors --bag BAG --image-topic /camera/image_raw \\
        --gt pose:/ground_truth/pose --out eval_bag/ [--stride 2] [--scene chess]
    apr-eval-bag live --model M.safetensors --bag BAG --image-topic /camera/image_raw \\
        --gt tf:map->camera_optical --out eval_live/ [--rate 1.0] [--params extra.yaml] [--backend onnxruntime]

Ground truth (``--gt``): ``pose:/topic``, ``odom:/topic`` or ``tf:PARENT->CHILD``, matched to every image by its
``header.stamp`` within ``--tolerance`` (:mod:`apr_training.bags.ground_truth`); images without ground truth are
skipped and counted (``frames_without_gt``). The ground truth must be the camera (optical frame) pose in the model's
map frame, like the training labels.

``offline`` runs the :class:`~apr_localizer.localizer.Localizer` on every ``--stride``-th image in this process
through :func:`apr_training.evaluation.runner.run_frames` ("MS-Transformer" and "iAPR (k it.)" for k = 1..N, like
``apr-eval``); stage latencies ``decode`` (message → RGB), ``preprocess``, ``apr``, ``iapr``, ``postprocess`` and
``total`` (their sum: the node's per-frame work).

``live`` replays the bag into ``localizer_node`` (:mod:`apr_training.evaluation.live`) and evaluates what it
publishes, with end-to-end latency (image publish → pose receipt). Every ROS process runs with
``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``, a private ``ROS_DOMAIN_ID``, a temporary ``ROS_LOG_DIR`` and the
shared-memory Fast DDS profile (:func:`apr_training.ros_harness.ros_environment`; what it sets is printed). The node
only needs the topics, so ``ros2 bag play`` works as well (``launch/replay_eval.launch.py``).

Outputs in ``--out``: ``report.json``, ``report.md``, ``table.txt`` (also printed), ``frames.csv``,
``tum/{gt,apr,iapr,live}.txt`` (the image stamp in seconds: ``evo_ape tum tum/gt.txt tum/iapr.txt``), ``plots/``;
live also ``node.log``, ``node_params.yaml`` and ``played.csv``.

Exit status: 0 success; 1 the live run finished but failed (node exit code not 0, no pose received); 2 bad input
(missing topic, unreadable model, no ground truth); 3 timeout (node start, subscription); 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..bags.ground_truth import load_ground_truth
from ..bags.io import BagError
from ..evaluation.live import BagEvalError, LiveOptions, evaluate_live, run_live, write_live_outputs
from ..evaluation.report import write_outputs
from ..evaluation.runner import BagSource, EvalError, build_report, run_frames
from ..ros_harness import NODE_NAME, HarnessError, NodeTimeoutError
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


def _say(args: argparse.Namespace, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text, file=sys.stderr, flush=True)


def _common(p: argparse.ArgumentParser, offline: bool) -> None:
    add_model_args(p, scene_names=offline)
    p.add_argument("--bag", required=True, help="rosbag2 directory (sqlite3 or mcap) or .mcap file")
    p.add_argument("--image-topic", required=True, help="sensor_msgs/Image or CompressedImage topic in the bag")
    p.add_argument("--gt", required=True, help="ground truth: pose:/topic | odom:/topic | tf:PARENT->CHILD")
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.02,
        help="largest stamp difference (s) to a ground-truth sample (nearest pose; every TF edge)",
    )
    p.add_argument(
        "--scene",
        help="the bag's true scene (one of the model's scenes): the table's row label; offline also "
        "reports the scene-classification accuracy",
    )
    add_output_args(p)
    add_engine_args(p, defaults=offline, what="" if offline else "node parameter:")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="apr-eval-bag",
        description="Evaluate a model on a ROS 2 bag: offline (Localizer in this process) or live (the "
        "localizer_node process fed by a bag player). Writes report.json/md, table.txt, frames.csv, TUM files and "
        "plots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = p.add_subparsers(dest="mode", required=True, metavar="{offline,live}")
    fmt = argparse.ArgumentDefaultsHelpFormatter
    off = sub.add_parser("offline", help="run the Localizer on the bag's images in this process", formatter_class=fmt)
    _common(off, offline=True)
    add_iterations_arg(off, "iAPR iterations; unset: the iAPR config's (0 without an iAPR)")
    off.add_argument("--stride", type=int, default=1, help="evaluate every k-th image")
    off.add_argument("--limit", type=int, help="evaluate at most this many images (after --stride)")
    off.add_argument("--warmup", type=int, default=2, help="warm-up runs before timing (0 = none)")
    add_scores_arg(off)
    live = sub.add_parser(
        "live", help="replay the bag into localizer_node and evaluate what it publishes", formatter_class=fmt
    )
    _common(live, offline=False)
    live.add_argument("--rate", type=float, default=1.0, help="playback speed factor")
    add_iterations_arg(live, "node parameter iapr_iterations (unset: from the parameter files)")
    live.add_argument(
        "--params",
        action="append",
        help="extra node --params-file (repeatable; command-line options of this command override them)",
    )
    live.add_argument(
        "--camera-info-topic",
        default="auto",
        help="also play this CameraInfo topic; auto = <image topic's namespace>/camera_info if present; none = do not",
    )
    live.add_argument(
        "--keep-stamps",
        action="store_true",
        help="publish the recorded header stamps (default: restamp with the wall-clock send time)",
    )
    live.add_argument("--start-offset", type=float, default=0.0, help="skip this many seconds of the bag")
    live.add_argument("--duration", type=float, help="replay at most this many seconds of the bag")
    live.add_argument("--node-name", default=NODE_NAME, help="name of the node (its ~/pose is recorded)")
    live.add_argument(
        "--startup-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the node to load the model and subscribe",
    )
    live.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds to wait for outstanding poses after the replay"
    )
    live.add_argument(
        "--settle", type=float, default=3.0, help="stop waiting for outstanding poses when none arrived for this long"
    )
    live.add_argument("--stop-timeout", type=float, default=30.0, help="seconds to wait for the node to exit on SIGINT")
    return p


def _check_scene(scene: str | None, names: Sequence[str]) -> None:
    if scene is not None and scene not in names:
        raise BagEvalError(f"--scene {scene!r} is not one of the model's scenes {list(names)}")


def _base_info(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    import torch

    from apr_localizer import __version__

    return {
        "mode": args.mode,
        "model": str(args.model),
        "iapr": str(args.iapr or ""),
        "pae": str(args.pae or ""),
        "bag": str(args.bag),
        "image_topic": args.image_topic,
        "ground_truth": args.gt,
        "gt_tolerance_s": args.tolerance,
        "scene": args.scene or "",
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "apr_localizer": __version__,
        "torch": torch.__version__,
        "tum_timestamps": "image header.stamp (recorded), in seconds",
        "command": ["apr-eval-bag", *argv],
    }


def _main_offline(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from apr_localizer.localizer import Localizer, LocalizerOptions

    gt = load_ground_truth(args.bag, args.gt, args.tolerance)
    options = LocalizerOptions(
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        iapr_iterations=args.iterations or 0,
        threads=args.threads,
        cache_dir=args.cache_dir,
    )
    names = scene_names(args.scene_names)
    loc = Localizer.from_files(args.model, args.iapr, args.pae, options=options, scene_names=names)
    try:
        _check_scene(args.scene, loc.scene_names)
        has_refiner = loc.bundle.iapr is not None
        iterations = args.iterations
        if iterations is None:
            iterations = int(loc.bundle.iapr.config.num_iterations) if loc.bundle.iapr is not None else 0
        if iterations > 0 and not has_refiner:
            raise BagEvalError(f"--iterations {iterations} needs an iAPR model, but {args.model} has none")
        if args.warmup > 0:
            loc.backend.warmup(args.warmup)
        started = time.perf_counter()
        source = BagSource(args.bag, args.image_topic, gt, args.stride, args.limit)
        run = run_frames(loc, source, iterations, progress=not args.quiet, desc="apr-eval-bag", candidates=args.scores)
        elapsed = time.perf_counter() - started
        describe, backend, device = loc.describe(), loc.backend_name, loc.device
    finally:
        loc.close()
    if not len(run):
        raise BagEvalError(
            f"none of the {run.frames_read} images of {args.image_topic} has ground truth from {args.gt} within "
            f"{args.tolerance:g} s (raise --tolerance or check the stamps)"
        )
    info = {
        **_base_info(args, argv),
        "backend": backend,
        "device": device,
        "precision": args.precision,
        "iterations": iterations,
        "uncertainty_score": run.score_name,
        "calibrated": run.sigmas is not None,
        "stride": args.stride,
        "limit": args.limit,
        "images_read": run.frames_read,
        "frames": len(run),
        "frames_without_gt": run.without_gt,
        "scene_selection": "classifier argmax (ground-truth scene withheld), batch 1",
        "latency_total": "decode + preprocess + apr + iapr + postprocess (ms)",
        "wall_time_s": round(elapsed, 3),
        "model_scenes": list(run.scene_names),
        "localizer": describe,
    }
    label = Path(args.bag).name
    report = build_report(run, info, scenes=[args.scene or label] * len(run), score_scenes=bool(args.scene))
    out = Path(args.out)
    text = write_outputs(out, run, report, not args.no_plots, args.plane, label)
    if not args.quiet:
        print(text, end="")
        print(f"apr-eval-bag: wrote {out}/report.json, report.md, table.txt, frames.csv, tum/, plots/")
    return 0


def _live_options(args: argparse.Namespace) -> LiveOptions:
    from dataclasses import fields

    given = {f.name: getattr(args, f.name) for f in fields(LiveOptions) if f.name != "params"}
    return LiveOptions(**given, params=list(args.params or []))


def _main_live(args: argparse.Namespace, argv: Sequence[str], env_changes: Mapping[str, str]) -> int:
    from apr_localizer.checkpoints import read_metadata

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.rate > 0:
        raise BagEvalError(f"--rate must be > 0, got {args.rate}")
    if not Path(args.model).is_file():
        raise BagEvalError(f"--model {args.model} does not exist")
    gt = load_ground_truth(args.bag, args.gt, args.tolerance)
    if args.scene is not None and str(args.model).endswith(".safetensors"):
        _check_scene(args.scene, read_metadata(args.model).get("scene_names") or [args.scene])
    live = run_live(_live_options(args), env_changes, out, say=lambda text: _say(args, text))
    info = {
        **_base_info(args, argv),
        "rate": args.rate,
        "keep_stamps": args.keep_stamps,
        "node_params_files": live.info["params_files"],
        "node_command": " ".join(live.info["node_command"]),
        "played_topics": live.info["played_topics"],
        "node_overrides": live.info["overrides"],
        "environment_set": live.info["environment_set"],
        "scene_accuracy": "not available live (PoseStamped carries no scene)",
        "latency_total": "end to end: image publish -> pose receipt, across processes (ms)",
    }
    label = Path(args.bag).name
    calibrated = str(args.model).endswith(".safetensors") and bool(read_metadata(args.model).get("uncertainty"))
    report, summary, arrays = evaluate_live(live, gt, args.scene, label, info, calibrated)
    text = write_live_outputs(out, live, report, summary, arrays, not args.no_plots, args.plane, label)
    if not args.quiet:
        print(text, end="")
        print(
            f"apr-eval-bag: wrote {out}/report.json, report.md, table.txt, frames.csv, played.csv, tum/, plots/, "
            "node.log"
        )
    failures = []
    if live.node_exit_code != 0:
        failures.append(f"localizer_node exited with code {live.node_exit_code} (see {out / 'node.log'})")
    if not live.received:
        failures.append(f"no pose was received for the {len(live.played)} images played")
    for f in failures:
        print(f"apr-eval-bag: error: {f}", file=sys.stderr)
    return 1 if failures else 0


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.mode == "offline":
        return _main_offline(args, argv)
    from ..ros_harness import ros_environment

    with ros_environment(lambda text: _say(args, f"apr-eval-bag: set {text}")) as changes:
        return _main_live(args, argv, changes)


def main(argv: Sequence[str] | None = None) -> int:
    """``apr-eval-bag`` entry point; returns the exit status (see the module docstring)."""
    from apr_localizer.backends.base import BackendError
    from apr_localizer.localizer import ModelLoadError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.mode == "offline":
        if args.stride < 1:
            parser.error(f"--stride must be >= 1, got {args.stride}")
        if args.limit is not None and args.limit < 1:
            parser.error(f"--limit must be >= 1, got {args.limit}")
        try:
            args.scores = parse_scores(args.scores)
        except ValueError as e:
            parser.error(str(e))
    if args.iterations is not None and args.iterations < 0:
        parser.error(f"--iterations must be >= 0, got {args.iterations}")
    errors = [
        (NodeTimeoutError, 3),
        (BagEvalError, 2),
        (EvalError, 2),
        (BagError, 2),
        (HarnessError, 2),
        (ModelLoadError, 2),
        (BackendError, 2),
        (FileNotFoundError, 2),
    ]
    return run_cli("apr-eval-bag", lambda: _run(args, argv), errors)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
