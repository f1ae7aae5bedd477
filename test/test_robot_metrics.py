"""Robot metrics against independent computations on hand-made errors; their report.json keys in apr-eval.

Hint success, AUROC (brute force over pairs), coverage at 95 % precision (hand-enumerated), within kσ (hand-counted)
and the risk–coverage table; then an apr-eval run end to end on a tiny dataset.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from model_fixtures import random_iapr, random_ms_transformer
from PIL import Image

from apr_localizer import geometry as g
from apr_localizer.checkpoints import save_model
from apr_localizer.localizer import Localizer, LocalizerOptions
from apr_localizer.uncertainty import Calibration
from apr_training.cli.eval import main as eval_main
from apr_training.datasets.labels import LabelRow, write_labels
from apr_training.datasets.torch_datasets import load_rgb
from apr_training.evaluation import robot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _q(axis, deg: float) -> np.ndarray:
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    h = math.radians(deg) / 2
    return np.concatenate([[math.cos(h)], math.sin(h) * a])


def _frames(cases):
    """Estimates at (dx, dy, dz, rotation axis, degrees) from an identity-like ground truth at (1, 2, 3)."""
    gt_q = _q([0, 0, 1], 20)
    gt = np.stack([np.r_[1.0, 2.0, 3.0, gt_q]] * len(cases))
    est = np.stack([np.r_[1 + dx, 2 + dy, 3 + dz, g.quat_multiply(_q(ax, deg), gt_q)] for dx, dy, dz, ax, deg in cases])
    return est, gt


# (dx, dy, dz, axis, deg): position errors 0.1, 0.4, 0.6, 1.2, 0.3, 2.0, 0.2, 0.9 m
CASES = [
    (0.1, 0, 0, [0, 0, 1], 2.0),  # good, ok
    (0, 0.4, 0, [1, 0, 0], 9.0),  # good, ok
    (0, 0, 0.6, [0, 1, 0], 3.0),  # wrong (> 0.5 m), ok
    (1.2, 0, 0, [0, 0, 1], 1.0),  # wrong, not ok (> 1 m), inside 1.5 m
    (0, 0.3, 0, [0, 0, 1], 12.0),  # wrong (> 10 deg), ok (< 15 deg)
    (0, 2.0, 0, [1, 0, 0], 40.0),  # wrong, not ok, outside 1.5 m
    (0.2, 0, 0, [0, 1, 0], 20.0),  # wrong, not ok (> 15 deg)
    (0, 0, 0.9, [0, 0, 1], 5.0),  # wrong, ok
]
GOOD = np.array([1, 1, 0, 0, 0, 0, 0, 0], bool)  # within 0.5 m and 10 deg (counted by hand above)
OK = np.array([1, 1, 1, 0, 1, 0, 0, 1], bool)  # within 1 m and 15 deg
SCORES = np.array([0.1, 0.5, 0.2, 0.9, 0.3, 0.8, 0.4, 0.3])  # a tie at 0.3 (frames 4 and 7)


def _brute_auroc(scores, wrong):
    """P(score of a wrong frame > score of a good frame) + 1/2 P(equal), over every pair."""
    pos = [s for s, w in zip(scores, wrong) if w]
    neg = [s for s, w in zip(scores, wrong) if not w]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_hint_success_and_auroc_match_hand_counts():
    est, gt = _frames(CASES)
    r = robot.robot_metrics(est, gt, robot.FrameUncertainty("step_size", SCORES))
    assert r.hint == pytest.approx({"within_0_5m_10deg": 2 / 8, "within_1_5m": 7 / 8})
    assert r.uncertainty["auroc"] == pytest.approx(_brute_auroc(SCORES, ~GOOD))
    assert r.uncertainty["frames_scored"] == 8 and r.uncertainty["score"] == "step_size"
    assert r.uncertainty["within_1sigma"] is None and not r.uncertainty["calibrated"]


def test_coverage_at_95_precision_hand_enumerated():
    est, gt = _frames(CASES)
    # Sorted by score: 0(0.1 ok) 2(0.2 ok) {4,7}(0.3 ok, ok) 6(0.4 not ok) 1(0.5 ok) 5(0.8) 3(0.9).
    # Publishing 1, 2, 4 frames (the tie enters together): all ok; 5 frames: 4/5 = 80 % < 95 %. So 4/8.
    r = robot.robot_metrics(est, gt, robot.FrameUncertainty("s", SCORES))
    assert r.uncertainty["coverage_at_95_precision"] == pytest.approx(4 / 8)
    # a perfect score: the 5 ok frames first, then the 3 not ok ones
    perfect = np.where(OK, 0.0, 1.0) + np.arange(8) * 1e-3
    r = robot.robot_metrics(est, gt, robot.FrameUncertainty("s", perfect))
    assert r.uncertainty["coverage_at_95_precision"] == pytest.approx(5 / 8)
    # the most confident frame is wrong: nothing can be published at 95 %
    worst = np.where(OK, 1.0, 0.0)
    assert robot.robot_metrics(est, gt, robot.FrameUncertainty("s", worst)).uncertainty[
        "coverage_at_95_precision"
    ] == pytest.approx(0.0)


def test_risk_coverage_table_hand_computed():
    est, gt = _frames(CASES)
    rows = robot.robot_metrics(est, gt, robot.FrameUncertainty("s", SCORES)).risk_coverage
    assert [r["coverage"] for r in rows] == pytest.approx([c / 10 for c in range(1, 11)])
    order = [0, 2, 4, 7, 6, 1, 5, 3]  # most confident first, ties in frame order
    pos = np.array([0.1, 0.4, 0.6, 1.2, 0.3, 2.0, 0.2, 0.9])
    rot = np.array([2, 9, 3, 1, 12, 40, 20, 5], float)
    for r in rows:
        n = math.ceil(r["coverage"] * 8 - 1e-9)
        sel = order[:n]
        assert r["frames"] == n
        assert r["median_position_m"] == pytest.approx(np.median(pos[sel]))
        assert r["median_orientation_deg"] == pytest.approx(np.median(rot[sel]), abs=1e-6)
        assert r["ok_fraction"] == pytest.approx(OK[sel].mean())


def test_within_sigma_hand_counted_per_axis():
    # per-axis errors: position (dx, dy, dz) and a rotation about one axis (rotation vector = angle on that axis)
    cases = [
        (0.05, -0.15, 0.0, [1, 0, 0], math.degrees(0.05)),  # sigma_p 0.1, sigma_o 0.1
        (0.3, 0.0, -0.05, [0, 1, 0], -math.degrees(0.25)),  # sigma_p 0.2, sigma_o 0.1
    ]
    est, gt = _frames(cases)
    sp, so = np.array([0.1, 0.2]), np.array([0.1, 0.1])
    ep, er = robot.axis_errors(est, gt)
    np.testing.assert_allclose(ep, [[0.05, -0.15, 0], [0.3, 0, -0.05]], atol=1e-12)
    np.testing.assert_allclose(er, [[0.05, 0, 0], [0, -0.25, 0]], atol=1e-9)
    # |e| <= 1 sigma by hand: frame 0: x yes, y no, z yes, rx yes, ry yes, rz yes (5/6);
    # frame 1: x no, y yes, z yes, rx yes, ry no, rz yes (4/6)  -> 9/12
    # |e| <= 2 sigma: frame 0: all but none (y 0.15 <= 0.2) 6/6; frame 1: x 0.3 <= 0.4 yes, ry 0.25 > 0.2 no -> 5/6
    r = robot.robot_metrics(est, gt, robot.FrameUncertainty("pae_gap", np.array([0.0, 1.0]), sp, so))
    u = r.uncertainty
    assert u["calibrated"] and u["within_1sigma"] == pytest.approx(9 / 12)
    assert u["within_2sigma"] == pytest.approx(11 / 12)
    assert u["within_1sigma_axes"] == pytest.approx({"x": 0.5, "y": 0.5, "z": 1, "rx": 1, "ry": 0.5, "rz": 1})
    assert u["within_2sigma_axes"]["ry"] == pytest.approx(0.5)


def test_invalid_estimates_and_missing_scores():
    est, gt = _frames(CASES[:3])
    est[1, 3:] = np.nan  # invalid: wrong, not ok, outside every sigma
    r = robot.robot_metrics(est, gt, robot.FrameUncertainty("s", np.array([0.1, 0.2, 0.3]), np.ones(3), np.ones(3)))
    assert r.hint["within_0_5m_10deg"] == pytest.approx(1 / 3)
    assert r.uncertainty["within_1sigma"] == pytest.approx(12 / 18)
    r = robot.robot_metrics(est, gt, robot.FrameUncertainty("step_size", np.full(3, np.nan)))
    assert r.uncertainty["auroc"] is None and r.uncertainty["coverage_at_95_precision"] is None
    assert r.risk_coverage == [] and r.uncertainty["frames_scored"] == 0


# ------------------------------------------------------------------------------------------------ apr-eval
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Write a calibrated (step_size) iAPR bundle, an uncalibrated one, and 8 PNG frames with a label CSV."""
    d = tmp_path_factory.mktemp("robot")
    apr = random_ms_transformer(seed=21)
    iapr = random_iapr(seed=22, mstransformer=apr)
    cal = Calibration("step_size", (0.0, 0.5, 2.0), (0.2, 0.5, 2.0), (0.05, 0.2, 0.8))
    names = ["alpha", "beta", "gamma"]
    model = save_model(d / "cal.safetensors", apr, iapr, scene_names=names, uncertainty=cal)
    plain = save_model(d / "plain.safetensors", apr, iapr, scene_names=names)
    root = d / "data"
    rng = np.random.default_rng(3)
    loc = Localizer.from_files(model, options=LocalizerOptions(backend="torch", device="cpu"))
    rows = []
    for i in range(8):
        rel = f"alpha/seq-01/frame-{i:06d}.color.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / rel)
        # ground truth near the 2-iteration estimate for half of the frames (0.1 m off), far for the others (2 m)
        pose = loc.run_steps(load_rgb(root / rel), 2)[-1].pose.copy()
        pose[0] += 0.1 if i % 2 == 0 else 2.0
        rows.append(LabelRow("alpha", "test", "seq-01", rel, tuple(pose.tolist())))
    loc.close()
    return {"model": model, "plain": plain, "root": root, "labels": write_labels(root / "test.csv", rows)}


