"""Resumable training state: seeding, every RNG state, ``last_state.pt`` (write/read), metrics JSONL and JSON files.

``<out>/last_state.pt`` holds model, optimiser, scheduler, scaler, counters and every RNG state, as tensors and plain
containers only (saved with ``torch.save``, read back with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .task import TrainError

__all__ = [
    "STATE_FILE",
    "STATE_FORMAT",
    "STATE_VERSION",
    "MetricsWriter",
    "get_rng_state",
    "load_train_state",
    "save_train_state",
    "seed_everything",
    "set_rng_state",
    "write_json",
]

STATE_FILE = "last_state.pt"
STATE_FORMAT = "apr_training.train_state"
STATE_VERSION = 1


# --------------------------------------------------------------------------------------------- seeds / RNG
def seed_everything(torch_seed: int, numpy_seed: int, deterministic: bool = True) -> None:
    """Seed torch (CPU and CUDA) and python ``random`` with ``torch_seed``, numpy with ``numpy_seed``."""
    torch.manual_seed(torch_seed)
    random.seed(torch_seed)
    np.random.seed(numpy_seed % 2**32)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(torch_seed)
    torch.backends.cudnn.deterministic = bool(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


def get_rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain containers (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.random.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_state[0]),
            "state": torch.tensor(py_state[1], dtype=torch.int64),
            "gauss": py_state[2],
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states written by :func:`get_rng_state`."""
    torch.random.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            int(n["pos"]),
            int(n["has_gauss"]),
            float(n["cached_gaussian"]),
        )
    )
    p = state["python"]
    random.setstate((int(p["version"]), tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------- metrics
class MetricsWriter:
    """Append JSON lines to ``<out>/metrics.jsonl`` (rank 0 only; a no-op elsewhere)."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (round(v, 8) if isinstance(v, float) and math.isfinite(v) else v) for k, v in record.items()}
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in clean.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- train state
def save_train_state(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` a state made of tensors and plain containers, atomically (write + rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, str(tmp))
    os.replace(tmp, path)


def load_train_state(path: Path) -> dict[str, Any]:
    """Read ``last_state.pt`` with ``torch.load(weights_only=True)``; check its format."""
    if not path.is_file():
        raise TrainError(f"--resume: {path} does not exist; nothing to resume (drop --resume to start afresh)")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainError(f"{path}: cannot be read as a training state ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainError(f"{path}: not a training state written by apr-train")
    if int(state.get("version", 0)) > STATE_VERSION:
        raise TrainError(f"{path}: training state version {state.get('version')} is newer than this apr-train")
    return state
