"""TensorRT build paths per API generation, on fake modules that emulate each generation (see fake_tensorrt.py).

Each test names the generation it emulates: TensorRT 8.6 and 10.x (weakly typed: FP16/INT8 builder flags,
calibrators) and TensorRT 11.x / TensorRT-RTX (strongly typed only: no precision flags, no calibrators). The
real ``tensorrt_rtx`` module (an 11-style API that builds without a GPU) is used where installed. A gpu-marked probe
runs the TensorRT backend's CUDA plumbing (own stream, aligned addresses) on real device memory with the fake engine.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from fake_tensorrt import HostDevice, make_fake_tensorrt
from model_fixtures import random_iapr, random_images, random_ms_transformer

from apr_localizer.backends import base, tensorrt_backend
from apr_localizer.backends.base import BackendError, BackendOptions, create_backend
from apr_localizer.backends.engine_cache import cached_onnx_export
from apr_localizer.backends.tensorrt_backend import TensorRTBackend
from apr_localizer.backends.tensorrt_build import TrtCapabilities, build_engine_bytes, choose_plan
from apr_localizer.backends.torch_backend import TorchBackend
from apr_localizer.checkpoints import ModelBundle

torch.set_num_threads(2)
HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    apr = random_ms_transformer(seed=0)
    return ModelBundle(apr=apr, iapr=random_iapr(seed=1, mstransformer=apr))


@pytest.fixture(scope="module")
def onnx_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx_root")


@pytest.fixture(scope="module")
def export(bundle, onnx_root):
    return cached_onnx_export(bundle, onnx_root)


@pytest.fixture
def cache(tmp_path, onnx_root, export) -> Path:
    (tmp_path / "onnx").symlink_to(onnx_root / "onnx", target_is_directory=True)
    return tmp_path


@pytest.fixture
def fake_gpu(monkeypatch) -> HostDevice:
    dev = HostDevice(torch.device("cpu"), "Fake Orin", (8, 7))
    monkeypatch.setattr(tensorrt_backend, "cuda_device", lambda device: dev)
    return dev


def _opts(cache_dir, **kw) -> BackendOptions:
    return BackendOptions(device="cpu", threads=2, cache_dir=cache_dir, **kw)


# ------------------------------------------------------------------------------------------------ capabilities
@pytest.mark.parametrize(
    ("generation", "fp16_plan", "int8_plan"),
    [
        ("8.6", "fp16-weak", "int8-calib"),
        ("10", "fp16-weak", "int8-calib"),
        ("11", "fp16-strong", "int8-qdq"),
        ("rtx", "fp16-strong", None),
    ],
)
def test_plan_per_generation(generation, fp16_plan, int8_plan):
    """Generations 8.6, 10.x, 11.x, RTX: the build path comes from the module's attributes, not its version."""
    caps = TrtCapabilities.of(make_fake_tensorrt(generation))
    assert choose_plan(caps, "fp32") == "fp32" and choose_plan(caps, "fp16") == fp16_plan
    if int8_plan:
        assert choose_plan(caps, "int8") == int8_plan
    else:
        with pytest.raises(BackendError) as err:
            choose_plan(caps, "int8")
        msg = str(err.value)
        assert "explicit Q/DQ" in msg and "use precision fp16" in msg and "\n" not in msg and ". " not in msg
    assert caps.explicit_batch_flag == (generation == "8.6")


def test_tensorrt_without_normalization_layer_gets_opset_16():
    """TensorRT 8.5 (JetPack 5): no INormalizationLayer, so graphs are exported at opset 16 (LayerNorm decomposed)."""
    trt = make_fake_tensorrt("8.6", version="8.5.2")
    assert TrtCapabilities.of(trt).onnx_opset is None
    trt.LayerType = types.SimpleNamespace(OTHER="OTHER")
    assert TrtCapabilities.of(trt).onnx_opset == 16


@pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx (tensorrt-rtx-cu12) is not installed")
def test_real_tensorrt_rtx_is_detected_as_strongly_typed():
    """The installed TensorRT-RTX module (11-style API) has no FP16/INT8 flags: fp16 is strongly typed."""
    import tensorrt_rtx

    caps = TrtCapabilities.of(tensorrt_rtx)
    assert not caps.fp16_flag and not caps.int8_calibration and caps.strongly_typed_flag and not caps.timing_cache
    assert choose_plan(caps, "fp16") == "fp16-strong"


