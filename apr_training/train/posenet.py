"""Single-scene PoseNet baseline (training-only model) and its trainer.

``PoseNet``: a torchvision backbone (``efficientnet_b0`` | ``mobilenet_v3_large`` | ``resnet50``, random weights;
``model.backbone_weights`` loads a torchvision state_dict) → global average pooling → ``FC(C → 1024)``, ReLU,
dropout 0.1 → ``FC 3`` (position) and ``FC 4`` (raw w-first quaternion). The 1024-d activation is the latent a
single-scene pose auto-encoder learns to reproduce (used for both the position and the orientation latent).

Files: one ``.safetensors`` with the PoseNet (``posenet.*``), optionally its single-scene PAE (``pae.*``), and JSON
metadata under the key ``apr_training_posenet`` (architecture, scene name, preprocessing, provenance).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from apr_localizer.models import CameraPoseLoss, PAEConfig, PoseAutoEncoder

from .helpers import (
    eval_transform,
    image_cache,
    load_backbone_weights,
    make_eval_loader,
    pose_error_stats,
    preprocess_dict,
    provenance,
    read_label_table,
    train_transform,
)
from .task import Context, Task, TrainError

__all__ = [
    "POSENET_BACKBONES",
    "PoseNet",
    "PoseNetBundle",
    "PoseNetStep",
    "PoseNetTask",
    "is_posenet_file",
    "load_posenet",
    "save_posenet",
]

log = logging.getLogger("apr_training.train")

METADATA_KEY = "apr_training_posenet"
FORMAT_VERSION = 1
POSENET_BACKBONES = ("efficientnet_b0", "mobilenet_v3_large", "resnet50")


def _backbone(name: str) -> tuple[nn.Module, int]:
    """Build a torchvision classifier without its last layer: ``(B,3,H,W) -> (B,C)`` pooled features."""
    from torchvision import models

    if name == "efficientnet_b0":
        net = models.efficientnet_b0(weights=None)
        net.classifier = nn.Identity()
        return net, 1280
    if name == "mobilenet_v3_large":
        net = models.mobilenet_v3_large(weights=None)
        net.classifier = nn.Identity()
        return net, 960
    if name == "resnet50":
        net = models.resnet50(weights=None)
        net.fc = nn.Identity()
        return net, 2048
    raise ValueError(f"PoseNet backbone {name!r} is not supported; expected one of {', '.join(POSENET_BACKBONES)}")


class PoseNet(nn.Module):
    """PoseNet: ``forward(images (B,3,H,W)) -> {"pose" (B,7), "latent_t" (B,D), "latent_rot" (B,D), "scene" (B,)}``.

    ``latent_t`` and ``latent_rot`` are the same ``D = hidden_dim`` activation (after ReLU and dropout); the pose is
    ``[fc_t(latent_t), fc_q(latent_rot)]`` with a raw (unnormalised) quaternion. ``scene`` is all zeros (one scene).
    """

    def __init__(self, backbone: str = "efficientnet_b0", hidden_dim: int = 1024, dropout: float = 0.1) -> None:
        super().__init__()
        self.config = {"backbone": backbone, "hidden_dim": int(hidden_dim), "dropout": float(dropout)}
        self.backbone, feat = _backbone(backbone)
        self.fc_h = nn.Linear(feat, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc_t = nn.Linear(hidden_dim, 3)
        self.fc_q = nn.Linear(hidden_dim, 4)
        for m in (self.fc_h, self.fc_t, self.fc_q):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def latent_dim(self) -> int:
        return self.fc_h.out_features

    @property
    def num_scenes(self) -> int:
        return 1

    def decode_pose(self, latent_t: torch.Tensor, latent_rot: torch.Tensor, one_hot: torch.Tensor | None = None):
        """Heads: latents ``(B,D)`` → raw pose ``(B,7)``."""
        return torch.cat([self.fc_t(latent_t), self.fc_q(latent_rot)], dim=-1)

    def forward(self, images: torch.Tensor, scene: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h = self.dropout(F.relu(self.fc_h(self.backbone(images))))
        return {
            "pose": self.decode_pose(h, h),
            "latent_t": h,
            "latent_rot": h,
            "scene": torch.zeros(images.shape[0], dtype=torch.int64, device=images.device),
        }


@dataclass
class PoseNetBundle:
    """A loaded PoseNet file: the model (eval mode), its optional single-scene PAE, scene, preprocessing."""

    model: PoseNet
    pae: PoseAutoEncoder | None = None
    scene_names: list[str] = field(default_factory=list)
    preprocess: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)


def save_posenet(
    path: str | Path,
    model: PoseNet,
    pae: PoseAutoEncoder | None = None,
    scene_names: list[str] | None = None,
    preprocess: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write a PoseNet (+ PAE) as one safetensors file with JSON metadata."""
    from safetensors.torch import save_file

    from apr_localizer.checkpoints import DEFAULT_PREPROCESS

    tensors = {f"posenet.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": "posenet",
        "config": dict(model.config),
        "pae": None,
        "scene_names": list(scene_names or ["scene_0"]),
        "preprocess": dict(preprocess or DEFAULT_PREPROCESS),
        "pose_convention": "[x, y, z, qw, qx, qy, qz], camera-to-map, quaternion raw (normalise before use)",
        "provenance": dict(provenance or {}),
    }
    if pae is not None:
        tensors.update({f"pae.{k}": v.detach().cpu().contiguous().clone() for k, v in pae.state_dict().items()})
        meta["pae"] = pae.config.to_dict()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta, default=str)})
    return path


