"""Typed training configuration: YAML/JSON files → dataclasses, the official JSON configs, ``--set`` overrides.

A training config has sections (model_spec.md §3 names the official keys)::

    data:   batch size, workers, augmentation, input size, scene order, iAPR pair generation
    model:  MS-Transformer architecture, freeze/finetune, optional backbone initialisation
    loss:   CameraPoseLoss weights, scene NLL weight, weight decay on the learned weights
    optim:  Adam + StepLR, epochs, gradient clipping
    run:    logging/checkpoint frequency, seeds, determinism, AMP, device, best-model metric
    pae / iapr / posenet / decoder: trainer-specific settings
    per_trainer: {<trainer>: {<section>: {...}}}  overrides applied only for that trainer

A config file is layered on the trainer's default config (:func:`default_config_name`), so it may be partial.
Unknown sections or keys raise :class:`ConfigError` naming the key and the file. The official JSON configs (flat, as
``7scenes_iapr_config.json``, or with a ``"general"`` block plus model blocks such as ``"ems-transposenet"``) are
accepted: their keys are mapped with :data:`OFFICIAL_KEYS`; keys the original code never reads are listed in
:data:`IGNORED_OFFICIAL_KEYS` and skipped with a note.
"""

from __future__ import annotations

import copy
import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = [
    "IGNORED_OFFICIAL_KEYS",
    "OFFICIAL_KEYS",
    "TRAINERS",
    "ConfigError",
    "DataConfig",
    "DecoderConfig",
    "IAPRTrainConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "PAETrainConfig",
    "PoseNetConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "default_config_name",
    "load_config",
    "resolve_config_path",
]

TRAINERS = ("ms-transformer", "pae", "iapr", "posenet", "decoder")
_DEFAULT_CONFIGS = {
    "ms-transformer": "7scenes_ms_transformer.yaml",
    "pae": "7scenes_pae.yaml",
    "iapr": "7scenes_iapr.yaml",
    "posenet": "posenet.yaml",
    "decoder": "decoder.yaml",
}


class ConfigError(ValueError):
    """A training config file or override is invalid (the message names the file and the key)."""


# --------------------------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    """Data loading and augmentation."""

    batch_size: int = 8
    workers: int = 4
    equalize_scenes: bool = False  # Cambridge: every scene sampled max_scene_count times per epoch
    no_augment: bool = False  # test transform for training (Cambridge stage 1, PAE)
    color_jitter: bool = True  # ColorJitter of the train transform (strengths below; spec: 0.5, 0.5, 0.5, 0.2)
    jitter_brightness: float = 0.5
    jitter_contrast: float = 0.5
    jitter_saturation: float = 0.5
    jitter_hue: float = 0.2  # fraction of the hue circle (0.2 = ±72°); robot recipe: small, rooms differ by colour
    crop_scale_min: float = 1.0  # < 1: RandomResizedCrop area scale in [crop_scale_min, 1] (spec: plain RandomCrop)
    resize: int = 256  # shorter image side before cropping
    crop: int = 224  # square model input
    cache_in_ram: bool | str = False  # False | "encoded" | "decoded" | "resized" (see datasets.ImageStore)
    cache_max_gib: float = 16.0  # "resized": size bound of the memory-mapped training-resolution cache
    cache_dir: str | None = None  # "resized": where the cache file lives (default: the run's --out)
    persistent_workers: bool = False  # False: workers restart every epoch with a per-epoch seed (reproducible)
    drop_last: bool = False
    scene_names: list[str] | None = None  # model scene order; default: sorted scene names of the label CSV
    scene: str | None = None  # posenet: the one scene to train on when the CSV has several
    swap_prob: float = 0.5  # iapr: probability of swapping a pair
    pair_max_distance_m: float = 1.0  # iapr: generated pairs (when no --pairs)
    pair_max_angle_deg: float = 30.0
    pair_min_distance_m: float = 0.0
    pairs_per_frame: int = 5
    pair_mode: str = "neighbours"  # neighbours (spec) | apr_errors (GT perturbed by the APR's validation errors)
    pair_error_scale: float = 1.5  # apr_errors: errors drawn from the APR's, times U(0, pair_error_scale)
    val_sequences: list[str] | None = None  # hold out these `seq` values (or scene/seq) of --labels for validation
    val_fraction: float = 0.0  # > 0: hold out about this fraction of each scene's sequences (whole sequences)


