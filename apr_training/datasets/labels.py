"""Label CSVs of absolute-pose datasets (7-Scenes, Cambridge Landmarks, synthetic, bag extracts).

Format (model_spec.md §4.1), one row per image, columns exactly::

    scene,split,seq,img_path,t1,t2,t3,q1,q2,q3,q4

``img_path`` is relative to the dataset root; ``t1..t3`` is the camera position in the map (metres) and ``q1..q4``
the camera orientation as a w-first quaternion (camera-to-map, the convention of :mod:`apr_localizer.geometry`).
Quaternions are kept exactly as written (Cambridge norms range up to 1.043) but must have ``w >= 0`` (checked on
read; :func:`write_labels` negates a quaternion with ``w < 0``); :meth:`LabelTable.unit_poses` gives the normalised
view.

Scene ids: by default the position of the scene among the **sorted** unique scene names of the file (the upstream
convention). Pass ``scene_names`` (the model's saved scene order) to map names to the model's ids instead; this
avoids the upstream trap where a single-scene test CSV maps every row to id 0.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from apr_localizer.fileio import atomic_write_text
from apr_localizer.geometry import ORIENTATIONS, quat_normalize, to_camera_to_world

__all__ = [
    "DATASET_METADATA",
    "LABEL_COLUMNS",
    "ORIENTATIONS",
    "LabelError",
    "LabelRow",
    "LabelTable",
    "label_orientation",
    "read_labels",
    "resolve_scene_ids",
    "split_by_sequence",
    "validate_images",
    "write_labels",
]

LABEL_COLUMNS: tuple[str, ...] = ("scene", "split", "seq", "img_path", "t1", "t2", "t3", "q1", "q2", "q3", "q4")
# The dataset description written by apr-data beside its CSVs; its "orientation" says what q1..q4 mean.
DATASET_METADATA = "dataset.json"
_MISSING_SHOWN = 5


class LabelError(ValueError):
    """A label or pairs CSV does not have the expected layout or content (the message names file and row)."""


class LabelRow(NamedTuple):
    """One label row; ``pose`` is ``[x, y, z, qw, qx, qy, qz]``."""

    scene: str
    split: str
    seq: str
    img_path: str
    pose: tuple[float, ...]


@dataclass
class LabelTable:
    """Column-wise label table.

    Attributes:
        scenes: scene names indexed by scene id (``scenes[scene_id[i]] == scene[i]``).
        scene, split, seq, img_path: per-row strings, length N.
        pose: ``(N, 7)`` float64 ``[x, y, z, qw, qx, qy, qz]`` exactly as in the file (quaternions not normalised).
        scene_id: ``(N,)`` int64.
        root: dataset root that ``img_path`` is relative to (``None`` if unknown).
        source: the CSV this table was read from (``None`` if built in memory); used in error messages.

    """

    scenes: list[str]
    scene: list[str]
    split: list[str]
    seq: list[str]
    img_path: list[str]
    pose: np.ndarray
    scene_id: np.ndarray
    root: Path | None = None
    source: Path | None = field(default=None, compare=False)
    orientation: str = "camera_to_world"

    def __post_init__(self) -> None:
        """Check that all columns have the same length and the arrays their documented shapes and dtypes."""
        n = len(self.img_path)
        self.pose = np.asarray(self.pose, dtype=np.float64).reshape(-1, 7)
        self.scene_id = np.asarray(self.scene_id, dtype=np.int64).reshape(-1)
        lengths = {len(self.scene), len(self.split), len(self.seq), n, len(self.pose), len(self.scene_id)}
        if len(lengths) != 1:
            raise ValueError(f"LabelTable columns have different lengths {sorted(lengths)}; expected one length N")
        if self.root is not None:
            self.root = Path(self.root)

    def __len__(self) -> int:
        """Return the number of rows."""
        return len(self.img_path)

    def camera_to_world_pose(self) -> np.ndarray:
        """``(N, 7)`` poses with the camera-to-world orientation whatever the file's convention.

        Upstream Cambridge Landmarks labels hold the world-to-camera rotation (VisualSFM) with the camera centre: the
        quaternion is conjugated; 7-Scenes, synthetic and bag labels are already camera-to-world.
        """
        return to_camera_to_world(self.pose, self.orientation)

    @classmethod
    def from_rows(
        cls,
        rows: Iterable[LabelRow | Sequence | Mapping],
        scene_names: Sequence[str] | None = None,
        root: str | Path | None = None,
    ) -> LabelTable:
        """Build a table from :class:`LabelRow` objects, ``(scene, split, seq, img_path, pose)`` tuples or dicts.

        Dicts use the CSV column names (``t1..q4``) or a ``pose`` entry. Scene ids follow :func:`resolve_scene_ids`.
        """
        cols: dict[str, list] = {"scene": [], "split": [], "seq": [], "img_path": [], "pose": []}
        for r in rows:
            r = _as_label_row(r)
            for name in cols:
                cols[name].append(getattr(r, name))
        scenes, ids = resolve_scene_ids(cols["scene"], scene_names)
        pose = np.asarray(cols["pose"], dtype=np.float64).reshape(-1, 7)
        return cls(scenes, cols["scene"], cols["split"], cols["seq"], cols["img_path"], pose, ids, root=root)

    def rows(self) -> Iterator[LabelRow]:
        """Iterate over the rows as :class:`LabelRow`."""
        for i in range(len(self)):
            yield LabelRow(self.scene[i], self.split[i], self.seq[i], self.img_path[i], tuple(self.pose[i].tolist()))

    def unit_poses(self) -> np.ndarray:
        """``(N, 7)`` poses with unit quaternions (sign kept as in the file)."""
        out = self.pose.copy()
        if len(out):
            out[:, 3:] = quat_normalize(out[:, 3:], canonical=False)
        return out

    def take(self, indices: Sequence[int] | np.ndarray) -> LabelTable:
        """Return a new table with the rows at ``indices`` (same ``scenes`` list, so scene ids are unchanged)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"row index out of range for a label table of {len(self)} rows")
        pick = idx.tolist()
        return LabelTable(
            list(self.scenes),
            [self.scene[i] for i in pick],
            [self.split[i] for i in pick],
            [self.seq[i] for i in pick],
            [self.img_path[i] for i in pick],
            self.pose[idx].copy(),
            self.scene_id[idx].copy(),
            root=self.root,
            source=self.source,
            orientation=self.orientation,
        )

    def where(self, split: str | None = None, scene: str | None = None) -> LabelTable:
        """Rows of one split and/or one scene (scene ids unchanged)."""
        keep = [
            i
            for i in range(len(self))
            if (split is None or self.split[i] == split) and (scene is None or self.scene[i] == scene)
        ]
        return self.take(keep)

    def scene_indices(self) -> dict[int, np.ndarray]:
        """Row indices of every scene id that has rows, ``{scene_id: (n_s,) int64}`` in ascending id order."""
        return {int(s): np.flatnonzero(self.scene_id == s) for s in np.unique(self.scene_id)}

    def image_path(self, i: int, root: str | Path | None = None) -> Path:
        """Absolute path of the image of row ``i`` under ``root`` (default: :attr:`root`)."""
        return _resolve_root(self, root) / self.img_path[i]


