"""Image-pair CSVs for iAPR training, the pair generator and the 30/50/70 % training subsets.

Pairs CSV (model_spec.md §7.4), columns exactly :data:`PAIR_COLUMNS`: image a, image b (path relative to the dataset
root, scene name, scene id, pose ``x1..x3, q1..q4`` w-first) and ``_ab`` = the relative pose a→b in the iAPR
convention of :func:`apr_localizer.geometry.relative_pose` (``t_ab = t_b - t_a`` in the world frame,
``R_ab = R_a^T R_b``).

Pair generation (:func:`generate_pairs`) replaces the upstream depth-overlap filter (which, because of a path bug,
never read a depth map; model_spec.md §10.12) by position-distance and rotation-angle thresholds, so no depth maps are
needed. Subsets (:func:`make_subset`) are sampled per scene **without** replacement (upstream sampled with
replacement, so its "30 %" file held duplicate rows and fewer distinct frames), and the subsets of one seed are
nested: the 30 % subset is contained in the 50 % one, which is contained in the 70 % one.
"""

from __future__ import annotations

import csv
import io
import math
import zlib
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from apr_localizer.fileio import atomic_write_text
from apr_localizer.geometry import (
    quat_conjugate,
    quat_from_rotvec,
    quat_multiply,
    quat_normalize,
    quat_to_rotvec,
    relative_pose,
    rotation_error_deg,
)

from .labels import LabelError, LabelTable, parse_pose_fields, read_labels, write_labels

__all__ = [
    "PAIR_COLUMNS",
    "PairTable",
    "apr_error_vectors",
    "error_matched_pairs",
    "generate_pairs",
    "make_pairs",
    "make_subset",
    "read_pairs",
    "subset_csv_path",
    "write_pairs",
    "write_subsets",
]

PAIR_COLUMNS: tuple[str, ...] = (
    "img_path_a", "scene_a", "scene_id_a", "x1_a", "x2_a", "x3_a", "q1_a", "q2_a", "q3_a", "q4_a",
    "img_path_b", "scene_b", "scene_id_b", "x1_b", "x2_b", "x3_b", "q1_b", "q2_b", "q3_b", "q4_b",
    "x1_ab", "x2_ab", "x3_ab", "q1_ab", "q2_ab", "q3_ab", "q4_ab",
)  # fmt: skip
_POSE_A = PAIR_COLUMNS[3:10]
_POSE_B = PAIR_COLUMNS[13:20]
_REL = PAIR_COLUMNS[20:27]


