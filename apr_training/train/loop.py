"""The training loop shared by every trainer: :class:`Trainer` runs the epochs of any :class:`~.task.Task`.

The loop does:

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

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .distributed import EpochSampler, all_reduce_max, barrier
from .state import (
    STATE_FILE,
    STATE_FORMAT,
    STATE_VERSION,
    MetricsWriter,
    get_rng_state,
    save_train_state,
    set_rng_state,
    write_json,
)
from .task import NonFiniteLossError, Task, TrainError

__all__ = ["TrainResult", "Trainer"]

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
                if all_reduce_max(bad, ctx.dist, self.device) > 0:
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
            barrier(ctx.dist)
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
            write_json(self.out / "summary.json", summary)
            self.metrics.write({"type": "end", "epoch": epoch, "step": global_step, "stopped": stopped,
                                "wall_time_s": wall})  # fmt: skip
        else:
            summary = {}
        barrier(ctx.dist)
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
