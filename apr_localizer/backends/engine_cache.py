"""On-disk caches: exported ONNX graphs (keyed by the bundle's weights) and TensorRT engines (keyed by target).

Layout under the cache dir (default ``~/.cache/apr_localizer``; ``$APR_LOCALIZER_CACHE_DIR`` or
``$XDG_CACHE_HOME/apr_localizer`` when set; :attr:`BackendOptions.cache_dir` wins)::

    onnx/<key>/{apr,encoder,refine}.onnx, manifest.json   key = sha256(weights + configs + export settings)
    onnx/<key>/<graph>.<variant>.onnx (+ .json)           derived graphs (ORT int8 / fp16), verified by sha256
    engines/<key>.engine, engines/<key>.json              key = sha256(ONNX sha256, TensorRT flavour + version,
                                                          GPU name, compute capability, precision, builder flags)

Every write goes to a temporary file (or directory) that is renamed into place, and builds run under an exclusive
``fcntl`` lock per key, so concurrent processes neither corrupt entries nor build the same engine twice. A cached
engine is only used when its size and sha256 match its JSON record and TensorRT can deserialize it; otherwise it is
discarded and rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..checkpoints import ModelBundle
from .base import BackendError

__all__ = [
    "EngineCache",
    "EngineKey",
    "cached_derivative",
    "cached_onnx_export",
    "default_cache_dir",
    "export_cache_key",
    "file_lock",
]

log = logging.getLogger(__name__)
T = TypeVar("T")


def default_cache_dir() -> Path:
    """``$APR_LOCALIZER_CACHE_DIR``, else ``$XDG_CACHE_HOME/apr_localizer``, else ``~/.cache/apr_localizer``."""
    env = os.environ.get("APR_LOCALIZER_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "apr_localizer"


@contextlib.contextmanager
def file_lock(path: Path, timeout: float = 1800.0) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if needed); waits up to ``timeout`` s (engine builds are slow)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic renames still keep the cache consistent
        yield
        return
    with open(path, "a+") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BackendError(f"{path}: timed out after {timeout:.0f} s waiting for the cache lock") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------ TensorRT engines
@dataclass(frozen=True)
class EngineKey:
    """Everything a serialized TensorRT engine depends on; :meth:`digest` names its files."""

    onnx_sha256: str
    trt_module: str  # "tensorrt" or "tensorrt_rtx"
    trt_version: str
    gpu_name: str
    compute_capability: str  # "8.7"
    precision: str
    flags: tuple[tuple[str, str], ...] = ()

    @classmethod
    def create(
        cls,
        onnx_sha256: str,
        trt_module: str,
        trt_version: str,
        gpu_name: str,
        compute_capability: str,
        precision: str,
        **flags: Any,
    ) -> EngineKey:
        return cls(
            onnx_sha256,
            trt_module,
            str(trt_version),
            gpu_name,
            str(compute_capability),
            precision,
            tuple(sorted((k, str(v)) for k, v in flags.items())),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flags"] = dict(self.flags)
        return d

    def digest(self) -> str:
        return _sha256(json.dumps(self.to_dict(), sort_keys=True).encode())


class EngineCache:
    """``<cache_dir>/engines/<key>.engine`` + ``<key>.json`` (sha256, size, key fields, build info)."""

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.dir = self.root / "engines"
        self.stats: Counter[str] = Counter()  # hits, builds, discarded

    def paths(self, key: EngineKey) -> tuple[Path, Path]:
        d = key.digest()
        return self.dir / f"{d}.engine", self.dir / f"{d}.json"

    def load(self, key: EngineKey) -> bytes | None:
        """Return the verified engine bytes for ``key``; ``None`` (after discarding a damaged entry) when unusable."""
        epath, mpath = self.paths(key)
        if not epath.exists() and not mpath.exists():
            return None
        try:
            meta = json.loads(mpath.read_text())
            data = epath.read_bytes()
        except (OSError, json.JSONDecodeError) as e:
            self.discard(key, f"unreadable cache entry ({type(e).__name__})")
            return None
        if meta.get("key") != key.to_dict():
            reason = "its record names a different key"
        elif not data:
            reason = "the engine file is empty"
        elif len(data) != meta.get("bytes"):
            reason = f"the engine file has {len(data)} bytes, its record says {meta.get('bytes')} (truncated)"
        elif _sha256(data) != meta.get("sha256"):
            reason = "the engine's sha256 does not match its record (corrupt)"
        else:
            return data
        self.discard(key, reason)
        return None

    def store(self, key: EngineKey, data: bytes, info: dict[str, Any] | None = None) -> Path:
        """Write the engine, then its record (both atomically); returns the engine path."""
        if not data:
            raise BackendError("refusing to cache an empty TensorRT engine")
        epath, mpath = self.paths(key)
        _write_atomic(epath, data)
        meta = {"key": key.to_dict(), "bytes": len(data), "sha256": _sha256(data), "created_unix": int(time.time())}
        meta.update(info or {})
        _write_atomic(mpath, (json.dumps(meta, indent=2) + "\n").encode())
        return epath

    def discard(self, key: EngineKey, reason: str) -> None:
        epath, mpath = self.paths(key)
        log.warning("TensorRT engine cache: discarding %s: %s; it will be rebuilt", epath.name, reason)
        self.stats["discarded"] += 1
        for p in (mpath, epath):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def get_or_build(
        self,
        key: EngineKey,
        build: Callable[[], bytes],
        deserialize: Callable[[bytes], T | None],
        info: dict[str, Any] | None = None,
    ) -> T:
        """Deserialize the cached engine for ``key``, or build, deserialize and cache a new one (under a lock)."""
        epath, _ = self.paths(key)
        with file_lock(epath.with_suffix(".lock")):
            data = self.load(key)
            if data is not None:
                engine = _try_deserialize(deserialize, data)
                if engine is not None:
                    self.stats["hits"] += 1
                    log.info("TensorRT engine cache hit: %s", epath)
                    return engine
                self.discard(key, "TensorRT could not deserialize it (another TensorRT build or a damaged file)")
            t0 = time.perf_counter()
            data = build()
            self.stats["builds"] += 1
            engine = _try_deserialize(deserialize, data)
            if engine is None:
                raise BackendError("TensorRT built an engine it cannot deserialize on this device")
            seconds = time.perf_counter() - t0
            self.store(key, data, {**(info or {}), "build_seconds": round(seconds, 2)})
            log.info("TensorRT engine built in %.1f s and cached: %s", seconds, epath)
            return engine


def _try_deserialize(deserialize: Callable[[bytes], T | None], data: bytes) -> T | None:
    try:
        return deserialize(data)
    except Exception as e:  # TensorRT raises various errors for foreign or damaged plans
        log.warning("TensorRT engine deserialization failed: %s", str(e).splitlines()[0] if str(e) else e)
        return None


# ------------------------------------------------------------------------------------------------ ONNX exports
def export_cache_key(bundle: ModelBundle, opset: int | None, dynamo: bool | None, batch_size: int) -> str:
    """sha256 of the bundle's weights and configs, scene names, preprocessing and the export settings."""
    from ..export import DEFAULT_DYNAMO, DEFAULT_OPSET, EXPORT_FORMAT_VERSION, weights_sha256

    dynamo = DEFAULT_DYNAMO if dynamo is None else bool(dynamo)
    settings = {
        "weights": weights_sha256(bundle),
        "opset": (18 if dynamo else DEFAULT_OPSET) if opset is None else int(opset),
        "dynamo": dynamo,
        "batch_size": int(batch_size),
        "scene_names": list(bundle.scene_names),
        "preprocess": bundle.preprocess,
        "torch": torch.__version__,
        "format_version": EXPORT_FORMAT_VERSION,
    }
    return _sha256(json.dumps(settings, sort_keys=True, default=str).encode())


