"""TensorRT backend: engines built on the target from the exported ONNX graphs, cached, run on torch CUDA tensors.

Needs a CUDA device and the ``tensorrt`` Python module (JetPack's ``python3-libnvinfer`` on Jetson, NVIDIA's wheels
on a desktop) or ``tensorrt_rtx`` (RTX-class GPUs only); without them construction raises :class:`BackendError`
and ``auto`` falls through to ONNX Runtime.

* Engines: one per graph, keyed by ONNX sha256 + TensorRT flavour/version + GPU name + compute capability +
  precision + builder flags (:mod:`.engine_cache`); built on a miss, rebuilt when the cached file is damaged or does
  not deserialize. The first build on a Jetson takes minutes: prebuild with ``apr-export --tensorrt``.
* Precision: fp32, fp16 (FP16 flag, LayerNorm pinned to FP32; TensorRT-RTX converts the graph to fp16 instead) or
  int8 (entropy calibration over ``BackendOptions.calibration_images``; full TensorRT only). The refinement graph is
  always built in fp32: it is tiny and composes poses, where fp16 rounding would show.
* Execution: the TensorRT >= 8.5 tensor API (``set_tensor_address`` + ``execute_async_v3``) on torch's current CUDA
  stream, inputs and outputs as torch CUDA tensors (no host copies). INT64 graph inputs/outputs that TensorRT 8.x
  imports as INT32 are cast at the boundary.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..checkpoints import ModelBundle
from .base import BackendError, BackendOptions, GraphBackend
from .engine_cache import EngineCache, EngineKey, cached_onnx_export

__all__ = ["DEFAULT_WORKSPACE_MB", "CudaDevice", "TensorRTBackend", "cuda_device", "prebuild_engines", "rtx_supports"]

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE_MB = 1024
BUILDER_REVISION = 1  # bump when build_tensorrt_engine_bytes changes what it builds
_DTYPES = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass
class CudaDevice:
    """The CUDA device the engines run on; owns the stream handle given to TensorRT."""

    device: torch.device
    name: str
    capability: tuple[int, int]

    @property
    def capability_str(self) -> str:
        return f"{self.capability[0]}.{self.capability[1]}"

    def stream_handle(self) -> int:
        """Raw ``cudaStream_t`` of torch's current stream on this device (outputs stay stream-ordered)."""
        return torch.cuda.current_stream(self.device).cuda_stream

    def activate(self) -> contextlib.AbstractContextManager:
        """Context making this device current (TensorRT uses the current CUDA device)."""
        return torch.cuda.device(self.device)


