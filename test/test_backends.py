"""ONNX Runtime backend against torch, backend selection, option errors, the ONNX export cache and the engine cache."""

from __future__ import annotations

import json
import logging
import os
import threading

import numpy as np
import onnx
import pytest
import torch
from model_fixtures import random_iapr, random_images, random_ms_transformer
from PIL import Image

from apr_localizer.backends.base import BackendError, BackendOptions, create_backend
from apr_localizer.backends.engine_cache import (
    EngineCache,
    EngineKey,
    cached_onnx_export,
    default_cache_dir,
    export_cache_key,
)
from apr_localizer.backends.onnxruntime_backend import OnnxRuntimeBackend
from apr_localizer.backends.torch_backend import TorchBackend
from apr_localizer.checkpoints import ModelBundle, load_bundle
from apr_localizer.localizer import Localizer, LocalizerOptions, ModelLoadError

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def shared_bundle() -> ModelBundle:
    apr = random_ms_transformer(seed=0)
    return ModelBundle(apr=apr, iapr=random_iapr(seed=1, mstransformer=apr))


@pytest.fixture(scope="module")
def separate_bundle() -> ModelBundle:
    return ModelBundle(apr=random_ms_transformer(seed=2), iapr=random_iapr(seed=3))


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    gen = np.random.default_rng(0)
    return [gen.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(2)]


def _ort_options(cache_dir, **kw) -> BackendOptions:
    return BackendOptions(device="cpu", threads=2, cache_dir=cache_dir, **kw)