@dataclass
class PairTable:
    """Column-wise pairs table (N pairs).

    Attributes:
        img_path_a, scene_a, img_path_b, scene_b: per-pair strings.
        scene_id_a, scene_id_b: ``(N,)`` int64.
        pose_a, pose_b: ``(N, 7)`` float64 ``[x, y, z, qw, qx, qy, qz]`` as in the labels (not normalised).
        rel_ab: ``(N, 7)`` float64 relative pose a→b (iAPR convention).
        root: dataset root the image paths are relative to.
        source: the CSV this table was read from, if any.

    """

    img_path_a: list[str]
    scene_a: list[str]
    scene_id_a: np.ndarray
    pose_a: np.ndarray
    img_path_b: list[str]
    scene_b: list[str]
    scene_id_b: np.ndarray
    pose_b: np.ndarray
    rel_ab: np.ndarray
    root: Path | None = None
    source: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        """Coerce arrays to their documented dtypes/shapes and check that all columns have the same length."""
        for name in ("pose_a", "pose_b", "rel_ab"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float64).reshape(-1, 7))
        for name in ("scene_id_a", "scene_id_b"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.int64).reshape(-1))
        lengths = {
            len(self.img_path_a), len(self.scene_a), len(self.scene_id_a), len(self.pose_a),
            len(self.img_path_b), len(self.scene_b), len(self.scene_id_b), len(self.pose_b), len(self.rel_ab),
        }  # fmt: skip
        if len(lengths) != 1:
            raise ValueError(f"PairTable columns have different lengths {sorted(lengths)}; expected one length N")
        if self.root is not None:
            self.root = Path(self.root)

    def __len__(self) -> int:
        """Return the number of pairs."""
        return len(self.img_path_a)

    def scene_names_by_id(self) -> dict[int, str]:
        """``{scene_id: scene name}`` over both sides of all pairs."""
        out: dict[int, str] = {}
        for ids, names in ((self.scene_id_a, self.scene_a), (self.scene_id_b, self.scene_b)):
            for sid, name in zip(ids.tolist(), names):
                out.setdefault(int(sid), name)
        return dict(sorted(out.items()))

    def relative_errors(self) -> tuple[np.ndarray, np.ndarray]:
        """Disagreement of the stored ``rel_ab`` with ``relative_pose(pose_a, pose_b)``: (metres, degrees), ``(N,)``."""
        if not len(self):
            return np.zeros(0), np.zeros(0)
        expect = relative_pose(self.pose_a, self.pose_b)
        return (
            np.linalg.norm(expect[:, :3] - self.rel_ab[:, :3], axis=1),
            rotation_error_deg(expect[:, 3:], self.rel_ab[:, 3:]),
        )

    def take(self, indices: Sequence[int] | np.ndarray) -> PairTable:
        """Return a new table with the pairs at ``indices``."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        pick = idx.tolist()
        return PairTable(
            [self.img_path_a[i] for i in pick], [self.scene_a[i] for i in pick], self.scene_id_a[idx].copy(),
            self.pose_a[idx].copy(), [self.img_path_b[i] for i in pick], [self.scene_b[i] for i in pick],
            self.scene_id_b[idx].copy(), self.pose_b[idx].copy(), self.rel_ab[idx].copy(), self.root, self.source,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------- read / write
def read_pairs(
    csv_path: str | Path,
    dataset_root: str | Path | None = None,
    scene_names: Sequence[str] | None = None,
    check_relative: bool = True,
    atol_m: float = 1e-3,
    atol_deg: float = 0.05,
) -> PairTable:
    """Read a pairs CSV whose header is exactly :data:`PAIR_COLUMNS`.

    Args:
        csv_path: the CSV file.
        dataset_root: directory the image paths are relative to (default: the CSV's directory).
        scene_names: the model's scene order; when given, both scene-id columns are recomputed from the scene
            names (an unknown name raises :class:`LabelError`), otherwise the file's ids are kept.
        check_relative: verify that every ``_ab`` pose equals ``relative_pose(a, b)`` within ``atol_m`` metres
            and ``atol_deg`` degrees, so a file written in another convention (e.g. copied NN-Net pairs) is
            rejected instead of silently training the wrong target.
        atol_m: position tolerance of that check.
        atol_deg: rotation tolerance of that check.

    Raises:
        LabelError: wrong header or column count, empty path or scene, non-numeric/non-finite value, non-integer
            scene id, zero quaternion, unknown scene, or an inconsistent relative pose; the message names the file
            and the row.

    """
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs CSV {path} does not exist")
    text: dict[str, list[str]] = {"img_path_a": [], "scene_a": [], "img_path_b": [], "scene_b": []}
    ids: dict[str, list[int]] = {"scene_id_a": [], "scene_id_b": []}
    nums: dict[str, list[list[float]]] = {"pose_a": [], "pose_b": [], "rel_ab": []}
    col = {name: i for i, name in enumerate(PAIR_COLUMNS)}
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise LabelError(f"pairs CSV {path} is empty; expected the header {','.join(PAIR_COLUMNS)}")
        if tuple(h.strip() for h in header) != PAIR_COLUMNS:
            raise LabelError(
                f"pairs CSV {path} has the header {','.join(header)}; expected exactly {','.join(PAIR_COLUMNS)}"
            )
        row_no = 0
        for fields in reader:
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            row_no += 1
            where = f"row {row_no} of {path} (line {reader.line_num})"
            if len(fields) != len(PAIR_COLUMNS):
                raise LabelError(f"{where} has {len(fields)} columns; expected {len(PAIR_COLUMNS)}")
            for name in text:
                value = fields[col[name]].strip()
                if not value:
                    raise LabelError(f"{where}: column {name!r} is empty")
                text[name].append(value)
            for name in ids:
                value = fields[col[name]].strip()
                try:
                    ids[name].append(int(value))
                except ValueError:
                    raise LabelError(f"{where}: column {name!r} is {value!r}; expected an integer") from None
            for key, names in (("pose_a", _POSE_A), ("pose_b", _POSE_B), ("rel_ab", _REL)):
                nums[key].append(parse_pose_fields([fields[col[n]] for n in names], names, where))
    table = PairTable(
        text["img_path_a"], text["scene_a"], np.asarray(ids["scene_id_a"], dtype=np.int64),
        np.asarray(nums["pose_a"]).reshape(-1, 7), text["img_path_b"], text["scene_b"],
        np.asarray(ids["scene_id_b"], dtype=np.int64), np.asarray(nums["pose_b"]).reshape(-1, 7),
        np.asarray(nums["rel_ab"]).reshape(-1, 7),
        root=Path(dataset_root) if dataset_root is not None else path.parent, source=path,
    )  # fmt: skip
    if scene_names is not None:
        _remap_scene_ids(table, scene_names, path)
    if check_relative and len(table):
        err_m, err_deg = table.relative_errors()
        bad = np.flatnonzero((err_m > atol_m) | (err_deg > atol_deg))
        if len(bad):
            i = int(bad[0])
            raise LabelError(
                f"row {i + 1} of {path}: the relative pose x1_ab..q4_ab differs from relative_pose(a, b) by "
                f"{err_m[i]:.4g} m / {err_deg[i]:.4g} deg ({len(bad)} rows disagree); expected t_ab = t_b - t_a and "
                "R_ab = R_a^T R_b (regenerate the pairs or pass check_relative=False)"
            )
    return table


def write_pairs(path: str | Path, pairs: PairTable) -> Path:
    """Write a pairs CSV (header :data:`PAIR_COLUMNS`, floats in shortest round-trip repr); return the path."""
    path = Path(path)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(PAIR_COLUMNS)
    for i in range(len(pairs)):
        w.writerow(
            [pairs.img_path_a[i], pairs.scene_a[i], int(pairs.scene_id_a[i])]
            + [repr(float(v)) for v in pairs.pose_a[i]]
            + [pairs.img_path_b[i], pairs.scene_b[i], int(pairs.scene_id_b[i])]
            + [repr(float(v)) for v in pairs.pose_b[i]]
            + [repr(float(v)) for v in pairs.rel_ab[i]]
        )
    atomic_write_text(path, buf.getvalue())
    return path


def make_pairs(
    labels: LabelTable, index_a: Sequence[int] | np.ndarray, index_b: Sequence[int] | np.ndarray
) -> PairTable:
    """Pairs (``labels[index_a[k]]``, ``labels[index_b[k]]``) with ``rel_ab = relative_pose(pose_a, pose_b)``."""
    a = np.asarray(index_a, dtype=np.int64).reshape(-1)
    b = np.asarray(index_b, dtype=np.int64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"index_a has {a.size} entries and index_b {b.size}; expected the same number")
    pose_a, pose_b = labels.pose[a], labels.pose[b]
    rel = relative_pose(pose_a, pose_b) if len(a) else np.zeros((0, 7))
    return PairTable(
        [labels.img_path[i] for i in a.tolist()], [labels.scene[i] for i in a.tolist()], labels.scene_id[a].copy(),
        pose_a.copy(), [labels.img_path[i] for i in b.tolist()], [labels.scene[i] for i in b.tolist()],
        labels.scene_id[b].copy(), pose_b.copy(), rel, root=labels.root,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------- generation
def generate_pairs(
    labels: LabelTable,
    max_distance_m: float,
    max_angle_deg: float,
    min_distance_m: float = 0.0,
    pairs_per_frame: int = 5,
    seed: int = 0,
    subset: LabelTable | Collection[str] | None = None,
    split: str | None = "train",
    both_directions: bool = False,
    min_angle_deg: float = 0.0,
    chunk_size: int = 512,
) -> PairTable:
    """Within-scene training pairs chosen by camera distance and relative rotation angle.

    For every frame, up to ``pairs_per_frame`` partners are drawn uniformly without replacement among the frames
    of the same scene (and the same ``split``) with ``min_distance_m <= |t_a - t_b| <= max_distance_m`` and
    ``min_angle_deg <= angle(R_a, R_b) <= max_angle_deg`` (the angle of
    :func:`apr_localizer.geometry.rotation_error_deg`). A pair chosen from both of its frames is kept once:
    (a, b) and (b, a) count as the same pair. Each kept pair gets a random orientation, or, with
    ``both_directions``, is written in both orientations. Deterministic for a given ``seed``; each scene uses its
    own random stream (derived from the seed and the scene name), so adding a scene does not change the pairs of
    the others. Cost: one chunked ``(chunk_size, n_scene)`` distance/angle matrix pass per scene in numpy.

    Args:
        labels: the label table (usually the training CSV).
        max_distance_m: largest camera-centre distance of a pair, metres.
        max_angle_deg: largest relative rotation angle of a pair, degrees.
        min_distance_m: smallest camera-centre distance (use > 0 to skip near-duplicate frames).
        pairs_per_frame: partners drawn per frame (before de-duplication).
        seed: random seed.
        subset: restrict both images of a pair to these frames (a label table, e.g. from :func:`make_subset`, or
            a collection of ``img_path`` strings).
        split: only rows of this split take part (``None``: all rows).
        both_directions: write every pair as (a, b) and (b, a).
        min_angle_deg: smallest relative rotation angle.
        chunk_size: rows per distance-matrix chunk (memory ~ 40 bytes x chunk_size x largest scene).

    Returns:
        A :class:`PairTable` sorted by scene id, with ``rel_ab = relative_pose(pose_a, pose_b)``.

    """
    if not max_distance_m > 0 or not math.isfinite(max_distance_m):
        raise ValueError(f"max_distance_m is {max_distance_m}; expected a positive number of metres")
    if not 0 <= min_distance_m <= max_distance_m:
        raise ValueError(f"min_distance_m is {min_distance_m}; expected 0 <= min_distance_m <= max_distance_m")
    if not 0 < max_angle_deg <= 180:
        raise ValueError(f"max_angle_deg is {max_angle_deg}; expected a value in (0, 180]")
    if not 0 <= min_angle_deg <= max_angle_deg:
        raise ValueError(f"min_angle_deg is {min_angle_deg}; expected 0 <= min_angle_deg <= max_angle_deg")
    if pairs_per_frame < 1:
        raise ValueError(f"pairs_per_frame is {pairs_per_frame}; expected at least 1")
    if chunk_size < 1:
        raise ValueError(f"chunk_size is {chunk_size}; expected at least 1")

    keep = np.ones(len(labels), dtype=bool)
    if split is not None:
        keep &= np.array([s == split for s in labels.split], dtype=bool)
        if len(labels) and not keep.any():
            raise ValueError(
                f"no label rows have split {split!r} (splits present: {sorted(set(labels.split))}); "
                "pass split=None to use every row"
            )
    if subset is not None:
        wanted = set(subset.img_path) if isinstance(subset, LabelTable) else set(subset)
        keep &= np.array([p in wanted for p in labels.img_path], dtype=bool)

    unit_q = quat_normalize(labels.pose[:, 3:], canonical=False) if len(labels) else np.zeros((0, 4))
    cos_max = math.cos(math.radians(max_angle_deg) / 2.0)
    cos_min = math.cos(math.radians(min_angle_deg) / 2.0)
    all_a: list[np.ndarray] = []
    all_b: list[np.ndarray] = []
    for sid in np.unique(labels.scene_id[keep]).tolist():
        rows = np.flatnonzero(keep & (labels.scene_id == sid))
        scene_name = labels.scenes[sid]
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(scene_name.encode("utf-8"))])
        lo, hi = _scene_pairs(
            labels.pose[rows, :3], unit_q[rows], rng, min_distance_m, max_distance_m, cos_max, cos_min,
            min_angle_deg > 0, pairs_per_frame, chunk_size,
        )  # fmt: skip
        if both_directions:
            a = np.concatenate([lo, hi])
            b = np.concatenate([hi, lo])
            order = np.lexsort((b, a))
            a, b = a[order], b[order]
        else:
            flip = rng.random(len(lo)) < 0.5
            a, b = np.where(flip, hi, lo), np.where(flip, lo, hi)
        all_a.append(rows[a])
        all_b.append(rows[b])
    index_a = np.concatenate(all_a) if all_a else np.zeros(0, dtype=np.int64)
    index_b = np.concatenate(all_b) if all_b else np.zeros(0, dtype=np.int64)
    return make_pairs(labels, index_a, index_b)


def apr_error_vectors(est: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the error vectors of estimated poses ``(N, 7)``: ``(offsets, rotation vectors)``, each ``(N, 3)``.

    Offsets are ``est − gt`` (map frame, m); rotation vectors those of ``conj(q_gt) ⊗ q_est`` (camera frame, rad).
    Non-finite rows are dropped.
    """
    est, gt = np.asarray(est, np.float64).reshape(-1, 7), np.asarray(gt, np.float64).reshape(-1, 7)
    ok = np.isfinite(est).all(axis=1) & np.isfinite(gt).all(axis=1)
    est, gt = est[ok], gt[ok]
    q = quat_multiply(quat_conjugate(quat_normalize(gt[:, 3:])), quat_normalize(est[:, 3:]))
    return est[:, :3] - gt[:, :3], quat_to_rotvec(q)


def error_matched_pairs(
    labels: LabelTable,
    position_offsets_m: np.ndarray,
    rotation_vectors_rad: np.ndarray,
    pairs_per_frame: int = 5,
    scale: float = 1.5,
    seed: int = 0,
) -> PairTable:
    """Pairs for iAPR training whose neighbour poses miss like the APR does: GT perturbed by the APR's own errors.

    ``position_offsets_m`` / ``rotation_vectors_rad`` ``(K, 3)`` are measured APR errors (:func:`apr_error_vectors`,
    e.g. on the validation split). For every frame, ``pairs_per_frame`` neighbour poses are drawn: one measured
    error ``j`` (offset and rotation together, so their joint structure — mostly horizontal, mostly yaw for a robot —
    is kept), a factor ``u ~ U(0, scale)`` (errors up to ``scale`` times the APR's, down to none: the refined
    estimates of later iterations are closer) and a sign ``±1``; pose b = position ``+ ±u·offset_j`` and orientation
    ``q_a ⊗ exp(±u·rotvec_j)`` (the camera turns about itself). Both sides of a pair are the frame's own image (the
    query); ``rel_ab = relative_pose(pose_a, pose_b)``. Do not swap these pairs (image b is not taken at pose b).
    """
    off = np.asarray(position_offsets_m, np.float64).reshape(-1, 3)
    rv = np.asarray(rotation_vectors_rad, np.float64).reshape(-1, 3)
    ok = np.isfinite(off).all(axis=1) & np.isfinite(rv).all(axis=1)
    off, rv = off[ok], rv[ok]
    if len(off) == 0:
        raise ValueError("error_matched_pairs needs at least one finite measured APR error")
    rng = np.random.default_rng(seed)
    idx = np.repeat(np.arange(len(labels)), pairs_per_frame)
    n = len(idx)
    pick = rng.integers(0, len(off), n)
    f = rng.uniform(0.0, scale, n) * rng.choice([-1.0, 1.0], n)
    vec = f[:, None] * rv[pick]
    vec *= np.minimum(1.0, np.pi / np.maximum(np.linalg.norm(vec, axis=1), 1e-12))[:, None]  # at most half a turn
    dq = quat_from_rotvec(vec)
    pose_a = labels.unit_poses()[idx]
    pose_b = pose_a.copy()
    pose_b[:, :3] += f[:, None] * off[pick]
    pose_b[:, 3:] = quat_multiply(pose_a[:, 3:], dq)
    rel = relative_pose(pose_a, pose_b) if n else np.zeros((0, 7))
    paths = [labels.img_path[i] for i in idx.tolist()]
    scenes = [labels.scene[i] for i in idx.tolist()]
    ids = labels.scene_id[idx].copy()
    return PairTable(paths, scenes, ids, pose_a, list(paths), list(scenes), ids.copy(), pose_b, rel, root=labels.root)


def _scene_pairs(
    pos: np.ndarray,
    quat: np.ndarray,
    rng: np.random.Generator,
    min_d: float,
    max_d: float,
    cos_max: float,
    cos_min: float,
    use_min_angle: bool,
    k: int,
    chunk: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Unordered unique pairs ``(lo < hi)`` (local indices, sorted) of one scene."""
    n = len(pos)
    pairs: list[np.ndarray] = []
    min_d2, max_d2 = min_d * min_d, max_d * max_d
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        m = stop - start
        d2 = np.zeros((m, n))
        for c in range(3):
            diff = pos[start:stop, c, None] - pos[None, :, c]
            d2 += diff * diff
        ok = d2 <= max_d2
        if min_d > 0:
            ok &= d2 >= min_d2
        dot = np.abs(quat[start:stop] @ quat.T)
        ok &= dot >= cos_max
        if use_min_angle:
            ok &= dot <= cos_min
        ok[np.arange(m), np.arange(start, stop)] = False
        keys = rng.random((m, n))
        keys[~ok] = 2.0  # never chosen
        pick = np.argpartition(keys, k - 1, axis=1)[:, :k] if k < n else np.broadcast_to(np.arange(n), (m, n))
        src = np.broadcast_to(np.arange(start, stop)[:, None], pick.shape)
        valid = np.take_along_axis(keys, pick, axis=1) < 2.0
        a, b = src[valid], pick[valid]
        pairs.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1))
    if not pairs:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    uniq = np.unique(np.concatenate(pairs).astype(np.int64), axis=0)  # sorted by (lo, hi), duplicates removed
    return uniq[:, 0], uniq[:, 1]


# --------------------------------------------------------------------------------------------- subsets
def make_subset(labels: LabelTable, fraction: float, seed: int = 0) -> LabelTable:
    """Random per-scene subset holding ``round(fraction * n_scene)`` rows of every scene (at least one).

    Sampled **without** replacement (upstream sampled with replacement, which duplicates rows); rows keep their
    original order and scene ids. For one seed the subsets are nested (a smaller fraction is a subset of a larger
    one) because every scene uses one fixed permutation, derived from the seed and the scene name.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction is {fraction}; expected a value in (0, 1]")
    chosen: list[np.ndarray] = []
    for sid, rows in labels.scene_indices().items():
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(labels.scenes[sid].encode("utf-8"))])
        n_keep = max(1, round(fraction * len(rows)))
        chosen.append(rows[rng.permutation(len(rows))[:n_keep]])
    idx = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    return labels.take(idx)


