"""The library of ``apr-export`` (:mod:`apr_training.cli.export`): a deployable model directory.

Bundle + ONNX graphs + parity report [+ TensorRT engines].

::

    apr-export --model ms_transformer.pth --iapr iapr.pth --out deploy/ [--tensorrt --precision fp16]

Writes into ``--out`` (``DIR``):

* ``model.safetensors``: the model bundle (weights + scene names + preprocessing), the file the node loads
  (``model.path``). The graphs below are exported from this file as loaded back, so they match it exactly.
* ``onnx/<key>/{apr,refine,encoder}.onnx`` + ``manifest.json`` + ``parity.json``: the ONNX graphs in the layout of
  the runtime's export cache (:func:`apr_localizer.backends.engine_cache.cached_onnx_export`), so a node started with
  ``cache_dir: DIR`` and the same model runs them without exporting again (with the default exporter settings; other
  ``--exporter``/``--opset`` values are for other runtimes, the node exports its own defaults).
* ``tensorrt/<graph>.<precision>.engine`` (``--tensorrt``): each engine built ONCE (:func:`build_engines`). On a
  machine with a CUDA GPU and TensorRT (run apr-export on the target device: engines do not move between TensorRT
  versions or GPUs) the TensorRT backend builds them into the node's engine cache ``DIR/engines/`` and they are
  linked here; without a GPU only ``tensorrt_rtx`` can build (ahead of time).
* ``export.json`` (every path, parity verdict, node parameters) and ``README.md`` (which files the node uses).

Exit status: 0 when every parity case passes, 1 when parity or the TensorRT build fails, 2 on bad input.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apr_localizer import __version__
from apr_localizer.backends.base import BackendError, BackendOptions
from apr_localizer.checkpoints import ModelBundle, load_bundle, load_model, save_model
from apr_localizer.fileio import atomic_path, atomic_write_text

from .evaluation.metrics import render_table

__all__ = [
    "ExportOptions",
    "build_engines",
    "export_deployment",
    "format_parity",
    "load_calibration_images",
]

log = logging.getLogger(__name__)

MODEL_NAME = "model.safetensors"
EXPORT_INFO = "export.json"


class ExportCliError(RuntimeError):
    """Bad input for apr-export (one sentence naming the file or option)."""


# ---------------------------------------------------------------------------------------------------- steps
def load_calibration_images(labels: str | Path, data: str | Path, bundle: ModelBundle, count: int) -> torch.Tensor:
    """``count`` images spread evenly over a label CSV, preprocessed like the node does: ``(N,3,H,W)`` float32."""
    from apr_localizer.preprocess import PreprocessConfig, preprocess

    from .datasets.labels import read_labels, validate_images
    from .datasets.torch_datasets import load_rgb

    table = read_labels(labels, data)
    if not len(table):
        raise ExportCliError(f"{labels}: the label CSV has no rows to calibrate with")
    idx = np.unique(np.linspace(0, len(table) - 1, num=min(count, len(table))).round().astype(np.int64))
    paths = validate_images(table.take(idx))
    config = PreprocessConfig.from_dict(bundle.preprocess)
    return torch.cat([preprocess(load_rgb(p), config) for p in paths])


def _fmt_diff(v: float | None) -> str:
    return "-" if v is None else f"{v:.2e}"


def format_parity(report: dict[str, Any]) -> str:
    """Plain-text table of a :func:`apr_localizer.export.parity_report` result, one row per case, plus a verdict."""
    rows = []
    for c in report["cases"]:
        diffs = dict(c.get("max_abs_diff", {}))
        pose = diffs.pop("pose", diffs.pop("refined_pose", None))
        other = max(diffs.values()) if diffs else None
        agree = c.get("scene_agreement")
        rows.append(
            [
                c["graph"],
                c["inputs"],
                c["path"],
                str(c.get("images", "")),
                _fmt_diff(pose),
                _fmt_diff(other),
                "-" if agree is None else f"{100 * agree:.0f}%",
                "pass" if c["passed"] else "FAIL",
            ]
        )
    headers = ["Graph", "Inputs", "Path", "Images", "max|Δ| pose", "max|Δ| other", "Scene agree", "Result"]
    verdict = "PASSED" if report["passed"] else "FAILED: " + ", ".join(report.get("failures", []))
    return (
        render_table(headers, rows)
        + f"\nParity torch vs ONNX Runtime ({report.get('exporter')}, opset {report.get('opset')}, tolerance "
        f"{report.get('tolerance'):g}): {verdict}\n"
    )


def _save_bundle(bundle: ModelBundle, path: Path, provenance: dict[str, Any]) -> Path:
    save_model(  # atomic (apr_localizer.fileio)
        path,
        bundle.apr,
        bundle.iapr,
        bundle.pae,
        scene_names=list(bundle.scene_names),
        preprocess=dict(bundle.preprocess),
        provenance=provenance,
    )
    return path


def _engine_record(out: Path, path: Path, onnx_path: Path, prec: str, trt: Any) -> dict[str, Any]:
    from apr_localizer.backends.tensorrt_build import is_rtx
    from apr_localizer.export import file_sha256

    return {
        "file": str(path.relative_to(out)),
        "precision": prec,
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
        "onnx_sha256": file_sha256(onnx_path),
        "tensorrt_module": trt.__name__,
        "tensorrt_version": str(getattr(trt, "__version__", "?")),
        "ahead_of_time": bool(is_rtx(trt) and not torch.cuda.is_available()),
    }


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` a hard link to ``src`` (same bytes, no extra space), or an atomic copy across filesystems."""
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def build_engines(
    bundle: ModelBundle, export: Any, out: Path, precision: str, calibration: torch.Tensor | None, trt: Any = None
) -> tuple[dict[str, dict[str, Any]], str | None]:
    """Build every graph's TensorRT engine ONCE; returns (engine records, node engine cache dir or ``None``).

    With a CUDA GPU the engines are built by the TensorRT backend into the node's engine cache ``out/engines`` (for
    this GPU and TensorRT: run apr-export on the target device) and linked to ``out/tensorrt/<graph>.<precision>
    .engine``. Without a GPU only TensorRT-RTX can build (ahead of time, straight to ``out/tensorrt``). The
    refinement graph is always fp32.
    """
    from apr_localizer.backends.tensorrt_backend import prebuild_engines
    from apr_localizer.backends.tensorrt_build import build_tensorrt_engine, import_tensorrt, is_rtx

    trt = trt or import_tensorrt()
    node_cache = None
    if torch.cuda.is_available():
        opts = BackendOptions(device="cuda", precision=precision, cache_dir=out, calibration_images=calibration)
        built = prebuild_engines(bundle, opts, trt, export)
        node_cache = str(out / "engines")
    elif is_rtx(trt):
        built = {}
        for graph, onnx_path in export.files.items():
            prec = "fp32" if graph == "refine" else precision
            log.info("building TensorRT %s engine of %s ahead of time ...", prec, onnx_path.name)
            dst = out / "tensorrt" / f"{graph}.{prec}.engine"
            built[graph] = build_tensorrt_engine(onnx_path, dst, prec, module=trt)
    else:
        raise BackendError(
            f"{trt.__name__} builds engines on a CUDA GPU only and torch sees none; run apr-export on the target device"
        )
    engines: dict[str, dict[str, Any]] = {}
    for graph, path in built.items():
        prec = "fp32" if graph == "refine" else precision
        dst = out / "tensorrt" / f"{graph}.{prec}.engine"
        if path != dst:
            _link_or_copy(path, dst)
        engines[graph] = _engine_record(out, dst, export.files[graph], prec, trt)
    return engines, node_cache