def _read_meta(path: Path) -> dict[str, Any] | None:
    from apr_localizer.checkpoints import CheckpointError, read_json_metadata

    try:
        return read_json_metadata(path, METADATA_KEY, "PoseNet")
    except CheckpointError:
        return None


def is_posenet_file(path: str | Path) -> bool:
    """Whether ``path`` is a PoseNet file written by :func:`save_posenet`."""
    path = Path(path)
    return path.suffix == ".safetensors" and path.is_file() and _read_meta(path) is not None


def load_posenet(path: str | Path) -> PoseNetBundle:
    """Load a file written by :func:`save_posenet` (models in eval mode)."""
    from safetensors.torch import load_file

    from apr_localizer.checkpoints import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such PoseNet file")
    meta = _read_meta(path)
    if meta is None:
        raise CheckpointError(f"{path}: not a PoseNet file (no {METADATA_KEY} metadata)")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: PoseNet file version {meta.get('format_version')} is newer than supported")
    tensors = load_file(str(path))
    model = PoseNet(**meta["config"])
    try:
        model.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("posenet.")}, strict=True)
        pae = None
        if meta.get("pae"):
            pae = PoseAutoEncoder(PAEConfig.from_dict(meta["pae"]))
            pae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("pae.")}, strict=True)
            pae.eval()
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: tensors do not match the stored architecture ({str(e)[:160]})") from None
    return PoseNetBundle(model.eval(), pae, list(meta.get("scene_names") or []), dict(meta.get("preprocess") or {}),
                         dict(meta.get("provenance") or {}))  # fmt: skip


class PoseNetStep(nn.Module):
    """``forward(batch) -> {"loss", "l_x", "l_q", "s_x", "s_q"}`` for ``image (B,3,H,W)``, ``pose (B,7)``."""

    def __init__(self, model: PoseNet, criterion: CameraPoseLoss) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        est = self.model(batch["image"])["pose"]
        loss, l_x, l_q = self.criterion(est.float(), batch["pose"].float())
        return {
            "loss": loss,
            "l_x": l_x.detach(),
            "l_q": l_q.detach(),
            "s_x": self.criterion.s_x.detach().reshape(()),
            "s_q": self.criterion.s_q.detach().reshape(()),
        }


