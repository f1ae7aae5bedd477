"""ONNX export of a :class:`ModelBundle`, torch-vs-ONNX-Runtime parity reports and the fp16 graph conversion.

Graphs (fixed batch, single-file ONNX; the contract lives in :mod:`apr_localizer.graphs`; TensorRT engines are built
by :mod:`apr_localizer.backends.tensorrt_build`):

* ``apr.onnx``: ``image (B,3,H,W) float32, scene_override (B,) int64 -> pose (B,7), scene_log_probs (B,S),
  scene (B,) int64, latent_t (B,D), latent_rot (B,D)``; ``scene_override < 0`` selects the classifier's argmax;
* ``encoder.onnx``: the same signature with the iAPR's own MS-Transformer (only when the iAPR does not share the APR's
  encoder);
* ``refine.onnx``: ``latent_t (B,D), latent_rot (B,D), pose (B,7), scene (B,) int64 -> refined_pose (B,7)`` (one iAPR
  step; only when the bundle has an iAPR).

Exporters, measured with torch 2.15 / onnx 1.23 / ORT 1.31 on the reference checkpoint (2-core CPU, batch 1):

* **TorchScript** (``dynamo=False``, opset 17) is the default: about 3-4 s per APR graph, and its graphs parse on
  TensorRT 8.6 (JetPack 5 parses opset <= 17) as well as on TensorRT >= 10. It computes pad amounts and reshapes at run
  time from ``Shape`` nodes (1211 nodes); :func:`fold_constants` folds them for the fixed batch (429 nodes, static
  shapes everywhere). The exporter warns that it is deprecated; it is still part of torch 2.15.
* **dynamo** (``dynamo=True``) needs opset >= 18 (it cannot go lower for this model: no ``Pad`` down-converter): about
  2x slower to export (6-8 s), 559 nodes, 445 after folding.

ONNX Runtime runs both in the same time (18.4 vs 17.9 ms, torch eager 29.1 ms); both match torch to ~2e-6.

A ``manifest.json`` next to the graphs records file hashes, exporter, opset, I/O names/shapes/dtypes, scene names,
preprocessing, the pose/quaternion convention, the source weights' sha256 and the library versions.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoints import ModelBundle
from .fileio import atomic_path, atomic_write_text
from .graphs import (
    APR_INPUTS,
    APR_OUTPUTS,
    GRAPH_FILES,
    MANIFEST_NAME,
    PARITY_NAME,
    REFINE_INPUTS,
    graph_io,
    graph_signature,
)
from .models.ms_transformer import MSTransformer
from .models.rpr import IAPR

__all__ = [
    "DEFAULT_DYNAMO",
    "DEFAULT_OPSET",
    "FORBIDDEN_OPS",
    "QUATERNION_CONVENTION",
    "AprGraph",
    "ExportError",
    "ExportResult",
    "RefineGraph",
    "convert_onnx_fp16",
    "export_onnx",
    "file_sha256",
    "fold_constants",
    "load_export",
    "parity_report",
    "weights_sha256",
]

log = logging.getLogger(__name__)

DEFAULT_DYNAMO = False
DEFAULT_OPSET = 17  # with dynamo=True the default is 18
EXPORT_FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 4 << 20  # a manifest is a few kB
# Ops that would mean data-dependent control flow or in-place writes (TensorRT-hostile, slow on every runtime).
FORBIDDEN_OPS = frozenset(
    {"If", "Loop", "Scan", "ScatterND", "ScatterElements", "Scatter", "NonZero", "Compress", "Unique"}
    | {"SequenceConstruct", "SequenceAt", "SequenceInsert", "SplitToSequence", "ConcatFromSequence"}
)
POSE_CONVENTION = "[x, y, z, qw, qx, qy, qz], camera-to-map, position in the training data's units (metres)"
QUATERNION_CONVENTION = (
    "w-first Hamilton [qw, qx, qy, qz]; apr/encoder 'pose' is raw (not normalised, no sign canonicalisation); "
    "refine 'refined_pose' is unit with qw >= 0"
)
_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 9: "bool", 16: "bfloat16"}


class ExportError(RuntimeError):
    """An ONNX export or TensorRT build failed or produced an unusable graph (one-sentence message)."""


# ------------------------------------------------------------------------------------------------ graph wrappers
class AprGraph(nn.Module):
    """Export wrapper of an MS-Transformer returning the :data:`APR_OUTPUTS` tuple in the fixed order."""

    def __init__(self, model: MSTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, scene_override: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(image, scene_override)
        return tuple(out[k] for k in APR_OUTPUTS)


class RefineGraph(nn.Module):
    """Export wrapper of one iAPR refinement step returning ``(refined_pose,)``."""

    def __init__(self, iapr: IAPR) -> None:
        super().__init__()
        self.iapr = iapr

    def forward(
        self, latent_t: torch.Tensor, latent_rot: torch.Tensor, pose: torch.Tensor, scene: torch.Tensor
    ) -> tuple[torch.Tensor]:
        return (self.iapr.step(latent_t, latent_rot, pose, scene),)


def _graphs_of(bundle: ModelBundle) -> dict[str, nn.Module]:
    graphs: dict[str, nn.Module] = {"apr": AprGraph(bundle.apr)}
    if bundle.iapr is not None:
        if not bundle.shares_encoder:
            graphs["encoder"] = AprGraph(bundle.iapr.mstransformer)
        graphs["refine"] = RefineGraph(bundle.iapr)
    return graphs


def _iapr(bundle: ModelBundle) -> IAPR:
    if bundle.iapr is None:
        raise ExportError("this model has no iAPR, so it has no encoder or refinement graph")
    return bundle.iapr


def _example_inputs(bundle: ModelBundle, graph: str, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    size = int(bundle.preprocess.get("crop", 224))
    if graph in ("apr", "encoder"):
        return torch.randn(batch, 3, size, size, generator=gen), torch.full((batch,), -1, dtype=torch.int64)
    d = _iapr(bundle).config.ms_transformer.hidden_dim
    q = torch.nn.functional.normalize(torch.randn(batch, 4, generator=gen), dim=1)
    return (
        torch.randn(batch, d, generator=gen),
        torch.randn(batch, d, generator=gen),
        torch.cat([torch.randn(batch, 3, generator=gen), q], dim=1),
        torch.zeros(batch, dtype=torch.int64),
    )


def _expected_shapes(bundle: ModelBundle, graph: str, batch: int) -> dict[str, tuple[tuple[int, ...], str]]:
    size = int(bundle.preprocess.get("crop", 224))
    model = bundle.apr if graph != "encoder" else _iapr(bundle).mstransformer
    return graph_signature(graph, batch, size, model.num_scenes, model.config.hidden_dim)


# ------------------------------------------------------------------------------------------------ hashing
def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _hash_state_dict(h: Any, prefix: str, module: nn.Module, skip: str | None = None) -> None:
    for k, v in module.state_dict().items():
        if skip and k.startswith(skip):
            continue
        h.update((prefix + k).encode())
        t = v.detach().to("cpu").contiguous().reshape(-1)
        h.update(str(t.dtype).encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())


def weights_sha256(bundle: ModelBundle) -> str:
    """Sha256 of what the exported graphs compute: every weight of the APR and iAPR plus their configs.

    Per tensor, in state_dict order: the prefixed key, the dtype name and the raw C-contiguous bytes. The iAPR's
    MS-Transformer is skipped when it is the APR itself (``bundle.shares_encoder``).
    """
    h = hashlib.sha256()
    h.update(json.dumps({"apr": bundle.apr.config.to_dict()}, sort_keys=True).encode())
    _hash_state_dict(h, "apr.", bundle.apr)
    if bundle.iapr is not None:
        cfg = {"iapr": bundle.iapr.config.to_dict(), "shares_encoder": bundle.shares_encoder}
        h.update(json.dumps(cfg, sort_keys=True).encode())
        _hash_state_dict(h, "iapr.", bundle.iapr, "mstransformer." if bundle.shares_encoder else None)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ export
@dataclass
class ExportResult:
    """Exported graphs in ``out_dir``: ``files`` maps graph name (apr, encoder, refine) to its ONNX path."""

    out_dir: Path
    files: dict[str, Path]
    manifest: dict[str, Any]
    seconds: float = 0.0
    reused: bool = False
    node_counts: dict[str, int] = field(default_factory=dict)

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / MANIFEST_NAME

    @property
    def opset(self) -> int:
        return int(self.manifest["opset"])

    @property
    def exporter(self) -> str:
        return str(self.manifest["exporter"])

    def path(self, graph: str) -> Path:
        """ONNX file of ``graph``; :class:`ExportError` when this export has no such graph."""
        if graph not in self.files:
            raise ExportError(f"{self.out_dir}: the export has no '{graph}' graph (has {', '.join(self.files)})")
        return self.files[graph]


def _io_entries(values: Any) -> list[dict[str, Any]]:
    out = []
    for v in values:
        tt = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        out.append({"name": v.name, "shape": dims, "dtype": _ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type))})
    return out


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the exporters' expected chatter (deprecation/tracer warnings, dynamo progress lines)."""
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        warnings.simplefilter("ignore")
        yield
    if buf.getvalue().strip():
        log.debug("exporter output:\n%s", buf.getvalue())


