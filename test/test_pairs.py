"""Pairs CSV, the distance/angle pair generator and the per-scene training subsets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from apr_localizer.geometry import flip_relative, relative_pose, rotation_error_deg
from apr_training.cli.pairs import main as apr_pairs_main
from apr_training.datasets import (
    PAIR_COLUMNS,
    LabelError,
    LabelRow,
    LabelTable,
    generate_pairs,
    make_pairs,
    make_subset,
    read_labels,
    read_pairs,
    subset_csv_path,
    write_labels,
    write_pairs,
    write_subsets,
)


def _trajectory_labels(counts: dict[str, int], seed: int = 0, test_every: int = 5) -> LabelTable:
    """Smooth random-walk trajectories per scene; every ``test_every``-th frame is in the test split."""
    rng = np.random.default_rng(seed)
    rows = []
    for scene, n in counts.items():
        pos = rng.normal(0, 0.05, (n, 3)).cumsum(0)
        q = rng.normal(size=(1, 4)) + rng.normal(0, 0.04, (n, 4)).cumsum(0)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        q *= rng.uniform(0.98, 1.04, (n, 1))  # non-unit like Cambridge
        for i in range(n):
            split = "test" if i % test_every == 0 else "train"
            rows.append(LabelRow(scene, split, "seq-01", f"{scene}/seq-01/frame-{i:06d}.color.png",
                                 tuple(np.r_[pos[i], q[i]].tolist())))  # fmt: skip
    return LabelTable.from_rows(rows)


def _keys(pairs) -> list[tuple[str, str]]:
    return list(zip(pairs.img_path_a, pairs.img_path_b))


def _brute_force(labels: LabelTable, max_d: float, max_a: float, min_d: float = 0.0, split: str = "train"):
    unit = labels.unit_poses()
    out = set()
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            if labels.scene_id[i] != labels.scene_id[j] or labels.split[i] != split or labels.split[j] != split:
                continue
            d = np.linalg.norm(unit[i, :3] - unit[j, :3])
            a = rotation_error_deg(unit[i, 3:], unit[j, 3:])
            if min_d <= d <= max_d and a <= max_a:
                out.add((labels.img_path[i], labels.img_path[j]))
    return out


LABELS = _trajectory_labels({"stairs": 70, "chess": 90, "fire": 40})


def test_pairs_respect_thresholds_scene_and_split() -> None:
    pairs = generate_pairs(LABELS, max_distance_m=0.4, max_angle_deg=20, min_distance_m=0.05, pairs_per_frame=3, seed=7)
    assert len(pairs) > 50
    d = np.linalg.norm(pairs.pose_a[:, :3] - pairs.pose_b[:, :3], axis=1)
    ang = rotation_error_deg(pairs.pose_a[:, 3:], pairs.pose_b[:, 3:])
    assert d.min() >= 0.05 and d.max() <= 0.4
    assert ang.max() <= 20 + 1e-6
    assert pairs.scene_a == pairs.scene_b
    np.testing.assert_array_equal(pairs.scene_id_a, pairs.scene_id_b)
    split = dict(zip(LABELS.img_path, LABELS.split))
    assert all(split[a] == "train" and split[b] == "train" for a, b in _keys(pairs))
    # no self pairs, no duplicates, (a, b) and (b, a) are the same pair
    unordered = [tuple(sorted(k)) for k in _keys(pairs)]
    assert len(set(unordered)) == len(unordered)
    assert all(a != b for a, b in _keys(pairs))
    # at most pairs_per_frame chosen per frame of the training split
    n_train = sum(s == "train" for s in LABELS.split)
    assert len(pairs) <= 3 * n_train
    # the relative pose is the iAPR one
    np.testing.assert_allclose(pairs.rel_ab, relative_pose(pairs.pose_a, pairs.pose_b), atol=1e-12)
    err_m, err_deg = pairs.relative_errors()
    assert err_m.max() < 1e-12 and err_deg.max() < 1e-5


def test_all_candidates_when_k_is_large() -> None:
    """With pairs_per_frame >= n every qualifying pair is produced exactly once (vs a brute-force loop)."""
    pairs = generate_pairs(LABELS, max_distance_m=0.3, max_angle_deg=15, min_distance_m=0.02, pairs_per_frame=1000)
    expected = _brute_force(LABELS, 0.3, 15, 0.02)
    assert {tuple(sorted(k)) for k in _keys(pairs)} == {tuple(sorted(k)) for k in expected}
    assert len(pairs) == len(expected)


def test_deterministic_and_seed_dependent() -> None:
    kw = {"max_distance_m": 0.5, "max_angle_deg": 30, "pairs_per_frame": 2}
    a = generate_pairs(LABELS, seed=3, **kw)
    b = generate_pairs(LABELS, seed=3, **kw)
    c = generate_pairs(LABELS, seed=4, **kw)
    assert _keys(a) == _keys(b)
    np.testing.assert_array_equal(a.rel_ab, b.rel_ab)
    assert _keys(a) != _keys(c)
    # each scene has its own stream: dropping a scene leaves the others' pairs unchanged
    without_fire = generate_pairs(LABELS.take(np.flatnonzero(np.array(LABELS.scene) != "fire")), seed=3, **kw)
    assert [k for k in _keys(a) if not k[0].startswith("fire/")] == _keys(without_fire)


def test_both_directions_and_subset() -> None:
    kw = {"max_distance_m": 0.5, "max_angle_deg": 30, "pairs_per_frame": 2, "seed": 1}
    one = generate_pairs(LABELS, **kw)
    both = generate_pairs(LABELS, both_directions=True, **kw)
    assert len(both) == 2 * len(one)
    keys = set(_keys(both))
    assert all((b, a) in keys for a, b in keys)
    assert {tuple(sorted(k)) for k in _keys(one)} == {tuple(sorted(k)) for k in keys}
    sub = make_subset(LABELS.where(split="train"), 0.5, seed=0)
    restricted = generate_pairs(LABELS, subset=sub, **kw)
    allowed = set(sub.img_path)
    assert len(restricted) > 0
    assert all(a in allowed and b in allowed for a, b in _keys(restricted))
    assert len(generate_pairs(LABELS, subset=[], **kw)) == 0
    # split=None uses every row, including the test split
    everything = generate_pairs(LABELS, split=None, **kw)
    split = dict(zip(LABELS.img_path, LABELS.split))
    assert any(split[a] == "test" or split[b] == "test" for a, b in _keys(everything))


def test_min_angle_and_argument_errors() -> None:
    pairs = generate_pairs(LABELS, max_distance_m=1.0, max_angle_deg=40, min_angle_deg=10, pairs_per_frame=4)
    ang = rotation_error_deg(pairs.pose_a[:, 3:], pairs.pose_b[:, 3:])
    assert len(pairs) and ang.min() >= 10 - 1e-6
    with pytest.raises(ValueError, match="max_distance_m"):
        generate_pairs(LABELS, max_distance_m=0, max_angle_deg=10)
    with pytest.raises(ValueError, match="min_distance_m"):
        generate_pairs(LABELS, max_distance_m=1, max_angle_deg=10, min_distance_m=2)
    with pytest.raises(ValueError, match="max_angle_deg"):
        generate_pairs(LABELS, max_distance_m=1, max_angle_deg=190)
    with pytest.raises(ValueError, match="pairs_per_frame"):
        generate_pairs(LABELS, max_distance_m=1, max_angle_deg=10, pairs_per_frame=0)
    with pytest.raises(ValueError, match=r"no label rows have split 'val' \(splits present: \['test', 'train'\]\)"):
        generate_pairs(LABELS, max_distance_m=1, max_angle_deg=10, split="val")


def test_pairs_csv_round_trip(tmp_path: Path) -> None:
    pairs = generate_pairs(LABELS, max_distance_m=0.5, max_angle_deg=30, pairs_per_frame=2, seed=5)
    path = write_pairs(tmp_path / "p" / "pairs.csv", pairs)
    assert path.read_text().splitlines()[0] == ",".join(PAIR_COLUMNS)
    back = read_pairs(path)
    assert _keys(back) == _keys(pairs) and back.scene_a == pairs.scene_a and back.scene_b == pairs.scene_b
    for name in ("pose_a", "pose_b", "rel_ab", "scene_id_a", "scene_id_b"):
        np.testing.assert_array_equal(getattr(back, name), getattr(pairs, name))
    assert back.root == path.parent
    assert back.scene_names_by_id() == dict(enumerate(LABELS.scenes))


def test_pairs_scene_remap_and_errors(tmp_path: Path) -> None:
    pairs = make_pairs(LABELS, [0, 75], [1, 76])  # stairs rows 0-1, chess rows 75-76
    path = write_pairs(tmp_path / "pairs.csv", pairs)
    order = ["stairs", "fire", "chess"]
    remapped = read_pairs(path, scene_names=order)
    assert remapped.scene_id_a.tolist() == [order.index(s) for s in pairs.scene_a]
    with pytest.raises(LabelError, match=r"row 2 of .*pairs\.csv: scene_a 'chess' is not one of the model's scenes"):
        read_pairs(path, scene_names=["stairs"])

    lines = path.read_text().splitlines()
    # a relative pose in another convention (rotated into camera a) is rejected, naming the row
    wrong = pairs.take([0, 1])
    wrong.rel_ab = flip_relative(wrong.rel_ab)
    bad_path = write_pairs(tmp_path / "wrong.csv", wrong)
    with pytest.raises(LabelError, match=r"row 1 of .*wrong\.csv: the relative pose x1_ab\.\.q4_ab differs"):
        read_pairs(bad_path)
    assert len(read_pairs(bad_path, check_relative=False)) == 2

    fields = lines[2].split(",")
    fields[2] = "x"
    (tmp_path / "id.csv").write_text("\n".join([lines[0], lines[1], ",".join(fields)]) + "\n")
    msg = r"row 2 of .*id\.csv \(line 3\): column 'scene_id_a' is 'x'; expected an integer"
    with pytest.raises(LabelError, match=msg):
        read_pairs(tmp_path / "id.csv")
    (tmp_path / "short.csv").write_text("\n".join([lines[0], lines[1][: lines[1].rfind(",")]]) + "\n")
    with pytest.raises(LabelError, match="has 26 columns; expected 27"):
        read_pairs(tmp_path / "short.csv")
    (tmp_path / "hdr.csv").write_text("img_path_a,img_path_b\n")
    with pytest.raises(LabelError, match="expected exactly img_path_a,scene_a"):
        read_pairs(tmp_path / "hdr.csv")


def test_make_subset_sizes_nested_without_replacement() -> None:
    train = LABELS.where(split="train")
    counts = {s: train.scene.count(s) for s in train.scenes}
    subsets = {f: make_subset(train, f, seed=11) for f in (0.3, 0.5, 0.7, 1.0)}
    for f, sub in subsets.items():
        for s, n in counts.items():
            assert sub.scene.count(s) == max(1, round(f * n))
        assert len(set(sub.img_path)) == len(sub)  # no duplicates
        order = [train.img_path.index(p) for p in sub.img_path]
        assert order == sorted(order)  # original row order kept
        assert sub.scenes == train.scenes
    assert set(subsets[0.3].img_path) <= set(subsets[0.5].img_path) <= set(subsets[0.7].img_path)
    assert subsets[1.0].img_path == train.img_path
    assert make_subset(train, 0.3, seed=11).img_path == subsets[0.3].img_path
    assert make_subset(train, 0.3, seed=12).img_path != subsets[0.3].img_path
    with pytest.raises(ValueError, match="fraction"):
        make_subset(train, 0.0)


def test_write_subsets_naming(tmp_path: Path) -> None:
    csv = write_labels(tmp_path / "7scenes_all_scenes.csv", LABELS.where(split="train"))
    written = write_subsets(csv, seed=2)
    assert sorted(written) == [0.3, 0.5, 0.7]
    assert written[0.3] == tmp_path / "7scenes_all_scenes.csv_0.3_subset.csv"
    assert subset_csv_path(csv, 0.5, tmp_path / "o") == tmp_path / "o" / "7scenes_all_scenes.csv_0.5_subset.csv"
    full = read_labels(csv)
    for f, p in written.items():
        sub = read_labels(p)
        assert len(sub) == sum(max(1, round(f * full.scene.count(s))) for s in full.scenes)
        assert sub.img_path == make_subset(full, f, seed=2).img_path


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = write_labels(tmp_path / "train.csv", LABELS)
    assert apr_pairs_main(["subsets", str(csv), "--fractions", "0.5", "--seed", "3"]) == 0
    subset = tmp_path / "train.csv_0.5_subset.csv"
    assert subset.is_file()
    out = tmp_path / "pairs.csv"
    args = ["generate", str(csv), str(out), "--max-distance", "0.5", "--max-angle", "30", "--seed", "2"]
    assert apr_pairs_main([*args, "--subset", str(subset)]) == 0
    assert "pairs from 200 frames" in capsys.readouterr().out
    written = read_pairs(out)
    expected = generate_pairs(LABELS, 0.5, 30, seed=2, subset=read_labels(subset))
    assert _keys(written) == _keys(expected)
    missing = ["generate", str(tmp_path / "missing.csv"), str(out), "--max-distance", "1", "--max-angle", "5"]
    assert apr_pairs_main(missing) == 2
    assert "missing.csv does not exist" in capsys.readouterr().err
    assert apr_pairs_main([*args, "--split", "val"]) == 2
