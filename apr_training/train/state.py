"""Resumable training state: seeding, every RNG state, ``last_state.pt`` (write/read), metrics JSONL and JSON files.

``<out>/last_state.pt`` holds model, optimiser, scheduler, scaler, counters and every RNG state, as tensors and plain
containers only (saved with ``torch.save``, read back with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apr_localizer.fileio import atomic_path, atomic_write_text

from .task import TrainError

__all__ = [
    "STATE_FILE",
    "STATE_FORMAT",
    "STATE_VERSION",
    "MetricsWriter",
    "get_rng_state",
    "load_train_state",
    "plot_training_curves",
    "save_train_state",
    "seed_everything",
    "set_rng_state",
    "write_json",
]

STATE_FILE = "last_state.pt"
STATE_FORMAT = "apr_training.train_state"
STATE_VERSION = 2  # 2: RNG states of every rank ("rng_per_rank")

log = logging.getLogger("apr_training.train")


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
    """Append JSON lines to ``<out>/metrics.jsonl`` and, when opened, TensorBoard scalars (rank 0 only).

    Every ``step``/``epoch`` record's numbers go to TensorBoard as ``<type>/<key>`` at the record's ``step``.
    """

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        self.tb: Any = None

    def open_tensorboard(self, log_dir: Path, purge_step: int | None = None) -> None:
        """Start TensorBoard event files in ``log_dir`` (skipped with a log line when tensorboard is missing).

        ``purge_step`` (on resume) hides events a killed run logged at or after that step.
        """
        if not self.enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("tensorboard is not installed: no event files (metrics.jsonl has the same numbers)")
            return
        self.tb = SummaryWriter(str(log_dir), purge_step=purge_step + 1 if purge_step is not None else None)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (round(v, 8) if isinstance(v, float) and math.isfinite(v) else v) for k, v in record.items()}
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in clean.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
        if self.tb is not None and record.get("type") in ("step", "epoch"):
            for k, v in record.items():
                if k not in ("type", "epoch", "step") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{record['type']}/{k}", float(v), int(record["step"]))

    def truncate_after(self, step: int) -> None:
        """Drop the records logged after optimiser step ``step`` (a resume must not repeat steps or epochs)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [ln for ln in self.path.read_text(encoding="utf-8").splitlines() if _record_step(ln) <= step]
        atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step") or 0)
    except (ValueError, AttributeError):
        return 0


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def plot_training_curves(metrics: Path, png: Path) -> Path | None:
    """Plot train loss per logged step and validation medians per epoch from ``metrics.jsonl`` into ``png``.

    Returns the PNG path, or None when matplotlib is missing or there is nothing to plot.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = [json.loads(ln) for ln in metrics.read_text(encoding="utf-8").splitlines() if ln.strip()]
    steps = [r for r in records if r.get("type") == "step" and r.get("loss") is not None]
    epochs = [r for r in records if r.get("type") == "epoch"]
    if not steps:
        return None
    val_keys = [k for k in ("val_position_median", "val_orientation_median") if any(k in r for r in epochs)]
    fig, axes = plt.subplots(1, 1 + len(val_keys), figsize=(5 * (1 + len(val_keys)), 3.5), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1, label="train loss (logged steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    for ax, key in zip(axes[0][1:], val_keys):
        pts = [(r["epoch"], r[key]) for r in epochs if r.get(key) is not None]
        ax.plot([e for e, _ in pts], [v for _, v in pts], marker="o")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key + (" (m)" if "position" in key else " (deg)"))
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return png


# --------------------------------------------------------------------------------------------- train state
def save_train_state(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` a state made of tensors and plain containers, atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        torch.save(state, str(tmp))


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
