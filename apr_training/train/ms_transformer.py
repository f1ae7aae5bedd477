"""MS-Transformer training (model_spec.md §2-§3): CameraPoseLoss with learned weights + scene NLL.

* The ground-truth scene is forced for the latent selection during training (the classifier still gets the NLL).
* ``data.equalize_scenes`` samples every scene ``max_scene_count`` times per epoch (Cambridge).
* ``model.freeze`` is the Cambridge stage-2 finetune: the backbone, both transformers and the scene classifier run in
  eval mode under ``no_grad``; only the regressor-head parameters whose names contain one of
  ``model.freeze_exclude_phrase`` train. As upstream (model_spec.md §10.13), a phrase that matches encoder parameters
  (``transformer_t`` in the official config) has no effect: those run under ``no_grad``. With the official finetune
  config (position-only loss ``learnable: false, s_x 1, s_q 0``) only ``regressor_head_t`` changes. Finetuning
  needs the stage-1 model: ``--init``.
* Scene names are saved with the model (the label CSV's sorted scene names unless ``data.scene_names`` is set).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from apr_localizer.models import (
    CameraPoseLoss,
    MSTransformer,
    MSTransformerConfig,
    build_ms_transformer,
    scene_nll_loss,
)

from .helpers import (
    check_scene_count,
    eval_transform,
    evaluate_apr,
    image_cache,
    init_backbone,
    labels_for_model,
    load_apr,
    make_eval_loader,
    preprocess_dict,
    provenance,
    read_label_table,
    train_transform,
)
from .task import Task, TrainError

__all__ = ["MSTransformerStep", "MSTransformerTask", "apply_freeze"]

log = logging.getLogger("apr_training.train")


class MSTransformerStep(nn.Module):
    """``forward(batch) -> {"loss", "pose_loss", "l_x", "l_q", "scene_nll", "s_x", "s_q"}``.

    ``batch``: ``image (B,3,H,W)``, ``pose (B,7)``, ``scene (B,)``. With ``freeze`` the encoder part runs under
    ``no_grad`` and only the heads see gradients.
    """

    def __init__(self, model: MSTransformer, criterion: CameraPoseLoss, scene_weight: float = 1.0,
                 freeze: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.model = model
        self.criterion = criterion
        self.scene_weight = float(scene_weight)
        self.freeze = freeze

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, gt, scene = batch["image"], batch["pose"], batch["scene"]
        if self.freeze:
            with torch.no_grad():
                enc = self.model.encode(images)
            _, one_hot, lat_t, lat_rot = self.model.select(enc, scene)
            est = self.model.decode_pose(lat_t, lat_rot, one_hot)
            log_probs = enc["scene_log_probs"]
        else:
            out = self.model(images, scene=scene)
            est, log_probs = out["pose"], out["scene_log_probs"]
        pose_loss, l_x, l_q = self.criterion(est.float(), gt.float())
        nll = scene_nll_loss(log_probs.float(), scene)
        loss = pose_loss + self.scene_weight * nll if self.scene_weight else pose_loss
        return {
            "loss": loss,
            "pose_loss": pose_loss.detach(),
            "l_x": l_x.detach(),
            "l_q": l_q.detach(),
            "scene_nll": nll.detach(),
            "s_x": self.criterion.s_x.detach().reshape(()),
            "s_q": self.criterion.s_q.detach().reshape(()),
        }


def apply_freeze(model: MSTransformer, phrases: list[str]) -> list[str]:
    """Freeze everything except regressor-head parameters matching a phrase; return the trainable names.

    Encoder parameters matching a phrase are reported (they cannot train: the encoder runs under no_grad).
    """
    trainable, ignored = [], []
    for name, p in model.named_parameters():
        match = any(ph in name for ph in phrases)
        p.requires_grad_(match and name.startswith(("regressor_head_t", "regressor_head_rot")))
        if p.requires_grad:
            trainable.append(name)
        elif match:
            ignored.append(name)
    if ignored:
        roots = sorted({n.split(".")[0] for n in ignored})
        log.info(
            "freeze: %s match model.freeze_exclude_phrase but run under no_grad in freeze mode, so they stay fixed "
            "(as upstream, model_spec.md §10.13)",
            ", ".join(roots),
        )
    if not trainable:
        raise TrainError(
            f"model.freeze_exclude_phrase {phrases} matches no regressor-head parameter; in freeze mode only "
            "regressor_head_t / regressor_head_rot can train"
        )
    return trainable


class MSTransformerTask(Task):
    """``apr-train ms-transformer``."""

    name = "ms-transformer"

    def setup(self, saved_inputs: dict[str, Any] | None = None) -> None:
        ctx, cfg = self.ctx, self.cfg
        saved_inputs = saved_inputs or {}
        init = ctx.paths.init or (Path(saved_inputs["init"]) if saved_inputs.get("init") else None)
        names = saved_inputs.get("scene_names")
        self.base_preprocess = preprocess_dict(cfg)
        if init is not None:
            model, init_names, _ = load_apr(init, "--init")
            labels = labels_for_model(ctx, names or init_names, model.num_scenes, "--init")
            if cfg.model.num_scenes is not None and cfg.model.num_scenes != model.num_scenes:
                raise TrainError(
                    f"model.num_scenes is {cfg.model.num_scenes} but the --init model {init} has {model.num_scenes}"
                )
            log.info("initialised from %s (architecture taken from the file)", init)
        else:
            labels = read_label_table(ctx.paths.labels, ctx.paths.data, names or cfg.data.scene_names)
            check_scene_count(cfg, labels.scenes, ctx.paths.labels)
            torch.manual_seed(cfg.run.seed)
            model = build_ms_transformer(MSTransformerConfig(**cfg.model.ms_config(len(labels.scenes))))
            init_backbone(model, cfg.model)
        if cfg.model.freeze:
            if init is None:
                raise TrainError(
                    "model.freeze is true (finetune) but no --init model was given; pass the stage-1 model with --init"
                )
            trainable = apply_freeze(model, cfg.model.freeze_exclude_phrase)
            log.info(
                "freeze: training %d tensors (%s)",
                len(trainable),
                ", ".join(sorted({".".join(n.split(".")[:1]) for n in trainable})),
            )
        self.scene_names = list(labels.scenes)
        self.orientation = labels.orientation  # the labels' quaternion convention, kept in the bundle
        self.labels = labels
        self.find_unused_parameters = model.config.per_scene_heads  # heads of scenes absent from a batch: no grad
        from apr_training.datasets.torch_datasets import CameraPoseDataset

        self.dataset = CameraPoseDataset(labels, ctx.paths.data, transform=train_transform(cfg),
                                         cache_in_ram=cfg.data.cache_in_ram,
                                         cache_options=image_cache(ctx, "train"))  # fmt: skip
        loss = cfg.loss
        criterion = CameraPoseLoss(loss.learnable, loss.s_x, loss.s_q, loss.norm, sign_invariant=loss.sign_invariant)
        self.model = model
        self.criterion = criterion
        self.module = MSTransformerStep(model, criterion, loss.scene_weight, cfg.model.freeze).to(ctx.device)
        self.val_loader = None
        if ctx.paths.val_labels is not None:
            val = read_label_table(ctx.paths.val_labels, ctx.paths.data, self.scene_names, "--val-labels")
            self.val_loader = make_eval_loader(
                ctx, CameraPoseDataset(val, ctx.paths.data, transform=eval_transform(cfg))
            )
        self.inputs = {"init": str(init) if init else None, "scene_names": self.scene_names,
                       "labels": str(ctx.paths.labels)}  # fmt: skip

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.cfg.data.equalize_scenes:
            return super().epoch_order(epoch)
        from apr_training.datasets.torch_datasets import SceneEqualizedSampler

        s = SceneEqualizedSampler(self.dataset.scene_ids, shuffle=True, seed=self.cfg.run.seed)
        s.set_epoch(epoch)
        return s.epoch_indices()

    def loss_parameters(self) -> list[nn.Parameter]:
        return [self.criterion.s_x, self.criterion.s_q]

    def train_mode(self) -> None:
        self.module.train()
        if self.cfg.model.freeze:
            self.model.eval()  # backbone BN statistics and transformer dropout fixed (upstream eval mode)

    def validate(self) -> dict[str, float] | None:
        if self.val_loader is None:
            return None
        return evaluate_apr(self.model, self.val_loader, self.ctx.device)

    def save(self, path: Path) -> None:
        from apr_localizer.checkpoints import save_model

        save_model(path, self.model, scene_names=self.scene_names, preprocess=self.base_preprocess,
                   provenance=provenance(self.ctx, {"init": self.inputs.get("init")}),
                   orientation=self.orientation)  # fmt: skip

    def export_official(self, out_dir: Path) -> list[Path]:
        from apr_localizer.checkpoints import save_official_checkpoint

        return [save_official_checkpoint(self.model, out_dir / "model_official.pth")]
