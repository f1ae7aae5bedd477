"""What a trainer is: the run context (paths, device, distributed info), the :class:`Task` interface and its errors.

A trainer is a :class:`Task`: it builds its dataset and a *step module* (an ``nn.Module`` whose ``forward(batch)``
returns a dict with the scalar ``loss`` and detached metrics), says which parameters train, validates and writes its
model files; :class:`apr_training.train.loop.Trainer` runs the epochs for any task.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .config import TrainConfig

__all__ = ["Context", "DistInfo", "NonFiniteLossError", "Paths", "Task", "TrainError", "permutation_order"]

log = logging.getLogger("apr_training.train")


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


def permutation_order(n: int, seed: int):
    """``order_fn`` for :class:`EpochSampler`: a permutation of ``range(n)`` seeded by ``(seed, epoch)``."""

    def order(epoch: int) -> np.ndarray:
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % 2**63)
        return torch.randperm(n, generator=g).numpy()

    return order


# --------------------------------------------------------------------------------------------- task
class Task(abc.ABC):
    """One trainer. Subclasses set :attr:`dataset`, :attr:`module` and :attr:`scene_names` in :meth:`setup`."""

    name: str = ""
    #: DDP ``find_unused_parameters``: leave False and freeze parameters that get no gradient (faster, and a missed
    #: one fails loudly on the second step instead of silently desynchronising ranks).
    find_unused_parameters: bool = False

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
