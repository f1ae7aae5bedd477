"""iAPR (VTRPR) training on image pairs (model_spec.md §7.4).

* Data: a pairs CSV (``--pairs``) or, without one, pairs generated from ``--labels`` and saved as
  ``<out>/pairs.csv``: with ``data.pair_mode: neighbours`` (spec-like) by
  :func:`apr_training.datasets.pairs.generate_pairs` (camera distance / rotation-angle thresholds from ``data.pair_*``);
  with ``data.pair_mode: apr_errors`` (robot recipe) by :func:`~apr_training.datasets.pairs.error_matched_pairs`:
  the ``--teacher`` APR is run on the validation frames (``--val-labels``; the training frames when there are none),
  and every training frame gets neighbour poses = its GT perturbed by the APR's error vectors drawn from that set
  (scaled by ±U(0, ``data.pair_error_scale``)), so the regressor learns the corrections the deployed loop asks of
  it; those pairs are never swapped; the measured errors are written to ``<out>/apr_errors.json``.
  Other pairs are swapped with probability ``data.swap_prob``; image 1 is the query, pose 2 the neighbour (unit
  quaternion), scene 2 the forced scene.
* Forward: ``iapr(image 1, scene 2 forced, pose 2) → rel(1→2)``; loss = CameraPoseLoss (learned, s_x 0 / s_q −3
  by default) against the GT relative pose; no scene term.
* Initialisation: the iAPR's MS-Transformer from ``--teacher`` (a trained MS-Transformer), its PAE from ``--pae``.
* ``iapr.freeze_encoder: false`` (upstream): the whole iAPR trains, including its own copy of the MS-Transformer;
  the bundle then holds the standalone APR (the teacher) and the iAPR with its own encoder.
  ``iapr.freeze_encoder: true``: the teacher's MS-Transformer is frozen (eval mode) and *shared*: the bundle stores
  it once and the runtime computes the image latents once for both APR and iAPR. Needs ``--teacher``.
* The saved bundle (apr_localizer's format) = APR + iAPR (+ the ``--pae`` PAE as the standalone PAE).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from apr_localizer.models import (
    IAPR,
    CameraPoseLoss,
    IAPRConfig,
    MSTransformerConfig,
    PAEConfig,
    PoseAutoEncoder,
    build_iapr,
)

from .helpers import (
    check_scene_count,
    eval_transform,
    evaluate_apr,
    image_cache,
    labels_for_model,
    load_apr,
    make_eval_loader,
    preprocess_dict,
    provenance,
    read_label_table,
    train_transform,
)
from .pae import freeze, sync_preprocess
from .task import Task, TrainError

__all__ = ["IAPRStep", "IAPRTask", "load_pae"]

log = logging.getLogger("apr_training.train")


class IAPRStep(nn.Module):
    """``forward(batch) -> {"loss", "l_x", "l_q", "s_x", "s_q"}``.

    ``batch``: ``image (B,3,H,W)`` (query), ``pose (B,7)`` (neighbour), ``scene (B,)``, ``rel_pose (B,7)``
    (rel(query→neighbour)). With ``freeze_encoder`` the image latents are computed under ``no_grad``.
    """

    def __init__(self, iapr: IAPR, criterion: CameraPoseLoss, freeze_encoder: bool = False) -> None:
        super().__init__()
        self.iapr = iapr
        self.criterion = criterion
        self.freeze_encoder = freeze_encoder

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, scene, neighbour = batch["image"], batch["scene"], batch["pose"]
        if self.freeze_encoder:
            with torch.no_grad():
                lat_t, lat_rot = self.iapr.query_latents(images, scene)
            rel = self.iapr.rel_from_latents(lat_t, lat_rot, neighbour.float(), scene)
        else:
            rel = self.iapr(images, scene, neighbour.float())["rel_pose"]
        loss, l_x, l_q = self.criterion(rel.float(), batch["rel_pose"].float())
        return {
            "loss": loss,
            "l_x": l_x.detach(),
            "l_q": l_q.detach(),
            "s_x": self.criterion.s_x.detach().reshape(()),
            "s_q": self.criterion.s_q.detach().reshape(()),
        }


def load_pae(path: Path, what: str = "--pae") -> tuple[PoseAutoEncoder, list[str] | None]:
    """Load a PAE from our bundle (its ``pae`` component) or an official ``.pth``: ``(pae, scene_names)``."""
    from apr_localizer.checkpoints import CheckpointError, load_model, load_official_checkpoint

    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{what} {path} does not exist")
    if path.suffix == ".safetensors":
        bundle = load_model(path)
        if bundle.pae is None:
            raise CheckpointError(
                f"{what} {path}: the model file holds no pose auto-encoder (train one with apr-train pae)"
            )
        return bundle.pae, list(bundle.scene_names)
    model = load_official_checkpoint(path)
    if isinstance(model, IAPR):
        return model.pae, None
    if not isinstance(model, PoseAutoEncoder):
        raise CheckpointError(f"{what} {path}: expected a pose auto-encoder checkpoint, found a {type(model).__name__}")
    return model, None


#: Parts of the iAPR's own MS-Transformer that the relative-pose loss never reaches: the query latents are taken
#: with the scene forced, so the scene classifier and the absolute pose heads get no gradient.
UNUSED_APR_PARTS = ("scene_embed", "regressor_head_t", "regressor_head_rot")


def _freeze_unused_apr_parts(iapr: IAPR) -> list[str]:
    """Freeze :data:`UNUSED_APR_PARTS` (no gradient reaches them; DDP needs every trainable parameter used)."""
    frozen = []
    for name, p in iapr.mstransformer.named_parameters():
        if name.split(".")[0] in UNUSED_APR_PARTS:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


class IAPRTask(Task):
    """``apr-train iapr``."""

    name = "iapr"
    auto_best_keys = ("val_position_median", "val_loss")

    def setup(self, saved_inputs: dict[str, Any] | None = None) -> None:
        ctx, cfg = self.ctx, self.cfg
        saved_inputs = saved_inputs or {}

        def given(name: str) -> Path | None:
            p = getattr(ctx.paths, name)
            return p if p is not None else (Path(saved_inputs[name]) if saved_inputs.get(name) else None)

        teacher_path, pae_path, pairs_path = given("teacher"), given("pae"), given("pairs")
        names = saved_inputs.get("scene_names")
        teacher, bundle = None, None
        if teacher_path is not None:
            teacher, t_names, bundle = load_apr(teacher_path)
            sync_preprocess(ctx, bundle.preprocess if bundle is not None else None, "--teacher")
            labels = labels_for_model(ctx, names or t_names, teacher.num_scenes, "--teacher")
        else:
            labels = read_label_table(ctx.paths.labels, ctx.paths.data, names or cfg.data.scene_names)
            check_scene_count(cfg, labels.scenes, ctx.paths.labels)
        self.scene_names = list(labels.scenes)
        self.orientation = labels.orientation  # the labels' quaternion convention, kept in the bundle
        pae, pae_names = (None, None)
        if pae_path is not None:
            pae, pae_names = load_pae(pae_path)
            if not pae.config.multi_scene:
                raise TrainError(f"--pae {pae_path} is a single-scene PAE; iAPR needs a multi-scene PAE")
            if pae_names and pae_names != self.scene_names:
                raise TrainError(f"--pae {pae_path} was trained on scenes {pae_names}, the data has {self.scene_names}")
        ic = cfg.iapr
        if ic.freeze_encoder and teacher is None:
            raise TrainError("iapr.freeze_encoder is true but no --teacher was given; a frozen encoder must be trained")
        torch.manual_seed(cfg.run.seed)
        ms_cfg = (
            teacher.config if teacher is not None else MSTransformerConfig(**cfg.model.ms_config(len(labels.scenes)))
        )
        pae_cfg = pae.config if pae is not None else PAEConfig(multi_scene=True, encoder_dim=ms_cfg.hidden_dim)
        iapr_cfg = IAPRConfig(ms_transformer=ms_cfg, pae=pae_cfg, rpr_num_heads=ic.rpr_num_heads,
                              rpr_dim_feedforward=ic.rpr_dim_feedforward, rpr_dropout=ic.rpr_dropout,
                              rpr_num_encoder_layers=ic.rpr_num_encoder_layers,
                              num_iterations=ic.num_iterations)  # fmt: skip
        if ic.freeze_encoder:
            apr = freeze(teacher)
            iapr = build_iapr(iapr_cfg, mstransformer=apr)
        else:
            iapr = build_iapr(iapr_cfg)
            if teacher is not None:
                iapr.mstransformer.load_state_dict(teacher.state_dict())
                apr = freeze(teacher)
            else:
                apr = iapr.mstransformer
                log.warning(
                    "no --teacher: the bundle's APR is the iAPR's own MS-Transformer, whose scene classifier and pose "
                    "heads iAPR training does not train; pass --teacher for a usable initial estimate"
                )
        if not ic.freeze_encoder:
            _freeze_unused_apr_parts(iapr)
        if pae is not None:
            iapr.pae.load_state_dict(pae.state_dict())
        if not ic.train_pae:
            for p in iapr.pae.parameters():
                p.requires_grad_(False)
        self.apr, self.iapr, self.standalone_pae = apr, iapr, pae
        self.inputs_teacher = teacher_path is not None
        self.pairs = self._pairs(labels, pairs_path)
        from apr_training.datasets.torch_datasets import CameraPoseDataset, RelPoseDataset

        swap = 0.0 if cfg.data.pair_mode == "apr_errors" else cfg.data.swap_prob
        self.dataset = RelPoseDataset(self.pairs, ctx.paths.data, transform=train_transform(cfg),
                                      swap_prob=swap, cache_in_ram=cfg.data.cache_in_ram,
                                      cache_options=image_cache(ctx, "pairs"))  # fmt: skip
        loss = cfg.loss
        self.criterion = CameraPoseLoss(
            loss.learnable, loss.s_x, loss.s_q, loss.norm, sign_invariant=loss.sign_invariant
        )
        self.module = IAPRStep(iapr, self.criterion, ic.freeze_encoder).to(ctx.device)
        if apr is not iapr.mstransformer:
            apr.to(ctx.device)
        self.val_loader = None
        if ctx.paths.val_labels is not None:
            val = read_label_table(ctx.paths.val_labels, ctx.paths.data, self.scene_names, "--val-labels")
            self.val_loader = make_eval_loader(ctx, CameraPoseDataset(val, ctx.paths.data,
                                                                      transform=eval_transform(cfg)))  # fmt: skip
        self.preprocess = bundle.preprocess if bundle is not None else preprocess_dict(cfg)
        self.inputs = {
            "teacher": str(teacher_path) if teacher_path else None,
            "pae": str(pae_path) if pae_path else None,
            "pairs": str(self.pairs_path),
            "scene_names": self.scene_names,
        }

    def _pairs(self, labels, pairs_path: Path | None):
        from apr_training.datasets.pairs import generate_pairs, read_pairs, write_pairs

        ctx, d = self.ctx, self.cfg.data
        if pairs_path is not None:
            pairs = read_pairs(pairs_path, dataset_root=ctx.paths.data or labels.root, scene_names=self.scene_names)
            self.pairs_path = pairs_path
        elif d.pair_mode == "apr_errors":
            pairs = self._error_matched_pairs(labels)
            self.pairs_path = ctx.out / "pairs.csv"
            if ctx.dist.is_main:
                write_pairs(self.pairs_path, pairs)
        else:
            pairs = generate_pairs(labels, max_distance_m=d.pair_max_distance_m, max_angle_deg=d.pair_max_angle_deg,
                                   min_distance_m=d.pair_min_distance_m, pairs_per_frame=d.pairs_per_frame,
                                   seed=self.cfg.run.seed, split=None)  # fmt: skip
            self.pairs_path = ctx.out / "pairs.csv"
            if ctx.dist.is_main:
                ctx.out.mkdir(parents=True, exist_ok=True)
                write_pairs(self.pairs_path, pairs)
            log.info("generated %d pairs from %s (saved as %s)", len(pairs), ctx.paths.labels, self.pairs_path)
        if len(pairs) == 0:
            raise TrainError(
                f"no training pairs: {pairs_path or 'pair generation'} gave 0 pairs (data.pair_max_distance_m "
                f"{d.pair_max_distance_m}, data.pair_max_angle_deg {d.pair_max_angle_deg}); relax the thresholds"
            )
        return pairs

    def _error_matched_pairs(self, labels):
        """Measure the teacher APR's errors (validation frames, else training frames) and draw pairs from them."""
        import json

        import numpy as np

        from apr_localizer.fileio import atomic_write_text
        from apr_localizer.geometry import pose_errors
        from apr_training.datasets.pairs import apr_error_vectors, error_matched_pairs
        from apr_training.datasets.torch_datasets import CameraPoseDataset

        ctx, d = self.ctx, self.cfg.data
        if not self.inputs_teacher:
            raise TrainError("data.pair_mode apr_errors needs --teacher: the trained APR whose errors the pairs match")
        source = ctx.paths.val_labels
        if source is not None:
            table = read_label_table(source, ctx.paths.data, self.scene_names, "--val-labels")
        else:
            log.warning("data.pair_mode apr_errors without --val-labels: measuring the APR on its training frames "
                        "(optimistic errors); hold out sequences for validation instead")  # fmt: skip
            table, source = labels, ctx.paths.labels
        loader = make_eval_loader(ctx, CameraPoseDataset(table, ctx.paths.data, transform=eval_transform(self.cfg)))
        self.apr.to(ctx.device).eval()
        ests = []
        with torch.no_grad():
            for batch in loader:
                ests.append(self.apr(batch["image"].to(ctx.device))["pose"].float().cpu())
        est = torch.cat(ests).double().numpy()
        e_t, e_r = pose_errors(est, table.unit_poses())
        summary = {"source": str(source), "frames": len(e_t), "scale": d.pair_error_scale,
                   "position_m": {q: float(np.percentile(e_t, q)) for q in (25, 50, 75, 90)},
                   "orientation_deg": {q: float(np.percentile(e_r, q)) for q in (25, 50, 75, 90)}}  # fmt: skip
        log.info("APR errors on %s: median %.2f m / %.1f deg (pairs drawn up to %.1fx)", source,
                 summary["position_m"][50], summary["orientation_deg"][50], d.pair_error_scale)  # fmt: skip
        if ctx.dist.is_main:
            ctx.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(ctx.out / "apr_errors.json", json.dumps(summary, indent=2) + "\n")
        offsets, rotvecs = apr_error_vectors(est, table.unit_poses())
        return error_matched_pairs(labels, offsets, rotvecs, d.pairs_per_frame, d.pair_error_scale, self.cfg.run.seed)

    def loss_parameters(self) -> list[nn.Parameter]:
        return [self.criterion.s_x, self.criterion.s_q]

    def train_mode(self) -> None:
        self.module.train()
        if self.cfg.iapr.freeze_encoder:
            self.iapr.mstransformer.eval()
        if self.apr is not self.iapr.mstransformer:
            self.apr.eval()

    def validate(self) -> dict[str, float] | None:
        if self.val_loader is None:
            return None
        stats = evaluate_apr(self.apr, self.val_loader, self.ctx.device, iapr=self.iapr)
        self.train_mode()
        return stats

    def save(self, path: Path) -> None:
        from apr_localizer.checkpoints import save_model

        prov = provenance(self.ctx, {k: self.inputs.get(k) for k in ("teacher", "pae", "pairs")})
        save_model(path, self.apr, iapr=self.iapr, pae=self.standalone_pae, scene_names=self.scene_names,
                   preprocess=self.preprocess, provenance=prov, orientation=self.orientation)  # fmt: skip

    def export_official(self, out_dir: Path) -> list[Path]:
        from apr_localizer.checkpoints import save_official_checkpoint

        return [save_official_checkpoint(self.iapr, out_dir / "iapr_official.pth")]
