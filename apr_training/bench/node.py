r"""``apr-bench node``: end-to-end latency, overhead, drops and memory of the localizer node across processes.

::

    apr-bench node [--model M] [--rates 15,30] [--flood-rate 100] [--duration 20] [--flood-duration 120] \\
                   [--backend auto] [--threads 0] [--json node_bench.json]

Three processes: a **publisher** subprocess (``python -m apr_training.bench.node _publisher``) sends ``--width`` x
``--height`` ``rgb8`` images at each rate, stamping every image with the wall-clock time right before
``publish``; the **node** (``localizer_node`` with the package's ``config/localizer.yaml`` plus the benchmark's
overrides) localizes them; **this process** subscribes to the node's ``~/pose`` and ``/diagnostics``, takes the
receipt time first thing in the callback and matches poses to images by stamp. Per rate phase:

* end-to-end latency = pose receipt − image stamp (median/p90/p99/max over the frames that got a pose);
* backend time: ``Localizer.localize`` on the same frame with the same backend/threads in this process **before**
  the node starts (no contention), plus the node's own ``inference_ms`` percentiles from ``/diagnostics`` (a rolling
  window of its last 600 frames);
* node overhead = median end-to-end − the node's median inference time (from ``/diagnostics``: same frames, same
  load; the in-process time when the node reports none), i.e. transport both ways, deserialization, decode, waiting
  in the 1-slot mailbox and publishing; ``overhead_ms_median_vs_in_process`` subtracts the in-process time instead;
* published (by the publisher) vs received (poses) counts, and the node's dropped frames from ``/diagnostics``
  (replaced in its 1-slot mailbox while it was busy, or lost in transport);
* node RSS (psutil) at the start and end of the phase, its growth in percent and peak, and the node's CPU use.

The last phase, the *flood* (``--flood-rate``, default 100 Hz for ``--flood-duration``, default 120 s), shows that
the node sheds load instead of queueing (latency stays bounded, drops grow) and that its memory does not grow.
Every process runs with ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``, a private ``ROS_DOMAIN_ID``, a temporary
``ROS_LOG_DIR`` and the shared-memory Fast DDS profile (``config/fastdds_shm_big.xml``; docs/performance.md has
the transport cost with and without it); what the command sets is printed.

Without ``--model`` a random-weight model of ``--arch`` (default: the published architecture with iAPR) is written to
a temporary file: its costs equal a trained model's. The JSON report is ``{"node": {...}}`` so that it can sit
next to the ``apr-bench`` report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apr_localizer.fileio import atomic_write_text

__all__ = ["NodeBenchError", "NodeBenchOptions", "format_table", "json_safe", "run_node_bench"]

DEFAULT_TOPIC = "/apr_bench/image_raw"


@dataclass
class NodeBenchOptions:
    """What :func:`run_node_bench` measures (the ``apr-bench node`` options)."""

    model: str | None = None
    arch: str = "published"
    rates: list[float] = field(default_factory=lambda: [15.0, 30.0])
    duration: float = 20.0
    flood_rate: float = 100.0
    flood_duration: float = 120.0
    warmup: float = 2.0
    width: int = 640
    height: int = 480
    topic: str = DEFAULT_TOPIC
    backend: str = "auto"
    device: str = "auto"
    precision: str = "fp32"
    threads: int = 0
    iterations: int | None = None
    cache_dir: str | None = None
    backend_runs: int = 20
    settle: float = 2.0
    startup_timeout: float = 180.0
    log_dir: str | None = None
    argv: list[str] = field(default_factory=list)


class NodeBenchError(RuntimeError):
    """The benchmark cannot run (one sentence naming the option, file or process)."""


# ================================================================================================ publisher process
def _publisher_main(argv: Sequence[str]) -> int:
    """Publish ``--count`` images at ``--rate`` Hz on ``--topic``; write the sent stamps to ``--out`` as JSON."""
    p = argparse.ArgumentParser(prog="node_bench _publisher")
    p.add_argument("--topic", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--out", required=True)
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the node's subscription")
    args = p.parse_args(list(argv))

    from ..ros_harness import RosHarness, prepare_ros_environment

    prepare_ros_environment()
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from apr_localizer import ros_convert

    rgb = _bench_frame(args.width, args.height)
    session = RosHarness(name="apr_bench_publisher")
    try:
        qos = QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE)
        pub = session.node.create_publisher(Image, args.topic, qos)
        msg = ros_convert.rgb_to_image(rgb, "rgb8", frame_id="camera_optical")
        deadline = time.monotonic() + args.wait
        while pub.get_subscription_count() < 1:
            if time.monotonic() > deadline:
                print(f"publisher: no subscriber on {args.topic} within {args.wait:g} s", file=sys.stderr)
                return 3
            time.sleep(0.01)
        stamps, lateness, publish_ms = [], [], []
        period = 1.0 / args.rate
        start = time.monotonic() + 0.05
        for i in range(args.count):
            due = start + i * period
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            lateness.append((time.monotonic() - due) * 1e3)
            now = time.time_ns()
            msg.header.stamp = ros_convert.ns_to_time(now)
            t0 = time.perf_counter()
            pub.publish(msg)
            publish_ms.append((time.perf_counter() - t0) * 1e3)
            stamps.append(now)
        wall = time.monotonic() - start
        atomic_write_text(
            Path(args.out),
            json.dumps(
                {
                    "stamps_ns": stamps,
                    "wall_s": wall,
                    "lateness_ms": _stats(lateness),
                    "publish_call_ms": _stats(publish_ms),
                }
            ),
        )
        time.sleep(0.2)  # let the reliable writer hand over the last samples before the process exits
        return 0
    finally:
        session.close()


def _bench_frame(width: int, height: int) -> np.ndarray:
    """Return a deterministic textured RGB frame (content does not change the cost of the fixed-size network)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), ((x + y) % 256)], axis=-1)
    noise = rng.integers(0, 48, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _stats(values: Sequence[float]) -> dict[str, float]:
    from ..evaluation.metrics import latency_stats

    return latency_stats(values)


# ================================================================================================ the benchmark
def _resolve_model(args: NodeBenchOptions, tmp: Path) -> tuple[Path, str]:
    if args.model:
        path = Path(args.model)
        if not path.is_file():
            raise NodeBenchError(f"--model {path} does not exist")
        return path.resolve(), str(path)
    from apr_localizer.checkpoints import save_model

    from .backends import build_random_bundle

    bundle = build_random_bundle(args.arch)
    path = tmp / f"random_{args.arch}.safetensors"
    save_model(path, bundle.apr, bundle.iapr, scene_names=bundle.scene_names, provenance=bundle.provenance)
    return path, f"random weights, {args.arch} architecture"


def _backend_time(model: Path, args: NodeBenchOptions, runs: int) -> dict[str, Any]:
    """``Localizer.localize`` on the benchmark frame in this process, with the node's backend options."""
    from apr_localizer.localizer import Localizer, LocalizerOptions

    options = LocalizerOptions(
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        iapr_iterations=args.iterations if args.iterations is not None else 3,
        threads=args.threads,
        cache_dir=args.cache_dir,
    )
    loc = Localizer.from_files(model, options=options)
    try:
        loc.warmup()
        rgb = _bench_frame(args.width, args.height)
        totals = [loc.localize(rgb).timings_ms["total"] for _ in range(runs)]
        return {
            "backend": loc.backend_name,
            "device": loc.device,
            "iterations": loc.iterations,
            "localize_ms": _stats(totals),
        }
    finally:
        loc.close()


def _rss(proc: Any) -> int:
    return int(proc.memory_info().rss)


def _diag_int(d: dict[str, str] | None, key: str) -> int | None:
    try:
        return int(float(d[key])) if d and key in d else None
    except ValueError:
        return None


def _diag_float(d: dict[str, str] | None, key: str) -> float:
    try:
        return float(d[key]) if d and key in d else math.nan
    except ValueError:
        return math.nan


def _run_phase(
    name: str,
    rate: float,
    duration: float,
    args: NodeBenchOptions,
    monitor: Any,
    node: Any,
    node_ps: Any,
    backend_ms: float,
    tmp: Path,
) -> dict[str, Any]:
    """One rate phase: publisher subprocess → node → this process; returns the phase's JSON record."""
    count = max(1, int(round(rate * duration)))
    before = monitor.wait_diag(time.time_ns(), 5.0)
    rss_start = _rss(node_ps)
    cpu_start = node_ps.cpu_times()
    wall_start = time.monotonic()
    stamps_file = tmp / f"stamps_{name}.json"
    cmd = [
        sys.executable,
        "-m",
        "apr_training.bench.node",
        "_publisher",
        "--topic",
        args.topic,
        "--rate",
        f"{rate}",
        "--count",
        str(count),
        "--width",
        str(args.width),
        "--height",
        str(args.height),
        "--out",
        str(stamps_file),
    ]
    env = dict(os.environ)
    import apr_localizer

    src = str(Path(apr_localizer.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    log = open(tmp / f"publisher_{name}.log", "wb")  # noqa: SIM115 - closed below
    pub = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    rss_samples = [(0.0, rss_start)]
    try:
        deadline = time.monotonic() + duration + 60.0
        while pub.poll() is None:
            node.check_alive(f"running the {name} phase")
            if time.monotonic() > deadline:
                raise NodeBenchError(f"the {name} publisher did not finish within {duration + 60:g} s")
            rss_samples.append((time.monotonic() - wall_start, _rss(node_ps)))
            time.sleep(min(1.0, max(0.05, duration / 20)))
    finally:
        if pub.poll() is None:
            pub.kill()
            pub.wait()
        log.close()
    if pub.returncode != 0:
        text = (tmp / f"publisher_{name}.log").read_text(errors="replace")[-2000:]
        raise NodeBenchError(f"the {name} publisher exited with code {pub.returncode}:\n{text}")
    sent = json.loads(stamps_file.read_text())
    stamps = set(sent["stamps_ns"])
    # drain: until every image has a pose or none arrived for args.settle seconds
    last_n, last_change = -1, time.monotonic()
    while time.monotonic() - last_change < args.settle:
        got = monitor.pose_stamps() & stamps
        if len(got) == len(stamps):
            break
        if len(got) != last_n:
            last_n, last_change = len(got), time.monotonic()
        time.sleep(0.05)
    rss_end = _rss(node_ps)
    cpu_end = node_ps.cpu_times()
    wall = time.monotonic() - wall_start
    rss_samples.append((wall, rss_end))
    after = monitor.wait_diag(time.time_ns(), 5.0)
    latencies = {}
    for stamp, receipt, _ in monitor.poses():
        if stamp in stamps and stamp not in latencies:
            latencies[stamp] = (receipt - stamp) * 1e-6
    lat = _stats(list(latencies.values()))

    def delta(key: str) -> int | None:
        a, b = _diag_int(after, key), _diag_int(before, key)
        return None if a is None else a - (b or 0)

    published = len(stamps)
    received = len(latencies)
    node_inf = _diag_float(after, "inference_ms_p50")
    cpu = (cpu_end.user - cpu_start.user) + (cpu_end.system - cpu_start.system)
    return {
        "phase": name,
        "rate_hz": rate,
        "duration_s": duration,
        "published": published,
        "publisher_wall_s": sent["wall_s"],
        "publisher_lateness_ms": sent["lateness_ms"],
        "publish_call_ms": sent["publish_call_ms"],
        "received": received,
        "received_fraction": received / published if published else math.nan,
        "output_rate_hz": received / sent["wall_s"] if sent["wall_s"] > 0 else math.nan,
        "end_to_end_ms": lat,
        "backend_ms_median_in_process": backend_ms,
        "node_inference_ms_p50": node_inf,
        "overhead_ms_median": lat["median"] - (node_inf if math.isfinite(node_inf) else backend_ms)
        if lat["n"]
        else math.nan,
        "overhead_ms_median_vs_in_process": lat["median"] - backend_ms if lat["n"] else math.nan,
        "node_inference_ms_p90": _diag_float(after, "inference_ms_p90"),
        "node_latency_ms_p50": _diag_float(after, "latency_ms_p50"),
        "node_frames_received": delta("frames_received"),
        "node_frames_processed": delta("frames_processed"),
        "node_poses_published": delta("poses_published"),
        "dropped_frames": delta("dropped_frames"),
        "dropped_unprocessed": delta("dropped_unprocessed"),
        "dropped_in_transport": delta("dropped_in_transport"),
        "node_rss_start_mb": rss_start / 2**20,
        "node_rss_end_mb": rss_end / 2**20,
        "node_rss_peak_mb": max(r for _, r in rss_samples) / 2**20,
        "node_rss_growth_pct": 100.0 * (rss_end - rss_start) / rss_start if rss_start else math.nan,
        "node_rss_samples_mb": [[round(t, 2), round(r / 2**20, 2)] for t, r in rss_samples],
        "node_cpu_percent": 100.0 * cpu / wall if wall > 0 else math.nan,
    }


def run_node_bench(args: NodeBenchOptions, env_changes: dict[str, str]) -> dict[str, Any]:
    """Run every phase and return the ``{"node": {...}}`` report."""
    import psutil

    from apr_localizer.resources import config_path

    from ..ros_harness import NODE_NAME, NodeMonitor, NodeProcess, RosHarness, write_params

    with tempfile.TemporaryDirectory(prefix="apr_node_bench_") as tmp_s:
        tmp = Path(tmp_s)
        out_dir = Path(args.log_dir) if args.log_dir else tmp
        out_dir.mkdir(parents=True, exist_ok=True)
        model, model_desc = _resolve_model(args, tmp)
        print(f"apr-bench node: measuring the backend in this process ({args.backend_runs} runs) ...", file=sys.stderr)
        backend = _backend_time(model, args, args.backend_runs)
        backend_ms = backend["localize_ms"]["median"]
        overrides: dict[str, Any] = {
            "autostart": True,
            "model.path": str(model),
            "image_topic": args.topic,
            "image_transport": "raw",
            "output_pose": "camera",  # no TF in the benchmark: publish the camera pose
            "backend": args.backend,
            "device": args.device,
            "precision": args.precision,
            "threads": args.threads,
            "diagnostics_period_s": 0.5,
        }
        if args.iterations is not None:
            overrides["iapr_iterations"] = args.iterations
        if args.cache_dir:
            overrides["cache_dir"] = args.cache_dir
        params = [config_path("localizer.yaml"), write_params(out_dir / "node_params.yaml", overrides)]
        phases = [(f"{r:g} Hz", r, args.duration) for r in args.rates]
        if args.flood_rate > 0:
            phases.append((f"flood {args.flood_rate:g} Hz", args.flood_rate, args.flood_duration))
        session = RosHarness(name="apr_bench_subscriber")
        node = None
        results = []
        try:
            from sensor_msgs.msg import Image

            monitor = NodeMonitor(session, NODE_NAME)
            probe = session.node.create_publisher(Image, args.topic, 1)  # only to see the node's subscription
            node = NodeProcess(params, dict(os.environ), out_dir / "node.log", node_name=NODE_NAME)
            print(
                f"apr-bench node: started localizer_node (pid {node.pid}); waiting until it is active ...",
                file=sys.stderr,
            )
            t0 = time.monotonic()
            monitor.wait_active(node, [probe], args.startup_timeout)
            startup_s = time.monotonic() - t0
            session.node.destroy_publisher(probe)
            node_ps = psutil.Process(node.pid)
            rss_active = _rss(node_ps)
            if args.warmup > 0:
                _run_phase("warmup", 5.0, args.warmup, args, monitor, node, node_ps, backend_ms, tmp)
            for name, rate, duration in phases:
                print(f"apr-bench node: {name} for {duration:g} s ...", file=sys.stderr)
                results.append(_run_phase(name, rate, duration, args, monitor, node, node_ps, backend_ms, tmp))
            diag = monitor.last_diag()
        finally:
            code = node.stop() if node is not None else None
            session.close()
        if code != 0:
            raise NodeBenchError(f"localizer_node exited with code {code} (log: {out_dir / 'node.log'})")
    from .machine import machine_info

    return {
        "node": {
            "command": " ".join(["apr-bench", "node", *args.argv]),
            "machine": machine_info(),
            "model": model_desc,
            "image": {"width": args.width, "height": args.height, "encoding": "rgb8"},
            "topic": args.topic,
            "transport": {
                "fastdds_profile": os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE", ""),
                "qos": "reliable, publisher depth 10, node subscription depth 1 (latest-frame mailbox)",
                "environment_set": env_changes,
            },
            "backend_in_process": backend,
            "node_backend": (diag or {}).get("backend", ""),
            "node_device": (diag or {}).get("device", ""),
            "node_startup_s": startup_s,
            "node_rss_active_mb": rss_active / 2**20,
            "node_exit_code": code,
            "latency_definition": "pose receipt (subscriber process, wall clock) - image header.stamp (set to the "
            "wall clock right before publish in the publisher process)",
            "overhead_definition": "median end-to-end - the node's inference_ms p50 from /diagnostics (rolling window "
            "of its last 600 frames); overhead_ms_median_vs_in_process: median end-to-end - median Localizer.localize "
            "total measured in this process on the same frame before the node started",
            "phases": results,
        }
    }


# ================================================================================================ output
def json_safe(obj: Any) -> Any:
    """Nested dicts/lists with NaN/inf as None and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj


def format_table(report: dict[str, Any]) -> str:
    """Plain-text table of the phases."""
    r = report["node"]
    b = r["backend_in_process"]

    def f(v: Any, fmt: str = ".1f") -> str:
        return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)

    lines = [
        f"apr-bench node — {r['model']}; {r['image']['width']}x{r['image']['height']} rgb8 on {r['topic']}; "
        f"node backend {r['node_backend'] or b['backend']}/{r['node_device'] or b['device']}; "
        f"in-process localize median {f(b['localize_ms']['median'])} ms; node start-up {r['node_startup_s']:.1f} s",
        "",
    ]
    head = (
        f"{'phase':>16s} {'sent':>6s} {'poses':>6s} {'dropped':>7s} {'e2e med':>8s} {'p90':>7s} {'p99':>7s} "
        f"{'max':>7s} {'ovh med':>8s} {'node inf':>8s} {'out Hz':>7s} {'CPU %':>6s} {'RSS MB':>7s} {'RSS +%':>7s}"
    )
    lines += [head, "-" * len(head)]
    for p in r["phases"]:
        e = p["end_to_end_ms"]
        lines.append(
            f"{p['phase']:>16s} {p['published']:6d} {p['received']:6d} {f(p['dropped_frames'], 'd'):>7s} "
            f"{f(e['median']):>8s} {f(e['p90']):>7s} {f(e['p99']):>7s} {f(e['max']):>7s} "
            f"{f(p['overhead_ms_median']):>8s} {f(p['node_inference_ms_p50']):>8s} {f(p['output_rate_hz']):>7s} "
            f"{f(p['node_cpu_percent'], '.0f'):>6s} {f(p['node_rss_end_mb'], '.0f'):>7s} "
            f"{f(p['node_rss_growth_pct'], '+.1f'):>7s}"
        )
    lines += [
        "",
        "e2e = pose receipt - image stamp (ms, frames that got a pose); node inf = the node's inference p50 "
        "(diagnostics, last 600 frames); ovh = e2e median - node inf; dropped = the node's mailbox replacements + "
        "transport losses; RSS +% = node RSS growth over the phase.",
        f"node exit code {r['node_exit_code']}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # the publisher subprocess
    sys.exit(_publisher_main(sys.argv[2:] if sys.argv[1:2] == ["_publisher"] else sys.argv[1:]))
