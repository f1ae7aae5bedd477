"""The test-time image preprocessing, shared by training-evaluation and the node (model_spec.md §4.2).

RGB ``uint8`` ``(H, W, 3)`` → resize so that the shorter side is ``resize`` (the longer side becomes
``int(resize * long / short)``) with antialiased bilinear → centre-crop ``crop`` × ``crop`` with
``top = int(round((H' - crop) / 2))``, ``left = int(round((W' - crop) / 2))`` (Python rounds half to even: 58 for
W' = 341) → ``float32 / 255`` → ``(x - mean) / std`` (subtract, then divide) → ``(B, 3, crop, crop)``.

Resize methods (``PreprocessConfig.method``):

* ``"pil"``: ``PIL.Image.resize((W', H'), BILINEAR)`` on the ``uint8`` image, on the CPU. This is the training
  pipeline's resize (torchvision ``Resize`` on a PIL image) and reproduces the reference tensors bit-exactly.
* ``"torch"``: ``F.interpolate(mode="bilinear", antialias=True)`` on ``device``. On the CPU it runs on the ``uint8``
  channels-last image (the fixed-point kernel that mirrors PIL's): within 1 grey level of PIL except on rare pixels
  (at most 2 levels; 1 pixel of 150,528 for a 272x272 input), 7x faster than the float32 kernel there. Other devices
  have no ``uint8`` antialias kernel, so there it interpolates in ``float32`` and rounds to whole grey levels, which
  emulates the ``uint8`` intermediate image (within 1 grey level of PIL everywhere).
* ``"auto"``: ``"pil"`` when ``device`` is the CPU, ``"torch"`` otherwise.

Input sizes are checked before anything is resized (:func:`check_input_size`): the resize inflates the longer side by
``resize / short side``, so a 1 x 40,000,000 frame would ask for terabytes. Every image must fit
:data:`PREPROCESS_LIMITS` (aspect ratio at most 8:1, at most 40 MP and 16384 px a side) and its shorter side must be at
least ``max(16, ceil(crop / 8))`` pixels; otherwise :class:`apr_localizer.imaging.ImageSizeError` (a ``ValueError``)
is raised with one sentence.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .imaging import ImageLimits

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EvalTransform",
    "PREPROCESS_LIMITS",
    "PreprocessConfig",
    "check_input_size",
    "crop_geometry",
    "denormalize",
    "preprocess",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
_METHODS = ("auto", "pil", "torch")
PREPROCESS_LIMITS = ImageLimits(min_side=16)
"""Default input limits of :func:`preprocess` (decoding allows 2-px sides; the network needs more)."""


@dataclass(frozen=True)
class PreprocessConfig:
    """Parameters of the test transform; stored in model metadata through :meth:`to_dict`/:meth:`from_dict`.

    Attributes:
        resize: target length of the shorter image side before cropping.
        crop: side of the square centre crop (the model's input size); at most ``resize``.
        mean, std: per-channel (R, G, B) normalisation of ``[0, 1]`` values.
        method: resize implementation, ``"auto"``, ``"pil"`` or ``"torch"`` (see the module docstring).
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    method: str = "auto"

    def __post_init__(self) -> None:
        """Validate and normalise the field types (lists from JSON/YAML become tuples)."""
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"PreprocessConfig.{name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.crop > self.resize:
            raise ValueError(f"PreprocessConfig.crop {self.crop} must not exceed PreprocessConfig.resize {self.resize}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            try:
                triple = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"PreprocessConfig.{name} must be 3 numbers (R, G, B), got {value!r}") from None
            if len(triple) != 3 or not all(np.isfinite(triple)):
                raise ValueError(f"PreprocessConfig.{name} must be 3 finite numbers (R, G, B), got {value!r}")
            object.__setattr__(self, name, triple)
        if min(self.std) <= 0:
            raise ValueError(f"PreprocessConfig.std must be positive, got {self.std!r}")
        if self.method not in _METHODS:
            raise ValueError(f"PreprocessConfig.method must be one of {', '.join(_METHODS)}, got {self.method!r}")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessConfig:
        """Build from :meth:`to_dict` output; missing keys take their defaults, unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"preprocess config has unknown keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**dict(data))


def crop_geometry(
    height: int, width: int, config: PreprocessConfig | None = None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Return ``((resized_h, resized_w), (crop_top, crop_left))`` for an ``height`` × ``width`` image.

    Matches torchvision 0.5 ``Resize(int)`` + ``CenterCrop``: 480×640 → ``((256, 341), (16, 58))``.
    """
    config = config or PreprocessConfig()
    if height <= 0 or width <= 0:
        raise ValueError(f"crop_geometry needs a positive image size, got {height}x{width} (HxW)")
    size = config.resize
    # torchvision computes the long side as int(size * long / short) in floating point; keep that exact expression.
    resized = (int(size * height / width), size) if width <= height else (size, int(size * width / height))
    top = int(round((resized[0] - config.crop) / 2.0))
    left = int(round((resized[1] - config.crop) / 2.0))
    return resized, (top, left)


def check_input_size(
    height: int, width: int, config: PreprocessConfig | None = None, limits: ImageLimits | None = None
) -> None:
    """Raise :class:`~apr_localizer.imaging.ImageSizeError` unless ``height`` x ``width`` suits ``config``.

    ``limits`` (default :data:`PREPROCESS_LIMITS`) bounds each side, the pixel count and the aspect ratio; the
    shorter side must also be at least ``ceil(config.crop / 8)``, because more than 8x upsampling leaves the network
    nothing to see. The largest resized image this admits is ``resize`` x ``resize * max_aspect`` pixels.
    """
    config = config or PreprocessConfig()
    limits = limits or PREPROCESS_LIMITS
    limits.check(int(width), int(height), "preprocess input image", min_side=math.ceil(config.crop / 8))


@functools.lru_cache(maxsize=32)
def _norm_constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as ``(1, 3, 1, 1)`` float32 tensors on ``device`` (cached: no per-call allocation)."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1).to(device)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1).to(device)
    return m, s


def _normalize_u8(crops: torch.Tensor, config: PreprocessConfig, dtype: torch.dtype) -> torch.Tensor:
    """``(B, 3, c, c)`` uint8 (any layout) → contiguous normalised ``(B, 3, c, c)`` of ``dtype`` (float32 math)."""
    x = crops.to(torch.float32, memory_format=torch.contiguous_format)
    return _normalize_float(x, config, dtype)


def _normalize_float(x: torch.Tensor, config: PreprocessConfig, dtype: torch.dtype) -> torch.Tensor:
    """Contiguous float32 grey levels 0..255 → normalised, in place, then cast to ``dtype``."""
    mean, std = _norm_constants(config.mean, config.std, x.device)
    x.div_(255.0).sub_(mean).div_(std)
    return x if dtype == torch.float32 else x.to(dtype)


def _as_images(images: Any) -> list[np.ndarray] | torch.Tensor:
    """Normalise the accepted inputs into a list of HxWx3 uint8 arrays or one (B, H, W, 3) uint8 tensor."""
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() not in (3, 4) or images.shape[-1] != 3:
            raise ValueError(
                f"preprocess expects a uint8 tensor of shape (H, W, 3) or (B, H, W, 3), got {tuple(images.shape)} "
                f"{images.dtype}"
            )
        return images if images.dim() == 4 else images.unsqueeze(0)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (np.ndarray, Image.Image)):
        images = [images]
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence) or len(images) == 0:
        raise ValueError(f"preprocess expects an image or a non-empty list of images, got {type(images).__name__}")
    out = []
    for i, img in enumerate(images):
        if isinstance(img, Image.Image):
            img = np.asarray(img.convert("RGB"))
        elif isinstance(img, torch.Tensor):
            img = img.numpy(force=True)
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            desc = f"shape {img.shape} dtype {img.dtype}" if isinstance(img, np.ndarray) else type(img).__name__
            raise ValueError(f"preprocess image {i} must be an (H, W, 3) uint8 RGB array, got {desc}")
        if img.shape[0] == 0 or img.shape[1] == 0:
            raise ValueError(f"preprocess image {i} is empty ({img.shape[0]}x{img.shape[1]})")
        out.append(img)
    return out


