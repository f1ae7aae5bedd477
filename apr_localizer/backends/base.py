"""The inference-backend interface and the ``auto`` selection.

A backend runs up to three graphs on one device:

* **APR graph** ``(image (B,3,H,W) float32, scene_override (B,) int64) -> pose (B,7), scene_log_probs (B,S),
  scene (B,), latent_t (B,D), latent_rot (B,D)``; ``scene_override < 0`` means "use the classifier's argmax";
* **encoder graph** (only when the iAPR model has its own MS-Transformer): the same signature with the iAPR's weights,
  run with the scene forced to give the query latents;
* **refinement graph** ``(latent_t (B,D), latent_rot (B,D), pose (B,7), scene (B,) int64) -> pose (B,7)``: one iAPR
  step (PAE + RPR + compose), so iterations never re-run the backbone.

Tensors cross the interface as torch tensors on :attr:`Backend.device` (CPU tensors for ONNX Runtime CPU).
"""

from __future__ import annotations

import importlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoints import ModelBundle
from ..graphs import APR_OUTPUTS

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "BackendOptions",
    "GraphBackend",
    "Steps",
    "create_backend",
    "resolve_device",
]

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


class BackendError(RuntimeError):
    """A backend cannot be created or run with the requested options (one-sentence message)."""


@dataclass
class BackendOptions:
    """Options every backend understands (unknown combinations raise :class:`BackendError`).

    ``cache_dir`` holds exported ONNX files and TensorRT engines (default: ``~/.cache/apr_localizer``).
    ``calibration_images`` (N,3,H,W) normalised are used for INT8 TensorRT calibration. ``tf32`` allows TF32
    tensor-core math for fp32 on CUDA (torch, TensorRT); off by default, so fp32 means fp32.
    """

    device: str = "cpu"
    precision: str = "fp32"
    threads: int = 0  # 0 = number of physical cores
    batch_size: int = 1
    cache_dir: Path | None = None
    cuda_graphs: bool = False
    calibration_images: torch.Tensor | None = field(default=None, repr=False)
    tf32: bool = False


@dataclass
class Steps:
    """What :meth:`Backend.run_steps` returns (tensors on the backend's device).

    ``poses[0]`` is the APR estimate and ``poses[k]`` the pose after ``k`` refinement steps, each ``(B,7)``;
    ``scene (B,)`` int64, ``scene_log_probs (B,S)``; ``latent_t``/``latent_rot (B,D)`` are the image latents the
    steps used; ``timings_ms`` is empty unless the run was timed.
    """

    poses: list[torch.Tensor]
    scene: torch.Tensor
    scene_log_probs: torch.Tensor
    latent_t: torch.Tensor
    latent_rot: torch.Tensor
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def pose(self) -> torch.Tensor:
        """The last pose ``(B,7)``."""
        return self.poses[-1]


class _StageClock:
    """Wall-clock laps that first wait for the device (CUDA kernels are asynchronous)."""

    def __init__(self, device: str, into: dict[str, float]) -> None:
        self.cuda = str(device).startswith("cuda")
        self.into = into
        self.t = self._now()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, name: str) -> None:
        t = self._now()
        self.into[name] = (t - self.t) * 1e3
        self.t = t


