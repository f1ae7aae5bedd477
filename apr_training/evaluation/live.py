r"""``apr-eval-bag``: accuracy and latency of a model on a ROS 2 bag, offline or live through the localizer node.

::

    apr-eval-bag offline --model M.safetensors --bag BAG --image-topic /camera/image_raw \\
        --gt pose:/ground_truth/pose --out eval_bag/ [--stride 2] [--scene chess]
    apr-eval-bag live --model M.safetensors --bag BAG --image-topic /camera/image_raw \\
        --gt tf:map->camera_optical --out eval_live/ [--rate 1.0] [--params extra.yaml] [--backend onnxruntime]

Ground truth (``--gt``)
    ``pose:/topic`` (``PoseStamped``, ``PoseWithCovarianceStamped`` or ``Odometry``), ``odom:/topic``
    (``nav_msgs/Odometry``) or ``tf:PARENT->CHILD`` (the chain through ``/tf`` and ``/tf_static``, e.g.
    ``tf:map->camera_optical``). Every image is matched by its ``header.stamp``: pose topics give the sample with the
    same stamp or the nearest one within ``--tolerance`` seconds; TF is interpolated between the neighbouring
    transforms (linear position, slerp) and may be extrapolated by at most ``--tolerance``. Images without ground
    truth are skipped and counted (``frames_without_gt``). The ground truth must be the camera (optical frame) pose
    in the model's map frame, like the training labels.

``offline``
    Reads the bag with ``rosbags`` and runs the :class:`~apr_localizer.localizer.Localizer` graphs on every
    ``--stride``-th image in this process: the APR graph once, then ``N`` iAPR steps, so one pass reports
    "MS-Transformer" and "iAPR (k it.)" for k = 1..N like ``apr-eval``. Stage latencies (ms): ``decode`` (image
    message → RGB), ``preprocess``, ``apr``, ``iapr``, ``postprocess`` and ``total`` (their sum: the node's per-frame
    work).

``live``
    Starts ``localizer_node`` as a subprocess (``--ros-args --params-file``: the package's ``config/localizer.yaml``,
    then ``--params`` files, then the overrides of this command: model, image topic, autostart, ...), waits until it
    is active and subscribed, plays the bag's image topic (and its ``camera_info``) into live topics at the recorded
    rate times ``--rate`` with :class:`~apr_training.bags.player.BagPlayer`, records the node's ``~/pose`` with receipt
    times and its ``/diagnostics``, stops the node with SIGINT (exit code 0 expected) and evaluates the received
    poses. Poses are matched to images by ``header.stamp`` (the node stamps its outputs with the image stamp).

    Time stamps: by default the player **restamps** every played message with the wall-clock time at which it is
    sent, so a pose's end-to-end latency is ``receipt time − header.stamp``, exactly what a downstream consumer
    measures, and ``max_frame_age_s`` keeps its meaning without ``use_sim_time``; the player's log maps the new
    stamps back to the recorded ones (and so to the ground truth). ``--keep-stamps`` publishes the recorded stamps
    unchanged (e.g. for consumers that also read TF from the bag); the latency is then ``receipt time − send time``
    taken from the player's log. Either way it measures image publish → pose receipt across processes.

    The node only needs the topics, so ``ros2 bag play BAG --topics /camera/image_raw`` from a full ROS 2 install
    works as well (``launch/replay_eval.launch.py`` runs the node with ``ros2 bag play --clock`` and
    ``use_sim_time``); this command exists because ``rosbag2`` is not installable from PyPI and because it measures.

    Every ROS process runs with ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``, a private ``ROS_DOMAIN_ID``, a temporary
    ``ROS_LOG_DIR`` and the shared-memory Fast DDS profile; the command sets whichever the caller has not set and
    prints what it set.

Outputs in ``--out`` (both modes): ``report.json`` (every number), ``report.md``, ``table.txt`` (also printed),
``frames.csv`` (per frame: stamps, ground truth, estimates, errors, timings), ``tum/{gt,apr,iapr,live}.txt``
(``timestamp tx ty tz qx qy qz qw`` with the image stamp in seconds, so ``evo_ape tum tum/gt.txt tum/iapr.txt``
works), ``plots/`` (error CDF, top-down trajectory, errors over the frame index; live: latency histogram and
latency over the frame index); live also ``node.log``, ``node_params.yaml`` and ``played.csv``.

Exit status: 0 success; 1 the live run finished but failed (node exit code not 0, no pose received); 2 bad input
(missing topic, unreadable model, no ground truth); 3 timeout (node start, subscription); 130 interrupted.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apr_localizer import geometry

from ..bags.ground_truth import GroundTruth, load_ground_truth
from ..bags.io import IMAGE_MSGTYPES, BagError, bag_topics, iter_images
from ..ros_harness import NODE_NAME, HarnessError, NodeMonitor, NodeProcess, NodeTimeoutError, RosHarness, write_params
from . import metrics
from .runner import method_columns, method_name

__all__ = [
    "BagEvalError",
    "BagRun",
    "LiveRun",
    "build_parser",
    "main",
    "run_live",
    "run_offline",
]

_STAGES = ("decode", "preprocess", "apr", "iapr", "postprocess")


class BagEvalError(RuntimeError):
    """The evaluation cannot run (one sentence naming the bag, topic, file or option)."""


# =============================================================================================== offline
@dataclass
class BagRun:
    """Per-frame results of :func:`run_offline` on ``N`` matched frames with ``K`` refinement iterations.

    Attributes:
        frame_index: ``(N,)`` index of the image on its topic; ``stamps_ns``: ``(N,)`` its ``header.stamp``.
        gt: ``(N, 7)`` ground truth; ``gt_offset_ms``: ``(N,)`` distance to the ground-truth sample used.
        poses: ``(K+1, N, 7)`` the estimate after ``k`` iterations (NaN rows when invalid).
        pred_scene: ``(N,)`` predicted scene ids; ``confidence``: ``(N,)`` their probability.
        timings: stage → ``(N,)`` ms: ``decode``, ``preprocess``, ``apr``, ``encoder``, ``step1..stepK``,
            ``post0..postK``.
        images_read: images of the topic considered (after stride/limit); ``without_gt``: those skipped.

    """

    frame_index: np.ndarray
    stamps_ns: np.ndarray
    gt: np.ndarray
    gt_offset_ms: np.ndarray
    poses: np.ndarray
    pred_scene: np.ndarray
    confidence: np.ndarray
    timings: dict[str, np.ndarray]
    scene_names: list[str]
    iterations: int
    images_read: int
    without_gt: int

    def __len__(self) -> int:
        return len(self.stamps_ns)

    @property
    def pred_scene_names(self) -> list[str]:
        names = self.scene_names
        return [names[i] if 0 <= i < len(names) else str(i) for i in self.pred_scene.tolist()]

    def latency(self, k: int) -> dict[str, np.ndarray]:
        """Per-stage latency ``(N,)`` of the method with ``k`` iterations; ``total`` is their sum."""
        t = self.timings
        out = {"decode": t["decode"], "preprocess": t["preprocess"], "apr": t["apr"]}
        if k > 0:
            out["iapr"] = t["encoder"] + sum(t[f"step{i}"] for i in range(1, k + 1))
        out["postprocess"] = t[f"post{k}"]
        out["total"] = sum(out.values())
        return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _to_pose(pose: Any) -> np.ndarray:
    import torch

    p = pose[0].detach().to("cpu", torch.float64).numpy()
    try:
        return np.concatenate([p[:3], geometry.quat_normalize(p[3:])])
    except ValueError:  # zero or non-finite quaternion
        return np.full(7, np.nan)


def run_offline(
    localizer: Any,
    bag: str | Path,
    image_topic: str,
    gt: GroundTruth,
    iterations: int,
    stride: int = 1,
    limit: int | None = None,
    progress: bool = True,
) -> BagRun:
    """Localize every ``stride``-th image of ``image_topic`` that has ground truth (batch 1, scene withheld).

    The APR graph runs once per frame and ``iterations`` iAPR steps follow on the cached latents; the estimate after
    every step is kept. Images without ground truth within the tolerance are skipped (counted, never localized).
    """
    import torch
    from tqdm import tqdm

    backend = localizer.backend
    if iterations > 0 and not backend.has_refiner:
        raise BagEvalError(f"--iterations {iterations} needs an iAPR model; this model has none (use --iterations 0)")
    K = int(iterations)
    device = localizer.device
    rows: dict[str, list] = {k: [] for k in ("index", "stamp", "gt", "gt_dt", "scene", "conf")}
    poses: list[list[np.ndarray]] = [[] for _ in range(K + 1)]
    names = ["decode", "preprocess", "apr", "encoder", *(f"step{i}" for i in range(1, K + 1))]
    names += [f"post{k}" for k in range(K + 1)]
    timings: dict[str, list[float]] = {k: [] for k in names}
    read = without = 0
    total = -(-bag_topics(bag).get(image_topic, ("", 0))[1] // stride)
    total = min(total, limit) if limit is not None else total
    bar = tqdm(total=total or None, desc="apr-eval-bag", unit="frame", disable=not progress, file=sys.stderr)
    for frame in iter_images(bag, image_topic, stride, limit):
        read += 1
        gt_pose, dt_ms = gt.lookup(frame.stamp_ns)
        if gt_pose is None:
            without += 1
            bar.update(1)
            continue
        t1 = time.perf_counter()
        x = localizer.preprocess(frame.rgb)
        _sync(device)
        t2 = time.perf_counter()
        out = backend.run_apr(x)
        _sync(device)
        t3 = time.perf_counter()
        step_ms = dict.fromkeys(names, 0.0)
        step_ms["decode"], step_ms["preprocess"], step_ms["apr"] = frame.decode_ms, (t2 - t1) * 1e3, (t3 - t2) * 1e3
        scene_t = out["scene"]
        steps = [out["pose"]]
        if K > 0:
            lt, lr = out["latent_t"], out["latent_rot"]
            if backend.needs_encoder:
                ts = time.perf_counter()
                lt, lr = backend.run_encoder(x, scene_t)
                _sync(device)
                step_ms["encoder"] = (time.perf_counter() - ts) * 1e3
            pose = out["pose"]
            for k in range(1, K + 1):
                ts = time.perf_counter()
                pose = backend.run_refine(lt, lr, pose, scene_t)
                _sync(device)
                step_ms[f"step{k}"] = (time.perf_counter() - ts) * 1e3
                steps.append(pose)
        for k, p in enumerate(steps):
            ts = time.perf_counter()
            poses[k].append(_to_pose(p))
            step_ms[f"post{k}"] = (time.perf_counter() - ts) * 1e3
        s = int(scene_t[0])
        for name in names:
            timings[name].append(step_ms[name])
        rows["index"].append(frame.index)
        rows["stamp"].append(frame.stamp_ns)
        rows["gt"].append(gt_pose)
        rows["gt_dt"].append(dt_ms)
        rows["scene"].append(s)
        rows["conf"].append(float(torch.exp(out["scene_log_probs"][0, s].float())))
        bar.update(1)
    bar.close()
    if read == 0:
        raise BagEvalError(f"topic {image_topic} of bag {bag} has no images to evaluate")
    n = len(rows["index"])
    return BagRun(
        frame_index=np.asarray(rows["index"], dtype=np.int64),
        stamps_ns=np.asarray(rows["stamp"], dtype=np.int64),
        gt=np.asarray(rows["gt"], dtype=np.float64).reshape(n, 7),
        gt_offset_ms=np.asarray(rows["gt_dt"], dtype=np.float64),
        poses=np.asarray(poses, dtype=np.float64).reshape(K + 1, n, 7),
        pred_scene=np.asarray(rows["scene"], dtype=np.int64),
        confidence=np.asarray(rows["conf"], dtype=np.float64),
        timings={k: np.asarray(v, dtype=np.float64) for k, v in timings.items()},
        scene_names=list(localizer.scene_names),
        iterations=K,
        images_read=read,
        without_gt=without,
    )


def build_offline_report(run: BagRun, scene: str | None, label: str, info: Mapping[str, Any]) -> metrics.EvalReport:
    """One method per iteration count ``0..K``; scene accuracy only when the true ``scene`` is given."""
    scenes = [scene or label] * len(run)
    methods = [
        metrics.per_scene_metrics(
            run.poses[k],
            run.gt,
            scenes,
            run.pred_scene_names if scene else None,
            run.latency(k),
            name=method_name(k),
        )
        for k in range(run.iterations + 1)
    ]
    return metrics.EvalReport(methods, dict(info))


# =============================================================================================== outputs
def _fmt(v: float) -> str:
    return "nan" if not np.isfinite(v) else f"{v:.9g}"


_COMPS = ("x", "y", "z", "qw", "qx", "qy", "qz")


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


def write_offline_frames_csv(path: Path, run: BagRun) -> Path:
    """``frames.csv``: per frame the stamps, ground truth, every method's estimate and errors, scene and timings."""
    comps, suffix = method_columns(run, "decode")
    header = ["frame", "stamp_ns", "stamp_s", "gt_offset_ms", "pred_scene", "confidence", *(f"gt_{c}" for c in _COMPS)]
    pred = run.pred_scene_names
    rows = []
    for i in range(len(run)):
        row: list[Any] = [int(run.frame_index[i]), int(run.stamps_ns[i]), f"{run.stamps_ns[i] * 1e-9:.9f}"]
        row += [_fmt(run.gt_offset_ms[i]), pred[i], _fmt(run.confidence[i]), *(_fmt(v) for v in run.gt[i])]
        rows.append(row + suffix(i))
    return _write_csv(path, header + comps, rows)