@dataclass
class ModelConfig:
    """MS-Transformer architecture (see :class:`apr_localizer.models.MSTransformerConfig`) and freezing."""

    num_scenes: int | None = None  # None: from the data; a number must match the data
    hidden_dim: int = 256
    nheads: int = 8
    dim_feedforward: int = 256
    dropout: float = 0.1
    t_encoder_layers: int = 6
    t_decoder_layers: int = 6
    rot_encoder_layers: int = 6
    rot_decoder_layers: int = 6
    per_scene_heads: bool = False
    official_backbone: bool | None = None  # None: matches model.backbone_weights (torchvision) or official (none)
    head_dim: int = 1024
    freeze: bool = False  # Cambridge finetune: backbone + transformers fixed (eval, no_grad)
    freeze_exclude_phrase: list[str] = field(default_factory=lambda: ["regressor_head_rot"])
    backbone_weights: str | None = None  # 'imagenet' (torchvision) | a torchvision state_dict file | null: scratch

    def backbone_variant(self) -> str:
        """``official`` (TF-SAME padding, BN eps 1e-3) or ``torchvision``; automatic when official_backbone is null."""
        from apr_localizer.models.backbone import variant_for_weights

        if self.official_backbone is None:
            return variant_for_weights(self.backbone_weights)
        return "official" if self.official_backbone else "torchvision"

    def ms_config(self, num_scenes: int) -> dict[str, Any]:
        """Keyword arguments of :class:`apr_localizer.models.MSTransformerConfig`."""
        return {
            "num_scenes": num_scenes,
            "hidden_dim": self.hidden_dim,
            "nheads": self.nheads,
            "dim_feedforward": self.dim_feedforward,
            "dropout": self.dropout,
            "t_encoder_layers": self.t_encoder_layers,
            "t_decoder_layers": self.t_decoder_layers,
            "rot_encoder_layers": self.rot_encoder_layers,
            "rot_decoder_layers": self.rot_decoder_layers,
            "per_scene_heads": self.per_scene_heads,
            "official_backbone": self.backbone_variant() == "official",
            "head_dim": self.head_dim,
        }


@dataclass
class LossConfig:
    """CameraPoseLoss (model_spec.md §2) and the scene term."""

    learnable: bool = True
    s_x: float = 0.0
    s_q: float = -3.0
    norm: float = 2.0
    scene_weight: float = 1.0  # weight of the scene NLL (upstream: 1)
    decay_loss_weights: bool = True  # Adam weight decay also on s_x/s_q (upstream behaviour, model_spec.md §10.17)
    sign_invariant: bool = False  # orientation term min over ±q (robot recipe); false = the spec's loss


@dataclass
class OptimConfig:
    """Optimiser and LR schedule: the spec's Adam + StepLR (stepped once per epoch), or AdamW + warm-up + cosine."""

    optimizer: str = "adam"  # adam (spec: L2 weight decay) | adamw (decoupled weight decay)
    schedule: str = "step"  # step (StepLR per epoch, spec) | cosine (per step, to min_lr_ratio · lr at the end)
    warmup_steps: int = 0  # linear warm-up from lr/100 over this many optimiser steps (cosine and step)
    min_lr_ratio: float = 0.01  # cosine: final lr = lr · min_lr_ratio
    lr: float = 1e-4
    weight_decay: float = 1e-4
    eps: float = 1e-10
    lr_scheduler_step_size: int = 10
    lr_scheduler_gamma: float = 0.1
    n_epochs: int = 30
    grad_clip_norm: float = 0.0  # 0: no clipping (upstream)