def _export_graph(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    names: tuple[tuple[str, ...], tuple[str, ...]],
    opset: int,
    dynamo: bool,
) -> None:
    inputs, outputs = names
    kw: dict[str, Any] = {"input_names": list(inputs), "output_names": list(outputs), "opset_version": opset}
    if dynamo:
        kw.update(dynamo=True, external_data=False, optimize=True, verbose=False)
    else:
        kw.update(dynamo=False, do_constant_folding=True)
    device = next(module.parameters()).device  # export where the weights are (a CUDA bundle exports fine)
    args = tuple(a.to(device) for a in args)
    try:
        with torch.no_grad(), _quiet_export(), atomic_path(path) as tmp:
            torch.onnx.export(module.eval(), args, str(tmp), **kw)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        exporter = "dynamo" if dynamo else "TorchScript"
        raise ExportError(f"{path.name}: the {exporter} ONNX exporter (opset {opset}) failed ({first})") from e


_NO_FOLD = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"})


def _static_shapes(model: Any) -> dict[str, list[int]]:
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    g = inferred.graph
    for v in list(g.value_info) + list(g.input) + list(g.output):
        tt = v.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            shapes[v.name] = [d.dim_value for d in tt.shape.dim]
    return shapes


def fold_constants(model: Any, max_elements: int = 1 << 22, max_rounds: int = 8) -> int:
    """Fold every node whose inputs are constants (and ``Shape`` of static tensors) into initializers, in place.

    The TorchScript exporter computes, for example, ``F.pad`` amounts and attention reshapes at run time from
    ``Shape`` nodes; with a fixed batch all of that is constant. Folding gives static shapes on every tensor (graph
    outputs included) and a much smaller graph, in standard ONNX ops only. Outputs larger than ``max_elements`` stay
    computed. Returns the number of nodes removed.
    """
    import numpy as np
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    opsets = {o.domain or "": o.version for o in model.opset_import}
    del g.value_info[:]  # stale symbolic annotations from the exporter
    for o in g.output:
        o.type.tensor_type.ClearField("shape")
    removed = 0
    for _ in range(max_rounds):
        shapes = _static_shapes(model)
        inits = {i.name: i for i in g.initializer}
        arrays: dict[str, Any] = {}
        outputs = {o.name for o in g.output}
        keep, new_inits = [], []
        for node in g.node:
            result = None
            if node.domain not in ("", "ai.onnx") or node.op_type in _NO_FOLD or set(node.output) & outputs:
                pass
            elif node.op_type == "Shape" and node.input[0] in shapes:
                attrs = {a.name: a.i for a in node.attribute}
                dims = np.array(shapes[node.input[0]], dtype=np.int64)
                result = [dims[attrs.get("start", 0) : attrs.get("end", len(dims))]]
            elif all(i == "" or i in inits or i in arrays for i in node.input):
                for i in node.input:
                    if i and i not in arrays:
                        arrays[i] = numpy_helper.to_array(inits[i])
                feeds = {i: arrays[i] for i in node.input if i}
                try:
                    result = list(ReferenceEvaluator(node, opsets=opsets).run(None, feeds))  # type: ignore[arg-type]
                except Exception:  # an op the reference runtime lacks: keep it computed
                    result = None
            if result is not None and all(np.asarray(r).size <= max_elements for r in result):
                for name, r in zip(node.output, result):
                    arrays[name] = np.asarray(r)
                    new_inits.append(numpy_helper.from_array(np.asarray(r), name))
                    inits[name] = new_inits[-1]
                removed += 1
            else:
                keep.append(node)
        if len(keep) == len(g.node):
            break
        del g.node[:]
        g.node.extend(keep)
        g.initializer.extend(new_inits)
        used = {i for n in g.node for i in n.input} | outputs
        live = [i for i in g.initializer if i.name in used]
        del g.initializer[:]
        g.initializer.extend(live)
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(model, data_prop=True)
    g.value_info.extend(inferred.graph.value_info)
    for out, inferred_out in zip(g.output, inferred.graph.output):
        out.type.CopyFrom(inferred_out.type)
    return removed


