"""Training machinery shared by every trainer: context, seeding, devices, DDP, AMP, resumable state, metrics, loop.

A trainer is a :class:`Task`: it builds its dataset and a *step module* (an ``nn.Module`` whose ``forward(batch)``
returns a dict with the scalar ``loss`` and detached metrics), says which parameters train, validates and writes its
model files. :class:`Trainer` runs the epochs for any task:

* Adam over the trainable parameters (+ the learned loss weights) and StepLR stepped once per epoch
  (model_spec.md §3); gradient clipping optional;
* mixed precision on CUDA (``torch.autocast`` + ``GradScaler`` for float16; bfloat16 without scaler);
* DDP under ``torchrun`` (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``): nccl on CUDA, gloo on CPU, the epoch order split
  across ranks, only rank 0 writes files;
* a deterministic epoch order (seeded per epoch) with mid-epoch resume: ``<out>/last_state.pt`` holds model,
  optimiser, scheduler, scaler, counters and every RNG state, as tensors and plain containers only (saved with
  ``torch.save``, read back with ``torch.load(weights_only=True)``);
* tqdm progress bars with loss / lr / overall ETA, metrics as JSONL (``<out>/metrics.jsonl``: one line per logged
  step and per epoch) and ``<out>/summary.json``;
* a non-finite loss stops the run with :class:`NonFiniteLossError` naming the step; nothing is written after it, so
  the last good checkpoint stays (the CLI exits with code 2).

Resume is bitwise exact at epoch boundaries, and mid-epoch with ``data.workers: 0``; with workers, a mid-epoch
resume replays the same sample order but the augmentation draws of the rest of that epoch differ.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from .config import (
    IGNORED_OFFICIAL_KEYS,
    OFFICIAL_KEYS,
    TRAINERS,
    ConfigError,
    DataConfig,
    DecoderConfig,
    IAPRTrainConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    PAETrainConfig,
    PoseNetConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    default_config_name,
    load_config,
    resolve_config_path,
)

__all__ = [
    "IGNORED_OFFICIAL_KEYS",
    "OFFICIAL_KEYS",
    "STATE_FILE",
    "TRAINERS",
    "ConfigError",
    "Context",
    "DataConfig",
    "DecoderConfig",
    "DistInfo",
    "EpochSampler",
    "IAPRTrainConfig",
    "LossConfig",
    "MetricsWriter",
    "ModelConfig",
    "NonFiniteLossError",
    "OptimConfig",
    "PAETrainConfig",
    "Paths",
    "PoseNetConfig",
    "RunConfig",
    "Task",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "Trainer",
    "apply_overrides",
    "default_config_name",
    "get_rng_state",
    "init_distributed",
    "load_backbone_weights",
    "load_config",
    "load_train_state",
    "resolve_config_path",
    "resolve_device",
    "save_train_state",
    "seed_everything",
    "set_rng_state",
]

log = logging.getLogger("apr_training.train")

STATE_FILE = "last_state.pt"
STATE_FORMAT = "apr_training.train_state"
STATE_VERSION = 1


class TrainError(RuntimeError):
    """A training run cannot start or continue (the message is one sentence naming the file/parameter)."""


class NonFiniteLossError(TrainError):
    """The loss became NaN or infinite; ``step`` is the 1-based optimiser step that produced it."""

    def __init__(self, step: int, epoch: int, values: dict[str, float]) -> None:
        self.step, self.epoch, self.values = step, epoch, values
        shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        super().__init__(
            f"non-finite loss at step {step} (epoch {epoch + 1}): {shown}; training stopped, the last good checkpoint "
            "is kept (lower optim.lr, check the labels, or turn off AMP)"
        )


# --------------------------------------------------------------------------------------------- context
@dataclass
class Paths:
    """Inputs and outputs of a run (CLI arguments)."""

    out: Path
    labels: Path | None = None
    data: Path | None = None
    pairs: Path | None = None
    teacher: Path | None = None
    pae: Path | None = None
    init: Path | None = None
    val_labels: Path | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {k: (str(v) if v is not None else None) for k, v in self.__dict__.items()}


@dataclass
class DistInfo:
    """Distributed setting: ``world_size`` 1 means a single process."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


