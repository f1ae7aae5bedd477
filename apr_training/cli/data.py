"""``apr-data prepare {7scenes,cambridge} RAW --out ROOT``: official downloads → label CSVs, subsets, iAPR pairs.

The library is :mod:`apr_training.datasets.prepare`; this module only parses the command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..datasets.labels import LabelError
from ..datasets.prepare import PrepareError, PrepareOptions, prepare

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``apr-data prepare {7scenes,cambridge} RAW --out ROOT``; returns the exit code (2 on bad input)."""
    parser = argparse.ArgumentParser(prog="apr-data", description="Prepare 7-Scenes / Cambridge Landmarks labels.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="official download -> label CSVs, subsets, iAPR pairs, dataset.json")
    p.add_argument("dataset", choices=("7scenes", "cambridge"))
    p.add_argument("raw", type=Path, help="the unzipped official download (one folder per scene)")
    p.add_argument("--out", type=Path, required=True, help="output dataset root (may be RAW)")
    p.add_argument("--scenes", nargs="+", help="scene folders to convert (default: all found)")
    p.add_argument("--fractions", type=float, nargs="*", default=[0.3, 0.5, 0.7], help="training subsets")
    p.add_argument("--no-pairs", action="store_true", help="do not generate iAPR training pairs")
    p.add_argument("--pair-max-distance", type=float, help="metres (default 1 for 7scenes, 10 for cambridge)")
    p.add_argument("--pair-max-angle", type=float, default=30.0, help="degrees (default 30)")
    p.add_argument("--orientation", choices=("upstream", "camera_to_world"), default="upstream",
                   help="Cambridge quaternions as in the files (world-to-camera, default) or conjugated")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    opts = PrepareOptions(args.dataset, args.raw, args.out, scenes=args.scenes, fractions=tuple(args.fractions),
                          pairs=not args.no_pairs, pair_max_distance_m=args.pair_max_distance,
                          pair_max_angle_deg=args.pair_max_angle, orientation=args.orientation, seed=args.seed,
                          progress=not args.no_progress)  # fmt: skip
    try:
        meta = prepare(opts)
    except (PrepareError, LabelError, ValueError, OSError) as e:
        print(f"apr-data: error: {e}", file=sys.stderr)
        return 2
    total = {s: c["train"] + c["test"] for s, c in meta["scenes"].items()}
    print(f"{opts.dataset}: {sum(total.values())} frames {total} -> {Path(args.out)} ({len(meta['files'])} files, "
          f"orientation {meta['orientation']})")  # fmt: skip
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