def _validate_graph(model: Any, path: Path, expected: dict[str, tuple[tuple[int, ...], str]], opset: int) -> None:
    """Check fixed names, shapes and dtypes, the requested opset and the absence of control flow / scatter ops."""
    ops = Counter(n.op_type for n in model.graph.node)
    bad = sorted(set(ops) & FORBIDDEN_OPS)
    subgraphs = [n.op_type for n in model.graph.node if any(a.type in (5, 10) for a in n.attribute)]  # GRAPH(S)
    if bad or subgraphs:
        raise ExportError(
            f"{path.name}: the exported graph contains data-dependent ops {bad or subgraphs}; "
            "the model code must use masks instead of branches and in-place indexing"
        )
    got_opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if got_opset != opset:
        raise ExportError(f"{path.name}: exported with opset {got_opset}, expected {opset}")
    got = {e["name"]: e for e in _io_entries(list(model.graph.input) + list(model.graph.output))}
    for name, (shape, dtype) in expected.items():
        e = got.get(name)
        if e is None:
            raise ExportError(f"{path.name}: graph input/output '{name}' is missing (found {', '.join(got)})")
        if tuple(e["shape"]) != shape or e["dtype"] != dtype:
            raise ExportError(
                f"{path.name}: '{name}' is {e['dtype']}{e['shape']}, expected {dtype}{list(shape)} (fixed batch)"
            )
    extra = set(got) - set(expected)
    if extra:
        raise ExportError(f"{path.name}: unexpected graph inputs/outputs {sorted(extra)}")


