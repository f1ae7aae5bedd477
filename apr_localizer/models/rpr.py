"""iAPR: a PAE-based relative pose regressor applied iteratively (model_spec.md §7).

The regressor compares the query image's latents (from its own MS-Transformer, scene forced) with the latents the
PAE produces for a neighbour pose, and regresses rel(query → neighbour). At test time the neighbour is the current
estimate; the flipped prediction composed with it gives the next estimate.

Unlike the original loop, :meth:`IAPR.refine` computes the image latents **once** and iterates only PAE + RPR (the
latents do not change between iterations); ``cache_latents=False`` reproduces the original loop shape.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from ..geometry import iapr_update_torch, quat_normalize_torch
from .ms_transformer import MSTransformer, MSTransformerConfig, PoseRegressor
from .pae import PAEConfig, PoseAutoEncoder
from .transformer import PostNormEncoder

__all__ = ["IAPR", "IAPRConfig", "build_iapr", "localize_apr_iapr"]


@dataclass
class IAPRConfig:
    """iAPR (``VTRPR``) architecture: its own MS-Transformer and multi-scene PAE plus the RPR encoder and heads."""

    ms_transformer: MSTransformerConfig = field(default_factory=MSTransformerConfig)
    pae: PAEConfig = field(default_factory=PAEConfig)
    rpr_num_heads: int = 4
    rpr_dim_feedforward: int = 2048
    rpr_dropout: float = 0.1
    rpr_num_encoder_layers: int = 2
    num_iterations: int = 3

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> IAPRConfig:
        d = dict(d)
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown iAPR config keys {sorted(unknown)}; expected a subset of {sorted(names)}")
        ms = d.pop("ms_transformer", {})
        pae = d.pop("pae", {})
        return cls(
            ms_transformer=ms if isinstance(ms, MSTransformerConfig) else MSTransformerConfig.from_dict(ms),
            pae=pae if isinstance(pae, PAEConfig) else PAEConfig.from_dict(pae),
            **d,
        )


class IAPR(nn.Module):
    """PAE-based relative pose regressor with its own MS-Transformer and PAE.

    * ``rel_from_latents(latent_t, latent_rot, neighbour_pose (B,7), scene (B,)) -> rel (B,7)``: rel(query→neighbour),
      quaternion raw.
    * ``forward(images, scene, neighbour_pose) -> {"rel_pose": (B,7)}`` (training: scene forced, image latents
      computed here).
    * ``refine(images, initial_pose, scene, iterations) -> {"pose": (B,7), "poses": (N,B,7)}``.
    """

    def __init__(self, config: IAPRConfig, mstransformer: MSTransformer | None = None) -> None:
        super().__init__()
        c = self.config = config
        d = c.ms_transformer.hidden_dim
        if c.pae.encoder_dim != d:
            raise ValueError(f"PAE encoder_dim {c.pae.encoder_dim} must equal the MS-Transformer hidden_dim {d}")
        self.rel_x_token = nn.Parameter(torch.zeros(1, d))
        self.rel_q_token = nn.Parameter(torch.zeros(1, d))
        self.mstransformer = mstransformer if mstransformer is not None else MSTransformer(c.ms_transformer)
        self.pae = PoseAutoEncoder(c.pae)
        self.rpr_transformer_encoder = PostNormEncoder(
            d, c.rpr_num_heads, c.rpr_num_encoder_layers, c.rpr_dim_feedforward, c.rpr_dropout
        )
        self.ln = nn.LayerNorm(d)
        self.rel_regressor_x = PoseRegressor(d, 3, init="kaiming")
        self.rel_regressor_q = PoseRegressor(d, 4, init="kaiming")
        for m in self.rpr_transformer_encoder.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    def rel_from_latents(
        self,
        latent_t: torch.Tensor,
        latent_rot: torch.Tensor,
        neighbour_pose: torch.Tensor,
        scene: torch.Tensor,
    ) -> torch.Tensor:
        """Relative pose rel(query→neighbour) ``(B,7)`` from query latents ``(B,D)`` and a neighbour pose ``(B,7)``."""
        ref = self.pae(neighbour_pose, scene.reshape(-1, 1).to(neighbour_pose.dtype))
        B = latent_t.shape[0]
        tokens = torch.stack(
            [
                self.rel_x_token.expand(B, -1),
                self.rel_q_token.expand(B, -1),
                latent_t,
                latent_rot,
                ref["latent_t"],
                ref["latent_rot"],
            ],
            dim=1,
        )  # (B, 6, D), no positional encoding
        # The original runs the encoder twice (once per output token); both runs are identical in eval mode.
        out = self.ln(self.rpr_transformer_encoder(tokens)[:, :2])
        return torch.cat([self.rel_regressor_x(out[:, 0]), self.rel_regressor_q(out[:, 1])], dim=-1)

    def query_latents(self, images: torch.Tensor, scene: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the query latents ``(B,D)`` x2 from this model's MS-Transformer with the scene forced."""
        out = self.mstransformer(images, scene=scene)
        return out["latent_t"], out["latent_rot"]

    def forward(
        self, images: torch.Tensor, scene: torch.Tensor, neighbour_pose: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        latent_t, latent_rot = self.query_latents(images, scene)
        return {"rel_pose": self.rel_from_latents(latent_t, latent_rot, neighbour_pose, scene)}

    def step(
        self, latent_t: torch.Tensor, latent_rot: torch.Tensor, pose: torch.Tensor, scene: torch.Tensor
    ) -> torch.Tensor:
        """One refinement iteration: current estimate ``(B,7)`` → next estimate (unit quaternion, ``w >= 0``)."""
        neighbour = torch.cat([pose[:, :3], quat_normalize_torch(pose[:, 3:])], dim=-1)
        rel = self.rel_from_latents(latent_t, latent_rot, neighbour, scene)
        return iapr_update_torch(neighbour, rel)

    def refine(
        self,
        images: torch.Tensor,
        initial_pose: torch.Tensor,
        scene: torch.Tensor,
        iterations: int | None = None,
        cache_latents: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Iterate ``iterations`` (default: config) refinement steps from ``initial_pose (B,7)``.

        Returns ``pose (B,7)`` (the final estimate) and ``poses (N,B,7)`` (one per iteration). With
        ``cache_latents=False`` the MS-Transformer is re-run every iteration, as the original code does.
        """
        n = self.config.num_iterations if iterations is None else int(iterations)
        scene = scene.reshape(-1)
        pose = initial_pose
        poses = []
        latents = self.query_latents(images, scene) if cache_latents else None
        for _ in range(n):
            lt, lr = latents if latents is not None else self.query_latents(images, scene)
            pose = self.step(lt, lr, pose, scene)
            poses.append(pose)
        stacked = torch.stack(poses) if poses else initial_pose.new_zeros((0,) + tuple(initial_pose.shape))
        return {"pose": pose, "poses": stacked}


def build_iapr(config: IAPRConfig | dict | None = None, mstransformer: MSTransformer | None = None) -> IAPR:
    """Build an iAPR model; pass ``mstransformer`` to share an existing APR as its image encoder."""
    if config is None:
        config = IAPRConfig()
    elif isinstance(config, dict):
        config = IAPRConfig.from_dict(config)
    return IAPR(config, mstransformer)


@torch.no_grad()
def localize_apr_iapr(
    apr: MSTransformer, iapr: IAPR | None, images: torch.Tensor, iterations: int | None = None
) -> dict[str, torch.Tensor]:
    """Run the official test pipeline: APR (scene withheld) → initial pose + argmax scene → iAPR refinement.

    Returns ``apr_pose``, ``scene``, ``scene_log_probs``, ``pose`` (final) and ``poses (N,B,7)``. When ``iapr`` shares
    ``apr`` as its MS-Transformer the image is encoded once for both.
    """
    out = apr(images)
    result = {"apr_pose": out["pose"], "scene": out["scene"], "scene_log_probs": out["scene_log_probs"]}
    if iapr is None or (iterations is not None and iterations <= 0):
        result.update(pose=out["pose"], poses=out["pose"].new_zeros((0,) + tuple(out["pose"].shape)))
        return result
    if iapr.mstransformer is apr:
        lt, lr = out["latent_t"], out["latent_rot"]
        n = iapr.config.num_iterations if iterations is None else int(iterations)
        pose, poses = out["pose"], []
        for _ in range(n):
            pose = iapr.step(lt, lr, pose, out["scene"])
            poses.append(pose)
        result.update(pose=pose, poses=torch.stack(poses))
    else:
        result.update(iapr.refine(images, out["pose"], out["scene"], iterations))
    return result
