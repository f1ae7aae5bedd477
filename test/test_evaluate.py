"""apr-eval: metrics against hand-computed values, report formats, TUM files, plots and the CLI end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from model_fixtures import random_iapr, random_ms_transformer
from PIL import Image

from apr_localizer import geometry as g
from apr_localizer.checkpoints import save_model
from apr_localizer.localizer import Localizer, LocalizerOptions
from apr_training.cli.eval import main as eval_main
from apr_training.datasets.labels import LabelRow, write_labels
from apr_training.datasets.torch_datasets import load_rgb
from apr_training.evaluation import metrics

SCENES = ["alpha", "beta", "gamma"]  # gamma has no frames in the test CSV
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _q(axis, deg: float) -> np.ndarray:
    """w-first quaternion of a rotation by ``deg`` about ``axis``."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    h = math.radians(deg) / 2
    return np.concatenate([[math.cos(h)], math.sin(h) * a])


def _pose(t, q) -> np.ndarray:
    return np.concatenate([np.asarray(t, dtype=np.float64), np.asarray(q, dtype=np.float64)])


IDENTITY = _pose([0, 0, 0], [1, 0, 0, 0])


# ------------------------------------------------------------------------------------------------ metrics
def test_frame_errors_known_values_and_quaternion_invariance():
    gt = np.stack([_pose([1, 2, 3], _q([0, 0, 1], 30))] * 3)
    est = np.stack(
        [
            _pose([1.1, 2, 3], _q([0, 0, 1], 40)),  # 0.1 m, 10 deg
            _pose([1, 2, 3], -2.5 * _q([0, 0, 1], 30)),  # same rotation, scaled and negated quaternion
            _pose([1 + 0.3, 2 + 0.4, 3], g.quat_multiply(_q([0, 0, 1], 30), _q([1, 0, 0], 90))),  # 0.5 m, 90 deg
        ]
    )
    pos, rot, valid = metrics.frame_errors(est, gt)
    np.testing.assert_allclose(pos, [0.1, 0.0, 0.5], atol=1e-12)
    np.testing.assert_allclose(rot, [10.0, 0.0, 90.0], atol=1e-6)
    assert valid.all()


def test_per_scene_metrics_thresholds_medians_accuracy():
    # (position m, rotation deg) per frame of scene "a"; thresholds need BOTH conditions.
    cases = [(0.05, 0.5), (0.2, 1.5), (0.4, 4.0), (3.0, 9.0), (0.05, 3.0)]
    est = np.stack([_pose([p, 0, 0], _q([0, 1, 0], r)) for p, r in cases])
    gt = np.stack([IDENTITY] * len(cases))
    rep = metrics.per_scene_metrics(est, gt, ["a"] * 5, ["a", "a", "b", "a", "a"], name="m")
    s = rep.scene("a")
    assert (s.n, s.n_invalid) == (5, 0)
    assert s.median_position_m == pytest.approx(0.2)
    assert s.median_orientation_deg == pytest.approx(3.0)
    assert s.mean_position_m == pytest.approx(np.mean([c[0] for c in cases]))
    assert s.mean_orientation_deg == pytest.approx(np.mean([c[1] for c in cases]))
    assert s.within == pytest.approx({"0.1m/1deg": 0.2, "0.25m/2deg": 0.4, "0.5m/5deg": 0.8, "5m/10deg": 1.0})
    assert s.scene_accuracy == pytest.approx(0.8)
    assert rep.overall.scene == "all" and rep.overall.n == 5


def test_threshold_boundaries_are_inclusive():
    est = np.stack([_pose([0.1, 0, 0], [1, 0, 0, 0]), _pose([0.1 + 1e-9, 0, 0], [1, 0, 0, 0])])
    rep = metrics.per_scene_metrics(est, np.stack([IDENTITY] * 2), ["a", "a"], thresholds=[(0.1, 1.0)])
    assert rep.overall.within == {"0.1m/1deg": 0.5}


def test_mean_of_medians_is_the_average_of_per_scene_medians():
    # scene a: medians 0.1 m / 2 deg; scene b (3 frames): 0.3 m / 4 deg; pooled median differs.
    rows = [("a", 0.1, 2.0), ("b", 0.3, 4.0), ("b", 0.3, 4.0), ("b", 0.9, 8.0)]
    est = np.stack([_pose([p, 0, 0], _q([1, 0, 0], r)) for _, p, r in rows])
    rep = metrics.per_scene_metrics(est, np.stack([IDENTITY] * 4), [r[0] for r in rows], scene_order=["b", "x", "a"])
    assert [s.scene for s in rep.scenes] == ["b", "a"]  # model order, scenes without frames left out
    pos, rot = rep.mean_of_medians
    assert pos == pytest.approx(0.2) and rot == pytest.approx(3.0)
    assert rep.overall.median_position_m == pytest.approx(0.3)