def _plots(
    out: Path, gt: np.ndarray, estimates: dict[str, np.ndarray], frame_index: np.ndarray, title: str, plane: str
) -> list[Path]:
    from . import plots

    errs = {name: metrics.frame_errors(p, gt)[:2] for name, p in estimates.items()}
    written = [plots.plot_error_cdf(errs, out / "error_cdf.png", f"{title}: error CDF", metrics.DEFAULT_THRESHOLDS)]
    written.append(plots.plot_trajectory(gt, estimates, out / "trajectory.png", f"{title}: top-down", plane))
    written.append(plots.plot_errors_over_frames(errs, out / "errors.png", f"{title}: errors over the image index"))
    return written


def plot_latency(latency_ms: np.ndarray, frame_index: np.ndarray, path: Path, title: str) -> Path:
    """Histogram of the end-to-end latency and the latency over the image index (one PNG)."""
    from matplotlib.figure import Figure

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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _write_reports(out: Path, report: metrics.EvalReport, extra_text: str = "", extra_md: str = "") -> str:
    """Write report.json/md and table.txt; return the text table."""
    report.write_json(out / "report.json")
    md = metrics.format_markdown(report)
    text = metrics.format_text(report)
    if extra_md:
        md = md + "\n" + extra_md
    if extra_text:
        text = text + "\n" + extra_text
    (out / "report.md").write_text(md, encoding="utf-8")
    (out / "table.txt").write_text(text, encoding="utf-8")
    return text


