"""``apr-pairs generate|subsets``: iAPR training pairs and per-scene training subsets of a label CSV.

The library is :mod:`apr_training.datasets.pairs`; this module only parses the command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..datasets.labels import LabelError, read_labels
from ..datasets.pairs import generate_pairs, write_pairs, write_subsets

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``generate`` an iAPR pairs CSV from a label CSV, or write the per-scene ``subsets``.

    Returns the process exit code (0 on success, 2 on a bad input file or argument).
    """
    parser = argparse.ArgumentParser(
        prog="apr-pairs",
        description="Make iAPR training pairs (distance/angle thresholds) and 30/50/70 % training subsets.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write a pairs CSV from a label CSV")
    gen.add_argument("labels", type=Path, help="label CSV (scene,split,seq,img_path,t1..t3,q1..q4)")
    gen.add_argument("out", type=Path, help="pairs CSV to write")
    gen.add_argument("--max-distance", type=float, required=True, help="largest camera distance of a pair, metres")
    gen.add_argument("--max-angle", type=float, required=True, help="largest relative rotation of a pair, degrees")
    gen.add_argument("--min-distance", type=float, default=0.0, help="smallest camera distance, metres (default 0)")
    gen.add_argument("--min-angle", type=float, default=0.0, help="smallest relative rotation, degrees (default 0)")
    gen.add_argument("--pairs-per-frame", type=int, default=5, help="partners drawn per frame (default 5)")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    gen.add_argument("--split", default="train", help="split whose rows are paired; 'all' for every row")
    gen.add_argument("--subset", type=Path, help="label CSV restricting the frames (e.g. a *_0.3_subset.csv)")
    gen.add_argument("--both-directions", action="store_true", help="write every pair as (a, b) and (b, a)")
    subs = sub.add_parser("subsets", help="write <csv>_{fraction}_subset.csv per-scene subsets")
    subs.add_argument("labels", type=Path, help="label CSV")
    subs.add_argument("--fractions", type=float, nargs="+", default=[0.3, 0.5, 0.7], help="default 0.3 0.5 0.7")
    subs.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    subs.add_argument("--out-dir", type=Path, help="directory for the subsets (default: beside the CSV)")
    args = parser.parse_args(argv)
    try:
        if args.command == "subsets":
            for fraction, path in write_subsets(args.labels, args.fractions, args.seed, args.out_dir).items():
                print(f"{fraction:g}: {path} ({len(read_labels(path))} rows)")
            return 0
        labels = read_labels(args.labels)
        pairs = generate_pairs(
            labels,
            max_distance_m=args.max_distance,
            max_angle_deg=args.max_angle,
            min_distance_m=args.min_distance,
            min_angle_deg=args.min_angle,
            pairs_per_frame=args.pairs_per_frame,
            seed=args.seed,
            subset=read_labels(args.subset) if args.subset is not None else None,
            split=None if args.split == "all" else args.split,
            both_directions=args.both_directions,
        )
        write_pairs(args.out, pairs)
        per_scene = {name: pairs.scene_a.count(name) for name in dict.fromkeys(pairs.scene_a)}
        print(f"{len(pairs)} pairs from {len(labels)} frames -> {args.out} {per_scene}")
        return 0
    except (LabelError, ValueError, FileNotFoundError) as exc:
        print(f"apr-pairs: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