def _readme(info: dict[str, Any]) -> str:
    out = Path(info["out"])
    onnx_dir = info["onnx"]["dir"]
    if info["onnx"]["node_default"]:
        onnx_note = " (they were exported with the runtime's default settings)."
    else:
        onnx_note = "; these were exported with non-default settings, so the node exports its own default graphs once."
    lines = [
        "# apr_localizer deployment directory",
        "",
        f"Written by apr-export {info['apr_localizer']} on {info['date_utc']} from `{info['source']['model']}`.",
        "",
        "## Files the node uses",
        "",
        f"* `{MODEL_NAME}`: the model (weights, scene names {info['scene_names']}, preprocessing). Node parameter "
        f"`model.path: {out / MODEL_NAME}`; leave `model.iapr_path` and `model.pae_path` empty (the bundle holds "
        "every component).",
        f"* `{onnx_dir}/`: the ONNX graphs ({', '.join(info['onnx']['graphs'])}) with `manifest.json`. With "
        f"`cache_dir: {out}` the onnxruntime and tensorrt backends take them from here instead of exporting again"
        + onnx_note,
    ]
    if info.get("node_engine_cache"):
        lines.append(
            f"* `engines/`: TensorRT engines prebuilt for this GPU ({info['precision']}); used with "
            f"`backend: tensorrt`, `precision: {info['precision']}`, `cache_dir: {out}`."
        )
    lines += [
        "",
        "Node parameters (config/localizer.yaml):",
        "",
        "```yaml",
        f'model:\n  path: "{out / MODEL_NAME}"',
        f'cache_dir: "{out}"',
        'backend: "auto"   # or onnxruntime / tensorrt / torch',
        "```",
        "",
        "## Other files",
        "",
        f"* `{onnx_dir}/parity.json`: torch vs ONNX Runtime parity (max abs differences per output, scene "
        f"agreement); verdict: {'passed' if info['parity']['passed'] else 'FAILED'}.",
    ]
    if info.get("tensorrt"):
        lines.append(
            "* `tensorrt/`: standalone TensorRT engines (built with "
            f"{next(iter(info['tensorrt'].values()))['tensorrt_module']}) for trtexec or other runtimes; the node "
            "builds and caches its own engines under `cache_dir/engines/` for the GPU it runs on."
        )
    lines += [f"* `{EXPORT_INFO}`: everything above as JSON.", ""]
    return "\n".join(lines)


