"""On-disk caches: exported ONNX graphs (keyed by the bundle's weights) and TensorRT engines (keyed by target).

Layout under the cache dir (default ``~/.cache/apr_localizer``; ``$APR_LOCALIZER_CACHE_DIR`` or
``$XDG_CACHE_HOME/apr_localizer`` when set; :attr:`BackendOptions.cache_dir` wins)::

    onnx/<key>/{apr,encoder,refine}.onnx, manifest.json   key = sha256(weights + configs + export settings)
    onnx/<key>/<graph>.<variant>.onnx (+ .json)           derived graphs (ORT int8 / fp16), verified by sha256
    engines/<key>.engine, engines/<key>.json              key = sha256(ONNX sha256, TensorRT flavour + version,
                                                          GPU name, compute capability, precision, build path)
    engines/timing/<trt>-<gpu>.cache                      TensorRT timing cache (speeds up rebuilds)

The caches heal themselves: every write goes through :mod:`apr_localizer.fileio` (temporary file or directory,
fsync, rename), builds run under an exclusive ``fcntl`` lock per key (a bounded wait, then one sentence), temporaries
left by a killed process are removed on start, every record is size-bounded before it is read, and an entry that
fails any check (size, sha256, JSON, graph I/O names, TensorRT refusing the plan) is discarded and rebuilt. What
cannot be healed (the cache path is a file, the directory is read-only) is refused with one sentence that says what
to change.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..checkpoints import ModelBundle
from ..export import (
    DEFAULT_DYNAMO,
    DEFAULT_OPSET,
    EXPORT_FORMAT_VERSION,
    ExportError,
    export_onnx,
    file_sha256,
    load_export,
    weights_sha256,
)
from ..fileio import TMP_SUFFIX, atomic_dir, atomic_path, atomic_write_bytes, atomic_write_text, clean_stale_tmp
from ..graphs import MANIFEST_NAME
from .base import BackendError

__all__ = [
    "MAX_RECORD_BYTES",
    "EngineCache",
    "EngineKey",
    "cached_derivative",
    "cached_onnx_export",
    "default_cache_dir",
    "ensure_cache_dir",
    "export_cache_key",
    "file_lock",
    "lock_timeout",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_RECORD_BYTES = 1 << 20  # an engine record is ~1 kB; anything above 1 MiB is damage, not data
STALE_TMP_S = 3600.0  # temporaries of OTHER keys are removed once this old (their writer may still be running)


def default_cache_dir() -> Path:
    """``$APR_LOCALIZER_CACHE_DIR``, else ``$XDG_CACHE_HOME/apr_localizer``, else ``~/.cache/apr_localizer``."""
    env = os.environ.get("APR_LOCALIZER_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "apr_localizer"


def lock_timeout(default: float) -> float:
    """Seconds to wait for a cache lock: ``$APR_LOCALIZER_LOCK_TIMEOUT_S`` when set, else ``default``."""
    env = os.environ.get("APR_LOCALIZER_LOCK_TIMEOUT_S")
    try:
        return float(env) if env else default
    except ValueError:
        raise BackendError(f"APR_LOCALIZER_LOCK_TIMEOUT_S='{env}' is not a number of seconds") from None


def ensure_cache_dir(path: Path) -> Path:
    """Create ``path`` (a cache directory) or raise one sentence saying what to change."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise BackendError(
                f"{p}: the cache path is a file, expected a directory; delete it or set cache_dir to another directory"
            )
        if p.exists():
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BackendError(
            f"{path}: cannot create the cache directory ({e.strerror}); set cache_dir elsewhere"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise BackendError(f"{path}: the cache directory is not writable; make it writable or set cache_dir elsewhere")
    return path


def _read_only(directory: Path) -> bool:
    """Tell whether ``directory`` exists but this process cannot create files in it."""
    return directory.is_dir() and not os.access(directory, os.W_OK | os.X_OK)


def _remove_tmp(directory: Path, prefix: str) -> None:
    """Remove temporaries ``<prefix>*.tmp`` of the key whose lock we hold (their writer was killed)."""
    for p in directory.glob(f"{prefix}*{TMP_SUFFIX}"):
        log.info("removing %s left by an interrupted export or build", p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


@contextlib.contextmanager
def file_lock(path: Path, timeout: float = 1800.0) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if needed); waits up to ``timeout`` s, then one sentence.

    A directory at ``path`` (not ours) is removed first. A killed process releases its lock automatically.
    """
    ensure_cache_dir(path.parent)
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic renames still keep the cache consistent
        yield
        return
    if path.is_dir() and not path.is_symlink():
        log.warning("%s: the lock file is a directory; removing it", path)
        shutil.rmtree(path, ignore_errors=True)
    try:
        f = open(path, "a+")  # noqa: SIM115 - held for the whole with-block below
    except OSError as e:
        raise BackendError(
            f"{path}: cannot open the cache lock ({e.strerror}); delete it or set cache_dir elsewhere"
        ) from None
    with f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BackendError(
                        f"{path}: another process has held this cache lock for more than {timeout:.0f} s (an export "
                        "or TensorRT build in progress?); wait for it to finish or stop it"
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _read_bounded(path: Path, limit: int) -> bytes:
    """Read ``path`` after checking its size (a damaged record must not make us allocate gigabytes)."""
    size = path.stat().st_size
    if size > limit:
        raise ValueError(f"{size} bytes, more than the {limit} a record can have")
    return path.read_bytes()


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
        if self.dir.is_dir():
            clean_stale_tmp(self.dir, older_than_s=STALE_TMP_S, recursive=True)

    def paths(self, key: EngineKey) -> tuple[Path, Path]:
        d = key.digest()
        return self.dir / f"{d}.engine", self.dir / f"{d}.json"

    def load(self, key: EngineKey, *, discard: bool = True) -> bytes | None:
        """Return the verified engine bytes for ``key``; ``None`` (after discarding a damaged entry) when unusable.

        ``discard=False`` only logs why an entry is unusable (a read-only cache).
        """
        epath, mpath = self.paths(key)
        if not epath.exists() and not mpath.exists():
            return None
        try:
            meta = json.loads(_read_bounded(mpath, MAX_RECORD_BYTES))
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
            size = epath.stat().st_size
        except (OSError, ValueError) as e:
            self._reject(key, f"unreadable cache entry ({type(e).__name__}: {e})", discard)
            return None
        if meta.get("key") != key.to_dict():
            reason = "its record names a different key"
        elif size == 0:
            reason = "the engine file is empty"
        elif size != meta.get("bytes"):
            reason = f"the engine file has {size} bytes, its record says {meta.get('bytes')} (truncated)"
        else:
            data = epath.read_bytes()
            if _sha256(data) == meta.get("sha256"):
                return data
            reason = "the engine's sha256 does not match its record (corrupt)"
        self._reject(key, reason, discard)
        return None

    def _reject(self, key: EngineKey, reason: str, discard: bool) -> None:
        if discard:
            self.discard(key, reason)
        else:
            log.warning("TensorRT engine cache: %s is unusable: %s", self.paths(key)[0].name, reason)

    def store(self, key: EngineKey, data: bytes, info: dict[str, Any] | None = None) -> Path:
        """Write the engine, then its record (both atomically); returns the engine path."""
        if not data:
            raise BackendError("refusing to cache an empty TensorRT engine")
        epath, mpath = self.paths(key)
        meta = {"key": key.to_dict(), "bytes": len(data), "sha256": _sha256(data), "created_unix": int(time.time())}
        meta.update(info or {})
        try:
            atomic_write_bytes(epath, data)
            atomic_write_text(mpath, json.dumps(meta, indent=2) + "\n")
        except OSError as e:
            raise BackendError(
                f"{epath.parent}: cannot write the TensorRT engine cache ({e.strerror}); set cache_dir to a writable "
                "directory"
            ) from None
        return epath

    def discard(self, key: EngineKey, reason: str) -> None:
        epath, mpath = self.paths(key)
        log.warning("TensorRT engine cache: discarding %s: %s; it will be rebuilt", epath.name, reason)
        self.stats["discarded"] += 1
        for p in (mpath, epath):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
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
        if _read_only(self.dir):  # a read-only engine cache is usable while its entry is intact
            data = self.load(key, discard=False)
            engine = _try_deserialize(deserialize, data) if data is not None else None
            if engine is None:
                raise BackendError(
                    f"{self.dir}: the engine cache is not writable and holds no usable engine for this model and GPU; "
                    "make it writable or set cache_dir elsewhere"
                )
            self.stats["hits"] += 1
            return engine
        ensure_cache_dir(self.dir)
        with file_lock(epath.with_suffix(".lock"), lock_timeout(1800.0)):
            _remove_tmp(self.dir, f".{key.digest()}.")
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


def _cached_entry(final: Path):
    """Return the verified export in ``final``, or ``None`` after logging why not (it is then re-exported)."""
    if not (final / MANIFEST_NAME).is_file():
        if final.exists():
            log.warning("ONNX export cache entry %s has no manifest (interrupted or damaged); exporting again", final)
        return None
    try:
        result = load_export(final, verify=True)
    except ExportError as e:
        log.warning("ONNX export cache entry is damaged (%s); exporting again", e)
        return None
    log.info("ONNX export cache hit: %s", final)
    return result


def cached_onnx_export(
    bundle: ModelBundle,
    cache_dir: str | Path | None = None,
    opset: int | None = None,
    dynamo: bool | None = None,
    batch_size: int = 1,
):
    """Return the bundle's ONNX export from ``<cache_dir>/onnx/<key>/``, exporting it on a miss or when damaged.

    The result's ``reused`` tells whether the files came from the cache. Raises :class:`~apr_localizer.export.
    ExportError` when the export fails and :class:`BackendError` when the cache directory cannot be used.
    """
    root = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "onnx"
    key = export_cache_key(bundle, opset, dynamo, batch_size)
    final = root / key
    if _read_only(root):  # e.g. a deployment directory on a read-only partition: usable while intact
        result = _cached_entry(final)
        if result is None:
            raise BackendError(
                f"{root}: the cache directory is not writable and holds no intact export of this model; make it "
                "writable or set cache_dir elsewhere"
            )
        return result
    ensure_cache_dir(root)
    clean_stale_tmp(root, older_than_s=STALE_TMP_S)
    with file_lock(root / f"{key}.lock", lock_timeout(600.0)):
        _remove_tmp(root, f".{key}.")
        result = _cached_entry(final)
        if result is not None:
            return result
        if final.is_file() or final.is_symlink():
            final.unlink()
        try:
            with atomic_dir(final) as tmp:
                fresh = export_onnx(bundle, tmp, opset=opset, dynamo=dynamo, batch_size=batch_size)
        except OSError as e:
            raise BackendError(
                f"{root}: cannot write the ONNX export cache ({e.strerror}); set cache_dir elsewhere"
            ) from None
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
    if _read_only(dst.parent):
        if _derivative_ok(dst, record, file_sha256(source)):
            return dst
        raise BackendError(
            f"{dst.parent}: the cache directory is not writable and holds no intact {variant} graph; make it "
            "writable or set cache_dir elsewhere"
        )
    with file_lock(dst.with_suffix(".lock"), lock_timeout(600.0)):
        _remove_tmp(dst.parent, f".{dst.name}.")
        src_sha = file_sha256(source)
        if _derivative_ok(dst, record, src_sha):
            return dst
        with atomic_path(dst) as tmp:
            make(source, tmp)
        meta = {"variant": variant, "source": source.name, "source_sha256": src_sha, "sha256": file_sha256(dst)}
        atomic_write_text(record, json.dumps(meta, indent=2) + "\n")
        return dst


def _derivative_ok(dst: Path, record: Path, src_sha: str) -> bool:
    """Tell whether ``dst`` matches its record and was made from the source with sha256 ``src_sha``."""
    try:
        meta = json.loads(_read_bounded(record, MAX_RECORD_BYTES))
        if meta.get("source_sha256") == src_sha and meta.get("sha256") == file_sha256(dst):
            return True
        log.warning("%s does not match its record; making it again", dst)
    except (OSError, ValueError, AttributeError):
        pass
    return False
