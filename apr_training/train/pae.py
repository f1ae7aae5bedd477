"""Pose auto-encoder training: teacher–student distillation from a trained APR (model_spec.md §6.3).

* Teacher: a trained MS-Transformer (multi-scene PAE) or PoseNet (single-scene PAE), frozen, eval mode, run with the
  scene withheld.
* Student input (``pae.student_input``): ``teacher`` (upstream) = the teacher's own estimated pose (raw quaternion)
  and its argmax scene; ``gt`` = the ground-truth pose and scene (what the paper describes; upstream issue #2 asks
  about the difference). With ``gt`` the teacher's latents are taken with the GT scene forced, so target and input
  describe the same scene slot.
* Loss = MSE(latent_rot) + MSE(latent_t) + CameraPoseLoss(teacher heads applied to the PAE latents, GT pose). As
  upstream (model_spec.md §10.11) the decoding runs under ``no_grad``, so the third term only trains s_x/s_q;
  ``pae.pose_loss_grad: true`` lets it train the PAE through the frozen heads.
* Without augmentation the teacher outputs are deterministic, so (``pae.cache_teacher``) they are computed once per
  frame and reused; once every frame is cached, epochs run without decoding any image.
* The saved bundle is the teacher APR + the PAE (MS-Transformer teacher: apr_localizer's format; PoseNet teacher:
  the PoseNet file format of :mod:`.posenet`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from apr_localizer.models import CameraPoseLoss, MSTransformer, PAEConfig, PoseAutoEncoder, build_pae

from .helpers import (
    eval_transform,
    image_cache,
    labels_for_model,
    load_apr,
    make_eval_loader,
    pose_error_stats,
    provenance,
    read_label_table,
    train_transform,
)
from .posenet import PoseNet, is_posenet_file, load_posenet, save_posenet, single_scene_labels
from .task import Context, Task, TrainError

__all__ = ["LabelsOnlyDataset", "PAEStep", "PAETask", "TeacherCache", "load_teacher", "sync_preprocess"]

log = logging.getLogger("apr_training.train")


class TeacherCache:
    """Teacher outputs per dataset index, kept on the training device (``pose``, ``scene``, latents)."""

    def __init__(self, n: int, dim: int, device: torch.device) -> None:
        self.filled = torch.zeros(n, dtype=torch.bool, device=device)
        self.pose = torch.zeros(n, 7, device=device)
        self.scene = torch.zeros(n, dtype=torch.int64, device=device)
        self.latent_t = torch.zeros(n, dim, device=device)
        self.latent_rot = torch.zeros(n, dim, device=device)

    @property
    def complete(self) -> bool:
        return bool(self.filled.all())

    def has(self, index: torch.Tensor) -> bool:
        return bool(self.filled[index].all())

    def put(self, index: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
        self.pose[index] = out["pose"].float()
        self.scene[index] = out["scene"]
        self.latent_t[index] = out["latent_t"].float()
        self.latent_rot[index] = out["latent_rot"].float()
        self.filled[index] = True

    def get(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pose": self.pose[index], "scene": self.scene[index], "latent_t": self.latent_t[index],
                "latent_rot": self.latent_rot[index]}  # fmt: skip


class LabelsOnlyDataset(Dataset):
    """``pose``, ``scene`` and ``index`` of a label table without images (used once the teacher cache is full)."""

    def __init__(self, labels) -> None:
        self.pose = torch.as_tensor(labels.pose, dtype=torch.float32)
        self.scene = torch.as_tensor(labels.scene_id, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.pose)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"pose": self.pose[i], "scene": self.scene[i], "index": int(i)}


class PAEStep(nn.Module):
    """``forward(batch) -> {"loss", "mse_t", "mse_rot", "pose_loss", "l_x", "l_q", "s_x", "s_q"}``.

    ``batch``: ``image (B,3,H,W)`` (may be absent when every index is cached), ``pose (B,7)``, ``scene (B,)``,
    ``index (B,)``.
    """

    def __init__(
        self,
        teacher: nn.Module,
        pae: PoseAutoEncoder,
        criterion: CameraPoseLoss,
        student_input: str = "teacher",
        pose_loss_grad: bool = False,
        cache: TeacherCache | None = None,
    ) -> None:
        super().__init__()
        self.teacher = teacher
        self.pae = pae
        self.criterion = criterion
        self.student_input = student_input
        self.pose_loss_grad = pose_loss_grad
        self.multi_scene = isinstance(teacher, MSTransformer)
        self.cache = cache

    @torch.no_grad()
    def teacher_outputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Teacher pose/scene/latents for the batch (from the cache when possible)."""
        index = batch.get("index")
        if self.cache is not None and index is not None and self.cache.has(index):
            return self.cache.get(index)
        if "image" not in batch:
            raise TrainError("PAE training: a batch without images for frames whose teacher outputs are not cached")
        forced = batch["scene"] if (self.student_input == "gt" and self.multi_scene) else None
        out = self.teacher(batch["image"], scene=forced)
        out = {k: out[k] for k in ("pose", "scene", "latent_t", "latent_rot")}
        if self.cache is not None and index is not None:
            self.cache.put(index, out)
        return out

    def _one_hot(self, scene: torch.Tensor) -> torch.Tensor | None:
        if not self.multi_scene:
            return None
        return F.one_hot(scene.long(), self.teacher.num_scenes).float()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t = self.teacher_outputs(batch)
        if self.student_input == "teacher":
            pose_in, scene_in = t["pose"], t["scene"]
        else:
            pose_in, scene_in = batch["pose"], batch["scene"]
        lat = self.pae(pose_in.float(), scene_in if self.multi_scene else None)
        mse_t = F.mse_loss(lat["latent_t"].float(), t["latent_t"].float())
        mse_rot = F.mse_loss(lat["latent_rot"].float(), t["latent_rot"].float())
        grad = torch.enable_grad() if self.pose_loss_grad else torch.no_grad()
        with grad:
            decoded = self.teacher.decode_pose(lat["latent_t"], lat["latent_rot"], self._one_hot(scene_in))
        pose_loss, l_x, l_q = self.criterion(decoded.float(), batch["pose"].float())
        return {
            "loss": mse_rot + mse_t + pose_loss,
            "mse_t": mse_t.detach(),
            "mse_rot": mse_rot.detach(),
            "pose_loss": pose_loss.detach(),
            "l_x": l_x.detach(),
            "l_q": l_q.detach(),
            "s_x": self.criterion.s_x.detach().reshape(()),
            "s_q": self.criterion.s_q.detach().reshape(()),
        }