# ------------------------------------------------------------------------------------------------ fp16 builds
@pytest.mark.parametrize("generation", ["8.6", "10"])
def test_fp16_weakly_typed_build_pins_layernorm(export, generation):
    """TensorRT 8.6 / 10.x: FP16 flag on the fp32 graph, every LayerNorm pinned to FP32 incl. its compute precision.

    ``network.get_layer`` returns the base ``ILayer``; before the fix ``compute_precision`` was never set (dead code).
    """
    trt = make_fake_tensorrt(generation)
    build_engine_bytes(export.path("apr"), "fp16", module=trt)
    (b,) = trt.builds
    assert "FP16" in b["builder_flags"] and "OBEY" in b["builder_flags"] and "TF32" not in b["builder_flags"]
    assert not b["strongly_typed"] and b["fp16_initializers"] == 0
    assert b["norm_layers"] > 0 and b["pinned"] == b["norm_layers"] and b["pinned_compute"] == b["norm_layers"]
    assert b["network_flags"] == (1 if generation == "8.6" else 0)


@pytest.mark.parametrize("generation", ["11", "rtx"])
def test_fp16_strongly_typed_build_casts_the_graph(export, generation):
    """TensorRT 11.x / RTX: no FP16 flag; the graph is cast to fp16 (LayerNorm kept fp32), built strongly typed."""
    trt = make_fake_tensorrt(generation)
    data = build_engine_bytes(export.path("apr"), "fp16", module=trt)
    (b,) = trt.builds
    assert data and b["strongly_typed"] and b["builder_flags"] == []  # no precision flags, TF32 cleared
    assert b["fp16_initializers"] > 0 and b["pinned"] == 0  # no layer precision set in a strongly typed network
    assert b["layernorm_scale_types"] == ["FLOAT"]


def test_fp16_strongly_typed_backend_end_to_end(bundle, cache, fake_gpu):
    """TensorRT 11.x: the backend builds fp16 apr + fp32 refine engines without touching a removed API."""
    trt = make_fake_tensorrt("11")
    be = TensorRTBackend(bundle, _opts(cache, precision="fp16"), module=trt)
    assert be.plan == "fp16-strong" and be.describe()["build"] == "fp16-strong"
    strong = [b["fp16_initializers"] > 0 for b in trt.builds]
    assert sorted(strong) == [False, True]  # apr cast to fp16, refine (always fp32) not


@pytest.mark.parametrize("generation", ["10", "11"])
def test_fp32_build_clears_tf32_unless_asked(export, generation):
    """TensorRT 10.x / 11.x: fp32 means fp32 (TF32 cleared); ``tf32=True`` keeps TensorRT's default."""
    trt = make_fake_tensorrt(generation)
    build_engine_bytes(export.path("refine"), "fp32", module=trt)
    build_engine_bytes(export.path("refine"), "fp32", module=trt, tf32=True)
    assert [b["builder_flags"] for b in trt.builds] == [[], ["TF32"]]


# ------------------------------------------------------------------------------------------------ int8
def test_int8_on_tensorrt_11_is_explicit_qdq(bundle, cache, fake_gpu):
    """TensorRT 11.x: no calibrator; the apr graph gets symmetric int8 Q/DQ pairs and builds strongly typed."""
    trt = make_fake_tensorrt("11")
    be = TensorRTBackend(bundle, _opts(cache, precision="int8", calibration_images=random_images(2)), module=trt)
    assert be.plan == "int8-qdq"
    qdq = sorted(b["qdq_nodes"] for b in trt.builds)
    assert qdq[0] == 0 and qdq[1] > 0  # refine stays fp32, apr quantised
    assert all(b["strongly_typed"] and b["builder_flags"] == [] for b in trt.builds)
    out = be.run_apr(random_images(1, seed=3))  # the Q/DQ graph runs (ONNX Runtime behind the fake engine)
    assert torch.isfinite(out["pose"]).all()


def test_int8_on_tensorrt_rtx_is_one_clear_error(bundle, cache, fake_gpu):
    """TensorRT-RTX (int8 weight-only GEMMs only): int8 fails before any export or build, in one sentence."""
    trt = make_fake_tensorrt("rtx")
    opts = _opts(cache, precision="int8", calibration_images=random_images(2))
    with pytest.raises(
        BackendError, match=r"^precision int8 needs TensorRT with INT8 calibration .* use precision fp16$"
    ):
        TensorRTBackend(bundle, opts, module=trt)
    assert trt.stats["builds"] == 0


# ------------------------------------------------------------------------------------------------ auto selection
def _pretend_cuda(monkeypatch, trt) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)


