"""Model files on disk: the bounded, validated safetensors reader/writer and the one model-file error.

A hostile or broken file is refused before anything large is allocated: the 8-byte header length is checked against
the file size and :data:`MAX_HEADER_BYTES`, then every tensor's dtype, shape and byte range against the data section
(no overlap), and only then are tensors read. Writes are atomic (:mod:`apr_localizer.fileio`). Every failure is one
:class:`CheckpointError` sentence naming the file, with quoted strings escaped (:func:`apr_localizer.imaging.quote`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .fileio import atomic_path, clean_stale_tmp
from .imaging import quote

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_TENSORS",
    "CheckpointError",
    "TensorInfo",
    "error_reason",
    "read_safetensors",
    "read_safetensors_header",
    "write_safetensors",
]


class CheckpointError(ValueError):
    """A model file is missing, unreadable, or not what was expected (the message is one sentence)."""


def error_reason(exc: BaseException, limit: int = 160) -> str:
    """First line of an exception message, cut and with control characters escaped (it may quote the file)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if len(line) > limit:
        line = line[:limit] + "..."
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in line)


MAX_HEADER_BYTES = 8 * 1024 * 1024
"""Largest safetensors JSON header we read (our bundles need about 100 KB: one entry per tensor plus metadata)."""
MAX_TENSORS = 100_000
"""Most tensors a model file may hold (an MS-Transformer + iAPR bundle has about 1,300)."""
_ST_DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a safetensors header: dtype name, shape and byte range in the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _header_json(path: Path) -> tuple[dict[str, Any], int]:
    """Return the parsed JSON header of a safetensors file and the size of its data section (bounded reads)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a readable safetensors file (only {size} bytes, no header length)")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > MAX_HEADER_BYTES or n < 2:
            raise CheckpointError(
                f"{path}: not a readable safetensors file (its header length {n} does not fit a {size}-byte file "
                f"and the {MAX_HEADER_BYTES}-byte limit)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (invalid JSON header: {error_reason(e)})"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a readable safetensors file (the header is not a JSON object)")
    return header, size - 8 - n


def _tensor_info(name: str, entry: Any, data_size: int, path: Path) -> TensorInfo:
    """Validate one header entry: known dtype, non-negative shape, offsets inside the data that match the shape."""
    bad = f"{path}: not a readable safetensors file (tensor {quote(name)}"
    if not isinstance(entry, dict) or entry.get("dtype") not in _ST_DTYPE_BYTES:
        raise CheckpointError(f"{bad} has no supported dtype)")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or len(shape) > 8 or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{bad} has an invalid shape {quote(shape)})")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise CheckpointError(f"{bad} has invalid data offsets {quote(offsets)})")
    begin, end = offsets
    nbytes = math.prod(shape) * _ST_DTYPE_BYTES[entry["dtype"]]
    if not 0 <= begin <= end <= data_size or end - begin != nbytes:
        raise CheckpointError(
            f"{bad} declares {nbytes} bytes at offsets {begin}..{end}, outside the {data_size}-byte data section "
            "or of the wrong length)"
        )
    return TensorInfo(entry["dtype"], tuple(shape), begin, end)


def read_safetensors_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and validate a safetensors header: ``({name: TensorInfo}, metadata)``; no tensor is read.

    The header length is checked against the file size and :data:`MAX_HEADER_BYTES` before the header is read;
    every tensor's byte range must lie inside the data section, match its shape and dtype, and not overlap another.

    Raises:
        CheckpointError: missing file, or anything that is not a well-formed safetensors header.
    """
    path = Path(path)
    header, data_size = _header_json(path)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"{path}: not a readable safetensors file (__metadata__ is not a string-to-string map)")
    if len(header) > MAX_TENSORS:
        raise CheckpointError(f"{path}: holds {len(header)} tensors; a model has at most {MAX_TENSORS}")
    infos = {str(k): _tensor_info(str(k), v, data_size, path) for k, v in header.items()}
    spans = sorted((i.begin, i.end) for i in infos.values() if i.end > i.begin)
    if any(b < prev_end for (_, prev_end), (b, _) in zip(spans, spans[1:])):
        raise CheckpointError(f"{path}: not a readable safetensors file (tensor data ranges overlap)")
    return infos, meta


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Validate the header (:func:`read_safetensors_header`), then load every tensor on the CPU.

    Returns ``(tensors, metadata)``. The tensors' total size is at most the file size.
    """
    from safetensors.torch import load_file

    infos, meta = read_safetensors_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the tensors ({error_reason(e, 120)})") from None
    if set(tensors) != set(infos):
        raise CheckpointError(f"{path}: the tensors changed while the file was being read")
    return tensors, meta


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Write a safetensors file atomically (:func:`apr_localizer.fileio.atomic_path`).

    Temporaries that a killed writer left beside ``path`` are removed first; concurrent writers of the same path are
    not supported.
    """
    from safetensors.torch import save_file

    path = Path(path)
    clean_stale_tmp(path.parent, name=path.name)
    with atomic_path(path) as tmp:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata))
    return path