def write_offline_outputs(
    out: Path, run: BagRun, report: metrics.EvalReport, plots: bool, plane: str, title: str
) -> str:
    """Write every offline output file; return the text table."""
    out.mkdir(parents=True, exist_ok=True)
    text = _write_reports(out, report)
    write_offline_frames_csv(out / "frames.csv", run)
    stamps_s = run.stamps_ns.astype(np.float64) * 1e-9
    metrics.write_tum(out / "tum" / "gt.txt", stamps_s, run.gt)
    metrics.write_tum(out / "tum" / "apr.txt", stamps_s, run.poses[0])
    if run.iterations > 0:
        metrics.write_tum(out / "tum" / "iapr.txt", stamps_s, run.poses[run.iterations])
    if plots and len(run):
        shown = [0] + ([run.iterations] if run.iterations > 0 else [])
        _plots(out / "plots", run.gt, {method_name(k): run.poses[k] for k in shown}, run.frame_index, title, plane)
    return text


# =============================================================================================== live
@dataclass
class LiveRun:
    """Results of :func:`run_live`.

    ``frames`` has one row per played image: recorded stamp, sent stamp, send time, and (when a pose came back) the
    receipt time and the pose; ``diag`` is the node's last diagnostics after the replay.
    """

    image_topic: str
    played: list[Any]
    received: dict[int, tuple[int, np.ndarray]]  # sent stamp → (receipt_ns, pose)
    unmatched_poses: int
    diag: dict[str, str] | None
    diag_before: dict[str, str] | None
    node_exit_code: int
    play_wall_s: float
    bag_span_s: float
    keep_stamps: bool
    lateness_ms: list[float]
    info: dict[str, Any] = field(default_factory=dict)


