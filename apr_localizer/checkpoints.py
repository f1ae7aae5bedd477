"""Model files: official checkpoints (raw state_dicts) in and out, our own format (safetensors + JSON) in and out.

Official files (model_spec.md §9) are read with ``torch.load(weights_only=True)``; their kind (MS-Transformer, PAE,
iAPR) and structure (scene count, layer counts, FFN width, per-scene heads) are read from the keys, never from a
config. The efficientnet_pytorch backbone names are mapped to torchvision's (inference_notes.md §2.4).

Our format is one ``.safetensors`` file holding every component (``apr.*``, ``iapr.*``, ``pae.*``) with a JSON
document in the header metadata (key ``apr_localizer``): architecture configs, scene names, preprocessing,
provenance. No pickle anywhere.

Hostile files: a safetensors header is read by :mod:`apr_localizer.safetensors_io`, which checks the header length
against the file size and a cap before reading it, and every tensor's dtype, shape and offsets against the file before
any tensor is allocated. :func:`load_model` then builds the described models on the ``meta`` device (no memory) and
compares their parameter shapes with the file's, so metadata that describes a huge model is refused in milliseconds.
Every problem is a :class:`CheckpointError` (defined there) with one sentence; strings taken from a file are
truncated and escaped (:func:`apr_localizer.imaging.quote`). Writes go through :mod:`apr_localizer.fileio` (temporary
file, fsync, rename), and temporaries left by a killed writer are removed on the next save or load.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .fileio import atomic_path, clean_stale_tmp
from .geometry import ORIENTATIONS
from .imaging import quote
from .models.backbone import NUM_STAGES, unused_official_backbone_keys
from .models.ms_transformer import MSTransformer, MSTransformerConfig
from .models.pae import PAEConfig, PoseAutoEncoder
from .models.rpr import IAPR, IAPRConfig
from .safetensors_io import (
    MAX_TENSORS,
    CheckpointError,
    TensorInfo,
    error_reason,
    read_safetensors,
    read_safetensors_header,
    write_safetensors,
)
from .uncertainty import Calibration, CalibrationError

__all__ = [
    "DEFAULT_PREPROCESS",
    "FORMAT_VERSION",
    "CheckpointError",
    "ModelBundle",
    "default_scene_names",
    "detect_kind",
    "from_official_state_dict",
    "load_bundle",
    "load_model",
    "load_official_checkpoint",
    "read_json_metadata",
    "read_metadata",
    "read_camera",
    "save_model",
    "save_official_checkpoint",
    "to_official_state_dict",
]

FORMAT_VERSION = 1
METADATA_KEY = "apr_localizer"
DEFAULT_PREPROCESS: dict[str, Any] = {
    "resize": 256,
    "crop": 224,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}
SEVEN_SCENES = ["chess", "fire", "heads", "office", "pumpkin", "redkitchen", "stairs"]
CAMBRIDGE_FOUR = ["KingsCollege", "OldHospital", "ShopFacade", "StMarysChurch"]


# ------------------------------------------------------------------------------------------- backbone name mapping
_STAGE_OF_BLOCK = [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (4, 0), (4, 1), (4, 2), (5, 0), (5, 1), (5, 2)]
_STAGE_OF_BLOCK += [(6, 0), (6, 1), (6, 2), (6, 3), (7, 0)]
_FIRST_BLOCK = {
    "_depthwise_conv": "block.0.0",
    "_bn1": "block.0.1",
    "_se_reduce": "block.1.fc1",
    "_se_expand": "block.1.fc2",
    "_project_conv": "block.2.0",
    "_bn2": "block.2.1",
}
_OTHER_BLOCKS = {
    "_expand_conv": "block.0.0",
    "_bn0": "block.0.1",
    "_depthwise_conv": "block.1.0",
    "_bn1": "block.1.1",
    "_se_reduce": "block.2.fc1",
    "_se_expand": "block.2.fc2",
    "_project_conv": "block.3.0",
    "_bn2": "block.3.1",
}


def _effnet_module_table() -> dict[str, str]:
    """efficientnet_pytorch module name → torchvision module name, in the official state_dict order."""
    table = {"_conv_stem": "features.0.0", "_bn0": "features.0.1"}
    for n, (s, b) in enumerate(_STAGE_OF_BLOCK):
        for name, tv in (_FIRST_BLOCK if n == 0 else _OTHER_BLOCKS).items():
            table[f"_blocks.{n}.{name}"] = f"features.{s}.{b}.{tv}"
    table.update({"_conv_head": "features.8.0", "_bn1": "features.8.1", "_fc": "classifier.1"})
    return table


_EFF2TV = _effnet_module_table()
_TV2EFF = {v: k for k, v in _EFF2TV.items()}


def _map_name(name: str, table: dict[str, str]) -> str | None:
    module, _, suffix = name.rpartition(".")
    mapped = table.get(module)
    return None if mapped is None else f"{mapped}.{suffix}"


def _tv_key_is_used(tv_key: str) -> bool:
    parts = tv_key.split(".")
    return parts[0] == "features" and int(parts[1]) < NUM_STAGES


# ------------------------------------------------------------------------------------------- kind detection
def detect_kind(state_dict: Mapping[str, Any]) -> str:
    """``"iapr"``, ``"ms_transformer"`` or ``"pae"`` from the keys of an official state_dict; ``""`` if unknown."""
    keys = set(state_dict)
    if "rel_x_token" in keys and any(k.startswith("mstransformer.") for k in keys):
        return "iapr"
    if "query_embed_t.weight" in keys and "scene_embed.weight" in keys:
        return "ms_transformer"
    if (
        "x_encoder.0.weight" in keys
        and "q_encoder.0.weight" in keys
        and all(k.startswith(("x_encoder.", "q_encoder.")) for k in keys)
    ):
        return "pae"
    return ""


def _count_layers(keys: set[str], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"\.layers\.(\d+)\.")
    return len({int(m.group(1)) for k in keys if (m := pat.match(k))})


def _infer_ms_config(sd: Mapping[str, torch.Tensor], p: str = "") -> MSTransformerConfig:
    keys = set(sd)
    q = sd[p + "query_embed_t.weight"]
    per_scene = p + "regressor_head_t.0.fc_h.weight" in keys
    head_key = p + ("regressor_head_t.0.fc_h.weight" if per_scene else "regressor_head_t.fc_h.weight")
    ffn_keys = sorted(k for k in keys if k.startswith(p + "transformer_") and k.endswith("linear1.weight"))
    ffn = sd[ffn_keys[0]].shape[0] if ffn_keys else 256
    return MSTransformerConfig(
        num_scenes=int(q.shape[0]),
        hidden_dim=int(q.shape[1]),
        nheads=8,  # not visible in the shapes; the official models use 8 (model_spec.md §10.1)
        dim_feedforward=int(ffn),
        t_encoder_layers=_count_layers(keys, p + "transformer_t.encoder"),
        t_decoder_layers=_count_layers(keys, p + "transformer_t.decoder"),
        rot_encoder_layers=_count_layers(keys, p + "transformer_rot.encoder"),
        rot_decoder_layers=_count_layers(keys, p + "transformer_rot.decoder"),
        per_scene_heads=per_scene,
        official_backbone=True,
        head_dim=int(sd[head_key].shape[0]) if head_key in keys else 1024,
    )


def _infer_pae_config(sd: Mapping[str, torch.Tensor], p: str = "") -> PAEConfig:
    d_in = int(sd[p + "x_encoder.0.weight"].shape[1])
    layers = {k.split(".")[-2] for k in sd if k.startswith(p + "x_encoder.")}
    last = max(int(i) for i in layers)
    enc_dim = int(sd[f"{p}x_encoder.{last}.weight"].shape[0])
    if d_in % 13 == 0 and d_in // 13 == 4:  # [PE(x) 39 ‖ PE(scene) 13]
        return PAEConfig(multi_scene=True, encoder_dim=enc_dim)
    if d_in == 39:
        return PAEConfig(multi_scene=False, encoder_dim=enc_dim, shallow_mlp=len(layers) == 2)
    if d_in == 3:
        return PAEConfig(
            multi_scene=False, encoder_dim=enc_dim, apply_positional_encoding=False, shallow_mlp=len(layers) == 2
        )
    raise CheckpointError(f"pose auto-encoder input width {d_in} is not 52 (multi-scene), 39 or 3 (single-scene)")


def _infer_iapr_config(sd: Mapping[str, torch.Tensor]) -> IAPRConfig:
    keys = set(sd)
    return IAPRConfig(
        ms_transformer=_infer_ms_config(sd, "mstransformer."),
        pae=_infer_pae_config(sd, "pae."),
        rpr_num_heads=4,  # not visible in the shapes; the official config uses 4
        rpr_dim_feedforward=int(sd["rpr_transformer_encoder.layers.0.linear1.weight"].shape[0]),
        rpr_num_encoder_layers=_count_layers(keys, "rpr_transformer_encoder"),
    )


# ------------------------------------------------------------------------------------------- official → ours
def _official_to_ours_ms(sd: Mapping[str, torch.Tensor], p: str, out_p: str, out: dict, source: str) -> None:
    for k, v in sd.items():
        if not k.startswith(p):
            continue
        name = k[len(p) :]
        if name.startswith("backbone.0.body."):
            tv = _map_name(name[len("backbone.0.body.") :], _EFF2TV)
            if tv is None:
                raise CheckpointError(
                    f"{source}: unknown EfficientNet-B0 key {quote(k)} (expected efficientnet_pytorch names)"
                )
            if _tv_key_is_used(tv):
                out[out_p + "backbone." + tv] = v
            # stages 6-8 and the classifier never influence the outputs: dropped explicitly
        elif name.startswith("backbone.1."):
            out[out_p + "position_embedding." + name[len("backbone.1.") :]] = v
        else:
            out[out_p + name] = v


def from_official_state_dict(sd: Mapping[str, torch.Tensor], source: str = "state_dict") -> nn.Module:
    """Build our model (eval mode) from an official raw state_dict; the kind and depths come from the keys."""
    kind = detect_kind(sd)
    try:
        return _from_official(sd, kind, source)
    except CheckpointError:
        raise
    except Exception as e:  # shapes that do not fit the layout the keys announce (IndexError, RuntimeError, ...)
        raise CheckpointError(
            f"{source}: the tensor shapes do not describe a valid {kind or 'model'} ({error_reason(e)})"
        ) from None


def _from_official(sd: Mapping[str, torch.Tensor], kind: str, source: str) -> nn.Module:
    ours: dict[str, torch.Tensor] = {}
    if kind == "ms_transformer":
        model: nn.Module = MSTransformer(_infer_ms_config(sd))
        _official_to_ours_ms(sd, "", "", ours, source)
    elif kind == "pae":
        model = PoseAutoEncoder(_infer_pae_config(sd))
        ours = dict(sd)
    elif kind == "iapr":
        model = IAPR(_infer_iapr_config(sd))
        _official_to_ours_ms(sd, "mstransformer.", "mstransformer.", ours, source)
        ours.update({k: v for k, v in sd.items() if not k.startswith("mstransformer.")})
    else:
        sample = ", ".join(quote(k) for k in sorted(sd)[:4])
        raise CheckpointError(
            f"{source}: not an MS-Transformer, pose auto-encoder or iAPR state_dict (expected keys such as "
            f"'query_embed_t.weight', 'x_encoder.0.weight' or 'rel_x_token'; found {sample}, ...)"
        )
    _load_strict(model, ours, source)
    return model.eval()


def _check_shapes(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], what: str, source: str
) -> None:
    """Raise CheckpointError unless ``found`` has exactly the keys and shapes of ``expected``."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(quote(k) for k in unexpected[:3])})")
        raise CheckpointError(f"{source}: keys do not match the {what} they describe: {'; '.join(parts)}")
    for k, shape in found.items():
        if tuple(shape) != tuple(expected[k]):
            raise CheckpointError(f"{source}: tensor '{k}' has shape {tuple(shape)}, expected {tuple(expected[k])}")