@dataclass
class Context:
    """Everything a task needs: config, paths, device, distributed info, flags."""

    trainer: str
    config: TrainConfig
    paths: Paths
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dist: DistInfo = field(default_factory=DistInfo)
    resume: bool = False
    export_official: bool = False
    demo: bool = False
    config_source: str = ""

    @property
    def out(self) -> Path:
        return self.paths.out


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


# --------------------------------------------------------------------------------------------- devices / DDP
def resolve_device(pref: str, dist_info: DistInfo) -> torch.device:
    """``auto`` → CUDA when available (``cuda:LOCAL_RANK`` under DDP), else CPU; ``cuda`` without CUDA is an error."""
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainError(f"device {pref!r} requested but CUDA is not available; use --device cpu or auto")
        if pref == "cuda":
            return torch.device("cuda", dist_info.local_rank if dist_info.enabled else torch.cuda.current_device())
        idx = int(pref.split(":")[1])
        if idx >= torch.cuda.device_count():
            raise TrainError(f"device {pref!r} requested but only {torch.cuda.device_count()} CUDA devices exist")
        return torch.device(pref)
    return torch.device("cpu")


def init_distributed(device_pref: str) -> tuple[DistInfo, torch.device]:
    """Start the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1); return the info and the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_pref, info)
    if info.enabled:
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend=backend)
    return info, device


def _barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def _all_reduce_max(value: float, info: DistInfo, device: torch.device) -> float:
    if not info.enabled:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


# --------------------------------------------------------------------------------------------- sampler
class EpochSampler(Sampler[int]):
    """Deterministic per-epoch order with a DDP split and a resume offset.

    ``order_fn(epoch) -> (L,) int64 indices`` gives the full epoch (e.g. a permutation seeded by ``(seed, epoch)`` or
    the ``equalize_scenes`` list); every rank takes every ``world_size``-th entry (padded to a multiple) and the
    first ``skip`` of its entries are dropped after a mid-epoch resume.
    """

    def __init__(self, order_fn, num_replicas: int = 1, rank: int = 0) -> None:
        self.order_fn = order_fn
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = int(epoch), int(skip)

    def _indices(self) -> np.ndarray:
        idx = np.asarray(self.order_fn(self.epoch), dtype=np.int64).reshape(-1)
        if self.num_replicas > 1:
            pad = (-len(idx)) % self.num_replicas
            if pad:
                idx = np.concatenate([idx, idx[:pad]])
            idx = idx[self.rank :: self.num_replicas]
        return idx[self.skip :]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices().tolist())

    def __len__(self) -> int:
        return len(self._indices())


def permutation_order(n: int, seed: int):
    """``order_fn`` for :class:`EpochSampler`: a permutation of ``range(n)`` seeded by ``(seed, epoch)``."""

    def order(epoch: int) -> np.ndarray:
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % 2**63)
        return torch.randperm(n, generator=g).numpy()

    return order


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


def _atomic_write_json(path: Path, obj: Any) -> None:
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


def load_backbone_weights(module: nn.Module, path: str | Path, what: str = "backbone") -> int:
    """Load a torchvision-style state_dict (``torch.load(weights_only=True)``) into ``module`` where names match.

    Keys missing from the file or with another shape are an error for the parameters the module has; extra keys in
    the file (e.g. a classifier) are ignored. Returns the number of tensors loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"model.backbone_weights: {path} does not exist")
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainError(f"{path}: cannot be read as a state_dict with weights_only=True ({str(e)[:120]})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    if missing:
        raise TrainError(
            f"{path}: {len(missing)} {what} tensors are missing (e.g. {', '.join(missing[:3])}); expected a "
            f"torchvision state_dict of the same architecture"
        )
    for k in own:
        if tuple(sd[k].shape) != tuple(own[k].shape):
            raise TrainError(f"{path}: tensor {k!r} has shape {tuple(sd[k].shape)}, expected {tuple(own[k].shape)}")
    module.load_state_dict({k: sd[k].to(own[k].dtype) for k in own}, strict=True)
    return len(own)


# --------------------------------------------------------------------------------------------- task
class Task(abc.ABC):
    """One trainer. Subclasses set :attr:`dataset`, :attr:`module` and :attr:`scene_names` in :meth:`setup`."""

    name: str = ""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.cfg = ctx.config
        self.dataset: Dataset | None = None
        self.module: nn.Module | None = None
        self.scene_names: list[str] = []
        self.inputs: dict[str, str | None] = {}

    @abc.abstractmethod
    def setup(self, saved_inputs: dict[str, Any] | None = None) -> None:
        """Read data and models, build :attr:`dataset` and :attr:`module` (on ``ctx.device``).

        ``saved_inputs`` holds :attr:`inputs` of the run being resumed (paths, scene names).
        """

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Dataset indices of one epoch (before the DDP split); default: a seeded permutation."""
        return permutation_order(len(self.dataset), self.cfg.run.seed)(epoch)

    def epoch_dataset(self, epoch: int) -> Dataset:
        """Dataset used in ``epoch`` (a task may switch to a cheaper one, e.g. once teacher outputs are cached)."""
        return self.dataset

    def loss_parameters(self) -> list[nn.Parameter]:
        """Learned loss weights (s_x, s_q) that train; they get their own weight-decay setting."""
        return []

    def model_parameters(self) -> list[nn.Parameter]:
        """Trainable network parameters; default: every parameter of :attr:`module` that requires grad."""
        loss_ids = {id(p) for p in self.loss_parameters()}
        return [p for p in self.module.parameters() if p.requires_grad and id(p) not in loss_ids]

    def train_mode(self) -> None:
        """Put the module in training mode (frozen parts back in eval)."""
        self.module.train()

    def validate(self) -> dict[str, float] | None:
        """Metrics on the held-out CSV (``--val-labels``), or None."""
        return None

    @abc.abstractmethod
    def save(self, path: Path) -> None:
        """Write the trained model file (our safetensors format) to ``path``."""

    def export_official(self, out_dir: Path) -> list[Path]:
        """Write official-format checkpoints; default: not supported."""
        log.warning("--export-official: the %s trainer has no official checkpoint format; skipped", self.name)
        return []

    def after_training(self) -> None:  # noqa: B027 - optional hook
        """Extra outputs once training is done (rank 0), e.g. the decoder demo image."""

    @property
    def model_file_suffix(self) -> str:
        return ".safetensors"


# --------------------------------------------------------------------------------------------- trainer
@dataclass
class TrainResult:
    """Outcome of :meth:`Trainer.run`."""

    epochs: int
    steps: int
    stopped: str
    best: float | None
    files: list[str]
    summary: dict[str, Any]


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 4 and batch.is_floating_point():  # images: match the channels_last model
            return batch.to(device, non_blocking=True, memory_format=torch.channels_last)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _batch_len(batch: dict[str, Any]) -> int:
    for key in ("image", "pose", "index"):
        v = batch.get(key)
        if isinstance(v, torch.Tensor):
            return int(v.shape[0])
    return 0


class Trainer:
    """Run a :class:`Task`: optimiser, scheduler, AMP, DDP, logging, checkpoints, resume."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.ctx = task.ctx
        self.cfg = task.ctx.config
        self.out = task.ctx.out
        self.is_main = task.ctx.dist.is_main
        self.metrics = MetricsWriter(self.out / "metrics.jsonl", self.is_main)
        self.device = task.ctx.device
        self.amp_dtype: torch.dtype | None = None
        if self.cfg.run.amp and self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if self.cfg.run.amp_dtype == "bfloat16" else torch.float16
        elif self.cfg.run.amp and self.device.type != "cuda":
            log.info("AMP is only used on CUDA; training in float32 on %s", self.device)

    # ----------------------------------------------------------------------------------------- helpers
    def _optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        groups = []
        model_params = self.task.model_parameters()
        if model_params:
            groups.append({"params": model_params, "weight_decay": o.weight_decay, "name": "model"})
        loss_params = [p for p in self.task.loss_parameters() if p.requires_grad]
        if loss_params:
            wd = o.weight_decay if self.cfg.loss.decay_loss_weights else 0.0
            groups.append({"params": loss_params, "weight_decay": wd, "name": "loss"})
        if not model_params:
            raise TrainError(f"{self.task.name}: no trainable parameters (check model.freeze_exclude_phrase)")
        return torch.optim.Adam(groups, lr=o.lr, eps=o.eps, weight_decay=o.weight_decay)

    def _loader(self, dataset: Dataset, sampler: EpochSampler):
        from apr_training.datasets.torch_datasets import make_loader

        d = self.cfg.data
        return make_loader(
            dataset,
            batch_size=d.batch_size,
            workers=d.workers,
            sampler=sampler,
            drop_last=d.drop_last,
            seed=self.cfg.run.seed,
            persistent_workers=d.persistent_workers if d.workers > 0 else None,
            pin_memory=self.device.type == "cuda",
        )

    def _state(self, opt, sched, scaler, epoch: int, step: int, step_in_epoch: int, best) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "trainer": self.task.name,
            "model": {k: v.detach().cpu() for k, v in self.task.module.state_dict().items()},
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "epoch": int(epoch),
            "step": int(step),
            "step_in_epoch": int(step_in_epoch),
            "best": best,
            "rng": get_rng_state(),
            "config": json.dumps(self.cfg.to_dict()),
            "inputs": json.dumps(self.task.inputs),
            "scene_names": list(self.task.scene_names),
            "world_size": self.ctx.dist.world_size,
            "batch_size": self.cfg.data.batch_size,
        }

    def _save_state(self, *args) -> None:
        if self.is_main:
            save_train_state(self.out / STATE_FILE, self._state(*args))

    def _best_value(self, train_loss: float, val: dict[str, float] | None) -> tuple[str, float | None]:
        metric = self.cfg.run.best_metric
        if metric == "auto":
            if val:
                for key in getattr(self.task, "auto_best_keys", ("val_position_median", "val_loss")):
                    if key in val:
                        return key, val[key]
            return "train_loss", train_loss
        if metric == "train_loss":
            return metric, train_loss
        key = {"val_position": "val_position_median", "val_orientation": "val_orientation_median"}.get(metric, metric)
        return key, (val or {}).get(key)

    # ----------------------------------------------------------------------------------------- run
    def run(self, saved: dict[str, Any] | None = None) -> TrainResult:
        """Train; ``saved`` is a loaded training state to resume from."""
        task, cfg, ctx = self.task, self.cfg, self.ctx
        run, optim_cfg = cfg.run, cfg.optim
        module = task.module
        # channels_last: oneDNN's convolution backward is several times faster and far more stable in this layout
        # (measured on the 2-core CPU: 2.3 s vs 2.5-15 s per batch of 8); cuDNN prefers it too.
        module.to(memory_format=torch.channels_last)
        train_module: nn.Module = module
        if ctx.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            train_module = DistributedDataParallel(module, device_ids=ids, find_unused_parameters=False)
        opt = self._optimizer()
        sched = torch.optim.lr_scheduler.StepLR(
            opt, step_size=optim_cfg.lr_scheduler_step_size, gamma=optim_cfg.lr_scheduler_gamma
        )
        use_scaler = self.amp_dtype == torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=use_scaler) if self.device.type == "cuda" else None
        start_epoch, global_step, step_in_epoch, best = 0, 0, 0, None
        if saved is not None:
            module.load_state_dict(saved["model"], strict=True)
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            if scaler is not None and saved.get("scaler"):
                scaler.load_state_dict(saved["scaler"])
            start_epoch, global_step = int(saved["epoch"]), int(saved["step"])
            step_in_epoch, best = int(saved["step_in_epoch"]), saved.get("best")
            if int(saved.get("batch_size", cfg.data.batch_size)) != cfg.data.batch_size and step_in_epoch:
                log.warning(
                    "batch size changed on a mid-epoch resume: the rest of epoch %d is re-ordered", start_epoch + 1
                )
            set_rng_state(saved["rng"])
            log.info("resumed from %s at epoch %d, step %d", self.out / STATE_FILE, start_epoch + 1, global_step)

        sampler = EpochSampler(task.epoch_order, ctx.dist.world_size, ctx.dist.rank)
        n_epochs = optim_cfg.n_epochs
        max_steps = run.max_steps
        bs = cfg.data.batch_size
        files: list[str] = []
        stopped = "completed"
        t_start = time.perf_counter()
        images_total = 0
        last_epoch_stats: dict[str, Any] = {}
        best_key = "train_loss"
        current_dataset: Dataset | None = None
        loader = None

        steps_per_epoch_est = max(1, math.ceil(len(task.epoch_order(0)) / max(1, ctx.dist.world_size) / bs))
        total_steps = n_epochs * steps_per_epoch_est
        if max_steps is not None:
            total_steps = min(total_steps, max_steps)

        if self.is_main:
            self.metrics.write(
                {"type": "start", "trainer": task.name, "epoch": start_epoch, "step": global_step,
                 "resumed": saved is not None, "dataset_size": len(task.dataset), "scene_names": task.scene_names,
                 "device": str(self.device), "world_size": ctx.dist.world_size, "time": time.time()}
            )  # fmt: skip

        epoch = start_epoch
        done = max_steps is not None and global_step >= max_steps
        while epoch < n_epochs and not done:
            ds = task.epoch_dataset(epoch)
            if ds is not current_dataset:
                current_dataset, loader = ds, self._loader(ds, sampler)
            sampler.set_epoch(epoch, skip=step_in_epoch * bs)
            # per-epoch worker seeds: an epoch's augmentation does not depend on earlier epochs (exact resume)
            loader.generator.manual_seed((run.seed * 7919 + epoch * 104729 + ctx.dist.rank * 15485863 + 17) % 2**63)
            task.train_mode()
            n_batches = len(loader)
            epoch_sums: dict[str, float] = {}
            epoch_count = 0
            window: dict[str, float] = {}
            window_n, window_images = 0, 0
            window_t0 = time.perf_counter()
            epoch_t0 = time.perf_counter()
            epoch_images = 0
            from tqdm import tqdm

            bar = tqdm(
                total=n_batches + step_in_epoch,
                initial=step_in_epoch,
                desc=f"{task.name} epoch {epoch + 1}/{n_epochs}",
                disable=not (self.is_main and run.progress),
                dynamic_ncols=True,
                leave=False,
            )
            for batch in loader:
                batch = _to_device(batch, self.device)
                n_img = _batch_len(batch)
                autocast = (
                    torch.autocast(device_type="cuda", dtype=self.amp_dtype)
                    if self.amp_dtype is not None
                    else contextlib.nullcontext()
                )
                with autocast:
                    out = train_module(batch)
                loss = out["loss"]
                loss_value = float(loss.detach().float().item())
                bad = 0.0 if math.isfinite(loss_value) else 1.0
                if _all_reduce_max(bad, ctx.dist, self.device) > 0:
                    bar.close()
                    values = {k: float(v.detach().float().item()) for k, v in out.items() if v.numel() == 1}
                    raise NonFiniteLossError(global_step + 1, epoch, values)
                opt.zero_grad(set_to_none=True)
                if scaler is not None and use_scaler:
                    scaler.scale(loss).backward()
                    if optim_cfg.grad_clip_norm > 0:
                        scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(
                            [p for g in opt.param_groups for p in g["params"]], optim_cfg.grad_clip_norm
                        )
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    if optim_cfg.grad_clip_norm > 0:
                        torch.nn.utils.clip_grad_norm_(
                            [p for g in opt.param_groups for p in g["params"]], optim_cfg.grad_clip_norm
                        )
                    opt.step()
                global_step += 1
                step_in_epoch += 1
                images_total += n_img
                epoch_images += n_img
                window_images += n_img
                scalars = {k: float(v.detach().float().item()) for k, v in out.items() if v.numel() == 1}
                for k, v in scalars.items():
                    window[k] = window.get(k, 0.0) + v
                    epoch_sums[k] = epoch_sums.get(k, 0.0) + v
                window_n += 1
                epoch_count += 1
                lr = opt.param_groups[0]["lr"]
                elapsed = time.perf_counter() - t_start
                done_steps = max(1, global_step - (int(saved["step"]) if saved else 0))
                eta = elapsed / done_steps * max(0, total_steps - global_step)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", eta=_fmt_time(eta), refresh=False)
                bar.update(1)
                if global_step % run.n_freq_print == 0 or step_in_epoch == 1:
                    dt = max(1e-9, time.perf_counter() - window_t0)
                    rec = {"type": "step", "epoch": epoch + 1, "step": global_step, "lr": lr}
                    rec.update({k: v / window_n for k, v in window.items()})
                    rec["images_per_s"] = window_images * ctx.dist.world_size / dt
                    self.metrics.write(rec)
                    if not (self.is_main and run.progress) and self.is_main:
                        log.info(
                            "epoch %d step %d loss %.4f lr %.2e %.1f img/s",
                            epoch + 1,
                            global_step,
                            rec["loss"],
                            lr,
                            rec["images_per_s"],
                        )
                    window, window_n, window_images, window_t0 = {}, 0, 0, time.perf_counter()
                if run.checkpoint_every_steps and global_step % run.checkpoint_every_steps == 0:
                    self._save_state(opt, sched, scaler, epoch, global_step, step_in_epoch, best)
                if max_steps is not None and global_step >= max_steps:
                    done = True
                    break
            bar.close()
            epoch_time = time.perf_counter() - epoch_t0
            finished_epoch = _epoch_complete(sampler, step_in_epoch, bs, cfg.data.drop_last)
            train_loss = epoch_sums.get("loss", float("nan")) / max(1, epoch_count)
            if finished_epoch:
                sched.step()
                val = None
                if (epoch + 1) % run.val_every == 0 or epoch + 1 == n_epochs or done:
                    val = task.validate() if self.is_main else None
                    task.train_mode()
                rate = epoch_images * ctx.dist.world_size / max(1e-9, epoch_time)
                rec = {"type": "epoch", "epoch": epoch + 1, "step": global_step, "lr": opt.param_groups[0]["lr"],
                       "time_s": epoch_time, "images_per_s": rate}  # fmt: skip
                rec.update({f"train_{k}": v / max(1, epoch_count) for k, v in epoch_sums.items()})
                if val:
                    rec.update(val)
                self.metrics.write(rec)
                last_epoch_stats = rec
                best_key, value = self._best_value(train_loss, val)
                improved = value is not None and math.isfinite(value) and (best is None or value < best)
                if improved:
                    best = float(value)
                epoch += 1
                step_in_epoch = 0
                final = epoch >= n_epochs or done
                write_last = final or epoch % run.save_every_epochs == 0
                if self.is_main:
                    if write_last:
                        task.save(self.out / f"last{task.model_file_suffix}")
                    if improved:
                        task.save(self.out / f"best{task.model_file_suffix}")
                    if epoch % run.n_freq_checkpoint == 0:
                        (self.out / "checkpoints").mkdir(exist_ok=True)
                        task.save(self.out / "checkpoints" / f"epoch_{epoch:04d}{task.model_file_suffix}")
                if write_last:
                    self._save_state(opt, sched, scaler, epoch, global_step, step_in_epoch, best)
            else:
                stopped = "max_steps"
                if self.is_main:
                    task.save(self.out / f"last{task.model_file_suffix}")
                self._save_state(opt, sched, scaler, epoch, global_step, step_in_epoch, best)
                break
            _barrier(ctx.dist)
        if done and stopped == "completed" and epoch < n_epochs:
            stopped = "max_steps"

        wall = time.perf_counter() - t_start
        if self.is_main:
            if not (self.out / f"last{task.model_file_suffix}").exists():
                task.save(self.out / f"last{task.model_file_suffix}")  # e.g. 0 epochs / resumed at the end
            if not (self.out / f"best{task.model_file_suffix}").exists():
                task.save(self.out / f"best{task.model_file_suffix}")
            if ctx.export_official:
                files += [str(p) for p in task.export_official(self.out)]
            task.after_training()
            files += sorted(str(p) for p in self.out.glob(f"*{task.model_file_suffix}"))
            summary = {
                "trainer": task.name,
                "stopped": stopped,
                "epochs_completed": epoch,
                "steps": global_step,
                "best_metric": best_key,
                "best": best,
                "last_epoch": last_epoch_stats,
                "wall_time_s": wall,
                "images_per_s": images_total * ctx.dist.world_size / max(1e-9, wall),
                "scene_names": task.scene_names,
                "device": str(self.device),
                "world_size": ctx.dist.world_size,
                "amp": None if self.amp_dtype is None else str(self.amp_dtype).replace("torch.", ""),
                "inputs": task.inputs,
                "files": files,
                "config_source": ctx.config_source,
                "config": cfg.to_dict(),
            }
            _atomic_write_json(self.out / "summary.json", summary)
            self.metrics.write({"type": "end", "epoch": epoch, "step": global_step, "stopped": stopped,
                                "wall_time_s": wall})  # fmt: skip
        else:
            summary = {}
        _barrier(ctx.dist)
        return TrainResult(epoch, global_step, stopped, best, files, summary)


