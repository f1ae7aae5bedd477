"""Extract a label-CSV dataset from a ROS 2 bag: images matched to ground-truth poses by timestamp.

Ground truth sources (``gt_source``):

* ``pose:/topic`` — ``geometry_msgs/PoseStamped`` or ``PoseWithCovarianceStamped`` (or Odometry) on ``/topic``;
* ``odom:/topic`` — ``nav_msgs/Odometry`` on ``/topic``;
* ``tf:map->camera_frame`` — the TF chain ``map <- camera_frame`` from ``/tf`` and ``/tf_static``.

Images are matched to ground truth by :mod:`apr_training.bags.ground_truth` (the one matcher, shared with
``apr-eval-bag``): header stamp (bag time when zero), nearest pose/odom sample or interpolated TF chain within
``tolerance_s``, ``sensor_offset`` (the camera pose in the ground-truth child frame, e.g. base_link -> camera)
composed on the right. Matched images are thinned by ``stride`` and split by time: the first
part is ``train``, the rest ``test`` (``test_fraction`` of the frames, or everything from ``split_time``).

Output (7-Scenes-like, read by :mod:`apr_training.datasets.labels`)::

    <out>/<scene>/<seq>/frame-000000.color.png      seq = <prefix>-train / <prefix>-test
    <out>/<scene>_train.csv, <out>/<scene>_test.csv  scene,split,seq,img_path,t1,t2,t3,q1,q2,q3,q4
    <out>/<scene>_frames.csv                          per-frame stamps and matching residuals
    <out>/intrinsics.json (when the bag has a CameraInfo next to the image topic), <out>/<scene>_extract.json
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from apr_localizer.fileio import atomic_path, atomic_write_text

from ..bags import io as bagio
from ..bags.ground_truth import GroundTruthError, load_ground_truth, parse_spec
from .labels import LabelRow, write_labels

__all__ = ["ExtractError", "extract_dataset"]


class ExtractError(bagio.BagError):
    """The bag cannot be turned into a dataset as asked (the message says why)."""


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "bag"


def extract_dataset(
    bag: str | Path,
    out_dir: str | Path,
    image_topic: str,
    gt_source: str,
    scene_name: str,
    tolerance_s: float = 0.02,
    stride: int = 1,
    test_fraction: float | None = 0.2,
    split_time: float | None = None,
    sensor_offset=None,
    seq_prefix: str | None = None,
    camera_info_topic: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Write the images of ``image_topic`` with ground-truth poses as a label-CSV dataset; returns a summary dict.

    ``split_time`` (seconds after the first matched image) overrides ``test_fraction``; ``test_fraction=0`` puts
    everything in train. Raw (``sensor_msgs/Image``, any encoding ``apr_localizer.imaging`` decodes) and compressed
    (``CompressedImage``) topics are detected from the topic type. Raises :class:`ExtractError` with a one-sentence
    reason (missing topic, wrong type, no image matched within the tolerance, ...).
    """
    bag = Path(bag)
    out = Path(out_dir)
    src = parse_spec(gt_source)
    _check_options(stride, tolerance_s, test_fraction, split_time, scene_name)
    types = _image_topic_types(bag, image_topic)
    train_csv, test_csv = out / f"{scene_name}_train.csv", out / f"{scene_name}_test.csv"
    if not overwrite and (train_csv.exists() or test_csv.exists()):
        raise FileExistsError(
            f"{out} already holds label CSVs for scene {scene_name!r}; pass overwrite=True (--overwrite)"
        )

    # pass 1: image stamps (header stamp, bag time when zero), without decoding
    img_stamps = np.asarray([im.stamp_ns for im in bagio.iter_images(bag, image_topic, decode=False)], np.int64)
    if len(img_stamps) == 0:
        raise ExtractError(f"image topic {image_topic} in bag {bag} has no messages")
    try:
        truth = load_ground_truth(bag, src, tolerance_s, sensor_offset)
        gt, ok, resid_ms = truth.match(img_stamps)
    except GroundTruthError as exc:
        raise ExtractError(str(exc)) from None
    gt_stamps = truth.sample_stamps()
    gt_desc = src.describe()
    matched = np.nonzero(ok)[0]
    if len(matched) == 0:
        gt_range = (
            f"{gt_stamps[0] / 1e9:.3f}..{gt_stamps[-1] / 1e9:.3f} s" if len(gt_stamps) else "static transforms only"
        )
        raise ExtractError(
            f"no image on {image_topic} in bag {bag} has ground truth from {gt_desc} within {tolerance_s} s "
            f"(image stamps {img_stamps.min() / 1e9:.3f}..{img_stamps.max() / 1e9:.3f} s, ground truth {gt_range})"
        )
    plan = _split_plan(matched[::stride], img_stamps, split_time, test_fraction)
    prefix = _sanitize(seq_prefix if seq_prefix is not None else bag.stem if bag.is_file() else bag.name)
    seq_of = {"train": f"{prefix}-train", "test": f"{prefix}-test"}
    for split in ("train", "test"):
        (out / scene_name / seq_of[split]).mkdir(parents=True, exist_ok=True)

    rows, frames_rows, shape = _write_images(
        bag, image_topic, plan, out, scene_name, seq_of, (gt, img_stamps, resid_ms), progress
    )
    for split, path in (("train", train_csv), ("test", test_csv)):
        write_labels(path, rows[split])
    frames_csv = io.StringIO()
    w = csv.writer(frames_csv, lineterminator="\n")
    w.writerow(["img_path", "split", "stamp_ns", "bag_time_ns", "gt_residual_ms"])
    w.writerows(frames_rows)
    atomic_write_text(out / f"{scene_name}_frames.csv", frames_csv.getvalue())

    intrinsics = _camera_info(bag, types, image_topic, camera_info_topic)
    if intrinsics is not None:
        atomic_write_text(out / "intrinsics.json", json.dumps(intrinsics, indent=2) + "\n")
    summary = {
        "bag": str(bag),
        "image_topic": image_topic,
        "image_type": types[image_topic],
        "gt_source": gt_source,
        "scene": scene_name,
        "tolerance_s": tolerance_s,
        "stride": stride,
        "images": int(len(img_stamps)),
        "matched": int(len(matched)),
        "unmatched": int(len(img_stamps) - len(matched)),
        "written": {"train": len(rows["train"]), "test": len(rows["test"])},
        "split": {"split_time": split_time} if split_time is not None else {"test_fraction": test_fraction},
        "seqs": seq_of,
        "image_size": None if shape is None else [int(shape[1]), int(shape[0])],
        "label_csv": {"train": str(train_csv), "test": str(test_csv)},
        "intrinsics": intrinsics,
        "max_gt_residual_ms": float(resid_ms[matched].max()),
    }
    atomic_write_text(out / f"{scene_name}_extract.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _write_images(
    bag: Path,
    image_topic: str,
    plan: dict[int, tuple[str, int]],
    out: Path,
    scene_name: str,
    seq_of: dict[str, str],
    matches: tuple[np.ndarray, np.ndarray, np.ndarray],
    progress: bool,
) -> tuple[dict[str, list[LabelRow]], list[list[str]], tuple[int, ...] | None]:
    """Write the planned images as PNG; return the label rows per split, the frames.csv rows and the image shape."""
    gt, img_stamps, resid_ms = matches
    rows: dict[str, list[LabelRow]] = {"train": [], "test": []}
    frames_rows: list[list[str]] = []
    bar = _bar(len(plan), progress)
    shape = None
    for idx, m in enumerate(bagio.iter_messages(bag, [image_topic])):
        if idx not in plan:
            continue
        split, k = plan[idx]
        rgb = bagio.image_to_rgb(m.msg, m.msgtype)
        shape = rgb.shape
        rel = f"{scene_name}/{seq_of[split]}/frame-{k:06d}.color.png"
        with atomic_path(out / rel, fsync=False) as tmp:
            Image.fromarray(np.ascontiguousarray(rgb)).save(tmp, format="PNG", compress_level=1)
        p = gt[idx]
        rows[split].append(LabelRow(scene_name, split, seq_of[split], rel, tuple(float(v) for v in p)))
        frames_rows.append([rel, split, str(int(img_stamps[idx])), str(int(m.t_ns)), f"{resid_ms[idx]:.3f}"])
        bar.update(1)
    bar.close()
    return rows, frames_rows, shape


