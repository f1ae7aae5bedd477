"""``apr-data prepare``: the official 7-Scenes and Cambridge Landmarks downloads → label CSVs, subsets, iAPR pairs.

Inputs (the official layouts, unzipped)::

    7-Scenes   RAW/<scene>/TrainSplit.txt, TestSplit.txt      lines "sequenceN"
               RAW/<scene>/seq-NN/frame-NNNNNN.color.png      RGB image
               RAW/<scene>/seq-NN/frame-NNNNNN.pose.txt       4x4 camera-to-world matrix (translation in metres)
    Cambridge  RAW/<Scene>/dataset_train.txt, dataset_test.txt
                 3 header lines, then "ImageFile X Y Z W P Q R" (image path relative to the scene folder)

Outputs in ``--out ROOT`` (label columns ``scene,split,seq,img_path,t1,t2,t3,q1,q2,q3,q4``, quaternions w-first with
``w >= 0``, named as upstream so that the original recipes find them)::

    7-Scenes   abs_7scenes_pose.csv_<scene>_{train,test}.csv, 7scenes_all_scenes.csv (train rows of every scene)
    Cambridge  abs_cambridge_pose_sorted.csv_<Scene>_{train,test}.csv, cambridge_all_scenes.csv (train rows),
               cambridge_four_scenes.csv / cambridge_five_scenes.csv when those scene sets are complete
    both       <all-scenes csv>_{0.3,0.5,0.7}_subset.csv, <all-scenes stem>[_<f>_subset]_pairs.csv (iAPR pairs),
               dataset.json (conventions, counts, files), and a link ROOT/<scene> → RAW/<scene> per scene so that
               ROOT is a dataset root (``--data ROOT``)

Pose conventions (recorded in ``dataset.json``):

* 7-Scenes ``pose.txt`` is camera-to-world: ``t`` is the camera centre, the quaternion that of the 3x3 block.
* Cambridge rows come from VisualSFM's NVM reconstruction: ``X Y Z`` is the camera centre ``C`` in the world and
  ``W P Q R`` the quaternion of the **world-to-camera** rotation ``R`` of ``P = K [R | -R C]``. The upstream CSVs copy
  them unchanged, and so do we by default (``orientation="upstream"``, so numbers match upstream training); the
  metadata says ``"orientation": "world_to_camera"``, and a consumer that needs camera-to-map orientations conjugates
  the quaternion. ``orientation="camera_to_world"`` writes the conjugate instead (not upstream-compatible).
  Quaternion norms are kept as in the files (up to 1.043); only the sign is flipped where ``W < 0``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apr_localizer.fileio import atomic_write_text
from apr_localizer.geometry import matrix_to_quat, quat_conjugate

from .labels import DATASET_METADATA, LabelRow, LabelTable, write_labels
from .pairs import generate_pairs, make_subset, subset_csv_path, write_pairs

__all__ = [
    "CAMBRIDGE_FIVE",
    "CAMBRIDGE_FOUR",
    "METADATA_FILE",
    "PrepareError",
    "PrepareOptions",
    "prepare",
    "read_7scenes_pose",
    "read_cambridge_split",
]

log = logging.getLogger("apr_training.datasets.prepare")

METADATA_FILE = DATASET_METADATA
CAMBRIDGE_FOUR = ("KingsCollege", "OldHospital", "ShopFacade", "StMarysChurch")
CAMBRIDGE_FIVE = ("GreatCourt", *CAMBRIDGE_FOUR)
_ROT_TOL = 1e-3  # |R^T R - I| and |det R - 1| tolerated in a pose.txt (the files hold 6-7 significant digits)


class PrepareError(ValueError):
    """A raw dataset file is missing or malformed (the message names the file and line)."""


@dataclass
class PrepareOptions:
    """Options of :func:`prepare`.

    Attributes:
        dataset: ``"7scenes"`` or ``"cambridge"``.
        raw: the unzipped official download (one folder per scene).
        out: where the CSVs, pairs and ``dataset.json`` go (may equal ``raw``).
        scenes: scene folders to convert (default: every scene folder found).
        fractions: training subsets to write (fractions of every scene's training frames).
        pairs: write iAPR training pairs for the all-scenes file and every subset.
        pair_max_distance_m, pair_max_angle_deg, pairs_per_frame: pair thresholds (default: 1 m / 30° for 7-Scenes,
            10 m / 30° for Cambridge).
        orientation: ``"upstream"`` (as the official files) or ``"camera_to_world"`` (Cambridge: conjugated).
        link_scenes: create ``out/<scene>`` links to the raw scene folders when ``out`` is not ``raw``.
        seed: seed of the subsets and pairs.
        progress: tqdm progress bars.

    """

    dataset: str
    raw: Path
    out: Path
    scenes: Sequence[str] | None = None
    fractions: Sequence[float] = (0.3, 0.5, 0.7)
    pairs: bool = True
    pair_max_distance_m: float | None = None
    pair_max_angle_deg: float = 30.0
    pairs_per_frame: int = 5
    orientation: str = "upstream"
    link_scenes: bool = True
    seed: int = 0
    progress: bool = True


# --------------------------------------------------------------------------------------------- 7-Scenes
def read_7scenes_pose(path: Path) -> np.ndarray:
    """Read a 7-Scenes ``frame-*.pose.txt`` (4x4 camera-to-world) → ``[x, y, z, qw, qx, qy, qz]`` with ``qw >= 0``."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows: list[list[float]] = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise PrepareError(f"{path} line {no}: {line.strip()!r} is not 4 numbers; expected a 4x4 matrix") from None
        if len(values) != 4 or not all(np.isfinite(values)):
            raise PrepareError(f"{path} line {no}: {line.strip()!r} is not 4 finite numbers; expected a 4x4 matrix")
        rows.append(values)
    if len(rows) != 4:
        raise PrepareError(f"{path}: {len(rows)} matrix rows; expected 4 lines of 4 numbers (camera-to-world)")
    m = np.asarray(rows, dtype=np.float64)
    rot = m[:3, :3]
    if np.abs(rot.T @ rot - np.eye(3)).max() > _ROT_TOL or abs(np.linalg.det(rot) - 1.0) > _ROT_TOL:
        raise PrepareError(f"{path}: the 3x3 block is not a rotation (|R^T R - I| > {_ROT_TOL}); expected a rigid pose")
    return np.concatenate([m[:3, 3], matrix_to_quat(rot)])


def _read_split(path: Path) -> list[str]:
    """``TrainSplit.txt``/``TestSplit.txt`` → sequence folder names (``sequence2`` → ``seq-02``)."""
    if not path.is_file():
        raise PrepareError(f"{path} does not exist; expected the 7-Scenes split file listing 'sequenceN' lines")
    seqs = []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        m = re.fullmatch(r"\s*sequence(\d+)\s*", line)
        if m is None:
            raise PrepareError(f"{path} line {no}: {line.strip()!r}; expected 'sequenceN'")
        seqs.append(f"seq-{int(m.group(1)):02d}")
    return seqs


def _7scenes_rows(raw: Path, scene: str, progress: bool) -> list[LabelRow]:
    from tqdm import tqdm

    rows: list[LabelRow] = []
    for split, name in (("train", "TrainSplit.txt"), ("test", "TestSplit.txt")):
        for seq in _read_split(raw / scene / name):
            folder = raw / scene / seq
            if not folder.is_dir():
                zipped = folder.with_suffix(".zip")
                hint = f" (unzip {zipped} first)" if zipped.is_file() else ""
                raise PrepareError(f"{folder} does not exist{hint}; {raw / scene / name} lists it")
            poses = sorted(folder.glob("frame-*.pose.txt"))
            if not poses:
                raise PrepareError(f"{folder} holds no frame-*.pose.txt files; expected the 7-Scenes frames")
            for pose_file in tqdm(poses, desc=f"{scene}/{seq}", disable=not progress, leave=False):
                image = pose_file.name.replace(".pose.txt", ".color.png")
                if not (folder / image).is_file():
                    raise PrepareError(f"{folder / image} does not exist but {pose_file.name} does")
                pose = read_7scenes_pose(pose_file)
                rows.append(LabelRow(scene, split, seq, f"{scene}/{seq}/{image}", tuple(pose.tolist())))
    return rows


# --------------------------------------------------------------------------------------------- Cambridge
def read_cambridge_split(path: Path, scene: str, orientation: str = "upstream") -> list[LabelRow]:
    """Rows of a Cambridge ``dataset_{train,test}.txt`` (3 header lines, then ``ImageFile X Y Z W P Q R``).

    The quaternion is VisualSFM's world-to-camera rotation; ``orientation="camera_to_world"`` conjugates it. The sign
    is made ``W >= 0``; the norm is kept.
    """
    split = "train" if "train" in path.name else "test"
    rows: list[LabelRow] = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for no, line in enumerate(lines, 1):
        if no <= 3 or not line.strip():
            continue
        fields = line.split()
        if len(fields) != 8:
            raise PrepareError(
                f"{path} line {no}: {len(fields)} fields in {line.strip()!r}; expected 'ImageFile X Y Z W P Q R'"
            )
        try:
            values = np.array([float(v) for v in fields[1:]], dtype=np.float64)
        except ValueError:
            raise PrepareError(f"{path} line {no}: {line.strip()!r} has a non-numeric pose value") from None
        if not np.isfinite(values).all() or np.linalg.norm(values[3:]) < 1e-6:
            raise PrepareError(f"{path} line {no}: {line.strip()!r}; expected finite values and a non-zero quaternion")
        q = values[3:]
        if orientation == "camera_to_world":
            q = quat_conjugate(q)
        if q[0] < 0:
            q = -q
        image = fields[0].lstrip("./")
        seq = image.split("/")[0] if "/" in image else ""
        rows.append(LabelRow(scene, split, seq, f"{scene}/{image}", (*values[:3].tolist(), *q.tolist())))
    return sorted(rows, key=lambda r: r.img_path)


def _cambridge_rows(raw: Path, scene: str, orientation: str) -> list[LabelRow]:
    rows: list[LabelRow] = []
    for name in ("dataset_train.txt", "dataset_test.txt"):
        path = raw / scene / name
        if not path.is_file():
            raise PrepareError(f"{path} does not exist; expected the Cambridge Landmarks split file of {scene}")
        rows += read_cambridge_split(path, scene, orientation)
    missing = [r.img_path for r in rows if not (raw / r.img_path).is_file()]
    if missing:
        raise PrepareError(f"{len(missing)} images listed for {scene} are missing under {raw}, e.g. {missing[0]}")
    return rows


# --------------------------------------------------------------------------------------------- driver
def _scenes(opts: PrepareOptions) -> list[str]:
    marker = "TrainSplit.txt" if opts.dataset == "7scenes" else "dataset_train.txt"
    found = sorted(p.parent.name for p in opts.raw.glob(f"*/{marker}"))
    if opts.scenes:
        unknown = [s for s in opts.scenes if s not in found]
        if unknown:
            raise PrepareError(f"scenes {unknown} have no {marker} under {opts.raw}; found {found}")
        return sorted(opts.scenes)
    if not found:
        raise PrepareError(
            f"{opts.raw} holds no <scene>/{marker}; expected the unzipped official {opts.dataset} download"
        )
    return found


def _write(path: Path, rows: list[LabelRow], written: list[Path]) -> LabelTable:
    table = LabelTable.from_rows(rows)
    written.append(write_labels(path, table))
    return table


def prepare(opts: PrepareOptions) -> dict:
    """Convert one dataset (see the module docstring); return the metadata also written to ``dataset.json``."""
    if opts.dataset not in ("7scenes", "cambridge"):
        raise PrepareError(f"dataset {opts.dataset!r} is not supported; expected '7scenes' or 'cambridge'")
    if opts.orientation not in ("upstream", "camera_to_world"):
        raise PrepareError(f"orientation {opts.orientation!r}; expected 'upstream' or 'camera_to_world'")
    raw, out = Path(opts.raw).resolve(), Path(opts.out).resolve()
    if not raw.is_dir():
        raise PrepareError(f"{raw} is not a directory; expected the unzipped official {opts.dataset} download")
    opts.raw = raw
    out.mkdir(parents=True, exist_ok=True)
    seven = opts.dataset == "7scenes"
    prefix = "abs_7scenes_pose.csv" if seven else "abs_cambridge_pose_sorted.csv"
    written: list[Path] = []
    train_rows: list[LabelRow] = []
    counts: dict[str, dict[str, int]] = {}
    for scene in _scenes(opts):
        rows = _7scenes_rows(raw, scene, opts.progress) if seven else _cambridge_rows(raw, scene, opts.orientation)
        for split in ("train", "test"):
            _write(out / f"{prefix}_{scene}_{split}.csv", [r for r in rows if r.split == split], written)
        train_rows += [r for r in rows if r.split == "train"]
        counts[scene] = {s: sum(r.split == s for r in rows) for s in ("train", "test")}
        _link_scene(raw, out, scene, opts.link_scenes)
    all_csv = out / ("7scenes_all_scenes.csv" if seven else "cambridge_all_scenes.csv")
    all_table = _write(all_csv, train_rows, written)
    if not seven:
        for name, group in (
            ("cambridge_four_scenes.csv", CAMBRIDGE_FOUR),
            ("cambridge_five_scenes.csv", CAMBRIDGE_FIVE),
        ):
            if set(group) <= set(counts):
                _write(out / name, [r for r in train_rows if r.scene in group], written)
    subsets = {f: make_subset(all_table, f, opts.seed) for f in opts.fractions}
    for f, table in subsets.items():
        written.append(write_labels(subset_csv_path(all_csv, f), table))
    if opts.pairs:
        written += _write_pairs(opts, all_csv, all_table, subsets)
    meta = _metadata(opts, out, counts, written)
    atomic_write_text(out / METADATA_FILE, json.dumps(meta, indent=2) + "\n")
    return meta


def _write_pairs(opts: PrepareOptions, all_csv: Path, table: LabelTable, subsets: dict) -> list[Path]:
    from tqdm import tqdm

    dist = opts.pair_max_distance_m or (1.0 if opts.dataset == "7scenes" else 10.0)
    out: list[Path] = []
    jobs = [(all_csv.parent / f"{all_csv.stem}_pairs.csv", None)] + [
        (all_csv.parent / f"{all_csv.stem}_{f:g}_subset_pairs.csv", sub) for f, sub in subsets.items()
    ]
    for path, sub in tqdm(jobs, desc="pairs", disable=not opts.progress, leave=False):
        pairs = generate_pairs(table, max_distance_m=dist, max_angle_deg=opts.pair_max_angle_deg,
                               pairs_per_frame=opts.pairs_per_frame, seed=opts.seed, subset=sub)  # fmt: skip
        out.append(write_pairs(path, pairs))
    return out


def _link_scene(raw: Path, out: Path, scene: str, enabled: bool) -> None:
    link = out / scene
    if not enabled or raw == out or link.exists() or link.is_symlink():
        return
    try:
        os.symlink(raw / scene, link, target_is_directory=True)
    except OSError as e:  # e.g. a file system without links: the CSVs still work with --data RAW
        log.warning("could not link %s -> %s (%s); pass --data %s when training", link, raw / scene, e, raw)


def _metadata(opts: PrepareOptions, out: Path, counts: dict, written: list[Path]) -> dict:
    if opts.dataset == "7scenes":
        orientation, note = "camera_to_world", "pose.txt 4x4 camera-to-world; t = camera centre"
    elif opts.orientation == "upstream":
        orientation = "world_to_camera"
        note = ("VisualSFM NVM: X Y Z = camera centre C, W P Q R = world-to-camera rotation R of P = K[R | -RC], "
                "copied as upstream; conjugate q for the camera-to-world orientation")  # fmt: skip
    else:
        orientation, note = "camera_to_world", "VisualSFM NVM quaternions conjugated to camera-to-world; t = C"
    return {
        "format": "apr_training.dataset",
        "version": 1,
        "dataset": opts.dataset,
        "source": str(opts.raw),
        "position": "camera_centre_in_world",
        "orientation": orientation,
        "quaternion_order": "wxyz",
        "quaternion_sign": "w >= 0",
        "convention_note": note,
        "scenes": counts,
        "files": sorted(str(p.relative_to(out)) for p in written),
        "seed": opts.seed,
    }