@dataclass
class RunConfig:
    """Logging, checkpoints, seeds, determinism, precision and device."""

    n_freq_print: int = 5  # steps between metric lines
    n_freq_checkpoint: int = 10  # epochs between numbered model files (plus the final one)
    save_every_epochs: int = 1  # epochs between writes of last.safetensors + last_state.pt (the final one always)
    checkpoint_every_steps: int = 0  # also write last_state.pt every N steps (0: only at epoch ends)
    seed: int = 0  # torch (and python random)
    numpy_seed: int = 2
    deterministic: bool = True  # cudnn.deterministic, no cudnn.benchmark
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    amp_dtype: str = "auto"  # auto (bfloat16 where the GPU supports it, else float16) | float16 (GradScaler) | bfloat16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_steps: int | None = None  # stop after this many optimiser steps in total
    time_budget_s: float | None = None  # stop after this much training time (the cosine schedule is sized to it)
    progress: bool = True  # tqdm progress bars on rank 0
    best_metric: str = "auto"  # auto | train_loss | val_position | val_orientation | val_loss
    val_every: int = 1  # epochs between validations (with --val-labels)
    torch_threads: int = 0  # 0: torch default


@dataclass
class PAETrainConfig:
    """Teacher–student pose auto-encoder training (model_spec.md §6.3)."""

    student_input: str = "teacher"  # teacher: the teacher's estimated pose + argmax scene (upstream) | gt
    pose_loss_grad: bool = False  # False: the pose term through the teacher heads only trains s_x/s_q (§10.11)
    cache_teacher: bool = True  # reuse teacher outputs across epochs when the input transform is deterministic
    single_scene: bool | None = None  # None: follow the teacher (PoseNet → single-scene PAE)
    shallow_mlp: bool = False  # single-scene PAE only
    apply_positional_encoding: bool = True  # single-scene PAE only


@dataclass
class IAPRTrainConfig:
    """iAPR (VTRPR) training (model_spec.md §7.4)."""

    rpr_num_heads: int = 4
    rpr_dim_feedforward: int = 2048
    rpr_dropout: float = 0.1
    rpr_num_encoder_layers: int = 2
    num_iterations: int = 3
    freeze_encoder: bool = False  # True: the APR's MS-Transformer is frozen and shared (latents computed once)
    train_pae: bool = True


@dataclass
class PoseNetConfig:
    """Single-scene PoseNet baseline."""

    backbone: str = "efficientnet_b0"  # efficientnet_b0 | mobilenet_v3_large | resnet50
    hidden_dim: int = 1024
    dropout: float = 0.1


@dataclass
class DecoderConfig:
    """PAE image decoder (model_spec.md §8)."""

    hidden_dims: list[int] = field(default_factory=lambda: [512, 1024, 2048])
    img_size: int = 64
    demo_frames: int = 8


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "run": RunConfig,
    "pae": PAETrainConfig,
    "iapr": IAPRTrainConfig,
    "posenet": PoseNetConfig,
    "decoder": DecoderConfig,
}


