"""apr-train: every trainer on a tiny generated dataset (real PNG files, label CSVs, real models, real files).

Models are tiny (transformers 1+1, 32x32 inputs) so each run takes seconds on 2 cores. The overfit and DDP tests are
marked slow; the CUDA/AMP test is marked gpu.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from apr_training.cli.train import main
from apr_training.train.config import ConfigError, TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]
SCENES = ("alpha", "beta")
TINY = """\
data: {batch_size: 4, workers: 0, resize: 36, crop: 32, no_augment: true, pair_max_distance_m: 10.0,
       pair_max_angle_deg: 180.0, pairs_per_frame: 3}
model: {t_encoder_layers: 1, t_decoder_layers: 1, rot_encoder_layers: 1, rot_decoder_layers: 1}
optim: {lr: 1.0e-3, n_epochs: 4, lr_scheduler_step_size: 100}
iapr: {rpr_dim_feedforward: 256}
posenet: {backbone: efficientnet_b0}
decoder: {hidden_dims: [64, 128], img_size: 16, demo_frames: 4}
run: {n_freq_print: 1, progress: false}
"""


# --------------------------------------------------------------------------------------------- fixtures
def _write_dataset(root: Path, frames_per_scene: int = 4, seed: int = 0) -> Path:
    """PNG frames (64x48, distinct coloured blocks) of two scenes and train.csv; return the CSV path."""
    rng = np.random.default_rng(seed)
    rows = ["scene,split,seq,img_path,t1,t2,t3,q1,q2,q3,q4"]
    for scene in SCENES:
        (root / scene).mkdir(parents=True, exist_ok=True)
        for i in range(frames_per_scene):
            img = np.empty((48, 64, 3), np.uint8)
            img[:] = rng.integers(0, 255, 3)
            for _ in range(6):
                x, y = rng.integers(0, 56), rng.integers(0, 40)
                img[y : y + 10, x : x + 10] = rng.integers(0, 255, 3)
            rel = f"{scene}/frame-{i:03d}.png"
            cv2.imwrite(str(root / rel), img)
            t = rng.uniform(-2, 2, 3)
            q = rng.normal(size=4)
            q = q / np.linalg.norm(q) * np.sign(q[0])
            rows.append(",".join([scene, "train", "seq-01", rel] + [repr(float(v)) for v in [*t, *q]]))
    csv = root / "train.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_data")
    _write_dataset(root)
    (root / "tiny.yaml").write_text(TINY)
    return root


def _run(trainer: str, data: Path, out: Path, *extra: str, labels: str = "train.csv", config: str | None = None):
    argv = [trainer, "--data", str(data), "--labels", str(data / labels), "--out", str(out),
            "--config", config or str(data / "tiny.yaml"), "--log-level", "WARNING", *extra]  # fmt: skip
    return main(argv)


def _epochs(out: Path) -> list[dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["type"] == "epoch"]


def _assert_loss_drops(out: Path, key: str = "train_loss", factor: float = 1.0) -> None:
    ep = _epochs(out)
    assert len(ep) >= 2
    first, last = ep[0][key], ep[-1][key]
    assert last < first * factor, f"{key} did not drop: {[round(e[key], 4) for e in ep]}"


@pytest.fixture(scope="module")
def ms_model(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ms")
    assert _run("ms-transformer", data, out, "--export-official", "--val-labels", str(data / "train.csv")) == 0
    return out


@pytest.fixture(scope="module")
def pae_model(data, ms_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pae")
    rc = _run("pae", data, out, "--teacher", str(ms_model / "last.safetensors"), "--export-official",
              "--epochs", "40", "--batch-size", "8", "--set", "optim.lr=2e-3", "--set", "optim.weight_decay=0",
              "--set", "run.save_every_epochs=100", "--set", "run.n_freq_print=10")  # fmt: skip
    assert rc == 0
    return out


# --------------------------------------------------------------------------------------------- configs
def test_every_shipped_config_loads_for_its_trainers():
    files = sorted((REPO / "config" / "training").glob("*.yaml"))
    names = {f.name for f in files}
    required = {"7scenes_ms_transformer.yaml", "cambridge_ms_transformer.yaml", "cambridge_finetune.yaml",
                "7scenes_pae.yaml", "7scenes_iapr.yaml", "posenet.yaml", "decoder.yaml", "synthetic.yaml"}  # fmt: skip
    assert required <= names
    for f in files:
        for trainer in ("ms-transformer", "pae", "iapr", "posenet", "decoder"):
            assert isinstance(load_config(f, trainer), TrainConfig)
    ms7 = load_config("7scenes_ms_transformer.yaml", "ms-transformer")
    assert (ms7.model.rot_encoder_layers, ms7.model.t_encoder_layers, ms7.model.nheads) == (4, 6, 8)
    assert (ms7.loss.s_x, ms7.loss.s_q, ms7.optim.eps, ms7.optim.n_epochs) == (0.0, -3.0, 1e-10, 30)
    cam = load_config("cambridge_ms_transformer", "ms-transformer")
    assert cam.data.equalize_scenes and cam.data.no_augment and (cam.loss.s_x, cam.loss.s_q) == (-3.0, -6.5)
    ft = load_config("cambridge_finetune.yaml", "ms-transformer")
    assert ft.model.freeze and not ft.loss.learnable and (ft.loss.s_x, ft.loss.s_q) == (1.0, 0.0)
    syn = load_config("synthetic.yaml", "iapr")
    assert syn.iapr.freeze_encoder and syn.model.t_encoder_layers == 2
    assert load_config("synthetic.yaml", "pae").data.no_augment  # per_trainer override
    assert not load_config("synthetic.yaml", "ms-transformer").data.no_augment
    dec = load_config(None, "decoder")
    assert (dec.optim.lr, dec.optim.weight_decay, dec.decoder.img_size) == (1e-2, 0.0, 64)


def test_bad_config_key_names_key_and_file(tmp_path, data, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: 1.0e-3, n_epoch: 3}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'optim\.n_epoch'"):
        load_config(bad, "ms-transformer")
    assert _run("ms-transformer", data, tmp_path / "o", config=str(bad)) == 1
    err = capsys.readouterr().err
    assert "optim.n_epoch" in err and str(bad) in err and err.count("\n") == 1
    (tmp_path / "sec.yaml").write_text("optimiser: {lr: 1}\n")
    with pytest.raises(ConfigError, match=r"sec\.yaml.*'optimiser'"):
        load_config(tmp_path / "sec.yaml", "pae")
    (tmp_path / "typ.yaml").write_text("data: {batch_size: many}\n")
    with pytest.raises(ConfigError, match=r"typ\.yaml: data\.batch_size is 'many'; expected an integer"):
        load_config(tmp_path / "typ.yaml", "pae")
    assert _run("ms-transformer", data, tmp_path / "o2", "--set", "optim.lrr=1") == 1
    assert "optim.lrr" in capsys.readouterr().err


OFFICIAL_FLAT = {  # the layout of 7scenes_iapr_config.json (flat, no "general" block), tiny depths
    "n_freq_print": 1, "n_freq_checkpoint": 10, "n_workers": 0, "device_id": "cuda:0", "batch_size": 4,
    "equalize_scenes": False, "num_scenes": 2, "learnable": True, "s_x": 0.0, "s_q": -3.0, "lr": 1e-4, "norm": 2,
    "weight_decay": 1e-4, "eps": 1e-10, "lr_scheduler_gamma": 0.1, "lr_scheduler_step_size": 10, "n_epochs": 30,
    "num_t_encoder_layers": 1, "num_t_decoder_layers": 1, "num_rot_encoder_layers": 1, "num_rot_decoder_layers": 1,
    "dim_feedforward": 256, "hidden_dim": 256, "dropout": 0.1, "nheads": 4,
    "reduction": ["reduction_4", "reduction_3"], "freeze": False, "freeze_exclude_phrase": "regressor_head_rot",
    "shallow_mlp": False, "apply_positional_encoding": True, "rpr_num_heads": 4, "rpr_dim_feedforward": 512,
    "rpr_dropout": 0.1, "rpr_activation": "gelu", "rpr_num_encoder_layers": 2, "num_iterations": 3,
}  # fmt: skip


def test_official_json_configs_are_mapped(tmp_path, data):
    flat = tmp_path / "7scenes_iapr_config.json"
    flat.write_text(json.dumps(OFFICIAL_FLAT))
    notes: list[str] = []
    cfg = load_config(flat, "iapr", notes)
    assert cfg.model.nheads == 8  # "nheads": 4 is dead upstream
    assert any("'nheads'" in n for n in notes)
    assert (cfg.model.t_encoder_layers, cfg.model.rot_decoder_layers, cfg.model.num_scenes) == (1, 1, 2)
    assert (cfg.iapr.rpr_dim_feedforward, cfg.iapr.num_iterations, cfg.data.workers) == (512, 3, 0)
    assert cfg.model.freeze_exclude_phrase == ["regressor_head_rot"]
    assert (cfg.optim.lr, cfg.optim.eps, cfg.loss.s_q) == (1e-4, 1e-10, -3.0)
    nested = tmp_path / "CambridgeLandmarks_config.json"
    general = {k: OFFICIAL_FLAT[k] for k in ("n_freq_print", "n_freq_checkpoint", "n_workers", "device_id")}
    ems = {k: v for k, v in OFFICIAL_FLAT.items() if k not in general and not k.startswith("rpr_")}
    ems.update(equalize_scenes=True, s_x=-3.0, s_q=-6.5, n_epochs=600, lr_scheduler_step_size=200)
    posenet = {"batch_size": 32, "lr": 1e-3, "lr_scheduler_step_size": 100, "lr_scheduler_gamma": 0.5,
               "n_epochs": 300, "backbone_type": "mobilenet", "hidden_dim": 256, "num_neighbors": 3}  # fmt: skip
    nested.write_text(json.dumps({"general": general, "ems-transposenet": ems, "posenet": posenet}))
    cfg = load_config(nested, "ms-transformer")
    assert cfg.data.equalize_scenes and (cfg.loss.s_x, cfg.optim.n_epochs) == (-3.0, 600)
    pn = load_config(nested, "posenet")
    assert (pn.posenet.backbone, pn.data.batch_size, pn.optim.lr_scheduler_gamma) == ("mobilenet_v3_large", 32, 0.5)
    bad = dict(OFFICIAL_FLAT, learning_rate=1)
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"bad\.json: unknown key 'learning_rate'"):
        load_config(tmp_path / "bad.json", "ms-transformer")
    (tmp_path / "red.json").write_text(json.dumps(dict(OFFICIAL_FLAT, reduction=["reduction_5", "reduction_3"])))
    with pytest.raises(ConfigError, match="reduction"):
        load_config(tmp_path / "red.json", "ms-transformer")
    out = tmp_path / "run"
    rc = _run("ms-transformer", data, out, "--max-steps", "1", "--device", "cpu", "--set", "data.crop=32",
              "--set", "data.resize=36", config=str(flat))  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["stopped"] == "max_steps"


def test_help_lists_trainers(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("ms-transformer", "pae", "iapr", "posenet", "decoder", "--resume", "--max-steps", "--export-official"):
        assert word in text


# --------------------------------------------------------------------------------------------- trainers
def test_ms_transformer_trains_and_writes_its_files(data, ms_model):
    from apr_localizer.checkpoints import load_model, load_official_checkpoint
    from apr_localizer.models import MSTransformer

    _assert_loss_drops(ms_model)
    for name in ("best.safetensors", "last.safetensors", "last_state.pt", "metrics.jsonl", "summary.json",
                 "config.yaml", "model_official.pth"):  # fmt: skip
        assert (ms_model / name).is_file(), name
    bundle = load_model(ms_model / "last.safetensors")
    assert bundle.scene_names == list(SCENES)
    assert bundle.preprocess["crop"] == 32 and bundle.apr.config.t_encoder_layers == 1
    assert bundle.provenance["trainer"] == "ms-transformer"
    assert isinstance(load_official_checkpoint(ms_model / "model_official.pth"), MSTransformer)
    lines = [json.loads(x) for x in (ms_model / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["type"] == "step"]
    assert len(steps) == 8 and all(x["images_per_s"] > 0 and "lr" in x and "scene_nll" in x for x in steps)
    epochs = _epochs(ms_model)
    assert len(epochs) == 4 and "val_position_median" in epochs[-1] and "val_scene_accuracy" in epochs[-1]
    summary = json.loads((ms_model / "summary.json").read_text())
    assert summary["stopped"] == "completed" and summary["steps"] == 8 and summary["images_per_s"] > 0
    state = torch.load(ms_model / "last_state.pt", weights_only=True)
    assert state["epoch"] == 4 and state["step"] == 8 and state["scene_names"] == list(SCENES)


def test_pae_reproduces_teacher_latents(data, ms_model, pae_model):
    from apr_localizer.checkpoints import load_model, load_official_checkpoint
    from apr_localizer.models import PAEConfig, PoseAutoEncoder, build_pae
    from apr_localizer.preprocess import EvalTransform, PreprocessConfig
    from apr_training.datasets import read_labels

    bundle = load_model(pae_model / "last.safetensors")
    assert bundle.pae is not None and bundle.scene_names == list(SCENES)
    teacher = load_model(ms_model / "last.safetensors").apr
    for a, b in zip(bundle.apr.state_dict().values(), teacher.state_dict().values()):
        assert torch.equal(a, b)  # the teacher is frozen
    labels = read_labels(data / "train.csv")
    tf = EvalTransform(PreprocessConfig(resize=36, crop=32))
    images = torch.stack([tf(cv2.cvtColor(cv2.imread(str(data / p)), cv2.COLOR_BGR2RGB)) for p in labels.img_path])
    with torch.no_grad():
        t = teacher(images)
        torch.manual_seed(0)
        fresh = build_pae(PAEConfig())

        def mse(pae):
            lat = pae(t["pose"], t["scene"])
            err_t = ((lat["latent_t"] - t["latent_t"]) ** 2).mean()
            return float(err_t + ((lat["latent_rot"] - t["latent_rot"]) ** 2).mean())

        before, after = mse(fresh), mse(bundle.pae)
    assert after < before / 10, (before, after)
    ep = _epochs(pae_model)
    assert ep[-1]["train_mse_t"] < ep[0]["train_mse_t"] / 10
    assert isinstance(load_official_checkpoint(pae_model / "pae_official.pth"), PoseAutoEncoder)


def test_pae_with_gt_inputs_and_upstream_pose_term(data, ms_model, tmp_path):
    out = tmp_path / "pae_gt"
    rc = _run("pae", data, out, "--teacher", str(ms_model / "last.safetensors"), "--epochs", "3",
              "--set", "pae.student_input=gt", "--set", "pae.cache_teacher=false")  # fmt: skip
    assert rc == 0
    _assert_loss_drops(out, "train_mse_t")
    # pose term through the frozen heads: s_x/s_q train, the PAE gets no gradient from it (model_spec.md §10.11)
    assert _epochs(out)[-1]["train_s_x"] != 0.0


def test_iapr_shared_frozen_encoder(data, ms_model, pae_model, tmp_path):
    from apr_localizer.checkpoints import load_model
    from apr_localizer.models import localize_apr_iapr
    from apr_training.datasets import read_pairs

    out = tmp_path / "iapr"
    rc = _run("iapr", data, out, "--teacher", str(ms_model / "last.safetensors"), "--pae",
              str(pae_model / "last.safetensors"), "--set", "iapr.freeze_encoder=true", "--epochs", "5",
              "--val-labels", str(data / "train.csv"))  # fmt: skip
    assert rc == 0
    pairs = read_pairs(out / "pairs.csv", dataset_root=data)
    assert len(pairs) > 0 and set(pairs.scene_a) <= set(SCENES)
    _assert_loss_drops(out)
    bundle = load_model(out / "best.safetensors")
    assert bundle.shares_encoder and bundle.pae is not None
    teacher = load_model(ms_model / "last.safetensors").apr
    for a, b in zip(bundle.apr.state_dict().values(), teacher.state_dict().values()):
        assert torch.equal(a, b)
    res = localize_apr_iapr(bundle.apr, bundle.iapr, torch.randn(2, 3, 32, 32))
    assert res["poses"].shape == (3, 2, 7)
    assert "val_apr_position_median" in _epochs(out)[-1]


def test_iapr_full_training_with_given_pairs(data, ms_model, pae_model, tmp_path):
    from apr_localizer.checkpoints import load_model, load_official_checkpoint
    from apr_localizer.models import IAPR
    from apr_training.datasets import generate_pairs, read_labels, write_pairs

    pairs_csv = write_pairs(tmp_path / "pairs.csv", generate_pairs(read_labels(data / "train.csv"), 10.0, 180.0,
                                                                  pairs_per_frame=2, split=None))  # fmt: skip
    out = tmp_path / "iapr_full"
    rc = _run("iapr", data, out, "--teacher", str(ms_model / "last.safetensors"), "--pae",
              str(pae_model / "last.safetensors"), "--pairs", str(pairs_csv), "--epochs", "2",
              "--export-official")  # fmt: skip
    assert rc == 0 and not (out / "pairs.csv").exists()
    bundle = load_model(out / "last.safetensors")
    assert not bundle.shares_encoder  # upstream: the iAPR trains its own copy of the MS-Transformer
    assert isinstance(load_official_checkpoint(out / "iapr_official.pth"), IAPR)


def test_posenet_trains_saves_and_loads(data, tmp_path, capsys):
    from apr_training.train.posenet import PoseNet, load_posenet

    out = tmp_path / "posenet"
    assert _run("posenet", data, out) == 1  # two scenes in the CSV: data.scene is needed
    assert "data.scene" in capsys.readouterr().err
    assert _run("posenet", data, out, "--set", "data.scene=beta", "--epochs", "5", "--overwrite") == 0
    _assert_loss_drops(out)
    b = load_posenet(out / "last.safetensors")
    assert isinstance(b.model, PoseNet) and b.scene_names == ["beta"] and b.preprocess["crop"] == 32
    with torch.no_grad():
        assert b.model(torch.randn(2, 3, 32, 32))["pose"].shape == (2, 7)
    for name in ("mobilenet_v3_large", "resnet50"):
        assert PoseNet(name, 64)(torch.randn(2, 3, 32, 32))["latent_t"].shape == (2, 64)


def test_single_scene_pae_from_posenet_teacher(data, tmp_path):
    from apr_training.train.posenet import load_posenet

    pn = tmp_path / "pn"
    assert _run("posenet", data, pn, "--set", "data.scene=alpha", "--epochs", "1",
                "--set", "posenet.backbone=mobilenet_v3_large") == 0  # fmt: skip
    out = tmp_path / "pae_pn"
    assert _run("pae", data, out, "--teacher", str(pn / "last.safetensors"), "--epochs", "6",
                "--set", "optim.lr=2e-3") == 0  # fmt: skip
    _assert_loss_drops(out, "train_mse_t")
    b = load_posenet(out / "last.safetensors")
    assert b.pae is not None and not b.pae.config.multi_scene and b.pae.config.encoder_dim == 1024


def test_decoder_trains_and_writes_demo(data, pae_model, tmp_path):
    from PIL import Image

    from apr_training.train.decoder import load_decoder

    out = tmp_path / "dec"
    rc = _run("decoder", data, out, "--pae", str(pae_model / "last.safetensors"), "--epochs", "4", "--demo",
              "--val-labels", str(data / "train.csv"))  # fmt: skip
    assert rc == 0
    _assert_loss_drops(out)
    b = load_decoder(out / "best.safetensors")
    assert b.decoder.img_size == 16 and b.scene_names == list(SCENES)
    with Image.open(out / "decoder_demo.png") as im:
        assert im.size == (4 * 16 + 5 * 2, 2 * 16 + 3 * 2)
    demo2 = tmp_path / "dec_demo_only"
    assert _run("decoder", data, demo2, "--init", str(out / "last.safetensors"), "--epochs", "0", "--demo") == 0
    assert (demo2 / "decoder_demo.png").is_file()


# --------------------------------------------------------------------------------------------- behaviour
def test_resume_equals_uninterrupted_training(data, tmp_path):
    common = ["--batch-size", "2", "--set", "data.no_augment=false", "--epochs", "3", "--set", "optim.lr=3e-4"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert _run("ms-transformer", data, full, *common, "--max-steps", "6") == 0
    assert _run("ms-transformer", data, part, *common, "--max-steps", "3") == 0  # stops inside epoch 1
    s3 = torch.load(part / "last_state.pt", weights_only=True)
    assert (s3["step"], s3["epoch"], s3["step_in_epoch"]) == (3, 0, 3)
    assert _run("ms-transformer", data, part, *common, "--max-steps", "6", "--resume") == 0
    a = torch.load(full / "last_state.pt", weights_only=True)
    b = torch.load(part / "last_state.pt", weights_only=True)
    assert (a["step"], a["epoch"], a["step_in_epoch"]) == (b["step"], b["epoch"], b["step_in_epoch"]) == (6, 1, 2)
    for k, v in a["model"].items():
        assert torch.allclose(v.float(), b["model"][k].float(), atol=1e-6, rtol=0), k
    assert a["scheduler"] == b["scheduler"]
    for i, st in a["optimizer"]["state"].items():
        assert torch.allclose(st["exp_avg"], b["optimizer"]["state"][i]["exp_avg"], atol=1e-6, rtol=0)


def test_resume_without_state_and_existing_out_are_errors(data, ms_model, tmp_path, capsys):
    assert _run("ms-transformer", data, tmp_path / "none", "--resume") == 1
    assert "last_state.pt" in capsys.readouterr().err
    assert _run("ms-transformer", data, ms_model) == 1  # holds a run: needs --resume or --overwrite
    assert "--resume" in capsys.readouterr().err
    assert _run("pae", data, ms_model, "--resume") == 1  # wrong trainer for that state
    assert "ms-transformer" in capsys.readouterr().err


def test_non_finite_loss_stops_with_exit_code_2_and_keeps_last_checkpoint(data, tmp_path, capsys):
    from apr_localizer.checkpoints import load_model

    out = tmp_path / "nan"
    rc = _run("ms-transformer", data, out, "--batch-size", "8", "--epochs", "3", "--set", "optim.lr=1e30")
    assert rc == 2
    err = capsys.readouterr().err
    assert "non-finite loss at step 2" in err
    state = torch.load(out / "last_state.pt", weights_only=True)
    assert state["step"] == 1 and state["epoch"] == 1
    bundle = load_model(out / "last.safetensors")
    assert all(torch.isfinite(v).all() for v in bundle.apr.state_dict().values() if v.is_floating_point())


def test_input_errors_surface_before_training(data, ms_model, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    (broken / "beta" / "frame-002.png").unlink()
    assert _run("ms-transformer", broken, tmp_path / "o1") == 1
    err = capsys.readouterr().err
    assert "frame-002.png" in err and "missing" in err
    assert not (tmp_path / "o1" / "metrics.jsonl").exists()
    lines = (data / "train.csv").read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ",abc"
    (broken / "bad.csv").write_text("\n".join(lines) + "\n")
    assert _run("ms-transformer", data, tmp_path / "o2", labels=str(broken / "bad.csv")) == 1
    err = capsys.readouterr().err
    assert "row 3" in err and "bad.csv" in err and "q4" in err
    other = (data / "train.csv").read_text().replace("beta,", "gamma,")
    (broken / "gamma.csv").write_text(other)
    assert _run("pae", data, tmp_path / "o3", "--teacher", str(ms_model / "last.safetensors"),
                labels=str(broken / "gamma.csv")) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "gamma" in err and "model's scenes" in err
    assert _run("ms-transformer", data, tmp_path / "o4", "--set", "model.num_scenes=3") == 1
    assert "model.num_scenes is 3" in capsys.readouterr().err


def test_equalize_scenes_and_per_scene_heads(data, tmp_path):
    from apr_localizer.checkpoints import load_model

    rows = (data / "train.csv").read_text().splitlines()
    (tmp_path / "uneven.csv").write_text("\n".join(rows[:1] + rows[1:5] + rows[5:7]) + "\n")  # 4 alpha, 2 beta
    out = tmp_path / "eq"
    rc = _run("ms-transformer", data, out, "--batch-size", "2", "--epochs", "1", "--set", "data.equalize_scenes=true",
              "--set", "model.per_scene_heads=true", labels=str(tmp_path / "uneven.csv"))  # fmt: skip
    assert rc == 0
    assert _epochs(out)[0]["step"] == 4  # 2 scenes x 4 (the largest scene) = 8 items = 4 batches
    assert load_model(out / "last.safetensors").apr.config.per_scene_heads


def test_finetune_freeze_trains_only_the_position_head(data, ms_model, tmp_path):
    from apr_localizer.checkpoints import load_model

    out = tmp_path / "ft"
    rc = _run("ms-transformer", data, out, "--init", str(ms_model / "last.safetensors"), "--epochs", "2",
              "--set", "model.freeze=true", "--set", "model.freeze_exclude_phrase=[regressor_head_t, transformer_t]",
              "--set", "loss.learnable=false", "--set", "loss.s_x=1", "--set", "loss.s_q=0",
              "--set", "data.no_augment=false")  # fmt: skip
    assert rc == 0
    before = load_model(ms_model / "last.safetensors").apr.state_dict()
    after = load_model(out / "last.safetensors").apr.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("regressor_head_t.") for k in changed), changed
    assert _run("ms-transformer", data, tmp_path / "ft2", "--set", "model.freeze=true") == 1  # needs --init


@pytest.mark.slow
def test_overfit_four_frames_reaches_small_position_error(data, tmp_path):
    rows = (data / "train.csv").read_text().splitlines()[:5]  # the 4 frames of scene alpha
    (tmp_path / "four.csv").write_text("\n".join(rows) + "\n")
    cfg = tmp_path / "overfit.yaml"
    cfg.write_text(TINY + "\n".join([
        "per_trainer:",
        "  ms-transformer:",
        "    model: {dropout: 0.0, official_backbone: false}",
        "    optim: {lr: 5.0e-4, n_epochs: 120, lr_scheduler_step_size: 80, lr_scheduler_gamma: 0.2}",
        "    run: {n_freq_print: 20, save_every_epochs: 1000, val_every: 1000}",
    ]) + "\n")  # fmt: skip
    out = tmp_path / "overfit"
    four = str(tmp_path / "four.csv")
    rc = _run("ms-transformer", data, out, "--val-labels", four, labels=four, config=str(cfg))
    assert rc == 0
    from apr_training.datasets import read_labels

    pos = read_labels(tmp_path / "four.csv").pose[:, :3]
    spread = float(np.median(np.linalg.norm(pos - pos.mean(0), axis=1)))
    final = _epochs(out)[-1]
    assert final["val_position_median"] < 0.2 * spread, (final["val_position_median"], spread)
    assert final["val_orientation_median"] < 20.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(data, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "apr_training.cli.train",
           "ms-transformer", "--data", str(data), "--labels", str(data / "train.csv"), "--out", str(out),
           "--config", str(data / "tiny.yaml"), "--epochs", "2", "--device", "cpu",
           "--log-level", "WARNING"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2  # 8 items / 2 ranks / batch 4 = 1 step per epoch
    assert (out / "last.safetensors").is_file()


@pytest.mark.gpu
def test_cuda_amp_training(data, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for dtype in ("float16", "bfloat16"):
        out = tmp_path / dtype
        rc = _run("ms-transformer", data, out, "--device", "cuda", "--amp", "--epochs", "2",
                  "--set", f"run.amp_dtype={dtype}")  # fmt: skip
        assert rc == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["amp"] == dtype and summary["device"].startswith("cuda")
        _assert_loss_drops(out)


def test_validation_csv_with_test_rows_is_refused(data, tmp_path):
    from apr_training.train.helpers import read_label_table
    from apr_training.train.task import TrainError

    test_csv = tmp_path / "test.csv"
    test_csv.write_text((data / "train.csv").read_text().replace(",train,", ",test,"))
    with pytest.raises(TrainError, match="test split"):
        read_label_table(test_csv, data, None, "--val-labels")
    assert len(read_label_table(test_csv, data, None, "--labels")) == 8  # evaluation/training CSVs are not checked


def test_resized_image_cache_in_training(data, tmp_path):
    out = tmp_path / "cached"
    assert _run("ms-transformer", data, out, "--epochs", "1", "--set", "data.cache_in_ram=resized",
                "--set", "data.cache_max_gib=0.0001") == 0  # fmt: skip
    assert (out / "image_cache_train_36.npy").is_file() and (out / "image_cache_train_36.json").is_file()
    assert (out / "curves.png").is_file() and (out / "summary.json").is_file()


def test_trainer_records_the_label_orientation_convention(tmp_path):
    """Upstream Cambridge CSVs (dataset.json: world_to_camera) give a bundle that says so; the node publishes c2w."""
    from apr_localizer.checkpoints import load_model

    root = tmp_path / "data"
    _write_dataset(root, frames_per_scene=2)
    (root / "tiny.yaml").write_text(TINY)
    (root / "dataset.json").write_text(json.dumps({"orientation": "world_to_camera"}))
    out = tmp_path / "ms"
    assert _run("ms-transformer", root, out, "--max-steps", "1") == 0
    assert load_model(out / "last.safetensors").orientation == "world_to_camera"
