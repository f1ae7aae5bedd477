"""Live evaluation: replay a bag into ``localizer_node`` (a subprocess) and evaluate the poses it publishes.

:func:`run_live` starts the node (``--ros-args --params-file``: the package's ``config/localizer.yaml``, then the
user's parameter files, then this run's overrides: model, image topic, autostart, ...), waits until it is active and
subscribed, plays the bag's image topic (and its ``camera_info``) at the recorded rate times ``rate`` with
:class:`~apr_training.bags.player.BagPlayer`, records the node's ``~/pose`` with receipt times and its
``/diagnostics`` (:class:`~apr_training.ros_harness.NodeMonitor`) and ``~/pose_with_covariance`` (the published
sigmas: ``σ = sqrt`` of the mean of the three position / orientation variances on the diagonal), stops the node
with SIGINT (exit code 0 expected); :func:`evaluate_live` matches the poses to images by ``header.stamp`` (the node
stamps its outputs with the image stamp) and to ground truth through the recorded stamps.

Time stamps: by default the player **restamps** every played message with the wall-clock time at which it is sent, so
a pose's end-to-end latency is ``receipt time − header.stamp``, exactly what a downstream consumer measures, and
``max_frame_age_s`` keeps its meaning without ``use_sim_time``; the player's log maps the new stamps back to the
recorded ones. ``keep_stamps`` publishes the recorded stamps unchanged; the latency is then ``receipt time − send
time`` from the player's log. Either way it measures image publish → pose receipt across processes.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..bags.ground_truth import GroundTruth
from ..bags.io import IMAGE_MSGTYPES, bag_topics
from ..ros_harness import NODE_NAME, NodeMonitor, NodeProcess, RosHarness, write_params
from . import metrics, robot
from .plots import plot_latency, plot_risk_coverage
from .report import POSE_COMPONENTS, fmt, plot_run, write_csv, write_reports

__all__ = [
    "BagEvalError",
    "LiveOptions",
    "LiveRun",
    "evaluate_live",
    "format_live_summary",
    "run_live",
    "write_live_outputs",
]


class BagEvalError(RuntimeError):
    """The evaluation cannot run (one sentence naming the bag, topic, file or option)."""


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
    sigmas: dict[int, tuple[float, float]] = field(default_factory=dict)  # sent stamp → published (σp m, σo rad)


def _diag_int(d: Mapping[str, str] | None, key: str) -> int | None:
    if not d or key not in d:
        return None
    try:
        return int(float(d[key]))
    except ValueError:
        return None


@dataclass
class LiveOptions:
    """What :func:`run_live` replays and how (the ``apr-eval-bag live`` options; None = the node's parameter files)."""

    model: str
    bag: str
    image_topic: str
    iapr: str | None = None
    pae: str | None = None
    rate: float = 1.0
    iterations: int | None = None
    params: Sequence[str] = ()
    backend: str | None = None
    device: str | None = None
    precision: str | None = None
    threads: int | None = None
    cache_dir: str | None = None
    camera_info_topic: str = "auto"
    keep_stamps: bool = False
    start_offset: float = 0.0
    duration: float | None = None
    node_name: str = NODE_NAME
    startup_timeout: float = 120.0
    drain_timeout: float = 30.0
    settle: float = 3.0
    stop_timeout: float = 30.0


def _play_topics(opts: LiveOptions) -> tuple[str, list[str]]:
    """Return the image topic's type and the topics to play (the images and, when present, their camera info)."""
    topics = bag_topics(opts.bag)
    if opts.image_topic not in topics:
        listing = ", ".join(f"{t} ({v[0]})" for t, v in sorted(topics.items())) or "none"
        raise BagEvalError(f"bag {opts.bag} has no topic {opts.image_topic}; its topics are: {listing}")
    image_type = topics[opts.image_topic][0]
    if image_type not in IMAGE_MSGTYPES:
        raise BagEvalError(f"topic {opts.image_topic} of bag {opts.bag} is a {image_type}, not an image")
    play_topics = [opts.image_topic]
    info_topic = opts.camera_info_topic
    if info_topic == "auto":
        base = opts.image_topic.rsplit("/", 1)[0] if "/" in opts.image_topic.strip("/") else ""
        candidate = f"{base}/camera_info"
        info_topic = candidate if topics.get(candidate, ("",))[0] == "sensor_msgs/msg/CameraInfo" else "none"
    if info_topic != "none":
        if info_topic not in topics:
            raise BagEvalError(f"bag {opts.bag} has no camera info topic {info_topic}")
        play_topics.append(info_topic)
    return image_type, play_topics


def _node_overrides(opts: LiveOptions, image_type: str) -> dict[str, Any]:
    """Node parameters this command sets (they override the parameter files)."""
    overrides: dict[str, Any] = {
        "autostart": True,
        "model.path": str(Path(opts.model).resolve()),
        "image_topic": opts.image_topic,
        "image_transport": "compressed" if image_type.endswith("CompressedImage") else "raw",
        "output_pose": "camera",  # the ground truth is the camera pose in the map frame
        "diagnostics_period_s": 0.5,
    }
    if opts.iapr:
        overrides["model.iapr_path"] = str(Path(opts.iapr).resolve())
    if opts.pae:
        overrides["model.pae_path"] = str(Path(opts.pae).resolve())
    for key, value in (
        ("backend", opts.backend),
        ("device", opts.device),
        ("precision", opts.precision),
        ("threads", opts.threads),
        ("cache_dir", opts.cache_dir),
        ("iapr_iterations", opts.iterations),
    ):
        if value is not None:
            overrides[key] = value
    return overrides


def _drain(monitor: NodeMonitor, process: NodeProcess, sent: set[int], opts: LiveOptions) -> None:
    """Wait until every image has a pose, or no new pose came for ``settle`` s, or ``drain_timeout`` passed."""
    deadline = time.monotonic() + opts.drain_timeout
    last_n, last_change = monitor.pose_count(), time.monotonic()
    while not sent <= monitor.pose_stamps() and time.monotonic() < deadline:
        process.check_alive("the bag was replayed")
        n = monitor.pose_count()
        if n != last_n:
            last_n, last_change = n, time.monotonic()
        elif time.monotonic() - last_change > opts.settle:
            break
        time.sleep(0.05)


def _params_files(opts: LiveOptions, out: Path, overrides: Mapping[str, Any]) -> list[Path]:
    """Return the node's ``--params-file`` list: the package's, the user's, then this run's overrides."""
    from apr_localizer.resources import config_path

    params = [config_path("localizer.yaml"), *(Path(p) for p in opts.params)]
    for p in params:
        if not p.is_file():
            raise BagEvalError(f"parameter file {p} does not exist")
    params.append(write_params(out / "node_params.yaml", overrides))
    return params


def _player(opts: LiveOptions, session: RosHarness, play_topics: Sequence[str]) -> Any:
    """Create the :class:`~apr_training.bags.player.BagPlayer` of ``play_topics`` on the harness node."""
    from ..bags.player import BagPlayer, BagPlayerError

    try:
        return BagPlayer(
            opts.bag,
            session.node,
            play_topics,
            rate=opts.rate,
            restamp=not opts.keep_stamps,
            start_offset_s=opts.start_offset,
            duration_s=opts.duration,
            qos_depth=10,
        )
    except BagPlayerError as exc:
        raise BagEvalError(str(exc)) from None


def _received_poses(monitor: NodeMonitor, sent: set[int]) -> tuple[dict[int, tuple[int, np.ndarray]], int]:
    """Sent stamp → (receipt ns, pose) of the first pose per played image; also the count of other poses."""
    received: dict[int, tuple[int, np.ndarray]] = {}
    unmatched = 0
    for stamp, receipt, pose in monitor.poses():
        if stamp in sent and stamp not in received:
            received[stamp] = (receipt, pose)
        else:
            unmatched += 1
    return received, unmatched


def _sigmas_recorder(session: RosHarness, node_name: str) -> Callable[[], dict[int, tuple[float, float]]]:
    """Record ``~/pose_with_covariance``; the returned function gives stamp → published (σp m, σo rad)."""
    from geometry_msgs.msg import PoseWithCovarianceStamped

    from apr_localizer.ros_convert import time_to_ns

    from ..bags.recorder import TopicRecorder

    topic = f"/{node_name}/pose_with_covariance"
    recorder = TopicRecorder(session.node, {topic: PoseWithCovarianceStamped})

    def sigmas() -> dict[int, tuple[float, float]]:
        out: dict[int, tuple[float, float]] = {}
        for r in recorder.snapshot(topic):
            d = np.diag(np.asarray(r.msg.pose.covariance, dtype=np.float64).reshape(6, 6))
            out.setdefault(
                time_to_ns(r.msg.header.stamp), (math.sqrt(max(d[:3].mean(), 0.0)), math.sqrt(max(d[3:].mean(), 0.0)))
            )
        return out

    return sigmas


def run_live(
    opts: LiveOptions, env_changes: Mapping[str, str], out: Path, say: Callable[[str], None] = lambda _: None
) -> LiveRun:
    """Start the node, replay the bag into it, record its poses, stop it (see the module docstring)."""
    image_type, play_topics = _play_topics(opts)
    overrides = _node_overrides(opts, image_type)
    params = _params_files(opts, out, overrides)
    session = RosHarness(name="apr_eval_bag")
    process: NodeProcess | None = None
    try:
        monitor = NodeMonitor(session, opts.node_name)
        published_sigmas = _sigmas_recorder(session, opts.node_name)
        player = _player(opts, session, play_topics)
        process = NodeProcess(params, dict(os.environ), out / "node.log", node_name=opts.node_name)
        say(
            f"apr-eval-bag: started localizer_node (pid {process.pid}); waiting until it is active "
            f"(up to {opts.startup_timeout:g} s; log {out / 'node.log'})"
        )
        started = time.monotonic()
        monitor.wait_active(process, [player.publishers[opts.image_topic]], opts.startup_timeout)
        say(
            f"apr-eval-bag: node active after {time.monotonic() - started:.1f} s; playing "
            f"{player.counts[opts.image_topic]} images from {opts.image_topic} at rate {opts.rate:g}"
        )
        diag_before = monitor.wait_diag(0, 5.0)
        proc = process

        def stop_when_the_node_died(_: Any) -> None:
            if not proc.alive():
                player.stop()

        result = player.play(on_publish=stop_when_the_node_died)
        process.check_alive("the bag was replayed")
        images = result.on(opts.image_topic)
        sent = {m.sent_stamp_ns for m in images if m.sent_stamp_ns is not None}
        _drain(monitor, process, sent, opts)
        diag = monitor.wait_diag(time.time_ns(), 3.0)
        received, unmatched = _received_poses(monitor, sent)
        sigmas = {k: v for k, v in published_sigmas().items() if k in received}
    finally:
        code = process.stop(opts.stop_timeout) if process is not None else -1
        session.close()
    return LiveRun(
        image_topic=opts.image_topic,
        played=images,
        received=received,
        unmatched_poses=unmatched,
        diag=diag,
        diag_before=diag_before,
        node_exit_code=code,
        play_wall_s=result.wall_s,
        bag_span_s=result.bag_span_s,
        keep_stamps=opts.keep_stamps,
        lateness_ms=[m.lateness_ms for m in result.messages],
        sigmas=sigmas,
        info={
            "played_topics": play_topics,
            "node_command": process.command if process else [],
            "params_files": [str(p) for p in params],
            "overrides": overrides,
            "environment_set": dict(env_changes),
        },
    )


def _match_live(live: LiveRun, gt: GroundTruth) -> tuple[dict[str, np.ndarray], int]:
    """Per-frame arrays of the played images that have ground truth and a pose; also the count without ground truth."""
    rows: list[tuple[Any, ...]] = []
    without_gt = 0
    for i, m in enumerate(live.played):
        gt_pose, dt_ms = gt.lookup(m.stamp_ns)
        got = live.received.get(m.sent_stamp_ns)
        if gt_pose is None:
            without_gt += 1
            continue
        if got is None:
            continue
        receipt, pose = got
        sent_ns = m.sent_stamp_ns if not live.keep_stamps else m.send_time_ns
        sigma = live.sigmas.get(m.sent_stamp_ns, (math.nan, math.nan))
        rows.append((i, m, gt_pose, dt_ms, pose, (receipt - sent_ns) * 1e-6, sigma))
    n = len(rows)
    arrays = {
        "index": np.asarray([r[0] for r in rows], dtype=np.int64),
        "stamp_ns": np.asarray([r[1].stamp_ns for r in rows], dtype=np.int64),
        "sent_stamp_ns": np.asarray([r[1].sent_stamp_ns for r in rows], dtype=np.int64),
        "gt": np.asarray([r[2] for r in rows], dtype=np.float64).reshape(n, 7),
        "gt_offset_ms": np.asarray([r[3] for r in rows], dtype=np.float64),
        "pose": np.asarray([r[4] for r in rows], dtype=np.float64).reshape(n, 7),
        "latency_ms": np.asarray([r[5] for r in rows], dtype=np.float64),
        "sigma_position_m": np.asarray([r[6][0] for r in rows], dtype=np.float64),
        "sigma_orientation_rad": np.asarray([r[6][1] for r in rows], dtype=np.float64),
    }
    return arrays, without_gt


def _node_counters(live: LiveRun) -> dict[str, Any]:
    """Return the node's counters over the replay (diagnostics after minus before) and its inference times."""
    d = live.diag or {}
    before = live.diag_before or {}

    def delta(key: str) -> int | None:
        a, b = _diag_int(d, key), _diag_int(before, key)
        return None if a is None else a - (b or 0)

    keys: tuple[str, ...] = (
        "frames_received",
        "frames_processed",
        "poses_published",
        "dropped_frames",
        "dropped_unprocessed",
    )
    keys += ("dropped_in_transport", "stale_frames", "rejected_messages", "low_confidence", "non_finite", "gated")
    out: dict[str, Any] = {f"node_{k}": delta(k) for k in (*keys, "processing_errors")}
    out.update(
        node_inference_ms_p50=_float(d.get("inference_ms_p50")),
        node_inference_ms_p90=_float(d.get("inference_ms_p90")),
        node_latency_ms_p50=_float(d.get("latency_ms_p50")),
        node_backend=d.get("backend", ""),
        node_device=d.get("device", ""),
    )
    return out


def evaluate_live(
    live: LiveRun, gt: GroundTruth, scene: str | None, label: str, info: dict[str, Any], calibrated: bool = False
) -> tuple[metrics.EvalReport, dict[str, Any], dict[str, np.ndarray]]:
    """Accuracy over the frames that got a pose, end-to-end latency, counts; returns (report, live summary, arrays).

    Hint success and uncertainty (:mod:`.robot`) use the covariance the node published: its position sigma is the
    score (AUROC, coverage); within 1σ/2σ only when the model is ``calibrated`` (otherwise the covariance is the
    configured constant, not a sigma).
    """
    arrays, without_gt = _match_live(live, gt)
    n = len(arrays["index"])
    played = len(live.played)
    received = len(live.received)
    summary: dict[str, Any] = {
        "images_played": played,
        "poses_received": received,
        "received_fraction": received / played if played else math.nan,
        "frames_without_pose": played - received,
        "frames_without_gt": without_gt,
        "evaluated_frames": n,
        "poses_not_matching_an_image": live.unmatched_poses,
        **_node_counters(live),
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
    latency = {"total": arrays["latency_ms"]}
    method = metrics.per_scene_metrics(
        arrays["pose"], arrays["gt"], [scene or label] * n, None, latency, name="localizer_node (live)"
    )
    sp, so = arrays["sigma_position_m"], arrays["sigma_orientation_rad"]
    unc = robot.FrameUncertainty("published_sigma", sp, sp if calibrated else None, so if calibrated else None)
    r = robot.robot_metrics(arrays["pose"], arrays["gt"], unc)
    method.hint, method.uncertainty, method.risk_coverage = r.hint, r.uncertainty, r.risk_coverage
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
        ["gated (σ above gating.max_sigma_*)", count(s.get("node_gated"))],
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
    text = write_reports(out, report, format_live_summary(summary), format_live_summary(summary, markdown=True))
    _write_live_frames(out / "frames.csv", arrays)
    _write_played(out / "played.csv", live)
    stamps_s = arrays["stamp_ns"].astype(np.float64) * 1e-9
    metrics.write_tum(out / "tum" / "gt.txt", stamps_s, arrays["gt"])
    metrics.write_tum(out / "tum" / "live.txt", stamps_s, arrays["pose"])
    if plots and len(arrays["index"]):
        plot_run(out / "plots", arrays["gt"], {"localizer_node (live)": arrays["pose"]}, title, plane)
        curve = robot.robot_metrics(
            arrays["pose"], arrays["gt"], robot.FrameUncertainty("published_sigma", arrays["sigma_position_m"])
        ).curve
        if curve is not None:
            plot_risk_coverage({"localizer_node (live, published sigma)": curve}, out / "plots" / "risk_coverage.png")
        plot_latency(
            arrays["latency_ms"],
            arrays["index"],
            out / "plots" / "latency.png",
            f"{title}: end-to-end latency (image publish → pose receipt)",
        )
    return text


def _write_live_frames(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """``frames.csv`` of a live run: stamps, ground truth, the node's pose, its errors and the end-to-end latency."""
    errs = metrics.frame_errors(arrays["pose"], arrays["gt"])[:2] if len(arrays["pose"]) else (np.zeros(0),) * 2
    header = [
        "frame",
        "stamp_ns",
        "stamp_s",
        "sent_stamp_ns",
        "gt_offset_ms",
        *(f"gt_{c}" for c in POSE_COMPONENTS),
        *(f"live_{c}" for c in POSE_COMPONENTS),
        "live_pos_err_m",
        "live_rot_err_deg",
        "end_to_end_ms",
        "sigma_position_m",
        "sigma_orientation_rad",
    ]
    rows: list[list[Any]] = []
    for i in range(len(arrays["index"])):
        rows.append(
            [
                int(arrays["index"][i]),
                int(arrays["stamp_ns"][i]),
                f"{arrays['stamp_ns'][i] * 1e-9:.9f}",
                int(arrays["sent_stamp_ns"][i]),
                fmt(arrays["gt_offset_ms"][i]),
                *(fmt(v) for v in arrays["gt"][i]),
                *(fmt(v) for v in arrays["pose"][i]),
                fmt(errs[0][i]),
                fmt(errs[1][i]),
                fmt(arrays["latency_ms"][i]),
                fmt(arrays["sigma_position_m"][i]),
                fmt(arrays["sigma_orientation_rad"][i]),
            ]
        )
    write_csv(path, header, rows)


def _write_played(path: Path, live: LiveRun) -> None:
    """``played.csv``: every played image with its stamps, send time, lateness and whether a pose came back."""
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
    header = ["frame", "stamp_ns", "sent_stamp_ns", "send_time_ns", "lateness_ms", "pose_receipt_ns", "pose_received"]
    write_csv(path, header, played_rows)
