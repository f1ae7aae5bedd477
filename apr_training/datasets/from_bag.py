"""Extract a label-CSV dataset from a ROS 2 bag: images matched to ground-truth poses by timestamp.

Ground truth sources (``gt_source``):

* ``pose:/topic`` — ``geometry_msgs/PoseStamped`` or ``PoseWithCovarianceStamped`` (or Odometry) on ``/topic``;
* ``odom:/topic`` — ``nav_msgs/Odometry`` on ``/topic``;
* ``tf:map->camera_frame`` — the TF chain ``map <- camera_frame`` from ``/tf`` and ``/tf_static``.

Each image (header stamp; the bag time when the stamp is zero) takes the nearest ground-truth sample within
``tolerance_s`` (pose/odom), or the TF chain interpolated at its stamp (every dynamic edge needs a sample within
``tolerance_s``). ``sensor_offset`` (the camera pose in the ground-truth child frame, e.g. base_link -> camera) is
composed on the right of pose/odom/TF poses. Matched images are thinned by ``stride`` and split by time: the first
part is ``train``, the rest ``test`` (``test_fraction`` of the frames, or everything from ``split_time``).

Output (7-Scenes-like, read by :mod:`apr_training.datasets.labels`)::

    <out>/<scene>/<seq>/frame-000000.color.png      seq = <prefix>-train / <prefix>-test
    <out>/<scene>_train.csv, <out>/<scene>_test.csv  scene,split,seq,img_path,t1,t2,t3,q1,q2,q3,q4
    <out>/<scene>_frames.csv                          per-frame stamps and matching residuals
    <out>/intrinsics.json (when the bag has a CameraInfo next to the image topic), <out>/<scene>_extract.json
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from apr_localizer.geometry import pose_compose

from ..bags import io as bagio

__all__ = ["ExtractError", "GroundTruthSource", "extract_dataset", "parse_gt_source"]

LABEL_COLUMNS = ("scene", "split", "seq", "img_path", "t1", "t2", "t3", "q1", "q2", "q3", "q4")
_POSE_TOPIC_TYPES = (
    "geometry_msgs/msg/PoseStamped",
    "geometry_msgs/msg/PoseWithCovarianceStamped",
    "nav_msgs/msg/Odometry",
)


class ExtractError(bagio.BagError):
    """The bag cannot be turned into a dataset as asked (the message says why)."""


@dataclass(frozen=True)
class GroundTruthSource:
    """Parsed ``gt_source``: ``kind`` is pose, odom or tf; ``topic`` for pose/odom; ``parent``/``child`` for tf."""

    kind: str
    topic: str = ""
    parent: str = ""
    child: str = ""


def parse_gt_source(spec: str) -> GroundTruthSource:
    """Parse ``pose:/topic``, ``odom:/topic`` or ``tf:parent->child``."""
    kind, sep, rest = spec.partition(":")
    rest = rest.strip()
    if sep and kind in ("pose", "odom") and rest:
        return GroundTruthSource(kind, topic=rest)
    if sep and kind == "tf":
        parent, arrow, child = rest.partition("->")
        if arrow and parent.strip() and child.strip():
            return GroundTruthSource("tf", parent=parent.strip(), child=child.strip())
    raise ValueError(
        f"gt_source {spec!r} is not understood; expected 'pose:/topic', 'odom:/topic' or 'tf:map->camera_frame'"
    )


def _stamp(msg, t_ns: int) -> int:
    s = bagio.header_stamp_ns(msg)
    return s if s else t_ns


def _load_gt_samples(bag: Path, src: GroundTruthSource, types: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    if src.topic not in types:
        raise ExtractError(f"bag {bag} has no topic {src.topic}; topics are: {', '.join(sorted(types))}")
    msgtype = types[src.topic]
    allowed = ("nav_msgs/msg/Odometry",) if src.kind == "odom" else _POSE_TOPIC_TYPES
    if msgtype not in allowed:
        raise ExtractError(
            f"ground-truth topic {src.topic} in bag {bag} has type {msgtype}; '{src.kind}:' expects "
            f"{' or '.join(allowed)}"
        )
    stamps, poses = [], []
    for m in bagio.iter_messages(bag, [src.topic]):
        stamps.append(_stamp(m.msg, m.t_ns))
        poses.append(bagio.pose_from_msg(m.msg, m.msgtype))
    if not stamps:
        raise ExtractError(f"ground-truth topic {src.topic} in bag {bag} has no messages")
    t = np.asarray(stamps, dtype=np.int64)
    p = np.asarray(poses, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    return t[order], p[order]


def _nearest_residual(stamps: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Distance (ns) from each stamp to the nearest reference stamp (0 when there are none, e.g. static TF)."""
    if len(ref) == 0:
        return np.zeros(len(stamps), np.int64)
    i = np.searchsorted(ref, stamps)
    lo = ref[np.clip(i - 1, 0, len(ref) - 1)]
    hi = ref[np.clip(i, 0, len(ref) - 1)]
    return np.minimum(np.abs(stamps - lo), np.abs(hi - stamps))