def cuda_device(device: str) -> CudaDevice:
    """Describe CUDA device ``device`` (``cuda`` / ``cuda:N``); :class:`BackendError` without one."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise BackendError(f"the tensorrt backend needs a CUDA device, got device '{device}'")
    if not torch.cuda.is_available():
        raise BackendError("the tensorrt backend needs a CUDA device and torch sees none")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return CudaDevice(
        torch.device("cuda", index), torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index))
    )


def rtx_supports(capability: tuple[int, int]) -> bool:
    """TensorRT-RTX engines run on compute capability 8.0, 8.6, 8.9 and >= 12.0 (inference_notes.md §5)."""
    return tuple(capability) in ((8, 0), (8, 6), (8, 9)) or capability[0] >= 12


def _torch_dtype(trt_dtype: Any, graph: str, name: str) -> torch.dtype:
    key = getattr(trt_dtype, "name", str(trt_dtype)).split(".")[-1]
    if key not in _DTYPES:
        raise BackendError(f"{graph} engine: tensor '{name}' has unsupported TensorRT type {key}")
    return _DTYPES[key]


class _TrtGraph:
    """One engine + execution context with its fixed I/O signature."""

    def __init__(self, trt: ModuleType, engine: Any, graph: str, cuda: CudaDevice) -> None:
        from ..export import graph_io

        self.engine = engine
        self.graph = graph
        self.cuda = cuda
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"{graph} engine: TensorRT could not create an execution context (out of memory?)")
        self.inputs: list[tuple[str, tuple[int, ...], torch.dtype]] = []
        self.outputs: list[tuple[str, tuple[int, ...], torch.dtype]] = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = tuple(int(d) for d in engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendError(f"{graph} engine: tensor '{name}' has a dynamic shape {shape}, expected fixed")
            entry = (name, shape, _torch_dtype(engine.get_tensor_dtype(name), graph, name))
            (self.inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else self.outputs).append(entry)
        want_in, want_out = graph_io(graph)
        got_in, got_out = {n for n, _, _ in self.inputs}, {n for n, _, _ in self.outputs}
        if got_in != set(want_in) or got_out != set(want_out):
            raise BackendError(
                f"{graph} engine has inputs {sorted(got_in)} / outputs {sorted(got_out)}, expected "
                f"{list(want_in)} / {list(want_out)}"
            )
        self._keep: list[torch.Tensor] = []

    def run(self, **feeds: torch.Tensor) -> dict[str, torch.Tensor]:
        device = self.cuda.device
        keep = []
        for name, shape, dtype in self.inputs:
            t = feeds[name]
            if tuple(t.shape) != shape:
                raise BackendError(
                    f"{self.graph} engine input '{name}' has shape {tuple(t.shape)}, expected {shape} "
                    "(the batch size is fixed at export: BackendOptions.batch_size)"
                )
            t = t.detach().to(device=device, dtype=dtype).contiguous()
            self.context.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        outs = {}
        for name, shape, dtype in self.outputs:
            outs[name] = torch.empty(shape, dtype=dtype, device=device)
            self.context.set_tensor_address(name, outs[name].data_ptr())
        with self.cuda.activate():
            ok = self.context.execute_async_v3(self.cuda.stream_handle())
        if not ok:
            raise BackendError(f"{self.graph} engine: TensorRT execution failed (see the TensorRT log)")
        self._keep = keep  # inputs stay referenced until the next call (stream-ordered reuse is safe anyway)
        return {k: _interface_dtype(v) for k, v in outs.items()}


def _interface_dtype(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in (torch.int32, torch.int8, torch.uint8):
        return t.long()
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


class TensorRTBackend(GraphBackend):
    """TensorRT engines (fp32 / fp16 / int8) on one CUDA device; ``module`` overrides the TensorRT module used."""

    name = "tensorrt"

    def __init__(self, bundle: ModelBundle, options: BackendOptions, module: ModuleType | None = None) -> None:
        super().__init__(bundle, options)
        from ..export import ExportError, build_tensorrt_engine_bytes, import_tensorrt, is_rtx

        trt = module or import_tensorrt()
        self.trt = trt
        self.rtx = is_rtx(trt)
        precision = options.precision
        if options.cuda_graphs:
            raise BackendError("cuda_graphs is supported by the torch backend only, not by tensorrt")
        if precision == "bf16":
            raise BackendError("precision bf16 is not supported by the tensorrt backend; use fp16")
        if precision == "int8" and self.rtx:
            raise BackendError("precision int8 needs the full TensorRT; tensorrt_rtx builds fp32 or fp16 only")
        if precision == "int8" and options.calibration_images is None:
            raise BackendError("precision int8 needs BackendOptions.calibration_images (N,3,H,W normalised images)")
        self.cuda = cuda_device(self.device)
        self.device = str(self.cuda.device)
        if self.rtx and not rtx_supports(self.cuda.capability):
            raise BackendError(
                f"tensorrt_rtx engines do not run on {self.cuda.name} (compute capability {self.cuda.capability_str})"
            )
        try:
            self.export = cached_onnx_export(bundle, options.cache_dir, batch_size=options.batch_size)
        except ExportError as e:
            raise BackendError(str(e)) from None
        self.cache = EngineCache(options.cache_dir)
        calib = options.calibration_images if precision == "int8" else None
        calib_sha = ""
        if calib is not None:
            calib_sha = hashlib.sha256(calib.detach().to("cpu", torch.float32).contiguous().numpy()).hexdigest()
        self.graphs: dict[str, _TrtGraph] = {}
        self.engine_paths: dict[str, Path] = {}
        with self.cuda.activate():
            self.logger = trt.Logger(trt.Logger.WARNING)
            self.runtime = trt.Runtime(self.logger)
            for graph, path in self.export.files.items():
                prec = "fp32" if graph == "refine" else precision
                key = EngineKey.create(
                    onnx_sha256=self.export.manifest["graphs"][graph]["sha256"],
                    trt_module=trt.__name__,
                    trt_version=trt.__version__,
                    gpu_name=self.cuda.name,
                    compute_capability=self.cuda.capability_str,
                    precision=prec,
                    workspace_mb=DEFAULT_WORKSPACE_MB,
                    keep_layernorm_fp32=True,
                    calibration_sha256=calib_sha if prec == "int8" else "",
                    builder_revision=BUILDER_REVISION,
                )

                def build(path=path, prec=prec) -> bytes:
                    log.info("building the TensorRT %s engine for %s (%s); this can take minutes", prec, path.name,
                             self.cuda.name)
                    return build_tensorrt_engine_bytes(path, prec, calib, DEFAULT_WORKSPACE_MB, trt)

                engine = self.cache.get_or_build(
                    key, build, self.runtime.deserialize_cuda_engine, info={"graph": graph, "onnx": str(path)}
                )
                self.graphs[graph] = _TrtGraph(trt, engine, graph, self.cuda)
                self.engine_paths[graph] = self.cache.paths(key)[0]
        log.info(
            "tensorrt backend: %s %s on %s (sm %s), %s",
            trt.__name__,
            trt.__version__,
            self.cuda.name,
            self.cuda.capability_str,
            precision,
        )

    def describe(self) -> dict[str, str]:
        return {
            **super().describe(),
            "tensorrt": f"{self.trt.__name__} {self.trt.__version__}",
            "gpu": f"{self.cuda.name} (sm {self.cuda.capability_str})",
            "onnx": f"{self.export.exporter} opset {self.export.opset}",
        }

    def close(self) -> None:
        self.graphs.clear()


def prebuild_engines(bundle: ModelBundle, options: BackendOptions) -> dict[str, Path]:
    """Build (or verify) the cached engines a :class:`TensorRTBackend` with ``options`` will use; graph → engine path.

    For an ``apr-export --tensorrt`` style command on the target, so that the first node start is fast.
    """
    backend = TensorRTBackend(bundle, options)
    try:
        return dict(backend.engine_paths)
    finally:
        backend.close()
