"""Render synthetic label-CSV datasets (7-Scenes-like layout) with several worker processes.

Layout written by :func:`write_dataset` under ``out_dir``::

    <scene>/<seq>/frame-000000.color.png       RGB, 8 bit
    <scene>/<seq>/frame-000000.pose.txt        4x4 camera-to-map matrix (7-Scenes style)
    <scene>/<seq>/frame-000000.depth.png       optional: uint16 z-depth in millimetres
    synthetic_train.csv, synthetic_test.csv    label CSVs: scene,split,seq,img_path,t1,t2,t3,q1,q2,q3,q4 (w first)
    intrinsics.json, dataset.json

Train and test sequences are different trajectories (different sequence numbers: train ``seq-01..``, test
continues the numbering) over the same walkable area of each scene. With ``mapping`` (``apr-synth dataset
--mapping``) the training sequences are mapping runs (:mod:`.mapping`: lawn-mower tours with 360° look-arounds, their
length set by the room) and ``dataset.json`` reports the coverage of each scene's test frames by its training frames.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from apr_localizer.fileio import atomic_path, atomic_write_text
from apr_localizer.geometry import pose_to_matrix

from ..datasets.labels import LabelRow, write_labels
from .mapping import MappingParams, coverage, mapping_poses
from .render import Intrinsics, render_buffers
from .scenes import Lighting, make_scene, stable_seed, vary_lighting
from .trajectory import Trajectory, TrajectoryParams, sequence_trajectory

__all__ = [
    "DEFAULT_SCENES",
    "SequencePlan",
    "frame_lightings",
    "make_sequence_trajectory",
    "plan_sequences",
    "render_sequence",
    "write_dataset",
]

DEFAULT_SCENES = ("office", "kitchen", "library", "warehouse")
_CHUNK = 8


@dataclass(frozen=True)
class SequencePlan:
    """One sequence to render: ``index`` is the global sequence number (seq-XX) that seeds its trajectory."""

    scene: str
    split: str
    index: int
    n_frames: int

    @property
    def seq(self) -> str:
        """7-Scenes-style sequence name."""
        return f"seq-{self.index:02d}"


def plan_sequences(scenes: Sequence[str], train_seqs: int, test_seqs: int, frames_per_seq: int) -> list[SequencePlan]:
    """Sequences for every scene: train ``seq-01..seq-<train_seqs>``, then test sequences."""
    if train_seqs < 0 or test_seqs < 0 or train_seqs + test_seqs == 0:
        raise ValueError(f"need at least one sequence; got train_seqs={train_seqs}, test_seqs={test_seqs}")
    if frames_per_seq <= 0:
        raise ValueError(f"frames_per_seq must be positive, got {frames_per_seq}")
    plans = []
    for name in scenes:
        for i in range(train_seqs + test_seqs):
            plans.append(SequencePlan(name, "train" if i < train_seqs else "test", i + 1, frames_per_seq))
    return plans


def frame_lightings(scene_name: str, scene_seed: int, seq_index: int, n_frames: int, amount: float) -> list[Lighting]:
    """Per-frame lighting: one variation per sequence (``amount``) plus a small per-frame flicker (``amount / 4``)."""
    scene = make_scene(scene_name, scene_seed)
    rng = np.random.default_rng(stable_seed("lighting", scene_name, scene_seed, seq_index))
    seq_light = vary_lighting(scene.lighting, rng, amount)
    return [vary_lighting(seq_light, rng, amount * 0.25) for _ in range(n_frames)]


def make_sequence_trajectory(
    scene_name: str, seq_index: int, n_frames: int, fps: float, seed: int = 0, params: TrajectoryParams | None = None
) -> Trajectory:
    """Build the trajectory of sequence ``seq_index`` (``n_frames`` at ``fps``) of a scene generated with ``seed``."""
    if n_frames <= 0 or fps <= 0:
        raise ValueError(f"n_frames and fps must be positive, got {n_frames} and {fps}")
    scene = make_scene(scene_name, seed)
    duration = max((n_frames - 1) / fps, 1.0 / fps)
    return sequence_trajectory(scene, seq_index, duration, seed, params)


def _sequence_poses(
    plan: SequencePlan, seed: int, fps: float, params: TrajectoryParams | None, mapping: MappingParams | None = None
):
    if mapping is not None and plan.split == "train":
        return mapping_poses(make_scene(plan.scene, seed), plan.index, fps, seed, mapping)
    return make_sequence_trajectory(plan.scene, plan.index, plan.n_frames, fps, seed, params).sample(plan.n_frames, fps)


def render_sequence(
    scene_name: str,
    seq_index: int,
    n_frames: int,
    width: int = 320,
    height: int = 240,
    fps: float = 30.0,
    seed: int = 0,
    hfov_deg: float = 60.0,
    lighting_variation: float = 1.0,
    params: TrajectoryParams | None = None,
) -> Iterator[tuple[float, np.ndarray, np.ndarray]]:
    """Render sequence ``seq_index`` of a scene frame by frame: yields ``(time_s, pose (7,), rgb (H, W, 3))``.

    Identical to the frames :func:`write_dataset` renders for the same scene, seed, sequence number, frame count
    and frame rate.
    """
    plan = SequencePlan(scene_name, "test", seq_index, n_frames)
    times, poses = _sequence_poses(plan, seed, fps, params)
    scene = make_scene(scene_name, seed)
    k = Intrinsics.from_hfov(width, height, hfov_deg)
    lights = frame_lightings(scene_name, seed, seq_index, n_frames, lighting_variation)
    for t, p, lt in zip(times, poses, lights):
        yield float(t), p, render_buffers(scene, p, k, width, height, lt).rgb


# ------------------------------------------------------------------------------------------------ workers
def _render_chunk(task: dict) -> int:
    """Worker: render and write a chunk of frames of one sequence; returns the number of frames written."""
    scene = make_scene(task["scene"], task["seed"])
    k = Intrinsics.from_dict(task["intrinsics"])
    out = Path(task["dir"])
    for idx, pose, light in zip(task["frames"], task["poses"], task["lights"]):
        r = render_buffers(scene, pose, k, task["width"], task["height"], Lighting.from_dict(light))
        stem = out / f"frame-{idx:06d}"
        with atomic_path(f"{stem}.color.png", fsync=False) as tmp:
            Image.fromarray(r.rgb).save(tmp, format="PNG", compress_level=1)
        with atomic_path(f"{stem}.pose.txt", fsync=False) as tmp:
            np.savetxt(tmp, pose_to_matrix(pose), fmt="%.9f")
        if task["depth"]:
            mm = np.clip(np.round(r.depth * 1000.0), 0, 65535).astype(np.uint16)
            with atomic_path(f"{stem}.depth.png", fsync=False) as tmp:
                Image.fromarray(mm).save(tmp, format="PNG", compress_level=1)
    return len(task["frames"])


def write_dataset(
    out_dir: str | Path,
    scenes: Sequence[str] = DEFAULT_SCENES,
    train_seqs: int = 2,
    test_seqs: int = 1,
    frames_per_seq: int = 300,
    width: int = 320,
    height: int = 240,
    seed: int = 0,
    workers: int = 2,
    fps: float = 10.0,
    hfov_deg: float = 60.0,
    lighting_variation: float = 1.0,
    save_depth: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
    params: TrajectoryParams | None = None,
    mapping: MappingParams | None = None,
) -> dict:
    """Render a synthetic multi-scene dataset; returns the ``dataset.json`` summary (also written to disk).

    With ``mapping`` the training sequences are mapping runs sampled at ``fps`` (their frame count follows from the
    room; ``frames_per_seq`` applies to the test sequences) and the summary holds ``coverage[scene]``
    (:func:`.mapping.coverage` of the test frames by the training frames, 0.5 m / 20°).

    ``fps`` is the frame rate along each trajectory (lower = more distinct views per frame); ``workers`` processes
    render in parallel (1 renders in this process). Existing label CSVs in ``out_dir`` raise ``FileExistsError``
    unless ``overwrite``.
    """
    scenes = list(scenes)
    if not scenes:
        raise ValueError("scenes must name at least one synthetic scene")
    if len(set(scenes)) != len(scenes):
        raise ValueError(f"scenes must be unique, got {scenes}")
    for name in scenes:
        make_scene(name, seed)  # validates the name early (and warms the cache)
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out_dir)
    train_csv, test_csv = out / "synthetic_train.csv", out / "synthetic_test.csv"
    if not overwrite and (train_csv.exists() or test_csv.exists()):
        raise FileExistsError(
            f"{out} already holds a synthetic dataset (label CSVs exist); pass overwrite=True (--overwrite)"
        )
    out.mkdir(parents=True, exist_ok=True)
    k = Intrinsics.from_hfov(width, height, hfov_deg)
    plans = plan_sequences(scenes, train_seqs, test_seqs, frames_per_seq)

    rows: dict[str, list[LabelRow]] = {"train": [], "test": []}
    tasks = []
    for j, plan in enumerate(plans):
        _, poses = _sequence_poses(plan, seed, fps, params, mapping)
        plan = plans[j] = SequencePlan(plan.scene, plan.split, plan.index, len(poses))
        lights = [
            lt.to_dict() for lt in frame_lightings(plan.scene, seed, plan.index, plan.n_frames, lighting_variation)
        ]
        seq_dir = out / plan.scene / plan.seq
        seq_dir.mkdir(parents=True, exist_ok=True)
        for i, p in enumerate(poses):
            img = f"{plan.scene}/{plan.seq}/frame-{i:06d}.color.png"
            rows[plan.split].append(LabelRow(plan.scene, plan.split, plan.seq, img, tuple(float(v) for v in p)))
        for s in range(0, plan.n_frames, _CHUNK):
            e = min(s + _CHUNK, plan.n_frames)
            tasks.append(
                {
                    "scene": plan.scene,
                    "seed": seed,
                    "dir": str(seq_dir),
                    "frames": list(range(s, e)),
                    "poses": poses[s:e],
                    "lights": lights[s:e],
                    "intrinsics": k.to_dict(width, height),
                    "width": width,
                    "height": height,
                    "depth": save_depth,
                }
            )

    total = sum(p.n_frames for p in plans)
    t0 = time.perf_counter()
    bar = _progress(total, progress)
    try:
        if workers == 1:
            for task in tasks:
                bar.update(_render_chunk(task))
        else:
            with mp.get_context("spawn").Pool(workers) as pool:
                for n in pool.imap_unordered(_render_chunk, tasks):
                    bar.update(n)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0

    for split, path in (("train", train_csv), ("test", test_csv)):
        write_labels(path, rows[split])
    cover = {}
    for name in scenes:
        train_p, test_p = ([r.pose for r in rows[sp] if r.scene == name] for sp in ("train", "test"))
        if train_p and test_p:
            cover[name] = coverage(np.array(test_p), np.array(train_p)).to_dict()
    atomic_write_text(out / "intrinsics.json", json.dumps(k.to_dict(width, height), indent=2) + "\n")
    summary = {
        "generator": "apr_training.synthetic",
        "scenes": scenes,
        "seed": seed,
        "width": width,
        "height": height,
        "hfov_deg": hfov_deg,
        "fps": fps,
        "frames_per_seq": frames_per_seq,
        "train_seqs": train_seqs,
        "test_seqs": test_seqs,
        "lighting_variation": lighting_variation,
        "depth": save_depth,
        "sequences": [{"scene": p.scene, "split": p.split, "seq": p.seq, "frames": p.n_frames} for p in plans],
        "frames": {"train": len(rows["train"]), "test": len(rows["test"])},
        "train_trajectory": "mapping" if mapping is not None else "handheld",
        "coverage": cover,
        "label_csv": {"train": train_csv.name, "test": test_csv.name},
        "intrinsics": k.to_dict(width, height),
        "render_seconds": round(elapsed, 3),
        "workers": workers,
        "command": command if command is not None else " ".join(sys.argv),
    }
    atomic_write_text(out / "dataset.json", json.dumps(summary, indent=2) + "\n")
    return summary


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="frame", desc="rendering", dynamic_ncols=True)
