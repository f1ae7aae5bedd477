"""PyTorch backend: eager inference on CPU or CUDA (fp16/bf16 autocast on CUDA, optional CUDA-graph capture)."""

from __future__ import annotations

import copy
import os

import torch

from ..checkpoints import ModelBundle
from ..models.backbone import fold_batchnorm
from .base import Backend, BackendError, BackendOptions

__all__ = ["TorchBackend", "physical_cores"]


def physical_cores() -> int:
    """Return the number of physical CPU cores (falls back to logical cores)."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return int(n)
    except Exception:  # psutil missing or unsupported platform
        pass
    return max(1, os.cpu_count() or 1)


class _CudaGraph:
    """A captured CUDA graph of ``fn`` with static input/output buffers (batch shape fixed at capture)."""

    def __init__(self, fn, *example: torch.Tensor) -> None:
        self.inputs = [t.clone() for t in example]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*self.inputs)

    def __call__(self, *args: torch.Tensor):
        for buf, a in zip(self.inputs, args):
            buf.copy_(a)
        self.graph.replay()
        return self.outputs


class TorchBackend(Backend):
    """Eager PyTorch; the reference and debugging path, and the CUDA fallback."""

    name = "torch"

    def __init__(self, bundle: ModelBundle, options: BackendOptions) -> None:
        super().__init__(bundle, options)
        dev = torch.device(self.device)
        if options.precision == "int8":
            raise BackendError("precision int8 needs the tensorrt backend (torch runs fp32, fp16 or bf16)")
        if dev.type == "cpu" and options.precision != "fp32":
            raise BackendError(f"precision {options.precision} needs a CUDA device with the torch backend")
        if dev.type == "cpu":
            torch.set_num_threads(options.threads or physical_cores())
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(options.precision)
        # Inference copies with BatchNorm folded into the convolutions; a shared iAPR encoder stays shared.
        # channels_last: faster convolutions with oneDNN (CPU) and cuDNN (tensor cores).
        cl = torch.channels_last
        self.apr = fold_batchnorm(copy.deepcopy(bundle.apr)).to(dev, memory_format=cl)
        self.iapr = None
        if bundle.iapr is not None:
            self.iapr = copy.deepcopy(bundle.iapr, memo={id(bundle.apr): self.apr})
            fold_batchnorm(self.iapr).to(dev, memory_format=cl)
        self._graphs: dict[str, _CudaGraph] = {}
        self.use_cuda_graphs = bool(options.cuda_graphs and dev.type == "cuda")
        if options.cuda_graphs and dev.type != "cuda":
            raise BackendError("cuda_graphs needs a CUDA device")

    def _ctx(self):
        if self.autocast_dtype is None:
            return torch.autocast("cpu", enabled=False)
        return torch.autocast("cuda", dtype=self.autocast_dtype)

    # -- graph bodies (pure functions of tensors, capturable) ------------------------------------------------
    def _apr(self, image: torch.Tensor, scene_override: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with self._ctx():
            out = self.apr(image, scene_override)
        return tuple(out[k].float() if out[k].is_floating_point() else out[k] for k in
                     ("pose", "scene_log_probs", "scene", "latent_t", "latent_rot"))

    def _encoder(self, image: torch.Tensor, scene: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self._ctx():
            lt, lr = self.iapr.query_latents(image, scene)
        return lt.float(), lr.float()

    def _refine(self, lt, lr, pose, scene) -> torch.Tensor:
        with self._ctx():
            return self.iapr.step(lt, lr, pose, scene).float()

    def _call(self, key: str, fn, *args: torch.Tensor):
        if not self.use_cuda_graphs:
            return fn(*args)
        g = self._graphs.get(key)
        if g is None or any(a.shape != b.shape for a, b in zip(args, g.inputs)):
            g = self._graphs[key] = _CudaGraph(fn, *args)
        return g(*args)

    # -- interface -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run_apr(self, image: torch.Tensor, scene_override: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        image = image.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        if scene_override is None:
            scene_override = torch.full((image.shape[0],), -1, dtype=torch.int64, device=image.device)
        out = self._call("apr", self._apr, image, scene_override.to(image.device))
        return dict(zip(("pose", "scene_log_probs", "scene", "latent_t", "latent_rot"), out))

    @torch.inference_mode()
    def run_encoder(self, image: torch.Tensor, scene: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.iapr is None:
            raise BackendError("this model has no iAPR refiner")
        image = image.to(self.device).contiguous(memory_format=torch.channels_last)
        return self._call("encoder", self._encoder, image, scene.to(self.device))

    @torch.inference_mode()
    def run_refine(self, latent_t, latent_rot, pose, scene) -> torch.Tensor:
        if self.iapr is None:
            raise BackendError("this model has no iAPR refiner")
        return self._call("refine", self._refine, latent_t, latent_rot, pose, scene)
