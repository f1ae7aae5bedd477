"""EfficientNet-B0 feature extractor (torchvision) with the two MS-Transformer endpoints.

``reduction_4`` (stride 16, 112 channels) feeds the position branch and ``reduction_3`` (stride 8, 40 channels) the
orientation branch (model_spec.md §1.2). Only ``features[0..5]`` run: the later stages never influence the outputs.

``official=True`` makes the network numerically identical to the efficientnet_pytorch model inside the official
checkpoints: TF-"SAME" static padding (computed for a 224x224 input) on the five stride-2 convolutions and BatchNorm
eps 1e-3 / momentum 0.01 (inference_notes.md §2). ``official=False`` is torchvision's network unchanged (symmetric
padding, BatchNorm eps 1e-5), the one torchvision's ImageNet weights were trained for.

Pretrained weights (:func:`backbone_state_dict`): ``"imagenet"`` (torchvision's
``EfficientNet_B0_Weights.IMAGENET1K_V1``, read from the torch hub cache or downloaded there) or a local torchvision
state_dict file; :func:`variant_for_weights` names the variant that matches them.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import efficientnet_b0

__all__ = [
    "IMAGENET",
    "TF_SAME_PADS",
    "BackboneWeightsError",
    "EfficientNetB0Features",
    "SamePadConv2d",
    "backbone_state_dict",
    "calibrate_batchnorm",
    "fold_batchnorm",
    "imagenet_weights_file",
    "load_backbone_state_dict",
    "variant_for_weights",
]

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


# --------------------------------------------------------------------------------------------- pretrained weights
IMAGENET = "imagenet"
_DOWNLOAD_TIMEOUT_S = 30.0


class BackboneWeightsError(ValueError):
    """Pretrained backbone weights cannot be found, read or loaded (the message names the file)."""


def _imagenet_url() -> str:
    from torchvision.models import EfficientNet_B0_Weights

    return str(EfficientNet_B0_Weights.IMAGENET1K_V1.url)


def imagenet_weights_file() -> Path:
    """Where torchvision keeps the ImageNet EfficientNet-B0 weights: ``<torch hub dir>/checkpoints/<file name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(_imagenet_url())


def variant_for_weights(source: str | Path | None) -> str:
    """Backbone variant for pretrained weights: ``"torchvision"`` for ImageNet/torchvision files, else ``"official"``.

    ``None`` (training from scratch) keeps the ``official`` variant, whose files export to the official format.
    """
    return "official" if source is None else "torchvision"


def backbone_state_dict(source: str | Path) -> dict[str, torch.Tensor]:
    """Torchvision EfficientNet-B0 state_dict from ``"imagenet"`` (hub cache, downloaded if absent) or a file."""
    if str(source) == IMAGENET:
        path = imagenet_weights_file()
        if not path.is_file():
            url = _imagenet_url()
            path.parent.mkdir(parents=True, exist_ok=True)
            old = socket.getdefaulttimeout()
            socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
            try:
                torch.hub.download_url_to_file(url, str(path), progress=False)
            except Exception as e:  # offline, proxy, TLS: all the same to the user
                raise BackboneWeightsError(
                    f"the ImageNet EfficientNet-B0 weights are not in the torch hub cache and could not be downloaded "
                    f"({type(e).__name__}); download {url} and place it at {path}, or pass a local torchvision "
                    "weight file"
                ) from None
            finally:
                socket.setdefaulttimeout(old)
    else:
        path = Path(source)
        if not path.is_file():
            raise BackboneWeightsError(f"backbone weights {path} do not exist; expected a torchvision state_dict file")
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise BackboneWeightsError(
            f"{path} cannot be read as a state_dict with weights_only=True ({str(e)[:120]})"
        ) from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not any(str(k).startswith("features.") for k in sd):
        raise BackboneWeightsError(f"{path} is not a torchvision EfficientNet-B0 state_dict (no 'features.*' keys)")
    return sd


def load_backbone_state_dict(backbone: EfficientNetB0Features, sd: dict[str, torch.Tensor], source: str = "") -> int:
    """Copy the ``features.0..5`` tensors of a torchvision state_dict into ``backbone``; return how many.

    Every tensor the backbone has must be present with the same shape; later stages and the classifier are ignored.
    """
    own = backbone.state_dict()
    missing = [k for k in own if k not in sd]
    if missing:
        raise BackboneWeightsError(
            f"{source}: {len(missing)} EfficientNet-B0 tensors are missing (e.g. {', '.join(missing[:3])}); "
            "expected a torchvision efficientnet_b0 state_dict"
        )
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise BackboneWeightsError(
                f"{source}: tensor {k!r} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}"
            )
    backbone.load_state_dict({k: sd[k].to(v.dtype) for k, v in own.items()}, strict=True)
    return len(own)