def split_by_sequence(
    table: LabelTable, val_sequences: Sequence[str] | None = None, val_fraction: float = 0.0, seed: int = 0
) -> tuple[LabelTable, LabelTable]:
    """Hold out whole sequences for validation: ``(train, val)`` with the same scene ids.

    No frame of a held-out sequence trains, so the validation error is that of an unseen walk, not of a neighbour.

    ``val_sequences`` names ``seq`` values (``seq-03``: in every scene) or ``scene/seq`` pairs; otherwise
    ``val_fraction`` of each scene's sequences (rounded, at least one when the scene has two or more, never all) are
    drawn with ``seed``. A scene with a single sequence keeps it for training. Raises :class:`LabelError` when a
    named sequence does not exist or nothing would be held out.
    """
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (scene, seq) in enumerate(zip(table.scene, table.seq)):
        groups.setdefault((scene, seq), []).append(i)
    held: set[tuple[str, str]] = set()
    if val_sequences:
        for name in val_sequences:
            match = {g for g in groups if name in (g[1], f"{g[0]}/{g[1]}")}
            if not match:
                raise LabelError(
                    f"data.val_sequences: {name!r} is not a seq (or scene/seq) of {table.source or 'the labels'}"
                )
            held |= match
    elif val_fraction > 0:
        rng = np.random.default_rng(seed)
        for scene in sorted(set(table.scene)):
            seqs = sorted(g[1] for g in groups if g[0] == scene)
            if len(seqs) < 2:
                continue
            k = min(len(seqs) - 1, max(1, int(round(val_fraction * len(seqs)))))
            held |= {(scene, seqs[j]) for j in sorted(rng.choice(len(seqs), size=k, replace=False).tolist())}
    if not held:
        raise LabelError(
            f"{table.source or 'the labels'}: no sequence to hold out for validation (every scene has one sequence); "
            "record several sequences per scene or pass --val-labels"
        )
    val_idx = sorted(i for g in held for i in groups[g])
    train_idx = sorted(set(range(len(table))) - set(val_idx))
    if not train_idx:
        raise LabelError(
            f"data.val_sequences holds out every sequence of {table.source or 'the labels'}; keep some for training"
        )
    return table.take(train_idx), table.take(val_idx)


