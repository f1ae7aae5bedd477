"""``apr-synth``: render the synthetic multi-scene benchmark, write ROS 2 bags, benchmark the renderer.

Subcommands: ``dataset`` (label-CSV dataset; ``--mapping``: mapping-run training sequences), ``bag`` (one trajectory
into a rosbag2 bag), ``bench`` (renderer frames/s per core), ``info`` (summary of any bag), ``extract`` (bag ->
label-CSV dataset), ``coverage`` (test frames with a training frame within 0.5 m / 20°).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apr_localizer.fileio import atomic_write_text

from ..synthetic.mapping import MappingParams
from ..synthetic.scenes import SCENE_STYLES

__all__ = ["build_parser", "synth_main"]

_EPILOG = """examples:
  apr-synth dataset --out data/synthetic --scenes office,kitchen,library,warehouse --frames 300 --workers 2
  apr-synth dataset --out data/mapping --mapping --train-seqs 3 --test-seqs 1 --fps 2 --frames 250
  apr-synth coverage --train data/mapping/synthetic_train.csv --test data/mapping/synthetic_test.csv
  apr-synth bag --out bags/office_test --scene office --frames 300 --fps 30 --storage mcap --compressed
  apr-synth bag --out bags/office_tf --scene office --tf chain --tf-rate 100 --no-pose-topic
  apr-synth bench --frames 20 --json bench.json
  apr-synth info bags/office_test
  apr-synth extract bags/office_test --out data/from_bag --image-topic /camera/image_raw \\
      --gt tf:map->camera_optical --scene office
