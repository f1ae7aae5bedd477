"""The ONNX export cache and the TensorRT engine cache heal themselves (real files, real locks, real processes).

The 14 corruption kinds (each ends in a rebuilt cache, or in ONE sentence that says what to change):

1. ``onnx_truncated``: a graph file cut in half                                   → re-exported
2. ``onnx_zero_bytes``: a graph file of 0 bytes                                   → re-exported
3. ``onnx_garbage``: a graph file of random bytes, same size                      → re-exported (sha256)
4. ``manifest_missing``: graphs without ``manifest.json`` (interrupted export)    → re-exported
5. ``manifest_not_json``: ``manifest.json`` is not JSON                            → re-exported
6. ``manifest_wrong_sha``: the manifest's sha256 of a graph is wrong               → re-exported
7. ``manifest_huge``: a 5 MiB manifest (bounded before it is read)                 → re-exported
8. ``manifest_wrong_io``: the manifest names other graph I/O than the contract    → re-exported
9. ``engine_truncated``: a TensorRT engine shorter than its record says           → rebuilt
10. ``engine_foreign``: a plan serialized by another TensorRT version             → rebuilt
11. ``engine_record_huge``: a 2 MiB engine record (bounded before it is read)     → rebuilt
12. ``lock_is_directory``: the cache lock path replaced by a directory            → removed, cache used
13. ``stale_tmp``: ``.tmp`` files and directories left by a killed export/build    → removed on start, cache used
14. ``cache_dir_is_file``: the cache directory is a regular file                  → one sentence (delete it / move)

Also: a read-only cache directory is used while its entry is intact and refused in one sentence when it is not; a lock
held by another process ends in one sentence after a bounded wait; an export killed with SIGKILL mid-write leaves a
``.tmp`` directory that the next start removes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from model_fixtures import random_iapr, random_ms_transformer

from apr_localizer.backends.base import BackendError
from apr_localizer.backends.engine_cache import (
    EngineCache,
    EngineKey,
    cached_derivative,
    cached_onnx_export,
    export_cache_key,
)
from apr_localizer.checkpoints import ModelBundle, save_model
from apr_localizer.export import load_export

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    apr = random_ms_transformer(seed=0)
    return ModelBundle(apr=apr, iapr=random_iapr(seed=1, mstransformer=apr))


@pytest.fixture(scope="module")
def pristine(bundle, tmp_path_factory) -> Path:
    """Return a cache dir holding an intact export (copied for each test: only damaged entries are re-exported)."""
    root = tmp_path_factory.mktemp("pristine")
    cached_onnx_export(bundle, root)
    return root


def _entry(cache: Path, bundle: ModelBundle) -> Path:
    return cache / "onnx" / export_cache_key(bundle, None, None, 1)


def _all_tmp(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------------ damage per kind
def _rewrite_manifest(entry: Path, change) -> None:
    path = entry / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _damage_onnx(kind: str, entry: Path) -> None:
    apr = entry / "apr.onnx"
    if kind == "onnx_truncated":
        apr.write_bytes(apr.read_bytes()[: apr.stat().st_size // 2])
    elif kind == "onnx_zero_bytes":
        apr.write_bytes(b"")
    elif kind == "onnx_garbage":
        apr.write_bytes(os.urandom(apr.stat().st_size))
    elif kind == "manifest_missing":
        (entry / "manifest.json").unlink()
    elif kind == "manifest_not_json":
        (entry / "manifest.json").write_text("{'graphs': truncated")
    elif kind == "manifest_wrong_sha":
        _rewrite_manifest(entry, lambda m: m["graphs"]["apr"].update(sha256="0" * 64))
    elif kind == "manifest_huge":
        text = (entry / "manifest.json").read_text()
        (entry / "manifest.json").write_text(text[:-2] + " " * (5 << 20) + text[-2:])
    elif kind == "manifest_wrong_io":
        _rewrite_manifest(entry, lambda m: m["graphs"]["apr"]["inputs"][0].update(name="input"))


ONNX_KINDS = ["onnx_truncated", "onnx_zero_bytes", "onnx_garbage", "manifest_missing", "manifest_not_json",
              "manifest_wrong_sha", "manifest_huge", "manifest_wrong_io"]  # fmt: skip


@pytest.mark.parametrize("kind", ONNX_KINDS)
def test_damaged_onnx_export_is_exported_again(kind, bundle, pristine, tmp_path, caplog):
    shutil.copytree(pristine, tmp_path, dirs_exist_ok=True)
    entry = _entry(tmp_path, bundle)
    _damage_onnx(kind, entry)
    result = cached_onnx_export(bundle, tmp_path)
    assert not result.reused and result.out_dir == entry
    load_export(entry, verify=True)  # intact again
    assert "exporting again" in caplog.text and not _all_tmp(tmp_path)


# ------------------------------------------------------------------------------------------------ engines
def _key(**kw) -> EngineKey:
    fields = {"onnx_sha256": "ab" * 32, "trt_module": "tensorrt", "trt_version": "10.3.0", "gpu_name": "Orin",
              "compute_capability": "8.7", "precision": "fp16", **kw}  # fmt: skip
    return EngineKey.create(**fields)


PLAN = b"PLAN-10.3" + bytes(range(256)) * 64


def _deserialize(data: bytes):
    return data if data.startswith(b"PLAN-10.3") else None  # like TensorRT: a foreign or damaged plan is refused


ENGINE_KINDS = {
    "engine_truncated": lambda e, r: e.write_bytes(e.read_bytes()[:1000]),
    "engine_foreign": lambda e, r: (e.write_bytes(b"PLAN-8.6" + PLAN[8:]), _fix_record(e, r)),
    "engine_record_huge": lambda e, r: r.write_text(r.read_text()[:-2] + " " * (2 << 20) + "}\n"),
}


def _fix_record(engine: Path, record: Path) -> None:
    import hashlib

    meta = json.loads(record.read_text())
    data = engine.read_bytes()
    meta.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    record.write_text(json.dumps(meta))


@pytest.mark.parametrize("kind", list(ENGINE_KINDS))
def test_damaged_engine_is_rebuilt(kind, tmp_path, caplog):
    cache = EngineCache(tmp_path)
    builds = []
    cache.get_or_build(_key(), lambda: builds.append(1) or PLAN, _deserialize)
    engine, record = cache.paths(_key())
    ENGINE_KINDS[kind](engine, record)
    assert EngineCache(tmp_path).get_or_build(_key(), lambda: builds.append(1) or PLAN, _deserialize) == PLAN
    assert len(builds) == 2 and engine.read_bytes() == PLAN and "discarding" in caplog.text


# ------------------------------------------------------------------------------------------------ locks, tmp, dirs
def test_lock_path_that_is_a_directory_is_removed(bundle, pristine, tmp_path, caplog):
    shutil.copytree(pristine, tmp_path, dirs_exist_ok=True)
    lock = tmp_path / "onnx" / f"{export_cache_key(bundle, None, None, 1)}.lock"
    lock.unlink(missing_ok=True)
    (lock / "sub").mkdir(parents=True)
    assert cached_onnx_export(bundle, tmp_path).reused and lock.is_file()
    engine_lock = tmp_path / "engines" / f"{_key().digest()}.lock"
    engine_lock.mkdir(parents=True)
    assert EngineCache(tmp_path).get_or_build(_key(), lambda: PLAN, _deserialize) == PLAN
    assert engine_lock.is_file() and "lock file is a directory" in caplog.text


def test_stale_tmp_from_a_killed_writer_is_removed_on_start(bundle, pristine, tmp_path):
    shutil.copytree(pristine, tmp_path, dirs_exist_ok=True)
    key = export_cache_key(bundle, None, None, 1)
    stale = [tmp_path / "onnx" / f".{key}.k1ll3d.tmp", tmp_path / "engines" / f".{_key().digest()}.engine.x1.tmp"]
    (stale[0] / "apr.onnx").parent.mkdir(parents=True)
    (stale[0] / "apr.onnx").write_bytes(b"half an export")
    stale[1].parent.mkdir(parents=True)
    stale[1].write_bytes(b"half an engine")
    assert cached_onnx_export(bundle, tmp_path).reused
    EngineCache(tmp_path).get_or_build(_key(), lambda: PLAN, _deserialize)
    assert not _all_tmp(tmp_path)


def test_cache_dir_that_is_a_file_is_one_sentence(bundle, tmp_path):
    cache = tmp_path / "cache"
    cache.write_text("not a directory")
    expected = rf"^{cache}: the cache path is a file, expected a directory; delete it or set cache_dir to another"
    with pytest.raises(BackendError, match=expected):
        cached_onnx_export(bundle, cache)
    with pytest.raises(BackendError, match=expected):
        EngineCache(cache).get_or_build(_key(), lambda: PLAN, _deserialize)


@contextlib.contextmanager
def _read_only(path: Path):
    """Make ``path`` read-only for this process (``chattr +i`` as root, who ignores permission bits)."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("running as root and chattr +i is not available to make a directory read-only")
        undo = ["chattr", "-i", str(path)]
    else:
        path.chmod(0o555)
        undo = ["chmod", "755", str(path)]
    try:
        yield
    finally:
        subprocess.run(undo, check=True)


