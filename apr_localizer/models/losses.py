"""Training losses shared by MS-Transformer, PAE and iAPR training (model_spec.md §2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import quat_normalize_torch

__all__ = ["CameraPoseLoss", "scene_nll_loss"]


class CameraPoseLoss(nn.Module):
    """Position + orientation loss with optional learned (homoscedastic) weights.

    ``l_x = mean ‖x_gt − x_est‖_p`` (p = ``norm``, not squared), ``l_q = mean ‖q̂_gt − q̂_est‖_2`` (normalised, no
    q/−q handling). Learnable: ``l_x·exp(−s_x) + s_x + l_q·exp(−s_q) + s_q``; fixed: ``s_x·l_x + s_q·l_q``.
    ``forward(est (B,7), gt (B,7)) -> (loss, l_x, l_q)`` scalars.
    """

    def __init__(self, learnable: bool = True, s_x: float = 0.0, s_q: float = -3.0, norm: float = 2) -> None:
        super().__init__()
        self.learnable = learnable
        self.norm = norm
        self.s_x = nn.Parameter(torch.tensor([float(s_x)]), requires_grad=learnable)
        self.s_q = nn.Parameter(torch.tensor([float(s_q)]), requires_grad=learnable)

    def forward(self, est: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        l_x = torch.norm(gt[:, :3] - est[:, :3], p=self.norm, dim=1).mean()
        l_q = torch.norm(quat_normalize_torch(gt[:, 3:]) - quat_normalize_torch(est[:, 3:]), dim=1).mean()
        if self.learnable:
            loss = l_x * torch.exp(-self.s_x) + self.s_x + l_q * torch.exp(-self.s_q) + self.s_q
        else:
            loss = self.s_x * l_x + self.s_q * l_q
        return loss.squeeze(0), l_x, l_q


def scene_nll_loss(scene_log_probs: torch.Tensor, scene: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the ground-truth scene ``(B,)`` under ``scene_log_probs (B,S)``."""
    return F.nll_loss(scene_log_probs, scene.reshape(-1).long())