def resolve_scene_ids(
    scene_per_row: Sequence[str],
    scene_names: Sequence[str] | None = None,
    source: str | Path | None = None,
) -> tuple[list[str], np.ndarray]:
    """Scene list and ``(N,)`` int64 ids for per-row scene names.

    Without ``scene_names`` the list is the sorted unique names (the upstream convention); with it, the ids are
    positions in ``scene_names`` and a name outside it raises :class:`LabelError` naming the row.
    """
    if scene_names is None:
        scenes = sorted(set(scene_per_row))
    else:
        scenes = [str(s) for s in scene_names]
        if len(set(scenes)) != len(scenes):
            raise LabelError(f"scene_names {scenes} contains a duplicate name; expected unique scene names")
    lookup = {s: i for i, s in enumerate(scenes)}
    ids = np.empty(len(scene_per_row), dtype=np.int64)
    where = f" of {Path(source).name}" if source is not None else ""
    for i, name in enumerate(scene_per_row):
        sid = lookup.get(name)
        if sid is None:
            raise LabelError(
                f"row {i + 1}{where}: scene {name!r} is not one of the model's scenes {scenes}; "
                "train with this scene or pass the matching scene_names"
            )
        ids[i] = sid
    return scenes, ids


def read_labels(
    csv_path: str | Path,
    dataset_root: str | Path | None = None,
    scene_names: Sequence[str] | None = None,
) -> LabelTable:
    """Read a label CSV (7-Scenes/Cambridge as shipped, synthetic, bag extracts).

    Args:
        csv_path: the CSV file; its header must be exactly :data:`LABEL_COLUMNS`.
        dataset_root: directory the ``img_path`` column is relative to (default: the CSV's directory).
        scene_names: the model's scene order; default: sorted unique scene names of the file.

    Raises:
        LabelError: wrong header, wrong column count, empty text field, non-numeric or non-finite value, zero
            quaternion, a negative ``q1`` (w), or a scene outside ``scene_names``; the message names the file and
            the row (data rows count from 1; the file line is given too).
        FileNotFoundError: the CSV does not exist.

    """
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"label CSV {path} does not exist")
    cols: dict[str, list[str]] = {"scene": [], "split": [], "seq": [], "img_path": []}
    poses: list[list[float]] = []
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise LabelError(f"label CSV {path} is empty; expected the header {','.join(LABEL_COLUMNS)}")
        if tuple(h.strip() for h in header) != LABEL_COLUMNS:
            raise LabelError(
                f"label CSV {path} has the header {','.join(header)}; expected exactly {','.join(LABEL_COLUMNS)}"
            )
        row_no = 0
        for fields in reader:
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # blank line
            row_no += 1
            where = f"row {row_no} of {path} (line {reader.line_num})"
            if len(fields) != len(LABEL_COLUMNS):
                raise LabelError(f"{where} has {len(fields)} columns; expected {len(LABEL_COLUMNS)}")
            for name, value in zip(("scene", "split", "seq", "img_path"), fields[:4]):
                value = value.strip()
                if name in ("scene", "img_path") and not value:
                    raise LabelError(f"{where}: column {name!r} is empty")
                cols[name].append(value)
            pose = parse_pose_fields(fields[4:], LABEL_COLUMNS[4:], where)
            if pose[3] < 0:
                raise LabelError(
                    f"{where}: q1 (w) is {fields[7].strip()}; expected w >= 0 (q and -q are the same rotation: "
                    "negate q1..q4, or rewrite the file with write_labels)"
                )
            poses.append(pose)
    scenes, ids = resolve_scene_ids(cols["scene"], scene_names, source=path)
    root = Path(dataset_root) if dataset_root is not None else path.parent
    pose = np.asarray(poses, dtype=np.float64).reshape(-1, 7)
    orientation = label_orientation(path, dataset_root)
    return LabelTable(
        scenes, cols["scene"], cols["split"], cols["seq"], cols["img_path"], pose, ids, root, path, orientation
    )


def label_orientation(csv_path: str | Path, dataset_root: str | Path | None = None) -> str:
    """Return what a label CSV's quaternions mean: ``orientation`` in the ``dataset.json`` beside it (or the root).

    ``camera_to_world`` when there is no such file (7-Scenes, synthetic and bag extracts are camera-to-world);
    ``world_to_camera`` for the upstream-compatible Cambridge Landmarks CSVs of ``apr-data prepare``.
    """
    import json

    path = Path(csv_path)
    for directory in (path.parent, Path(dataset_root) if dataset_root is not None else None):
        meta = directory / DATASET_METADATA if directory is not None else None
        if meta is None or not meta.is_file():
            continue
        try:
            doc = json.loads(meta.read_text(encoding="utf-8")[: 1 << 20])
        except (OSError, ValueError) as e:
            raise LabelError(f"{meta} (the description of {path.name}) is not readable JSON ({e})") from None
        value = doc.get("orientation", "camera_to_world") if isinstance(doc, dict) else None
        if value not in ORIENTATIONS:
            raise LabelError(f"{meta}: orientation must be one of {', '.join(ORIENTATIONS)}, got {value!r}")
        return str(value)
    return "camera_to_world"