def _compare_localizers(bundle, frames, cache_dir, iterations=3):
    ort = Localizer(
        bundle,
        LocalizerOptions(
            backend="onnxruntime", device="cpu", cache_dir=str(cache_dir), threads=2, iapr_iterations=iterations
        ),
    )
    ref = Localizer(bundle, LocalizerOptions(backend="torch", device="cpu", threads=2, iapr_iterations=iterations))
    assert ort.backend_name == "onnxruntime" and ref.backend_name == "torch"
    for rgb in frames:
        a, b = ort.localize(rgb), ref.localize(rgb)
        assert a.scene_id == b.scene_id and a.iterations == b.iterations
        np.testing.assert_allclose(a.apr_pose, b.apr_pose, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(a.pose, b.pose, atol=1e-4, rtol=1e-4)
        assert abs(a.confidence - b.confidence) < 1e-4
    return ort


# ------------------------------------------------------------------------------------------------ ORT vs torch
def test_localizer_onnxruntime_matches_torch_on_reference(reference_dir, tmp_path):
    bundle = load_bundle(reference_dir / "checkpoints" / "ms_transformer_7scenes_t2-2_rot1-1.pth")
    frames = [np.asarray(Image.open(reference_dir / "raw_images" / f"raw_{i}.png").convert("RGB")) for i in (0, 1)]
    loc = _compare_localizers(bundle, frames, tmp_path)
    assert loc.iterations == 0  # no iAPR in this checkpoint
    assert [loc.localize(f).scene_id for f in frames] == [4, 0]  # the reference argmax scenes of raw_0, raw_1
    assert loc.describe()["providers"] == "CPUExecutionProvider"


def test_localizer_onnxruntime_matches_torch_shared_encoder(shared_bundle, frames, cache_dir):
    loc = _compare_localizers(shared_bundle, frames, cache_dir)
    assert not loc.backend.needs_encoder and set(loc.backend.graphs) == {"apr", "refine"}


def test_localizer_onnxruntime_matches_torch_separate_encoder(separate_bundle, frames, cache_dir):
    loc = _compare_localizers(separate_bundle, frames, cache_dir, iterations=2)
    assert loc.backend.needs_encoder and set(loc.backend.graphs) == {"apr", "encoder", "refine"}


def test_backend_interface_outputs(shared_bundle, cache_dir):
    ort = OnnxRuntimeBackend(shared_bundle, _ort_options(cache_dir))
    ref = TorchBackend(shared_bundle, BackendOptions(device="cpu", threads=2))
    x = random_images(1, seed=7)
    a, b = ort.run_apr(x), ref.run_apr(x)
    assert set(a) == {"pose", "scene_log_probs", "scene", "latent_t", "latent_rot"}
    assert a["scene"].dtype == torch.int64 and a["pose"].dtype == torch.float32 and a["pose"].device.type == "cpu"
    forced = (b["scene"] + 1) % 3
    fa, fb = ort.run_apr(x, forced), ref.run_apr(x, forced)
    assert torch.equal(fa["scene"], forced)
    torch.testing.assert_close(fa["pose"], fb["pose"], rtol=1e-4, atol=1e-4)
    lt, lr = ort.run_encoder(x, forced)  # shared encoder: the APR graph with the scene forced
    torch.testing.assert_close(lt, fb["latent_t"], rtol=1e-4, atol=1e-4)
    refined = ort.run_refine(a["latent_t"], a["latent_rot"], a["pose"], a["scene"])
    torch.testing.assert_close(
        refined, ref.run_refine(b["latent_t"], b["latent_rot"], b["pose"], b["scene"]), rtol=1e-4, atol=1e-4
    )
    ort.warmup(1)
    desc = ort.describe()
    assert desc["backend"] == "onnxruntime" and desc["threads"] == "2" and "opset 17" in desc["onnx"]


# ------------------------------------------------------------------------------------------------ selection and errors
def test_auto_picks_onnxruntime_on_this_cpu_machine(shared_bundle, cache_dir, caplog):
    if torch.cuda.is_available():
        pytest.skip("auto prefers GPU backends on a CUDA machine")
    with caplog.at_level(logging.INFO, logger="apr_localizer.backends.base"):
        be = create_backend(shared_bundle, "auto", _ort_options(cache_dir))
    assert be.name == "onnxruntime" and be.device == "cpu"
    assert "ONNX Runtime" in be.selection_reason
    assert any("chose onnxruntime on cpu" in r.getMessage() for r in caplog.records)
    assert be.selection_skipped == []  # no GPU: TensorRT is not even a candidate


def test_tensorrt_backend_refuses_a_cpu_machine(shared_bundle, cache_dir):
    from apr_localizer.backends.tensorrt_backend import TensorRTBackend

    with pytest.raises(BackendError, match="CUDA device|TensorRT is not available"):
        TensorRTBackend(shared_bundle, _ort_options(cache_dir))
    with pytest.raises(ModelLoadError, match="CUDA|TensorRT"):
        Localizer(shared_bundle, LocalizerOptions(backend="tensorrt", device="cpu", cache_dir=str(cache_dir)))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"precision": "fp16"}, "fp16 on the CPU"),
        ({"precision": "bf16"}, "bf16 on the CPU"),
        ({"precision": "fp64"}, "precision 'fp64'"),
        ({"cuda_graphs": True}, "cuda_graphs"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_onnxruntime_options(shared_bundle, cache_dir, kw, match):
    with pytest.raises(BackendError, match=match):
        OnnxRuntimeBackend(shared_bundle, _ort_options(cache_dir, **kw))


def test_bad_options_through_the_localizer(shared_bundle, cache_dir):
    with pytest.raises(ModelLoadError, match="fp16 on the CPU"):
        Localizer(
            shared_bundle,
            LocalizerOptions(backend="onnxruntime", device="cpu", precision="fp16", cache_dir=str(cache_dir)),
        )
    with pytest.raises(ModelLoadError, match="backend 'onnx'"):
        Localizer(shared_bundle, LocalizerOptions(backend="onnx", cache_dir=str(cache_dir)))
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA device"):
            Localizer(shared_bundle, LocalizerOptions(backend="onnxruntime", device="cuda", cache_dir=str(cache_dir)))


def test_run_errors(cache_dir, shared_bundle):
    ort = OnnxRuntimeBackend(shared_bundle, _ort_options(cache_dir))
    with pytest.raises(BackendError, match=r"shape \(2, 3, 224, 224\), expected \(1, 3, 224, 224\)"):
        ort.run_apr(random_images(2))
    apr_only = OnnxRuntimeBackend(ModelBundle(apr=shared_bundle.apr), _ort_options(cache_dir))
    assert set(apr_only.graphs) == {"apr"}
    z = torch.zeros(1, 256)
    with pytest.raises(BackendError, match="no iAPR"):
        apr_only.run_refine(z, z, torch.zeros(1, 7), torch.zeros(1, dtype=torch.int64))
    with pytest.raises(BackendError, match="no iAPR"):
        apr_only.run_encoder(random_images(1), torch.zeros(1, dtype=torch.int64))


def test_int8_dynamic_quantisation(shared_bundle, cache_dir):
    be = OnnxRuntimeBackend(shared_bundle, _ort_options(cache_dir, precision="int8"))
    q = be.export.path("apr").with_name("apr.int8.onnx")
    assert q.is_file() and q.with_suffix(".json").is_file()
    ops = {n.op_type for n in onnx.load(str(q)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops and "ConvInteger" not in ops
    assert not be.export.path("refine").with_name("refine.int8.onnx").exists()  # refinement stays fp32
    out = be.run_apr(random_images(1, seed=3))
    assert torch.isfinite(out["pose"]).all() and 0 <= int(out["scene"]) < 3
    mtime = q.stat().st_mtime_ns
    OnnxRuntimeBackend(shared_bundle, _ort_options(cache_dir, precision="int8"))
    assert q.stat().st_mtime_ns == mtime  # the quantised graph is reused


# ------------------------------------------------------------------------------------------------ ONNX export cache
def test_export_cache_reuse_and_repair(tmp_path):
    bundle = ModelBundle(apr=random_ms_transformer(seed=4))
    first = OnnxRuntimeBackend(bundle, _ort_options(tmp_path))
    assert not first.export.reused
    apr = first.export.path("apr")
    mtime = apr.stat().st_mtime_ns
    second = OnnxRuntimeBackend(bundle, _ort_options(tmp_path))
    assert second.export.reused and second.export.out_dir == first.export.out_dir
    assert apr.stat().st_mtime_ns == mtime  # not exported again
    assert [p.name for p in (tmp_path / "onnx").iterdir() if p.is_dir()] == [first.export.out_dir.name]
    # a damaged cached graph is detected by its sha256 and exported again
    apr.write_bytes(apr.read_bytes()[:1000])
    third = OnnxRuntimeBackend(bundle, _ort_options(tmp_path))
    assert not third.export.reused and apr.stat().st_size > 1000
    x = random_images(1, seed=8)
    torch.testing.assert_close(third.run_apr(x)["pose"], second.run_apr(x)["pose"])


def test_export_cache_key(shared_bundle, separate_bundle):
    k = export_cache_key(shared_bundle, None, None, 1)
    assert k == export_cache_key(shared_bundle, 17, False, 1)  # the defaults
    assert k != export_cache_key(shared_bundle, 18, True, 1)
    assert k != export_cache_key(shared_bundle, None, None, 2)
    assert k != export_cache_key(separate_bundle, None, None, 1)
    renamed = ModelBundle(apr=shared_bundle.apr, iapr=shared_bundle.iapr, scene_names=["x", "y", "z"])
    assert k != export_cache_key(renamed, None, None, 1)


def test_concurrent_exports_share_one_entry(tmp_path, monkeypatch):
    """Two threads export the same bundle at once: the lock lets one export while the other waits, then reuses.

    The threads start together (a barrier); the first export then holds the lock until the second thread is known to
    be inside ``cached_onnx_export`` (or 2 s pass). Without the lock the second export would run concurrently and be
    seen inside ``export_onnx`` at the same time.
    """
    import apr_localizer.backends.engine_cache as ec

    bundle = ModelBundle(apr=random_ms_transformer(seed=5))
    results, errors = [], []
    start = threading.Barrier(2)
    second_called = threading.Event()
    inside, overlap = [0], [False]
    real_export = ec.export_onnx
    calls = [0]
    lock = threading.Lock()

    def export(*args, **kwargs):
        with lock:
            inside[0] += 1
            overlap[0] |= inside[0] > 1
        try:
            second_called.wait(timeout=2.0)  # keep the first export running while the other thread arrives
            return real_export(*args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(ec, "export_onnx", export)

    def work():
        try:
            start.wait(timeout=30)
            with lock:
                calls[0] += 1
                if calls[0] == 2:
                    second_called.set()
            results.append(cached_onnx_export(bundle, tmp_path))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert not overlap[0], "two exports ran at the same time: the cache lock did not serialise them"
    assert sorted(r.reused for r in results) == [False, True]  # the lock made the second one wait and reuse
    assert len([p for p in (tmp_path / "onnx").iterdir() if p.is_dir()]) == 1


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("APR_LOCALIZER_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "apr_localizer"
    monkeypatch.setenv("APR_LOCALIZER_CACHE_DIR", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("APR_LOCALIZER_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "apr_localizer"


# ------------------------------------------------------------------------------------------------ engine cache
def _key(**kw) -> EngineKey:
    base = {
        "onnx_sha256": "ab" * 32,
        "trt_module": "tensorrt",
        "trt_version": "10.3.0",
        "gpu_name": "Orin",
        "compute_capability": "8.7",
        "precision": "fp16",
        "workspace_mb": 1024,
    }
    base.update(kw)
    return EngineKey.create(**base)


def test_engine_key_changes_with_every_field():
    digests = {
        _key().digest(),
        _key(onnx_sha256="cd" * 32).digest(),
        _key(trt_module="tensorrt_rtx").digest(),
        _key(trt_version="8.6.2").digest(),
        _key(gpu_name="RTX 4090").digest(),
        _key(compute_capability="8.9").digest(),
        _key(precision="fp32").digest(),
        _key(workspace_mb=512).digest(),
    }
    assert len(digests) == 8
    assert _key().digest() == _key().digest() and len(_key().digest()) == 64


def test_engine_cache_store_load_and_corruption(tmp_path, caplog):
    cache = EngineCache(tmp_path)
    key = _key()
    assert cache.load(key) is None
    data = os.urandom(4096)
    path = cache.store(key, data, {"graph": "apr"})
    assert path == tmp_path / "engines" / f"{key.digest()}.engine"
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["bytes"] == 4096 and meta["key"] == key.to_dict() and meta["graph"] == "apr"
    assert cache.load(key) == data
    assert cache.load(_key(precision="fp32")) is None  # another key: a miss

    def damaged(mutate):
        cache.store(key, data)
        mutate(path)
        with caplog.at_level(logging.WARNING):
            assert cache.load(key) is None
        assert not path.exists() and not path.with_suffix(".json").exists()  # discarded

    damaged(lambda p: p.write_bytes(data[:1000]))  # truncated
    damaged(lambda p: p.write_bytes(b""))  # empty
    damaged(lambda p: p.write_bytes(bytes([data[0] ^ 1]) + data[1:]))  # same size, wrong sha256
    damaged(lambda p: p.with_suffix(".json").write_text("{not json"))  # broken record
    damaged(lambda p: p.unlink())  # record without engine
    assert "truncated" in caplog.text and "sha256" in caplog.text
    assert cache.stats["discarded"] == 5
    with pytest.raises(BackendError, match="empty"):
        cache.store(key, b"")


def test_engine_cache_get_or_build(tmp_path):
    cache = EngineCache(tmp_path)
    builds = []

    def build() -> bytes:
        builds.append(1)
        return b"ENGINE" + os.urandom(64)

    def deserialize(data: bytes):
        return ("engine", data) if data.startswith(b"ENGINE") else None

    key = _key()
    e1 = cache.get_or_build(key, build, deserialize)
    e2 = cache.get_or_build(key, build, deserialize)
    assert e1 == e2 and len(builds) == 1 and cache.stats["hits"] == 1
    cache.get_or_build(_key(gpu_name="Other GPU"), build, deserialize)  # key change → a new build
    assert len(builds) == 2
    # an engine with a valid record that TensorRT refuses (e.g. another TensorRT build) is rebuilt
    cache.store(key, b"FOREIGN PLAN")
    e3 = cache.get_or_build(key, build, deserialize)
    assert len(builds) == 3 and e3[1].startswith(b"ENGINE") and cache.load(key) == e3[1]
    # deserializers that raise are treated like None
    cache.store(key, b"FOREIGN PLAN")
    cache.get_or_build(key, build, lambda d: deserialize(d) or (_ for _ in ()).throw(RuntimeError("bad plan")))
    assert len(builds) == 4
    # a fresh engine that cannot be deserialized is an error, not a cache entry
    with pytest.raises(BackendError, match="cannot deserialize"):
        cache.get_or_build(_key(precision="int8"), lambda: b"JUNK", deserialize)
    assert cache.load(_key(precision="int8")) is None


def test_engine_cache_builds_once_under_concurrency(tmp_path):
    """Three threads ask for the same engine at once (a barrier): one builds, the others wait on the lock and reuse it.

    The build holds on until every thread has called ``get_or_build`` (or 2 s pass), so without the lock the other
    threads would build too.
    """
    cache = EngineCache(tmp_path)
    builds = []
    start = threading.Barrier(3)
    arrived = threading.Semaphore(0)

    def build() -> bytes:
        builds.append(1)
        for _ in range(2):  # the two other threads are past the barrier and inside get_or_build (or 2 s pass)
            arrived.acquire(timeout=2.0)
        return b"ENGINE-X"

    out = []

    def work() -> None:
        start.wait(timeout=30)
        arrived.release()
        out.append(cache.get_or_build(_key(), build, bytes))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and out == [b"ENGINE-X"] * 3
