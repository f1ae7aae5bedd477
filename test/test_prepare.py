"""apr-data prepare: mock-ups of the official 7-Scenes and Cambridge layouts → label CSVs, subsets, pairs, metadata.

The expected rows are computed here independently of the module (rotation matrix → quaternion by Shepperd's method,
Cambridge rows parsed with plain string splits), and compared to 1e-9.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from apr_training.cli.data import main
from apr_training.datasets.prepare import PrepareError, PrepareOptions, prepare

SEVEN = {"chess": {"train": [1, 2], "test": [3]}, "heads": {"train": [1], "test": [2]}}
FRAMES = 3


def _rot(rng: np.random.Generator) -> np.ndarray:
    a, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return a * np.sign(np.linalg.det(a))


def _small_rot(rng: np.random.Generator, max_deg: float = 10.0) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    a = math.radians(rng.uniform(0, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k


def _quat_from_matrix(m: np.ndarray) -> np.ndarray:
    """Shepperd's method (independent of apr_localizer.geometry), w-first, w >= 0."""
    tr = np.trace(m)
    cands = [tr, m[0, 0], m[1, 1], m[2, 2]]
    k = int(np.argmax(cands))
    if k == 0:
        s = math.sqrt(1.0 + tr) * 2
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif k == 1:
        s = math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2]) * 2
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif k == 2:
        s = math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2]) * 2
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1]) * 2
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    q = np.asarray(q)
    return q if q[0] >= 0 else -q


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n")  # existence is all preparation checks


def make_7scenes(raw: Path, seed: int = 0) -> dict[str, list]:
    """Write the mock-up; return the expected rows ``{csv name: [(scene, split, seq, img_path, pose7)]}``."""
    rng = np.random.default_rng(seed)
    expected: dict[str, list] = {}
    for scene, splits in SEVEN.items():
        for split, seqs in splits.items():
            name = "TrainSplit.txt" if split == "train" else "TestSplit.txt"
            (raw / scene).mkdir(parents=True, exist_ok=True)
            (raw / scene / name).write_text("".join(f"sequence{s}\n" for s in seqs))
            rows = []
            for s in seqs:
                base_r, base_t = _rot(rng), rng.uniform(-2, 2, 3)  # any rotation; frames of a sequence are close
                for f in range(FRAMES):
                    m = np.eye(4)
                    m[:3, :3], m[:3, 3] = base_r @ _small_rot(rng), base_t + rng.uniform(-0.2, 0.2, 3)
                    stem = raw / scene / f"seq-{s:02d}" / f"frame-{f:06d}"
                    _png(Path(f"{stem}.color.png"))
                    Path(f"{stem}.pose.txt").write_text(
                        "\n".join("\t".join(f"{v:.17e}" for v in row) for row in m) + "\n"
                    )
                    pose = np.r_[m[:3, 3], _quat_from_matrix(m[:3, :3])]
                    rows.append((scene, split, f"seq-{s:02d}", f"{scene}/seq-{s:02d}/frame-{f:06d}.color.png", pose))
            expected[f"abs_7scenes_pose.csv_{scene}_{split}.csv"] = rows
    expected["7scenes_all_scenes.csv"] = [r for k, v in expected.items() if k.endswith("_train.csv") for r in v]
    return expected


CAMBRIDGE = ("KingsCollege", "OldHospital", "ShopFacade", "StMarysChurch")


def make_cambridge(raw: Path, seed: int = 1) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    expected: dict[str, list] = {}
    for scene in CAMBRIDGE:
        for split in ("train", "test"):
            lines = ["Cambridge Landmarks Dataset V1", "ImageFile, Camera Position [X Y Z W P Q R]", ""]
            rows = []
            for f in range(FRAMES):
                seq = f"seq{1 if split == 'train' else 2}"
                img = f"{seq}/frame{f + 1:05d}.png"
                _png(raw / scene / img)
                q = rng.normal(size=4)
                q = q / np.linalg.norm(q) * rng.uniform(0.99, 1.04)  # norms as in the files, signs of both kinds
                t = rng.uniform(-50, 50, 3)
                lines.append(" ".join([img, *(repr(float(v)) for v in [*t, *q])]))
                rows.append((scene, split, seq, f"{scene}/{img}", np.r_[t, q if q[0] >= 0 else -q]))
            (raw / scene / f"dataset_{split}.txt").write_text("\n".join(lines) + "\n")
            expected[f"abs_cambridge_pose_sorted.csv_{scene}_{split}.csv"] = rows
    train = [r for k, v in expected.items() if k.endswith("_train.csv") for r in v]
    expected["cambridge_all_scenes.csv"] = expected["cambridge_four_scenes.csv"] = train
    return expected