def _diag_int(d: Mapping[str, str] | None, key: str) -> int | None:
    if not d or key not in d:
        return None
    try:
        return int(float(d[key]))
    except ValueError:
        return None


def run_live(args: argparse.Namespace, env_changes: Mapping[str, str], out: Path) -> LiveRun:
    """Start the node, replay the bag into it, record its poses, stop it (see the module docstring)."""
    from apr_localizer.resources import config_path

    from ..bags.player import BagPlayer, BagPlayerError

    topics = bag_topics(args.bag)
    if args.image_topic not in topics:
        listing = ", ".join(f"{t} ({v[0]})" for t, v in sorted(topics.items())) or "none"
        raise BagEvalError(f"bag {args.bag} has no topic {args.image_topic}; its topics are: {listing}")
    image_type = topics[args.image_topic][0]
    if image_type not in IMAGE_MSGTYPES:
        raise BagEvalError(f"topic {args.image_topic} of bag {args.bag} is a {image_type}, not an image")
    play_topics = [args.image_topic]
    info_topic = args.camera_info_topic
    if info_topic == "auto":
        base = args.image_topic.rsplit("/", 1)[0] if "/" in args.image_topic.strip("/") else ""
        candidate = f"{base}/camera_info"
        info_topic = candidate if topics.get(candidate, ("",))[0] == "sensor_msgs/msg/CameraInfo" else "none"
    if info_topic != "none":
        if info_topic not in topics:
            raise BagEvalError(f"bag {args.bag} has no camera info topic {info_topic}")
        play_topics.append(info_topic)

    overrides: dict[str, Any] = {
        "autostart": True,
        "model.path": str(Path(args.model).resolve()),
        "image_topic": args.image_topic,
        "image_transport": "compressed" if image_type.endswith("CompressedImage") else "raw",
        "output_pose": "camera",  # evaluated against camera ground truth (the node's default is the base pose)
        "diagnostics_period_s": 0.5,
    }
    if args.iapr:
        overrides["model.iapr_path"] = str(Path(args.iapr).resolve())
    if args.pae:
        overrides["model.pae_path"] = str(Path(args.pae).resolve())
    for key, value in (
        ("backend", args.backend),
        ("device", args.device),
        ("precision", args.precision),
        ("threads", args.threads),
        ("cache_dir", args.cache_dir),
        ("iapr_iterations", args.iterations),
    ):
        if value is not None:
            overrides[key] = value
    params = [config_path("localizer.yaml"), *(Path(p) for p in args.params or [])]
    for p in params:
        if not p.is_file():
            raise BagEvalError(f"parameter file {p} does not exist")
    params.append(write_params(out / "node_params.yaml", overrides))

    env = dict(os.environ)
    session = RosHarness(name="apr_eval_bag")
    process: NodeProcess | None = None
    try:
        monitor = NodeMonitor(session, args.node_name)
        try:
            player = BagPlayer(
                args.bag,
                session.node,
                play_topics,
                rate=args.rate,
                restamp=not args.keep_stamps,
                start_offset_s=args.start_offset,
                duration_s=args.duration,
                qos_depth=10,
            )
        except BagPlayerError as exc:
            raise BagEvalError(str(exc)) from None
        process = NodeProcess(params, env, out / "node.log", node_name=args.node_name)
        _say(
            args,
            f"apr-eval-bag: started localizer_node (pid {process.pid}); waiting until it is active "
            f"(up to {args.startup_timeout:g} s; log {out / 'node.log'})",
        )
        started = time.monotonic()
        monitor.wait_active(process, [player.publishers[args.image_topic]], args.startup_timeout)
        _say(
            args,
            f"apr-eval-bag: node active after {time.monotonic() - started:.1f} s; playing "
            f"{player.counts[args.image_topic]} images from {args.image_topic} at rate {args.rate:g}",
        )
        diag_before = monitor.wait_diag(0, 5.0)
        result = player.play(on_publish=lambda _: process.alive() or player.stop())
        process.check_alive("the bag was replayed")
        images = result.on(args.image_topic)
        sent = {m.sent_stamp_ns for m in images}

        def settled() -> bool:
            return sent <= monitor.pose_stamps()

        # drain: until every image has a pose, or no new pose for --settle seconds, or --drain-timeout
        deadline = time.monotonic() + args.drain_timeout
        last_n, last_change = monitor.pose_count(), time.monotonic()
        while not settled() and time.monotonic() < deadline:
            process.check_alive("the bag was replayed")
            n = monitor.pose_count()
            if n != last_n:
                last_n, last_change = n, time.monotonic()
            elif time.monotonic() - last_change > args.settle:
                break
            time.sleep(0.05)
        diag = monitor.wait_diag(time.time_ns(), 3.0)
        received: dict[int, tuple[int, np.ndarray]] = {}
        unmatched = 0
        for stamp, receipt, pose in monitor.poses():
            if stamp in sent and stamp not in received:
                received[stamp] = (receipt, pose)
            else:
                unmatched += 1
    finally:
        code = process.stop(args.stop_timeout) if process is not None else -1
        session.close()
    return LiveRun(
        image_topic=args.image_topic,
        played=images,
        received=received,
        unmatched_poses=unmatched,
        diag=diag,
        diag_before=diag_before,
        node_exit_code=code,
        play_wall_s=result.wall_s,
        bag_span_s=result.bag_span_s,
        keep_stamps=args.keep_stamps,
        lateness_ms=[m.lateness_ms for m in result.messages],
        info={
            "played_topics": play_topics,
            "node_command": process.command if process else [],
            "params_files": [str(p) for p in params],
            "overrides": overrides,
            "environment_set": dict(env_changes),
        },
    )


