"""The ROS-free localization pipeline: image → :class:`Estimate` (pose, scene, confidence, timings).

::

    loc = Localizer.from_files("model.safetensors", options=LocalizerOptions(backend="auto"))
    est = loc.localize(rgb)          # HxWx3 uint8 RGB (or another sensor encoding, see ``encoding``)
    est.pose                         # [x, y, z, qw, qx, qy, qz], camera-to-map, unit quaternion with w >= 0

Stages: decode (non-RGB encodings) → preprocess (the training test transform, on the backend's device) → APR graph
once → ``iapr_iterations`` refinement steps on the cached image latents → geometry normalisation → uncertainty
(the score of :mod:`apr_localizer.uncertainty` that the bundle's calibration uses, or ``step_size``; sigmas when the
bundle is calibrated).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import geometry, uncertainty
from .backends.base import Backend, BackendError, BackendOptions, Steps, create_backend
from .checkpoints import CheckpointError, ModelBundle, load_bundle
from .imaging import decode_raw
from .preprocess import PreprocessConfig, preprocess

__all__ = ["Estimate", "Localizer", "LocalizerOptions", "ModelLoadError"]

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """The model files or options cannot make a working localizer (one sentence naming the file or option)."""


@dataclass
class LocalizerOptions:
    """How to run a model: backend, device, precision, refinement iterations, threads, engine cache."""

    backend: str = "auto"  # auto | torch | onnxruntime | tensorrt
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | fp16 | bf16 | int8 (int8: TensorRT with calibration images)
    iapr_iterations: int = 3
    threads: int = 0  # CPU threads for the engine, 0 = physical cores
    cache_dir: str | None = None  # exported ONNX files and TensorRT engines
    preprocess_method: str = "auto"  # auto | pil | torch (see apr_localizer.preprocess)
    cuda_graphs: bool = False  # torch on CUDA: the whole APR + N-step loop as one CUDA graph
    tf32: bool = False  # allow TF32 for fp32 on CUDA (fp32 means fp32 unless asked)
    # Synchronised per-stage timings in Estimate.timings_ms (decode/preprocess/total are always there). None: on,
    # except with CUDA graphs, whose single whole-loop graph cannot be timed per stage.
    stage_timings: bool | None = None
    calibration_dir: str | None = None  # images that calibrate precision int8 (TensorRT), spread over the directory
    calibration_count: int = 64


@dataclass
class Estimate:
    """One localization result. ``pose`` is camera-to-map ``[x,y,z,qw,qx,qy,qz]`` (float64, unit q, ``w >= 0``).

    ``score`` is the uncertainty score ``score_name`` (higher = less trustworthy; NaN when it cannot be computed,
    e.g. ``step_size`` of the APR estimate) as it would be if the refinement had stopped at ``iterations``;
    ``sigma_position_m`` (per axis, m) and ``sigma_orientation_rad`` (per axis, rad) come from the bundle's
    calibration, None when the model is uncalibrated. ``scores`` holds every candidate score of
    :data:`uncertainty.SCORES` when asked for (evaluation), else nothing.
    """

    pose: np.ndarray
    apr_pose: np.ndarray
    scene_id: int
    scene_name: str
    confidence: float
    iterations: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    score: float = math.nan
    score_name: str = uncertainty.DEFAULT_SCORE
    sigma_position_m: float | None = None
    sigma_orientation_rad: float | None = None
    scores: dict[str, float] = field(default_factory=dict)  # every candidate score (run_steps all_scores=True)

    @property
    def position(self) -> np.ndarray:
        return self.pose[:3]

    @property
    def orientation(self) -> np.ndarray:
        """Unit quaternion, w-first."""
        return self.pose[3:7]

    def is_finite(self) -> bool:
        return bool(np.all(np.isfinite(self.pose)) and math.isfinite(self.confidence))


class Localizer:
    """Runs a :class:`ModelBundle` on a backend; one instance per worker thread (not thread-safe)."""

    def __init__(self, bundle: ModelBundle, options: LocalizerOptions | None = None) -> None:
        self.options = options = options or LocalizerOptions()
        if options.iapr_iterations < 0:
            raise ModelLoadError(f"iapr_iterations must be >= 0, got {options.iapr_iterations}")
        self.bundle = bundle
        self.scene_names = list(bundle.scene_names)
        self.preprocess_config = PreprocessConfig.from_dict({**bundle.preprocess, "method": options.preprocess_method})
        try:
            self.backend: Backend = create_backend(
                bundle,
                options.backend,
                BackendOptions(
                    device=options.device,
                    precision=options.precision,
                    threads=options.threads,
                    cache_dir=Path(options.cache_dir) if options.cache_dir else None,
                    cuda_graphs=options.cuda_graphs,
                    tf32=options.tf32,
                    calibration_images=self._calibration_images(options),
                ),
            )
        except BackendError as e:
            raise ModelLoadError(str(e)) from None
        self.stage_timings = not options.cuda_graphs if options.stage_timings is None else options.stage_timings
        self.device = str(self.backend.device)
        self.backend_name = self.backend.name
        self.iterations = options.iapr_iterations if bundle.iapr is not None else 0
        if bundle.iapr is None and options.iapr_iterations > 0:
            log.info("the model has no iAPR refiner: publishing MS-Transformer estimates")

    def _calibration_images(self, options: LocalizerOptions) -> torch.Tensor | None:
        """``calibration_count`` images spread over ``calibration_dir``, preprocessed: ``(N,3,H,W)`` (or None)."""
        if not options.calibration_dir:
            return None
        from .imaging import ImageDecodeError, decode_compressed

        root = Path(options.calibration_dir)
        images = (".png", ".jpg", ".jpeg")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in images) if root.is_dir() else []
        if not files:
            raise ModelLoadError(f"calibration_dir {str(root)!r} holds no .png/.jpg images to calibrate int8 with")
        picks = np.unique(np.linspace(0, len(files) - 1, num=min(max(1, options.calibration_count), len(files))))
        batch = []
        for i in picks.round().astype(np.int64):
            try:
                rgb = decode_compressed(files[i].read_bytes())
            except (ImageDecodeError, OSError) as e:
                raise ModelLoadError(f"calibration image {files[i]} cannot be read ({e})") from None
            batch.append(preprocess(rgb, self.preprocess_config))
        return torch.cat(batch)

    @classmethod
    def from_files(
        cls,
        model: str | Path,
        iapr: str | Path | None = None,
        pae: str | Path | None = None,
        options: LocalizerOptions | None = None,
        scene_names: list[str] | None = None,
        orientation: str | None = None,
    ) -> Localizer:
        """Build from our ``.safetensors`` bundle or official checkpoints (APR + optional iAPR/PAE).

        ``orientation="world_to_camera"`` declares that the model regresses world-to-camera rotations (official
        Cambridge Landmarks checkpoints); estimates are still returned camera-to-map.
        """
        try:
            bundle = load_bundle(model, iapr or None, pae or None, scene_names=scene_names, orientation=orientation)
        except CheckpointError as e:
            raise ModelLoadError(str(e)) from None
        return cls(bundle, options)

    # ------------------------------------------------------------------------------------------------ running
    def warmup(self, runs: int = 2) -> None:
        """Run the graphs on dummy data so that the first real frame is not slow."""
        self.backend.warmup(runs)
        dummy = np.zeros((480, 640, 3), np.uint8)
        self.localize(dummy)

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """Apply the shared test transform on the backend's device: ``(1,3,crop,crop)``."""
        return preprocess(rgb, self.preprocess_config, device=self.device)

    def localize(self, image: np.ndarray, encoding: str = "rgb8", iterations: int | None = None) -> Estimate:
        """Localize one image: ``image`` is an HxWx3 uint8 RGB array, or an HxWxC array in ``encoding``."""
        return self.run_steps(image, iterations, encoding=encoding)[-1]

    def run_steps(
        self,
        image: np.ndarray | torch.Tensor,
        iterations: int | None = None,
        *,
        encoding: str = "rgb8",
        scene_override: int | None = None,
        all_scores: bool = False,
    ) -> list[Estimate]:
        """Localize one image and return every step: ``[APR, after 1 step, …, after N steps]``.

        ``image`` is an HxWx3 uint8 RGB array, an HxWxC array in ``encoding``, or an already preprocessed
        ``(1,3,H,W)`` tensor. ``iterations`` defaults to the options' count (0 without an iAPR). Each estimate's
        ``timings_ms`` holds the stages (``decode``, ``preprocess``, ``apr``, ``encoder``, ``step1``…, ``iapr``,
        ``postprocess`` (which includes ``uncertainty``), ``total``), synchronised with the device. ``all_scores``
        also fills each estimate's ``scores`` with every candidate uncertainty score (``pae_gap``: one PAE pass).
        """
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        if isinstance(image, torch.Tensor):
            x = image.to(self.device)
            timings["decode"] = timings["preprocess"] = 0.0
        else:
            if encoding != "rgb8":
                arr = np.ascontiguousarray(image)
                h, w = arr.shape[:2]
                image = decode_raw(arr, encoding, w, h, arr.strides[0])
            t1 = time.perf_counter()
            timings["decode"] = (t1 - t0) * 1e3
            x = self.preprocess(image)
            timings["preprocess"] = (time.perf_counter() - t1) * 1e3
        n = self.iterations if iterations is None else (int(iterations) if self.bundle.iapr is not None else 0)
        override = None
        if scene_override is not None:
            override = torch.full((x.shape[0],), int(scene_override), dtype=torch.int64, device=x.device)
        steps = self.backend.run_steps(x, n, scene_override=override, timed=self.stage_timings)
        timings.update(steps.timings_ms)
        timings["iapr"] = sum(v for k, v in steps.timings_ms.items() if k != "apr")
        t4 = time.perf_counter()
        scene = int(steps.scene[0])
        conf = float(torch.exp(steps.scene_log_probs[0, scene].float()))
        name = self.scene_names[scene] if 0 <= scene < len(self.scene_names) else str(scene)
        raw = torch.stack([p[0] for p in steps.poses]).detach().to("cpu", torch.float64).numpy()  # one copy
        # camera-to-map whatever the model regresses (upstream Cambridge labels: world-to-camera rotations)
        poses = [_unit_pose(r) for r in geometry.to_camera_to_world(raw, self.bundle.orientation)]
        apr_raw = raw[0]  # as regressed (not normalised)
        cal = self.bundle.uncertainty
        score_name = cal.score if cal is not None else uncertainty.DEFAULT_SCORE
        t5 = time.perf_counter()
        pae = self._pae_gap(steps) if score_name == "pae_gap" or all_scores else math.nan
        timings["uncertainty"] = (time.perf_counter() - t5) * 1e3  # the PAE pass of pae_gap (0 for other scores)
        rot_weight = cal.rot_weight if cal is not None else 1.0
        timings["postprocess"] = (time.perf_counter() - t4) * 1e3
        timings["total"] = (time.perf_counter() - t0) * 1e3
        estimates = []
        for k, pose in enumerate(poses):
            score = uncertainty.score_frame(score_name, poses[: k + 1], conf, rot_weight, pae)
            sigmas = cal.sigma(score) if cal is not None else (None, None)
            estimates.append(
                Estimate(
                    pose=pose,
                    apr_pose=apr_raw,
                    scene_id=scene,
                    scene_name=name,
                    confidence=conf,
                    iterations=k,
                    timings_ms=timings,
                    score=score,
                    score_name=score_name,
                    sigma_position_m=sigmas[0],
                    sigma_orientation_rad=sigmas[1],
                    scores={
                        n: uncertainty.score_frame(n, poses[: k + 1], conf, rot_weight, pae)
                        for n in (uncertainty.SCORES if all_scores else ())
                    },
                )
            )
        return estimates

    def _pae_gap(self, steps: Steps) -> float:
        """:func:`uncertainty.pae_gap` of the APR estimate (the bundle's PAE in torch; NaN without a PAE)."""
        pae = self.bundle.pae if self.bundle.pae is not None else getattr(self.bundle.iapr, "pae", None)
        if pae is None:
            return math.nan
        param = next(pae.parameters())
        with torch.inference_mode():
            pose = steps.poses[0][:1].to(param.device, param.dtype)
            scene = steps.scene[:1].reshape(-1, 1).to(param.device, param.dtype)
            out = pae(pose, scene)
        return uncertainty.pae_gap(
            *(t[0].detach().to("cpu", torch.float64).numpy() for t in (out["latent_t"], out["latent_rot"])),
            *(t[0].detach().to("cpu", torch.float64).numpy() for t in (steps.latent_t, steps.latent_rot)),
        )

    def describe(self) -> dict[str, str]:
        """Backend, device, precision, scenes and iterations, for logs and diagnostics."""
        return {
            **self.backend.describe(),
            "scenes": ",".join(self.scene_names),
            "iapr_iterations": str(self.iterations),
            "selection": getattr(self.backend, "selection_reason", "requested"),
        }

    def close(self) -> None:
        """Release the backend."""
        self.backend.close()


def _unit_pose(pose: np.ndarray) -> np.ndarray:
    """Return a regressed pose ``(7,)`` with a unit w-first quaternion (NaN when the quaternion is invalid)."""
    try:
        return np.concatenate([pose[:3], geometry.quat_normalize(pose[3:])])
    except ValueError:  # zero or non-finite quaternion: reported as a non-finite estimate
        return np.full(7, np.nan)
