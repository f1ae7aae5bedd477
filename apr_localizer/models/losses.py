"""Training losses shared by MS-Transformer, PAE and iAPR training (model_spec.md §2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import quat_normalize_torch

__all__ = ["CameraPoseLoss", "orientation_distance", "scene_nll_loss"]


class CameraPoseLoss(nn.Module):
    """Position + orientation loss with optional learned (homoscedastic) weights.

    ``l_x = mean ‖x_gt − x_est‖_p`` (p = ``norm``, not squared), ``l_q = mean ‖q̂_gt − q̂_est‖_2`` (normalised; the
    spec's loss, sensitive to the sign of the label). With ``sign_invariant`` ``l_q = mean min(‖q̂_gt − q̂_est‖,
    ‖q̂_gt + q̂_est‖)``: q and −q are the same rotation, so a label that flips sign where w crosses 0 (a camera turning
    through 360° of yaw) no longer asks the network for a discontinuous output.
    Learnable: ``l_x·exp(−s_x) + s_x + l_q·exp(−s_q) + s_q``; fixed: ``s_x·l_x + s_q·l_q``.
    ``forward(est (B,7), gt (B,7)) -> (loss, l_x, l_q)`` scalars.
    """

    def __init__(
        self,
        learnable: bool = True,
        s_x: float = 0.0,
        s_q: float = -3.0,
        norm: float = 2,
        sign_invariant: bool = False,
    ) -> None:
        super().__init__()
        self.learnable = learnable
        self.norm = norm
        self.sign_invariant = sign_invariant
        self.s_x = nn.Parameter(torch.tensor([float(s_x)]), requires_grad=learnable)
        self.s_q = nn.Parameter(torch.tensor([float(s_q)]), requires_grad=learnable)

    def forward(self, est: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        l_x = torch.norm(gt[:, :3] - est[:, :3], p=self.norm, dim=1).mean()
        l_q = orientation_distance(est[:, 3:], gt[:, 3:], self.sign_invariant).mean()
        if self.learnable:
            loss = l_x * torch.exp(-self.s_x) + self.s_x + l_q * torch.exp(-self.s_q) + self.s_q
        else:
            loss = self.s_x * l_x + self.s_q * l_q
        return loss.squeeze(0), l_x, l_q


def orientation_distance(q_est: torch.Tensor, q_gt: torch.Tensor, sign_invariant: bool = False) -> torch.Tensor:
    """Per-sample ``‖q̂_gt − q̂_est‖`` ``(B,)`` of normalised quaternions ``(B,4)``; the smaller of ±q when asked."""
    a, b = quat_normalize_torch(q_gt), quat_normalize_torch(q_est)
    d = torch.norm(a - b, dim=1)
    return torch.minimum(d, torch.norm(a + b, dim=1)) if sign_invariant else d


def scene_nll_loss(scene_log_probs: torch.Tensor, scene: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the ground-truth scene ``(B,)`` under ``scene_log_probs (B,S)``."""
    return F.nll_loss(scene_log_probs, scene.reshape(-1).long())