def evaluate_live(
    live: LiveRun, gt: GroundTruth, scene: str | None, label: str, info: dict[str, Any]
) -> tuple[metrics.EvalReport, dict[str, Any], dict[str, np.ndarray]]:
    """Accuracy over the frames that got a pose, end-to-end latency, counts; returns (report, live summary, arrays)."""
    rows = []
    without_gt = 0
    for i, m in enumerate(live.played):
        gt_pose, dt_ms = gt.lookup(m.stamp_ns)
        got = live.received.get(m.sent_stamp_ns)
        if gt_pose is None:
            without_gt += 1
            continue
        if got is None:
            rows.append((i, m, gt_pose, dt_ms, None, math.nan))
            continue
        receipt, pose = got
        sent_ns = m.sent_stamp_ns if not live.keep_stamps else m.send_time_ns
        rows.append((i, m, gt_pose, dt_ms, pose, (receipt - sent_ns) * 1e-6))
    with_pose = [r for r in rows if r[4] is not None]
    n = len(with_pose)
    arrays = {
        "index": np.asarray([r[0] for r in with_pose], dtype=np.int64),
        "stamp_ns": np.asarray([r[1].stamp_ns for r in with_pose], dtype=np.int64),
        "sent_stamp_ns": np.asarray([r[1].sent_stamp_ns for r in with_pose], dtype=np.int64),
        "gt": np.asarray([r[2] for r in with_pose], dtype=np.float64).reshape(n, 7),
        "gt_offset_ms": np.asarray([r[3] for r in with_pose], dtype=np.float64),
        "pose": np.asarray([r[4] for r in with_pose], dtype=np.float64).reshape(n, 7),
        "latency_ms": np.asarray([r[5] for r in with_pose], dtype=np.float64),
    }
    played = len(live.played)
    received = len(live.received)
    d = live.diag or {}
    before = live.diag_before or {}

    def delta(key: str) -> int | None:
        a, b = _diag_int(d, key), _diag_int(before, key)
        return None if a is None else a - (b or 0)

    summary: dict[str, Any] = {
        "images_played": played,
        "poses_received": received,
        "received_fraction": received / played if played else math.nan,
        "frames_without_pose": played - received,
        "frames_without_gt": without_gt,
        "evaluated_frames": n,
        "poses_not_matching_an_image": live.unmatched_poses,
        "node_frames_received": delta("frames_received"),
        "node_frames_processed": delta("frames_processed"),
        "node_poses_published": delta("poses_published"),
        "node_dropped_frames": delta("dropped_frames"),
        "node_dropped_unprocessed": delta("dropped_unprocessed"),
        "node_dropped_in_transport": delta("dropped_in_transport"),
        "node_stale_frames": delta("stale_frames"),
        "node_rejected_messages": delta("rejected_messages"),
        "node_low_confidence": delta("low_confidence"),
        "node_non_finite": delta("non_finite"),
        "node_processing_errors": delta("processing_errors"),
        "node_inference_ms_p50": _float(d.get("inference_ms_p50")),
        "node_inference_ms_p90": _float(d.get("inference_ms_p90")),
        "node_latency_ms_p50": _float(d.get("latency_ms_p50")),
        "node_backend": d.get("backend", ""),
        "node_device": d.get("device", ""),
        "node_exit_code": live.node_exit_code,
        "play_wall_s": live.play_wall_s,
        "bag_span_s": live.bag_span_s,
        "play_rate_hz": (played - 1) / live.play_wall_s if played > 1 and live.play_wall_s > 0 else math.nan,
        "player_lateness_ms": metrics.latency_stats(live.lateness_ms),
        "end_to_end_latency_ms": metrics.latency_stats(arrays["latency_ms"]),
        "latency_definition": (
            "pose receipt (wall clock) - image send time; the player restamped each image with its send time, so "
            "this equals receipt - header.stamp"
            if not live.keep_stamps
            else "pose receipt (wall clock) - image send time from the player's log (recorded stamps kept)"
        ),
        "stamps": "recorded stamps kept (--keep-stamps)" if live.keep_stamps else "restamped with the send time",
    }
    method = metrics.per_scene_metrics(
        arrays["pose"],
        arrays["gt"],
        [scene or label] * n,
        None,
        {"total": arrays["latency_ms"]},
        name="localizer_node (live)",
    )
    report = metrics.EvalReport([method], {**info, "live": summary})
    return report, summary, arrays


