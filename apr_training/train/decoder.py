"""PAE image decoder (model_spec.md §8): reconstruct a 64x64 view from a pose through its PAE latents.

``ImageDecoder``: MLP ``[latent_t ‖ latent_rot] (2D) → 512 → 1024 → 2048 → 3·S·S`` with ReLUs and a final sigmoid,
xavier init, output ``(B,3,S,S)`` in [0, 1]. Training: the PAE is frozen and encodes the **GT** pose with the **GT**
scene; L1 against the un-normalised ``S x S`` image (Resize(int(1.14·S)) → CenterCrop(S)). ``--demo`` writes
``<out>/decoder_demo.png``: ground truth (top row) and reconstruction (bottom row) of the first frames.

File format: one ``.safetensors`` with the decoder (``decoder.*``) and its PAE (``pae.*``) and JSON metadata under
``apr_training_decoder`` (architecture, PAE config, scene names, provenance).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from apr_localizer.models import PAEConfig, PoseAutoEncoder

from .helpers import make_eval_loader, provenance, read_label_table
from .pae import freeze
from .task import Task, TrainError

__all__ = ["DecoderBundle", "DecoderStep", "DecoderTask", "ImageDecoder", "load_decoder", "save_decoder",
           "write_demo_grid"]  # fmt: skip

log = logging.getLogger("apr_training.train")

METADATA_KEY = "apr_training_decoder"
FORMAT_VERSION = 1


class ImageDecoder(nn.Module):
    """``forward(latents (B, in_dim)) -> images (B, 3, img_size, img_size)`` in [0, 1]."""

    def __init__(self, in_dim: int = 512, hidden_dims: list[int] | tuple[int, ...] = (512, 1024, 2048),
                 img_size: int = 64) -> None:  # fmt: skip
        super().__init__()
        self.config = {"in_dim": int(in_dim), "hidden_dims": [int(h) for h in hidden_dims], "img_size": int(img_size)}
        dims = [in_dim, *hidden_dims, 3 * img_size * img_size]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            lin = nn.Linear(dims[i], dims[i + 1])
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
            layers.append(lin)
            layers.append(nn.ReLU() if i < len(dims) - 2 else nn.Sigmoid())
        self.mlp = nn.Sequential(*layers)
        self.img_size = int(img_size)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.mlp(latents).reshape(-1, 3, self.img_size, self.img_size)


@dataclass
class DecoderBundle:
    """A loaded decoder file."""

    decoder: ImageDecoder
    pae: PoseAutoEncoder
    scene_names: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)


def save_decoder(path: str | Path, decoder: ImageDecoder, pae: PoseAutoEncoder, scene_names: list[str],
                 provenance: dict[str, Any] | None = None) -> Path:  # fmt: skip
    """Write decoder + PAE as one safetensors file with JSON metadata."""
    from safetensors.torch import save_file

    tensors = {f"decoder.{k}": v.detach().cpu().contiguous().clone() for k, v in decoder.state_dict().items()}
    tensors.update({f"pae.{k}": v.detach().cpu().contiguous().clone() for k, v in pae.state_dict().items()})
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": "pae_image_decoder",
        "config": decoder.config,
        "pae": pae.config.to_dict(),
        "scene_names": list(scene_names),
        "provenance": dict(provenance or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta, default=str)})
    return path


def load_decoder(path: str | Path) -> DecoderBundle:
    """Load a file written by :func:`save_decoder` (eval mode)."""
    from safetensors.torch import load_file

    from apr_localizer.checkpoints import CheckpointError, read_json_metadata

    path = Path(path)
    meta = read_json_metadata(path, METADATA_KEY, "decoder")
    if meta is None:
        raise CheckpointError(f"{path}: not an image decoder file (no {METADATA_KEY} metadata)")
    tensors = load_file(str(path))
    decoder = ImageDecoder(**meta["config"])
    pae = PoseAutoEncoder(PAEConfig.from_dict(meta["pae"]))
    try:
        decoder.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("decoder.")}, strict=True)
        pae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("pae.")}, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: tensors do not match the stored architecture ({str(e)[:160]})") from None
    return DecoderBundle(decoder.eval(), pae.eval(), list(meta.get("scene_names") or []),
                         dict(meta.get("provenance") or {}))  # fmt: skip


class DecoderStep(nn.Module):
    """``forward(batch) -> {"loss"}`` (L1); ``batch``: ``image (B,3,S,S)`` in [0, 1], ``pose (B,7)``, ``scene (B,)``."""

    def __init__(self, decoder: ImageDecoder, pae: PoseAutoEncoder) -> None:
        super().__init__()
        self.decoder = decoder
        self.pae = pae

    def reconstruct(self, pose: torch.Tensor, scene: torch.Tensor) -> torch.Tensor:
        """Images ``(B,3,S,S)`` from poses ``(B,7)`` and scenes ``(B,)`` (PAE without gradients)."""
        with torch.no_grad():
            lat = self.pae(pose.float(), scene if self.pae.config.multi_scene else None)
        return self.decoder(torch.cat([lat["latent_t"], lat["latent_rot"]], dim=-1))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        recon = self.reconstruct(batch["pose"], batch["scene"])
        return {"loss": F.l1_loss(recon.float(), batch["image"].float())}


def write_demo_grid(path: Path, gt: torch.Tensor, recon: torch.Tensor) -> Path:
    """PNG grid: ``gt`` (top row) and ``recon`` (bottom row), ``(N,3,S,S)`` in [0, 1], 2 px gaps."""
    from PIL import Image

    n, _, s, _ = gt.shape
    gap = 2
    canvas = np.full((2 * s + 3 * gap, n * s + (n + 1) * gap, 3), 255, dtype=np.uint8)
    for row, images in enumerate((gt, recon)):
        arr = (images.detach().float().clamp(0, 1).cpu().numpy().transpose(0, 2, 3, 1) * 255 + 0.5).astype(np.uint8)
        for i in range(n):
            y, x = gap + row * (s + gap), gap + i * (s + gap)
            canvas[y : y + s, x : x + s] = arr[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


class DecoderTask(Task):
    """``apr-train decoder``."""

    name = "decoder"
    auto_best_keys = ("val_loss",)

    def setup(self, saved_inputs: dict[str, Any] | None = None) -> None:
        ctx, cfg = self.ctx, self.cfg
        saved_inputs = saved_inputs or {}

        def given(name: str) -> Path | None:
            p = getattr(ctx.paths, name)
            return p if p is not None else (Path(saved_inputs[name]) if saved_inputs.get(name) else None)

        init, pae_path, teacher_path = given("init"), given("pae"), given("teacher")
        names = saved_inputs.get("scene_names")
        decoder = None
        if init is not None:
            b = load_decoder(init)
            decoder, pae, src_names = b.decoder, b.pae, b.scene_names
        else:
            src = pae_path or teacher_path
            if src is None:
                raise TrainError("decoder training needs a trained PAE: --pae (or --teacher with a PAE in the bundle)")
            pae, src_names = self._load_pae(src)
        pae = freeze(pae)
        if pae.config.multi_scene:
            labels = read_label_table(ctx.paths.labels, ctx.paths.data, names or src_names or cfg.data.scene_names)
        else:
            from .posenet import single_scene_labels

            labels, _ = single_scene_labels(ctx, ctx.paths.labels, (names or src_names or [None])[0])
        self.scene_names = list(labels.scenes)
        dc = cfg.decoder
        if decoder is None:
            torch.manual_seed(cfg.run.seed)
            decoder = ImageDecoder(2 * pae.config.encoder_dim, dc.hidden_dims, dc.img_size)
        elif decoder.img_size != dc.img_size:
            log.info("decoder.img_size set to %d, the size of the --init decoder", decoder.img_size)
            dc.img_size = decoder.img_size
        from apr_training.datasets.torch_datasets import CameraPoseDataset
        from apr_training.datasets.transforms import DecoderTransform

        transform = DecoderTransform(dc.img_size)
        if cfg.data.cache_in_ram == "resized":
            raise TrainError("data.cache_in_ram 'resized' caches at data.resize, not the decoder's size; use 'decoded'")
        self.dataset = CameraPoseDataset(labels, ctx.paths.data, transform=transform,
                                         cache_in_ram=cfg.data.cache_in_ram)  # fmt: skip
        self.decoder, self.pae = decoder, pae
        self.module = DecoderStep(decoder, pae).to(ctx.device)
        self.val_loader = None
        if ctx.paths.val_labels is not None:
            val = read_label_table(ctx.paths.val_labels, ctx.paths.data, self.scene_names, "--val-labels")
            self.val_loader = make_eval_loader(ctx, CameraPoseDataset(val, ctx.paths.data, transform=transform))
        self.inputs = {
            "init": str(init) if init else None,
            "pae": str(pae_path) if pae_path else None,
            "teacher": str(teacher_path) if teacher_path else None,
            "scene_names": self.scene_names,
        }

    @staticmethod
    def _load_pae(path: Path) -> tuple[PoseAutoEncoder, list[str] | None]:
        from .posenet import is_posenet_file, load_posenet

        if is_posenet_file(path):
            b = load_posenet(path)
            if b.pae is None:
                raise TrainError(f"{path}: the PoseNet file holds no pose auto-encoder (train one with apr-train pae)")
            return b.pae, b.scene_names
        from .iapr import load_pae

        return load_pae(path)

    def train_mode(self) -> None:
        self.module.train()
        self.pae.eval()

    @torch.no_grad()
    def validate(self) -> dict[str, float] | None:
        if self.val_loader is None:
            return None
        self.decoder.eval()
        total, n = 0.0, 0
        for batch in self.val_loader:
            batch = {k: (v.to(self.ctx.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            recon = self.module.reconstruct(batch["pose"], batch["scene"])
            total += float(F.l1_loss(recon, batch["image"], reduction="sum")) / recon[0].numel()
            n += recon.shape[0]
        self.decoder.train()
        return {"val_loss": total / max(1, n)}

    def save(self, path: Path) -> None:
        save_decoder(path, self.decoder, self.pae, self.scene_names, provenance(self.ctx))

    @torch.no_grad()
    def after_training(self) -> None:
        if not self.ctx.demo:
            return
        n = min(self.cfg.decoder.demo_frames, len(self.dataset))
        if n == 0:
            return
        items = [self.dataset[i] for i in np.linspace(0, len(self.dataset) - 1, n).round().astype(int).tolist()]
        gt = torch.stack([it["image"] for it in items])
        pose = torch.stack([it["pose"] for it in items]).to(self.ctx.device)
        scene = torch.stack([it["scene"] for it in items]).to(self.ctx.device)
        self.decoder.eval()
        recon = self.module.reconstruct(pose, scene).cpu()
        path = write_demo_grid(self.ctx.out / "decoder_demo.png", gt, recon)
        log.info("decoder demo (top: ground truth, bottom: reconstruction) written to %s", path)