def load_teacher(path: Path, what: str = "--teacher") -> tuple[nn.Module, list[str] | None, dict[str, Any] | None]:
    """Load an MS-Transformer (our bundle / official file) or a PoseNet: ``(model, scene_names, preprocess)``."""
    if is_posenet_file(path):
        b = load_posenet(path)
        return b.model, b.scene_names, b.preprocess
    model, names, bundle = load_apr(path, what)
    return model, names, (bundle.preprocess if bundle is not None else None)


def sync_preprocess(ctx: Context, preprocess: dict[str, Any] | None, what: str) -> None:
    """Use the input size a model was trained with (its stored preprocessing) for data.resize / data.crop."""
    if not preprocess:
        return
    d = ctx.config.data
    resize, crop = int(preprocess.get("resize", d.resize)), int(preprocess.get("crop", d.crop))
    if (resize, crop) != (d.resize, d.crop):
        log.info("data.resize/crop set to %d/%d, the input size of the %s model", resize, crop, what)
        d.resize, d.crop = resize, crop


def freeze(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter and switch to eval mode."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


class PAETask(Task):
    """``apr-train pae``."""

    name = "pae"
    auto_best_keys = ("val_latent_mse", "val_position_median")

    def setup(self, saved_inputs: dict[str, Any] | None = None) -> None:
        ctx, cfg = self.ctx, self.cfg
        saved_inputs = saved_inputs or {}
        teacher_path = ctx.paths.teacher or (Path(saved_inputs["teacher"]) if saved_inputs.get("teacher") else None)
        if teacher_path is None:
            raise TrainError("pae training needs --teacher: a trained MS-Transformer or PoseNet model file")
        teacher, names, preprocess = load_teacher(teacher_path)
        sync_preprocess(ctx, preprocess, "--teacher")
        multi = isinstance(teacher, MSTransformer)
        if cfg.pae.single_scene is not None and cfg.pae.single_scene == multi:
            kind = "an MS-Transformer (multi-scene PAE)" if multi else "a PoseNet (single-scene PAE)"
            raise TrainError(f"pae.single_scene is {cfg.pae.single_scene} but --teacher {teacher_path} is {kind}")
        if multi:
            labels = labels_for_model(ctx, saved_inputs.get("scene_names") or names, teacher.num_scenes, "--teacher")
            dim = teacher.config.hidden_dim
            pae_cfg = PAEConfig(multi_scene=True, encoder_dim=dim)
        else:
            labels, scene = single_scene_labels(ctx, ctx.paths.labels, (names or [None])[0])
            dim = teacher.latent_dim
            pae_cfg = PAEConfig(multi_scene=False, encoder_dim=dim, shallow_mlp=cfg.pae.shallow_mlp,
                                apply_positional_encoding=cfg.pae.apply_positional_encoding)  # fmt: skip
        self.teacher = freeze(teacher)
        self.teacher_preprocess = preprocess
        self.scene_names = list(labels.scenes)
        self.orientation = labels.orientation  # the labels' quaternion convention, kept in the bundle
        self.labels = labels
        torch.manual_seed(cfg.run.seed)
        self.pae = build_pae(pae_cfg)
        from apr_training.datasets.torch_datasets import CameraPoseDataset

        transform = train_transform(cfg)
        self.dataset = CameraPoseDataset(labels, ctx.paths.data, transform=transform,
                                         cache_in_ram=cfg.data.cache_in_ram,
                                         cache_options=image_cache(ctx, "train"))  # fmt: skip
        deterministic = cfg.data.no_augment
        cache = None
        if cfg.pae.cache_teacher:
            if deterministic:
                cache = TeacherCache(len(labels), dim, ctx.device)
            else:
                log.info("pae.cache_teacher: off, the training transform is random (data.no_augment is false)")
        self.cache = cache
        self.labels_only = LabelsOnlyDataset(labels) if cache is not None else None
        loss = cfg.loss
        self.criterion = CameraPoseLoss(
            loss.learnable, loss.s_x, loss.s_q, loss.norm, sign_invariant=loss.sign_invariant
        )
        self.module = PAEStep(self.teacher, self.pae, self.criterion, cfg.pae.student_input, cfg.pae.pose_loss_grad,
                              cache).to(ctx.device)  # fmt: skip
        self.val_loader = None
        if ctx.paths.val_labels is not None:
            if multi:
                val = read_label_table(ctx.paths.val_labels, ctx.paths.data, self.scene_names, "--val-labels")
            else:
                val, _ = single_scene_labels(ctx, ctx.paths.val_labels, self.scene_names[0], "--val-labels")
            self.val_loader = make_eval_loader(ctx, CameraPoseDataset(val, ctx.paths.data,
                                                                      transform=eval_transform(cfg)))  # fmt: skip
        self.inputs = {"teacher": str(teacher_path), "scene_names": self.scene_names}

    def epoch_dataset(self, epoch: int) -> Dataset:
        if self.cache is not None and self.cache.complete:
            return self.labels_only
        return self.dataset

    def loss_parameters(self) -> list[nn.Parameter]:
        return [self.criterion.s_x, self.criterion.s_q]

    def train_mode(self) -> None:
        self.module.train()
        self.teacher.eval()

    @torch.no_grad()
    def validate(self) -> dict[str, float] | None:
        """Upstream test: encode the teacher's estimate (argmax scene), decode with the teacher heads, vs GT."""
        if self.val_loader is None:
            return None
        self.pae.eval()
        step = self.module
        decoded, gts, mse = [], [], []
        for batch in self.val_loader:
            images = batch["image"].to(self.ctx.device)
            t = self.teacher(images)
            if self.cfg.pae.student_input == "teacher":
                pose_in, scene_in = t["pose"], t["scene"]
            else:
                pose_in, scene_in = batch["pose"].to(self.ctx.device), batch["scene"].to(self.ctx.device)
            lat = self.pae(pose_in.float(), scene_in if step.multi_scene else None)
            err_t = F.mse_loss(lat["latent_t"], t["latent_t"], reduction="none").mean(1)
            err_rot = F.mse_loss(lat["latent_rot"], t["latent_rot"], reduction="none").mean(1)
            mse.append((0.5 * (err_t + err_rot)).cpu())
            decoded.append(self.teacher.decode_pose(lat["latent_t"], lat["latent_rot"], step._one_hot(scene_in))
                           .float().cpu())  # fmt: skip
            gts.append(batch["pose"].float())
        self.pae.train()
        stats = pose_error_stats(torch.cat(decoded).double().numpy(), torch.cat(gts).double().numpy())
        stats["val_latent_mse"] = float(torch.cat(mse).mean())
        stats["val_loss"] = stats["val_latent_mse"]
        return stats

    def save(self, path: Path) -> None:
        prov = provenance(self.ctx, {"teacher": self.inputs.get("teacher")})
        preprocess = self.teacher_preprocess
        if isinstance(self.teacher, PoseNet):
            save_posenet(path, self.teacher, self.pae, self.scene_names, preprocess, prov)
            return
        from apr_localizer.checkpoints import save_model

        from .helpers import preprocess_dict

        save_model(path, self.teacher, pae=self.pae, scene_names=self.scene_names,
                   preprocess=preprocess or preprocess_dict(self.cfg), provenance=prov,
                   orientation=self.orientation)  # fmt: skip

    def export_official(self, out_dir: Path) -> list[Path]:
        from apr_localizer.checkpoints import save_official_checkpoint

        return [save_official_checkpoint(self.pae, out_dir / "pae_official.pth")]