def _match_nearest(img_t: np.ndarray, gt_t: np.ndarray, gt_p: np.ndarray, tol_ns: int):
    i = np.searchsorted(gt_t, img_t)
    i0 = np.clip(i - 1, 0, len(gt_t) - 1)
    i1 = np.clip(i, 0, len(gt_t) - 1)
    pick = np.where(np.abs(gt_t[i1] - img_t) < np.abs(img_t - gt_t[i0]), i1, i0)
    resid = np.abs(gt_t[pick] - img_t)
    return gt_p[pick], resid <= tol_ns, resid


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
    src = parse_gt_source(gt_source)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if tolerance_s < 0:
        raise ValueError(f"tolerance_s must be >= 0, got {tolerance_s}")
    if split_time is None and test_fraction is not None and not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", scene_name):
        raise ValueError(f"scene_name {scene_name!r} must be a plain name (letters, digits, '_', '-', '.')")
    types = bagio.topic_types(bag)
    if image_topic not in types:
        hint = ""
        if f"{image_topic}/compressed" in types:
            hint = f" (did you mean {image_topic}/compressed?)"
        raise ExtractError(f"bag {bag} has no topic {image_topic}{hint}; topics are: {', '.join(sorted(types))}")
    if types[image_topic] not in bagio.IMAGE_TYPES:
        raise ExtractError(
            f"image topic {image_topic} in bag {bag} has type {types[image_topic]}; expected "
            f"{' or '.join(bagio.IMAGE_TYPES)}"
        )
    train_csv, test_csv = out / f"{scene_name}_train.csv", out / f"{scene_name}_test.csv"
    if not overwrite and (train_csv.exists() or test_csv.exists()):
        raise FileExistsError(
            f"{out} already holds label CSVs for scene {scene_name!r}; pass overwrite=True (--overwrite)"
        )

    # pass 1: image stamps
    img_stamps = np.asarray([_stamp(m.msg, m.t_ns) for m in bagio.iter_messages(bag, [image_topic])], np.int64)
    if len(img_stamps) == 0:
        raise ExtractError(f"image topic {image_topic} in bag {bag} has no messages")
    tol_ns = int(round(tolerance_s * 1e9))

    # ground truth at the image stamps
    if src.kind == "tf":
        tf_topics = [t for t in ("/tf", "/tf_static") if t in types]
        if not tf_topics:
            raise ExtractError(f"bag {bag} has no topic /tf or /tf_static; topics are: {', '.join(sorted(types))}")
        buf = bagio.read_tf(bag, tf_topics)
        try:
            gt, ok = buf.lookup(src.parent, src.child, img_stamps, tolerance_s)
        except LookupError as exc:
            raise ExtractError(f"bag {bag}: {exc}") from exc
        gt_stamps = buf.stamps(src.parent, src.child)
        resid = _nearest_residual(img_stamps, gt_stamps)
        gt_desc = f"TF {src.parent} <- {src.child}"
    else:
        gt_stamps, gt_poses = _load_gt_samples(bag, src, types)
        gt, ok, resid = _match_nearest(img_stamps, gt_stamps, gt_poses, tol_ns)
        gt_desc = f"{src.topic}"
    if sensor_offset is not None:
        gt = pose_compose(gt, np.asarray(sensor_offset, dtype=np.float64).reshape(1, 7))
    matched = np.nonzero(ok)[0]
    if len(matched) == 0:
        gt_range = (
            f"{gt_stamps[0] / 1e9:.3f}..{gt_stamps[-1] / 1e9:.3f} s" if len(gt_stamps) else "static transforms only"
        )
        raise ExtractError(
            f"no image on {image_topic} in bag {bag} has ground truth from {gt_desc} within {tolerance_s} s "
            f"(image stamps {img_stamps.min() / 1e9:.3f}..{img_stamps.max() / 1e9:.3f} s, ground truth {gt_range})"
        )
    selected = matched[::stride]
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

    prefix = _sanitize(seq_prefix if seq_prefix is not None else bag.stem if bag.is_file() else bag.name)
    seq_of = {"train": f"{prefix}-train", "test": f"{prefix}-test"}
    for split in ("train", "test"):
        (out / scene_name / seq_of[split]).mkdir(parents=True, exist_ok=True)
    # message index -> (split, frame number)
    plan: dict[int, tuple[str, int]] = {}
    counters = {"train": 0, "test": 0}
    for idx, test in zip(selected.tolist(), is_test.tolist()):
        split = "test" if test else "train"
        plan[idx] = (split, counters[split])
        counters[split] += 1

    rows: dict[str, list[list[str]]] = {"train": [], "test": []}
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
        Image.fromarray(np.ascontiguousarray(rgb)).save(out / rel, compress_level=1)
        p = gt[idx]
        rows[split].append([scene_name, split, seq_of[split], rel, *(repr(float(v)) for v in p)])
        frames_rows.append([rel, split, str(int(img_stamps[idx])), str(int(m.t_ns)), f"{resid[idx] / 1e6:.3f}"])
        bar.update(1)
    bar.close()

    for split, path in (("train", train_csv), ("test", test_csv)):
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(LABEL_COLUMNS)
            w.writerows(rows[split])
    with open(out / f"{scene_name}_frames.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["img_path", "split", "stamp_ns", "bag_time_ns", "gt_residual_ms"])
        w.writerows(frames_rows)

    intrinsics = _camera_info(bag, types, image_topic, camera_info_topic)
    if intrinsics is not None:
        (out / "intrinsics.json").write_text(json.dumps(intrinsics, indent=2) + "\n")
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
        "max_gt_residual_ms": float(resid[matched].max() / 1e6),
    }
    (out / f"{scene_name}_extract.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


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
