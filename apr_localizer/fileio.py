"""Crash-safe file writes: the one helper every file we write goes through.

A write goes to a temporary file in the destination's directory (name ``.<name>.<random>.tmp``), is flushed and
``fsync``-ed, renamed over the destination (atomic on POSIX), and the directory is ``fsync``-ed so the rename survives
a power cut. A reader therefore sees the old file or the new one, never a truncated one. Temporary files left by a
killed writer are removed by :func:`clean_stale_tmp` (called by the caches and trainers on start).

::

    atomic_write_bytes(path, data)
    with atomic_path(path) as tmp:      # for writers that want a path (torch.save, safetensors, onnx.save)
        onnx.save_model(model, str(tmp))
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "TMP_SUFFIX",
    "atomic_dir",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "clean_stale_tmp",
    "fsync_dir",
]

TMP_SUFFIX = ".tmp"


def fsync_dir(directory: str | Path) -> None:
    """``fsync`` a directory so that renames inside it are durable (a no-op where the OS does not allow it)."""
    try:
        fd = os.open(str(directory), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsync-ed and renamed onto ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_s = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_s)
    try:
        yield tmp
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` (which must not be a file).

    An existing directory at ``path`` is removed only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_file(f)
        if path.is_dir():
            old = path.with_name(f".{path.name}.{os.getpid()}.old{TMP_SUFFIX}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename, fsync of the directory)."""
    with atomic_path(path, fsync=False) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    # atomic_path(fsync=False) skipped the directory fsync; do it here when asked.
    if fsync:
        fsync_dir(Path(path).parent)


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8", fsync: bool = True) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode(encoding), fsync=fsync)


def clean_stale_tmp(
    directory: str | Path, *, older_than_s: float = 0.0, recursive: bool = False, name: str | None = None
) -> list[Path]:
    """Remove ``.<name>.*.tmp`` files/directories left by killed writers; returns what was removed.

    ``older_than_s`` keeps temporaries younger than that (a writer in another process may still be using them).
    ``name`` limits the cleanup to the temporaries of one destination file name (those of :func:`atomic_path`).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stem = "." if name is None else f".{glob.escape(name)}."
    pattern = f"**/{stem}*{TMP_SUFFIX}" if recursive else f"{stem}*{TMP_SUFFIX}"
    now = time.time()
    removed = []
    for p in sorted(directory.glob(pattern)):
        try:
            if older_than_s > 0 and now - p.lstat().st_mtime < older_than_s:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            continue
    return removed