def _epoch_complete(sampler: EpochSampler, steps_done: int, bs: int, drop_last: bool) -> bool:
    """Whether ``steps_done`` batches cover the whole epoch of ``sampler`` (ignoring its resume offset)."""
    skip = sampler.skip
    sampler.skip = 0
    n = len(sampler)
    sampler.skip = skip
    per_epoch = n // bs if drop_last else math.ceil(n / bs)
    return steps_done >= per_epoch


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


# --------------------------------------------------------------------------------------------- data / model helpers
def preprocess_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Preprocessing stored with the model (the test transform at the training input size)."""
    from apr_localizer.preprocess import IMAGENET_MEAN, IMAGENET_STD

    return {"resize": cfg.data.resize, "crop": cfg.data.crop, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def eval_transform(cfg: TrainConfig):
    """Return the test transform (Resize → CenterCrop → Normalize) at the configured size."""
    from apr_localizer.preprocess import EvalTransform, PreprocessConfig

    return EvalTransform(PreprocessConfig(resize=cfg.data.resize, crop=cfg.data.crop))


def train_transform(cfg: TrainConfig, no_augment: bool | None = None):
    """Return the train transform (RandomCrop + ColorJitter) or, with ``no_augment``, the test transform."""
    from apr_localizer.preprocess import PreprocessConfig
    from apr_training.datasets.transforms import build_train_transform

    na = cfg.data.no_augment if no_augment is None else no_augment
    pc = PreprocessConfig(resize=cfg.data.resize, crop=cfg.data.crop)
    return build_train_transform(pc, no_augment=na, jitter=cfg.data.color_jitter)


def read_label_table(path: Path | None, root: Path | None, scene_names: list[str] | None, what: str = "--labels"):
    """Read a label CSV (errors name the file and row); ``scene_names`` maps names to the model's ids."""
    from apr_training.datasets.labels import read_labels

    if path is None:
        raise TrainError(f"{what} is required: a label CSV (scene,split,seq,img_path,t1,t2,t3,q1,q2,q3,q4)")
    table = read_labels(path, dataset_root=root, scene_names=scene_names)
    if len(table) == 0:
        raise TrainError(f"{what} {path} has no rows; expected at least one labelled image")
    return table


