"""Smooth handheld-camera trajectories through a synthetic room, and a label-CSV dataset writer built on them.

A trajectory is a centripetal Catmull-Rom spline through random waypoints in the room's free space (clearance from
walls and furniture footprints), walked at a roughly constant speed; the camera looks towards a slowly moving
look-at point with small pitch/roll jitter, like a person carrying a camera. Poses are camera-to-map in the ROS
optical convention (x right, y down, z forward; map z up). Everything is deterministic from (scene, split, seq, seed).
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from apr_localizer import geometry
from apr_localizer.fileio import atomic_path, atomic_write_text

from ..datasets.labels import LabelRow, write_labels
from .render import Intrinsics, render_frame
from .scenes import make_scene, vary_lighting

__all__ = ["TrajectoryConfig", "look_rotation", "make_trajectory", "write_label_dataset", "write_trajectory_bag"]


@dataclass(frozen=True)
class TrajectoryConfig:
    """Shape of a handheld trajectory."""

    frames: int = 200
    step_m: float = 0.06  # distance between consecutive frames
    margin_m: float = 0.7  # minimum horizontal clearance of waypoints to walls and furniture
    height_m: tuple[float, float] = (1.15, 1.75)
    pitch_deg: float = 8.0  # std of the slow pitch wobble (looking slightly down on average)
    roll_deg: float = 3.0
    waypoints: int = 8


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def look_rotation(forward: np.ndarray, roll: float = 0.0) -> np.ndarray:
    """``map_R_camera`` (3x3) for an optical camera looking along ``forward`` (map frame, z up) with ``roll`` rad."""
    f = forward / np.linalg.norm(forward)
    right = np.cross(f, [0.0, 0.0, 1.0])
    if np.linalg.norm(right) < 1e-6:  # looking straight up/down: any right vector
        right = np.array([0.0, -1.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(f, right)
    c, s = np.cos(roll), np.sin(roll)
    right, down = c * right + s * down, -s * right + c * down
    return np.stack([right, down, f], axis=1)


def _free_points(scene, rng: np.random.Generator, n: int, margin: float) -> np.ndarray:
    lo, hi = scene.room_min[:2] + margin, scene.room_max[:2] - margin
    pts: list[np.ndarray] = []
    for _ in range(200):
        cand = rng.uniform(lo, hi, size=(64, 2))
        ok = cand[scene.point_clearance(cand) >= margin]
        pts.extend(ok)
        if len(pts) >= n:
            break
    if len(pts) < n:
        raise RuntimeError(f"scene {scene.name}: not enough free space for a trajectory (margin {margin} m)")
    return np.asarray(pts[:n])


def _catmull_rom(points: np.ndarray, samples_per_segment: int = 64) -> np.ndarray:
    """Centripetal Catmull-Rom curve through ``points (N,d)`` (end points duplicated); densely sampled ``(M,d)``."""
    p = np.concatenate([points[:1], points, points[-1:]])
    out = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        t0 = 0.0
        t1 = t0 + max(np.linalg.norm(p1 - p0) ** 0.5, 1e-6)
        t2 = t1 + max(np.linalg.norm(p2 - p1) ** 0.5, 1e-6)
        t3 = t2 + max(np.linalg.norm(p3 - p2) ** 0.5, 1e-6)
        t = np.linspace(t1, t2, samples_per_segment, endpoint=False)[:, None]
        a1 = (t1 - t) / (t1 - t0) * p0 + (t - t0) / (t1 - t0) * p1
        a2 = (t2 - t) / (t2 - t1) * p1 + (t - t1) / (t2 - t1) * p2
        a3 = (t3 - t) / (t3 - t2) * p2 + (t - t2) / (t3 - t2) * p3
        b1 = (t2 - t) / (t2 - t0) * a1 + (t - t0) / (t2 - t0) * a2
        b2 = (t3 - t) / (t3 - t1) * a2 + (t - t1) / (t3 - t1) * a3
        out.append((t2 - t) / (t2 - t1) * b1 + (t - t1) / (t2 - t1) * b2)
    out.append(points[-1:])
    return np.concatenate(out)


def _resample(curve: np.ndarray, step: float, n: int) -> np.ndarray:
    seg = np.linalg.norm(np.diff(curve, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    targets = np.minimum(np.arange(n) * step, s[-1])
    return np.stack([np.interp(targets, s, curve[:, k]) for k in range(curve.shape[1])], axis=1)


def _smooth_noise(rng: np.random.Generator, n: int, std: float, corr: int = 40) -> np.ndarray:
    x = rng.normal(size=n + 4 * corr)
    k = np.exp(-0.5 * (np.arange(-2 * corr, 2 * corr + 1) / corr) ** 2)
    y = np.convolve(x, k / np.sqrt((k**2).sum()), mode="same")[2 * corr : 2 * corr + n]
    return std * y


def make_trajectory(scene, seed: int, config: TrajectoryConfig = TrajectoryConfig()) -> np.ndarray:
    """Camera-to-map poses ``(frames, 7)`` of one smooth handheld sequence in ``scene``."""
    rng = np.random.default_rng(seed)
    c = config
    length = c.frames * c.step_m
    wp = _free_points(scene, rng, max(c.waypoints, 4), c.margin_m)
    for _ in range(20):  # extend the waypoint chain until the curve is long enough
        curve = _catmull_rom(wp)
        if np.linalg.norm(np.diff(curve, axis=0), axis=1).sum() >= length:
            break
        wp = np.concatenate([wp, _free_points(scene, rng, 4, c.margin_m)])
    xy = _resample(curve, c.step_m, c.frames)
    z = np.clip(np.mean(c.height_m) + _smooth_noise(rng, c.frames, (c.height_m[1] - c.height_m[0]) / 4), *c.height_m)
    # look-at target: a second, slower curve through other free points, at object height
    targets = _resample(_catmull_rom(_free_points(scene, rng, max(c.waypoints, 4), 0.2)), c.step_m * 0.7, c.frames)
    pitch = np.radians(-4.0 + _smooth_noise(rng, c.frames, c.pitch_deg))
    roll = np.radians(_smooth_noise(rng, c.frames, c.roll_deg))
    poses = np.zeros((c.frames, 7))
    for i in range(c.frames):
        d = targets[i] - xy[i]
        if np.linalg.norm(d) < 0.3:  # target too close: look along the motion instead
            d = xy[min(i + 1, c.frames - 1)] - xy[max(i - 1, 0)]
        yaw = np.arctan2(d[1], d[0])
        fwd = np.array([np.cos(yaw) * np.cos(pitch[i]), np.sin(yaw) * np.cos(pitch[i]), np.sin(pitch[i])])
        poses[i, :3] = [xy[i, 0], xy[i, 1], z[i]]
        poses[i, 3:] = geometry.matrix_to_quat(look_rotation(fwd, roll[i]))
    return poses


def _render_job(args: tuple) -> None:
    scene_name, scene_seed, pose, light_seed, path, width, height, k = args
    from PIL import Image

    scene = make_scene(scene_name, scene_seed)
    light = vary_lighting(scene.lighting, np.random.default_rng(light_seed))
    img = render_frame(scene, pose, Intrinsics(*k), width, height, light)
    with atomic_path(path, fsync=False) as tmp:
        Image.fromarray(img).save(tmp, format="PNG", compress_level=1)


def default_intrinsics(width: int, height: int, hfov_deg: float = 70.0) -> tuple[float, float, float, float]:
    """Pinhole ``(fx, fy, cx, cy)`` with the given horizontal field of view, square pixels, centred."""
    f = width / 2 / np.tan(np.radians(hfov_deg) / 2)
    return (f, f, width / 2 - 0.5, height / 2 - 0.5)


def write_label_dataset(
    out: str | Path,
    scenes: Sequence[str],
    train_seqs: int = 3,
    test_seqs: int = 1,
    frames: int = 200,
    width: int = 320,
    height: int = 240,
    seed: int = 0,
    workers: int | None = None,
    step_m: float = 0.06,
    progress: bool = True,
) -> dict:
    """Render a 7-Scenes-like dataset: ``<scene>/seq-NN/frame-NNNNNN.color.png`` + ``train.csv``/``test.csv``.

    Train and test sequences are different trajectories through the same rooms. Returns the dataset description
    (also written to ``dataset.json``).
    """
    out = Path(out)
    k = default_intrinsics(width, height)
    cfg = TrajectoryConfig(frames=frames, step_m=step_m)
    rows: dict[str, list[LabelRow]] = {"train": [], "test": []}
    jobs = []
    for scene_name in scenes:
        scene = make_scene(scene_name, seed)
        for split, n_seq, first in (("train", train_seqs, 1), ("test", test_seqs, 1 + train_seqs)):
            for s in range(first, first + n_seq):
                seq = f"seq-{s:02d}"
                poses = make_trajectory(scene, _seed(scene_name, seq, seed), cfg)
                (out / scene_name / seq).mkdir(parents=True, exist_ok=True)
                for i, pose in enumerate(poses):
                    rel = f"{scene_name}/{seq}/frame-{i:06d}.color.png"
                    label = tuple(float(f"{v:.9g}") for v in pose)  # 9 digits, as the demo model's data was written
                    rows[split].append(LabelRow(scene_name, split, seq, rel, label))
                    jobs.append(
                        (scene_name, seed, pose, _seed(scene_name, seq, i, seed), str(out / rel), width, height, k)
                    )
    workers = workers or os.cpu_count() or 1
    from tqdm import tqdm

    with Pool(workers) as pool:
        for _ in tqdm(
            pool.imap_unordered(_render_job, jobs, chunksize=8),
            total=len(jobs),
            disable=not progress,
            desc="rendering",
            unit="frame",
        ):
            pass
    for split, r in rows.items():
        write_labels(out / f"{split}.csv", r)
    info = {
        "scenes": list(scenes),
        "seed": seed,
        "size": [width, height],
        "intrinsics": dict(zip(("fx", "fy", "cx", "cy"), k)),
        "trajectory": asdict(cfg),
        "train_seqs": train_seqs,
        "test_seqs": test_seqs,
        "frames": {s: len(r) for s, r in rows.items()},
    }
    atomic_write_text(out / "dataset.json", json.dumps(info, indent=2))
    return info


def write_trajectory_bag(
    out: str | Path,
    scene_name: str,
    seq: str = "seq-04",
    frames: int = 150,
    width: int = 640,
    height: int = 480,
    fps: float = 15.0,
    seed: int = 0,
    storage: str = "sqlite3",
    step_m: float = 0.06,
    camera_frame: str = "camera_optical",
    image_topic: str = "/camera/image_raw",
    workers: int | None = None,
) -> dict:
    """Render one trajectory of ``scene_name`` into a ROS 2 bag (rosbags, Kilted type store).

    Topics: ``image_topic`` (sensor_msgs/Image rgb8), ``<ns>/camera_info``, ``/ground_truth/pose`` (PoseStamped in
    ``map``) and ``/tf`` (map → ``camera_frame``), all with the same stamps. With the dataset's ``seed``, a test
    ``seq`` name and the dataset's ``frames`` and ``step_m``, the poses equal those of that dataset sequence (rendered
    at this size); another ``frames`` gives another trajectory through the same room. Returns a description.
    """
    from PIL import Image as PILImage
    from tqdm import tqdm

    from ..bags.io import PosedImage, write_bag

    out = Path(out)
    scene = make_scene(scene_name, seed)
    poses = make_trajectory(scene, _seed(scene_name, seq, seed), TrajectoryConfig(frames=frames, step_m=step_m))
    k = default_intrinsics(width, height)
    tmp = out.parent / (out.name + ".frames")
    tmp.mkdir(parents=True, exist_ok=True)
    jobs = [
        (scene_name, seed, p, _seed(scene_name, seq, i, seed), str(tmp / f"{i:06d}.png"), width, height, k)
        for i, p in enumerate(poses)
    ]
    with Pool(workers or os.cpu_count() or 1) as pool:
        for _ in tqdm(pool.imap(_render_job, jobs, chunksize=4), total=len(jobs), desc="rendering bag", unit="frame"):
            pass
    t0 = 1_700_000_000 * 10**9
    bag_frames = (
        PosedImage(t0 + int(round(i * 1e9 / fps)), np.asarray(PILImage.open(tmp / f"{i:06d}.png").convert("RGB")), pose)
        for i, pose in enumerate(poses)
    )
    ns = image_topic.rsplit("/", 1)[0] or ""
    write_bag(
        out,
        bag_frames,
        storage,
        image_topic,
        camera_info_topic=f"{ns}/camera_info",
        intrinsics=Intrinsics(*k),
        pose_topic="/ground_truth/pose",
        tf="camera",
        camera_frame=camera_frame,
    )
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "bag": str(out),
        "scene": scene_name,
        "seq": seq,
        "frames": frames,
        "fps": fps,
        "size": [width, height],
        "topics": [image_topic, f"{ns}/camera_info", "/ground_truth/pose", "/tf"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m apr_training.synthetic.handheld OUT --scenes a,b``: render a label-CSV dataset."""
    import argparse

    p = argparse.ArgumentParser(description=write_label_dataset.__doc__, prog="handheld")
    p.add_argument("out", help="output dataset root (with --bag: the bag directory to create)")
    p.add_argument("--bag", metavar="SCENE", help="render one trajectory of SCENE into a ROS 2 bag instead")
    p.add_argument("--seq", default="seq-04", help="--bag: sequence name (the dataset's test sequence by default)")
    p.add_argument("--fps", type=float, default=15.0, help="--bag: frame rate of the stamps")
    p.add_argument("--storage", choices=("sqlite3", "mcap"), default="sqlite3", help="--bag: rosbag2 storage")
    p.add_argument("--scenes", default="office,kitchen,library,warehouse", help="comma list of synthetic scenes")
    p.add_argument("--train-seqs", type=int, default=3)
    p.add_argument("--test-seqs", type=int, default=1)
    p.add_argument("--frames", type=int, default=200, help="frames per sequence")
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--step", type=float, default=0.06, help="metres between consecutive frames")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="render processes (0 = all cores)")
    a = p.parse_args(argv)
    if a.bag:
        info = write_trajectory_bag(
            a.out,
            a.bag,
            a.seq,
            a.frames,
            a.width,
            a.height,
            a.fps,
            a.seed,
            a.storage,
            a.step,
            workers=a.workers or None,
        )
        print(json.dumps(info))
        return 0
    info = write_label_dataset(
        a.out,
        a.scenes.split(","),
        a.train_seqs,
        a.test_seqs,
        a.frames,
        a.width,
        a.height,
        a.seed,
        a.workers or None,
        a.step,
    )
    print(json.dumps(info["frames"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
