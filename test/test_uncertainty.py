"""Uncertainty scores, calibration and the metrics a robot needs, against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from apr_localizer.uncertainty import (
    Calibration,
    CalibrationError,
    auroc,
    coverage_at_precision,
    fit_calibration,
    risk_coverage,
    score_frame,
    within_sigma,
)


def _brute_auroc(s, wrong):
    pos, neg = s[wrong], s[~wrong]
    total = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return total / (len(pos) * len(neg))


def _brute_coverage(s, ok, precision):
    best = 0.0
    for t in sorted(set(s.tolist())):
        sel = s <= t
        if ok[sel].mean() >= precision:
            best = max(best, sel.mean())
    return best


@pytest.mark.parametrize("seed", range(5))
def test_auroc_and_coverage_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    s = np.round(rng.random(60), 1)  # many ties
    wrong = rng.random(60) < s  # higher score, more often wrong
    assert auroc(s, wrong) == pytest.approx(_brute_auroc(s, wrong))
    for p in (0.8, 0.95):
        assert coverage_at_precision(s, ~wrong, p) == pytest.approx(_brute_coverage(s, ~wrong, p))


def test_hand_made_metrics():
    s = np.array([0.1, 0.2, 0.3, 0.4])
    assert auroc(s, np.array([False, False, True, True])) == 1.0
    assert auroc(s, np.array([True, True, False, False])) == 0.0
    assert math.isnan(auroc(s, np.zeros(4, bool)))
    cov, risk = risk_coverage(s, np.array([True, True, False, True]))
    np.testing.assert_allclose(cov, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0, 0, 1 / 3, 1 / 4])
    assert coverage_at_precision(s, np.array([True, True, False, True]), 0.95) == 0.5
    assert within_sigma(np.array([[0.5, -1.5], [0.1, 0.2]]), np.array([1.0, 0.1]), 1.0) == 0.5
    assert within_sigma(np.array([[0.5, -1.5], [0.1, 0.2]]), np.array([1.0, 0.1]), 2.0) == 1.0


def test_fit_recovers_score_dependent_sigma():
    rng = np.random.default_rng(0)
    n = 20000
    s = rng.random(n)
    true_sp, true_so = 0.05 + 0.5 * s, 0.01 + 0.2 * s
    ep = np.linalg.norm(rng.normal(size=(n, 3)) * true_sp[:, None], axis=1)
    eo = np.linalg.norm(rng.normal(size=(n, 3)) * true_so[:, None], axis=1)
    cal = fit_calibration("step_size", s, ep, eo, bins=20)
    for q in (0.1, 0.5, 0.9):
        sp, so = cal.sigma(q)
        assert sp == pytest.approx(0.05 + 0.5 * q, rel=0.08)
        assert so == pytest.approx(0.01 + 0.2 * q, rel=0.08)
    assert all(b >= a for a, b in zip(cal.sigma_position_m, cal.sigma_position_m[1:]))
    # calibrated: about 68 % of per-axis errors within 1 sigma, 95 % within 2 sigma
    axes = rng.normal(size=(n, 3)) * true_sp[:, None]
    sig = np.array([cal.sigma(v)[0] for v in s])
    assert within_sigma(axes, sig, 1.0) == pytest.approx(0.683, abs=0.03)
    assert within_sigma(axes, sig, 2.0) == pytest.approx(0.954, abs=0.02)
    assert Calibration.from_dict(cal.to_dict()) == cal
    assert cal.sigma(math.nan) == (max(cal.sigma_position_m), max(cal.sigma_orientation_rad))


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"score": "nope", "knots": [0], "sigma_position_m": [1], "sigma_orientation_rad": [1]},
        {"score": "step_size", "knots": [1, 0], "sigma_position_m": [1, 1], "sigma_orientation_rad": [1, 1]},
        {"score": "step_size", "knots": [0], "sigma_position_m": [-1], "sigma_orientation_rad": [1]},
        {"score": "step_size", "knots": [0], "sigma_position_m": [float("inf")], "sigma_orientation_rad": [1]},
        {"score": "step_size", "knots": list(range(300)), "sigma_position_m": [1] * 300, "sigma_orientation_rad": [1]},
        "not a dict",
    ],
)
def test_malformed_calibration_is_one_clear_error(bad):
    with pytest.raises(CalibrationError):
        Calibration.from_dict(bad)  # type: ignore[arg-type]


def test_scores_from_steps():
    a = np.array([0, 0, 0, 1, 0, 0, 0.0])
    b = np.array([1, 0, 0, math.cos(0.05), math.sin(0.05), 0, 0])  # 1 m and 0.1 rad away
    assert score_frame("scene_prob", [a], 0.9) == pytest.approx(0.1)
    assert math.isnan(score_frame("step_size", [a], 0.9))
    assert score_frame("step_size", [a, a, b], 1.0, rot_weight=2.0) == pytest.approx(1.2)
    assert score_frame("apr_iapr_gap", [b, a, a], 1.0) == pytest.approx(1.1)
    with pytest.raises(CalibrationError):
        score_frame("tta", [a], 1.0)