@dataclass
class ExportOptions:
    """What :func:`export_deployment` writes (the ``apr-export`` options; see :func:`build_parser` for each)."""

    model: Path
    out: Path
    iapr: Path | None = None
    pae: Path | None = None
    scene_names: list[str] | None = None
    exporter: str = "torchscript"  # torchscript | dynamo
    opset: int | None = None
    parity_images: int = 4
    tolerance: float = 1e-4
    threads: int = 0
    tensorrt: bool = False
    precision: str = "fp16"
    calibration_labels: Path | None = None
    data: Path | None = None
    calibration_count: int = 64


def _prepare(opts: ExportOptions) -> tuple[ModelBundle, torch.Tensor | None, Any]:
    """Save the bundle the node loads, load it back, read calibration images, export (or reuse) the ONNX graphs."""
    from apr_localizer.backends.engine_cache import cached_onnx_export

    source = load_bundle(opts.model, opts.iapr, opts.pae, scene_names=opts.scene_names)
    opts.out.mkdir(parents=True, exist_ok=True)
    provenance = {
        **{k: v for k, v in source.provenance.items() if isinstance(v, (str, int, float, bool))},
        "exported_by": f"apr-export {__version__}",
        "source_model": str(opts.model),
    }
    bundle = load_model(_save_bundle(source, opts.out / MODEL_NAME, provenance))  # exactly what the node will load
    calibration = None
    if opts.calibration_labels:
        calibration = load_calibration_images(opts.calibration_labels, opts.data, bundle, opts.calibration_count)
    export = cached_onnx_export(bundle, opts.out, opset=opts.opset, dynamo=opts.exporter == "dynamo")
    return bundle, calibration, export


def _info(opts: ExportOptions, bundle: ModelBundle, export: Any, parity: dict[str, Any]) -> dict[str, Any]:
    from apr_localizer.backends.engine_cache import export_cache_key

    out = opts.out
    return {
        "out": str(out.resolve()),
        "apr_localizer": __version__,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": {k: (str(v) if v else v) for k, v in (("model", opts.model), ("iapr", opts.iapr), ("pae", opts.pae))},
        "model": MODEL_NAME,
        "scene_names": list(bundle.scene_names),
        "components": [c for c in ("apr", "iapr", "pae") if getattr(bundle, c) is not None],
        "onnx": {
            "dir": str(export.out_dir.relative_to(out)),
            "graphs": {g: str(p.relative_to(out)) for g, p in export.files.items()},
            "exporter": export.exporter,
            "opset": export.opset,
            "node_default": export_cache_key(bundle, None, None, 1) == export.out_dir.name,
            "reused": export.reused,
        },
        "parity": {
            "file": str((export.out_dir / "parity.json").relative_to(out)),
            "passed": parity["passed"],
            "failures": parity["failures"],
        },
        "precision": opts.precision,
        "tensorrt": {},
        "node_engine_cache": None,
        "node_parameters": {"model.path": str((out / MODEL_NAME).resolve()), "cache_dir": str(out.resolve())},
    }


def export_deployment(opts: ExportOptions) -> tuple[int, dict[str, Any]]:
    """Write the deployment directory ``opts.out``; returns (exit status, the ``export.json`` record).

    Status 0 when every parity case passes (and the TensorRT engines built), else 1. Bad input raises
    :class:`~apr_localizer.checkpoints.CheckpointError`, :class:`ExportCliError`, ``LabelError`` or
    ``FileNotFoundError``; a failed ONNX export raises :class:`~apr_localizer.export.ExportError`.
    """
    from apr_localizer.export import ExportError, parity_report

    bundle, calibration, export = _prepare(opts)
    real = calibration[: max(opts.parity_images, 1)] if calibration is not None else None
    parity = parity_report(
        bundle, export.out_dir, n_images=opts.parity_images, images=real, tolerance=opts.tolerance,
        threads=opts.threads or None,
    )  # fmt: skip
    print(format_parity(parity), end="")
    status = 0 if parity["passed"] else 1
    info = _info(opts, bundle, export, parity)
    if opts.tensorrt:
        try:
            info["tensorrt"], info["node_engine_cache"] = build_engines(
                bundle, export, opts.out, opts.precision, calibration
            )
            for graph, e in info["tensorrt"].items():
                print(f"TensorRT {e['precision']} engine of {graph}: {e['file']} ({e['bytes'] / 1e6:.1f} MB)")
            if info["node_engine_cache"]:
                print(f"TensorRT engines for this GPU cached in {info['node_engine_cache']}")
        except (BackendError, ExportError) as e:
            print(f"apr-export: error: TensorRT build failed: {e}", file=sys.stderr)
            status = 1
    atomic_write_text(opts.out / EXPORT_INFO, json.dumps(info, indent=2) + "\n")
    atomic_write_text(opts.out / "README.md", _readme(info))
    return status, info
