"""A stand-in ``tensorrt`` module per API generation, for tests on machines without TensorRT (or without a GPU).

Generations (what each fake exposes, from NVIDIA's API references and the 10.x → 11.x migration guide):

* ``"8.6"`` (JetPack 5/6-era TensorRT 8.6): ``EXPLICIT_BATCH`` must be requested (``Builder.max_batch_size`` still
  exists), ``BuilderFlag.FP16/INT8/OBEY_PRECISION_CONSTRAINTS``, ``IInt8EntropyCalibrator2``; INT64 graph I/O is
  imported as INT32; ``set_tensor_address`` returns ``None``.
* ``"10"`` (TensorRT 10.x, e.g. JetPack 6's 10.3): explicit batch implicit, the same precision flags and
  calibrators, ``STRONGLY_TYPED`` as an opt-in; ``set_tensor_address`` returns ``False`` for a misaligned address.
* ``"11"`` (TensorRT 11.x, today's ``pip install tensorrt``): no ``FP16``/``INT8``/``OBEY_PRECISION_CONSTRAINTS``
  flags, no calibrators and no ``int8_calibrator``; every network is strongly typed (setting a layer's precision
  raises), ``STRONGLY_TYPED`` accepted and ignored; int8 only through Q/DQ nodes in the graph (``IQuantizeLayer``).
* ``"rtx"`` (``tensorrt_rtx`` 1.x): like 11 under the module name ``tensorrt_rtx``.

The parser keeps the ONNX bytes and exposes one layer per ONNX node (``ILayer`` base objects, like the real
``network.get_layer``; ``LayerNormalization`` nodes have type ``NORMALIZATION``). The "engine" runs the ONNX graph
with ONNX Runtime on the memory behind the tensor addresses: host memory by default, or CUDA memory through
``__cuda_array_interface__`` (``memory="cuda"``, the plumbing probe on a GPU machine).
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import json
import types
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch

from apr_localizer.backends.tensorrt_backend import CudaDevice

__all__ = ["GENERATIONS", "HostDevice", "make_fake_tensorrt"]

GENERATIONS = {
    "8.6": ("tensorrt", "8.6.2"),
    "10": ("tensorrt", "10.3.0"),
    "11": ("tensorrt", "11.4.0"),
    "rtx": ("tensorrt_rtx", "1.7.1"),
}
_MAGIC = b"FAKETRT\0"


class _DT(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    INT64 = 4


_NP = {_DT.FLOAT: np.float32, _DT.HALF: np.float16, _DT.INT32: np.int32, _DT.INT64: np.int64}
_TORCH = {_DT.FLOAT: torch.float32, _DT.HALF: torch.float16, _DT.INT32: torch.int32, _DT.INT64: torch.int64}
_ONNX = {"tensor(float)": _DT.FLOAT, "tensor(int64)": _DT.INT64}


class HostDevice(CudaDevice):
    """The GPU that cannot exist here: a named device with a compute capability whose memory is host memory."""

    def begin(self) -> int:
        return 0

    def end(self) -> None:
        pass

    def activate(self):
        return contextlib.nullcontext()


class _CudaView:
    """``__cuda_array_interface__`` over a raw device address, so torch can view memory TensorRT would use."""

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        typestr = {torch.float32: "<f4", torch.float16: "<f2", torch.int32: "<i4", torch.int64: "<i8"}[dtype]
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (ptr, False), "version": 3}


def _read(ptr: int, shape: tuple[int, ...], dt: _DT, memory: str) -> np.ndarray:
    if memory == "cuda":
        return torch.as_tensor(_CudaView(ptr, shape, _TORCH[dt]), device="cuda").cpu().numpy()
    n = int(np.prod(shape)) * np.dtype(_NP[dt]).itemsize
    raw = np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(ptr))
    return raw.view(_NP[dt]).reshape(shape).copy()


def _write(ptr: int, value: np.ndarray, dt: _DT, memory: str) -> None:
    value = np.ascontiguousarray(value.astype(_NP[dt]))
    if memory == "cuda":
        torch.as_tensor(_CudaView(ptr, value.shape, _TORCH[dt]), device="cuda").copy_(torch.from_numpy(value))
        return
    ctypes.memmove(ptr, value.ctypes.data, value.nbytes)


def _flags_namespace(generation: str) -> types.SimpleNamespace:
    flags = {"TF32": "TF32"}
    if generation in ("8.6", "10"):
        flags.update(FP16="FP16", INT8="INT8", OBEY_PRECISION_CONSTRAINTS="OBEY")
    return types.SimpleNamespace(**flags)


def make_fake_tensorrt(generation: str = "10", memory: str = "host", version: str | None = None):
    """Build a fake TensorRT module of ``generation`` (see the module docstring); ``mod.builds`` records each build.

    Every build appends ``{"network_flags", "builder_flags", "strongly_typed", "fp16_initializers", "qdq_nodes",
    "norm_layers", "layernorm_scale_types", "pinned", "pinned_compute", "timing_entries_loaded"}`` to ``mod.builds``.
    """
    import onnxruntime as ort

    name, default_version = GENERATIONS[generation]
    strong_only = generation in ("11", "rtx")
    mod = types.ModuleType(name)
    mod.__version__ = version or default_version
    mod.generation = generation
    mod.stats = Counter()
    mod.builds = []
    ns = types.SimpleNamespace
    mod.DataType = _DT
    mod.float32, mod.float16, mod.int32 = _DT.FLOAT, _DT.HALF, _DT.INT32
    mod.TensorIOMode = ns(INPUT="INPUT", OUTPUT="OUTPUT")
    net_flags = {"8.6": {"EXPLICIT_BATCH": 0}, "10": {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}}
    mod.NetworkDefinitionCreationFlag = ns(**net_flags.get(generation, {"STRONGLY_TYPED": 0}))
    mod.BuilderFlag = _flags_namespace(generation)
    mod.MemoryPoolType = ns(WORKSPACE="WORKSPACE")
    mod.LayerType = ns(NORMALIZATION="NORMALIZATION", OTHER="OTHER")

    class Logger:
        ERROR, WARNING, INFO = 1, 2, 3

        def __init__(self, level: int = 2) -> None:
            self.level = level

    class ILayer:
        def __init__(self, network, node) -> None:
            self._network, self.name = network, node.name
            self.type = mod.LayerType.NORMALIZATION if node.op_type == "LayerNormalization" else mod.LayerType.OTHER
            self.num_outputs = len(node.output)
            self._precision, self.output_types = None, {}

        @property
        def precision(self):
            return self._precision

        @precision.setter
        def precision(self, value) -> None:
            if self._network.strongly_typed:
                raise RuntimeError("setting a layer's precision is not allowed in a strongly typed network")
            self._precision = value

        def set_output_type(self, index: int, dtype) -> None:
            if self._network.strongly_typed:
                raise RuntimeError("setting a layer's output type is not allowed in a strongly typed network")
            self.output_types[index] = dtype

    class INormalizationLayer(ILayer):
        compute_precision = None

    mod.ILayer, mod.INormalizationLayer = ILayer, INormalizationLayer
    if generation != "8.6":  # explicit quantization layers (TensorRT-RTX has them too, for weight-only int8/int4)
        mod.IQuantizeLayer = type("IQuantizeLayer", (ILayer,), {})

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags, self.onnx, self.layers = flags, b"", []
            strong_bit = getattr(mod.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
            self.strongly_typed = strong_only or (
                generation == "10" and strong_bit is not None and bool(flags & (1 << strong_bit))
            )

        @property
        def num_layers(self) -> int:
            return len(self.layers)

        def get_layer(self, i: int) -> ILayer:
            return self.layers[i]  # the base ILayer, as the real bindings return it

    class OnnxParser:
        def __init__(self, network: Network, logger: Logger) -> None:
            self.network, self.errors = network, []

        def parse_from_file(self, path: str) -> bool:
            try:
                data = Path(path).read_bytes()
                model = onnx.load_from_string(data)
                onnx.checker.check_model(model)
            except Exception as e:
                self.errors.append(str(e).splitlines()[0])
                return False
            self.network.onnx = data
            self.network.model = model
            self.network.layers = [ILayer(self.network, n) for n in model.graph.node]
            return True

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> str:
            return self.errors[i]

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.entries = json.loads(data)["entries"] if data else 0

        def serialize(self) -> bytes:
            return json.dumps({"entries": self.entries}).encode()

    class IBuilderConfig:
        def __init__(self) -> None:
            self.flags, self.pools, self.timing = {"TF32"}, {}, None  # TF32 is on by default in real TensorRT

        def set_flag(self, flag: str) -> None:
            self.flags.add(flag)

        def clear_flag(self, flag: str) -> None:
            self.flags.discard(flag)

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            self.pools[pool] = size

        def create_timing_cache(self, data: bytes) -> TimingCache:
            return TimingCache(bytes(data))  # garbage raises, like a foreign cache in real TensorRT

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            self.timing = cache
            return True

        def get_timing_cache(self) -> TimingCache:
            return self.timing

    if not strong_only:
        IBuilderConfig.int8_calibrator = None

        class IInt8EntropyCalibrator2:
            def __init__(self) -> None:
                pass

        mod.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2
    mod.IBuilderConfig = IBuilderConfig

    class Builder:
        if generation == "8.6":
            max_batch_size = 1  # implicit-batch API, removed in 10.0

        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int = 0) -> Network:
            return Network(flags)

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def build_serialized_network(self, network: Network, config: IBuilderConfig) -> bytes:
            mod.stats["builds"] += 1
            inits = {i.name: i.data_type for i in network.model.graph.initializer}
            fp16_inits = sum(t == onnx.TensorProto.FLOAT16 for t in inits.values())
            ln = [n for n in network.model.graph.node if n.op_type == "LayerNormalization"]
            ln_scale_types = sorted(
                {onnx.TensorProto.DataType.Name(inits[n.input[1]]) for n in ln if n.input[1] in inits}
            )
            norms = [layer for layer in network.layers if layer.type == mod.LayerType.NORMALIZATION]
            loaded = None
            if config.timing is not None:
                loaded = config.timing.entries
                config.timing.entries += 1
            mod.builds.append(
                {
                    "network_flags": network.flags,
                    "builder_flags": sorted(config.flags),
                    "strongly_typed": network.strongly_typed,
                    "fp16_initializers": fp16_inits,
                    "qdq_nodes": sum(
                        n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in network.model.graph.node
                    ),
                    "norm_layers": len(norms),
                    "layernorm_scale_types": ln_scale_types,
                    "pinned": sum(layer.precision == _DT.FLOAT for layer in norms),
                    "pinned_compute": sum(getattr(layer, "compute_precision", None) == _DT.FLOAT for layer in norms),
                    "timing_entries_loaded": loaded,
                }
            )
            header = json.dumps({"version": mod.__version__}).encode()
            return _MAGIC + len(header).to_bytes(4, "little") + header + network.onnx

    class Context:
        def __init__(self, engine) -> None:
            self.engine, self.addresses = engine, {}

        def set_tensor_address(self, name: str, ptr: int):
            if generation == "8.6":
                self.addresses[name] = int(ptr)
                return None  # 8.x bindings return nothing useful
            if int(ptr) % 256 or name not in self.engine.dtypes:
                return False  # TensorRT 10+: logs an error and returns False
            self.addresses[name] = int(ptr)
            return True

        def execute_async_v3(self, stream: int) -> bool:
            e = self.engine
            mod.stats["streams"] += stream != 0
            feeds = {
                n: _read(self.addresses[n], shape, e.dtypes[n], memory).astype(_NP[e.onnx_dtypes[n]])
                for n, shape in e.in_shapes.items()
            }
            for (n, _), value in zip(e.out_shapes.items(), e.session().run(None, feeds)):
                _write(self.addresses[n], value, e.dtypes[n], memory)
            mod.stats["executions"] += 1
            return True

    class Engine:
        def __init__(self, onnx_bytes: bytes) -> None:
            self.onnx_bytes = onnx_bytes
            model = onnx.load_from_string(onnx_bytes)
            graph_inits = {i.name for i in model.graph.initializer}
            ins = [v for v in model.graph.input if v.name not in graph_inits]
            outs = list(model.graph.output)
            shape = lambda v: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)  # noqa: E731
            self.in_shapes = {v.name: shape(v) for v in ins}
            self.out_shapes = {v.name: shape(v) for v in outs}
            elem = {onnx.TensorProto.FLOAT: _DT.FLOAT, onnx.TensorProto.INT64: _DT.INT64}
            self.onnx_dtypes = {v.name: elem[v.type.tensor_type.elem_type] for v in ins + outs}
            int32 = generation == "8.6"  # TensorRT 8.x imports INT64 graph I/O as INT32
            self.dtypes = {k: (_DT.INT32 if int32 and d == _DT.INT64 else d) for k, d in self.onnx_dtypes.items()}
            self.names = list(self.in_shapes) + list(self.out_shapes)
            self.num_io_tensors = len(self.names)
            self._session = None

        def session(self):
            if self._session is None:  # lazily: ORT's CPU provider lacks some fp16 kernels of strongly typed graphs
                self._session = ort.InferenceSession(self.onnx_bytes, providers=["CPUExecutionProvider"])
            return self._session

        def get_tensor_name(self, i: int) -> str:
            return self.names[i]

        def get_tensor_mode(self, name: str) -> str:
            return "INPUT" if name in self.in_shapes else "OUTPUT"

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return self.in_shapes.get(name) or self.out_shapes[name]

        def get_tensor_dtype(self, name: str) -> _DT:
            return self.dtypes[name]

        def create_execution_context(self) -> Context:
            return Context(self)

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes):
            mod.stats["deserialize"] += 1
            if not data.startswith(_MAGIC):
                return None  # what TensorRT does with a damaged plan (after logging an error)
            n = int.from_bytes(data[len(_MAGIC) : len(_MAGIC) + 4], "little")
            header = json.loads(data[len(_MAGIC) + 4 : len(_MAGIC) + 4 + n])
            if header["version"] != mod.__version__:
                return None  # a plan serialized by another TensorRT version
            return Engine(data[len(_MAGIC) + 4 + n :])

    mod.Logger, mod.Builder, mod.OnnxParser, mod.Runtime = Logger, Builder, OnnxParser, Runtime
    return mod