def test_non_finite_estimates_are_counted_not_dropped():
    est = np.stack([_pose([0.05, 0, 0], [1, 0, 0, 0]), IDENTITY, IDENTITY, IDENTITY])
    est[1, 0] = np.nan
    est[2, 3:] = 0.0  # zero quaternion
    est[3, 5] = np.inf
    rep = metrics.per_scene_metrics(est, np.stack([IDENTITY] * 4), ["a"] * 4)
    s = rep.overall
    assert (s.n, s.n_invalid) == (4, 3)
    assert s.median_position_m == pytest.approx(0.05) and s.median_orientation_deg == pytest.approx(0.0)
    assert s.within["0.1m/1deg"] == pytest.approx(0.25)  # invalid frames are misses
    pos, rot, valid = metrics.frame_errors(est, np.stack([IDENTITY] * 4))
    assert valid.tolist() == [True, False, False, False] and np.isnan(pos[1:]).all() and np.isnan(rot[1:]).all()
    all_bad = metrics.per_scene_metrics(est[1:], np.stack([IDENTITY] * 3), ["a"] * 3)
    assert math.isnan(all_bad.overall.median_position_m)
    d = metrics.EvalReport([all_bad]).to_dict()  # NaN → null, strict JSON
    assert d["methods"][0]["overall"]["median_position_m"] is None
    json.loads(metrics.EvalReport([all_bad]).to_json())
    bad_gt = np.stack([IDENTITY, IDENTITY])
    bad_gt[1, 3:] = 0
    with pytest.raises(ValueError, match="ground-truth pose 1"):
        metrics.frame_errors(np.stack([IDENTITY] * 2), bad_gt)


def test_latency_stats_and_per_scene_latency():
    st = metrics.latency_stats(np.arange(1, 101, dtype=float))
    assert st["median"] == pytest.approx(50.5) and st["p90"] == pytest.approx(90.1)
    assert st["p99"] == pytest.approx(99.01) and st["mean"] == pytest.approx(50.5) and st["max"] == 100
    est = np.stack([IDENTITY] * 4)
    rep = metrics.per_scene_metrics(est, est, ["a", "a", "b", "b"], latency_ms={"total": [1.0, 3.0, 10.0, 20.0]})
    assert rep.scene("a").latency_ms["total"]["median"] == pytest.approx(2.0)
    assert rep.scene("b").latency_ms["total"]["median"] == pytest.approx(15.0)
    assert rep.overall.latency_ms["total"]["max"] == 20.0
    with pytest.raises(ValueError, match="latency_ms"):
        metrics.per_scene_metrics(est, est, ["a"] * 4, latency_ms={"total": [1.0]})


def test_report_formats_compare_methods():
    gt = np.stack([IDENTITY] * 4)
    apr = np.stack([_pose([0.2, 0, 0], _q([0, 0, 1], 6))] * 4)
    ref = np.stack([_pose([0.1, 0, 0], _q([0, 0, 1], 3))] * 4)
    scenes = ["a", "a", "b", "b"]
    report = metrics.EvalReport(
        [
            metrics.per_scene_metrics(apr, gt, scenes, name="MS-Transformer"),
            metrics.per_scene_metrics(ref, gt, scenes, name="iAPR (1 it.)"),
        ],
        info={"model": "m.safetensors", "nested": {"x": 1}, "empty": ""},
    )
    text = metrics.format_text(report)
    assert "model: m.safetensors" in text and "nested" not in text and "empty" not in text
    line = next(ln for ln in text.splitlines() if ln.startswith("Average (mean of medians)"))
    assert "0.200 m / 6.00°" in line and "0.100 m / 3.00°" in line
    md = metrics.format_markdown(report)
    assert "| Scene | Frames | MS-Transformer | iAPR (1 it.) |" in md
    assert "| Average (mean of medians) |  | 0.200 m / 6.00° | 0.100 m / 3.00° |" in md
    d = json.loads(report.to_json())
    assert [m["name"] for m in d["methods"]] == ["MS-Transformer", "iAPR (1 it.)"]
    assert d["methods"][1]["mean_of_medians"]["position_m"] == pytest.approx(0.1)
    assert d["info"]["nested"] == {"x": 1}
    # aligned plain-text columns: every row of the comparison has the same width
    table = metrics.render_table(["Scene", "v"], [["a", "1"], ["long name", "22"]])
    assert len({len(r) for r in table.splitlines()}) == 1