@dataclass
class TrainConfig:
    """All sections of a training config."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    pae: PAETrainConfig = field(default_factory=PAETrainConfig)
    iapr: IAPRTrainConfig = field(default_factory=IAPRTrainConfig)
    posenet: PoseNetConfig = field(default_factory=PoseNetConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/YAML serialisable)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config", trainer: str | None = None) -> TrainConfig:
        """Build from a nested dict; ``per_trainer[trainer]`` is merged on top. Unknown keys raise ConfigError."""
        cfg = cls()
        _merge_into(cfg, d, source, trainer)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        """Check value ranges and enumerations; raise :class:`ConfigError` naming the key."""
        checks: list[tuple[bool, str, str]] = [
            (self.data.batch_size >= 1, "data.batch_size", "a positive integer"),
            (self.data.workers >= 0, "data.workers", "0 or more"),
            (self.data.crop >= 16, "data.crop", "at least 16 pixels"),
            (self.data.resize >= self.data.crop, "data.resize", f"at least data.crop ({self.data.crop})"),
            (0.0 <= self.data.swap_prob <= 1.0, "data.swap_prob", "a probability in [0, 1]"),
            (self.data.cache_in_ram in (False, True, "encoded", "decoded", "resized"), "data.cache_in_ram",
             "false, true, 'encoded', 'decoded' or 'resized'"),
            (self.data.cache_max_gib >= 0, "data.cache_max_gib", "0 or more GiB"),
            (self.optim.lr > 0, "optim.lr", "a positive number"),
            (self.optim.n_epochs >= 0, "optim.n_epochs", "0 or more"),
            (self.optim.lr_scheduler_step_size >= 1, "optim.lr_scheduler_step_size", "a positive integer"),
            (self.optim.grad_clip_norm >= 0, "optim.grad_clip_norm", "0 (off) or a positive number"),
            (self.optim.optimizer in ("adam", "adamw"), "optim.optimizer", "'adam' or 'adamw'"),
            (self.optim.schedule in ("step", "cosine"), "optim.schedule", "'step' or 'cosine'"),
            (self.optim.warmup_steps >= 0, "optim.warmup_steps", "0 or more"),
            (0.0 <= self.optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "a ratio in [0, 1]"),
            (0.0 < self.data.crop_scale_min <= 1.0, "data.crop_scale_min", "a fraction in (0, 1]"),
            (min(self.data.jitter_brightness, self.data.jitter_contrast, self.data.jitter_saturation) >= 0,
             "data.jitter_brightness", "jitter strengths of 0 or more"),
            (0.0 <= self.data.jitter_hue <= 0.5, "data.jitter_hue", "a fraction of the hue circle in [0, 0.5]"),
            (self.data.pair_mode in ("neighbours", "apr_errors"), "data.pair_mode", "'neighbours' or 'apr_errors'"),
            (self.data.pair_error_scale > 0, "data.pair_error_scale", "a positive number"),
            (0.0 <= self.data.val_fraction < 1.0, "data.val_fraction", "a fraction in [0, 1)"),
            (self.run.time_budget_s is None or self.run.time_budget_s > 0, "run.time_budget_s",
             "null or a positive number of seconds"),
            (self.run.n_freq_print >= 1, "run.n_freq_print", "a positive integer"),
            (self.run.n_freq_checkpoint >= 1, "run.n_freq_checkpoint", "a positive integer"),
            (self.run.save_every_epochs >= 1, "run.save_every_epochs", "a positive integer"),
            (self.run.max_steps is None or self.run.max_steps >= 0, "run.max_steps", "0 or more"),
            (self.run.amp_dtype in ("auto", "float16", "bfloat16"), "run.amp_dtype", "'auto', 'float16' or 'bfloat16'"),
            (self.run.best_metric in ("auto", "train_loss", "val_position", "val_orientation", "val_loss"),
             "run.best_metric", "auto, train_loss, val_position, val_orientation or val_loss"),
            (self.run.val_every >= 1, "run.val_every", "a positive integer"),
            (self.pae.student_input in ("teacher", "gt"), "pae.student_input", "'teacher' or 'gt'"),
            (self.posenet.backbone in ("efficientnet_b0", "mobilenet_v3_large", "resnet50"), "posenet.backbone",
             "efficientnet_b0, mobilenet_v3_large or resnet50"),
            (self.decoder.img_size >= 8, "decoder.img_size", "at least 8 pixels"),
            (self.model.hidden_dim % self.model.nheads == 0, "model.nheads",
             f"a divisor of model.hidden_dim ({self.model.hidden_dim})"),
        ]  # fmt: skip
        for ok, key, expected in checks:
            if not ok:
                section, name = key.split(".")
                value = getattr(getattr(self, section), name)
                raise ConfigError(f"{source}: {key} is {value!r}; expected {expected}")
        dev = self.run.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ConfigError(f"{source}: run.device is {dev!r}; expected auto, cpu, cuda or cuda:N")


# --------------------------------------------------------------------------------------------- coercion
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Convert a YAML/JSON value to the annotated type or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, source)
            except ConfigError as e:
                errors.append(e)
        expected = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"{source}: {key} is {value!r}; expected {expected}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item is str:
            value = [value]  # official "freeze_exclude_phrase": "regressor_head_rot"
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} is {value!r}; expected a list of {_type_name(item)}")
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise ConfigError(f"{source}: {key} is {value!r}; expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{source}: {key} is {value!r}; expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: {key} is {value!r}; expected an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{source}: {key} is {value!r}; expected a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: {key} is {value!r}; expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source}: {key} is {value!r}; expected a string")
    raise ConfigError(f"{source}: {key} has an unsupported type {tp!r}")  # pragma: no cover


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _set_key(cfg: TrainConfig, section: str, name: str, value: Any, source: str) -> None:
    cls = _SECTIONS.get(section)
    if cls is None:
        raise ConfigError(
            f"{source}: unknown config section {section!r}; expected one of {', '.join(_SECTIONS)} or per_trainer"
        )
    names = [f.name for f in fields(cls)]
    if name not in names:
        raise ConfigError(f"{source}: unknown config key '{section}.{name}'; {section} has {', '.join(names)}")
    setattr(getattr(cfg, section), name, _coerce(value, _hints(cls)[name], f"{section}.{name}", source))


def _merge_into(cfg: TrainConfig, d: Any, source: str, trainer: str | None) -> None:
    if d is None:
        return
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping of config sections, found {type(d).__name__}")
    per_trainer = d.get("per_trainer")
    for section, body in d.items():
        if section == "per_trainer":
            continue
        if section not in _SECTIONS:
            raise ConfigError(
                f"{source}: unknown config section {section!r}; expected one of {', '.join(_SECTIONS)} or per_trainer"
            )
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping, found {type(body).__name__}")
        for name, value in body.items():
            _set_key(cfg, section, str(name), value, source)
    if per_trainer is not None:
        if not isinstance(per_trainer, dict):
            raise ConfigError(f"{source}: per_trainer must map trainer names to sections")
        for name, body in per_trainer.items():
            if name not in TRAINERS:
                raise ConfigError(
                    f"{source}: unknown trainer {name!r} in per_trainer; expected one of {', '.join(TRAINERS)}"
                )
            if isinstance(body, dict) and "per_trainer" in body:
                raise ConfigError(f"{source}: per_trainer.{name} must not contain per_trainer")
            if name == trainer:
                _merge_into(cfg, body, f"{source} (per_trainer.{name})", None)
            else:  # validate the other trainers' overrides too, so typos surface early
                _merge_into(TrainConfig(), body, f"{source} (per_trainer.{name})", None)


# --------------------------------------------------------------------------------------------- official JSON
OFFICIAL_KEYS: dict[str, str] = {
    "n_freq_print": "run.n_freq_print",
    "n_freq_checkpoint": "run.n_freq_checkpoint",
    "n_workers": "data.workers",
    "batch_size": "data.batch_size",
    "equalize_scenes": "data.equalize_scenes",
    "no_augment": "data.no_augment",
    "num_scenes": "model.num_scenes",
    "learnable": "loss.learnable",
    "s_x": "loss.s_x",
    "s_q": "loss.s_q",
    "norm": "loss.norm",
    "lr": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "eps": "optim.eps",
    "lr_scheduler_gamma": "optim.lr_scheduler_gamma",
    "lr_scheduler_step_size": "optim.lr_scheduler_step_size",
    "n_epochs": "optim.n_epochs",
    "num_t_encoder_layers": "model.t_encoder_layers",
    "num_t_decoder_layers": "model.t_decoder_layers",
    "num_rot_encoder_layers": "model.rot_encoder_layers",
    "num_rot_decoder_layers": "model.rot_decoder_layers",
    "dim_feedforward": "model.dim_feedforward",
    "hidden_dim": "model.hidden_dim",
    "dropout": "model.dropout",
    "freeze": "model.freeze",
    "freeze_exclude_phrase": "model.freeze_exclude_phrase",
    "shallow_mlp": "pae.shallow_mlp",
    "apply_positional_encoding": "pae.apply_positional_encoding",
    "rpr_num_heads": "iapr.rpr_num_heads",
    "rpr_dim_feedforward": "iapr.rpr_dim_feedforward",
    "rpr_dropout": "iapr.rpr_dropout",
    "rpr_num_encoder_layers": "iapr.rpr_num_encoder_layers",
    "num_iterations": "iapr.num_iterations",
    "backbone_type": "posenet.backbone",
    "rpr_backbone_type": "posenet.backbone",  # the key PoseNet actually reads upstream (model_spec.md §10.15)
    "img_size": "decoder.img_size",
}
IGNORED_OFFICIAL_KEYS: dict[str, str] = {
    "nheads": "never read upstream: both transformers use 8 heads (model_spec.md §10.1)",
    "device_id": "the device comes from --device / run.device",
    "refine_orientation": "not read by any training or test script",
    "num_neighbors": "used only by the image-retrieval RPR baseline",
    "single_scene": "the PAE variant follows the teacher model",
    "backbone_path": "the backbone is built from torchvision; see model.backbone_weights",
}
_CHECKED_OFFICIAL_KEYS = {
    "reduction": (["reduction_4", "reduction_3"], "the position branch taps reduction_4 and the orientation "
                  "branch reduction_3 (model_spec.md §1.2)"),
    "rpr_activation": ("gelu", "the iAPR encoder uses GELU"),
}  # fmt: skip
_POSENET_BACKBONES = {
    "efficientnet": "efficientnet_b0",
    "efficientnet_b0": "efficientnet_b0",
    "efficient-net-b0": "efficientnet_b0",
    "mobilenet": "mobilenet_v3_large",
    "mobilenet_v3_large": "mobilenet_v3_large",
    "resnet50": "resnet50",
    "resnet": "resnet50",
}
_TRAINER_BLOCKS = {
    "ms-transformer": ("ems-transposenet", "ms-transposenet"),
    "pae": ("ems-transposenet", "ms-transposenet", "posenet"),
    "iapr": ("ems-transposenet",),
    "posenet": ("posenet",),
    "decoder": ("ems-transposenet", "posenet"),
}


def _official_to_nested(
    d: dict[str, Any], source: str, trainer: str, block: str | None, notes: list[str]
) -> dict[str, Any]:
    """Map an official JSON config (flat, or ``general`` + model blocks) to our nested layout."""
    flat: dict[str, Any] = {}
    per_scene_heads = False
    nested_blocks = {k: v for k, v in d.items() if isinstance(v, dict)}
    if nested_blocks:
        general = nested_blocks.get("general", {})
        candidates = [k for k in nested_blocks if k != "general"]
        if block is None:
            preferred = [b for b in _TRAINER_BLOCKS[trainer] if b in candidates]
            if preferred:
                block = preferred[0]
            elif len(candidates) == 1:
                block = candidates[0]
            else:
                raise ConfigError(
                    f"{source}: cannot tell which model block to use for {trainer} among {candidates}; "
                    f"append '#<block>' to the config path, e.g. {source}#{candidates[0] if candidates else 'name'}"
                )
        if block not in nested_blocks:
            raise ConfigError(f"{source}: no block {block!r}; the file has {', '.join(nested_blocks)}")
        for k, v in d.items():
            if not isinstance(v, dict):
                flat[k] = v  # flat keys next to blocks still count
        flat.update(general)
        flat.update(nested_blocks[block])
        per_scene_heads = block == "ms-transposenet"
        notes.append(f"{source}: using the 'general' and {block!r} blocks")
    else:
        if block is not None:
            raise ConfigError(f"{source}: a flat config has no blocks, but block {block!r} was requested")
        flat = dict(d)
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if key in IGNORED_OFFICIAL_KEYS:
            notes.append(f"{source}: ignoring official key {key!r} ({IGNORED_OFFICIAL_KEYS[key]})")
            continue
        if key in _CHECKED_OFFICIAL_KEYS:
            expected, why = _CHECKED_OFFICIAL_KEYS[key]
            got = value.lower() if isinstance(value, str) else value
            if got != expected:
                raise ConfigError(
                    f"{source}: official key {key!r} is {value!r}; only {expected!r} is supported ({why})"
                )
            continue
        target = OFFICIAL_KEYS.get(key)
        if target is None:
            raise ConfigError(
                f"{source}: unknown key {key!r} in an official config; known keys: "
                f"{', '.join(sorted([*OFFICIAL_KEYS, *IGNORED_OFFICIAL_KEYS, *_CHECKED_OFFICIAL_KEYS]))}"
            )
        if target == "posenet.backbone":
            mapped = _POSENET_BACKBONES.get(str(value).lower())
            if mapped is None:
                raise ConfigError(
                    f"{source}: {key} is {value!r}; expected one of {', '.join(sorted(set(_POSENET_BACKBONES)))}"
                )
            value = mapped
        if trainer == "posenet" and key == "hidden_dim":
            notes.append(f"{source}: ignoring hidden_dim {value!r} of the posenet block (PoseNet's FC width is 1024)")
            continue
        section, name = target.split(".")
        out.setdefault(section, {})[name] = value
    if per_scene_heads:
        out.setdefault("model", {})["per_scene_heads"] = True
    # Official trainings are all-in-one: rot depth etc. come from the file; nheads stays 8.
    return out


_KNOWN_BLOCKS = {
    "general",
    "ems-transposenet",
    "ms-transposenet",
    "posenet",
    "ems-transposenet-all",
    "ems-transposenet-scene-ablation",
    "transposenet",
}


def _looks_official(d: dict[str, Any], path: Path) -> bool:
    """Official configs are JSON: flat key/values, or ``general`` + model blocks; anything else is ours."""
    if all(k in _SECTIONS or k == "per_trainer" for k in d) or path.suffix.lower() != ".json":
        return False
    if any(isinstance(v, dict) for v in d.values()):
        return any(k in _KNOWN_BLOCKS for k in d)
    return True


# --------------------------------------------------------------------------------------------- loading
def default_config_name(trainer: str) -> str:
    """File name (under config/training/) of a trainer's default config."""
    return _DEFAULT_CONFIGS[trainer]


