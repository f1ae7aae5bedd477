"""Training-time image transforms (model_spec.md §4.2), on uint8 tensors with torchvision.transforms.v2.

* :class:`TrainTransform`: Resize(256) → RandomCrop(224) → ColorJitter(0.5, 0.5, 0.5, 0.2) → float → Normalize
  (the spec's defaults; the jitter strengths and a RandomResizedCrop scale range are options of the robot recipe).
  Resize is antialiased bilinear on uint8 (within about one grey level of the PIL resize used upstream) and the
  colour jitter also runs on uint8, as upstream jitters PIL images before ``ToTensor``.
* The test transform is :class:`apr_localizer.preprocess.EvalTransform` (one preprocessing function for training,
  evaluation and the node); :func:`build_train_transform` returns it for ``no_augment`` (Cambridge initial training,
  PAE training).
* :class:`DecoderTransform`: the image decoder's target, Resize(72) → CenterCrop(64) → float in [0, 1], no
  normalisation.

Sizes and normalisation constants come from :class:`apr_localizer.preprocess.PreprocessConfig`. Every transform takes
an ``H x W x 3`` uint8 RGB numpy array (or a ``3 x H x W`` uint8 tensor) and is picklable for DataLoader workers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

from apr_localizer.preprocess import EvalTransform, PreprocessConfig

__all__ = [
    "DecoderTransform",
    "TrainTransform",
    "build_eval_transform",
    "build_train_transform",
    "resize_shorter_uint8",
    "to_chw_uint8",
]


def to_chw_uint8(image: Any) -> torch.Tensor:
    """``3 x H x W`` uint8 tensor from an ``H x W x 3`` (or ``H x W``) uint8 numpy array / PIL image, or a CHW tensor.

    Numpy input is wrapped without a copy when it is writable (the result is a channels-last view).
    """
    if isinstance(image, torch.Tensor):
        t = image
        if t.ndim == 2:
            t = t.unsqueeze(0).expand(3, -1, -1)
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"image tensor has shape {tuple(image.shape)}; expected (3, H, W)")
    else:
        a = np.asarray(image)
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        if a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"image array has shape {a.shape}; expected (H, W, 3) RGB")
        if not a.flags.writeable:
            a = a.copy()
        t = torch.from_numpy(a).permute(2, 0, 1)
    if t.dtype != torch.uint8:
        raise ValueError(f"image has dtype {t.dtype}; expected uint8")
    return t


def resize_shorter_uint8(image: np.ndarray, short_side: int) -> np.ndarray:
    """``H x W x 3`` uint8 → shorter side ``short_side`` with the transforms' own Resize (antialiased bilinear).

    Resizing the result again to ``short_side`` is an identity, so images cached at this size give the same samples.
    """
    op = v2.Resize(short_side, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    return op(to_chw_uint8(image)).permute(1, 2, 0).contiguous().numpy()


class TrainTransform:
    """Train augmentation: ``image (H, W, 3) uint8 RGB -> (3, crop, crop) float32``, ImageNet-normalised.

    Resize(shorter side ``config.resize``, antialiased bilinear) → RandomCrop(``config.crop``) →
    ColorJitter(brightness, contrast, saturation, hue) (when ``jitter``) → float in [0, 1] → Normalize(mean, std).
    With ``crop_scale_min < 1`` the crop is a square RandomResizedCrop of the resized image covering
    ``[crop_scale_min, 1]`` of the largest centred square's area (zoom augmentation), resized to ``config.crop``.
    Random draws use torch's global generator (seeded per DataLoader worker).
    """

    def __init__(
        self,
        config: PreprocessConfig | None = None,
        jitter: bool = True,
        brightness: float = 0.5,
        contrast: float = 0.5,
        saturation: float = 0.5,
        hue: float = 0.2,
        crop_scale_min: float = 1.0,
    ) -> None:
        self.config = config if config is not None else PreprocessConfig()
        self.jitter = jitter
        ops: list[torch.nn.Module] = [
            v2.Resize(self.config.resize, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        ]
        if crop_scale_min < 1.0:
            # the area scale is relative to the whole resized image; rescale so that 1.0 is the largest square
            aspect = self.config.crop / self.config.resize
            ops.append(v2.RandomResizedCrop(self.config.crop, scale=(crop_scale_min * aspect, aspect),
                                            ratio=(1.0, 1.0), antialias=True))  # fmt: skip
        else:
            ops.append(v2.RandomCrop(self.config.crop))
        if jitter:
            ops.append(v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue))
        ops += [
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(self.config.mean), std=list(self.config.std)),
        ]
        self.pipeline = v2.Compose(ops)

    def __call__(self, image: Any) -> torch.Tensor:
        """Augment one image; returns a contiguous ``(3, crop, crop)`` float32 tensor."""
        return self.pipeline(to_chw_uint8(image)).contiguous()

    def __repr__(self) -> str:
        """Show the pipeline."""
        return f"TrainTransform({self.pipeline})"


class DecoderTransform:
    """Image-decoder target: Resize(``int(size * 1.14)``) → CenterCrop(``size``) → ``(3, size, size)`` float in [0, 1].

    No normalisation (the decoder ends in a sigmoid). ``size`` 64 gives Resize(72) as upstream.
    """

    def __init__(self, size: int = 64, resize_factor: float = 1.14) -> None:
        if size < 1:
            raise ValueError(f"DecoderTransform size is {size}; expected a positive number of pixels")
        self.size = int(size)
        self.resize = int(size * resize_factor)
        self.pipeline = v2.Compose(
            [
                v2.Resize(self.resize, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
                v2.CenterCrop(self.size),
                v2.ToDtype(torch.float32, scale=True),
            ]
        )

    def __call__(self, image: Any) -> torch.Tensor:
        """Transform one image; returns a contiguous ``(3, size, size)`` float32 tensor in [0, 1]."""
        return self.pipeline(to_chw_uint8(image)).contiguous()

    def __repr__(self) -> str:
        """Show the pipeline."""
        return f"DecoderTransform({self.pipeline})"


def build_eval_transform(config: PreprocessConfig | None = None) -> EvalTransform:
    """Return the test transform, :class:`apr_localizer.preprocess.EvalTransform` (Resize → CenterCrop → Normalize)."""
    return EvalTransform(config if config is not None else PreprocessConfig())


def build_train_transform(
    config: PreprocessConfig | None = None,
    no_augment: bool = False,
    jitter: bool = True,
    **options: float,
) -> TrainTransform | EvalTransform:
    """Training transform: the test transform when ``no_augment``, else :class:`TrainTransform`.

    ``no_augment`` is the Cambridge initial training and PAE training setting (model_spec.md §3); ``jitter`` turns
    the colour jitter of :class:`TrainTransform` on or off; ``options`` are its strengths (``brightness``,
    ``contrast``, ``saturation``, ``hue``) and ``crop_scale_min``.
    """
    if no_augment:
        return build_eval_transform(config)
    return TrainTransform(config, jitter=jitter, **options)
