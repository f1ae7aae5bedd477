"""TensorRT: TensorRT-RTX parse + AOT build, the TensorRT backend on fake ``tensorrt`` modules, a GPU-marked run.

TensorRT-RTX parses and builds engines without a GPU. The fake modules (:mod:`fake_tensorrt`; each test names the
TensorRT generation it emulates) run the ONNX graph with ONNX Runtime on the host memory behind the tensor addresses,
so the backend's real code path (engine cache, I/O binding by address, dtype handling) runs on this CPU machine.
Build paths per generation are tested in test_tensorrt_generations.py.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_tensorrt import HostDevice, make_fake_tensorrt
from model_fixtures import random_iapr, random_images, random_ms_transformer

from apr_localizer.backends import tensorrt_backend
from apr_localizer.backends.base import BackendError, BackendOptions
from apr_localizer.backends.engine_cache import EngineCache, cached_onnx_export
from apr_localizer.backends.tensorrt_backend import TensorRTBackend, prebuild_engines, rtx_supports
from apr_localizer.backends.tensorrt_build import build_tensorrt_engine
from apr_localizer.backends.torch_backend import TorchBackend
from apr_localizer.checkpoints import ModelBundle
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

    with pytest.raises(BackendError, match="INT8 calibration"):
        build_tensorrt_engine(shared_export.path("apr"), tmp_path / "x.engine", "int8", module=tensorrt_rtx)
    with pytest.raises(BackendError, match="no such ONNX file"):
        build_tensorrt_engine(tmp_path / "missing.onnx", tmp_path / "x.engine", "fp32", module=tensorrt_rtx)
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(BackendError, match="parser rejected"):
        build_tensorrt_engine(tmp_path / "bad.onnx", tmp_path / "x.engine", "fp32", module=tensorrt_rtx)
    assert not (tmp_path / "x.engine").exists()


def test_rtx_capabilities():
    """TensorRT-RTX support matrix 1.0-1.5: Turing 7.5, Ampere RTX 8.6, Ada 8.9, Blackwell RTX 12.x; not 8.0 (A100)."""
    assert all(rtx_supports(cc) for cc in [(7, 5), (8, 6), (8, 9), (12, 0), (12, 1)])
    assert not any(rtx_supports(cc) for cc in [(7, 2), (8, 0), (8, 7), (9, 0), (10, 0), (11, 0)])


# ------------------------------------------------------------------------------------------------ fake TensorRT
@pytest.fixture
def fake_gpu(monkeypatch):
    def make(capability=(8, 7)):
        dev = HostDevice(torch.device("cpu"), "Fake Orin", capability)
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
    """TensorRT 10.x generation."""
    trt = make_fake_tensorrt("10")
    be = TensorRTBackend(separate_bundle, _options(cache), module=trt)
    assert set(be.graphs) == {"apr", "encoder", "refine"} and trt.stats["builds"] == 3
    assert all(b["network_flags"] == 0 for b in trt.builds)  # TensorRT 10: explicit batch is implicit
    assert all("TF32" not in b["builder_flags"] for b in trt.builds)  # fp32 means fp32
    _assert_matches_torch(be, separate_bundle)
    d = be.describe()
    assert d["backend"] == "tensorrt" and d["tensorrt"] == "tensorrt 10.3.0" and d["gpu"] == "Fake Orin (sm 8.7)"


def test_fake_tensorrt8_int32_bindings(shared_bundle, cache, fake_gpu):
    """TensorRT 8.6 generation: INT64 I/O imported as INT32, EXPLICIT_BATCH requested."""
    trt = make_fake_tensorrt("8.6")
    be = TensorRTBackend(shared_bundle, _options(cache), module=trt)
    assert all(b["network_flags"] == 1 for b in trt.builds)  # EXPLICIT_BATCH requested on TensorRT < 10
    _assert_matches_torch(be, shared_bundle, seed=3)


def test_fake_engine_cache_reuse_and_rebuild(shared_bundle, cache, fake_gpu):
    """TensorRT 10.x generation."""
    trt = make_fake_tensorrt("10")
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
    """TensorRT 10.x generation: weakly typed fp16 (FP16 flag), TF32 cleared, the refinement graph fp32."""
    trt = make_fake_tensorrt("10")
    TensorRTBackend(shared_bundle, _options(cache, precision="fp16"), module=trt)
    records = [json.loads(p.read_text()) for p in (cache / "engines").glob("*.json")]
    assert {r["graph"]: r["key"]["precision"] for r in records} == {"apr": "fp16", "refine": "fp32"}
    builder_flags = [b["builder_flags"] for b in trt.builds]
    assert ["FP16", "OBEY"] in builder_flags  # FP16 + LayerNorm pinned to FP32 (precision constraints obeyed)
    assert [] in builder_flags  # the fp32 refine build, TF32 cleared


def test_localizer_with_fake_tensorrt(shared_bundle, cache, fake_gpu, monkeypatch):
    """TensorRT 10.x generation."""
    trt = make_fake_tensorrt("10")
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
    """TensorRT 10.x generation."""
    trt = make_fake_tensorrt("10")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    paths = prebuild_engines(shared_bundle, _options(cache, precision="fp16"))
    assert set(paths) == {"apr", "refine"}
    assert all(p.is_file() and p.parent == cache / "engines" for p in paths.values())
    TensorRTBackend(shared_bundle, _options(cache, precision="fp16"))
    assert trt.stats["builds"] == 2  # the backend found the prebuilt engines


@pytest.mark.parametrize(
    ("generation", "kw", "match"),
    [
        ("10", {"cuda_graphs": True}, "cuda_graphs"),
        ("10", {"precision": "bf16"}, "bf16"),
        ("10", {"precision": "int8"}, "calibration_images"),
        ("rtx", {"precision": "int8", "calibration_images": torch.zeros(1, 3, 224, 224)}, "INT8 calibration"),
        ("rtx", {}, "do not run on Fake Orin"),
    ],
)
def test_fake_backend_option_errors(shared_bundle, cache, fake_gpu, generation, kw, match):
    """Generations as named: TensorRT 10.x and TensorRT-RTX."""
    with pytest.raises(BackendError, match=match):
        TensorRTBackend(shared_bundle, _options(cache, **kw), module=make_fake_tensorrt(generation))


def test_fake_backend_rejects_wrong_batch(shared_bundle, cache, fake_gpu):
    """TensorRT 10.x generation."""
    be = TensorRTBackend(shared_bundle, _options(cache), module=make_fake_tensorrt("10"))
    with pytest.raises(BackendError, match="fixed at export"):
        be.run_apr(random_images(2))


def test_no_cuda_means_backend_error(shared_bundle, cache):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(BackendError, match="CUDA"):
        TensorRTBackend(shared_bundle, _options(cache), module=make_fake_tensorrt("10"))


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