def _float(v: str | None) -> float:
    try:
        return float(v) if v is not None else math.nan
    except ValueError:
        return math.nan


def format_live_summary(s: Mapping[str, Any], markdown: bool = False) -> str:
    """Format the live-replay facts as an aligned table (or Markdown)."""
    lat = s["end_to_end_latency_ms"]

    def ms(v: float) -> str:
        return "n/a" if v is None or not math.isfinite(v) else f"{v:.1f}"

    def count(v: int | None) -> str:
        return "n/a" if v is None else str(v)

    rows = [
        ["images played", f"{s['images_played']} ({ms(s['play_rate_hz'])} Hz over {s['play_wall_s']:.2f} s)"],
        [
            "poses received",
            f"{s['poses_received']} ({100 * s['received_fraction']:.1f} %)" if s["images_played"] else "0",
        ],
        ["frames without a pose", str(s["frames_without_pose"])],
        [
            "dropped by the node",
            f"{count(s['node_dropped_frames'])} (unprocessed {count(s['node_dropped_unprocessed'])}"
            f", in transport {count(s['node_dropped_in_transport'])}, stale {count(s['node_stale_frames'])}, rejected "
            f"{count(s['node_rejected_messages'])}, low confidence {count(s['node_low_confidence'])})",
        ],
        ["frames without ground truth", str(s["frames_without_gt"])],
        [
            "end-to-end latency (ms)",
            f"median {ms(lat['median'])}, p90 {ms(lat['p90'])}, p99 {ms(lat['p99'])}, "
            f"max {ms(lat['max'])} (n={lat['n']})",
        ],
        [
            "node inference (ms)",
            f"p50 {ms(s['node_inference_ms_p50'])}, p90 {ms(s['node_inference_ms_p90'])} "
            f"({s['node_backend'] or '?'}/{s['node_device'] or '?'})",
        ],
        [
            "player lateness (ms)",
            f"median {ms(s['player_lateness_ms']['median'])}, max {ms(s['player_lateness_ms']['max'])}",
        ],
        ["node exit code", str(s["node_exit_code"])],
    ]
    title = "Live replay through localizer_node"
    if markdown:
        return f"## {title}\n\n" + metrics.render_table(["Quantity", "Value"], rows, markdown=True) + "\n"
    width = max(len(k) for k, _ in rows)
    return "\n".join([title, *(f"  {k.ljust(width)}  {v}" for k, v in rows)]) + "\n"


