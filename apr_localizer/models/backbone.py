"""EfficientNet-B0 feature extractor (torchvision) with the two MS-Transformer endpoints.

``reduction_4`` (stride 16, 112 channels) feeds the position branch and ``reduction_3`` (stride 8, 40 channels) the
orientation branch (model_spec.md §1.2). Only ``features[0..5]`` run: the later stages never influence the outputs.

``official=True`` makes the network numerically identical to the efficientnet_pytorch model inside the official
checkpoints: TF-"SAME" static padding (computed for a 224x224 input) on the five stride-2 convolutions and BatchNorm
eps 1e-3 / momentum 0.01 (inference_notes.md §2).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import efficientnet_b0

__all__ = ["TF_SAME_PADS", "EfficientNetB0Features", "SamePadConv2d", "calibrate_batchnorm", "fold_batchnorm"]

# torchvision module path → (left, right, top, bottom) zero padding of the official weights at 224 input.
TF_SAME_PADS: dict[str, tuple[int, int, int, int]] = {
    "0.0": (0, 1, 0, 1),  # stem 3x3 s2
    "2.0.block.1.0": (0, 1, 0, 1),  # block 1 depthwise 3x3 s2
    "3.0.block.1.0": (1, 2, 1, 2),  # block 3 depthwise 5x5 s2
    "4.0.block.1.0": (0, 1, 0, 1),  # block 5 depthwise 3x3 s2
    "6.0.block.1.0": (1, 2, 1, 2),  # block 11 depthwise 5x5 s2 (not run: stage 6 is cut off)
}

NUM_STAGES = 6  # features[0..5]: stem .. stage 5 (112 channels)


class SamePadConv2d(nn.Conv2d):
    """``nn.Conv2d`` with a constant asymmetric zero padding applied before it (state_dict names unchanged)."""

    def __init__(self, *args, static_pad: tuple[int, int, int, int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.static_pad = tuple(static_pad)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, pad: tuple[int, int, int, int]) -> SamePadConv2d:
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=0,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            static_pad=pad,
        )
        new.load_state_dict(conv.state_dict())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.static_pad))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", static_pad={self.static_pad}"


class EfficientNetB0Features(nn.Module):
    """EfficientNet-B0 trunk returning ``(reduction_4, reduction_3)``.

    Input ``(B, 3, H, W)`` normalised images; outputs ``(B, 112, H/16, W/16)`` and ``(B, 40, H/8, W/8)``.
    State-dict keys are torchvision's (``features.N....``) for the kept stages.
    """

    def __init__(self, official: bool = True) -> None:
        super().__init__()
        self.official = official
        norm = functools.partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01) if official else None
        net = efficientnet_b0(weights=None, norm_layer=norm) if norm else efficientnet_b0(weights=None)
        self.features = nn.Sequential(*list(net.features.children())[:NUM_STAGES])
        if official:
            for path, pad in TF_SAME_PADS.items():
                if int(path.split(".")[0]) >= NUM_STAGES:
                    continue
                parent_path, leaf = path.rsplit(".", 1)
                parent = self.features.get_submodule(parent_path)
                setattr(parent, leaf, SamePadConv2d.from_conv(getattr(parent, leaf), pad))
        for m in self.modules():  # inplace activations break nothing here, but keep graphs export-clean
            if isinstance(m, nn.SiLU):
                m.inplace = False

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images
        for i in range(4):
            x = self.features[i](x)
        red3 = x  # output of features[3]: 40 channels, stride 8 (efficientnet_pytorch "reduction_3")
        red4 = self.features[5](self.features[4](x))  # 112 channels, stride 16 ("reduction_4")
        return red4, red3


def unused_official_backbone_keys() -> dict[str, torch.Tensor]:
    """Freshly initialised tensors for the backbone parts the model never runs (stages 6-8 and the classifier).

    They exist in every official checkpoint; :func:`apr_localizer.checkpoints.to_official_state_dict` fills them in so
    that a file we export has the exact official key set. Values are deterministic (seed 0) and irrelevant.
    """
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        net = efficientnet_b0(weights=None, norm_layer=functools.partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01))
    finally:
        torch.random.set_rng_state(gen_state)
    sd = net.state_dict()
    return {k: v for k, v in sd.items() if not k.startswith("features.") or int(k.split(".")[1]) >= NUM_STAGES}


@torch.no_grad()
def calibrate_batchnorm(
    model: nn.Module, batches: int = 4, batch_size: int = 4, size: int = 224, seed: int = 0
) -> None:
    """Give a random-weight model realistic BatchNorm statistics (inference_notes.md §3).

    Fresh BN running stats (mean 0 / var 1) make EfficientNet activations vanish in eval mode, so every output
    becomes input-independent. This resets them, runs ``batches`` cumulative train-mode passes of random images
    through the backbone(s) in ``model`` and returns the model in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    backbones = [m for m in model.modules() if isinstance(m, EfficientNetB0Features)]
    bns = [m for b in backbones for m in b.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    for b in backbones:
        b.train()
        for _ in range(batches):
            b(torch.randn(batch_size, 3, size, size, generator=gen))
    for bn, m in zip(bns, saved):
        bn.momentum = m
    model.eval()


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode ``BatchNorm2d`` that follows a ``Conv2d`` in a Sequential into the conv (in place).

    For inference only: outputs equal the unfolded model's up to float rounding, one op less per conv. Returns
    ``model`` (put in eval mode).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
    return model