def _check_options(
    stride: int, tolerance_s: float, test_fraction: float | None, split_time: float | None, scene_name: str
) -> None:
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if tolerance_s < 0:
        raise ValueError(f"tolerance_s must be >= 0, got {tolerance_s}")
    if split_time is None and test_fraction is not None and not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", scene_name):
        raise ValueError(f"scene_name {scene_name!r} must be a plain name (letters, digits, '_', '-', '.')")


def _image_topic_types(bag: Path, image_topic: str) -> dict[str, str]:
    """Return the bag's ``{topic: msgtype}`` after checking that ``image_topic`` is an image topic."""
    types = bagio.topic_types(bag)
    if image_topic not in types:
        hint = ""
        if f"{image_topic}/compressed" in types:
            hint = f" (did you mean {image_topic}/compressed?)"
        raise ExtractError(f"bag {bag} has no topic {image_topic}{hint}; topics are: {', '.join(sorted(types))}")
    if types[image_topic] not in bagio.IMAGE_MSGTYPES:
        raise ExtractError(
            f"image topic {image_topic} in bag {bag} has type {types[image_topic]}; expected "
            f"{' or '.join(bagio.IMAGE_MSGTYPES)}"
        )
    return types


def _split_plan(
    selected: np.ndarray, img_stamps: np.ndarray, split_time: float | None, test_fraction: float | None
) -> dict[int, tuple[str, int]]:
    """Message index → (split, frame number): the first part of the selected images (by time) is train."""
    t_sel = img_stamps[selected]
    order = np.argsort(t_sel, kind="stable")
    selected, t_sel = selected[order], t_sel[order]
    if split_time is not None:
        is_test = (t_sel - t_sel[0]) >= int(round(split_time * 1e9))
    else:
        n_test = int(round(len(selected) * (test_fraction or 0.0)))
        is_test = np.zeros(len(selected), bool)
        if n_test:
            is_test[len(selected) - n_test :] = True
    plan: dict[int, tuple[str, int]] = {}
    counters = {"train": 0, "test": 0}
    for idx, test in zip(selected.tolist(), is_test.tolist()):
        split = "test" if test else "train"
        plan[idx] = (split, counters[split])
        counters[split] += 1
    return plan