def write_live_outputs(
    out: Path,
    live: LiveRun,
    report: metrics.EvalReport,
    summary: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    plots: bool,
    plane: str,
    title: str,
) -> str:
    """Write every live output file; return the text table."""
    text = _write_reports(out, report, format_live_summary(summary), format_live_summary(summary, markdown=True))
    errs = metrics.frame_errors(arrays["pose"], arrays["gt"])[:2] if len(arrays["pose"]) else (np.zeros(0),) * 2
    header = [
        "frame",
        "stamp_ns",
        "stamp_s",
        "sent_stamp_ns",
        "gt_offset_ms",
        *(f"gt_{c}" for c in _COMPS),
        *(f"live_{c}" for c in _COMPS),
        "live_pos_err_m",
        "live_rot_err_deg",
        "end_to_end_ms",
    ]
    rows = []
    for i in range(len(arrays["index"])):
        rows.append(
            [
                int(arrays["index"][i]),
                int(arrays["stamp_ns"][i]),
                f"{arrays['stamp_ns'][i] * 1e-9:.9f}",
                int(arrays["sent_stamp_ns"][i]),
                _fmt(arrays["gt_offset_ms"][i]),
                *(_fmt(v) for v in arrays["gt"][i]),
                *(_fmt(v) for v in arrays["pose"][i]),
                _fmt(errs[0][i]),
                _fmt(errs[1][i]),
                _fmt(arrays["latency_ms"][i]),
            ]
        )
    _write_csv(out / "frames.csv", header, rows)
    played_rows = []
    for i, m in enumerate(live.played):
        got = live.received.get(m.sent_stamp_ns)
        played_rows.append(
            [
                i,
                m.stamp_ns,
                m.sent_stamp_ns,
                m.send_time_ns,
                f"{m.lateness_ms:.3f}",
                got[0] if got else "",
                int(got is not None),
            ]
        )
    _write_csv(
        out / "played.csv",
        ["frame", "stamp_ns", "sent_stamp_ns", "send_time_ns", "lateness_ms", "pose_receipt_ns", "pose_received"],
        played_rows,
    )
    stamps_s = arrays["stamp_ns"].astype(np.float64) * 1e-9
    metrics.write_tum(out / "tum" / "gt.txt", stamps_s, arrays["gt"])
    metrics.write_tum(out / "tum" / "live.txt", stamps_s, arrays["pose"])
    if plots and len(arrays["index"]):
        _plots(out / "plots", arrays["gt"], {"localizer_node (live)": arrays["pose"]}, arrays["index"], title, plane)
        plot_latency(
            arrays["latency_ms"],
            arrays["index"],
            out / "plots" / "latency.png",
            f"{title}: end-to-end latency (image publish → pose receipt)",
        )
    return text