def _read(path: Path) -> list[tuple]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["scene", "split", "seq", "img_path", "t1", "t2", "t3", "q1", "q2", "q3", "q4"]
    return [(*r[:4], np.array([float(v) for v in r[4:]])) for r in rows[1:]]


def _compare(out: Path, expected: dict[str, list]) -> None:
    for name, rows in expected.items():
        got = _read(out / name)
        assert [g[:4] for g in got] == [e[:4] for e in rows], name
        for g, e in zip(got, rows):
            np.testing.assert_allclose(g[4], e[4], atol=1e-9, rtol=0, err_msg=f"{name} {g[3]}")
            assert g[4][3] >= 0


def test_7scenes_mockup_gives_the_independent_conversion(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "root"
    expected = make_7scenes(raw)
    assert main(["prepare", "7scenes", str(raw), "--out", str(out), "--no-progress"]) == 0
    _compare(out, expected)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["orientation"] == "camera_to_world" and meta["quaternion_order"] == "wxyz"
    assert meta["scenes"] == {"chess": {"train": 6, "test": 3}, "heads": {"train": 3, "test": 3}}
    for f in (0.3, 0.5, 0.7):  # subsets: per-scene fractions of the training file, nested
        sub = _read(out / f"7scenes_all_scenes.csv_{f:g}_subset.csv")
        assert {r[0] for r in sub} == {"chess", "heads"}
    small = {r[3] for r in _read(out / "7scenes_all_scenes.csv_0.3_subset.csv")}
    assert small <= {r[3] for r in _read(out / "7scenes_all_scenes.csv_0.7_subset.csv")}
    pairs = (out / "7scenes_all_scenes_pairs.csv").read_text().splitlines()
    assert pairs[0].startswith("img_path_a,scene_a,scene_id_a") and len(pairs) > 1
    assert (out / "7scenes_all_scenes_0.5_subset_pairs.csv").is_file()
    assert (out / "chess" / "seq-01" / "frame-000000.color.png").is_file()  # ROOT links the scenes: --data ROOT
    assert set(meta["files"]) >= set(expected)


def test_cambridge_mockup_keeps_the_nvm_convention_and_records_it(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "root"
    expected = make_cambridge(raw)
    assert main(["prepare", "cambridge", str(raw), "--out", str(out), "--no-progress", "--no-pairs"]) == 0
    _compare(out, expected)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["orientation"] == "world_to_camera" and meta["position"] == "camera_centre_in_world"
    assert "cambridge_five_scenes.csv" not in meta["files"]  # GreatCourt is absent
    conj = tmp_path / "c2w"
    prepare(PrepareOptions("cambridge", raw, conj, pairs=False, progress=False, orientation="camera_to_world"))
    assert json.loads((conj / "dataset.json").read_text())["orientation"] == "camera_to_world"
    for a, b in zip(_read(out / "cambridge_all_scenes.csv"), _read(conj / "cambridge_all_scenes.csv")):
        np.testing.assert_allclose(a[4][:3], b[4][:3], atol=0)
        conj_q = a[4][3:] * np.array([1, -1, -1, -1])  # conjugate (w >= 0 already)
        np.testing.assert_allclose(b[4][3:], conj_q, atol=1e-12)


def test_malformed_pose_file_names_file_and_line(tmp_path, capsys):
    raw = tmp_path / "raw"
    make_7scenes(raw)
    bad = raw / "heads" / "seq-02" / "frame-000001.pose.txt"
    lines = bad.read_text().splitlines()
    lines[2] = "0.1 0.2 oops 0.4"
    bad.write_text("\n".join(lines) + "\n")
    assert main(["prepare", "7scenes", str(raw), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "line 3" in err and "oops" in err
    lines[2] = "0.1 0.2 0.3 0.4"  # parses, but the 3x3 block is not a rotation
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(PrepareError, match="not a rotation"):
        prepare(PrepareOptions("7scenes", raw, tmp_path / "o2", progress=False))


def test_malformed_cambridge_line_and_missing_inputs(tmp_path, capsys):
    raw = tmp_path / "raw"
    make_cambridge(raw)
    f = raw / "ShopFacade" / "dataset_test.txt"
    lines = f.read_text().splitlines()
    lines[4] = lines[4].rsplit(" ", 1)[0]  # 7 fields
    f.write_text("\n".join(lines) + "\n")
    assert main(["prepare", "cambridge", str(raw), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(f) in err and "line 5" in err and "ImageFile X Y Z W P Q R" in err
    assert main(["prepare", "7scenes", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "not a directory" in capsys.readouterr().err
