"""TensorRT: TensorRT-RTX parse + AOT build, the TensorRT backend on a fake ``tensorrt`` module, a GPU-marked run.

TensorRT-RTX parses and builds engines without a GPU. The fake module's engines run the ONNX graph with ONNX Runtime
on the host memory behind the tensor addresses, so the backend's real code path (engine cache, I/O binding by
address, dtype handling) is exercised on this CPU machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import importlib.util
import json
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from model_fixtures import random_iapr, random_images, random_ms_transformer

from apr_localizer.backends import tensorrt_backend
from apr_localizer.backends.base import BackendError, BackendOptions
from apr_localizer.backends.engine_cache import EngineCache, cached_onnx_export
from apr_localizer.backends.tensorrt_backend import CudaDevice, TensorRTBackend, prebuild_engines, rtx_supports
from apr_localizer.backends.torch_backend import TorchBackend
from apr_localizer.checkpoints import ModelBundle
from apr_localizer.export import build_tensorrt_engine
from apr_localizer.localizer import Localizer, LocalizerOptions

torch.set_num_threads(2)
HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None


@pytest.fixture(scope="module")
def shared_bundle() -> ModelBundle:
    apr = random_ms_transformer(seed=0)
    return ModelBundle(apr=apr, iapr=random_iapr(seed=1, mstransformer=apr))


@pytest.fixture(scope="module")
def separate_bundle() -> ModelBundle:
    return ModelBundle(apr=random_ms_transformer(seed=2), iapr=random_iapr(seed=3))


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    """One ONNX export cache for the module: each test gets its own engine cache but reuses the exports."""
    root = tmp_path_factory.mktemp("cache_root")
    (root / "onnx").mkdir()
    return root


@pytest.fixture(scope="module")
def shared_export(shared_bundle, cache_root):
    return cached_onnx_export(shared_bundle, cache_root)


# ------------------------------------------------------------------------------------------------ TensorRT-RTX
@pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx (tensorrt-rtx-cu12) is not installed")
def test_rtx_parses_and_builds_both_graphs(shared_export, tmp_path):
    import tensorrt_rtx

    for graph in ("apr", "refine"):
        engine = build_tensorrt_engine(
            shared_export.path(graph), tmp_path / f"{graph}.engine", precision="fp32", module=tensorrt_rtx
        )
        assert engine.is_file() and engine.stat().st_size > 1_000_000
    fp16 = build_tensorrt_engine(shared_export.path("apr"), tmp_path / "apr16.engine", "fp16", module=tensorrt_rtx)
    assert 0 < fp16.stat().st_size < (tmp_path / "apr.engine").stat().st_size  # fp16 weights
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx (tensorrt-rtx-cu12) is not installed")
def test_rtx_build_errors(shared_export, tmp_path):
    import tensorrt_rtx

    with pytest.raises(BackendError, match="full TensorRT"):
        build_tensorrt_engine(shared_export.path("apr"), tmp_path / "x.engine", "int8", module=tensorrt_rtx)
    with pytest.raises(BackendError, match="no such ONNX file"):
        build_tensorrt_engine(tmp_path / "missing.onnx", tmp_path / "x.engine", "fp32", module=tensorrt_rtx)
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(BackendError, match="parser rejected"):
        build_tensorrt_engine(tmp_path / "bad.onnx", tmp_path / "x.engine", "fp32", module=tensorrt_rtx)
    assert not (tmp_path / "x.engine").exists()


def test_rtx_capabilities():
    assert rtx_supports((8, 6)) and rtx_supports((8, 9)) and rtx_supports((12, 0))
    assert not rtx_supports((8, 7)) and not rtx_supports((9, 0)) and not rtx_supports((7, 2))


# ------------------------------------------------------------------------------------------------ fake TensorRT
_MAGIC = b"FAKETRT\0"


class _DT(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    INT64 = 4


_NP = {_DT.FLOAT: np.float32, _DT.HALF: np.float16, _DT.INT32: np.int32, _DT.INT64: np.int64}
_ONNX = {"tensor(float)": _DT.FLOAT, "tensor(int64)": _DT.INT64}


def _read(ptr: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(ptr))
    return raw.view(dtype).reshape(shape).copy()


def _write(ptr: int, value: np.ndarray) -> None:
    value = np.ascontiguousarray(value)
    ctypes.memmove(ptr, value.ctypes.data, value.nbytes)


def make_fake_tensorrt(name: str = "tensorrt", version: str = "10.3.0", int64_as_int32: bool = False):
    """Build a ``tensorrt`` stand-in module.

    The parser keeps the ONNX bytes; the "engine" runs them with ONNX Runtime on the host memory behind the tensor
    addresses (CPU torch tensors here). ``int64_as_int32`` mimics TensorRT 8.x, which imports INT64 graph
    inputs/outputs as INT32.
    """
    import onnxruntime as ort

    mod = types.ModuleType(name)
    mod.__version__ = version
    mod.stats = Counter()
    mod.builds = []  # (network creation flags, builder flags) per build
    ns = types.SimpleNamespace
    mod.DataType = _DT
    mod.float32 = _DT.FLOAT
    mod.int32 = _DT.INT32
    mod.TensorIOMode = ns(INPUT="INPUT", OUTPUT="OUTPUT")
    mod.NetworkDefinitionCreationFlag = ns(EXPLICIT_BATCH=0)
    mod.BuilderFlag = ns(FP16="FP16", INT8="INT8", TF32="TF32", OBEY_PRECISION_CONSTRAINTS="OBEY")
    mod.MemoryPoolType = ns(WORKSPACE="WORKSPACE")
    mod.LayerType = ns(NORMALIZATION="NORMALIZATION")

    class Logger:
        ERROR, WARNING, INFO = 1, 2, 3

        def __init__(self, level: int = 2) -> None:
            self.level = level

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags, self.onnx, self.num_layers = flags, b"", 0

    class OnnxParser:
        def __init__(self, network: Network, logger: Logger) -> None:
            self.network, self.errors = network, []

        def parse_from_file(self, path: str) -> bool:
            try:
                data = Path(path).read_bytes()
                onnx.checker.check_model(onnx.load_from_string(data))
            except Exception as e:
                self.errors.append(str(e).splitlines()[0])
                return False
            self.network.onnx = data
            return True

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> str:
            return self.errors[i]

    class Config:
        def __init__(self) -> None:
            self.flags, self.pools = {"TF32"}, {}  # TF32 is on by default in real TensorRT

        def set_flag(self, flag: str) -> None:
            self.flags.add(flag)

        def clear_flag(self, flag: str) -> None:
            self.flags.discard(flag)

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            self.pools[pool] = size

    class Builder:
        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int = 0) -> Network:
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def build_serialized_network(self, network: Network, config: Config) -> bytes:
            mod.stats["builds"] += 1
            mod.builds.append((network.flags, sorted(config.flags)))
            header = json.dumps({"version": mod.__version__}).encode()
            return _MAGIC + len(header).to_bytes(4, "little") + header + network.onnx

    class Context:
        def __init__(self, engine) -> None:
            self.engine, self.addresses = engine, {}

        def set_tensor_address(self, name: str, ptr: int) -> None:
            self.addresses[name] = int(ptr)

        def execute_async_v3(self, stream: int) -> bool:
            e = self.engine
            feeds = {
                n: _read(self.addresses[n], shape, _NP[e.dtypes[n]]).astype(_NP[e.onnx_dtypes[n]])
                for n, shape in e.in_shapes.items()
            }
            for (n, _), value in zip(e.out_shapes.items(), e.session.run(None, feeds)):
                _write(self.addresses[n], value.astype(_NP[e.dtypes[n]]))
            mod.stats["executions"] += 1
            return True

    class Engine:
        def __init__(self, onnx_bytes: bytes) -> None:
            self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
            ins, outs = self.session.get_inputs(), self.session.get_outputs()
            self.in_shapes = {i.name: tuple(i.shape) for i in ins}
            self.out_shapes = {o.name: tuple(o.shape) for o in outs}
            self.onnx_dtypes = {v.name: _ONNX[v.type] for v in ins + outs}
            self.dtypes = {
                k: (_DT.INT32 if int64_as_int32 and d == _DT.INT64 else d) for k, d in self.onnx_dtypes.items()
            }
            self.names = list(self.in_shapes) + list(self.out_shapes)
            self.num_io_tensors = len(self.names)

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


class _HostDevice(CudaDevice):
    """The GPU that cannot exist here: a named device with a compute capability whose memory is host memory."""

    def stream_handle(self) -> int:
        return 0

    def activate(self):
        return contextlib.nullcontext()


@pytest.fixture
def fake_gpu(monkeypatch):
    def make(capability=(8, 7)):
        dev = _HostDevice(torch.device("cpu"), "Fake Orin", capability)
        monkeypatch.setattr(tensorrt_backend, "cuda_device", lambda device: dev)
        return dev

    make()
    return make


@pytest.fixture
def cache(tmp_path, cache_root) -> Path:
    (tmp_path / "onnx").symlink_to(cache_root / "onnx", target_is_directory=True)
    return tmp_path


def _options(cache_dir, **kw) -> BackendOptions:
    return BackendOptions(device="cpu", threads=2, cache_dir=cache_dir, **kw)


def _assert_matches_torch(be, bundle, seed=0):
    ref = TorchBackend(bundle, BackendOptions(device="cpu", threads=2))
    x = random_images(1, seed=seed)
    a, b = be.run_apr(x), ref.run_apr(x)
    assert a["scene"].dtype == torch.int64 and torch.equal(a["scene"], b["scene"])
    for k in ("pose", "scene_log_probs", "latent_t", "latent_rot"):
        assert a[k].dtype == torch.float32
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)
    forced = (b["scene"] + 1) % bundle.apr.num_scenes
    torch.testing.assert_close(be.run_apr(x, forced)["pose"], ref.run_apr(x, forced)["pose"], rtol=1e-4, atol=1e-4)
    lt, lr = be.run_encoder(x, forced)
    rlt, rlr = ref.run_encoder(x, forced)
    torch.testing.assert_close(lt, rlt, rtol=1e-4, atol=1e-4)
    refined = be.run_refine(lt, lr, a["pose"], forced)
    torch.testing.assert_close(refined, ref.run_refine(rlt, rlr, b["pose"], forced), rtol=1e-4, atol=1e-4)


def test_fake_backend_matches_torch(separate_bundle, cache, fake_gpu):
    trt = make_fake_tensorrt()
    be = TensorRTBackend(separate_bundle, _options(cache), module=trt)
    assert set(be.graphs) == {"apr", "encoder", "refine"} and trt.stats["builds"] == 3
    assert all(flags == 0 for flags, _ in trt.builds)  # TensorRT 10: explicit batch is implicit
    assert all("TF32" not in builder_flags for _, builder_flags in trt.builds)  # fp32 means fp32
    _assert_matches_torch(be, separate_bundle)
    d = be.describe()
    assert d["backend"] == "tensorrt" and d["tensorrt"] == "tensorrt 10.3.0" and d["gpu"] == "Fake Orin (sm 8.7)"


def test_fake_tensorrt8_int32_bindings(shared_bundle, cache, fake_gpu):
    trt = make_fake_tensorrt(version="8.6.2", int64_as_int32=True)
    be = TensorRTBackend(shared_bundle, _options(cache), module=trt)
    assert all(flags == 1 for flags, _ in trt.builds)  # EXPLICIT_BATCH requested on TensorRT < 10
    _assert_matches_torch(be, shared_bundle, seed=3)


def test_fake_engine_cache_reuse_and_rebuild(shared_bundle, cache, fake_gpu):
    trt = make_fake_tensorrt()
    first = TensorRTBackend(shared_bundle, _options(cache), module=trt)
    assert trt.stats["builds"] == 2
    engines = sorted((cache / "engines").glob("*.engine"))
    assert len(engines) == 2 and all(e.with_suffix(".json").is_file() for e in engines)
    TensorRTBackend(shared_bundle, _options(cache), module=trt)
    assert trt.stats["builds"] == 2  # both engines came from the cache
    assert first.export.out_dir == TensorRTBackend(shared_bundle, _options(cache), module=trt).export.out_dir
    # truncated engine → rebuilt (only that one)
    apr_engine = next(e for e in engines if json.loads(e.with_suffix(".json").read_text())["graph"] == "apr")
    apr_engine.write_bytes(apr_engine.read_bytes()[:100])
    TensorRTBackend(shared_bundle, _options(cache), module=trt)
    assert trt.stats["builds"] == 3
    # intact file and record but TensorRT refuses the plan → rebuilt
    record = json.loads(apr_engine.with_suffix(".json").read_text())
    EngineCache(cache).store(
        tensorrt_backend.EngineKey(**{**record["key"], "flags": tuple(sorted(record["key"]["flags"].items()))}),
        b"not a plan",
    )
    be = TensorRTBackend(shared_bundle, _options(cache), module=trt)
    assert trt.stats["builds"] == 4
    _assert_matches_torch(be, shared_bundle, seed=5)
    # key change: another TensorRT version, GPU or precision → new engines next to the old ones
    trt.__version__ = "10.4.0"
    TensorRTBackend(shared_bundle, _options(cache), module=trt)
    assert trt.stats["builds"] == 6
    fake_gpu(capability=(8, 9))
    TensorRTBackend(shared_bundle, _options(cache), module=trt)
    assert trt.stats["builds"] == 8
    assert len(list((cache / "engines").glob("*.engine"))) == 6


def test_fake_fp16_build_flags(shared_bundle, cache, fake_gpu):
    trt = make_fake_tensorrt()
    TensorRTBackend(shared_bundle, _options(cache, precision="fp16"), module=trt)
    flags = {json.loads(p.read_text())["graph"]: json.loads(p.read_text())["key"]["precision"]
             for p in (cache / "engines").glob("*.json")}
    assert flags == {"apr": "fp16", "refine": "fp32"}  # the refinement graph stays fp32
    builder_flags = [f for _, f in trt.builds]
    assert ["FP16", "TF32"] in builder_flags and ["FP16"] not in builder_flags
    assert [] in builder_flags  # the fp32 refine build, TF32 cleared


def test_localizer_with_fake_tensorrt(shared_bundle, cache, fake_gpu, monkeypatch):
    trt = make_fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    opts = {"device": "cpu", "threads": 2, "iapr_iterations": 2}
    loc = Localizer(shared_bundle, LocalizerOptions(backend="tensorrt", cache_dir=str(cache), **opts))
    ref = Localizer(shared_bundle, LocalizerOptions(backend="torch", **opts))
    assert loc.backend_name == "tensorrt"
    rgb = np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    a, b = loc.localize(rgb), ref.localize(rgb)
    assert a.scene_id == b.scene_id
    np.testing.assert_allclose(a.pose, b.pose, atol=1e-4, rtol=1e-4)
    assert trt.stats["executions"] == 3  # one APR run + two refinement steps


def test_prebuild_engines(shared_bundle, cache, fake_gpu, monkeypatch):
    trt = make_fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    paths = prebuild_engines(shared_bundle, _options(cache, precision="fp16"))
    assert set(paths) == {"apr", "refine"}
    assert all(p.is_file() and p.parent == cache / "engines" for p in paths.values())
    TensorRTBackend(shared_bundle, _options(cache, precision="fp16"))
    assert trt.stats["builds"] == 2  # the backend found the prebuilt engines


@pytest.mark.parametrize(
    ("name", "kw", "match"),
    [
        ("tensorrt", {"cuda_graphs": True}, "cuda_graphs"),
        ("tensorrt", {"precision": "bf16"}, "bf16"),
        ("tensorrt", {"precision": "int8"}, "calibration_images"),
        ("tensorrt_rtx", {"precision": "int8"}, "full TensorRT"),
        ("tensorrt_rtx", {}, "do not run on Fake Orin"),
    ],
)
def test_fake_backend_option_errors(shared_bundle, cache, fake_gpu, name, kw, match):
    with pytest.raises(BackendError, match=match):
        TensorRTBackend(shared_bundle, _options(cache, **kw), module=make_fake_tensorrt(name=name))


def test_fake_backend_rejects_wrong_batch(shared_bundle, cache, fake_gpu):
    be = TensorRTBackend(shared_bundle, _options(cache), module=make_fake_tensorrt())
    with pytest.raises(BackendError, match="fixed at export"):
        be.run_apr(random_images(2))


def test_no_cuda_means_backend_error(shared_bundle, cache):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(BackendError, match="CUDA"):
        TensorRTBackend(shared_bundle, _options(cache), module=make_fake_tensorrt())


# ------------------------------------------------------------------------------------------------ real TensorRT
@pytest.mark.gpu
def test_real_tensorrt_backend_matches_torch(shared_bundle, tmp_path):
    try:
        import tensorrt as trt
    except ImportError:
        pytest.skip("the tensorrt module is not installed on this GPU machine")
    opts = BackendOptions(device="cuda", cache_dir=tmp_path)
    be = TensorRTBackend(shared_bundle, opts, module=trt)
    ref = TorchBackend(shared_bundle, BackendOptions(device="cuda"))
    x = random_images(1, seed=2).cuda()
    a, b = be.run_apr(x), ref.run_apr(x)
    assert a["pose"].is_cuda and torch.equal(a["scene"], b["scene"])
    torch.testing.assert_close(a["pose"], b["pose"], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(
        be.run_refine(a["latent_t"], a["latent_rot"], a["pose"], a["scene"]),
        ref.run_refine(b["latent_t"], b["latent_rot"], b["pose"], b["scene"]),
        rtol=1e-3,
        atol=1e-3,
    )
    fp16 = TensorRTBackend(shared_bundle, BackendOptions(device="cuda", precision="fp16", cache_dir=tmp_path), trt)
    h = fp16.run_apr(x)
    assert torch.equal(h["scene"], b["scene"]) and float((h["pose"] - b["pose"]).abs().max()) < 5e-2
