"""The robot training recipe (issue 11 item 1).

Sign-invariant loss in the trainers, augmentation strengths, AdamW/warm-up/cosine/time budget, the validation split
by sequence and the APR-error-matched iAPR pairs.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from test_pipeline import write_tiny_dataset

from apr_localizer.geometry import pose_errors, relative_pose
from apr_training.datasets.labels import LabelError, read_labels, split_by_sequence
from apr_training.datasets.pairs import apr_error_vectors, error_matched_pairs
from apr_training.datasets.transforms import TrainTransform
from apr_training.train.config import ConfigError, TrainConfig, apply_overrides, load_config
from apr_training.train.helpers import train_transform
from apr_training.train.task import Context, Paths

TINY = ["data.workers=0", "data.resize=36", "data.crop=32", "data.cache_in_ram=false", "model.t_encoder_layers=1",
        "model.t_decoder_layers=1", "model.rot_encoder_layers=1", "model.rot_decoder_layers=1"]  # fmt: skip


# --------------------------------------------------------------------------------------------- loss
SIGN_CASES = [("robot", True), ("7scenes_ms_transformer", False), ("cambridge_ms_transformer", False),
              ("synthetic", False)]  # fmt: skip


@pytest.mark.parametrize(("config", "invariant"), SIGN_CASES)
def test_trainer_loss_sign_invariance_follows_the_recipe(tmp_path, config, invariant):
    """Flipping the label quaternion's sign changes the trainer's loss only in the spec-faithful recipes.

    The robot recipe's loss is invariant; the official recipes keep the spec's loss unchanged.
    """
    from apr_training.train.ms_transformer import MSTransformerTask

    csv = write_tiny_dataset(tmp_path / "d", seqs=2, frames=2)
    cfg = apply_overrides(load_config(config, "ms-transformer"), TINY)
    assert cfg.loss.sign_invariant is invariant
    task = MSTransformerTask(Context("ms-transformer", cfg, Paths(out=tmp_path / "o", labels=csv, data=tmp_path / "d")))
    task.setup()
    task.module.eval()
    items = [task.dataset[i] for i in range(4)]
    batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in ("image", "pose", "scene")}
    flipped = dict(batch, pose=torch.cat([batch["pose"][:, :3], -batch["pose"][:, 3:]], dim=1))
    with torch.no_grad():
        a, b = task.module(batch), task.module(flipped)
    if invariant:
        assert torch.allclose(a["loss"], b["loss"]) and torch.allclose(a["l_q"], b["l_q"])
    else:
        assert not torch.allclose(a["l_q"], b["l_q"])
    assert task.criterion.sign_invariant is invariant


def test_every_pose_trainer_builds_its_loss_with_the_flag():
    import inspect

    from apr_training.train import iapr, ms_transformer, pae, posenet

    for module in (ms_transformer, pae, iapr, posenet):
        src = inspect.getsource(module)
        built = len(re.findall(r"CameraPoseLoss\(\s*loss\.learnable", src))
        assert built >= 1 and built == src.count("sign_invariant=loss.sign_invariant"), module.__name__


# --------------------------------------------------------------------------------------------- config / transforms
def test_robot_recipe_loads_for_every_trainer_and_differs_from_the_spec_where_documented():
    for trainer in ("ms-transformer", "pae", "iapr"):
        cfg = load_config("robot", trainer)
        assert cfg.loss.sign_invariant and cfg.optim.optimizer == "adamw" and cfg.optim.schedule == "cosine"
        assert cfg.data.jitter_hue <= 0.05 and cfg.data.val_fraction > 0 and cfg.data.pair_mode == "apr_errors"
    spec = load_config(None, "ms-transformer")
    assert (spec.optim.optimizer, spec.optim.schedule, spec.optim.warmup_steps) == ("adam", "step", 0)
    assert (spec.data.jitter_brightness, spec.data.jitter_hue, spec.data.crop_scale_min) == (0.5, 0.2, 1.0)
    with pytest.raises(ConfigError, match="data.jitter_hue"):
        apply_overrides(spec, ["data.jitter_hue=0.7"])
    with pytest.raises(ConfigError, match="optim.optimizer"):
        apply_overrides(spec, ["optim.optimizer=sgd"])


def test_augmentation_strengths_reach_the_transform():
    cfg = apply_overrides(TrainConfig(), ["data.jitter_hue=0.03", "data.jitter_brightness=0.1", "data.resize=40",
                                          "data.crop=32", "data.crop_scale_min=0.5"])  # fmt: skip
    t = train_transform(cfg)
    assert isinstance(t, TrainTransform)
    jitter = [op for op in t.pipeline.transforms if type(op).__name__ == "ColorJitter"][0]
    assert jitter.hue == pytest.approx((-0.03, 0.03)) and jitter.brightness == pytest.approx((0.9, 1.1))
    crop = [op for op in t.pipeline.transforms if type(op).__name__ == "RandomResizedCrop"][0]
    assert crop.scale == pytest.approx((0.5 * 32 / 40, 32 / 40))
    img = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    assert t(img).shape == (3, 32, 32)
    spec = train_transform(TrainConfig())
    assert [type(op).__name__ for op in spec.pipeline.transforms][:2] == ["Resize", "RandomCrop"]


# --------------------------------------------------------------------------------------------- optimiser / schedule
def _trainer(tmp_path, overrides):
    from apr_training.train.loop import Trainer
    from apr_training.train.ms_transformer import MSTransformerTask

    csv = write_tiny_dataset(tmp_path / "d", seqs=2, frames=2)
    cfg = apply_overrides(load_config("robot", "ms-transformer"), [*TINY, "data.batch_size=4", "run.progress=false",
                                                                   "data.val_fraction=0.0", *overrides])  # fmt: skip
    task = MSTransformerTask(Context("ms-transformer", cfg, Paths(out=tmp_path / "o", labels=csv, data=tmp_path / "d")))
    (tmp_path / "o").mkdir()
    task.setup()
    return Trainer(task)


def test_warmup_then_cosine_to_the_floor(tmp_path):
    tr = _trainer(tmp_path, ["optim.warmup_steps=10", "optim.min_lr_ratio=0.1"])
    tr._build(None)
    assert isinstance(tr.opt, torch.optim.AdamW)
    tr.p.schedule_steps = 110
    f = [tr._lr_factor(s) for s in range(0, 111)]
    assert f[0] == pytest.approx(0.01) and f[10] == pytest.approx(1.0)
    assert all(b >= a for a, b in zip(f[:10], f[1:11]))  # warm-up rises
    assert all(b <= a + 1e-12 for a, b in zip(f[10:], f[11:]))  # cosine falls
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5) and f[110] == pytest.approx(0.1)


def test_time_budget_stops_training_and_is_reported(tmp_path):
    tr = _trainer(tmp_path, ["run.time_budget_s=0.01", "optim.n_epochs=50"])
    result = tr.run()
    assert result.stopped == "time_budget" and result.epochs == 1
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["stopped"] == "time_budget"


# --------------------------------------------------------------------------------------------- validation split
def test_split_by_sequence_holds_out_whole_sequences(tmp_path):
    table = read_labels(write_tiny_dataset(tmp_path, seqs=5, frames=3), dataset_root=tmp_path)
    train, val = split_by_sequence(table, val_fraction=0.2, seed=3)
    held = set(zip(val.scene, val.seq))
    assert held and not held & set(zip(train.scene, train.seq))
    assert len(train) + len(val) == len(table) and {s for s, _ in held} == {"alpha", "beta"}  # one per scene
    assert train.scenes == val.scenes == table.scenes
    _, named = split_by_sequence(table, val_sequences=["seq-02", "beta/seq-04"])
    assert set(zip(named.scene, named.seq)) == {("alpha", "seq-02"), ("beta", "seq-02"), ("beta", "seq-04")}
    with pytest.raises(LabelError, match="seq-99"):
        split_by_sequence(table, val_sequences=["seq-99"])
    one = read_labels(write_tiny_dataset(tmp_path / "one", seqs=1, frames=3), dataset_root=tmp_path / "one")
    with pytest.raises(LabelError, match="no sequence to hold out"):
        split_by_sequence(one, val_fraction=0.5)


# --------------------------------------------------------------------------------------------- iAPR pairs
def test_apr_error_vectors_match_the_pose_error_definition():
    rng = np.random.default_rng(5)
    gt = np.concatenate([rng.normal(size=(20, 3)), rng.normal(size=(20, 4))], axis=1)
    gt[:, 3:] /= np.linalg.norm(gt[:, 3:], axis=1, keepdims=True)
    est = gt + rng.normal(0, 0.3, gt.shape)
    off, rv = apr_error_vectors(est, gt)
    dt, dr = pose_errors(est, gt)
    np.testing.assert_allclose(np.linalg.norm(off, axis=1), dt, atol=1e-12)
    np.testing.assert_allclose(np.degrees(np.linalg.norm(rv, axis=1)), dr, atol=1e-6)


def test_error_matched_pairs_draw_from_the_measured_errors(tmp_path):
    table = read_labels(write_tiny_dataset(tmp_path, seqs=2, frames=10), dataset_root=tmp_path)
    # measured errors: a yaw-only rotation (about the camera's y axis) with a horizontal offset, and a bigger one
    off = np.array([[0.2, 0.0, 0.0], [0.0, 1.0, 0.0]])
    rv = np.radians([[0.0, 10.0, 0.0], [0.0, -40.0, 0.0]])
    pairs = error_matched_pairs(table, off, rv, pairs_per_frame=200, scale=1.5, seed=1)
    assert len(pairs) == 200 * len(table) and pairs.img_path_a == pairs.img_path_b
    np.testing.assert_allclose(relative_pose(pairs.pose_a, pairs.pose_b), pairs.rel_ab, atol=1e-9)
    got_off, got_rv = apr_error_vectors(pairs.pose_b, pairs.pose_a)
    # every perturbation is +-u times one measured error vector (offset and rotation from the same measurement)
    u = got_off @ off.T / np.sum(off**2, axis=1)  # projection coefficient on each measured offset
    j = np.argmax(np.abs(u), axis=1)
    f = u[np.arange(len(u)), j]
    np.testing.assert_allclose(got_off, f[:, None] * off[j], atol=1e-9)
    np.testing.assert_allclose(got_rv, f[:, None] * rv[j], atol=1e-6)
    assert np.abs(f).max() <= 1.5 and abs(np.abs(f).mean() - 0.75) < 0.03 and abs(np.mean(f > 0) - 0.5) < 0.03
    assert np.all(np.abs(got_off[:, 2]) < 1e-12) and np.allclose(got_rv[:, [0, 2]], 0.0, atol=1e-9)
    assert math.isclose(np.linalg.norm(pairs.pose_b[:, 3:], axis=1).mean(), 1.0, rel_tol=1e-9)


# --------------------------------------------------------------------------------------------- pipeline pieces
def test_pipeline_split_merges_csvs_from_several_folders(tmp_path):
    """Two extracted runs in their own folders: one root, image paths rewritten, whole sequences held out."""
    from apr_training.train.pipeline import PipelineOptions, _root, _split

    a = write_tiny_dataset(tmp_path / "space" / "run1", scenes=("lab",), seqs=2, frames=3, seed=1)
    b = write_tiny_dataset(tmp_path / "space" / "run2", scenes=("lab",), seqs=2, frames=3, seed=2)
    b.write_text(b.read_text().replace("seq-01", "seq-11").replace("seq-02", "seq-12"))
    for f in (tmp_path / "space" / "run2" / "lab").iterdir():
        f.rename(f.with_name(f.name.replace("seq-0", "seq-1")))
    opts = PipelineOptions(data=None, labels=[a, b], out=tmp_path / "out", overrides=["data.val_fraction=0.25"])
    root = _root(opts)
    assert root == (tmp_path / "space").resolve()
    opts.out.mkdir()
    _split(opts, root)
    merged = read_labels(opts.out / "labels.csv", dataset_root=root)
    assert len(merged) == 12 and all((root / p).is_file() for p in merged.img_path)
    train = read_labels(opts.out / "split_train.csv", dataset_root=root)
    val = read_labels(opts.out / "split_val.csv", dataset_root=root)
    assert len(set(val.seq)) == 1 and not set(val.seq) & set(train.seq) and len(train) + len(val) == 12


def test_calibration_picks_the_score_that_ranks_the_errors():
    from apr_localizer.uncertainty import auroc
    from apr_training.train.pipeline import _summary, choose_and_fit

    rng = np.random.default_rng(0)
    n = 200
    gt = np.tile([0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0], (n, 1))
    err = rng.exponential(0.4, n)
    final = gt.copy()
    final[:, 0] = err
    steps = np.stack([final + [0.1, 0, 0, 0, 0, 0, 0], final], axis=1)
    scores = {"scene_prob": rng.random(n), "step_size": err + rng.normal(0, 0.05, n), "apr_iapr_gap": np.full(n, 0.1)}
    meas = {"gt": gt, "steps": steps, "scores": scores, "pae_ms": 0.0}
    cal, table = choose_and_fit(meas, gt[:, :3] + rng.normal(0, 1, (n, 3)))
    assert cal.score == "step_size"
    wrong = err > 0.5
    assert {r["score"]: r["auroc"] for r in table}["step_size"] == pytest.approx(auroc(scores["step_size"], wrong))
    report = _summary(meas, cal)
    assert report["uncertainty"]["auroc"] > 0.9 and set(report["accuracy"]) == {"ms_transformer", "iapr_1"}
    assert report["accuracy"]["iapr_1"]["position_median_m"] == pytest.approx(np.median(err))
