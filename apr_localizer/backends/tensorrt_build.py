"""TensorRT engine builds from the exported ONNX graphs: one build path per capability of the installed module.

The path is chosen from what the module offers (``hasattr`` checks), not from its version string:

============  ==========================================================================================================
plan          when and how
============  ==========================================================================================================
fp32          every TensorRT; ``BuilderFlag.TF32`` cleared where it exists (fp32 means fp32 unless ``tf32`` is asked)
fp16-weak     ``BuilderFlag.FP16`` exists (TensorRT 8.6-10.x): weakly typed network, FP16 flag, LayerNorm pinned to FP32
fp16-strong   no FP16 flag (TensorRT 11.x, TensorRT-RTX): the ONNX graph is cast to fp16 (LayerNorm kept fp32, fp32
              I/O) and built as a strongly typed network
int8-calib    ``BuilderFlag.INT8`` and ``IInt8EntropyCalibrator2`` exist (TensorRT 8.6-10.x): INT8 + FP16 flags with
              entropy calibration over the given images
int8-qdq      no calibrator but explicit quantization (``IQuantizeLayer``; TensorRT 11.x): the ONNX graph gets
              symmetric int8 QuantizeLinear/DequantizeLinear pairs on Conv/MatMul/Gemm, calibrated on the given
              images with ONNX Runtime, and is built strongly typed; TensorRT-RTX (int8 weight-only GEMMs only) and
              anything else refuse int8 with one sentence (never a fallback)
============  ==========================================================================================================

Builds reuse a **timing cache** stored beside the engine cache (``engines/timing/<module>-<version>-<gpu>.cache``) when
the module can serialize one, so rebuilding after a cache miss is faster (not with TensorRT-RTX, whose timing-cache
calls are deprecated no-ops since 1.2).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ..fileio import atomic_write_bytes
from .base import BackendError

__all__ = [
    "BUILDER_REVISION",
    "DEFAULT_WORKSPACE_MB",
    "TrtCapabilities",
    "build_engine_bytes",
    "build_tensorrt_engine",
    "calibration_sha256",
    "choose_plan",
    "import_tensorrt",
    "is_rtx",
    "quantize_qdq_int8",
    "timing_cache_path",
    "trt_major",
]

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE_MB = 1024
BUILDER_REVISION = 2  # bump when a build path changes what it builds (part of every engine cache key)
PLANS = ("fp32", "fp16-weak", "fp16-strong", "int8-calib", "int8-qdq")


def import_tensorrt() -> ModuleType:
    """Import ``tensorrt``, else ``tensorrt_rtx``; :class:`BackendError` when neither imports."""
    errors = []
    for name in ("tensorrt", "tensorrt_rtx"):
        try:
            return __import__(name)
        except Exception as e:  # ImportError, or a broken install raising OSError at import
            errors.append(f"{name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    raise BackendError("TensorRT is not available (" + "; ".join(errors) + ")")


def is_rtx(trt: ModuleType) -> bool:
    """Tell whether ``trt`` is TensorRT-RTX (strongly typed networks, RTX-class GPUs only)."""
    return trt.__name__.split(".")[0] == "tensorrt_rtx"


def trt_major(trt: ModuleType) -> int:
    """Major version of ``trt`` (0 when unknown)."""
    try:
        return int(str(trt.__version__).split(".")[0])
    except (AttributeError, ValueError):
        return 0


@dataclass(frozen=True)
class TrtCapabilities:
    """What an installed TensorRT module can do, read from its attributes."""

    module: str
    version: str
    fp16_flag: bool  # BuilderFlag.FP16: weakly typed fp16 (8.6-10.x)
    int8_calibration: bool  # BuilderFlag.INT8 + IInt8EntropyCalibrator2 (8.6-10.x)
    explicit_int8: bool  # Q/DQ graphs build to int8 kernels without a calibrator (11.x; not TensorRT-RTX)
    strongly_typed_flag: bool  # NetworkDefinitionCreationFlag.STRONGLY_TYPED (10.x opt-in; ignored on 11.x)
    explicit_batch_flag: bool  # EXPLICIT_BATCH must be requested (< 10; implicit batch was removed in 10.0)
    tf32_flag: bool
    obey_precision_flag: bool
    timing_cache: bool
    normalization_layer: bool = True  # INormalizationLayer (>= 8.6): parses opset-17 LayerNormalization

    @property
    def onnx_opset(self) -> int | None:
        """Opset to export for this module: ``None`` (the default, 17), or 16 where LayerNormalization cannot parse."""
        return None if self.normalization_layer else 16

    @classmethod
    def of(cls, trt: ModuleType) -> TrtCapabilities:
        flags = getattr(trt, "BuilderFlag", None)
        net_flags = getattr(trt, "NetworkDefinitionCreationFlag", None)
        config_cls = getattr(trt, "IBuilderConfig", None)
        return cls(
            module=trt.__name__,
            version=str(getattr(trt, "__version__", "?")),
            fp16_flag=hasattr(flags, "FP16"),
            int8_calibration=hasattr(flags, "INT8") and hasattr(trt, "IInt8EntropyCalibrator2"),
            explicit_int8=hasattr(trt, "IQuantizeLayer") and not is_rtx(trt),
            strongly_typed_flag=hasattr(net_flags, "STRONGLY_TYPED"),
            explicit_batch_flag=hasattr(net_flags, "EXPLICIT_BATCH") and not is_rtx(trt) and trt_major(trt) < 10,
            tf32_flag=hasattr(flags, "TF32"),
            obey_precision_flag=hasattr(flags, "OBEY_PRECISION_CONSTRAINTS"),
            # TensorRT-RTX >= 1.2 keeps the API but makes timing caches no-ops (it warns): skip them there.
            normalization_layer=hasattr(getattr(trt, "LayerType", None), "NORMALIZATION"),
            timing_cache=not is_rtx(trt) and (config_cls is None or hasattr(config_cls, "create_timing_cache")),
        )

    @property
    def label(self) -> str:
        return f"{self.module} {self.version}"


def choose_plan(caps: TrtCapabilities, precision: str) -> str:
    """Return the build path for ``precision`` on a module with ``caps``; :class:`BackendError` when it has none."""
    if precision == "fp32":
        return "fp32"
    if precision == "fp16":
        return "fp16-weak" if caps.fp16_flag else "fp16-strong"
    if precision == "int8":
        if caps.int8_calibration:
            return "int8-calib"
        if caps.explicit_int8:
            return "int8-qdq"
        raise BackendError(
            f"precision int8 needs TensorRT with INT8 calibration (TensorRT 8.6-10.x) or explicit Q/DQ quantization "
            f"(TensorRT 11.x), which {caps.label} does not offer; use precision fp16"
        )
    raise BackendError(f"TensorRT precision '{precision}' is not one of fp32, fp16, int8")


def timing_cache_path(engine_dir: Path, caps: TrtCapabilities, gpu_name: str, capability: str) -> Path:
    """``<engine_dir>/timing/<module>-<version>-<gpu>-sm<cc>.cache`` (timing caches are per TensorRT and GPU)."""
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", f"{caps.module}-{caps.version}-{gpu_name}-sm{capability}").strip("_")
    return Path(engine_dir) / "timing" / f"{slug}.cache"


# ------------------------------------------------------------------------------------------------ build helpers
def _set_workspace(trt: ModuleType, config: Any, workspace_mb: int) -> None:
    if hasattr(config, "set_memory_pool_limit") and hasattr(trt, "MemoryPoolType"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)


def _keep_normalization_fp32(trt: ModuleType, network: Any, config: Any, caps: TrtCapabilities) -> int:
    """Pin every normalisation layer (LayerNorm) to FP32 in a weakly typed FP16/INT8 build; returns how many.

    ``network.get_layer`` returns the base ``ILayer``; the layer-specific attribute ``compute_precision`` is only
    reachable after casting the Python object to ``INormalizationLayer`` (the pattern TensorRT's samples use).
    """
    norm_type = getattr(getattr(trt, "LayerType", None), "NORMALIZATION", None)
    norm_cls = getattr(trt, "INormalizationLayer", None)
    if norm_type is None:
        return 0
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type != norm_type:
            continue
        if norm_cls is not None and not isinstance(layer, norm_cls):
            layer.__class__ = norm_cls
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        if hasattr(layer, "compute_precision"):  # the accumulation type of the normalisation (TensorRT >= 8.6)
            layer.compute_precision = trt.float32
        pinned += 1
    if pinned and caps.obey_precision_flag:
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    return pinned


def _make_calibrator(trt: ModuleType, network: Any, images: torch.Tensor | None, batch: int) -> Any:
    """Make an ``IInt8EntropyCalibrator2`` feeding ``images`` (N,3,H,W) to ``image`` (scene_override = -1)."""
    if not torch.cuda.is_available():
        raise BackendError("INT8 calibration needs a CUDA device")
    if images is None:
        raise BackendError("an INT8 TensorRT engine needs calibration images (BackendOptions.calibration_images)")
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    if "image" not in inputs:
        raise BackendError("INT8 calibration applies to the apr/encoder graphs (input 'image') only")
    if images.shape[0] < batch:
        raise BackendError(f"INT8 calibration needs at least {batch} images, got {images.shape[0]}")
    dev = torch.device("cuda")
    data: torch.Tensor = images.detach().to(dev, torch.float32).contiguous()
    int32 = inputs.get("scene_override") is not None and inputs["scene_override"].dtype == trt.int32
    scene = torch.full((batch,), -1, dtype=torch.int32 if int32 else torch.int64, device=dev)

    class _Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.index = 0
            self.buffer = torch.empty((batch, *data.shape[1:]), dtype=torch.float32, device=dev)

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.index + batch > data.shape[0]:
                return None
            self.buffer.copy_(data[self.index : self.index + batch])
            self.index += batch
            torch.cuda.synchronize(dev)
            return [int(self.buffer.data_ptr() if n == "image" else scene.data_ptr()) for n in names]

        def read_calibration_cache(self) -> bytes | None:
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            pass

    return _Calibrator()


def quantize_qdq_int8(src: Path, dst: Path, images: torch.Tensor | None) -> Path:
    """Write ``src`` with symmetric int8 Q/DQ pairs on Conv/MatMul/Gemm, calibrated on ``images`` (N,3,H,W).

    The explicit-quantization input TensorRT 11.x builds int8 kernels from (per-channel weights, per-tensor
    activations, zero points 0), made with ONNX Runtime's static quantizer. Only the apr/encoder graphs take images.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(src), load_external_data=False)
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    if "image" not in inputs:
        raise BackendError(f"{src.name}: INT8 applies to the apr/encoder graphs (input 'image') only")
    batch = max(1, inputs["image"][0])
    if images is None or images.shape[0] < batch:
        raise BackendError(f"INT8 calibration of {src.name} needs at least {batch} images (calibration_images)")
    data = images.detach().to("cpu", torch.float32).contiguous().numpy()
    feeds = [
        {"image": data[i : i + batch], "scene_override": np.full((batch,), -1, dtype=np.int64)}
        for i in range(0, data.shape[0] - batch + 1, batch)
    ]

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self.items, None)

    quantize_static(
        str(src),
        str(dst),
        _Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["Conv", "MatMul", "Gemm"],
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    return dst


def _batch_of(network: Any) -> int:
    shape = tuple(network.get_input(0).shape)
    return int(shape[0]) if shape and int(shape[0]) > 0 else 1


def _network_flags(trt: ModuleType, caps: TrtCapabilities, plan: str) -> int:
    flags = 0
    if caps.explicit_batch_flag:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if plan in ("fp16-strong", "int8-qdq") and caps.strongly_typed_flag:  # required on 10.x, ignored on 11.x
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return flags


@contextlib.contextmanager
def _timing_cache(config: Any, path: Path | None, caps: TrtCapabilities):
    """Load the timing cache at ``path`` into ``config`` (an unusable file is ignored) and save it after the build."""
    if path is None or not caps.timing_cache:
        yield
        return
    data = b""
    with contextlib.suppress(OSError):
        data = path.read_bytes()
    cache = None
    try:
        cache = config.create_timing_cache(data)
        if not config.set_timing_cache(cache, False):
            raise ValueError("set_timing_cache returned False")
    except Exception as e:  # a damaged or foreign cache: start from an empty one
        log.warning("TensorRT timing cache %s is unusable (%s); starting a new one", path, e)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    yield
    try:
        atomic_write_bytes(path, bytes(config.get_timing_cache().serialize()))
    except OSError as e:
        log.warning("could not save the TensorRT timing cache %s (%s)", path, e)


def _parse(trt: ModuleType, builder: Any, logger: Any, onnx_path: Path, flags: int) -> Any:
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BackendError(f"{onnx_path.name}: the TensorRT ONNX parser rejected the graph: {'; '.join(errors)}")
    return network, parser


def build_engine_bytes(
    onnx_path: str | Path,
    precision: str = "fp16",
    *,
    module: ModuleType | None = None,
    calibration: torch.Tensor | None = None,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    keep_layernorm_fp32: bool = True,
    tf32: bool = False,
    timing_cache: Path | None = None,
) -> bytes:
    """Parse ``onnx_path`` and build a serialized engine along the path :func:`choose_plan` picks.

    ``calibration`` (N,3,H,W normalised images) is required for int8; ``timing_cache`` is a file read before and
    written after the build. Raises :class:`BackendError` with one sentence on any failure.
    """
    trt = module or import_tensorrt()
    caps = TrtCapabilities.of(trt)
    plan = choose_plan(caps, precision)
    onnx_path = Path(onnx_path)
    if plan in ("int8-calib", "int8-qdq") and calibration is None:
        raise BackendError("an INT8 TensorRT engine needs calibration images (BackendOptions.calibration_images)")
    if not onnx_path.is_file():
        raise BackendError(f"{onnx_path}: no such ONNX file")
    with contextlib.ExitStack() as stack:
        if plan == "fp16-strong":  # strongly typed: the graph itself carries the fp16 types
            from ..export import ExportError, convert_onnx_fp16

            tmpdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="apr_fp16_")))
            try:
                onnx_path = convert_onnx_fp16(onnx_path, tmpdir / onnx_path.name, keep_layernorm_fp32)
            except ExportError as e:
                raise BackendError(str(e)) from None
        if plan == "int8-qdq":  # explicit quantization: the graph carries the int8 scales
            tmpdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="apr_qdq_")))
            onnx_path = quantize_qdq_int8(onnx_path, tmpdir / onnx_path.name, calibration)
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network, _parser = _parse(trt, builder, logger, onnx_path, _network_flags(trt, caps, plan))
        config = builder.create_builder_config()
        _set_workspace(trt, config, workspace_mb)
        if caps.tf32_flag and not tf32:
            config.clear_flag(trt.BuilderFlag.TF32)  # fp32 layers mean fp32 (TF32 is on by default on Ampere+)
        if plan in ("fp16-weak", "int8-calib"):
            config.set_flag(trt.BuilderFlag.FP16)
            if keep_layernorm_fp32:
                _keep_normalization_fp32(trt, network, config, caps)
        if plan == "int8-calib":
            config.set_flag(trt.BuilderFlag.INT8)
            config.int8_calibrator = _make_calibrator(trt, network, calibration, _batch_of(network))
        with _timing_cache(config, timing_cache, caps):
            serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BackendError(f"{onnx_path.name}: TensorRT could not build an engine (see the TensorRT log above)")
        log.info("built a TensorRT engine of %s with %s (%s)", onnx_path.name, caps.label, plan)
        return bytes(serialized)


def build_tensorrt_engine(onnx_path: str | Path, engine_path: str | Path, precision: str = "fp16", **kw: Any) -> Path:
    """Build an engine (see :func:`build_engine_bytes` for ``kw``) and write it atomically to ``engine_path``."""
    engine_path = Path(engine_path)
    atomic_write_bytes(engine_path, build_engine_bytes(onnx_path, precision, **kw))
    return engine_path


def calibration_sha256(images: torch.Tensor | None) -> str:
    """sha256 of the calibration images (part of an INT8 engine's cache key); empty without images."""
    if images is None:
        return ""
    return hashlib.sha256(images.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()
