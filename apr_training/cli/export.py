"""``apr-export``: parse the command line into :class:`apr_training.deploy.ExportOptions` and run the export.

Exit status: 0 when every parity case passes, 1 when parity or the TensorRT build fails, 2 on bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from apr_localizer.checkpoints import CheckpointError
from apr_localizer.export import ExportError

from ..datasets.labels import LabelError
from ..deploy import EXPORT_INFO, MODEL_NAME, ExportCliError, ExportOptions, export_deployment
from .args import run_cli

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="apr-export",
        description="Export a model for deployment: model.safetensors (what the node loads), ONNX graphs with a "
        "torch-vs-ONNX-Runtime parity report, and optionally TensorRT engines.",
    )
    p.add_argument("--model", required=True, help="our model bundle (.safetensors) or an official APR/iAPR .pth")
    p.add_argument("--iapr", help="official iAPR checkpoint (.pth) to bundle with the APR")
    p.add_argument("--pae", help="official pose auto-encoder checkpoint (.pth) to bundle")
    p.add_argument("--scene-names", help="comma-separated scene names (official checkpoints carry none)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--exporter",
        default="torchscript",
        choices=("torchscript", "dynamo"),
        help="torchscript: opset 14-20, 17 loads on TensorRT 8.6 / JetPack 5; dynamo: opset >= 18 "
        "(default: torchscript)",
    )
    p.add_argument("--opset", type=int, help="ONNX opset (default: 17 with torchscript, 18 with dynamo)")
    p.add_argument("--parity-images", type=int, default=4, help="random images in the parity check (default: 4)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs pose difference allowed (default: 1e-4)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch and ONNX Runtime (0 = default)")
    p.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines of every graph")
    p.add_argument(
        "--precision", default="fp16", choices=("fp16", "fp32", "int8"), help="TensorRT precision (default: fp16)"
    )
    p.add_argument("--workspace-mb", type=int, default=1024, help="TensorRT builder workspace (default: 1024)")
    p.add_argument(
        "--calibration-labels",
        help="label CSV whose images calibrate INT8 (and add real images to the parity check); needs --data",
    )
    p.add_argument("--data", help="dataset root of --calibration-labels")
    p.add_argument("--calibration-count", type=int, default=64, help="images spread over the CSV (default: 64)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``apr-export`` entry point; returns the exit status (0 ok, 1 parity/TensorRT failure, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.calibration_labels and not args.data:
        parser.error("--calibration-labels needs --data (the dataset root of its img_path column)")
    if args.tensorrt and args.precision == "int8" and not args.calibration_labels:
        parser.error("--precision int8 needs --calibration-labels CSV --data ROOT (INT8 calibration images)")
    if args.parity_images < 1:
        parser.error(f"--parity-images must be >= 1, got {args.parity_images}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    opts = ExportOptions(
        model=Path(args.model), out=Path(args.out), iapr=args.iapr and Path(args.iapr),
        pae=args.pae and Path(args.pae),
        scene_names=[s.strip() for s in args.scene_names.split(",")] if args.scene_names else None,
        exporter=args.exporter, opset=args.opset, parity_images=args.parity_images, tolerance=args.tolerance,
        threads=args.threads, tensorrt=args.tensorrt, precision=args.precision,
        calibration_labels=args.calibration_labels and Path(args.calibration_labels),
        data=args.data and Path(args.data), calibration_count=args.calibration_count,
    )  # fmt: skip

    def body() -> int:
        try:
            status, info = export_deployment(opts)
        except ExportError as e:
            raise ExportError(f"ONNX export failed: {e}") from None
        onnx_dir = info["onnx"]["dir"]
        print(f"apr-export: wrote {opts.out / MODEL_NAME}, {onnx_dir}/ and {opts.out / EXPORT_INFO} (see README.md)")
        return status

    return run_cli(
        "apr-export",
        body,
        [(CheckpointError, 2), (LabelError, 2), (FileNotFoundError, 2), (ExportCliError, 2), (ExportError, 1)],
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