def _export_one(
    bundle: ModelBundle, graph: str, module: nn.Module, path: Path, batch: int, opset: int, dynamo: bool, check: bool
) -> dict[str, Any]:
    """Export, fold, validate, check and atomically write one graph; returns its manifest record."""
    import onnx

    t0 = time.perf_counter()
    _export_graph(module, _example_inputs(bundle, graph, batch), path, graph_io(graph), opset, dynamo)
    seconds = time.perf_counter() - t0
    model = onnx.load(str(path))
    raw_nodes = len(model.graph.node)
    t1 = time.perf_counter()
    fold_constants(model)
    fold_seconds = time.perf_counter() - t1
    _validate_graph(model, path, _expected_shapes(bundle, graph, batch), opset)
    meta = {"graph": graph, "scene_names": bundle.scene_names, "pose_convention": POSE_CONVENTION}
    onnx.helper.set_model_props(model, {"apr_localizer": json.dumps(meta)})
    model.doc_string = f"apr_localizer {graph} graph"
    if check:
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as e:
            raise ExportError(f"{path.name}: onnx.checker rejected the graph ({str(e).splitlines()[0]})") from e
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
    log.info("exported %s: %d nodes, %.1f s", path, len(model.graph.node), seconds)
    return {
        "file": path.name,
        "sha256": file_sha256(path),
        "bytes": path.stat().st_size,
        "nodes": len(model.graph.node),
        "exporter_nodes": raw_nodes,
        "export_seconds": round(seconds, 3),
        "fold_seconds": round(fold_seconds, 3),
        "inputs": _io_entries(model.graph.input),
        "outputs": _io_entries(model.graph.output),
    }


