"""``apr-bench``: per-stage latency, throughput, memory and compute efficiency for every available backend.

``apr-bench node ...`` runs the end-to-end node benchmark instead (:mod:`apr_training.cli.bench_node`). The
measurement lives in :mod:`apr_training.bench.backends`; the input size is the bundle's (not a fixed 224 px).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from apr_localizer.fileio import atomic_write_text

from ..bench.backends import ARCHS, BenchOptions, format_table, run_benchmark

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="apr-bench",
        description="Measure per-stage latency (median/p90/p99), throughput, memory and compute efficiency of the "
        "localizer on every available backend. Without --model a random-weight model of the published architecture "
        "is used (its costs equal a trained model's).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", help="our .safetensors bundle or an official APR checkpoint (default: random weights)")
    p.add_argument("--iapr", help="official iAPR checkpoint (with an official --model)")
    p.add_argument("--pae", help="official PAE checkpoint")
    p.add_argument("--arch", choices=sorted(ARCHS), default="published", help="architecture of the random model")
    p.add_argument("--backends", default="torch,onnxruntime,tensorrt", help="comma list; unavailable ones are skipped")
    p.add_argument("--precisions", default="fp32", help="comma list of fp32, fp16, bf16, int8")
    p.add_argument("--batch-sizes", default="1", help="comma list, e.g. 1,4")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--iterations", type=int, default=3, help="iAPR iterations per frame")
    p.add_argument("--runs", type=int, default=30, help="timed runs per variant (split over --rounds)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (robust to background load)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per variant before timing")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = physical cores)")
    p.add_argument(
        "--no-seed-loop",
        dest="seed_loop",
        action="store_false",
        help="skip the original loop shape (full MS-Transformer per iAPR iteration)",
    )
    p.add_argument("--no-end-to-end", dest="end_to_end", action="store_false", help="skip Localizer.localize timing")
    p.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP count / peak estimate")
    p.add_argument("--profile", action="store_true", help="top torch operators of the APR graph")
    p.add_argument("--cache-dir", help="where ONNX exports / TensorRT engines are cached")
    p.add_argument("--json", help="write the full report as JSON here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``apr-bench`` (``apr-bench node ...``: the node benchmark)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["node"]:
        from .bench_node import main as node_main

        return node_main(argv[1:])
    args = build_parser().parse_args(argv)
    opts = BenchOptions(
        model=args.model,
        iapr=args.iapr,
        pae=args.pae,
        arch=args.arch,
        backends=[b.strip() for b in args.backends.split(",") if b.strip()],
        precisions=[p.strip() for p in args.precisions.split(",") if p.strip()],
        batch_sizes=[int(b) for b in args.batch_sizes.split(",") if b.strip()],
        device=args.device,
        iterations=args.iterations,
        runs=args.runs,
        rounds=args.rounds,
        warmup=args.warmup,
        threads=args.threads,
        seed_loop=args.seed_loop,
        end_to_end=args.end_to_end,
        flops=args.flops,
        profile=args.profile,
        cache_dir=args.cache_dir,
        argv=argv,
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = run_benchmark(opts)
    print(format_table(report))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(report, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