def subset_csv_path(csv_path: str | Path, fraction: float, out_dir: str | Path | None = None) -> Path:
    """``<out_dir>/<csv name>_<fraction>_subset.csv`` (the upstream naming, e.g. ``x.csv_0.3_subset.csv``)."""
    p = Path(csv_path)
    return Path(out_dir if out_dir is not None else p.parent) / f"{p.name}_{fraction:g}_subset.csv"


def write_subsets(
    csv_path: str | Path,
    fractions: Iterable[float] = (0.3, 0.5, 0.7),
    seed: int = 0,
    out_dir: str | Path | None = None,
) -> dict[float, Path]:
    """Write the per-scene subsets of a label CSV as ``<csv>_{fraction}_subset.csv``; return ``{fraction: path}``."""
    labels = read_labels(csv_path)
    return {
        float(f): write_labels(subset_csv_path(csv_path, f, out_dir), make_subset(labels, f, seed)) for f in fractions
    }


# --------------------------------------------------------------------------------------------- helpers


def _remap_scene_ids(table: PairTable, scene_names: Sequence[str], path: Path) -> None:
    lookup = {str(s): i for i, s in enumerate(scene_names)}
    for side in ("a", "b"):
        names = getattr(table, f"scene_{side}")
        new = np.empty(len(names), dtype=np.int64)
        for i, name in enumerate(names):
            sid = lookup.get(name)
            if sid is None:
                raise LabelError(
                    f"row {i + 1} of {path}: scene_{side} {name!r} is not one of the model's scenes "
                    f"{list(lookup)}; expected a scene the model was trained on"
                )
            new[i] = sid
        setattr(table, f"scene_id_{side}", new)
