"""ONNX Runtime backend: the exported graphs (from the ONNX export cache) on the CPU or CUDA execution provider.

* CPU: fp32, or int8 (ONNX Runtime dynamic quantisation of MatMul/Gemm in the APR/encoder graphs; the small
  refinement graph stays fp32). Tensors cross as zero-copy numpy views of CPU torch tensors.
* CUDA (``onnxruntime-gpu`` instead of ``onnxruntime``, never both: ``pip install .[ort-gpu]`` after uninstalling
  the CPU package, see docs/deployment.md): fp32 or fp16 (graph converted with LayerNorm kept in fp32). Inputs and
  outputs are bound as torch CUDA tensors through IO binding; the session runs on the backend's own CUDA stream
  (``user_compute_stream``), ordered after torch's current stream by a stream wait, and ONNX Runtime's end-of-run
  stream synchronisation is the one host sync per call. **Not run here (no GPU, no onnxruntime-gpu)**.

The session uses ``intra_op_num_threads = options.threads`` (0 = physical cores), one inter-op thread and every
graph optimisation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints import ModelBundle
from ..export import ExportError, convert_onnx_fp16
from .base import BackendError, BackendOptions, GraphBackend
from .engine_cache import cached_derivative, cached_onnx_export
from .ort_session import make_session
from .torch_backend import physical_cores

__all__ = ["OnnxRuntimeBackend", "quantize_dynamic_int8"]

log = logging.getLogger(__name__)

_DTYPES = {
    "tensor(float)": (torch.float32, np.float32),
    "tensor(float16)": (torch.float16, np.float16),
    "tensor(int64)": (torch.int64, np.int64),
    "tensor(int32)": (torch.int32, np.int32),
}


def quantize_dynamic_int8(src: Path, dst: Path) -> None:
    """Quantise ``src`` to ``dst``: ONNX Runtime dynamic int8 on MatMul/Gemm only.

    Quantising the convolutions too makes the CPU graph slower (inference_notes.md §7).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8)