def check_scene_count(cfg: TrainConfig, scene_names: list[str], labels_path: Path | None) -> None:
    """``model.num_scenes`` (when set) must equal the number of scenes of the data/model."""
    n = cfg.model.num_scenes
    if n is not None and n != len(scene_names):
        raise TrainError(
            f"model.num_scenes is {n} but {labels_path} has {len(scene_names)} scenes {scene_names}; "
            "set model.num_scenes to null (take it from the data) or train on the matching scenes"
        )


def load_apr(path: Path, what: str = "--teacher"):
    """Load an MS-Transformer from our ``.safetensors`` bundle or an official ``.pth``.

    Returns ``(model, scene_names | None, bundle | None)``.

    Official files carry no scene names (None: the label CSV's sorted names are used, as upstream).
    """
    from apr_localizer.checkpoints import CheckpointError, load_model, load_official_checkpoint
    from apr_localizer.models import IAPR, MSTransformer

    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{what} {path} does not exist")
    if path.suffix == ".safetensors":
        bundle = load_model(path)
        return bundle.apr, list(bundle.scene_names), bundle
    model = load_official_checkpoint(path)
    if isinstance(model, IAPR):
        model = model.mstransformer
    if not isinstance(model, MSTransformer):
        raise CheckpointError(f"{what} {path}: expected an MS-Transformer checkpoint, found a {type(model).__name__}")
    return model, None, None