# =============================================================================================== CLI
def _say(args: argparse.Namespace, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text, file=sys.stderr, flush=True)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="our model bundle (.safetensors) or an official APR .pth")
    p.add_argument("--iapr", help="official iAPR checkpoint (.pth) refining the --model estimates")
    p.add_argument("--pae", help="official pose auto-encoder checkpoint (.pth)")
    p.add_argument("--bag", required=True, help="rosbag2 directory (sqlite3 or mcap) or .mcap file")
    p.add_argument("--image-topic", required=True, help="sensor_msgs/Image or CompressedImage topic in the bag")
    p.add_argument("--gt", required=True, help="ground truth: pose:/topic | odom:/topic | tf:PARENT->CHILD")
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.02,
        help="largest stamp difference (s) to a ground-truth sample (nearest pose; TF extrapolation)",
    )
    p.add_argument(
        "--scene",
        help="the bag's true scene (one of the model's scenes): the table's row label; offline also "
        "reports the scene-classification accuracy",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--plane", default="xy", choices=("xy", "xz", "yz", "auto"), help="trajectory plot plane")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress output and no printed table")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="apr-eval-bag",
        description="Evaluate a model on a ROS 2 bag: offline (Localizer in this process) or live (the "
        "localizer_node process fed by a bag player). Writes report.json/md, table.txt, frames.csv, TUM files and "
        "plots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = p.add_subparsers(dest="mode", required=True, metavar="{offline,live}")
    off = sub.add_parser(
        "offline",
        help="run the Localizer on the bag's images in this process",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _common(off)
    off.add_argument("--scene-names", help="comma-separated scene names for official checkpoints (model order)")
    off.add_argument("--backend", default="auto", help="auto | torch | onnxruntime | tensorrt")
    off.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    off.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16", "int8"))
    off.add_argument("--threads", type=int, default=0, help="CPU threads of the engine (0 = physical cores)")
    off.add_argument("--cache-dir", help="ONNX/TensorRT engine cache directory")
    off.add_argument("--iterations", type=int, help="iAPR iterations; unset: the iAPR config's (0 without an iAPR)")
    off.add_argument("--stride", type=int, default=1, help="evaluate every k-th image")
    off.add_argument("--limit", type=int, help="evaluate at most this many images (after --stride)")
    off.add_argument("--warmup", type=int, default=2, help="warm-up runs before timing (0 = none)")
    live = sub.add_parser(
        "live",
        help="replay the bag into localizer_node and evaluate what it publishes",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _common(live)
    live.add_argument("--rate", type=float, default=1.0, help="playback speed factor")
    live.add_argument("--iterations", type=int, help="node parameter iapr_iterations (unset: from the parameter files)")
    live.add_argument(
        "--params",
        action="append",
        help="extra node --params-file (repeatable; command-line options of this command override them)",
    )
    live.add_argument("--backend", help="node parameter backend (unset: from the parameter files)")
    live.add_argument("--device", help="node parameter device")
    live.add_argument("--precision", help="node parameter precision")
    live.add_argument("--threads", type=int, help="node parameter threads")
    live.add_argument("--cache-dir", help="node parameter cache_dir")
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
    from apr_localizer.backends.base import BackendError
    from apr_localizer.localizer import Localizer, LocalizerOptions, ModelLoadError

    out = Path(args.out)
    try:
        gt = load_ground_truth(args.bag, args.gt, args.tolerance)
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
    except (ModelLoadError, BackendError, FileNotFoundError) as exc:
        raise BagEvalError(str(exc)) from None
    try:
        _check_scene(args.scene, loc.scene_names)
        has_refiner = loc.bundle.iapr is not None
        iterations = args.iterations
        if iterations is None:
            iterations = int(loc.bundle.iapr.config.num_iterations) if has_refiner else 0
        if iterations > 0 and not has_refiner:
            raise BagEvalError(f"--iterations {iterations} needs an iAPR model, but {args.model} has none")
        if args.warmup > 0:
            loc.backend.warmup(args.warmup)
        started = time.perf_counter()
        run = run_offline(
            loc, args.bag, args.image_topic, gt, iterations, args.stride, args.limit, progress=not args.quiet
        )
        elapsed = time.perf_counter() - started
        describe = loc.describe()
        backend, device = loc.backend_name, loc.device
    finally:
        loc.close()
    if not len(run):
        raise BagEvalError(
            f"none of the {run.images_read} images of {args.image_topic} has ground truth from {args.gt} within "
            f"{args.tolerance:g} s (raise --tolerance or check the stamps)"
        )
    info = {
        **_base_info(args, argv),
        "backend": backend,
        "device": device,
        "precision": args.precision,
        "iterations": iterations,
        "stride": args.stride,
        "limit": args.limit,
        "images_read": run.images_read,
        "frames": len(run),
        "frames_without_gt": run.without_gt,
        "scene_selection": "classifier argmax (ground-truth scene withheld), batch 1",
        "latency_total": "decode + preprocess + apr + iapr + postprocess (ms)",
        "wall_time_s": round(elapsed, 3),
        "model_scenes": list(run.scene_names),
        "localizer": describe,
    }
    report = build_offline_report(run, args.scene, Path(args.bag).name, info)
    text = write_offline_outputs(out, run, report, not args.no_plots, args.plane, Path(args.bag).name)
    if not args.quiet:
        print(text, end="")
        print(f"apr-eval-bag: wrote {out}/report.json, report.md, table.txt, frames.csv, tum/, plots/")
    return 0


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
    live = run_live(args, env_changes, out)
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
    report, summary, arrays = evaluate_live(live, gt, args.scene, Path(args.bag).name, info)
    text = write_live_outputs(out, live, report, summary, arrays, not args.no_plots, args.plane, Path(args.bag).name)
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


def main(argv: Sequence[str] | None = None) -> int:
    """``apr-eval-bag`` entry point; returns the exit status (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.mode == "offline":
        if args.stride < 1:
            parser.error(f"--stride must be >= 1, got {args.stride}")
        if args.limit is not None and args.limit < 1:
            parser.error(f"--limit must be >= 1, got {args.limit}")
    if args.iterations is not None and args.iterations < 0:
        parser.error(f"--iterations must be >= 0, got {args.iterations}")
    try:
        if args.mode == "offline":
            return _main_offline(args, argv)
        from ..ros_harness import ros_environment

        with ros_environment(lambda text: _say(args, f"apr-eval-bag: set {text}")) as changes:
            return _main_live(args, argv, changes)
    except NodeTimeoutError as exc:
        print(f"apr-eval-bag: timeout: {exc}", file=sys.stderr)
        return 3
    except (BagEvalError, BagError, HarnessError) as exc:
        print(f"apr-eval-bag: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("apr-eval-bag: interrupted; the node was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
