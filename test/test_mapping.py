"""Mapping runs (``apr-synth dataset --mapping``) and the coverage of a test trajectory by training frames."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from apr_training.cli.synth import synth_main
from apr_training.datasets.labels import read_labels
from apr_training.synthetic.mapping import MappingParams, coverage, mapping_poses, mapping_tour
from apr_training.synthetic.scenes import make_scene
from apr_training.synthetic.writer import make_sequence_trajectory


def _coverage_by_hand(test: np.ndarray, train: np.ndarray, dist: float, angle: float) -> float:
    """Independent computation: loop over pairs, rotation angle from rotation matrices (trace formula)."""

    def matrix(q: np.ndarray) -> np.ndarray:
        w, x, y, z = q / np.linalg.norm(q)
        return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                         [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                         [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])  # fmt: skip

    r_test = [matrix(q) for q in test[:, 3:]]
    r_train = [matrix(q) for q in train[:, 3:]]
    hits = 0
    for i in range(len(test)):
        ok = False
        for j in range(len(train)):
            if math.dist(test[i, :3], train[j, :3]) <= dist:
                c = (np.trace(r_test[i].T @ r_train[j]) - 1.0) / 2.0
                if math.degrees(math.acos(min(1.0, max(-1.0, c)))) <= angle:
                    ok = True
                    break
        hits += ok
    return hits / len(test)


def test_coverage_equals_an_independent_computation():
    rng = np.random.default_rng(4)

    def poses(n: int) -> np.ndarray:
        q = rng.normal(size=(n, 4))
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        q[rng.random(n) < 0.5] *= -1  # either sign: the same rotation
        return np.concatenate([rng.uniform(0, 2, (n, 3)), q], axis=1)

    train, test = poses(300), poses(60)
    near = train[rng.integers(0, 300, 30)].copy()  # some test frames close to training frames
    near[:, :3] += rng.normal(0, 0.2, (30, 3))
    test = np.concatenate([test, near])
    for dist, angle in ((0.5, 20.0), (0.8, 60.0), (1.5, 120.0)):
        got = coverage(test, train, dist, angle, chunk=7)
        assert got.fraction == pytest.approx(_coverage_by_hand(test, train, dist, angle), abs=1e-12)
        assert got.covered.shape == (len(test),)


def test_mapping_run_stays_clear_and_looks_all_around():
    scene = make_scene("office", 0)
    p = MappingParams()
    times, poses = mapping_poses(scene, 1, fps=2.0, params=p)
    assert np.all(np.diff(times) > 0) and np.allclose(np.linalg.norm(poses[:, 3:], axis=1), 1.0)
    clearance = scene.point_clearance(poses[:, :2], max(p.wall_margin - p.margin, 0.0))
    assert clearance.min() > p.margin - 0.25  # path chords between grid cells may cut a corner of the margin
    # look-around: the optical axis points in every 30-degree yaw bin
    from apr_localizer.geometry import quat_to_matrix

    forward = quat_to_matrix(poses[:, 3:])[:, :, 2]
    yaw_bins = np.unique((np.degrees(np.arctan2(forward[:, 1], forward[:, 0])) // 30).astype(int) % 12)
    assert len(yaw_bins) == 12
    # sequences 1 and 2 (lanes along x, along y) each pass within 0.6 m of nearly all of the free space
    clear, xs, ys = scene.clearance_map(0.1, max(p.wall_margin - p.margin, 0.0))
    cells = np.argwhere(clear >= p.margin)
    free = np.stack([xs[cells[:, 1]], ys[cells[:, 0]]], axis=1)
    for seq in (1, 2):
        _, run = mapping_poses(scene, seq, fps=2.0, params=p)
        near = np.min(np.linalg.norm(free[:, None, :] - run[None, :, :2], axis=2), axis=1)
        assert np.mean(near <= 0.6) > 0.9
        tour = mapping_tour(scene, seq, p)
        assert len(tour) > 4


def test_two_mapping_runs_cover_most_of_an_unseen_walk():
    """Coverage (0.5 m / 20 deg) of a held-out handheld walk by two mapping runs sampled at 2 frames/s."""
    name = "kitchen"
    test = make_sequence_trajectory(name, 4, 200, 10.0, 0).sample(200, 10.0)[1]
    mapping = np.concatenate([mapping_poses(make_scene(name, 0), s, 2.0)[1] for s in (1, 2)])
    assert coverage(test, mapping).fraction > 0.6


def test_cli_mapping_dataset_reports_coverage(tmp_path, capsys):
    out = tmp_path / "ds"
    rc = synth_main(["dataset", "--out", str(out), "--scenes", "kitchen", "--mapping", "--train-seqs", "1",
                     "--test-seqs", "1", "--frames", "12", "--fps", "0.25", "--size", "32x24", "--workers", "1",
                     "--no-progress"])  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "dataset.json").read_text())
    assert summary["train_trajectory"] == "mapping" and "kitchen" in summary["coverage"]
    train, test = read_labels(out / "synthetic_train.csv"), read_labels(out / "synthetic_test.csv")
    want = coverage(test.unit_poses(), train.unit_poses()).fraction
    assert summary["coverage"]["kitchen"]["fraction"] == pytest.approx(want)
    assert len(test) == 12 and len(train) == summary["sequences"][0]["frames"] > 12
    assert (out / train.img_path[-1]).is_file()
    printed = capsys.readouterr().out
    assert "coverage kitchen" in printed
    rc = synth_main(["coverage", "--train", str(out / "synthetic_train.csv"), "--test", str(out / "synthetic_test.csv"),
                     "--json", str(tmp_path / "cov.json")])  # fmt: skip
    assert rc == 0 and json.loads((tmp_path / "cov.json").read_text())["kitchen"]["fraction"] == pytest.approx(want)