def labels_for_model(ctx: Context, model_scene_names: list[str] | None, num_scenes: int, what: str):
    """Read ``--labels`` with a model's scene order; check the scene count for official files (no names)."""
    table = read_label_table(ctx.paths.labels, ctx.paths.data, model_scene_names or ctx.config.data.scene_names)
    if len(table.scenes) != num_scenes:
        raise TrainError(
            f"{ctx.paths.labels} has {len(table.scenes)} scenes {table.scenes} but the {what} model knows "
            f"{num_scenes}; train on the model's scenes (official checkpoints use the sorted scene names)"
        )
    return table


def make_eval_loader(ctx: Context, dataset: Dataset):
    """Sequential loader for validation (no shuffling)."""
    from apr_training.datasets.torch_datasets import make_loader

    d = ctx.config.data
    return make_loader(dataset, batch_size=d.batch_size, workers=min(d.workers, 2), seed=ctx.config.run.seed,
                       pin_memory=ctx.device.type == "cuda", persistent_workers=False)  # fmt: skip


def pose_error_stats(est: np.ndarray, gt: np.ndarray, prefix: str = "val_") -> dict[str, float]:
    """Median/mean position (m) and orientation (deg) errors of ``(N, 7)`` poses."""
    from apr_localizer.geometry import pose_errors

    if len(est) == 0:
        return {}
    t, r = pose_errors(est, gt)
    return {
        f"{prefix}position_median": float(np.median(t)),
        f"{prefix}orientation_median": float(np.median(r)),
        f"{prefix}position_mean": float(np.mean(t)),
        f"{prefix}orientation_mean": float(np.mean(r)),
    }


