"""The training loop shared by every trainer: :class:`Trainer` runs the epochs of any :class:`~.task.Task`.

The loop does:

* Adam over the trainable parameters (+ the learned loss weights) and StepLR stepped once per epoch
  (model_spec.md §3); or (``optim.optimizer: adamw``, ``optim.schedule: cosine``) AdamW with a per-step cosine decay;
  a linear warm-up (``optim.warmup_steps``, at most a tenth of the run) for either schedule; gradient clipping by
  norm optional;
* a time budget (``run.time_budget_s``): training stops when it is spent (ending the epoch: validation and model
  files as at an epoch end), and the cosine schedule is sized from the measured time per step (re-estimated every
  logged window, so the LR reaches its floor when the budget does); the time used is kept across ``--resume``;
* mixed precision on CUDA (``torch.autocast``; ``run.amp_dtype: auto`` picks bfloat16 where the GPU supports it,
  float16 with a ``GradScaler`` otherwise);
* DDP under ``torchrun`` (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``): nccl on CUDA, gloo on CPU, the epoch order split
  across ranks, gradients all-reduced, only rank 0 writes files;
* a deterministic epoch order (seeded per epoch) with mid-epoch resume: ``<out>/last_state.pt`` holds model,
  optimiser, scheduler, scaler, counters and the RNG states of **every rank**, as tensors and plain containers only
  (``torch.save`` through an atomic write, read back with ``torch.load(weights_only=True)``); a resume needs the same
  world size; model files (``last``/``best``/``checkpoints/``) are written atomically too;
* no host synchronisation per step: step metrics are summed on the device and read back when logged;
* tqdm progress bars with loss / lr / overall ETA, metrics as JSONL (``<out>/metrics.jsonl``: one line per logged
  step and per epoch; a resume drops the lines logged after the saved state), TensorBoard event files in
  ``<out>/tensorboard`` (when ``tensorboard`` is installed), ``<out>/summary.json`` and ``<out>/curves.png``;
* a non-finite loss stops the run with :class:`NonFiniteLossError` naming the step; it is checked whenever metrics
  are logged and before anything is written, so the last good checkpoint stays (the CLI exits with code 2).

Resume is bitwise exact at epoch boundaries, and mid-epoch with ``data.workers: 0``; with workers, a mid-epoch
resume replays the same sample order but the augmentation draws of the rest of that epoch differ.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from apr_localizer.fileio import atomic_path

from .distributed import EpochSampler, all_gather_objects, all_reduce_min_positive, barrier, wrap_ddp
from .state import (
    STATE_FILE,
    STATE_FORMAT,
    STATE_VERSION,
    MetricsWriter,
    get_rng_state,
    plot_training_curves,
    save_train_state,
    seed_everything,
    set_rng_state,
    write_json,
)
from .task import NonFiniteLossError, Task, TrainError

__all__ = ["TrainResult", "Trainer", "amp_dtype", "parameter_digest"]

log = logging.getLogger("apr_training.train")


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


@dataclass
class _Progress:
    """Counters of a run (restored on resume)."""

    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0
    best: float | None = None
    best_key: str = "train_loss"
    start_step: int = 0
    total_steps: int = 1
    images: int = 0
    stopped: str = "completed"
    done: bool = False
    t_start: float = 0.0
    last_epoch: dict[str, Any] = field(default_factory=dict)
    elapsed_before: float = 0.0  # training seconds of the runs this one resumes (time budget)
    schedule_steps: int = 1  # steps the per-step schedule spans (from the epochs, or estimated from the budget)


class _Meter:
    """Running sums of the scalar step outputs, kept on the device (read back only when logged: no per-step sync)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0
        self.images = 0
        self.t0 = time.perf_counter()

    def add(self, out: dict[str, torch.Tensor], n_img: int) -> None:
        for k, v in out.items():
            if v.numel() == 1:
                v = v.detach().float().reshape(())
                self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.n += 1
        self.images += n_img

    def means(self) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = list(self.sums)
        values = torch.stack([self.sums[k] for k in keys]).cpu().tolist()  # one host sync
        return {k: v / max(1, self.n) for k, v in zip(keys, values)}


