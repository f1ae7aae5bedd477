"""Console scripts of apr_training: one module per command, imported lazily by the entry points below.

``apr-train`` (:mod:`apr_training.cli.train`), ``apr-eval`` (:mod:`.eval`), ``apr-export``
(:mod:`.export`, library :mod:`apr_training.deploy`), ``apr-bench`` (:mod:`.bench`; ``apr-bench node`` →
:mod:`.bench_node`), ``apr-synth`` (:mod:`.synth`), ``apr-eval-bag``
(:mod:`.eval_bag`); ``python -m apr_training.cli.bag_player`` plays a bag. Shared argparse groups and the
error-to-exit-code helper live in :mod:`.args`. Nothing else imports this package.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

_COMMANDS = {
    "train": ("apr_training.cli.train", "main"),
    "eval": ("apr_training.cli.eval", "main"),
    "export": ("apr_training.cli.export", "main"),
    "bench": ("apr_training.cli.bench", "main"),
    "synth": ("apr_training.cli.synth", "synth_main"),
    "eval_bag": ("apr_training.cli.eval_bag", "main"),
}


def _run(command: str, argv: Sequence[str] | None) -> int:
    module, func = _COMMANDS[command]
    return int(getattr(importlib.import_module(module), func)(list(sys.argv[1:] if argv is None else argv)) or 0)


def train_main(argv: Sequence[str] | None = None) -> int:
    """``apr-train``: train MS-Transformer, PAE, iAPR, PoseNet or the PAE image decoder."""
    return _run("train", argv)


def eval_main(argv: Sequence[str] | None = None) -> int:
    """``apr-eval``: accuracy/latency tables, plots and TUM trajectories on a label CSV."""
    return _run("eval", argv)


def export_main(argv: Sequence[str] | None = None) -> int:
    """``apr-export``: ONNX graphs (+ optional TensorRT engine) with a parity report, as a bundle the node loads."""
    return _run("export", argv)


def bench_main(argv: Sequence[str] | None = None) -> int:
    """``apr-bench``: per-stage latency, throughput and memory for every available backend (``node``: end to end)."""
    return _run("bench", argv)


def synth_main(argv: Sequence[str] | None = None) -> int:
    """``apr-synth``: render the synthetic multi-scene benchmark (label CSVs and ROS 2 bags)."""
    return _run("synth", argv)


def eval_bag_main(argv: Sequence[str] | None = None) -> int:
    """``apr-eval-bag``: evaluate on a ROS 2 bag, offline or live through the node."""
    return _run("eval_bag", argv)
