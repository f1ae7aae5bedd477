"""MS-Transformer: multi-scene absolute pose regression (Shavit et al., ICCV 2021), model_spec.md §1.

Two DETR transformers (position: stride-16 features, orientation: stride-8 features) decode one latent per scene
query; a linear scene classifier picks the scene; shared (or per-scene) MLP heads regress ``[x, y, z]`` and the raw,
**unnormalised** w-first quaternion from the selected scene's latents.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import EfficientNetB0Features
from .transformer import DETRTransformer

__all__ = [
    "MSTransformer",
    "MSTransformerConfig",
    "PoseRegressor",
    "PositionEmbeddingLearned",
    "build_ms_transformer",
]


@dataclass
class MSTransformerConfig:
    """Architecture of an MS-Transformer (defaults: the published 7-Scenes model of the PAE/iAPR repo)."""

    num_scenes: int = 7
    hidden_dim: int = 256
    nheads: int = 8
    dim_feedforward: int = 256
    dropout: float = 0.1
    t_encoder_layers: int = 6
    t_decoder_layers: int = 6
    rot_encoder_layers: int = 6
    rot_decoder_layers: int = 6
    per_scene_heads: bool = False  # "ms-transposenet" variant: one head per scene
    official_backbone: bool = True  # TF-SAME padding + BN eps 1e-3 (needed by official weights)
    head_dim: int = 1024

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MSTransformerConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(
                f"unknown MS-Transformer config keys {sorted(unknown)}; expected a subset of {sorted(names)}"
            )
        return cls(**d)


class PositionEmbeddingLearned(nn.Module):
    """Learned DETR positional encoding: ``pos[:, y, x] = [col_embed[x] ‖ row_embed[y]]``.

    ``forward(h, w) -> (1, h*w, 2*num_pos_feats)`` flattened row-major, the same for every image.
    """

    def __init__(self, num_pos_feats: int = 128, max_size: int = 50) -> None:
        super().__init__()
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, h: int, w: int) -> torch.Tensor:
        max_size = self.row_embed.num_embeddings
        if h > max_size or w > max_size:
            raise ValueError(f"feature map {h}x{w} exceeds the positional encoding size {max_size}")
        col = self.col_embed.weight[:w]  # (w, F)
        row = self.row_embed.weight[:h]  # (h, F)
        pos = torch.cat([col.unsqueeze(0).expand(h, w, -1), row.unsqueeze(1).expand(h, w, -1)], dim=-1)
        return pos.reshape(1, h * w, -1)


class PoseRegressor(nn.Module):
    """``Linear(d → hidden) → GELU → Linear(hidden → out)``; ``(B, d) -> (B, out)``."""

    def __init__(self, d: int, out: int, hidden: int = 1024, init: str = "xavier") -> None:
        super().__init__()
        self.fc_h = nn.Linear(d, hidden)
        self.fc_o = nn.Linear(hidden, out)
        for m in (self.fc_h, self.fc_o):
            if init == "xavier":
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_o(F.gelu(self.fc_h(x)))


def _project_tokens(proj: nn.Conv2d, feat: torch.Tensor) -> torch.Tensor:
    """1x1 convolution ``(B,C,h,w)`` → tokens ``(B,h*w,D)`` as one matmul on the flattened map (no conv, no copy)."""
    w = proj.weight.reshape(proj.out_channels, proj.in_channels)
    return F.linear(feat.flatten(2).transpose(1, 2), w, proj.bias)


class MSTransformer(nn.Module):
    """Multi-scene absolute pose regressor.

    ``model(images, scene=None)`` with ``images (B,3,H,W)`` normalised (224x224 for official weights) and an optional
    forced ``scene (B,)`` int64 (entries < 0 mean "use the classifier's argmax"). Returns a dict:

    * ``pose (B,7)`` ``[x,y,z,qw,qx,qy,qz]``, quaternion raw (not normalised),
    * ``scene_log_probs (B,S)`` log-softmax over scenes (independent of a forced scene),
    * ``scene (B,)`` int64 selected scene (forced or argmax),
    * ``latent_t (B,D)``, ``latent_rot (B,D)`` the selected scene's decoder outputs.
    """

    def __init__(self, config: MSTransformerConfig) -> None:
        super().__init__()
        c = self.config = config
        d = c.hidden_dim
        self.backbone = EfficientNetB0Features(official=c.official_backbone)
        self.position_embedding = PositionEmbeddingLearned(d // 2)
        # registration order = the official state_dict order
        self.transformer_t = DETRTransformer(
            d, c.nheads, c.t_encoder_layers, c.t_decoder_layers, c.dim_feedforward, c.dropout
        )
        self.transformer_rot = DETRTransformer(
            d, c.nheads, c.rot_encoder_layers, c.rot_decoder_layers, c.dim_feedforward, c.dropout
        )
        self.input_proj_t = nn.Conv2d(112, d, kernel_size=1)
        self.input_proj_rot = nn.Conv2d(40, d, kernel_size=1)
        self.query_embed_t = nn.Embedding(c.num_scenes, d)
        self.query_embed_rot = nn.Embedding(c.num_scenes, d)
        self.scene_embed = nn.Linear(2 * d, 1)
        self.regressor_head_t: nn.Module
        self.regressor_head_rot: nn.Module
        if c.per_scene_heads:
            self.regressor_head_t = nn.ModuleList([PoseRegressor(d, 3, c.head_dim) for _ in range(c.num_scenes)])
            self.regressor_head_rot = nn.ModuleList([PoseRegressor(d, 4, c.head_dim) for _ in range(c.num_scenes)])
        else:
            self.regressor_head_t = PoseRegressor(d, 3, c.head_dim)
            self.regressor_head_rot = PoseRegressor(d, 4, c.head_dim)

    @property
    def num_scenes(self) -> int:
        return self.config.num_scenes

    # ------------------------------------------------------------------------------------------------ stages
    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Backbone + both transformers + scene classifier (no selection).

        Returns ``features_t (B,112,h,w)``, ``features_rot (B,40,2h,2w)``, ``local_t (B,S,D)``, ``local_rot (B,S,D)``,
        ``scene_logits (B,S)``, ``scene_log_probs (B,S)``.
        """
        feat_t, feat_rot = self.backbone(images)
        h_rot, w_rot = feat_rot.shape[-2:]
        h_t, w_t = feat_t.shape[-2:]
        pos_rot = self.position_embedding(h_rot, w_rot)  # (1, h_rot*w_rot, D)
        # The coarse map's encoding is the top-left corner of the shared embedding (not a downsampled copy).
        pos_t = self.position_embedding(h_t, w_t)
        src_t = _project_tokens(self.input_proj_t, feat_t)  # (B, h*w, D)
        src_rot = _project_tokens(self.input_proj_rot, feat_rot)
        local_t = self.transformer_t(src_t, pos_t, self.query_embed_t.weight)  # (B, S, D)
        local_rot = self.transformer_rot(src_rot, pos_rot, self.query_embed_rot.weight)
        logits = self.scene_embed(torch.cat([local_t, local_rot], dim=-1)).squeeze(-1)  # (B, S)
        return {
            "features_t": feat_t,
            "features_rot": feat_rot,
            "local_t": local_t,
            "local_rot": local_rot,
            "scene_logits": logits,
            "scene_log_probs": F.log_softmax(logits, dim=1),
        }

    def select(
        self, enc: dict[str, torch.Tensor], scene: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pick one scene slot per image: forced ``scene`` where ``>= 0``, else the argmax.

        Returns ``(scene (B,), one_hot (B,S), latent_t (B,D), latent_rot (B,D))``. Export-friendly: a one-hot mask
        and a sum, no data-dependent indexing.
        """
        log_probs = enc["scene_log_probs"]
        argmax = log_probs.argmax(dim=1)
        if scene is not None:
            scene = scene.reshape(-1).to(argmax.dtype)
            argmax = torch.where(scene >= 0, scene, argmax)
        one_hot = (torch.arange(log_probs.shape[1], device=log_probs.device) == argmax.unsqueeze(1)).to(
            enc["local_t"].dtype
        )
        latent_t = (enc["local_t"] * one_hot.unsqueeze(-1)).sum(1)
        latent_rot = (enc["local_rot"] * one_hot.unsqueeze(-1)).sum(1)
        return argmax, one_hot, latent_t, latent_rot

    def decode_pose(
        self, latent_t: torch.Tensor, latent_rot: torch.Tensor, one_hot: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Regressor heads: latents ``(B,D)`` → raw pose ``(B,7)``. Per-scene heads need ``one_hot (B,S)``."""
        if not self.config.per_scene_heads:
            return torch.cat([self.regressor_head_t(latent_t), self.regressor_head_rot(latent_rot)], dim=-1)
        if one_hot is None:
            raise ValueError("a model with per-scene heads needs the selected scene to decode a pose")
        heads_t, heads_rot = cast(nn.ModuleList, self.regressor_head_t), cast(nn.ModuleList, self.regressor_head_rot)
        t = torch.stack([h(latent_t) for h in heads_t], dim=1)  # (B, S, 3)
        q = torch.stack([h(latent_rot) for h in heads_rot], dim=1)  # (B, S, 4)
        w = one_hot.unsqueeze(-1)
        return torch.cat([(t * w).sum(1), (q * w).sum(1)], dim=-1)

    def forward(self, images: torch.Tensor, scene: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        enc = self.encode(images)
        sel, one_hot, latent_t, latent_rot = self.select(enc, scene)
        return {
            "pose": self.decode_pose(latent_t, latent_rot, one_hot),
            "scene_log_probs": enc["scene_log_probs"],
            "scene": sel,
            "latent_t": latent_t,
            "latent_rot": latent_rot,
        }


def build_ms_transformer(config: MSTransformerConfig | dict | None = None) -> MSTransformer:
    """Build an MS-Transformer from a config (dataclass, dict, or None for the defaults)."""
    if config is None:
        config = MSTransformerConfig()
    elif isinstance(config, dict):
        config = MSTransformerConfig.from_dict(config)
    return MSTransformer(config)