def test_read_only_cache_is_used_while_intact_and_refused_when_damaged(bundle, pristine, tmp_path):
    shutil.copytree(pristine, tmp_path, dirs_exist_ok=True)
    EngineCache(tmp_path).get_or_build(_key(), lambda: PLAN, _deserialize)
    entry = _entry(tmp_path, bundle)
    derived = cached_derivative(entry / "refine.onnx", "copy", shutil.copyfile)  # like ORT's int8 / fp16 graphs
    with _read_only(entry):
        assert cached_derivative(entry / "refine.onnx", "copy", shutil.copyfile) == derived
        with pytest.raises(BackendError, match="not writable and holds no intact other graph"):
            cached_derivative(entry / "refine.onnx", "other", shutil.copyfile)
    with _read_only(tmp_path / "onnx"), _read_only(tmp_path / "engines"):
        assert cached_onnx_export(bundle, tmp_path).reused
        assert EngineCache(tmp_path).get_or_build(_key(), lambda: PLAN, _deserialize) == PLAN
        with pytest.raises(BackendError, match="engine cache is not writable and holds no usable engine"):
            EngineCache(tmp_path).get_or_build(_key(precision="fp32"), lambda: PLAN, _deserialize)
    (entry / "manifest.json").write_text("damaged")
    with _read_only(tmp_path / "onnx"), pytest.raises(BackendError, match="not writable and holds no intact export"):
        cached_onnx_export(bundle, tmp_path)