def write_labels(path: str | Path, rows: LabelTable | Iterable[LabelRow | Sequence | Mapping]) -> Path:
    """Write a label CSV with the header :data:`LABEL_COLUMNS`.

    ``rows`` is a :class:`LabelTable` or an iterable accepted by :meth:`LabelTable.from_rows`. Floats are written
    with Python's shortest round-trip repr, so ``read_labels(write_labels(p, t))`` reproduces the poses exactly; a
    quaternion with ``w < 0`` is written negated (the same rotation), so every file has ``w >= 0``. The file is
    replaced atomically. Returns the path written.
    """
    path = Path(path)
    table = rows if isinstance(rows, LabelTable) else LabelTable.from_rows(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(LABEL_COLUMNS)
    for i in range(len(table)):
        pose = table.pose[i].copy()
        if pose[3] < 0:
            pose[3:] = -pose[3:]
        w.writerow([table.scene[i], table.split[i], table.seq[i], table.img_path[i]] + [repr(float(v)) for v in pose])
    atomic_write_text(path, buf.getvalue())
    return path


def validate_images(table: LabelTable, root: str | Path | None = None) -> list[Path]:
    """Check that every image of ``table`` exists under ``root`` (default: ``table.root``).

    Returns the resolved image paths (row order). Raises :class:`FileNotFoundError` that names the CSV, the root,
    how many images are missing and the first few of them.
    """
    base = _resolve_root(table, root)
    paths = [base / p for p in table.img_path]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(m) for m in missing[:_MISSING_SHOWN])
        more = f" and {len(missing) - _MISSING_SHOWN} more" if len(missing) > _MISSING_SHOWN else ""
        src = f" of {table.source}" if table.source is not None else ""
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} images{src} are missing under dataset root {base}: {shown}{more}"
        )
    return paths


# --------------------------------------------------------------------------------------------- helpers
def parse_pose_fields(values: Sequence[str], names: Sequence[str], where: str) -> list[float]:
    """Parse 7 pose strings (``t``, then w-first ``q``); raise :class:`LabelError` on bad or zero-quaternion input."""
    out: list[float] = []
    for name, text in zip(names, values):
        try:
            v = float(text)
        except ValueError:
            raise LabelError(f"{where}: column {name!r} is {text.strip()!r}; expected a number") from None
        if not math.isfinite(v):
            raise LabelError(f"{where}: column {name!r} is {text.strip()!r}; expected a finite number")
        out.append(v)
    if math.fsum(v * v for v in out[3:7]) < 1e-12:
        raise LabelError(f"{where}: the quaternion {names[3]}..{names[6]} is zero; expected a rotation")
    return out


def _as_label_row(r: LabelRow | Sequence | Mapping) -> LabelRow:
    if isinstance(r, LabelRow):
        return r
    if isinstance(r, Mapping):
        pose = r["pose"] if "pose" in r else [r[c] for c in LABEL_COLUMNS[4:]]
        return LabelRow(str(r["scene"]), str(r["split"]), str(r["seq"]), str(r["img_path"]), _pose7(pose))
    fields = list(r)
    if len(fields) == 5:
        return LabelRow(str(fields[0]), str(fields[1]), str(fields[2]), str(fields[3]), _pose7(fields[4]))
    if len(fields) == len(LABEL_COLUMNS):
        return LabelRow(str(fields[0]), str(fields[1]), str(fields[2]), str(fields[3]), _pose7(fields[4:]))
    raise ValueError(
        f"label row {fields!r} has {len(fields)} fields; expected (scene, split, seq, img_path, pose) or the "
        f"{len(LABEL_COLUMNS)} CSV columns"
    )


def _pose7(pose) -> tuple[float, ...]:
    p = np.asarray(pose, dtype=np.float64).reshape(-1)
    if p.shape != (7,):
        raise ValueError(f"pose {pose!r} has {p.size} values; expected 7 [x, y, z, qw, qx, qy, qz]")
    return tuple(p.tolist())


def _resolve_root(table: LabelTable, root: str | Path | None) -> Path:
    base = root if root is not None else table.root
    if base is None:
        raise ValueError("no dataset root: pass root=... or build the label table with read_labels(dataset_root=...)")
    return Path(base)