@torch.no_grad()
def evaluate_apr(model: nn.Module, loader, device: torch.device, iapr: nn.Module | None = None) -> dict[str, float]:
    """APR (scene withheld) errors and scene accuracy on a loader; with ``iapr`` also the refined errors."""
    from apr_localizer.models import localize_apr_iapr

    was = model.training
    model.eval()
    if iapr is not None:
        iapr.eval()
    ests, refined, gts, hits = [], [], [], []
    for batch in loader:
        images = batch["image"].to(device)
        if iapr is not None:
            out = localize_apr_iapr(model, iapr, images)
            ests.append(out["apr_pose"].float().cpu())
            refined.append(out["pose"].float().cpu())
        else:
            out = model(images)
            ests.append(out["pose"].float().cpu())
        gts.append(batch["pose"].float())
        hits.append((out["scene"].cpu() == batch["scene"]).float())
    model.train(was)
    gt = torch.cat(gts).double().numpy()
    stats = pose_error_stats(torch.cat(ests).double().numpy(), gt)
    stats["val_scene_accuracy"] = float(torch.cat(hits).mean().item())
    if refined:
        apr_stats = {k.replace("val_", "val_apr_"): v for k, v in stats.items() if "position" in k or "orient" in k}
        stats.update(pose_error_stats(torch.cat(refined).double().numpy(), gt))
        stats.update(apr_stats)
    return stats


def provenance(ctx: Context, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Training provenance stored in model metadata."""
    import datetime

    prov = {
        "trainer": ctx.trainer,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config_source": ctx.config_source,
        "labels": str(ctx.paths.labels) if ctx.paths.labels else None,
        "config": ctx.config.to_dict(),
    }
    prov.update(extra or {})
    return prov