_HOLD_LOCK = """
import fcntl, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f.fileno(), fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def test_lock_held_by_another_process_is_a_clear_error_after_a_bounded_wait(tmp_path, monkeypatch):
    cache = EngineCache(tmp_path)
    lock = cache.paths(_key())[0].with_suffix(".lock")
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setenv("APR_LOCALIZER_LOCK_TIMEOUT_S", "1")
        t0 = time.monotonic()
        with pytest.raises(BackendError, match=r"another process has held this cache lock for more than 1 s"):
            cache.get_or_build(_key(), lambda: PLAN, _deserialize)
        assert time.monotonic() - t0 < 30
    finally:
        holder.kill()
        holder.wait()
    assert cache.get_or_build(_key(), lambda: PLAN, _deserialize) == PLAN  # a killed holder releases the lock


_EXPORT = """
import sys
from apr_localizer.backends.engine_cache import cached_onnx_export
from apr_localizer.checkpoints import load_model
cached_onnx_export(load_model(sys.argv[1]), sys.argv[2])
"""


def test_export_killed_mid_write_leaves_a_clean_start(bundle, tmp_path):
    model = tmp_path / "model.safetensors"
    save_model(model, bundle.apr, bundle.iapr, scene_names=list(bundle.scene_names))
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_EXPORT), str(model), str(cache)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not (cache.is_dir() and _all_tmp(cache)):  # the export is writing into its temporary directory
            assert proc.poll() is None and time.monotonic() < deadline, "the export finished before it could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert _all_tmp(cache) and not any((cache / "onnx").glob("*/manifest.json"))
    result = cached_onnx_export(bundle, cache)  # the next start: cleans, exports, verifies
    assert not result.reused and not _all_tmp(cache)
    load_export(result.out_dir, verify=True)