def _camera_info(bag: Path, types: dict[str, str], image_topic: str, topic: str | None) -> dict | None:
    """Intrinsics from the first CameraInfo (``topic`` or ``camera_info`` next to the image topic), if any."""
    if topic is None:
        base = image_topic.rsplit("/", 1)[0]
        if image_topic.endswith("/compressed"):
            base = base.rsplit("/", 1)[0]
        topic = f"{base}/camera_info"
        if types.get(topic) != "sensor_msgs/msg/CameraInfo":
            return None
    elif types.get(topic) != "sensor_msgs/msg/CameraInfo":
        raise ExtractError(
            f"bag {bag} has no sensor_msgs/msg/CameraInfo topic {topic}; topics are: {', '.join(sorted(types))}"
        )
    for m in bagio.iter_messages(bag, [topic]):
        k = np.asarray(m.msg.k, dtype=np.float64)
        return {
            "model": "pinhole",
            "width": int(m.msg.width),
            "height": int(m.msg.height),
            "fx": float(k[0]),
            "fy": float(k[4]),
            "cx": float(k[2]),
            "cy": float(k[5]),
            "distortion_model": m.msg.distortion_model,
            "D": [float(v) for v in m.msg.d],
            "K": k.tolist(),
            "source_topic": topic,
        }
    return None


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="frame", desc="extracting", dynamic_ncols=True)