def resolve_config_path(spec: str | Path) -> tuple[Path, str | None]:
    """``path[#block]`` or a bare name of a file in the package's config/training/ → ``(path, block)``."""
    text = str(spec)
    block = None
    if "#" in text:
        text, block = text.split("#", 1)
    path = Path(text)
    if path.is_file():
        return path, block
    if not path.is_absolute() and len(path.parts) == 1:
        from apr_localizer.resources import config_path

        for name in (path.name, path.name + ".yaml"):
            try:
                return config_path(f"training/{name}"), block
            except FileNotFoundError:
                continue
    raise ConfigError(f"config file {text} does not exist (nor config/training/{path.name} of the package)")


def _read_file(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{path}: cannot be parsed as {'JSON' if path.suffix == '.json' else 'YAML'} ({first})"
        ) from None


def load_config(spec: str | Path | None, trainer: str, notes: list[str] | None = None) -> TrainConfig:
    """Load a training config for ``trainer`` (our YAML/JSON, or an official JSON config).

    A file is layered on top of the trainer's default config (``config/training/<default>``), so it only needs the
    keys it changes; an official JSON config gets the trainer's defaults for everything it does not set (e.g. the
    decoder's lr 1e-2).

    Args:
        spec: a path (``file.json#block`` selects a block of an official multi-model file), a file name in the
            package's ``config/training/``, or None for the trainer's default config.
        trainer: one of :data:`TRAINERS`; selects ``per_trainer`` overrides and the official block.
        notes: receives informational messages (ignored official keys, chosen block).

    """
    if trainer not in TRAINERS:
        raise ConfigError(f"unknown trainer {trainer!r}; expected one of {', '.join(TRAINERS)}")
    notes = notes if notes is not None else []
    default_path, _ = resolve_config_path(default_config_name(trainer))
    path, block = resolve_config_path(spec) if spec is not None else (default_path, None)
    cfg = TrainConfig()
    if path.resolve() != default_path.resolve():
        _merge_into(cfg, _read_mapping(default_path), str(default_path), trainer)
    d = _read_mapping(path)
    source = str(path)
    if _looks_official(d, path) or block is not None:
        d = _official_to_nested(d, source, trainer, block, notes)
    _merge_into(cfg, d, source, trainer)
    cfg.validate(source)
    return cfg


def _read_mapping(path: Path) -> dict[str, Any]:
    d = _read_file(path)
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, found {type(d).__name__}")
    return d


def apply_overrides(cfg: TrainConfig, items: list[str] | None, source: str = "--set") -> TrainConfig:
    """Apply ``section.key=value`` (or official flat ``key=value``) overrides; values are parsed as YAML."""
    import yaml

    cfg = copy.deepcopy(cfg)
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{source} {item!r}: expected key=value, e.g. optim.lr=0.001")
        key, text = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        if "." not in key:
            target = OFFICIAL_KEYS.get(key)
            if target is None:
                raise ConfigError(
                    f"{source} {item!r}: unknown key {key!r}; use section.key (sections: {', '.join(_SECTIONS)})"
                )
            key = target
        section, name = key.split(".", 1)
        _set_key(cfg, section, name, value, f"{source} {item!r}")
    cfg.validate(source)
    return cfg
