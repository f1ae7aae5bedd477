"""Data and model helpers shared by the trainers: transforms, label reading, model loading, validation metrics."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .config import ModelConfig, TrainConfig
from .task import Context, TrainError

log = logging.getLogger("apr_training.train")

__all__ = [
    "check_scene_count",
    "eval_transform",
    "evaluate_apr",
    "image_cache",
    "init_backbone",
    "labels_for_model",
    "load_apr",
    "load_backbone_weights",
    "make_eval_loader",
    "pose_error_stats",
    "preprocess_dict",
    "provenance",
    "read_label_table",
    "train_transform",
    "write_val_split",
]


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


FROM_SCRATCH_WARNING = (
    "training the EfficientNet-B0 backbone FROM RANDOM WEIGHTS: the papers start from ImageNet weights and a run from "
    "scratch will not reach their accuracy; pass --backbone-weights imagenet (or a torchvision weight file)"
)


def init_backbone(model: nn.Module, mcfg: ModelConfig) -> int:
    """Load ``model.backbone_weights`` into an MS-Transformer's backbone (0 and a loud warning when there are none).

    The backbone variant was chosen by :meth:`ModelConfig.backbone_variant`; an explicit ``official_backbone: true``
    with torchvision weights is allowed but warned about (other padding and BatchNorm eps than the weights expect).
    """
    from apr_localizer.models.backbone import BackboneWeightsError, backbone_state_dict, load_backbone_state_dict

    source = mcfg.backbone_weights
    if not source:
        log.warning(FROM_SCRATCH_WARNING)
        return 0
    if model.backbone.official:
        log.warning(
            "model.official_backbone is true but model.backbone_weights %s are torchvision weights (symmetric "
            "padding, BN eps 1e-5); set model.official_backbone to null to use the matching variant",
            source,
        )
    try:
        n = load_backbone_state_dict(model.backbone, backbone_state_dict(source), str(source))
    except BackboneWeightsError as e:
        raise TrainError(f"model.backbone_weights: {e}") from None
    log.info("backbone initialised from %s (%d tensors, %s variant)", source, n, mcfg.backbone_variant())
    return n


def image_cache(ctx: Context, name: str):
    """:class:`~apr_training.datasets.torch_datasets.ImageCacheOptions` of the ``"resized"`` cache (else None)."""
    from apr_training.datasets.torch_datasets import ImageCacheOptions

    d = ctx.config.data
    if d.cache_in_ram != "resized":
        return None
    folder = Path(d.cache_dir) if d.cache_dir else ctx.out
    return ImageCacheOptions(d.resize, folder / f"image_cache_{name}_{d.resize}.npy", int(d.cache_max_gib * 2**30))


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
    d = cfg.data
    return build_train_transform(pc, no_augment=na, jitter=d.color_jitter, brightness=d.jitter_brightness,
                                 contrast=d.jitter_contrast, saturation=d.jitter_saturation, hue=d.jitter_hue,
                                 crop_scale_min=d.crop_scale_min)  # fmt: skip


def read_label_table(path: Path | None, root: Path | None, scene_names: list[str] | None, what: str = "--labels"):
    """Read a label CSV (errors name the file and row); ``scene_names`` maps names to the model's ids."""
    from apr_training.datasets.labels import read_labels

    if path is None:
        raise TrainError(f"{what} is required: a label CSV (scene,split,seq,img_path,t1,t2,t3,q1,q2,q3,q4)")
    table = read_labels(path, dataset_root=root, scene_names=scene_names)
    if len(table) == 0:
        raise TrainError(f"{what} {path} has no rows; expected at least one labelled image")
    if what == "--val-labels" and "test" in table.split:
        raise TrainError(
            f"--val-labels {path} holds rows of the test split; model selection must never see the test set "
            "(validate on held-out training frames, or drop --val-labels and use the final epoch as the papers do)"
        )
    return table


def write_val_split(labels: Path, data: Path | None, out: Path, cfg: TrainConfig) -> tuple[Path, Path, Path]:
    """Split ``labels`` by sequence (``data.val_sequences`` / ``data.val_fraction``) into ``out/split_{train,val}.csv``.

    Returns ``(train CSV, validation CSV, dataset root)``; the root is ``data`` or the label CSV's folder, so the
    relative image paths stay valid. The split is deterministic (``run.seed``), so a resume writes the same files.
    """
    from apr_training.datasets.labels import read_labels, split_by_sequence, write_labels

    table = read_labels(labels, dataset_root=data)
    train, val = split_by_sequence(table, cfg.data.val_sequences, cfg.data.val_fraction, cfg.run.seed)
    for t in (train, val):
        t.split = ["train"] * len(t)  # both are training-split frames; the val CSV must not look like a test set
    out.mkdir(parents=True, exist_ok=True)
    train_csv, val_csv = out / "split_train.csv", out / "split_val.csv"
    write_labels(train_csv, train)
    write_labels(val_csv, val)
    held = sorted({f"{a}/{b}" for a, b in zip(val.scene, val.seq)})
    log.info("validation split: %d frames of %s held out (%d frames train)", len(val), ", ".join(held), len(train))
    return train_csv, val_csv, (Path(data) if data is not None else Path(labels).resolve().parent)


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
