"""Camera Pose Auto-Encoders (Shavit & Keller, ECCV 2022), model_spec.md §6.

A PAE encodes a pose (and, in the multi-scene variant, the scene index) into the same latent space as an APR's
image latents, so that the APR's own heads can decode it and an RPR can compare an image with a pose.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

__all__ = ["PAEConfig", "PoseAutoEncoder", "build_pae", "nerf_encoding"]


def nerf_encoding(v: torch.Tensor, num_freqs: int = 6) -> torch.Tensor:
    """``[v, sin(2^0 v), cos(2^0 v), ..., sin(2^(F-1) v), cos(2^(F-1) v)]``; ``(..., d) -> (..., d*(2F+1))``.

    Frequencies are plain radian multipliers (no π), as in the official code.
    """
    parts = [v]
    for i in range(num_freqs):
        f = float(2**i)
        parts += [torch.sin(f * v), torch.cos(f * v)]
    return torch.cat(parts, dim=-1)


@dataclass
class PAEConfig:
    """Pose auto-encoder architecture; ``multi_scene=False`` is the single-scene ``PoseEncoder``."""

    multi_scene: bool = True
    encoder_dim: int = 256
    num_freqs: int = 6
    apply_positional_encoding: bool = True  # single-scene only; the multi-scene PAE always encodes
    shallow_mlp: bool = False  # single-scene only: one hidden layer of 64

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PAEConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown PAE config keys {sorted(unknown)}; expected a subset of {sorted(names)}")
        return cls(**d)


def _mlp(d_in: int, d_out: int, shallow: bool) -> nn.Sequential:
    dims = [d_in, 64] + ([] if shallow else [128, 256]) + [d_out]
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    for m in layers:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
    return nn.Sequential(*layers)


class PoseAutoEncoder(nn.Module):
    """Pose → latents ``(latent_t (B,D), latent_rot (B,D))``, same space as an MS-Transformer's selected latents.

    ``forward(pose (B,7), scene (B,) | (B,1) | None)`` — the scene index is used as a float and positionally encoded
    (multi-scene). The quaternion is **not** normalised here (the official PAE does not); iAPR normalises its
    neighbour pose before calling it.
    """

    def __init__(self, config: PAEConfig) -> None:
        super().__init__()
        c = self.config = config
        k = 2 * c.num_freqs + 1
        if c.multi_scene:
            self.x_encoder = _mlp(3 * k + k, c.encoder_dim, False)
            self.q_encoder = _mlp(4 * k + k, c.encoder_dim, False)
        else:
            mult = k if c.apply_positional_encoding else 1
            self.x_encoder = _mlp(3 * mult, c.encoder_dim, c.shallow_mlp)
            self.q_encoder = _mlp(4 * mult, c.encoder_dim, c.shallow_mlp)

    def encode_inputs(self, pose: torch.Tensor, scene: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """MLP inputs ``([PE(x) ‖ PE(scene)] (B,52), [PE(q) ‖ PE(scene)] (B,65))`` (multi-scene)."""
        c = self.config
        x, q = pose[..., :3], pose[..., 3:7]
        if not c.multi_scene:
            if not c.apply_positional_encoding:
                return x, q
            return nerf_encoding(x, c.num_freqs), nerf_encoding(q, c.num_freqs)
        if scene is None:
            raise ValueError("a multi-scene pose auto-encoder needs the scene index")
        s = nerf_encoding(scene.reshape(-1, 1).to(pose.dtype), c.num_freqs)
        return (
            torch.cat([nerf_encoding(x, c.num_freqs), s], dim=-1),
            torch.cat([nerf_encoding(q, c.num_freqs), s], dim=-1),
        )

    def forward(self, pose: torch.Tensor, scene: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        in_x, in_q = self.encode_inputs(pose, scene)
        return {"latent_t": self.x_encoder(in_x), "latent_rot": self.q_encoder(in_q)}


def build_pae(config: PAEConfig | dict | None = None) -> PoseAutoEncoder:
    """Build a pose auto-encoder from a config (dataclass, dict, or None for the multi-scene 7-scene default)."""
    if config is None:
        config = PAEConfig()
    elif isinstance(config, dict):
        config = PAEConfig.from_dict(config)
    return PoseAutoEncoder(config)