"""


def _scenes(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in SCENE_STYLES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown scene(s) {', '.join(bad) or '(none)'}; known scenes are: {', '.join(SCENE_STYLES)}"
        )
    return names


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} must look like 320x240") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return w, h


def _pose7(text: str) -> np.ndarray:
    vals = [float(v) for v in text.split(",")]
    if len(vals) != 7:
        raise argparse.ArgumentTypeError(f"pose {text!r} must be 7 comma-separated numbers x,y,z,qw,qx,qy,qz")
    return np.asarray(vals)


def build_parser() -> argparse.ArgumentParser:
    """Build the ``apr-synth`` argument parser."""
    p = argparse.ArgumentParser(
        prog="apr-synth",
        description="Synthetic multi-scene benchmark: procedural indoor scenes rendered on the CPU with known camera "
        "poses, as a 7-Scenes-like label-CSV dataset or as ROS 2 bags (rosbags, sqlite3/mcap).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{dataset,bag,bench,info,extract,coverage}")
    scene_help = f"comma-separated scene names from: {', '.join(SCENE_STYLES)}"

    d = sub.add_parser(
        "dataset",
        help="render a label-CSV dataset (train and test sequences per scene)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d.add_argument("--out", required=True, type=Path, help="output directory")
    d.add_argument("--scenes", type=_scenes, default="office,kitchen,library,warehouse", help=scene_help)
    d.add_argument("--train-seqs", type=int, default=2, help="training sequences per scene")
    d.add_argument("--test-seqs", type=int, default=1, help="test sequences per scene (different trajectories)")
    d.add_argument("--frames", type=int, default=300, help="frames per sequence")
    d.add_argument(
        "--fps", type=float, default=10.0, help="frame rate along the trajectory (lower: more distinct views per frame)"
    )
    d.add_argument("--size", type=_size, default=(320, 240), help="image size WxH")
    d.add_argument("--hfov", type=float, default=60.0, help="horizontal field of view in degrees")
    d.add_argument("--seed", type=int, default=0, help="seed of scene layouts, trajectories and lighting")
    d.add_argument("--workers", type=int, default=2, help="render processes")
    d.add_argument(
        "--lighting-variation", type=float, default=1.0, help="0 disables per-sequence/per-frame lighting changes"
    )
    d.add_argument("--depth", action="store_true", help="also write frame-*.depth.png (uint16 millimetres)")
    d.add_argument("--mapping", action="store_true",
                   help="training sequences are mapping runs: lawn-mower tours of the free space with 360-degree "
                   "look-arounds (length set by the room; --frames then applies to the test sequences); the coverage "
                   "of the test frames is reported")  # fmt: skip
    d.add_argument("--lane-spacing", type=float, default=1.0, help="--mapping: distance between lanes (m)")
    d.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")

    b = sub.add_parser(
        "bag",
        help="render one trajectory into a ROS 2 bag (images, camera info, GT pose, TF)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    b.add_argument("--out", required=True, type=Path, help="bag directory to create")
    b.add_argument("--scene", type=_scenes, default="office", help="one scene name")
    b.add_argument("--seed", type=int, default=0, help="dataset seed (same scene layout as 'dataset --seed')")
    b.add_argument(
        "--seq",
        type=int,
        default=50,
        help="trajectory number; numbers used by a dataset (1..train+test)"
        " give its sequences, others are new trajectories",
    )
    b.add_argument("--frames", type=int, default=300, help="number of images")
    b.add_argument("--fps", type=float, default=30.0, help="image rate (Hz)")
    b.add_argument("--size", type=_size, default=(320, 240), help="image size WxH")
    b.add_argument("--hfov", type=float, default=60.0, help="horizontal field of view in degrees")
    b.add_argument("--lighting-variation", type=float, default=1.0, help="lighting variation amount")
    b.add_argument("--storage", choices=("sqlite3", "mcap"), default="sqlite3", help="rosbag2 storage plugin")
    b.add_argument("--image-topic", default="/camera/image_raw", help="sensor_msgs/Image topic")
    b.add_argument("--encoding", default="rgb8", help="Image encoding (rgb8, bgr8, mono8, yuv422, ...)")
    b.add_argument(
        "--compressed", action="store_true", help="also write CompressedImage (jpeg) on <image-topic>/compressed"
    )
    b.add_argument("--no-raw", action="store_true", help="skip the raw Image topic (needs --compressed)")
    b.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality")
    b.add_argument("--camera-info-topic", default="/camera/camera_info", help="CameraInfo topic ('' disables)")
    b.add_argument("--pose-topic", default="/ground_truth/pose", help="ground-truth PoseStamped topic")
    b.add_argument("--no-pose-topic", action="store_true", help="no PoseStamped ground truth (TF only)")
    b.add_argument(
        "--tf",
        choices=("camera", "chain", "none"),
        default="camera",
        help="TF: map->camera, map->odom->base_link->camera, or none",
    )
    b.add_argument("--tf-rate", type=float, default=None, help="TF rate in Hz (default: one per image)")
    b.add_argument("--map-frame", default="map")
    b.add_argument("--camera-frame", default="camera_optical")
    b.add_argument("--start-time", type=float, default=1_700_000_000.0, help="stamp of the first image (s)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing bag")

    n = sub.add_parser(
        "bench",
        help="renderer frames/s per core (single process) as a table and JSON",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    n.add_argument("--scenes", type=_scenes, default=",".join(SCENE_STYLES), help=scene_help)
    n.add_argument("--sizes", default="320x240,640x480", help="comma-separated WxH sizes")
    n.add_argument("--frames", type=int, default=20, help="timed frames per scene and size (after 1 warm-up)")
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--json", type=Path, default=None, help="write the results here")

    i = sub.add_parser("info", help="topics, types, type hashes, counts and duration of a bag")
    i.add_argument("bag", type=Path)

    c = sub.add_parser("coverage", help="fraction of test frames with a training frame within 0.5 m / 20 deg",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    c.add_argument("--train", required=True, type=Path, help="training label CSV")
    c.add_argument("--test", required=True, type=Path, help="test label CSV (per scene)")
    c.add_argument("--distance", type=float, default=0.5, help="position threshold (m)")
    c.add_argument("--angle", type=float, default=20.0, help="orientation threshold (deg)")
    c.add_argument("--json", type=Path, help="also write the numbers as JSON")

    e = sub.add_parser(
        "extract",
        help="bag -> label-CSV dataset (images matched to ground truth by stamp)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    e.add_argument("bag", type=Path)
    e.add_argument("--out", required=True, type=Path, help="dataset root")
    e.add_argument("--image-topic", required=True, help="Image or CompressedImage topic (type auto-detected)")
    e.add_argument("--gt", required=True, help="ground truth: pose:/topic, odom:/topic or tf:map->camera_frame")
    e.add_argument("--scene", required=True, help="scene name written to the label CSVs")
    e.add_argument("--tolerance", type=float, default=0.02, help="max stamp difference image <-> GT (s)")
    e.add_argument("--stride", type=int, default=1, help="keep every N-th matched image")
    e.add_argument("--test-fraction", type=float, default=0.2, help="last fraction of the frames -> test split")
    e.add_argument(
        "--split-time",
        type=float,
        default=None,
        help="seconds after the first image where test starts (overrides --test-fraction)",
    )
    e.add_argument(
        "--sensor-offset", type=_pose7, default=None, help="camera pose in the GT child frame, x,y,z,qw,qx,qy,qz"
    )
    e.add_argument("--seq-prefix", default=None, help="sequence name prefix (default: bag name)")
    e.add_argument("--overwrite", action="store_true")
    return p


def _cmd_dataset(a: argparse.Namespace, argv: Sequence[str]) -> int:
    from ..synthetic.writer import write_dataset

    scenes = a.scenes  # argparse applies _scenes to the string default too
    w, h = a.size
    summary = write_dataset(
        a.out,
        scenes=scenes,
        train_seqs=a.train_seqs,
        test_seqs=a.test_seqs,
        frames_per_seq=a.frames,
        width=w,
        height=h,
        seed=a.seed,
        workers=a.workers,
        fps=a.fps,
        hfov_deg=a.hfov,
        lighting_variation=a.lighting_variation,
        save_depth=a.depth,
        overwrite=a.overwrite,
        progress=not a.no_progress,
        command="apr-synth " + shlex.join(argv),
        mapping=MappingParams(lane_spacing_m=a.lane_spacing) if a.mapping else None,
    )
    print(
        f"wrote {summary['frames']['train']} train + {summary['frames']['test']} test frames of "
        f"{', '.join(scenes)} to {a.out} in {summary['render_seconds']:.1f} s"
    )
    for name, c in summary["coverage"].items():
        print(_format_coverage(name, c))
    return 0


def _format_coverage(name: str, c: dict) -> str:
    return (f"coverage {name}: {c['fraction']:.0%} of {c['frames']} test frames have a training frame within "
            f"{c['max_distance_m']:g} m / {c['max_angle_deg']:g} deg (nearest position median "
            f"{c['nearest_position_median_m']:.2f} m)")  # fmt: skip


def _cmd_coverage(a: argparse.Namespace) -> int:
    from ..datasets.labels import read_labels
    from ..synthetic.mapping import coverage

    train, test = read_labels(a.train), read_labels(a.test)
    out = {}
    for name in sorted(set(test.scene)):
        tr, te = train.where(scene=name), test.where(scene=name)
        out[name] = coverage(te.unit_poses(), tr.unit_poses(), a.distance, a.angle).to_dict()
        print(_format_coverage(name, out[name]))
    if a.json:
        atomic_write_text(a.json, json.dumps(out, indent=2) + "\n")
    return 0


def _cmd_bag(a: argparse.Namespace) -> int:
    from ..bags import io as bagio
    from ..synthetic.render import Intrinsics
    from ..synthetic.writer import render_sequence

    scenes = a.scene
    if len(scenes) != 1:
        raise SystemExit(f"apr-synth bag: --scene takes one scene, got {', '.join(scenes)}")
    if a.no_raw and not a.compressed:
        raise SystemExit("apr-synth bag: --no-raw needs --compressed (otherwise no image topic is written)")
    scene = scenes[0]
    w, h = a.size
    t0 = int(round(a.start_time * 1e9))
    frames = (
        bagio.PosedImage(t0 + int(round(i * 1e9 / a.fps)), rgb, pose)
        for i, (_, pose, rgb) in enumerate(
            render_sequence(scene, a.seq, a.frames, w, h, a.fps, a.seed, a.hfov, a.lighting_variation)
        )
    )
    tf_poses = None
    if a.tf_rate:
        from ..synthetic.writer import make_sequence_trajectory

        traj = make_sequence_trajectory(scene, a.seq, a.frames, a.fps, a.seed)
        n_tf = int(np.floor(traj.duration * a.tf_rate + 1e-9)) + 1
        ts = np.arange(n_tf) / a.tf_rate
        tf_poses = list(zip((t0 + np.round(ts * 1e9)).astype(np.int64).tolist(), traj.pose_at(ts)))
    info = bagio.write_bag(
        a.out,
        frames,
        a.storage,
        a.image_topic,
        a.compressed,
        raw=not a.no_raw,
        encoding=a.encoding,
        jpeg_quality=a.jpeg_quality,
        camera_info_topic=a.camera_info_topic or None,
        intrinsics=Intrinsics.from_hfov(w, h, a.hfov),
        pose_topic=None if a.no_pose_topic else a.pose_topic,
        tf=None if a.tf == "none" else a.tf,
        tf_poses=tf_poses,
        map_frame=a.map_frame,
        camera_frame=a.camera_frame,
        overwrite=a.overwrite,
    )
    print(_format_info(info))
    return 0


def _format_info(info: dict) -> str:
    lines = [f"bag {info['path']} ({info['storage']}): {info['message_count']} messages, {info['duration_s']:.3f} s"]
    width = max((len(t) for t in info["topics"]), default=5)
    for topic, t in info["topics"].items():
        lines.append(f"  {topic:<{width}}  {t['count']:>7}  {t['type']}  {t['hash']}")
    return "\n".join(lines)


def run_bench(scenes: Sequence[str], sizes: Sequence[tuple[int, int]], frames: int, seed: int = 0) -> dict:
    """Time the renderer in this process (one core): mean ms and frames/s per scene and size."""
    from ..synthetic.render import Intrinsics, render_buffers
    from ..synthetic.scenes import make_scene
    from ..synthetic.writer import frame_lightings, make_sequence_trajectory

    results: list[dict[str, Any]] = []
    for w, h in sizes:
        k = Intrinsics.from_hfov(w, h, 60.0)
        for name in scenes:
            scene = make_scene(name, seed)
            _, poses = make_sequence_trajectory(name, 1, frames + 1, 10.0, seed).sample(frames + 1, 10.0)
            lights = frame_lightings(name, seed, 1, frames + 1, 1.0)
            render_buffers(scene, poses[0], k, w, h, lights[0])  # warm-up (caches)
            t = time.perf_counter()
            for p, lt in zip(poses[1:], lights[1:]):
                render_buffers(scene, p, k, w, h, lt)
            dt = (time.perf_counter() - t) / frames
            results.append(
                {
                    "scene": name,
                    "width": w,
                    "height": h,
                    "ms_per_frame": round(dt * 1e3, 2),
                    "frames_per_s": round(1.0 / dt, 2),
                }
            )
    summary = {}
    for w, h in sizes:
        rows = [r for r in results if (r["width"], r["height"]) == (w, h)]
        summary[f"{w}x{h}"] = round(len(rows) / sum(1.0 / r["frames_per_s"] for r in rows), 2)
    return {
        "results": results,
        "frames_per_s_per_core": summary,
        "frames": frames,
        "seed": seed,
        "cpu": _cpu_name(),
        "numpy": np.__version__,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _cmd_bench(a: argparse.Namespace) -> int:
    scenes = a.scenes
    sizes = [_size(s) for s in a.sizes.split(",") if s.strip()]
    if a.frames <= 0:
        raise SystemExit("apr-synth bench: --frames must be positive")
    res = run_bench(scenes, sizes, a.frames, a.seed)
    print(f"{'scene':<10} {'size':>9} {'ms/frame':>9} {'frames/s':>9}")
    for r in res["results"]:
        print(f"{r['scene']:<10} {r['width']:>4}x{r['height']:<4} {r['ms_per_frame']:>9.1f} {r['frames_per_s']:>9.1f}")
    for size, fps in res["frames_per_s_per_core"].items():
        print(f"{'all':<10} {size:>9} {1000.0 / fps:>9.1f} {fps:>9.1f}")
    print(f"(one process on {res['cpu']})")
    if a.json:
        atomic_write_text(a.json, json.dumps(res, indent=2) + "\n")
    return 0


def _cmd_info(a: argparse.Namespace) -> int:
    from ..bags import io as bagio

    print(_format_info(bagio.bag_info(a.bag)))
    return 0


def _cmd_extract(a: argparse.Namespace) -> int:
    from ..datasets.from_bag import extract_dataset

    s = extract_dataset(
        a.bag,
        a.out,
        a.image_topic,
        a.gt,
        a.scene,
        tolerance_s=a.tolerance,
        stride=a.stride,
        test_fraction=a.test_fraction,
        split_time=a.split_time,
        sensor_offset=a.sensor_offset,
        seq_prefix=a.seq_prefix,
        overwrite=a.overwrite,
        progress=True,
    )
    print(
        f"{s['images']} images, {s['matched']} matched ground truth, wrote {s['written']['train']} train + "
        f"{s['written']['test']} test frames to {a.out}"
    )
    return 0


def synth_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``apr-synth``; returns the exit status (errors print one line and return 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    try:
        if a.command == "dataset":
            return _cmd_dataset(a, argv)
        if a.command == "bag":
            return _cmd_bag(a)
        if a.command == "bench":
            return _cmd_bench(a)
        if a.command == "info":
            return _cmd_info(a)
        if a.command == "coverage":
            return _cmd_coverage(a)
        return _cmd_extract(a)
    except (ValueError, FileExistsError, RuntimeError, LookupError) as exc:
        print(f"apr-synth {a.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(synth_main())