class Backend(ABC):
    """One inference engine holding the graphs of a :class:`ModelBundle`."""

    name: str = "?"
    selection_reason: str = "requested"  # set by create_backend("auto"): why this candidate was chosen
    selection_skipped: Sequence[str] = ()  # set by create_backend("auto"): "<backend>/<device>: <reason>" per skip

    def __init__(self, bundle: ModelBundle, options: BackendOptions) -> None:
        if options.precision not in PRECISIONS:
            raise BackendError(f"precision '{options.precision}' is not one of {', '.join(PRECISIONS)}")
        self.bundle = bundle
        self.options = options
        self.device = options.device

    @property
    def has_refiner(self) -> bool:
        return self.bundle.iapr is not None

    @property
    def needs_encoder(self) -> bool:
        """True when the iAPR has its own MS-Transformer (official two-checkpoint pipeline)."""
        return self.bundle.iapr is not None and not self.bundle.shares_encoder

    @abstractmethod
    def run_apr(self, image: torch.Tensor, scene_override: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """APR graph: normalised images ``(B,3,H,W)`` → dict with the :data:`APR_OUTPUTS` names."""

    @abstractmethod
    def run_encoder(self, image: torch.Tensor, scene: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the encoder graph (the iAPR's own MS-Transformer, scene forced) → ``(latent_t, latent_rot)``."""

    @abstractmethod
    def run_refine(
        self, latent_t: torch.Tensor, latent_rot: torch.Tensor, pose: torch.Tensor, scene: torch.Tensor
    ) -> torch.Tensor:
        """Refinement graph: one iAPR step → refined pose ``(B,7)`` (unit quaternion, ``w >= 0``)."""

    def run_steps(
        self,
        image: torch.Tensor,
        iterations: int,
        *,
        scene_override: torch.Tensor | None = None,
        timed: bool = False,
    ) -> Steps:
        """Run THE inference loop: the APR graph once, then ``iterations`` refinement steps on cached latents.

        ``image`` is ``(B,3,H,W)`` normalised on :attr:`device`. Every consumer (``Localizer``, the evaluators, the
        benchmark, warm-up) runs this, so they measure the same code. With ``timed`` each stage is synchronised and
        timed (``apr``, ``encoder`` when the iAPR has its own encoder, ``step1`` … ``stepN``, in ms).
        """
        n = int(iterations)
        if n < 0:
            raise BackendError(f"iterations must be >= 0, got {n}")
        if n > 0 and not self.has_refiner:
            raise BackendError(f"{n} refinement iterations need an iAPR model; this model has none")
        timings: dict[str, float] = {}
        clock = _StageClock(self.device, timings) if timed else None
        out = self.run_apr(image, scene_override)
        if clock:
            clock.lap("apr")
        scene = out["scene"]
        lt, lr = out["latent_t"], out["latent_rot"]
        poses = [out["pose"]]
        if n > 0 and self.needs_encoder:
            lt, lr = self.run_encoder(image, scene)
            if clock:
                clock.lap("encoder")
        for k in range(1, n + 1):
            poses.append(self.run_refine(lt, lr, poses[-1], scene))
            if clock:
                clock.lap(f"step{k}")
        return Steps(poses, scene, out["scene_log_probs"], lt, lr, timings)

    def warmup(self, runs: int = 2) -> None:
        """Run every graph a few times on dummy inputs (allocations, lazy init, autotuning)."""
        size = int(self.bundle.preprocess.get("crop", 224))
        x = torch.zeros(self.options.batch_size, 3, size, size, device=self.device)
        for _ in range(runs):
            self.run_steps(x, 1 if self.has_refiner else 0)

    def describe(self) -> dict[str, str]:
        """Short facts for logs and diagnostics."""
        return {"backend": self.name, "device": str(self.device), "precision": self.options.precision}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release engine resources."""


class GraphBackend(Backend):
    """A backend whose graphs are objects with ``run(**named_inputs) -> dict[name, tensor]`` (ONNX Runtime, TensorRT).

    Subclasses fill ``self.graphs`` with ``"apr"``, optionally ``"encoder"`` (own iAPR encoder) and ``"refine"``.
    """

    graphs: dict

    @torch.inference_mode()
    def run_apr(self, image: torch.Tensor, scene_override: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if scene_override is None:
            scene_override = torch.full((image.shape[0],), -1, dtype=torch.int64, device=image.device)
        out = self.graphs["apr"].run(image=image, scene_override=scene_override.reshape(-1))
        return {k: out[k] for k in APR_OUTPUTS}

    @torch.inference_mode()
    def run_encoder(self, image: torch.Tensor, scene: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.has_refiner:
            raise BackendError("this model has no iAPR refiner")
        graph = self.graphs.get("encoder", self.graphs["apr"])  # a shared encoder is the APR graph itself
        out = graph.run(image=image, scene_override=scene.reshape(-1))
        return out["latent_t"], out["latent_rot"]

    @torch.inference_mode()
    def run_refine(
        self, latent_t: torch.Tensor, latent_rot: torch.Tensor, pose: torch.Tensor, scene: torch.Tensor
    ) -> torch.Tensor:
        if "refine" not in self.graphs:
            raise BackendError("this model has no iAPR refiner")
        out = self.graphs["refine"].run(latent_t=latent_t, latent_rot=latent_rot, pose=pose, scene=scene.reshape(-1))
        return out["refined_pose"]


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``; validate explicit names."""
    if device in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError(f"device '{device}' was requested but no CUDA device is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise BackendError(f"device '{device}' is not one of auto, cpu, cuda, cuda:N")
    return device


_MODULES = {
    "torch": ("apr_localizer.backends.torch_backend", "TorchBackend"),
    "onnxruntime": ("apr_localizer.backends.onnxruntime_backend", "OnnxRuntimeBackend"),
    "tensorrt": ("apr_localizer.backends.tensorrt_backend", "TensorRTBackend"),
}


def _backend_class(name: str) -> type[Backend]:
    module, cls = _MODULES[name]
    return getattr(importlib.import_module(module), cls)


def _auto_candidates(device: str, precision: str = "fp32") -> list[tuple[str, str, str]]:
    """(backend, device, reason) in preference order: TensorRT → ORT-CUDA → torch-CUDA → ORT-CPU → torch-CPU.

    int8 on a GPU machine is TensorRT only: ONNX Runtime's CPU int8 must be asked for explicitly, never a fallback.
    """
    cuda = torch.cuda.is_available() and device != "cpu"
    out = []
    if cuda and precision == "int8":
        return [("tensorrt", device if device.startswith("cuda") else "cuda", "int8 on a GPU needs TensorRT")]
    if cuda:
        gpu = device if device.startswith("cuda") else "cuda"
        out += [
            ("tensorrt", gpu, "a CUDA GPU is present"),
            ("onnxruntime", gpu, "TensorRT is unavailable; trying ONNX Runtime's CUDA provider"),
            ("torch", gpu, "no ONNX Runtime CUDA provider; using torch on the GPU"),
        ]
    out += [
        ("onnxruntime", "cpu", "no usable GPU engine; ONNX Runtime is the fastest CPU backend"),
        ("torch", "cpu", "ONNX Runtime is unavailable; using torch on the CPU"),
    ]
    return out


def create_backend(bundle: ModelBundle, backend: str = "auto", options: BackendOptions | None = None) -> Backend:
    """Create a backend by name, or pick one with ``auto`` (logging why each candidate was taken or skipped)."""
    options = options or BackendOptions()
    if backend != "auto":
        if backend not in BACKENDS:
            raise BackendError(f"backend '{backend}' is not one of auto, {', '.join(BACKENDS)}")
        options.device = resolve_device(options.device)
        try:
            cls = _backend_class(backend)
        except ImportError as e:
            raise BackendError(f"backend '{backend}' is not available here ({e})") from None
        return cls(bundle, options)
    errors = []
    for name, device, reason in _auto_candidates(options.device, options.precision):
        opts = BackendOptions(**{**options.__dict__, "device": device})
        try:
            be = _backend_class(name)(bundle, opts)
        except Exception as e:  # any failure of one candidate (AttributeError from an API change too): try the next
            first = str(e).splitlines()[0] if str(e) else ""
            why = first if isinstance(e, BackendError) else f"{type(e).__name__}: {first}".rstrip(": ")
            errors.append(f"{name}/{device}: {why}")
            log.warning("backend auto: skipped %s on %s (%s)", name, device, errors[-1])
            continue
        log.info("backend auto: chose %s on %s because %s", name, device, reason)
        be.selection_reason = reason
        be.selection_skipped = errors
        return be
    if options.precision == "int8" and len(errors) == 1 and errors[0].startswith("tensorrt/"):
        raise BackendError(
            f"precision int8 with backend auto on a GPU needs TensorRT INT8 ({errors[0]}); for ONNX Runtime's int8 on "
            "the CPU ask for backend onnxruntime with device cpu"
        )
    raise BackendError("no backend could be created: " + "; ".join(errors))