def test_auto_falls_back_on_any_candidate_exception(bundle, cache, fake_gpu, monkeypatch, caplog):
    """A TensorRT 11.x module missing an API the backend calls (AttributeError, not a BackendError) is skipped."""
    trt = make_fake_tensorrt("11")
    del trt.Runtime  # e.g. an API renamed in a future release
    _pretend_cuda(monkeypatch, trt)
    with caplog.at_level(logging.INFO, logger="apr_localizer.backends.base"):
        be = create_backend(bundle, "auto", BackendOptions(device="auto", threads=2, cache_dir=cache))
    assert (be.name, be.device) == ("onnxruntime", "cpu")
    assert any(s.startswith("tensorrt/cuda: AttributeError") for s in be.selection_skipped)
    assert len(be.selection_skipped) == 3  # tensorrt, onnxruntime (no CUDA provider), torch (no usable CUDA)
    assert "skipped tensorrt on cuda (tensorrt/cuda: AttributeError" in caplog.text


def test_auto_int8_on_a_gpu_never_falls_back_to_the_cpu(bundle, cache, fake_gpu, monkeypatch):
    """TensorRT-RTX on a GPU machine: int8 cannot be built, and auto does not quietly run ORT int8 on the CPU."""
    _pretend_cuda(monkeypatch, make_fake_tensorrt("rtx"))
    opts = BackendOptions(device="auto", precision="int8", cache_dir=cache, calibration_images=random_images(2))
    with pytest.raises(BackendError, match="needs TensorRT INT8 .* ask for backend onnxruntime with device cpu"):
        create_backend(bundle, "auto", opts)
    assert base._auto_candidates("auto", "int8") == [("tensorrt", "cuda", "int8 on a GPU needs TensorRT")]


# ------------------------------------------------------------------------------------------------ timing cache
def test_timing_cache_beside_the_engine_cache(bundle, cache, fake_gpu, caplog):
    """TensorRT 10.x: every build loads the timing cache the previous build saved; a damaged one is replaced."""
    trt = make_fake_tensorrt("10")
    TensorRTBackend(bundle, _opts(cache), module=trt)
    files = list((cache / "engines" / "timing").glob("*.cache"))
    assert len(files) == 1 and "tensorrt-10.3.0-Fake_Orin-sm8.7" in files[0].name
    assert [b["timing_entries_loaded"] for b in trt.builds] == [0, 1]
    TensorRTBackend(bundle, _opts(cache, precision="fp16"), module=trt)  # a new apr engine; refine fp32 is cached
    assert trt.builds[-1]["timing_entries_loaded"] == 2
    files[0].write_bytes(b"\x00garbage")
    TensorRTBackend(bundle, _opts(cache, tf32=True), module=trt)
    assert "timing cache" in caplog.text and json.loads(files[0].read_bytes())["entries"] >= 1


@pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx (tensorrt-rtx-cu12) is not installed")
def test_real_tensorrt_rtx_builds_without_the_deprecated_timing_cache(export, tmp_path):
    """TensorRT-RTX (real, ahead of time): timing caches are deprecated no-ops there, so none is used or written."""
    import tensorrt_rtx

    timing = tmp_path / "timing.cache"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        data = build_engine_bytes(export.path("refine"), "fp16", module=tensorrt_rtx, timing_cache=timing)
    assert data and not timing.exists()


# ------------------------------------------------------------------------------------------------ execution
def test_misaligned_inputs_are_realigned_and_rejected_addresses_raise(bundle, cache, fake_gpu):
    """TensorRT 10.x: set_tensor_address returns False for a misaligned address; the backend never passes one."""
    be = TensorRTBackend(bundle, _opts(cache), module=make_fake_tensorrt("10"))
    x = random_images(1, seed=4)
    flat = torch.empty(x.numel() + 1)
    shifted = flat[1:].view_as(x).copy_(x)  # 4 bytes past an allocation: misaligned
    assert shifted.data_ptr() % 256
    torch.testing.assert_close(be.run_apr(shifted)["pose"], be.run_apr(x)["pose"])
    be.graphs["apr"].context.set_tensor_address = lambda name, ptr: False
    with pytest.raises(BackendError, match="rejected the address of tensor 'image'"):
        be.run_apr(x)


@pytest.mark.gpu
@pytest.mark.parametrize("generation", ["10", "11"])
def test_plumbing_probe_on_cuda_memory(bundle, tmp_path, generation):
    """TensorRT 10.x / 11.x fake engines on REAL device memory: own stream, aligned addresses, same pose as torch."""
    trt = make_fake_tensorrt(generation, memory="cuda")
    be = TensorRTBackend(bundle, BackendOptions(device="cuda", cache_dir=tmp_path), module=trt)
    ref = TorchBackend(bundle, BackendOptions(device="cuda"))
    x = random_images(1, seed=2).cuda()
    a, b = be.run_steps(x, 3), ref.run_steps(x, 3)
    assert trt.stats["streams"] == trt.stats["executions"] == 4  # never torch's default stream (handle 0)
    assert be.cuda.stream.cuda_stream != torch.cuda.current_stream().cuda_stream
    assert torch.equal(a.scene, b.scene)
    for pa, pb in zip(a.poses, b.poses):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-4)