def single_scene_labels(ctx: Context, path: Path | None, scene: str | None, what: str = "--labels"):
    """Rows of one scene of a label CSV: ``(table with scene id 0, scene name)``."""
    table = read_label_table(path, ctx.paths.data, None, what)
    if scene is None:
        if len(table.scenes) != 1:
            raise TrainError(
                f"{path} has {len(table.scenes)} scenes {table.scenes} but PoseNet is single-scene; "
                "set data.scene (e.g. --set data.scene=" + table.scenes[0] + ")"
            )
        scene = table.scenes[0]
    rows = table.where(scene=scene)
    if len(rows) == 0:
        raise TrainError(f"{path} has no rows of scene {scene!r}; its scenes are {table.scenes}")
    rows.scene_id = np.zeros(len(rows), dtype=np.int64)
    rows.scenes = [scene]
    return rows, scene


@torch.no_grad()
def evaluate_pose_model(model: nn.Module, loader, device: torch.device) -> dict[str, float]:
    """Median/mean errors of ``model(images)["pose"]`` on a loader."""
    was = model.training
    model.eval()
    ests, gts = [], []
    for batch in loader:
        ests.append(model(batch["image"].to(device))["pose"].float().cpu())
        gts.append(batch["pose"].float())
    model.train(was)
    return pose_error_stats(torch.cat(ests).double().numpy(), torch.cat(gts).double().numpy())


class PoseNetTask(Task):
    """``apr-train posenet``."""

    name = "posenet"

    def setup(self, saved_inputs: dict[str, Any] | None = None) -> None:
        ctx, cfg = self.ctx, self.cfg
        saved_inputs = saved_inputs or {}
        scene = cfg.data.scene or (saved_inputs.get("scene_names") or [None])[0]
        labels, scene = single_scene_labels(ctx, ctx.paths.labels, scene)
        init = ctx.paths.init or (Path(saved_inputs["init"]) if saved_inputs.get("init") else None)
        torch.manual_seed(cfg.run.seed)
        if init is not None:
            model = load_posenet(init).model
        else:
            p = cfg.posenet
            model = PoseNet(p.backbone, p.hidden_dim, p.dropout)
            if cfg.model.backbone_weights:
                n = load_backbone_weights(model.backbone, cfg.model.backbone_weights, p.backbone)
                log.info("backbone initialised from %s (%d tensors)", cfg.model.backbone_weights, n)
        from apr_training.datasets.torch_datasets import CameraPoseDataset

        self.scene_names = [scene]
        self.dataset = CameraPoseDataset(labels, ctx.paths.data, transform=train_transform(cfg),
                                         cache_in_ram=cfg.data.cache_in_ram,
                                         cache_options=image_cache(ctx, "train"))  # fmt: skip
        loss = cfg.loss
        self.criterion = CameraPoseLoss(
            loss.learnable, loss.s_x, loss.s_q, loss.norm, sign_invariant=loss.sign_invariant
        )
        self.model = model
        self.module = PoseNetStep(model, self.criterion).to(ctx.device)
        self.val_loader = None
        if ctx.paths.val_labels is not None:
            val, _ = single_scene_labels(ctx, ctx.paths.val_labels, scene, "--val-labels")
            self.val_loader = make_eval_loader(ctx, CameraPoseDataset(val, ctx.paths.data,
                                                                      transform=eval_transform(cfg)))  # fmt: skip
        self.inputs = {"init": str(init) if init else None, "scene_names": self.scene_names}

    def loss_parameters(self) -> list[nn.Parameter]:
        return [self.criterion.s_x, self.criterion.s_q]

    def validate(self) -> dict[str, float] | None:
        return None if self.val_loader is None else evaluate_pose_model(self.model, self.val_loader, self.ctx.device)

    def save(self, path: Path) -> None:
        save_posenet(path, self.model, None, self.scene_names, preprocess_dict(self.cfg), provenance(self.ctx))