def export_onnx(
    bundle: ModelBundle,
    out_dir: str | Path,
    opset: int | None = None,
    dynamo: bool | None = None,
    batch_size: int = 1,
    check: bool = True,
) -> ExportResult:
    """Export the bundle's graphs (apr, encoder if needed, refine if any) plus ``manifest.json`` into ``out_dir``.

    ``dynamo=False`` (default, TorchScript exporter) supports opset 14-20 (default 17: TensorRT 8.6 / JetPack 5);
    ``dynamo=True`` supports opset >= 18 (default 18). ``check`` runs ``onnx.checker.check_model(full_check=True)``.
    Raises :class:`ExportError` with one sentence naming the graph on any failure.
    """
    dynamo = DEFAULT_DYNAMO if dynamo is None else bool(dynamo)
    opset = (18 if dynamo else DEFAULT_OPSET) if opset is None else int(opset)
    if dynamo and opset < 18:
        raise ExportError(f"opset {opset} is not available with dynamo=True (the dynamo exporter needs opset >= 18)")
    if not dynamo and not 14 <= opset <= 20:
        raise ExportError(f"opset {opset} is outside 14-20 for the TorchScript exporter (dynamo=False)")
    if batch_size < 1:
        raise ExportError(f"batch_size must be >= 1, got {batch_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*GRAPH_FILES.values(), MANIFEST_NAME, PARITY_NAME]:  # a previous export in the same directory
        with contextlib.suppress(FileNotFoundError):
            (out_dir / stale).unlink()
    bundle.eval()
    t_start = time.perf_counter()
    graphs_meta: dict[str, Any] = {}
    files: dict[str, Path] = {}
    counts: dict[str, int] = {}
    for graph, module in _graphs_of(bundle).items():
        files[graph] = out_dir / GRAPH_FILES[graph]
        graphs_meta[graph] = _export_one(bundle, graph, module, files[graph], batch_size, opset, dynamo, check)
        counts[graph] = graphs_meta[graph]["nodes"]
    manifest = {
        "format": "apr_localizer-onnx",
        "format_version": EXPORT_FORMAT_VERSION,
        "exporter": "dynamo" if dynamo else "torchscript",
        "opset": opset,
        "batch_size": batch_size,
        "graphs": graphs_meta,
        "shares_encoder": bundle.shares_encoder,
        "scene_names": list(bundle.scene_names),
        "preprocess": dict(bundle.preprocess),
        "input_size": [int(bundle.preprocess.get("crop", 224))] * 2,
        "pose_convention": POSE_CONVENTION,
        "quaternion_convention": QUATERNION_CONVENTION,
        "scene_override": "int64 (B,); values < 0 select the classifier's argmax scene",
        "source_model_sha256": weights_sha256(bundle),
        "source": {k: str(v) for k, v in bundle.provenance.items()},
        "versions": _versions(dynamo),
        "created_unix": int(time.time()),
    }
    _write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    total = time.perf_counter() - t_start
    return ExportResult(out_dir=out_dir, files=files, manifest=manifest, seconds=total, node_counts=counts)


def _versions(dynamo: bool) -> dict[str, str]:
    import onnx

    from . import __version__ as apr_version

    versions = {"apr_localizer": str(apr_version), "torch": torch.__version__, "onnx": onnx.__version__}
    if dynamo:
        try:
            import onnxscript

            versions["onnxscript"] = onnxscript.__version__
        except ImportError:  # the dynamo exporter would have failed already
            pass
    return versions


def _write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _check_manifest_io(mpath: Path, graph: str, meta: Any) -> None:
    """Check that the manifest names the contract's inputs and outputs of ``graph`` (:mod:`apr_localizer.graphs`)."""
    try:
        want = graph_io(graph)
        got = tuple(tuple(e["name"] for e in meta[k]) for k in ("inputs", "outputs"))
    except (ValueError, KeyError, TypeError):
        raise ExportError(f"{mpath}: the record of graph '{graph}' is not a valid apr_localizer graph entry") from None
    if got != want:
        raise ExportError(f"{mpath}: graph '{graph}' has I/O {got}, expected {want} (an older or foreign export)")


def load_export(out_dir: str | Path, verify: bool = True) -> ExportResult:
    """Read an export written by :func:`export_onnx`; ``verify`` checks every file's sha256 against the manifest."""
    out_dir = Path(out_dir)
    mpath = out_dir / MANIFEST_NAME
    try:
        size = mpath.stat().st_size
        if size > MAX_MANIFEST_BYTES:  # bounded before reading: a damaged file must not allocate gigabytes
            raise ExportError(f"{mpath}: {size} bytes, more than a manifest can have ({MAX_MANIFEST_BYTES}); damaged")
        manifest = json.loads(mpath.read_bytes())
    except FileNotFoundError:
        raise ExportError(f"{mpath}: no ONNX export manifest (run export_onnx first)") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{mpath}: unreadable export manifest ({type(e).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "apr_localizer-onnx" or "graphs" not in manifest:
        raise ExportError(f"{mpath}: not an apr_localizer ONNX export manifest")
    files = {}
    for graph, meta in manifest["graphs"].items():
        _check_manifest_io(mpath, graph, meta)
        path = out_dir / meta["file"]
        if not path.is_file():
            raise ExportError(f"{path}: listed in {MANIFEST_NAME} but missing")
        if verify and (path.stat().st_size != meta.get("bytes") or file_sha256(path) != meta.get("sha256")):
            raise ExportError(f"{path}: contents do not match the sha256 in {MANIFEST_NAME} (corrupt or modified)")
        files[graph] = path
    counts = {g: int(m.get("nodes", 0)) for g, m in manifest["graphs"].items()}
    return ExportResult(out_dir=out_dir, files=files, manifest=manifest, reused=True, node_counts=counts)


# ------------------------------------------------------------------------------------------------ parity
def _batches(x: torch.Tensor, b: int) -> Iterator[tuple[torch.Tensor, int]]:
    """Fixed-size batches of ``x`` (the last one padded by repeating rows) with the count of real rows."""
    for i in range(0, x.shape[0], b):
        chunk = x[i : i + b]
        n = chunk.shape[0]
        if n < b:
            chunk = torch.cat([chunk, chunk[:1].expand(b - n, *chunk.shape[1:])])
        yield chunk.contiguous(), n


def _run_ort(sess: Any, names: tuple[str, ...], args: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    feeds = {n: a.detach().cpu().contiguous().numpy() for n, a in zip(names, args)}
    return {o.name: torch.from_numpy(v) for o, v in zip(sess.get_outputs(), sess.run(None, feeds))}


def parity_report(
    bundle: ModelBundle,
    out_dir: str | Path,
    n_images: int = 4,
    seed: int = 0,
    images: torch.Tensor | None = None,
    tolerance: float = 1e-4,
    threads: int | None = None,
) -> dict[str, Any]:
    """Compare torch (eager, CPU) with ONNX Runtime (CPU) on every exported graph; also written to ``parity.json``.

    Inputs: ``n_images`` random images (seeded) and, if given, the real normalised ``images (N,3,H,W)``. Each APR /
    encoder graph runs on the argmax path (``scene_override = -1``) and the override path (a scene different from the
    argmax); the refinement graph runs one step from the torch APR's pose and latents. A case passes when every pose
    output is within ``tolerance`` (max abs) and every selected scene agrees. Uses the export in ``out_dir`` (which
    must come from the same weights) or exports one there first.
    """
    from .backends.ort_session import make_session

    out_dir = Path(out_dir)
    if (out_dir / MANIFEST_NAME).is_file():
        export = load_export(out_dir)
        if export.manifest.get("source_model_sha256") != weights_sha256(bundle):
            raise ExportError(f"{out_dir}: the ONNX export there was made from different weights than this bundle")
    else:
        export = export_onnx(bundle, out_dir)
    batch = int(export.manifest["batch_size"])
    threads = threads or torch.get_num_threads()
    sessions = {g: make_session(p, threads=threads) for g, p in export.files.items()}
    size = int(bundle.preprocess.get("crop", 224))
    inputs = {"random": torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(seed))}
    if images is not None:
        inputs["real"] = images.detach().to("cpu", torch.float32)
    bundle.eval()
    cases: list[dict[str, Any]] = []
    with torch.inference_mode():
        for kind, x in inputs.items():
            cases += _parity_cases(bundle, sessions, kind, x, batch, tolerance)
    failures = [f"{c['graph']}/{c['inputs']}/{c['path']}" for c in cases if not c["passed"]]
    report = {
        "passed": not failures,
        "failures": failures,
        "tolerance": tolerance,
        "n_images": {k: int(v.shape[0]) for k, v in inputs.items()},
        "seed": seed,
        "batch_size": batch,
        "exporter": export.exporter,
        "opset": export.opset,
        "providers": sessions["apr"].get_providers(),
        "threads": threads,
        "source_model_sha256": export.manifest.get("source_model_sha256"),
        "cases": cases,
    }
    _write_json_atomic(out_dir / PARITY_NAME, report)
    return report


class _Case:
    """Accumulates max abs diffs and scene agreement of one (graph, inputs, path) over batches."""

    def __init__(self, graph: str, kind: str, path: str) -> None:
        self.graph, self.kind, self.path = graph, kind, path
        self.diffs: dict[str, float] = {}
        self.agree = self.total = 0
        self.scenes = False

    def add(self, ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor], n: int) -> None:
        for k, v in ref.items():
            if v.is_floating_point():
                d = float((v[:n].float() - got[k][:n].float()).abs().max())
                self.diffs[k] = max(self.diffs.get(k, 0.0), d)
        if "scene" in ref:
            self.scenes = True
            self.agree += int((ref["scene"][:n] == got["scene"][:n]).sum())
        self.total += n

    def result(self, tol: float) -> dict[str, Any]:
        pose_ok = all(v <= tol for k, v in self.diffs.items() if k in ("pose", "refined_pose"))
        out: dict[str, Any] = {"graph": self.graph, "inputs": self.kind, "path": self.path, "max_abs_diff": self.diffs}
        if self.scenes:
            out["scene_agreement"] = self.agree / max(self.total, 1)
        out["images"] = self.total
        out["passed"] = bool(pose_ok and self.agree == (self.total if self.scenes else 0))
        return out


def _on_cpu(fn: Any, *args: torch.Tensor) -> Any:
    """Run a torch model or method wherever its weights live; results come back as CPU tensors."""
    module = fn if isinstance(fn, nn.Module) else fn.__self__
    device = next(module.parameters()).device
    out = fn(*(a.to(device) for a in args))
    return {k: v.cpu() for k, v in out.items()} if isinstance(out, dict) else out.cpu()


def _parity_cases(
    bundle: ModelBundle, sessions: dict[str, Any], kind: str, x: torch.Tensor, batch: int, tol: float
) -> list[dict[str, Any]]:
    """Torch vs ORT for every graph on ``x``: APR/encoder on the argmax and override paths, one refinement step."""
    cases = {}
    graphs = [("apr", bundle.apr)]
    if "encoder" in sessions:
        graphs.append(("encoder", _iapr(bundle).mstransformer))
    for graph, _ in graphs:
        for path in ("argmax", "override"):
            cases[graph, path] = _Case(graph, kind, path)
    if "refine" in sessions:
        cases["refine", "step"] = _Case("refine", kind, "step")
    for chunk, n in _batches(x, batch):
        latents = {}
        for graph, model in graphs:
            ref = _on_cpu(model, chunk)
            forced = (ref["scene"] + 1) % model.num_scenes  # never the argmax: the override really selects
            ref_forced = _on_cpu(model, chunk, forced)
            cases[graph, "argmax"].add(ref, _run_ort(sessions[graph], APR_INPUTS, (chunk, -torch.ones_like(forced))), n)
            cases[graph, "override"].add(ref_forced, _run_ort(sessions[graph], APR_INPUTS, (chunk, forced)), n)
            latents[graph] = (ref, ref_forced)
        if "refine" in sessions:
            apr_out = latents["apr"][0]
            lat = latents["encoder"][1] if "encoder" in latents else apr_out  # a separate encoder: forced latents
            args = (lat["latent_t"], lat["latent_rot"], apr_out["pose"], lat["scene"])
            ref = {"refined_pose": _on_cpu(_iapr(bundle).step, *args)}
            cases["refine", "step"].add(ref, _run_ort(sessions["refine"], REFINE_INPUTS, args), n)
    return [c.result(tol) for c in cases.values()]


# ------------------------------------------------------------------------------------------------ fp16 ONNX
def convert_onnx_fp16(src: str | Path, dst: str | Path, keep_layernorm_fp32: bool = True) -> Path:
    """Write an fp16 copy of an ONNX graph (fp32 inputs/outputs kept) with ONNX Runtime's float16 converter.

    ``keep_layernorm_fp32`` leaves ``LayerNormalization`` in float32 (FP16 LayerNorm loses accuracy on some
    TensorRT versions, NVIDIA/TensorRT#3657). This is how TensorRT-RTX (strongly typed, no precision flags) and the
    ONNX Runtime CUDA provider get fp16.
    """
    import onnx

    try:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    except ImportError as e:
        raise ExportError(f"fp16 conversion needs onnxruntime's float16 converter ({e})") from None
    block = list(DEFAULT_OP_BLOCK_LIST) + (["LayerNormalization"] if keep_layernorm_fp32 else [])
    model = onnx.load(str(src))
    with _quiet_export():
        model16 = convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    _dedupe_and_sort(model16)
    try:
        onnx.checker.check_model(model16)
    except Exception as e:
        raise ExportError(f"{Path(src).name}: the fp16 conversion produced an invalid graph ({e})") from e
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        onnx.save_model(model16, str(tmp))
    return dst


def _dedupe_and_sort(model: Any) -> None:
    """Drop duplicate producers of one tensor name and sort the nodes topologically, in place.

    ONNX Runtime's float16 converter appends its Cast nodes at the end of the graph and inserts one
    ``<init>_cast_to_fp32`` Cast per blocked consumer of a shared initializer (two LayerNorms sharing a bias in the
    dynamo export), i.e. duplicate output names; ONNX requires unique names and topological order.
    """
    g = model.graph
    nodes, produced = [], set[str]()
    for n in g.node:
        if set(n.output) & produced:
            if n.op_type != "Cast":
                raise ExportError(f"graph has two producers of {sorted(set(n.output) & produced)} ({n.op_type})")
            continue
        produced.update(o for o in n.output if o)
        nodes.append(n)
    available = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    ordered, pending = [], nodes
    while pending:
        waiting = []
        for n in pending:
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
            else:
                waiting.append(n)
        if len(waiting) == len(pending):
            raise ExportError(f"graph has a cycle or a missing input at node {waiting[0].name} ({waiting[0].op_type})")
        pending = waiting
    del g.node[:]
    g.node.extend(ordered)