class Trainer:
    """Run a :class:`Task`: optimiser, scheduler, AMP, DDP, logging, checkpoints, resume."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.ctx = task.ctx
        self.cfg = task.ctx.config
        self.out = task.ctx.out
        self.is_main = task.ctx.dist.is_main
        self.device = task.ctx.device
        self.metrics = MetricsWriter(self.out / "metrics.jsonl", self.is_main)
        self.amp_dtype = amp_dtype(self.cfg.run.amp, self.cfg.run.amp_dtype, self.device)
        self.p = _Progress()
        self._bad = torch.zeros((), dtype=torch.long, device=self.device)  # first non-finite step, 0: none
        self.bar: Any = None

    # ----------------------------------------------------------------------------------------- set-up
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
        if o.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=o.lr, eps=o.eps, weight_decay=o.weight_decay)
        return torch.optim.Adam(groups, lr=o.lr, eps=o.eps, weight_decay=o.weight_decay)

    def _per_step_schedule(self) -> bool:
        o = self.cfg.optim
        return o.schedule == "cosine" or o.warmup_steps > 0

    def _lr_factor(self, step: int) -> float:
        """LR multiplier at optimiser step ``step`` of a per-step schedule (warm-up, then StepLR by epoch or cosine)."""
        o = self.cfg.optim
        wu = min(o.warmup_steps, max(1, self.p.schedule_steps // 10))  # a short run warms up over its first tenth
        warm = min(1.0, 0.01 + 0.99 * step / wu) if o.warmup_steps > 0 else 1.0
        if o.schedule == "step":
            return warm * o.lr_scheduler_gamma ** (self.p.epoch // o.lr_scheduler_step_size)
        span = max(1, self.p.schedule_steps - wu)
        x = min(1.0, max(0.0, (step - wu) / span))
        return warm * (o.min_lr_ratio + (1.0 - o.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * x)))

    def _elapsed(self) -> float:
        return self.p.elapsed_before + time.perf_counter() - self.p.t_start

    def _update_schedule_span(self) -> None:
        """Time budget: the steps the budget allows, from the mean time per step so far (sizes the cosine decay)."""
        p, budget = self.p, self.cfg.run.time_budget_s
        if budget is None or p.step <= p.start_step:
            return
        per_step = (time.perf_counter() - p.t_start) / (p.step - p.start_step)
        estimate = p.step + int(max(0.0, budget - self._elapsed()) / max(per_step, 1e-6))
        p.schedule_steps = max(1, min(estimate, p.total_steps)) if self.cfg.run.max_steps else max(1, estimate)

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

    def _build(self, saved: dict[str, Any] | None) -> None:
        """Wrap the module (channels_last, DDP), build optimiser/scheduler/scaler and restore a saved state."""
        ctx, optim_cfg = self.ctx, self.cfg.optim
        module = self.task.module
        # channels_last: oneDNN's convolution backward is several times faster and far more stable in this layout
        # (measured on the 2-core CPU: 2.3 s vs 2.5-15 s per batch of 8); cuDNN prefers it too.
        module.to(memory_format=torch.channels_last)
        self.train_module: nn.Module = module
        if ctx.dist.enabled:
            self.train_module = wrap_ddp(module, self.device, self.task.find_unused_parameters)
        self.opt = self._optimizer()
        self.sched: Any
        if self._per_step_schedule():
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        else:
            self.sched = torch.optim.lr_scheduler.StepLR(
                self.opt, step_size=optim_cfg.lr_scheduler_step_size, gamma=optim_cfg.lr_scheduler_gamma
            )
        if self.cfg.run.time_budget_s is not None and ctx.dist.enabled:
            raise TrainError("run.time_budget_s needs a single process (DDP ranks would stop at different steps)")
        self.use_scaler = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_scaler) if self.device.type == "cuda" else None
        if saved is not None:
            self._restore(saved)
        elif ctx.dist.enabled:  # same initial weights (set up before), different dropout draws per rank
            seed_everything(self.cfg.run.seed + 7919 * ctx.dist.rank, self.cfg.run.numpy_seed + 7919 * ctx.dist.rank,
                            self.cfg.run.deterministic)  # fmt: skip

    def _restore(self, saved: dict[str, Any]) -> None:
        ctx, p = self.ctx, self.p
        saved_world = int(saved.get("world_size", 1))
        if saved_world != ctx.dist.world_size:
            raise TrainError(
                f"{self.out / STATE_FILE} was written by a run with {saved_world} process(es) but this run has "
                f"{ctx.dist.world_size}; resume with the same number of processes (torchrun --nproc_per_node)"
            )
        self.task.module.load_state_dict(saved["model"], strict=True)
        self.opt.load_state_dict(saved["optimizer"])
        self.sched.load_state_dict(saved["scheduler"])
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        p.epoch, p.step = int(saved["epoch"]), int(saved["step"])
        p.step_in_epoch, p.best, p.start_step = int(saved["step_in_epoch"]), saved.get("best"), p.step
        p.elapsed_before = float(saved.get("elapsed_s", 0.0))
        p.schedule_steps = int(saved.get("schedule_steps", p.schedule_steps))
        if int(saved.get("batch_size", self.cfg.data.batch_size)) != self.cfg.data.batch_size and p.step_in_epoch:
            log.warning("batch size changed on a mid-epoch resume: the rest of epoch %d is re-ordered", p.epoch + 1)
        per_rank = saved.get("rng_per_rank") or [saved["rng"]]
        set_rng_state(per_rank[ctx.dist.rank])
        self.metrics.truncate_after(p.step)  # a killed run may have logged steps past its last saved state
        log.info("resumed from %s at epoch %d, step %d", self.out / STATE_FILE, p.epoch + 1, p.step)

    # ----------------------------------------------------------------------------------------- state / files
    def _state(self) -> dict[str, Any]:
        p = self.p
        rng_per_rank = all_gather_objects(get_rng_state(), self.ctx.dist)
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "trainer": self.task.name,
            "model": {k: v.detach().cpu() for k, v in self.task.module.state_dict().items()},
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "epoch": int(p.epoch),
            "step": int(p.step),
            "step_in_epoch": int(p.step_in_epoch),
            "best": p.best,
            "rng": rng_per_rank[0],
            "rng_per_rank": rng_per_rank,
            "config": json.dumps(self.cfg.to_dict()),
            "inputs": json.dumps(self.task.inputs),
            "scene_names": list(self.task.scene_names),
            "world_size": self.ctx.dist.world_size,
            "batch_size": self.cfg.data.batch_size,
            "elapsed_s": float(self._elapsed()),
            "schedule_steps": int(p.schedule_steps),
        }

    def _save_state(self) -> None:
        """Write ``last_state.pt`` (every rank takes part: the RNG states of all ranks are gathered)."""
        self._raise_if_non_finite()
        state = self._state()
        if self.is_main:
            save_train_state(self.out / STATE_FILE, state)

    def _save_model(self, name: str) -> None:
        """Write a model file of the task atomically (a reader sees the old file or the new one)."""
        path = self.out / f"{name}{self.task.model_file_suffix}"
        with atomic_path(path) as tmp:
            self.task.save(tmp)

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

    # ----------------------------------------------------------------------------------------- steps
    def _train_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Forward, backward and optimiser step; no host synchronisation (the loss is checked when logged)."""
        clip = self.cfg.optim.grad_clip_norm
        autocast = (
            torch.autocast(device_type="cuda", dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            out = self.train_module(batch)
        loss = out["loss"]
        self.opt.zero_grad(set_to_none=True)
        params = [p for g in self.opt.param_groups for p in g["params"]]
        if self.scaler is not None and self.use_scaler:
            self.scaler.scale(loss).backward()
            if clip > 0:
                self.scaler.unscale_(self.opt)
                torch.nn.utils.clip_grad_norm_(params, clip)
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip)
            self.opt.step()
        if self._per_step_schedule():
            self.sched.step()
        step = self.p.step + 1
        self._bad = torch.where((self._bad == 0) & ~torch.isfinite(loss.detach()), step, self._bad)
        return out

    def _raise_if_non_finite(self, meter: _Meter | None = None) -> None:
        """Host sync: stop with :class:`NonFiniteLossError` if any rank saw a non-finite loss since the start."""
        first = int(all_reduce_min_positive(self._bad, self.ctx.dist))
        if first:
            if self.bar is not None:
                self.bar.close()
            raise NonFiniteLossError(first, self.p.epoch, meter.means() if meter is not None else {})

    def _log_window(self, window: _Meter) -> None:
        self._raise_if_non_finite(window)
        p, lr = self.p, self.opt.param_groups[0]["lr"]
        rec: dict[str, Any] = {"type": "step", "epoch": p.epoch + 1, "step": p.step, "lr": lr}
        rec.update(window.means())
        rec["images_per_s"] = window.images * self.ctx.dist.world_size / max(1e-9, time.perf_counter() - window.t0)
        self.metrics.write(rec)
        self._update_schedule_span()
        elapsed = time.perf_counter() - p.t_start
        eta = elapsed / max(1, p.step - p.start_step) * max(0, p.total_steps - p.step)
        if self.cfg.run.time_budget_s is not None:
            eta = min(eta, max(0.0, self.cfg.run.time_budget_s - self._elapsed()))
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", eta=_fmt_time(eta), refresh=False)
        if self.is_main and not self.cfg.run.progress:
            log.info("epoch %d step %d loss %.4f lr %.2e %.1f img/s", p.epoch + 1, p.step, rec["loss"], lr,
                     rec["images_per_s"])  # fmt: skip

    # ----------------------------------------------------------------------------------------- epochs
    def _run_epoch(self, sampler: EpochSampler) -> _Meter:
        """Train until the epoch ends or ``max_steps``; return the epoch's meter."""
        from tqdm import tqdm

        p, run, ctx, bs = self.p, self.cfg.run, self.ctx, self.cfg.data.batch_size
        ds = self.task.epoch_dataset(p.epoch)
        if ds is not self._dataset:
            self._dataset, self._loader_obj = ds, self._loader(ds, sampler)
        loader = self._loader_obj
        sampler.set_epoch(p.epoch, skip=p.step_in_epoch * bs)
        # per-epoch worker seeds: an epoch's augmentation does not depend on earlier epochs (exact resume)
        loader.generator.manual_seed((run.seed * 7919 + p.epoch * 104729 + ctx.dist.rank * 15485863 + 17) % 2**63)
        self.task.train_mode()
        epoch_meter, window = _Meter(), _Meter()
        self.bar = tqdm(total=len(loader) + p.step_in_epoch, initial=p.step_in_epoch,
                        desc=f"{self.task.name} epoch {p.epoch + 1}/{self.cfg.optim.n_epochs}",
                        disable=not (self.is_main and run.progress), dynamic_ncols=True, leave=False)  # fmt: skip
        for batch in loader:
            batch = _to_device(batch, self.device)
            out = self._train_step(batch)
            p.step += 1
            p.step_in_epoch += 1
            n_img = _batch_len(batch)
            p.images += n_img
            epoch_meter.add(out, n_img)
            window.add(out, n_img)
            self.bar.update(1)
            if p.step % run.n_freq_print == 0 or p.step_in_epoch == 1:
                self._log_window(window)
                window = _Meter()
            if run.checkpoint_every_steps and p.step % run.checkpoint_every_steps == 0:
                self._save_state()
            if run.max_steps is not None and p.step >= run.max_steps:
                p.done = True
                break
            if run.time_budget_s is not None and self._elapsed() >= run.time_budget_s:
                p.done, p.stopped = True, "time_budget"
                break
        self.bar.close()
        return epoch_meter

    def _end_epoch(self, meter: _Meter) -> None:
        """Scheduler step, validation, the epoch record, model files and the training state."""
        self._raise_if_non_finite(meter)
        p, run, task = self.p, self.cfg.run, self.task
        if not self._per_step_schedule():
            self.sched.step()
        val = None
        if (p.epoch + 1) % run.val_every == 0 or p.epoch + 1 == self.cfg.optim.n_epochs or p.done:
            val = task.validate() if self.is_main else None
            task.train_mode()
        means = meter.means()
        rec = {
            "type": "epoch",
            "epoch": p.epoch + 1,
            "step": p.step,
            "lr": self.opt.param_groups[0]["lr"],
            "time_s": time.perf_counter() - meter.t0,
            "images_per_s": meter.images * self.ctx.dist.world_size / max(1e-9, time.perf_counter() - meter.t0),
        }
        rec.update({f"train_{k}": v for k, v in means.items()})  # fmt: skip
        if val:
            rec.update(val)
        self.metrics.write(rec)
        p.last_epoch = rec
        p.best_key, value = self._best_value(means.get("loss", float("nan")), val)
        improved = value is not None and math.isfinite(value) and (p.best is None or value < p.best)
        if improved:
            p.best = float(value)
        p.epoch += 1
        p.step_in_epoch = 0
        write_last = p.epoch >= self.cfg.optim.n_epochs or p.done or p.epoch % run.save_every_epochs == 0
        if self.is_main:
            if write_last:
                self._save_model("last")
            if improved:
                self._save_model("best")
            if p.epoch % run.n_freq_checkpoint == 0:
                self._save_model(f"checkpoints/epoch_{p.epoch:04d}")
        if write_last:
            self._save_state()

    # ----------------------------------------------------------------------------------------- run
    def run(self, saved: dict[str, Any] | None = None) -> TrainResult:
        """Train; ``saved`` is a loaded training state to resume from."""
        task, ctx, p = self.task, self.ctx, self.p
        self._build(saved)
        self.metrics.open_tensorboard(self.out / "tensorboard", purge_step=p.step if saved is not None else None)
        sampler = EpochSampler(task.epoch_order, ctx.dist.world_size, ctx.dist.rank)
        self._dataset: Dataset | None = None
        n_epochs, bs = self.cfg.optim.n_epochs, self.cfg.data.batch_size
        per_epoch = max(1, math.ceil(len(task.epoch_order(0)) / max(1, ctx.dist.world_size) / bs))
        p.total_steps = min(n_epochs * per_epoch, self.cfg.run.max_steps or n_epochs * per_epoch)
        p.t_start = time.perf_counter()
        if saved is None:
            p.schedule_steps = p.total_steps
        if self.cfg.run.time_budget_s is not None and self._elapsed() >= self.cfg.run.time_budget_s:
            p.done, p.stopped = True, "time_budget"  # resumed after the budget was spent
        self.metrics.write({"type": "start", "trainer": task.name, "epoch": p.epoch, "step": p.step,
                            "resumed": saved is not None, "dataset_size": len(task.dataset),
                            "scene_names": task.scene_names, "device": str(self.device),
                            "world_size": ctx.dist.world_size, "time": time.time()})  # fmt: skip
        p.done = p.done or (self.cfg.run.max_steps is not None and p.step >= self.cfg.run.max_steps)
        while p.epoch < n_epochs and not p.done:
            meter = self._run_epoch(sampler)
            if p.stopped == "time_budget" or _epoch_complete(sampler, p.step_in_epoch, bs, self.cfg.data.drop_last):
                self._end_epoch(meter)
            else:  # max_steps inside an epoch
                p.stopped = "max_steps"
                if self.is_main:
                    self._save_model("last")
                self._save_state()
                break
            barrier(ctx.dist)
        if p.done and p.stopped == "completed" and p.epoch < n_epochs:
            p.stopped = "max_steps"
        return self._finish()

    def _finish(self) -> TrainResult:
        """Write the final files on rank 0 (last/best, official export, summary.json, curves); return the result."""
        task, ctx, p = self.task, self.ctx, self.p
        wall = time.perf_counter() - p.t_start
        files: list[str] = []
        summary: dict[str, Any] = {}
        digests = all_gather_objects(parameter_digest(task.module), ctx.dist)
        if len(set(digests)) > 1:
            log.warning(
                "DDP ranks hold different parameters at the end (digests %s); gradients were not synced", digests
            )
        if self.is_main:
            for name in ("last", "best"):  # e.g. 0 epochs / resumed at the end
                if not (self.out / f"{name}{task.model_file_suffix}").exists():
                    self._save_model(name)
            if ctx.export_official:
                files += [str(x) for x in task.export_official(self.out)]
            task.after_training()
            files += sorted(str(x) for x in self.out.glob(f"*{task.model_file_suffix}"))
            summary = {
                "trainer": task.name, "stopped": p.stopped, "epochs_completed": p.epoch, "steps": p.step,
                "best_metric": p.best_key, "best": p.best, "last_epoch": p.last_epoch, "wall_time_s": wall,
                "images_per_s": p.images * ctx.dist.world_size / max(1e-9, wall),
                "scene_names": task.scene_names, "device": str(self.device), "world_size": ctx.dist.world_size,
                "amp": None if self.amp_dtype is None else str(self.amp_dtype).replace("torch.", ""),
                "inputs": task.inputs, "files": files, "config_source": ctx.config_source, "config": self.cfg.to_dict(),
                "rank_parameter_digests": digests,
            }  # fmt: skip
            write_json(self.out / "summary.json", summary)
            self.metrics.write({"type": "end", "epoch": p.epoch, "step": p.step, "stopped": p.stopped,
                                "wall_time_s": wall})  # fmt: skip
            plot_training_curves(self.out / "metrics.jsonl", self.out / "curves.png")
        self.metrics.close()
        barrier(ctx.dist)
        return TrainResult(p.epoch, p.step, p.stopped, p.best, files, summary)


def parameter_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter's bytes (buffers such as BatchNorm statistics excluded: they stay per rank)."""
    h = hashlib.sha256()
    for name, prm in module.named_parameters():
        h.update(name.encode())
        h.update(prm.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def amp_dtype(enabled: bool, name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: None off CUDA or with AMP off; ``auto`` → bfloat16 where the GPU supports it, else float16."""
    if not enabled:
        return None
    if device.type != "cuda":
        log.info("AMP is only used on CUDA; training in float32 on %s", device)
        return None
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if name == "bfloat16" else torch.float16


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