# ------------------------------------------------------------------------------------------------ TUM
def test_tum_round_trip_ros_order(tmp_path):
    rng = np.random.default_rng(3)
    q = rng.normal(size=(5, 4))
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    poses = np.concatenate([rng.normal(size=(5, 3)), q * 3.0], axis=1)  # non-unit quaternions are normalised
    poses[2] = np.nan
    ts = np.arange(5) * 0.5
    n = metrics.write_tum(tmp_path / "t.txt", ts, poses)
    assert n == 4
    lines = (tmp_path / "t.txt").read_text().splitlines()
    assert lines[0] == metrics.TUM_HEADER
    data = [ln.split() for ln in lines[1:]]
    assert all(len(f) == 8 for f in data)
    first = [float(v) for v in data[0]]
    np.testing.assert_allclose(first[4:8], [q[0, 1], q[0, 2], q[0, 3], q[0, 0]], atol=1e-12)  # x y z w
    t2, p2 = metrics.read_tum(tmp_path / "t.txt")
    keep = [0, 1, 3, 4]
    np.testing.assert_array_equal(t2, ts[keep])
    np.testing.assert_array_equal(p2[:, :3], poses[keep, :3])
    np.testing.assert_allclose(p2[:, 3:], q[keep], atol=1e-15)
    with pytest.raises(ValueError, match="pose 2"):
        metrics.write_tum(tmp_path / "u.txt", ts, poses, skip_invalid=False)


# ------------------------------------------------------------------------------------------------ apr-eval
@pytest.fixture(scope="module")
def eval_data(tmp_path_factory) -> dict[str, Path]:
    """Write a shared-encoder iAPR bundle, an APR-only bundle, 6 PNG frames in 2 scenes and their label CSVs."""
    d = tmp_path_factory.mktemp("eval")
    apr = random_ms_transformer(seed=11)
    iapr = random_iapr(seed=12, mstransformer=apr)
    model = save_model(d / "model.safetensors", apr, iapr, scene_names=SCENES)
    apr_only = save_model(d / "apr.safetensors", apr, scene_names=SCENES)
    root = d / "data"
    rng = np.random.default_rng(5)
    rows = []
    for i in range(6):
        scene = SCENES[i % 2]
        seq = "seq-01" if i < 4 else "seq-02"
        rel = f"{scene}/{seq}/frame-{i:06d}.color.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / rel)
        q = g.quat_normalize(rng.normal(size=4))
        rows.append(LabelRow(scene, "test", seq, rel, tuple(np.concatenate([rng.normal(size=3), q]).tolist())))
    labels = write_labels(root / "test.csv", rows)
    bad = write_labels(root / "bad.csv", [rows[0], rows[1]._replace(scene="delta")])
    return {"model": model, "apr_only": apr_only, "root": root, "labels": labels, "bad_labels": bad}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _args(data, out, *extra):
    return ["--model", str(data["model"]), "--data", str(data["root"]), "--labels", str(data["labels"]),
            "--out", str(out), "--backend", "torch", "--device", "cpu", "--threads", "2", "--warmup", "0",
            "--quiet", *extra]  # fmt: skip