class _OrtGraph:
    """One session with its fixed input/output signature; ``run(tensors by input name) -> {name: torch tensor}``."""

    def __init__(self, session: Any, graph: str, device: torch.device, stream: Any = None) -> None:
        self.session = session
        self.graph = graph
        self.device = device
        self.stream = stream  # the torch CUDA stream the session computes on (user_compute_stream)
        self.inputs = [(i.name, tuple(i.shape), _dtype(i.type, graph, i.name)) for i in session.get_inputs()]
        self.outputs = [(o.name, tuple(o.shape), _dtype(o.type, graph, o.name)) for o in session.get_outputs()]
        for name, shape, _ in self.inputs + self.outputs:
            if not all(isinstance(d, int) and d > 0 for d in shape):
                raise BackendError(f"{graph} graph: '{name}' has a non-fixed shape {shape} (export with a fixed batch)")

    def _check(self, name: str, shape: tuple[int, ...], t: torch.Tensor) -> None:
        if tuple(t.shape) != shape:
            raise BackendError(
                f"{self.graph} graph input '{name}' has shape {tuple(t.shape)}, expected {shape} "
                "(the batch size is fixed at export: BackendOptions.batch_size)"
            )

    def run(self, **feeds: torch.Tensor) -> dict[str, torch.Tensor]:
        if set(feeds) != {name for name, _, _ in self.inputs}:
            raise BackendError(f"{self.graph} graph expects inputs {[n for n, _, _ in self.inputs]}, got {list(feeds)}")
        args = tuple(feeds[name] for name, _, _ in self.inputs)
        if self.device.type == "cuda":
            return self._run_cuda(args)
        arrays = {}
        for (name, shape, (tdtype, _)), t in zip(self.inputs, args):
            self._check(name, shape, t)
            arrays[name] = t.detach().to("cpu", tdtype).contiguous().numpy()  # a view when already CPU/contiguous
        results = self.session.run(None, arrays)
        return {name: torch.from_numpy(v) for (name, _, _), v in zip(self.outputs, results)}

    def _run_cuda(self, args: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        # Not exercised here (no GPU): binds torch CUDA memory directly. The session computes on self.stream, which
        # first waits (on the device, no host sync) for torch's current stream to finish producing the inputs.
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        binding = self.session.io_binding()
        keep = []
        for (name, shape, (tdtype, ndtype)), t in zip(self.inputs, args):
            self._check(name, shape, t)
            t = t.detach().to(self.device, tdtype).contiguous()
            keep.append(t)
            binding.bind_input(name, "cuda", index, ndtype, list(shape), t.data_ptr())
        outs = {}
        for name, shape, (tdtype, ndtype) in self.outputs:
            out = torch.empty(shape, dtype=tdtype, device=self.device)
            binding.bind_output(name, "cuda", index, ndtype, list(shape), out.data_ptr())
            outs[name] = out
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self.session.run_with_iobinding(binding)  # ends with ONNX Runtime's stream sync: the one sync per call
        return outs


def _dtype(type_str: str, graph: str, name: str) -> tuple[torch.dtype, Any]:
    if type_str not in _DTYPES:
        raise BackendError(f"{graph} graph: '{name}' has unsupported type {type_str}")
    return _DTYPES[type_str]


class OnnxRuntimeBackend(GraphBackend):
    """ONNX Runtime on CPU (fp32 / int8) or on the CUDA execution provider (fp32 / fp16)."""

    name = "onnxruntime"

    def __init__(self, bundle: ModelBundle, options: BackendOptions) -> None:
        super().__init__(bundle, options)
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendError(f"the onnxruntime backend needs the onnxruntime package ({e})") from None
        dev = torch.device(self.device)
        precision = options.precision
        if options.cuda_graphs:
            raise BackendError("cuda_graphs is supported by the torch backend only, not by onnxruntime")
        if dev.type == "cpu" and precision in ("fp16", "bf16"):
            raise BackendError(
                f"precision {precision} on the CPU is slower than fp32 with onnxruntime; use fp32 (or int8) on the CPU"
            )
        if dev.type == "cuda" and precision in ("bf16", "int8"):
            raise BackendError(f"precision {precision} is not supported by the onnxruntime CUDA provider; use fp16")
        if options.batch_size < 1:
            raise BackendError(f"batch_size must be >= 1, got {options.batch_size}")
        dev, providers = self._providers(ort, dev, options)
        self.threads = options.threads or physical_cores()
        try:
            self.export = cached_onnx_export(bundle, options.cache_dir, batch_size=options.batch_size)
        except ExportError as e:
            raise BackendError(str(e)) from None
        self.graphs: dict[str, _OrtGraph] = {}
        for graph, path in self.export.files.items():
            if precision == "int8" and graph != "refine":
                path = cached_derivative(path, "int8", quantize_dynamic_int8)
            elif precision == "fp16" and graph != "refine":
                path = cached_derivative(path, "fp16", convert_onnx_fp16)
            try:
                session = make_session(path, self.threads, providers)
            except Exception as e:
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                raise BackendError(f"{path}: ONNX Runtime cannot load the graph ({first})") from None
            if dev.type == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
                raise BackendError(
                    "ONNX Runtime could not initialise its CUDA provider (missing CUDA/cuDNN libraries?); "
                    "it fell back to the CPU"
                )
            self.graphs[graph] = _OrtGraph(session, graph, dev, self.stream)
        self.providers = self.graphs["apr"].session.get_providers()
        log.info(
            "onnxruntime backend: %s, %s, %d threads, %s export (opset %d)%s",
            ",".join(self.providers),
            precision,
            self.threads,
            self.export.exporter,
            self.export.opset,
            " (cached)" if self.export.reused else "",
        )

    def _providers(self, ort: Any, dev: torch.device, options: BackendOptions) -> tuple[torch.device, list]:
        """Return the device (``cuda:N`` made explicit) and the providers; creates the CUDA stream on a GPU."""
        self.stream = None
        if dev.type != "cuda":
            return dev, ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendError("this onnxruntime build has no CUDAExecutionProvider (install onnxruntime-gpu)")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        dev = torch.device("cuda", index)
        self.device = str(dev)
        # A dedicated stream: ONNX Runtime treats handle 0 (torch's default stream) as "no user stream".
        self.stream = torch.cuda.Stream(dev)
        cuda_opts = {
            "device_id": index,
            "user_compute_stream": str(self.stream.cuda_stream),
            "use_tf32": "1" if options.tf32 else "0",  # the CUDA provider's default is on: fp32 means fp32
        }
        return dev, [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]

    def describe(self) -> dict[str, str]:
        return {
            **super().describe(),
            "providers": ",".join(self.providers),
            "threads": str(self.threads),
            "onnx": f"{self.export.exporter} opset {self.export.opset}",
            "onnx_dir": str(self.export.out_dir),
        }

    def close(self) -> None:
        self.graphs.clear()
