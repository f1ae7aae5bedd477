"""Model files: official checkpoints (raw state_dicts) in and out, our own format (safetensors + JSON) in and out.

Official files (model_spec.md §9) are read with ``torch.load(weights_only=True)``; their kind (MS-Transformer, PAE,
iAPR) and structure (scene count, layer counts, FFN width, per-scene heads) are read from the keys, never from a
config. The efficientnet_pytorch backbone names are mapped to torchvision's (inference_notes.md §2.4).

Our format is one ``.safetensors`` file holding every component (``apr.*``, ``iapr.*``, ``pae.*``) with a JSON
document in the header metadata (key ``apr_localizer``): architecture configs, scene names, preprocessing,
provenance. No pickle anywhere.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models.backbone import NUM_STAGES, unused_official_backbone_keys
from .models.ms_transformer import MSTransformer, MSTransformerConfig
from .models.pae import PAEConfig, PoseAutoEncoder
from .models.rpr import IAPR, IAPRConfig

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


class CheckpointError(ValueError):
    """A model file is missing, unreadable, or not what was expected (the message is one sentence)."""


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
    if "x_encoder.0.weight" in keys and "q_encoder.0.weight" in keys and all(
        k.startswith(("x_encoder.", "q_encoder.")) for k in keys
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
                    f"{source}: unknown EfficientNet-B0 key '{k}' (expected efficientnet_pytorch names)"
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
        sample = ", ".join(sorted(sd)[:4])
        raise CheckpointError(
            f"{source}: not an MS-Transformer, pose auto-encoder or iAPR state_dict (expected keys such as "
            f"'query_embed_t.weight', 'x_encoder.0.weight' or 'rel_x_token'; found {sample}, ...)"
        )
    _load_strict(model, ours, source)
    return model.eval()


def _load_strict(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(
            f"{source}: keys do not match the {type(model).__name__} they describe: {'; '.join(parts)}"
        )
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(
                f"{source}: tensor '{k}' has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}"
            )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt zip, pickled classes, not a torch file at all
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: cannot be read as a raw PyTorch state_dict with weights_only=True ({reason})"
        ) from None
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model_state_dict", "model"):
            if wrapper in obj and isinstance(obj[wrapper], Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state_dict (a mapping of parameter names to tensors)")
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
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(to_official_state_dict(model), str(path))
    return path


# ------------------------------------------------------------------------------------------- our format
def default_scene_names(num_scenes: int) -> list[str]:
    """Scene names for an official checkpoint (which carries none): 7-Scenes / Cambridge order, else scene_i."""
    if num_scenes == 7:
        return list(SEVEN_SCENES)
    if num_scenes == 4:
        return list(CAMBRIDGE_FOUR)
    return [f"scene_{i}" for i in range(num_scenes)]


@dataclass
class ModelBundle:
    """What the runtime needs: the APR, optional iAPR (and standalone PAE), scene names, preprocessing, provenance.

    ``iapr.mstransformer is apr`` means the iAPR shares the APR's image encoder: latents are computed once.
    """

    apr: MSTransformer
    iapr: IAPR | None = None
    pae: PoseAutoEncoder | None = None
    scene_names: list[str] = field(default_factory=list)
    preprocess: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_PREPROCESS))
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
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
) -> Path:
    """Write a model bundle as one safetensors file with JSON metadata. ``dtype=torch.float16`` halves the size.

    BatchNorm counters and other integer buffers keep their dtype.
    """
    from safetensors.torch import save_file

    bundle = ModelBundle(apr, iapr, pae, list(scene_names or []), dict(preprocess or DEFAULT_PREPROCESS))
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    return path


def read_json_metadata(path: str | Path, key: str, what: str = "model") -> dict[str, Any] | None:
    """Return the JSON document stored under ``key`` in a safetensors header (None when there is none).

    Reads only the header. A missing or unreadable file, or invalid JSON, raises :class:`CheckpointError`.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such {what} file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(key)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e)[:120]})") from None
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt {key} metadata ({e})") from None


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Read the JSON metadata of one of our model files (cheap: reads only the header)."""
    meta = read_json_metadata(path, METADATA_KEY)
    if meta is None:
        raise CheckpointError(f"{path}: safetensors file without apr_localizer metadata (not written by save_model)")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: model format version {meta.get('format_version')} is newer than this apr_localizer supports "
            f"({FORMAT_VERSION})"
        )
    return meta


def load_model(path: str | Path) -> ModelBundle:
    """Load a bundle written by :func:`save_model` (models in eval mode, float32)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the tensors ({str(e)[:120]})") from None
    comps = meta.get("components", {})
    if "apr" not in comps:
        raise CheckpointError(f"{path}: the model file has no APR (MS-Transformer) component")

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    try:
        apr = MSTransformer(MSTransformerConfig.from_dict(comps["apr"]["config"]))
        _load_strict(apr, part("apr."), f"{path} [apr]")
        iapr = None
        if "iapr" in comps:
            shares = bool(comps["iapr"].get("shares_apr_encoder"))
            iapr = IAPR(IAPRConfig.from_dict(comps["iapr"]["config"]), apr if shares else None)
            sd = part("iapr.")
            if shares:
                sd.update({"mstransformer." + k: v for k, v in apr.state_dict().items()})
            _load_strict(iapr, sd, f"{path} [iapr]")
        pae = None
        if "pae" in comps:
            pae = PoseAutoEncoder(PAEConfig.from_dict(comps["pae"]["config"]))
            _load_strict(pae, part("pae."), f"{path} [pae]")
    except (ValueError, TypeError, KeyError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: invalid model description ({e})") from None
    bundle = ModelBundle(
        apr=apr,
        iapr=iapr,
        pae=pae,
        scene_names=list(meta.get("scene_names") or []),
        preprocess=dict(meta.get("preprocess") or DEFAULT_PREPROCESS),
        provenance=dict(meta.get("provenance") or {}),
    )
    return bundle.eval()


def load_bundle(
    model: str | Path,
    iapr: str | Path | None = None,
    pae: str | Path | None = None,
    scene_names: list[str] | None = None,
) -> ModelBundle:
    """Load a :class:`ModelBundle` from our ``.safetensors`` file or official checkpoints.

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
    bundle.__post_init__()
    return bundle.eval()