def _load_strict(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in own.items()}
    _check_shapes(expected, {k: tuple(v.shape) for k, v in sd.items()}, type(model).__name__, source)
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


def _check_zip_sizes(path: Path) -> None:
    """Refuse a ``torch.save`` zip whose entries expand to more than the file holds (a compressed or forged archive).

    ``torch.save`` stores its entries uncompressed, while ``torch.load`` allocates each record's declared size before
    it checks it, so a 1 MB archive of deflated zeros would cost gigabytes.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # not a zip (legacy format) or a broken one: torch.load reports it
    size = path.stat().st_size
    if declared > size:
        raise CheckpointError(
            f"{path}: cannot be read as a raw PyTorch state_dict with weights_only=True (its zip entries expand to "
            f"{declared} bytes, more than the {size}-byte file; re-save it with torch.save)"
        )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    clean_stale_tmp(path.parent, name=path.name, older_than_s=STALE_TMP_AGE_S)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    _check_zip_sizes(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt zip, pickled classes, not a torch file at all
        raise CheckpointError(
            f"{path}: cannot be read as a raw PyTorch state_dict with weights_only=True ({error_reason(e)})"
        ) from None
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model_state_dict", "model"):
            if wrapper in obj and isinstance(obj[wrapper], Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state_dict (a mapping of parameter names to tensors)")
    if len(obj) > MAX_TENSORS:
        raise CheckpointError(f"{path}: holds {len(obj)} tensors; a model has at most {MAX_TENSORS}")
    sd = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in sd):  # saved from DataParallel / DDP
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def load_official_checkpoint(path: str | Path) -> nn.Module:
    """Load an official checkpoint (raw state_dict) as an MS-Transformer, pose auto-encoder or iAPR (eval mode).

    Raises :class:`CheckpointError` with one sentence naming the file on any problem.
    """
    path = Path(path)
    return from_official_state_dict(_read_state_dict(path), source=str(path))


# ------------------------------------------------------------------------------------------- ours → official
def _ms_to_official(model: MSTransformer, p: str, out: OrderedDict) -> None:
    sd = model.state_dict()
    backbone = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    backbone.update(unused_official_backbone_keys())
    for tv_module, eff_module in _TV2EFF.items():
        for k in [k for k in backbone if k.rpartition(".")[0] == tv_module]:
            out[f"{p}backbone.0.body.{eff_module}.{k.rpartition('.')[2]}"] = backbone[k]
    for k, v in sd.items():
        if k.startswith("backbone."):
            continue
        if k.startswith("position_embedding."):
            out[p + "backbone.1." + k[len("position_embedding.") :]] = v
        else:
            out[p + k] = v


def to_official_state_dict(model: nn.Module) -> OrderedDict:
    """Return the official raw state_dict of one of our models (efficientnet_pytorch names, full key set).

    Backbone parts the model never runs (stages 6-8, classifier) are filled with fixed dummy values.
    """
    out: OrderedDict = OrderedDict()
    if isinstance(model, MSTransformer):
        _ms_to_official(model, "", out)
    elif isinstance(model, PoseAutoEncoder):
        out.update(model.state_dict())
    elif isinstance(model, IAPR):
        for k in ("rel_x_token", "rel_q_token"):
            out[k] = getattr(model, k).detach()
        _ms_to_official(model.mstransformer, "mstransformer.", out)
        for k, v in model.state_dict().items():
            if not k.startswith("mstransformer.") and k not in out:
                out[k] = v
    else:
        raise TypeError(f"cannot export {type(model).__name__} in the official format")
    return OrderedDict((k, v.detach().clone().contiguous()) for k, v in out.items())


def save_official_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """``torch.save`` of :func:`to_official_state_dict` (loadable by the original code and by us)."""
    path = Path(path)
    clean_stale_tmp(path.parent, name=path.name)
    with atomic_path(path) as tmp:
        torch.save(to_official_state_dict(model), str(tmp))
    return path


# ------------------------------------------------------------------------------------------- our format
def default_scene_names(num_scenes: int) -> list[str]:
    """Scene names for an official checkpoint (which carries none): 7-Scenes / Cambridge order, else scene_i."""
    if num_scenes == 7:
        return list(SEVEN_SCENES)
    if num_scenes == 4:
        return list(CAMBRIDGE_FOUR)
    return [f"scene_{i}" for i in range(num_scenes)]


def _check_orientation(value: Any, where: str = "") -> str:
    """Return ``value`` if it is in :data:`ORIENTATIONS`, else raise :class:`CheckpointError` (``where``: prefix)."""
    if value not in ORIENTATIONS:
        raise CheckpointError(f"{where}orientation convention {quote(value)} is not one of {', '.join(ORIENTATIONS)}")
    return value


@dataclass
class ModelBundle:
    """What the runtime needs: the APR, optional iAPR (and standalone PAE), scene names, preprocessing, provenance.

    ``iapr.mstransformer is apr`` means the iAPR shares the APR's image encoder: latents are computed once.
    ``uncertainty`` maps a per-frame score to sigmas (None: uncalibrated, e.g. official checkpoints); ``camera`` is
    the training camera ``{fx, fy, cx, cy, width, height}`` (None: unknown). ``orientation`` is what the regressed
    quaternion means: ``camera_to_world`` (ours, 7-Scenes) or ``world_to_camera`` (models trained on the upstream
    Cambridge Landmarks labels, VisualSFM's convention); the Localizer always returns camera-to-map poses.
    """

    apr: MSTransformer
    iapr: IAPR | None = None
    pae: PoseAutoEncoder | None = None
    scene_names: list[str] = field(default_factory=list)
    preprocess: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_PREPROCESS))
    provenance: dict[str, Any] = field(default_factory=dict)
    uncertainty: Calibration | None = None
    camera: dict[str, float] | None = None
    orientation: str = "camera_to_world"

    def __post_init__(self) -> None:
        _check_orientation(self.orientation)
        n = self.apr.num_scenes
        if not self.scene_names:
            self.scene_names = default_scene_names(n)
        if len(self.scene_names) != n:
            raise CheckpointError(f"{len(self.scene_names)} scene names given for a model with {n} scenes")
        if self.iapr is not None and self.iapr.mstransformer.num_scenes != n:
            raise CheckpointError(
                f"the iAPR model knows {self.iapr.mstransformer.num_scenes} scenes but the APR model {n}"
            )

    @property
    def shares_encoder(self) -> bool:
        return self.iapr is not None and self.iapr.mstransformer is self.apr

    def eval(self) -> ModelBundle:
        for m in (self.apr, self.iapr, self.pae):
            if m is not None:
                m.eval()
        return self


def save_model(
    path: str | Path,
    apr: MSTransformer,
    iapr: IAPR | None = None,
    pae: PoseAutoEncoder | None = None,
    scene_names: list[str] | None = None,
    preprocess: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    uncertainty: Calibration | Mapping[str, Any] | None = None,
    camera: Mapping[str, Any] | None = None,
    orientation: str = "camera_to_world",
) -> Path:
    """Write a model bundle as one safetensors file with JSON metadata. ``dtype=torch.float16`` halves the size.

    ``uncertainty`` (a :class:`Calibration` or its dict) and ``camera`` (``fx, fy, cx, cy, width, height`` of the
    training images) are optional metadata, validated as :func:`load_model` validates them. BatchNorm counters and
    other integer buffers keep their dtype. The write is atomic (see :func:`write_safetensors`): a reader sees the
    old file or the new one.
    """
    bundle = ModelBundle(apr, iapr, pae, list(scene_names or []), dict(preprocess or DEFAULT_PREPROCESS))
    if isinstance(uncertainty, Calibration):
        uncertainty = uncertainty.to_dict()
    calibration = _calibration(uncertainty, Path(path)) if uncertainty is not None else None
    trained_camera = read_camera(camera, Path(path)) if camera is not None else None
    shares = bundle.shares_encoder
    tensors: dict[str, torch.Tensor] = {}

    def add(prefix: str, module: nn.Module, skip: str | None = None) -> None:
        for k, v in module.state_dict().items():
            if skip and k.startswith(skip):
                continue
            v = v.detach().to("cpu")
            tensors[prefix + k] = (v.to(dtype) if v.is_floating_point() else v).contiguous().clone()

    add("apr.", apr)
    components: dict[str, Any] = {"apr": {"kind": "ms_transformer", "config": apr.config.to_dict()}}
    if iapr is not None:
        add("iapr.", iapr, "mstransformer." if shares else None)
        components["iapr"] = {"kind": "iapr", "config": iapr.config.to_dict(), "shares_apr_encoder": shares}
    if pae is not None:
        add("pae.", pae)
        components["pae"] = {"kind": "pae", "config": pae.config.to_dict()}
    meta = {
        "format_version": FORMAT_VERSION,
        "components": components,
        "scene_names": bundle.scene_names,
        "input_size": [bundle.preprocess.get("crop", 224), bundle.preprocess.get("crop", 224)],
        "preprocess": bundle.preprocess,
        "pose_convention": "[x, y, z, qw, qx, qy, qz], camera-to-map, quaternion raw (normalise before use)",
        "dtype": str(dtype).replace("torch.", ""),
        "provenance": dict(provenance or {}),
    }
    if calibration is not None:
        meta["uncertainty"] = calibration.to_dict()
    if trained_camera is not None:
        meta["camera"] = trained_camera
    if _check_orientation(orientation) != "camera_to_world":
        meta["orientation"] = orientation
    return write_safetensors(path, tensors, {METADATA_KEY: json.dumps(meta)})


def read_json_metadata(path: str | Path, key: str, what: str = "model") -> dict[str, Any] | None:
    """Return the JSON document stored under ``key`` in a safetensors header (None when there is none).

    Reads only the (validated, size-bounded) header. A missing or unreadable file, or invalid JSON, raises
    :class:`CheckpointError`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such {what} file")
    return _json_metadata(read_safetensors_header(path)[1], key, path)


def _json_metadata(meta: Mapping[str, str], key: str, path: Path) -> dict[str, Any] | None:
    raw = meta.get(key)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt {key} metadata ({error_reason(e)})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: corrupt {key} metadata (a JSON object was expected)")
    return doc


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Read the JSON metadata of one of our model files (cheap: reads only the header)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file")
    return _our_metadata(read_safetensors_header(path)[1], path)


def _our_metadata(st_meta: Mapping[str, str], path: Path) -> dict[str, Any]:
    meta = _json_metadata(st_meta, METADATA_KEY, path)
    if meta is None:
        raise CheckpointError(f"{path}: safetensors file without apr_localizer metadata (not written by save_model)")
    version = meta.get("format_version", 0)
    if type(version) is not int:
        raise CheckpointError(f"{path}: model format version {quote(version)} is not an integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: model format version {version} is newer than this apr_localizer supports ({FORMAT_VERSION})"
        )
    return meta


STALE_TMP_AGE_S = 60.0
"""Temporaries of a model file older than this are removed when the file is loaded (a writer takes < 1 s)."""


MAX_SCENES = 1 << 16
"""Most scenes a model may describe (an embedding row each; per-scene heads are also bounded by the tensor count)."""


def _check_counts(doc: Any, limit: int, path: Path, where: str = "config") -> None:
    """Bound every count that creates modules, so that even a ``meta``-device build stays cheap.

    Layer counts (and the scene count with per-scene heads) must not exceed the number of tensors in the file, since
    every layer and head owns several; any scene count is at most :data:`MAX_SCENES`.
    """
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: invalid model description ({where} is not a JSON object)")
    for k, v in doc.items():
        if isinstance(v, dict):
            _check_counts(v, limit, path, f"{where}.{k}")
            continue
        if type(v) is not int:
            continue
        bound = limit if k.endswith("_layers") or (k == "num_scenes" and doc.get("per_scene_heads")) else None
        if k == "num_scenes" and bound is None:
            bound = MAX_SCENES
        if bound is not None and v > bound:
            raise CheckpointError(
                f"{path}: invalid model description ({where}.{k} = {v} exceeds the bound of {bound} (the file "
                f"holds {limit} tensors))"
            )


def _build(comps: Mapping[str, Any], path: Path) -> tuple[MSTransformer, IAPR | None, PoseAutoEncoder | None]:
    """Construct the models a ``components`` document describes (on the current default device)."""
    if not isinstance(comps, dict) or not isinstance(comps.get("apr"), dict):
        raise CheckpointError(f"{path}: the model file has no APR (MS-Transformer) component")
    apr = MSTransformer(MSTransformerConfig.from_dict(comps["apr"]["config"]))
    iapr = pae = None
    if "iapr" in comps:
        shares = bool(comps["iapr"].get("shares_apr_encoder"))
        iapr = IAPR(IAPRConfig.from_dict(comps["iapr"]["config"]), apr if shares else None)
    if "pae" in comps:
        pae = PoseAutoEncoder(PAEConfig.from_dict(comps["pae"]["config"]))
    return apr, iapr, pae


def _expected_shapes(
    models: tuple[MSTransformer, IAPR | None, PoseAutoEncoder | None],
) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{prefix: {key: shape}}`` of the tensors a bundle file holds for these models (shared encoder stored once)."""
    apr, iapr, pae = models
    out = {"apr.": {k: tuple(v.shape) for k, v in apr.state_dict().items()}}
    if iapr is not None:
        skip = "mstransformer." if iapr.mstransformer is apr else None
        out["iapr."] = {k: tuple(v.shape) for k, v in iapr.state_dict().items() if not (skip and k.startswith(skip))}
    if pae is not None:
        out["pae."] = {k: tuple(v.shape) for k, v in pae.state_dict().items()}
    return out


def _dry_run(comps: Mapping[str, Any], infos: Mapping[str, TensorInfo], path: Path) -> None:
    """Build the described models on the ``meta`` device (no memory) and compare their shapes with the file's."""
    _check_counts(comps, len(infos), path, "components")
    try:
        with torch.device("meta"):
            models = _build(comps, path)
    except CheckpointError:
        raise
    except Exception as e:  # bad types, impossible sizes, assertions inside torch modules
        raise CheckpointError(f"{path}: invalid model description ({type(e).__name__}: {error_reason(e)})") from None
    for prefix, expected in _expected_shapes(models).items():
        found = {k[len(prefix) :]: i.shape for k, i in infos.items() if k.startswith(prefix)}
        _check_shapes(expected, found, prefix.rstrip("."), f"{path} [{prefix.rstrip('.')}]")


def _scene_names(meta: Mapping[str, Any], path: Path) -> list[str]:
    names = meta.get("scene_names") or []
    if not isinstance(names, list) or not all(isinstance(n, str) and 0 < len(n) <= 128 for n in names):
        raise CheckpointError(f"{path}: scene_names must be a list of 1..128-character strings")
    if not all(n.isprintable() for n in names):
        raise CheckpointError(f"{path}: scene_names contain control characters")
    return list(names)


CAMERA_KEYS = ("fx", "fy", "cx", "cy", "width", "height")


def read_camera(camera: Any, path: Path) -> dict[str, float]:
    """Validate training-camera metadata ``{fx, fy, cx, cy, width, height}`` (extra keys such as ``K`` are dropped).

    Raises:
        CheckpointError: one sentence when a value is missing, not a finite positive number or out of range.
    """
    if not isinstance(camera, Mapping):
        raise CheckpointError(f"{path}: camera metadata is not a JSON object")
    out: dict[str, float] = {}
    for key in CAMERA_KEYS:
        v = camera.get(key)
        limit = 100_000.0 if key in ("width", "height") else 1e7
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v <= limit:
            raise CheckpointError(f"{path}: camera metadata {key} must be a number in (0, {limit:g}], got {quote(v)}")
        out[key] = int(v) if key in ("width", "height") else float(v)
    return out


def _calibration(d: Any, path: Path) -> Calibration:
    try:
        return Calibration.from_dict(d)
    except CalibrationError as e:
        raise CheckpointError(f"{path}: invalid uncertainty metadata ({error_reason(e)})") from None


def load_model(path: str | Path) -> ModelBundle:
    """Load a bundle written by :func:`save_model` (models in eval mode, float32).

    The header is validated and the described models are checked against it on the ``meta`` device before any
    weight memory is allocated; stale temporaries of ``path`` (older than :data:`STALE_TMP_AGE_S`) are removed.

    Raises:
        CheckpointError: one sentence for any missing, malformed, hostile or mismatching file.
    """
    from .preprocess import PreprocessConfig

    path = Path(path)
    clean_stale_tmp(path.parent, name=path.name, older_than_s=STALE_TMP_AGE_S)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file")
    infos, st_meta = read_safetensors_header(path)
    meta = _our_metadata(st_meta, path)
    comps = meta.get("components", {})
    scene_names = _scene_names(meta, path)
    preprocess = meta.get("preprocess") or DEFAULT_PREPROCESS
    provenance = meta.get("provenance") or {}
    try:
        PreprocessConfig.from_dict(preprocess)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid preprocess metadata ({error_reason(e)})") from None
    if not isinstance(provenance, dict):
        raise CheckpointError(f"{path}: provenance metadata is not a JSON object")
    calibration = _calibration(meta["uncertainty"], path) if meta.get("uncertainty") is not None else None
    trained_camera = read_camera(meta["camera"], path) if meta.get("camera") is not None else None
    if trained_camera is None and provenance.get("camera") is not None:  # models written before the camera key
        try:
            trained_camera = read_camera(provenance["camera"], path)
        except CheckpointError:
            trained_camera = None  # informational there: an unusable value is not checked
    orientation = _check_orientation(meta.get("orientation", "camera_to_world"), f"{path}: ")
    _dry_run(comps, infos, path)
    tensors, _ = read_safetensors(path)
    apr, iapr, pae = _build(comps, path)
    for prefix, model in (("apr.", apr), ("iapr.", iapr), ("pae.", pae)):
        if model is None:
            continue
        sd = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if model is iapr and iapr.mstransformer is apr:
            sd.update({"mstransformer." + k: v for k, v in apr.state_dict().items()})
        _load_strict(model, sd, f"{path} [{prefix.rstrip('.')}]")
    bundle = ModelBundle(
        apr, iapr, pae, scene_names, dict(preprocess), dict(provenance), calibration, trained_camera, orientation
    )
    return bundle.eval()


def load_bundle(
    model: str | Path,
    iapr: str | Path | None = None,
    pae: str | Path | None = None,
    scene_names: list[str] | None = None,
    orientation: str | None = None,
) -> ModelBundle:
    """Load a :class:`ModelBundle` from our ``.safetensors`` file or official checkpoints.

    ``orientation`` overrides the quaternion convention (official Cambridge Landmarks checkpoints regress
    ``world_to_camera`` rotations; official checkpoints carry no such metadata).

    ``model`` is our file or an official APR (or iAPR) checkpoint; ``iapr`` / ``pae`` are optional official files
    (the official pipeline uses a separate APR for the initial estimate).

    As in the original test code, a standalone PAE file is only kept as ``bundle.pae``; the iAPR uses its own.
    """
    model = Path(model)
    if model.suffix == ".safetensors":
        bundle = load_model(model)
    else:
        apr = load_official_checkpoint(model)
        if isinstance(apr, IAPR):  # an iAPR file alone: its own MS-Transformer is also the APR
            bundle = ModelBundle(apr=apr.mstransformer, iapr=apr, provenance={"apr": str(model), "iapr": str(model)})
        elif not isinstance(apr, MSTransformer):
            raise CheckpointError(f"{model}: expected an MS-Transformer (APR) checkpoint, found a {type(apr).__name__}")
        else:
            bundle = ModelBundle(apr=apr, provenance={"apr": str(model)})
        bundle.provenance["scene_names"] = "assumed from the scene count (official checkpoints carry no names)"
    if iapr is not None:
        m = load_official_checkpoint(iapr)
        if not isinstance(m, IAPR):
            raise CheckpointError(f"{iapr}: expected an iAPR checkpoint (keys 'rel_x_token', 'mstransformer.*')")
        bundle.iapr = m
        bundle.provenance["iapr"] = str(iapr)
    if pae is not None:
        m = load_official_checkpoint(pae)
        if not isinstance(m, PoseAutoEncoder):
            raise CheckpointError(f"{pae}: expected a pose auto-encoder checkpoint (keys 'x_encoder.*', 'q_encoder.*')")
        bundle.pae = m
        bundle.provenance["pae"] = str(pae)
    if scene_names:
        bundle.scene_names = list(scene_names)
    if orientation:
        bundle.orientation = orientation
    bundle.__post_init__()
    return bundle.eval()
