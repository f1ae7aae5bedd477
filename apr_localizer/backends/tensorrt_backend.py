"""TensorRT backend: engines built on the target from the exported ONNX graphs, cached, run on torch CUDA tensors.

Needs a CUDA device and the ``tensorrt`` Python module (JetPack's ``python3-libnvinfer`` on Jetson, NVIDIA's wheels
on a desktop) or ``tensorrt_rtx`` (RTX-class GPUs only); without them construction raises :class:`BackendError`
and ``auto`` falls through to the next candidate.

* Engines: one per graph, keyed by ONNX sha256 + TensorRT flavour/version + GPU name + compute capability +
  precision + build path (:mod:`.engine_cache`); built on a miss (:mod:`.tensorrt_build`, which picks the build
  path from the module's capabilities), rebuilt when the cached file is damaged or does not deserialize. The first
  build on a Jetson takes minutes: prebuild with ``apr-export --tensorrt`` on the target.
* Precision: fp32 (no TF32 unless ``BackendOptions.tf32``), fp16 (weakly typed with LayerNorm pinned to FP32 on
  8.6-10.x; strongly typed fp16 graph on 11.x / RTX) or int8 (calibration, 8.6-10.x only). The refinement graph is
  always fp32: it is tiny and composes poses, where fp16 rounding would show.
* Execution: the tensor API (``set_tensor_address`` + ``execute_async_v3``) on the backend's own CUDA stream, ordered
  after torch's current stream and before it again by stream waits (no host synchronisation); every address is
  checked (TensorRT returns ``False`` for a bad one) and 256-byte aligned. INT64 graph I/O that TensorRT 8.x imports
  as INT32 is cast at the boundary.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..checkpoints import ModelBundle
from ..graphs import graph_io
from .base import BackendError, BackendOptions, GraphBackend
from .engine_cache import EngineCache, EngineKey, cached_onnx_export
from .tensorrt_build import (
    BUILDER_REVISION,
    DEFAULT_WORKSPACE_MB,
    TrtCapabilities,
    build_engine_bytes,
    calibration_sha256,
    choose_plan,
    import_tensorrt,
    is_rtx,
    timing_cache_path,
)

__all__ = [
    "ALIGNMENT",
    "CudaDevice",
    "TensorRTBackend",
    "cuda_device",
    "engine_key",
    "prebuild_engines",
    "rtx_supports",
]

log = logging.getLogger(__name__)

ALIGNMENT = 256  # bytes; TensorRT requires I/O addresses aligned to 256 bytes
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
    """The CUDA device the engines run on, with the backend's own stream (never torch's default stream)."""

    device: torch.device
    name: str
    capability: tuple[int, int]
    stream: Any = field(default=None, repr=False)

    @property
    def capability_str(self) -> str:
        return f"{self.capability[0]}.{self.capability[1]}"

    def begin(self) -> int:
        """Order the backend's stream after torch's current stream (inputs are ready); return its handle."""
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        return int(self.stream.cuda_stream)

    def end(self) -> None:
        """Order torch's current stream after the backend's stream (outputs are ready for whoever reads them)."""
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

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
    major, minor = torch.cuda.get_device_capability(index)
    return CudaDevice(torch.device("cuda", index), torch.cuda.get_device_name(index), (int(major), int(minor)))


def rtx_supports(capability: tuple[int, int]) -> bool:
    """TensorRT-RTX runs on compute capability 7.5 (Turing), 8.6 (Ampere RTX), 8.9 (Ada) and 12.x (Blackwell RTX).

    Not on data-centre or embedded parts: 8.0 (A100), 8.7 (Orin), 9.0 (H100), 10.x (B200), per the TensorRT-RTX
    support matrix (1.0-1.5).
    """
    return tuple(capability) in ((7, 5), (8, 6), (8, 9)) or capability[0] == 12


def _torch_dtype(trt_dtype: Any, graph: str, name: str) -> torch.dtype:
    key = getattr(trt_dtype, "name", str(trt_dtype)).split(".")[-1]
    if key not in _DTYPES:
        raise BackendError(f"{graph} engine: tensor '{name}' has unsupported TensorRT type {key}")
    return _DTYPES[key]


def aligned_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Return an uninitialised tensor whose storage starts on a :data:`ALIGNMENT`-byte boundary."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if t.data_ptr() % ALIGNMENT == 0:
        return t
    nbytes = t.numel() * t.element_size()
    raw = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8, device=device)
    offset = (-raw.data_ptr()) % ALIGNMENT
    return raw[offset : offset + nbytes].view(dtype).view(shape)


class _TrtGraph:
    """One engine + execution context with its fixed I/O signature."""

    def __init__(self, trt: ModuleType, engine: Any, graph: str, cuda: CudaDevice) -> None:
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

    def _bind(self, name: str, t: torch.Tensor) -> None:
        ptr = t.data_ptr()
        if ptr % ALIGNMENT:
            raise BackendError(f"{self.graph} engine: tensor '{name}' address {ptr:#x} is not {ALIGNMENT}-byte aligned")
        if self.context.set_tensor_address(name, ptr) is False:  # TensorRT >= 10 reports a rejected address
            raise BackendError(f"{self.graph} engine: TensorRT rejected the address of tensor '{name}'")

    def _input(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, t: torch.Tensor) -> torch.Tensor:
        if tuple(t.shape) != shape:
            raise BackendError(
                f"{self.graph} engine input '{name}' has shape {tuple(t.shape)}, expected {shape} "
                "(the batch size is fixed at export: BackendOptions.batch_size)"
            )
        t = t.detach().to(device=self.cuda.device, dtype=dtype).contiguous()
        if t.data_ptr() % ALIGNMENT:  # a view into a larger tensor: copy into an aligned buffer
            t = aligned_empty(shape, dtype, self.cuda.device).copy_(t)
        return t

    def run(self, **feeds: torch.Tensor) -> dict[str, torch.Tensor]:
        keep = []
        for name, shape, dtype in self.inputs:
            t = self._input(name, shape, dtype, feeds[name])
            self._bind(name, t)
            keep.append(t)
        outs = {}
        for name, shape, dtype in self.outputs:
            outs[name] = aligned_empty(shape, dtype, self.cuda.device)
            self._bind(name, outs[name])
        with self.cuda.activate():
            ok = self.context.execute_async_v3(self.cuda.begin())
            self.cuda.end()
        if not ok:
            raise BackendError(f"{self.graph} engine: TensorRT execution failed (see the TensorRT log)")
        self._keep = keep  # allocated on torch's stream, which waits for ours: reuse after this call is ordered
        return {k: _interface_dtype(v) for k, v in outs.items()}


def _interface_dtype(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in (torch.int32, torch.int8, torch.uint8):
        return t.long()
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


def engine_key(
    onnx_sha256: str, caps: TrtCapabilities, cuda: CudaDevice, precision: str, calib_sha: str = "", tf32: bool = False
) -> EngineKey:
    """Return the engine cache key of one graph built with ``caps`` for ``cuda`` (backend and apr-export)."""
    return EngineKey.create(
        onnx_sha256=onnx_sha256,
        trt_module=caps.module,
        trt_version=caps.version,
        gpu_name=cuda.name,
        compute_capability=cuda.capability_str,
        precision=precision,
        plan=choose_plan(caps, precision),
        workspace_mb=DEFAULT_WORKSPACE_MB,
        keep_layernorm_fp32=True,
        tf32=bool(tf32),
        calibration_sha256=calib_sha if precision == "int8" else "",
        builder_revision=BUILDER_REVISION,
    )


class TensorRTBackend(GraphBackend):
    """TensorRT engines (fp32 / fp16 / int8) on one CUDA device.

    ``module`` overrides the TensorRT module used; ``export`` (an :class:`~apr_localizer.export.ExportResult` of this
    bundle) overrides the ONNX export cache, e.g. apr-export's graphs with non-default exporter settings.
    """

    name = "tensorrt"

    def __init__(
        self, bundle: ModelBundle, options: BackendOptions, module: ModuleType | None = None, export: Any = None
    ) -> None:
        super().__init__(bundle, options)
        from ..export import ExportError

        trt = module or import_tensorrt()
        self.trt = trt
        self.caps = TrtCapabilities.of(trt)
        self.rtx = is_rtx(trt)
        self._check_options(options)
        self.plan = choose_plan(self.caps, options.precision)  # one sentence when this TensorRT cannot build it
        self.cuda = cuda_device(self.device)
        self.device = str(self.cuda.device)
        if self.rtx and not rtx_supports(self.cuda.capability):
            raise BackendError(
                f"tensorrt_rtx engines do not run on {self.cuda.name} (compute capability {self.cuda.capability_str})"
            )
        try:
            self.export = export or cached_onnx_export(
                bundle, options.cache_dir, opset=self.caps.onnx_opset, batch_size=options.batch_size
            )
        except ExportError as e:
            raise BackendError(str(e)) from None
        self.cache = EngineCache(options.cache_dir)
        self.graphs: dict[str, _TrtGraph] = {}
        self.engine_paths: dict[str, Path] = {}
        with self.cuda.activate():
            self.logger = trt.Logger(trt.Logger.WARNING)
            self.runtime = trt.Runtime(self.logger)
            for graph in self.export.files:
                engine, self.engine_paths[graph] = self._engine(graph)
                self.graphs[graph] = _TrtGraph(trt, engine, graph, self.cuda)
        log.info(
            "tensorrt backend: %s on %s (sm %s), %s (%s)",
            self.caps.label,
            self.cuda.name,
            self.cuda.capability_str,
            options.precision,
            self.plan,
        )

    def _check_options(self, options: BackendOptions) -> None:
        if options.cuda_graphs:
            raise BackendError("cuda_graphs is supported by the torch backend only, not by tensorrt")
        if options.precision == "bf16":
            raise BackendError("precision bf16 is not supported by the tensorrt backend; use fp16")
        if options.precision == "int8" and options.calibration_images is None:
            raise BackendError("precision int8 needs BackendOptions.calibration_images (N,3,H,W normalised images)")

    def _engine(self, graph: str) -> tuple[Any, Path]:
        """Return the deserialized engine of ``graph`` from the cache, built (once, under the cache lock) on a miss."""
        options = self.options
        path = self.export.files[graph]
        prec = "fp32" if graph == "refine" else options.precision
        calib = options.calibration_images if prec == "int8" else None
        tf32 = bool(getattr(options, "tf32", False))
        key = engine_key(
            self.export.manifest["graphs"][graph]["sha256"], self.caps, self.cuda, prec, calibration_sha256(calib), tf32
        )
        timing = timing_cache_path(self.cache.dir, self.caps, self.cuda.name, self.cuda.capability_str)

        def build() -> bytes:
            log.info(
                "building the TensorRT %s engine for %s (%s); this can take minutes", prec, path.name, self.cuda.name
            )
            return build_engine_bytes(path, prec, module=self.trt, calibration=calib, tf32=tf32, timing_cache=timing)

        info = {"graph": graph, "onnx": str(path)}
        engine = self.cache.get_or_build(key, build, self.runtime.deserialize_cuda_engine, info=info)
        return engine, self.cache.paths(key)[0]

    def describe(self) -> dict[str, str]:
        return {
            **super().describe(),
            "tensorrt": self.caps.label,
            "build": self.plan,
            "gpu": f"{self.cuda.name} (sm {self.cuda.capability_str})",
            "onnx": f"{self.export.exporter} opset {self.export.opset}",
        }

    def close(self) -> None:
        self.graphs.clear()


def prebuild_engines(
    bundle: ModelBundle, options: BackendOptions, module: ModuleType | None = None, export: Any = None
) -> dict[str, Path]:
    """Build (or verify) the cached engines a :class:`TensorRTBackend` with ``options`` will use; graph → engine path.

    Each engine is built once, into the engine cache the node reads (``options.cache_dir``), on the target device;
    ``export`` selects other ONNX graphs than the runtime's default export (see :class:`TensorRTBackend`).
    """
    backend = TensorRTBackend(bundle, options, module, export)
    try:
        return dict(backend.engine_paths)
    finally:
        backend.close()
