"""``apr-bench node``: the end-to-end node benchmark (publisher process → localizer_node → this process).

The measurement lives in :mod:`apr_training.bench.node`; every ROS process runs with the environment of
:func:`apr_training.ros_harness.ros_environment`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from apr_localizer.fileio import atomic_write_text

from ..bench.node import DEFAULT_TOPIC, NodeBenchError, NodeBenchOptions, format_table, json_safe, run_node_bench
from ..ros_harness import HarnessError, ros_environment

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="apr-bench node",
        description="End-to-end benchmark of the localizer node: a publisher process sends images at fixed rates, "
        "the node localizes them, this process receives the poses. Reports latency percentiles, node overhead, "
        "drops, CPU and memory per rate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", help="model file for the node (default: random weights of --arch in a temp file)")
    p.add_argument("--arch", default="published", help="architecture of the random model (see apr-bench --arch)")
    p.add_argument("--rates", default="15,30", help="comma list of publishing rates (Hz)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per rate")
    p.add_argument("--flood-rate", type=float, default=100.0, help="flood phase rate (Hz); 0 = no flood phase")
    p.add_argument("--flood-duration", type=float, default=120.0, help="seconds of the flood phase (RSS growth)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of an unreported 5 Hz phase first (0 = none)")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--topic", default=DEFAULT_TOPIC, help="image topic between publisher and node")
    p.add_argument("--backend", default="auto", help="node backend: auto | torch | onnxruntime | tensorrt")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="fp32", help="fp32 | fp16 | bf16 | int8")
    p.add_argument("--threads", type=int, default=0, help="node inference threads (0 = engine default)")
    p.add_argument("--iterations", type=int, help="node iapr_iterations (default: the node's default, 3)")
    p.add_argument("--cache-dir", help="engine cache directory of the node")
    p.add_argument("--backend-runs", type=int, default=20, help="in-process Localizer runs for the backend time")
    p.add_argument("--settle", type=float, default=2.0, help="end a phase when no pose arrived for this long")
    p.add_argument("--startup-timeout", type=float, default=180.0, help="seconds for the node to become active")
    p.add_argument("--log-dir", help="keep node.log and node_params.yaml here (default: a temp dir)")
    p.add_argument("--json", help="write the report here as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``apr-bench node``; returns the exit status (0 ok, 2 bad input or failure, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--rates must be a comma list of numbers, got {args.rates!r}")
    if any(r <= 0 for r in rates) or args.duration <= 0 or args.flood_rate < 0:
        parser.error("rates and durations must be > 0 (--flood-rate 0 disables the flood)")
    if args.flood_rate > 0 and args.flood_duration <= 0:
        parser.error("--flood-duration must be > 0")
    given = {k: v for k, v in vars(args).items() if k not in ("rates", "json")}
    opts = NodeBenchOptions(**given, rates=rates, argv=argv)
    try:
        with ros_environment(lambda text: print(f"apr-bench node: set {text}", file=sys.stderr)) as changes:
            report = run_node_bench(opts, changes)
    except (NodeBenchError, HarnessError) as exc:
        print(f"apr-bench node: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("apr-bench node: interrupted; the node was stopped", file=sys.stderr)
        return 130
    print(format_table(report))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