def _crop_pil(img: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """PIL resize + centre crop of one image: (H, W, 3) uint8 → (crop, crop, 3) uint8."""
    (rh, rw), (top, left) = crop_geometry(img.shape[0], img.shape[1], config)
    pil = Image.fromarray(img if img.flags.c_contiguous else np.ascontiguousarray(img))
    if pil.size != (rw, rh):
        pil = pil.resize((rw, rh), Image.Resampling.BILINEAR)
    return np.asarray(pil)[top : top + config.crop, left : left + config.crop]


def _crop_torch(
    batch: torch.Tensor, config: PreprocessConfig, device: torch.device, uint8_kernel: bool
) -> torch.Tensor:
    """Torch resize + centre crop of a (B, H, W, 3) uint8 batch (any device), computed on ``device``.

    With ``uint8_kernel`` (CPU only) the result is (B, 3, crop, crop) uint8 from the fixed-point kernel; otherwise
    a contiguous (B, 3, crop, crop) float32 tensor of grey levels, interpolated in float32 and rounded to integers.
    """
    (rh, rw), (top, left) = crop_geometry(batch.shape[1], batch.shape[2], config)
    x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2)  # NCHW view of NHWC memory = channels_last
    c = config.crop
    if uint8_kernel:
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = x.to(torch.float32, memory_format=torch.channels_last)
    if (rh, rw) != tuple(x.shape[2:]):
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    x = x[:, :, top : top + c, left : left + c]
    return x if uint8_kernel else x.contiguous().round_().clamp_(0.0, 255.0)