def cached_onnx_export(
    bundle: ModelBundle,
    cache_dir: str | Path | None = None,
    opset: int | None = None,
    dynamo: bool | None = None,
    batch_size: int = 1,
):
    """Return the bundle's ONNX export from ``<cache_dir>/onnx/<key>/``, exporting it on a miss or when damaged.

    The result's ``reused`` tells whether the files came from the cache. Raises :class:`~apr_localizer.export.
    ExportError` when the export fails.
    """
    from ..export import MANIFEST_NAME, ExportError, export_onnx, load_export

    root = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "onnx"
    key = export_cache_key(bundle, opset, dynamo, batch_size)
    final = root / key
    with file_lock(root / f"{key}.lock"):
        if (final / MANIFEST_NAME).is_file():
            try:
                result = load_export(final, verify=True)
                log.info("ONNX export cache hit: %s", final)
                return result
            except ExportError as e:
                log.warning("ONNX export cache entry is damaged (%s); exporting again", e)
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=root))
        try:
            fresh = export_onnx(bundle, tmp, opset=opset, dynamo=dynamo, batch_size=batch_size)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        result = load_export(final, verify=False)
        result.reused = False
        result.seconds = fresh.seconds
        log.info("exported ONNX graphs in %.1f s to %s", fresh.seconds, final)
        return result


def cached_derivative(source: Path, variant: str, make: Callable[[Path, Path], Any]) -> Path:
    """``<source stem>.<variant>.onnx`` next to ``source``, made by ``make(source, dst)`` unless a verified copy exists.

    The derived file's record (``.json``) holds its sha256 and the sha256 of the source it was made from.
    """
    dst = source.with_name(f"{source.stem}.{variant}.onnx")
    record = dst.with_suffix(".json")
    with file_lock(dst.with_suffix(".lock")):
        src_sha = _file_sha256(source)
        try:
            meta = json.loads(record.read_text())
            if meta.get("source_sha256") == src_sha and meta.get("sha256") == _file_sha256(dst):
                return dst
            log.warning("%s does not match its record; making it again", dst)
        except (OSError, json.JSONDecodeError):
            pass
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        try:
            make(source, tmp)
            os.replace(tmp, dst)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        meta = {"variant": variant, "source": source.name, "source_sha256": src_sha, "sha256": _file_sha256(dst)}
        _write_atomic(record, (json.dumps(meta, indent=2) + "\n").encode())
        return dst


def _file_sha256(path: Path) -> str:
    from ..export import file_sha256

    return file_sha256(path)