def _args(t, model, out, *extra):
    return ["--model", str(model), "--data", str(t["root"]), "--labels", str(t["labels"]), "--out", str(out),
            "--backend", "torch", "--device", "cpu", "--threads", "2", "--warmup", "0", "--quiet",
            "--iterations", "2", *extra]  # fmt: skip


def test_apr_eval_report_keys_match_an_independent_computation(tiny, tmp_path):
    out = tmp_path / "out"
    assert eval_main(_args(tiny, tiny["model"], out, "--scores", "all")) == 0
    report = json.loads((out / "report.json").read_text())
    loc = Localizer.from_files(tiny["model"], options=LocalizerOptions(backend="torch", device="cpu"))
    import csv

    with open(tiny["labels"], newline="") as f:
        rows = list(csv.DictReader(f))
    gt = np.array([[float(r[c]) for c in ("t1", "t2", "t3", "q1", "q2", "q3", "q4")] for r in rows])
    steps = [loc.run_steps(load_rgb(tiny["root"] / r["img_path"]), 2) for r in rows]
    loc.close()
    for k, m in enumerate(report["methods"]):
        est = np.stack([s[k].pose for s in steps])
        pos, rot = g.pose_errors(est, gt)
        good = (pos <= 0.5) & (rot <= 10)
        assert m["hint"]["within_0_5m_10deg"] == pytest.approx(good.mean())
        assert m["hint"]["within_1_5m"] == pytest.approx((pos <= 1.5).mean())
        assert m["mean_of_medians"]["position_m"] == pytest.approx(np.median(pos), abs=1e-5)
        u = m["uncertainty"]
        assert set(u) >= {"auroc", "coverage_at_95_precision", "within_1sigma", "within_2sigma"}
        scores = np.array([s[k].score for s in steps])
        if k == 0:  # step_size of the APR estimate alone is undefined
            assert u["auroc"] is None and u["coverage_at_95_precision"] is None
        elif 0 < good.sum() < len(good):
            assert u["auroc"] == pytest.approx(_brute_auroc(scores, ~good), abs=1e-9)
            ok = (pos <= 1.0) & (rot <= 15)
            published = [scores <= t for t in scores]  # every threshold: a prefix of the most confident frames
            best = max([p.mean() for p in published if ok[p].mean() >= 0.95] or [0.0])
            assert u["coverage_at_95_precision"] == pytest.approx(best)
        else:
            assert k < 2 and u["auroc"] is None  # both classes at 2 iterations (see the fixture)
        # within 1 sigma over the six axes, counted independently
        sp = np.array([s[k].sigma_position_m for s in steps])
        so = np.array([s[k].sigma_orientation_rad for s in steps])
        inside = 0
        for i in range(len(rows)):
            inside += int(np.sum(np.abs(est[i, :3] - gt[i, :3]) <= sp[i]))
            r = g.quat_multiply(est[i, 3:], g.quat_conjugate(gt[i, 3:]))
            r = r if r[0] >= 0 else -r
            angle = 2 * math.atan2(np.linalg.norm(r[1:]), r[0])
            rv = r[1:] / max(np.linalg.norm(r[1:]), 1e-300) * angle
            inside += int(np.sum(np.abs(rv) <= so[i] + 1e-12))
        assert u["within_1sigma"] == pytest.approx(inside / (6 * len(rows)), abs=1e-9)
        assert len(m["risk_coverage"]) == (0 if k == 0 else 10)
    cands = {c["score"]: c for c in report["uncertainty_candidates"]}
    assert set(cands) == {"scene_prob", "step_size", "apr_iapr_gap", "pae_gap"}
    for c in cands.values():
        assert c["cost_ms_per_frame"] >= 0 and [m["method"] for m in c["methods"]][0] == "MS-Transformer"
    assert (out / "plots" / "risk_coverage.png").read_bytes()[:8] == PNG_MAGIC
    table = (out / "table.txt").read_text()
    assert "Hint success and uncertainty" in table and "Risk–coverage" in table and "Uncertainty candidates" in table


def test_apr_eval_uncalibrated_says_not_calibrated(tiny, tmp_path, capsys):
    out = tmp_path / "plain"
    assert eval_main(_args(tiny, tiny["plain"], out, "--no-plots")) == 0
    report = json.loads((out / "report.json").read_text())
    for m in report["methods"]:
        assert m["uncertainty"]["within_1sigma"] is None and m["uncertainty"]["within_2sigma"] is None
        assert not m["uncertainty"]["calibrated"]
    assert report["methods"][2]["uncertainty"]["score"] == "step_size"
    assert "uncertainty_candidates" not in report
    assert "not calibrated" in (out / "table.txt").read_text()
    with pytest.raises(SystemExit) as e:
        eval_main(_args(tiny, tiny["plain"], out, "--scores", "scene_prob,bogus"))
    assert e.value.code == 2 and "--scores" in capsys.readouterr().err