def preprocess(
    images: np.ndarray | torch.Tensor | Image.Image | Sequence[np.ndarray | torch.Tensor | Image.Image],
    config: PreprocessConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    limits: ImageLimits | None = None,
) -> torch.Tensor:
    """Turn RGB ``uint8`` images into the normalised model input.

    Args:
        images: one ``(H, W, 3)`` ``uint8`` RGB numpy array (a view with padded rows is fine), a ``(B, H, W, 3)``
            array, a list of arrays (sizes may differ) or PIL images, or a ``uint8`` torch tensor ``(H, W, 3)`` /
            ``(B, H, W, 3)`` on any device.
        config: the transform; defaults to :class:`PreprocessConfig()` (256 → 224, ImageNet statistics, ``auto``).
        device: where the result lives (and, for the ``"torch"`` method, where the resize runs).
        dtype: result dtype; the arithmetic is float32 either way.
        limits: input size limits (default :data:`PREPROCESS_LIMITS`; see :func:`check_input_size`).

    Returns:
        ``(B, 3, crop, crop)`` contiguous tensor of ``dtype`` on ``device``.

    Raises:
        ValueError: an input that is not an RGB ``uint8`` image;
            :class:`~apr_localizer.imaging.ImageSizeError` (a ``ValueError``) for a size outside the limits, raised
            before anything is resized.
    """
    config = config or PreprocessConfig()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    method = config.method
    if method == "auto":
        method = "pil" if device.type == "cpu" else "torch"
    batch = _as_images(images)
    shapes = [tuple(batch.shape[1:3])] if isinstance(batch, torch.Tensor) else [img.shape[:2] for img in batch]
    for height, width in shapes:
        check_input_size(height, width, config, limits)

    if method == "pil":
        arrays = [t.numpy(force=True) for t in batch] if isinstance(batch, torch.Tensor) else batch
        stacked = np.stack([_crop_pil(img, config) for img in arrays])  # (B, c, c, 3) uint8
        x = torch.from_numpy(stacked).permute(0, 3, 1, 2)
        return _normalize_u8(x, config, torch.float32).to(device=device, dtype=dtype)

    if isinstance(batch, torch.Tensor):
        parts = [batch]
    else:
        # torch.from_numpy warns on read-only arrays (zero-copy views of ROS message bytes): copy those.
        parts = [torch.from_numpy(img if img.flags.writeable else img.copy()).unsqueeze(0) for img in batch]
    crops = [_crop_torch(p, config, device, uint8_kernel=device.type == "cpu") for p in parts]
    x = crops[0] if len(crops) == 1 else torch.cat(crops)
    if x.dtype == torch.uint8:
        return _normalize_u8(x, config, dtype)
    return _normalize_float(x, config, dtype)


def denormalize(tensor: torch.Tensor, config: PreprocessConfig | None = None) -> np.ndarray:
    """Invert the normalisation: ``(3, H, W)`` or ``(B, 3, H, W)`` → ``(H, W, 3)`` or ``(B, H, W, 3)`` ``uint8``.

    ``round((x * std + mean) * 255)`` clipped to 0..255; recovers the ``uint8`` crop of :func:`preprocess` exactly.
    """
    config = config or PreprocessConfig()
    if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (3, 4) or tensor.shape[-3] != 3:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"denormalize expects a (3, H, W) or (B, 3, H, W) tensor, got {shape}")
    x = tensor.detach().to("cpu", torch.float64)
    mean = torch.tensor(config.mean, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(config.std, dtype=torch.float64).view(3, 1, 1)
    u8 = ((x * std + mean) * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    return u8.movedim(-3, -1).contiguous().numpy()


class EvalTransform:
    """Test transform for datasets: one ``(H, W, 3)`` ``uint8`` RGB image (or PIL image) → ``(3, crop, crop)``.

    A plain picklable object (DataLoader workers): it holds only a :class:`PreprocessConfig`.
    """

    def __init__(self, config: PreprocessConfig | None = None) -> None:
        self.config = config or PreprocessConfig()

    def __call__(self, image: np.ndarray | Image.Image | torch.Tensor) -> torch.Tensor:
        """Preprocess one image on the CPU; returns ``(3, crop, crop)`` float32."""
        return preprocess(image, self.config)[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"
