"""PyTorch backend: eager inference on CPU or CUDA (fp16/bf16 autocast on CUDA, optional CUDA-graph capture)."""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator

import torch

from ..checkpoints import ModelBundle
from ..graphs import APR_OUTPUTS
from ..models.backbone import fold_batchnorm
from .base import Backend, BackendError, BackendOptions, Steps

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
    """A captured CUDA graph of ``fn`` with static input/output buffers (batch shape fixed at capture).

    ``fn`` must not copy host values to the device (no ``torch.tensor``/``new_tensor`` of Python values inside); the
    inference graphs are checked for that on the CPU (test_capture_safety.py).
    """

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


@contextlib.contextmanager
def _tf32(allow: bool) -> Iterator[None]:
    """Set torch's TF32 switches (cuBLAS matmul, cuDNN convolutions) for the block, then restore them."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


class TorchBackend(Backend):
    """Eager PyTorch; the reference and debugging path, and the CUDA fallback.

    On CUDA: fp32 runs without TF32 unless ``BackendOptions.tf32`` (torch's cuDNN default would use it), fp16/bf16
    run under autocast, and ``cuda_graphs`` captures the whole :meth:`run_steps` loop (APR + encoder + N refinement
    steps) as one CUDA graph per (batch shape, iterations).
    """

    name = "torch"

    def __init__(self, bundle: ModelBundle, options: BackendOptions) -> None:
        super().__init__(bundle, options)
        dev = torch.device(self.device)
        if options.precision == "int8":
            raise BackendError("precision int8 needs the tensorrt backend (torch runs fp32, fp16 or bf16)")
        if dev.type == "cpu" and options.precision != "fp32":
            raise BackendError(f"precision {options.precision} needs a CUDA device with the torch backend")
        if options.cuda_graphs and dev.type != "cuda":
            raise BackendError("cuda_graphs needs a CUDA device")
        if dev.type == "cpu":
            torch.set_num_threads(options.threads or physical_cores())
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(options.precision)
        self.allow_tf32 = bool(getattr(options, "tf32", False))
        # Inference copies with BatchNorm folded into the convolutions; a shared iAPR encoder stays shared.
        # channels_last: faster convolutions with oneDNN (CPU) and cuDNN (tensor cores).
        cl = torch.channels_last
        self.apr = fold_batchnorm(copy.deepcopy(bundle.apr)).to(dev).to(memory_format=cl)
        self.iapr = None
        if bundle.iapr is not None:
            self.iapr = copy.deepcopy(bundle.iapr, memo={id(bundle.apr): self.apr})
            fold_batchnorm(self.iapr).to(dev).to(memory_format=cl)
        self._graphs: dict[tuple, _CudaGraph] = {}
        self.use_cuda_graphs = bool(options.cuda_graphs and dev.type == "cuda")

    def _ctx(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if torch.device(self.device).type == "cuda":
            stack.enter_context(_tf32(self.allow_tf32))
            if self.autocast_dtype is not None:
                stack.enter_context(torch.autocast("cuda", dtype=self.autocast_dtype))
        return stack

    # -- graph bodies (pure functions of device tensors, capturable) -----------------------------------------
    def _apr(self, image: torch.Tensor, scene_override: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with self._ctx():
            out = self.apr(image, scene_override)
        return tuple(out[k].float() if out[k].is_floating_point() else out[k] for k in APR_OUTPUTS)

    def _encoder(self, image: torch.Tensor, scene: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.iapr is not None  # callers check has_refiner
        with self._ctx():
            lt, lr = self.iapr.query_latents(image, scene)
        return lt.float(), lr.float()

    def _refine(self, lt, lr, pose, scene) -> torch.Tensor:
        assert self.iapr is not None  # callers check has_refiner
        with self._ctx():
            return self.iapr.step(lt, lr, pose, scene).float()

    def _steps_body(self, image: torch.Tensor, scene_override: torch.Tensor, iterations: int) -> tuple:
        """APR once, the encoder if the iAPR has its own, ``iterations`` steps: the body one CUDA graph captures.

        Returns ``(pose_0, ..., pose_N, scene, scene_log_probs, latent_t, latent_rot)``.
        """
        pose, slp, scene, lt, lr = self._apr(image, scene_override)
        if iterations > 0 and self.needs_encoder:
            lt, lr = self._encoder(image, scene)
        poses = [pose]
        for _ in range(iterations):
            poses.append(self._refine(lt, lr, poses[-1], scene))
        return (*poses, scene, slp, lt, lr)

    def _call(self, key: tuple, fn, *args: torch.Tensor):
        """``fn(*args)``, or a replay of its CUDA graph; replay outputs are copied out of the graph's static buffers.

        Without the copy, the next replay would overwrite tensors the caller still holds (e.g. the pose of step k
        while step k+1 runs from it).
        """
        if not self.use_cuda_graphs:
            return fn(*args)
        g = self._graphs.get(key)
        if g is None or any(a.shape != b.shape for a, b in zip(args, g.inputs)):
            g = self._graphs[key] = _CudaGraph(fn, *args)
        out = g(*args)
        return out.clone() if isinstance(out, torch.Tensor) else tuple(t.clone() for t in out)

    def _image(self, image: torch.Tensor) -> torch.Tensor:
        return image.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)

    # -- interface -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run_apr(self, image: torch.Tensor, scene_override: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        image = self._image(image)
        if scene_override is None:
            scene_override = torch.full((image.shape[0],), -1, dtype=torch.int64, device=image.device)
        out = self._call(("apr",), self._apr, image, scene_override.to(image.device))
        return dict(zip(APR_OUTPUTS, out))

    @torch.inference_mode()
    def run_encoder(self, image: torch.Tensor, scene: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.iapr is None:
            raise BackendError("this model has no iAPR refiner")
        return self._call(("encoder",), self._encoder, self._image(image), scene.to(self.device))

    @torch.inference_mode()
    def run_refine(self, latent_t, latent_rot, pose, scene) -> torch.Tensor:
        if self.iapr is None:
            raise BackendError("this model has no iAPR refiner")
        return self._call(("refine",), self._refine, latent_t, latent_rot, pose, scene)

    @torch.inference_mode()
    def run_steps(
        self,
        image: torch.Tensor,
        iterations: int,
        *,
        scene_override: torch.Tensor | None = None,
        timed: bool = False,
    ) -> Steps:
        """:meth:`Backend.run_steps`; with ``cuda_graphs`` (and not ``timed``) the whole loop is ONE graph replay.

        The outputs are copied out of the graph's static buffers, so they stay valid after the next call. A ``timed``
        run replays one graph per stage instead (stage timings need a synchronisation between the stages).
        """
        n = int(iterations)
        if not self.use_cuda_graphs or timed or n < 0 or (n > 0 and not self.has_refiner):
            return super().run_steps(image, n, scene_override=scene_override, timed=timed)
        image = self._image(image)
        if scene_override is None:
            scene_override = torch.full((image.shape[0],), -1, dtype=torch.int64, device=image.device)
        out = self._call(("steps", n), lambda x, s: self._steps_body(x, s, n), image, scene_override.to(image.device))
        return Steps(out[: n + 1], out[n + 1], out[n + 2], out[n + 3], out[n + 4])