def test_apr_eval_end_to_end_matches_localizer(eval_data, tmp_path):
    out = tmp_path / "out"
    assert eval_main(_args(eval_data, out, "--iterations", "2")) == 0
    expected = ["report.json", "report.md", "table.txt", "frames.csv", "plots/error_cdf.png"]
    expected += [f"plots/{kind}_{s}.png" for kind in ("trajectory", "errors") for s in ("alpha", "beta")]
    expected += [f"tum/{s}_{k}.txt" for s in ("alpha", "beta") for k in ("gt", "apr", "iapr")]
    expected += [f"tum/{s}_{q}_{k}.txt" for s in ("alpha", "beta") for q in ("seq-01", "seq-02") for k in ("gt", "apr")]
    for rel in expected:
        assert (out / rel).is_file() and (out / rel).stat().st_size > 0, rel
    for png in (out / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000

    # the same frames through the Localizer API, k = 0, 1, 2 iterations
    loc = Localizer.from_files(eval_data["model"], options=LocalizerOptions(backend="torch", device="cpu"))
    rows = _read_csv(eval_data["labels"])
    gt = np.array([[float(r[c]) for c in ("t1", "t2", "t3", "q1", "q2", "q3", "q4")] for r in rows])
    images = [load_rgb(eval_data["root"] / r["img_path"]) for r in rows]
    results = [[loc.localize(im, iterations=k) for im in images] for k in range(3)]
    est = {k: np.stack([e.pose for e in results[k]]) for k in range(3)}
    pred = [e.scene_name for e in results[0]]

    report = json.loads((out / "report.json").read_text())
    assert report["info"]["frames"] == 6 and report["info"]["iterations"] == 2
    assert report["info"]["model_scenes"] == SCENES
    methods = report["methods"]
    assert [m["name"] for m in methods] == ["MS-Transformer", "iAPR (1 it.)", "iAPR (2 it.)"]
    scenes = np.array([r["scene"] for r in rows])
    for k, m in enumerate(methods):
        pos, rot = g.pose_errors(est[k], gt)
        assert [s["scene"] for s in m["scenes"]] == ["alpha", "beta"]
        for s in m["scenes"]:
            sel = scenes == s["scene"]
            assert s["n"] == 3 and s["n_invalid"] == 0
            assert s["median_position_m"] == pytest.approx(np.median(pos[sel]), abs=1e-5)
            assert s["median_orientation_deg"] == pytest.approx(np.median(rot[sel]), abs=1e-3)
            assert s["scene_accuracy"] == pytest.approx(np.mean(np.array(pred)[sel] == s["scene"]))
        means = [np.median(pos[scenes == s]) for s in ("alpha", "beta")]
        assert m["mean_of_medians"]["position_m"] == pytest.approx(np.mean(means), abs=1e-5)
        assert set(m["overall"]["latency_ms"]) >= {"load", "preprocess", "apr", "postprocess", "total"}
        assert ("iapr" in m["overall"]["latency_ms"]) == (k > 0)

    frames = _read_csv(out / "frames.csv")
    assert len(frames) == 6 and [f["frame"] for f in frames] == [str(i) for i in range(6)]
    for k, key in enumerate(("apr", "iapr1", "iapr2")):
        got = np.array([[float(f[f"{key}_{c}"]) for c in ("x", "y", "z", "qw", "qx", "qy", "qz")] for f in frames])
        np.testing.assert_allclose(got, est[k], atol=1e-5)
    assert [f["pred_scene"] for f in frames] == pred

    ts, traj = metrics.read_tum(out / "tum" / "beta_iapr.txt")
    np.testing.assert_array_equal(ts, [1.0, 3.0, 5.0])  # CSV row index as timestamp
    np.testing.assert_allclose(traj, est[2][[1, 3, 5]], atol=1e-5)
    ts, traj = metrics.read_tum(out / "tum" / "alpha_gt.txt")
    np.testing.assert_allclose(traj, gt[[0, 2, 4]], atol=1e-12)
    table = (out / "table.txt").read_text()
    assert "Average (mean of medians)" in table and "iAPR (2 it.)" in table
    assert "| Scene | Frames | MS-Transformer | iAPR (1 it.) | iAPR (2 it.) |" in (out / "report.md").read_text()


def test_apr_eval_apr_only_stride_limit(eval_data, tmp_path, capsys):
    out = tmp_path / "out"
    args = _args(eval_data, out, "--stride", "2", "--limit", "2", "--no-plots")
    args[1] = str(eval_data["apr_only"])
    assert eval_main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert [m["name"] for m in report["methods"]] == ["MS-Transformer"]
    assert report["info"]["frames"] == 2 and report["info"]["iterations"] == 0
    frames = _read_csv(out / "frames.csv")
    assert [f["frame"] for f in frames] == ["0", "2"] and {f["scene"] for f in frames} == {"alpha"}
    assert (out / "tum" / "alpha_apr.txt").is_file() and not list((out / "tum").glob("*_iapr.txt"))
    assert not (out / "plots").exists()
    # an APR-only model cannot refine
    assert eval_main([*args, "--iterations", "1"]) == 2
    assert "needs an iAPR model" in capsys.readouterr().err


def test_apr_eval_unknown_scene_and_missing_files(eval_data, tmp_path, capsys):
    args = _args(eval_data, tmp_path / "o")
    args[5] = str(eval_data["bad_labels"])
    assert eval_main(args) == 2
    err = capsys.readouterr().err
    assert "row 2" in err and "'delta'" in err and "alpha" in err
    args = _args(eval_data, tmp_path / "o")
    args[3] = str(tmp_path / "no_such_root")
    assert eval_main(args) == 2
    assert "missing" in capsys.readouterr().err
    args = _args(eval_data, tmp_path / "o", "--split", "train")
    assert eval_main(args) == 2
    assert "no rows with split 'train'" in capsys.readouterr().err
