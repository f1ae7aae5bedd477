"""Devices and DDP: device resolution, process-group start under ``torchrun``, collectives, the epoch sampler.

DDP under ``torchrun`` (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``): nccl on CUDA, gloo on CPU, the epoch order split
across ranks (:class:`EpochSampler`), only rank 0 writes files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Sampler

from .task import DistInfo, TrainError

__all__ = [
    "EpochSampler",
    "all_gather_objects",
    "all_reduce_min_positive",
    "barrier",
    "init_distributed",
    "resolve_device",
    "wrap_ddp",
]


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


def barrier(info: DistInfo) -> None:
    """Wait for every rank (a no-op in a single process)."""
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_min_positive(value: torch.Tensor, info: DistInfo) -> int:
    """Smallest positive value of a scalar integer tensor over the ranks (0 when no rank has one); syncs the host."""
    if not info.enabled:
        return int(value.item())
    import torch.distributed as dist

    big = 2**62
    t = torch.where(value > 0, value, torch.full_like(value, big)).reshape(1).to(torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    v = int(t.item())
    return 0 if v == big else v


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a single process)."""
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(module: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """``DistributedDataParallel`` around ``module``: gradients are averaged over the ranks after each backward.

    Parameters that never receive a gradient must be frozen (``requires_grad=False``) by the task, or the task must
    set ``find_unused_parameters``; otherwise DDP waits forever for their gradients (and raises on the next step).
    """
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused_parameters)


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
