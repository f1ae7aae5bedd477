"""Per-frame uncertainty at run time: calibration + camera metadata in the bundle, scores and sigmas per Estimate."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from model_fixtures import random_iapr, random_ms_transformer

from apr_localizer import geometry
from apr_localizer.checkpoints import (
    METADATA_KEY,
    CheckpointError,
    load_model,
    save_model,
)
from apr_localizer.localizer import Localizer, LocalizerOptions
from apr_localizer.safetensors_io import read_safetensors, write_safetensors
from apr_localizer.uncertainty import Calibration, fit_calibration, score_frame

CAL = Calibration("step_size", (0.05, 0.2, 0.5), (0.1, 0.4, 1.5), (0.05, 0.2, 0.6), rot_weight=0.5, frames=40)
CAMERA = {"fx": 277.1, "fy": 277.1, "cx": 159.5, "cy": 119.5, "width": 320, "height": 240}


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    apr = random_ms_transformer(seed=41)
    iapr = random_iapr(seed=42, mstransformer=apr)
    path = tmp_path_factory.mktemp("cal") / "m.safetensors"
    return save_model(path, apr, iapr, scene_names=["a", "b", "c"], uncertainty=CAL, camera=CAMERA)


def test_calibration_and_camera_round_trip_also_through_fp16(calibrated, tmp_path):
    b = load_model(calibrated)
    assert b.uncertainty == CAL and b.camera == CAMERA
    half = save_model(
        tmp_path / "fp16.safetensors",
        b.apr,
        b.iapr,
        scene_names=b.scene_names,
        preprocess=b.preprocess,
        provenance=b.provenance,
        dtype=torch.float16,
        uncertainty=b.uncertainty,
        camera=b.camera,
    )
    b16 = load_model(half)
    assert b16.uncertainty == CAL and b16.camera == CAMERA
    plain = load_model(save_model(tmp_path / "plain.safetensors", random_ms_transformer(seed=3)))
    assert plain.uncertainty is None and plain.camera is None


def test_camera_in_provenance_is_still_read(tmp_path):
    path = save_model(tmp_path / "m.safetensors", random_ms_transformer(seed=3), provenance={"camera": CAMERA})
    assert load_model(path).camera == CAMERA
    broken = save_model(tmp_path / "b.safetensors", random_ms_transformer(seed=3), provenance={"camera": {"fx": "x"}})
    assert load_model(broken).camera is None  # informational in provenance: not checked, not fatal


def _rewrite(src, dst, key: str, value) -> None:
    tensors, meta = read_safetensors(src)
    doc = json.loads(meta[METADATA_KEY])
    doc[key] = value
    write_safetensors(dst, tensors, {METADATA_KEY: json.dumps(doc)})


GOOD = CAL.to_dict()
HOSTILE_UNCERTAINTY = {
    "not-an-object": [1, 2, 3],
    "string": "step_size",
    "unknown-score": {**GOOD, "score": "oracle"},
    "ansi-score": {**GOOD, "score": "\x1b[31m" * 1000},
    "unknown-key": {**GOOD, "__class__": "os.system"},
    "knots-string": {**GOOD, "knots": "0.1"},
    "knots-dict": {**GOOD, "knots": {"a": 1}},
    "knots-bools": {**GOOD, "knots": [True, False, True]},
    "knots-nested": {**GOOD, "knots": [[0.1], [0.2], [0.3]]},
    "nan": {**GOOD, "knots": [0.1, float("nan"), 0.3]},
    "infinite-sigma": {**GOOD, "sigma_position_m": [0.1, float("inf"), 1.0]},
    "huge-sigma": {**GOOD, "sigma_position_m": [0.1, 0.2, 1e300]},
    "negative-sigma": {**GOOD, "sigma_orientation_rad": [-0.1, 0.2, 0.3]},
    "decreasing-knots": {**GOOD, "knots": [0.5, 0.2, 0.1]},
    "length-mismatch": {**GOOD, "sigma_position_m": [0.1, 0.2]},
    "empty": {**GOOD, "knots": [], "sigma_position_m": [], "sigma_orientation_rad": []},
    "too-many-knots": {
        **GOOD,
        "knots": list(range(100_000)),
        "sigma_position_m": [1.0] * 100_000,
        "sigma_orientation_rad": [1.0] * 100_000,
    },
    "missing-key": {k: v for k, v in GOOD.items() if k != "sigma_orientation_rad"},
    "infinite-frames": {**GOOD, "frames": float("inf")},
    "negative-rot-weight": {**GOOD, "rot_weight": -1.0},
    "bool-frames": {**GOOD, "frames": True},
}


@pytest.mark.parametrize("value", list(HOSTILE_UNCERTAINTY.values()), ids=list(HOSTILE_UNCERTAINTY))
def test_hostile_uncertainty_metadata_is_refused_in_one_sentence(calibrated, tmp_path, value):
    bad = tmp_path / "bad.safetensors"
    _rewrite(calibrated, bad, "uncertainty", value)
    with pytest.raises(CheckpointError) as info:
        load_model(bad)
    msg = str(info.value)
    assert "uncertainty metadata" in msg and str(bad) in msg
    assert "\n" not in msg and "\x1b" not in msg and len(msg) < 400 + len(str(bad))
    with pytest.raises(CheckpointError):  # save_model validates the same way
        save_model(tmp_path / "x.safetensors", random_ms_transformer(seed=3), uncertainty=value)


@pytest.mark.parametrize(
    "camera",
    [[1, 2], {**CAMERA, "fx": -1.0}, {**CAMERA, "width": 1e12}, {**CAMERA, "cy": float("nan")}, {"fx": 1.0}],
    ids=["list", "negative", "huge", "nan", "incomplete"],
)
def test_malformed_camera_metadata_is_refused(calibrated, tmp_path, camera):
    bad = tmp_path / "bad.safetensors"
    _rewrite(calibrated, bad, "camera", camera)
    with pytest.raises(CheckpointError, match="camera metadata"):
        load_model(bad)


def test_every_step_carries_its_own_score_and_the_calibrated_sigmas(calibrated):
    loc = Localizer.from_files(calibrated, options=LocalizerOptions(backend="torch", iapr_iterations=3))
    rgb = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    steps = loc.run_steps(rgb)
    assert [e.iterations for e in steps] == [0, 1, 2, 3]
    assert math.isnan(steps[0].score) and steps[0].sigma_position_m == max(CAL.sigma_position_m)  # NaN: least trusted
    for k in (1, 2, 3):  # the size of step k (independent computation of the distance)
        a, b = steps[k - 1].pose, steps[k].pose
        want = np.linalg.norm(b[:3] - a[:3]) + 0.5 * math.radians(geometry.rotation_error_deg(a[3:], b[3:]))
        assert steps[k].score == pytest.approx(want, rel=1e-9)
        assert (steps[k].sigma_position_m, steps[k].sigma_orientation_rad) == CAL.sigma(steps[k].score)
        assert steps[k].score_name == "step_size"
    assert loc.localize(rgb).score == pytest.approx(steps[-1].score)


def test_uncalibrated_models_report_step_size_without_sigmas(tmp_path):
    apr = random_ms_transformer(seed=41)
    path = save_model(tmp_path / "m.safetensors", apr, random_iapr(seed=42, mstransformer=apr))
    est = Localizer.from_files(path, options=LocalizerOptions(backend="torch", iapr_iterations=2)).localize(
        np.zeros((120, 160, 3), np.uint8)
    )
    assert est.score_name == "step_size" and math.isfinite(est.score)
    assert est.sigma_position_m is None and est.sigma_orientation_rad is None


def test_pae_gap_score_matches_the_pae_run_by_hand(tmp_path):
    apr = random_ms_transformer(seed=41)
    iapr = random_iapr(seed=42, mstransformer=apr)
    cal = Calibration("pae_gap", (0.1, 1.0), (0.2, 5.0), (0.1, 1.0))
    path = save_model(tmp_path / "m.safetensors", apr, iapr, uncertainty=cal)
    loc = Localizer.from_files(path, options=LocalizerOptions(backend="torch", iapr_iterations=1))
    rgb = np.random.default_rng(2).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    steps = loc.run_steps(rgb)
    b = load_model(path)
    with torch.inference_mode():
        out = b.apr(loc.preprocess(rgb))
        ref = b.iapr.pae(out["pose"], out["scene"].reshape(-1, 1).float())
    gt = (ref["latent_t"] - out["latent_t"]).norm() / out["latent_t"].norm()
    gr = (ref["latent_rot"] - out["latent_rot"]).norm() / out["latent_rot"].norm()
    want = float(gt + gr) / 2
    for est in steps:  # the APR estimate's consistency: the same at every step
        assert est.score_name == "pae_gap" and est.score == pytest.approx(want, rel=1e-3)
        assert est.sigma_position_m == pytest.approx(cal.sigma(est.score)[0])


def test_ceiling_knot_extends_the_fit_beyond_the_validation_scores():
    rng = np.random.default_rng(0)
    s = rng.random(40)
    err = 0.1 + s
    cal = fit_calibration("scene_prob", s, err, err * 0.1, bins=4, ceiling=(5.0, 10.0, 3.0))
    assert cal.knots[-1] == 5.0 and cal.sigma(5.0) == (10.0, 3.0)
    assert cal.sigma(2.0)[0] > cal.sigma_position_m[-2]  # beyond the fitted range: grows towards the ceiling
    no_ceiling = fit_calibration("scene_prob", s, err, err * 0.1, bins=4)
    assert len(no_ceiling.knots) == 4 and no_ceiling.sigma(2.0) == no_ceiling.sigma(no_ceiling.knots[-1])
    assert score_frame("pae_gap", [np.zeros(7)], 1.0, pae=0.25) == 0.25


def test_all_scores_gives_every_candidate_per_step(calibrated):
    loc = Localizer.from_files(calibrated, options=LocalizerOptions(backend="torch", iapr_iterations=2))
    rgb = np.random.default_rng(3).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    steps = loc.run_steps(rgb, all_scores=True)
    assert all(set(e.scores) == {"scene_prob", "step_size", "apr_iapr_gap", "pae_gap"} for e in steps)
    assert steps[-1].scores["step_size"] == pytest.approx(steps[-1].score)  # the calibrated score is step_size
    assert steps[0].scores["pae_gap"] == steps[-1].scores["pae_gap"] and math.isfinite(steps[0].scores["pae_gap"])
    assert steps[-1].scores["scene_prob"] == pytest.approx(1.0 - steps[-1].confidence)
    assert loc.run_steps(rgb)[-1].scores == {} and "uncertainty" in steps[-1].timings_ms
