"""Official-format and own-format model files: structure from keys, round trips, clear errors."""

from __future__ import annotations

import pickle
from collections import OrderedDict

import pytest
import torch
from model_fixtures import random_iapr, random_images, random_ms_transformer

from apr_localizer.checkpoints import (
    CheckpointError,
    detect_kind,
    load_bundle,
    load_model,
    load_official_checkpoint,
    read_metadata,
    save_model,
    save_official_checkpoint,
    to_official_state_dict,
)
from apr_localizer.models import IAPR, MSTransformer, MSTransformerConfig, PAEConfig, PoseAutoEncoder, build_pae


def _assert_same_outputs(a: MSTransformer, b: MSTransformer, images: torch.Tensor) -> None:
    with torch.inference_mode():
        oa, ob = a(images), b(images)
    assert torch.equal(oa["scene"], ob["scene"])
    for k in ("pose", "latent_t", "latent_rot", "scene_log_probs"):
        torch.testing.assert_close(oa[k], ob[k], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("t", "rot", "scenes"),
    [((1, 1), (1, 1), 3), ((2, 1), (0, 2), 2), ((1, 3), (2, 1), 5), ((0, 1), (1, 0), 4)],
)
def test_official_round_trip_reads_depths_from_keys(tmp_path, t, rot, scenes):
    model = random_ms_transformer(seed=3, num_scenes=scenes, t=t, rot=rot)
    path = save_official_checkpoint(model, tmp_path / "m.pth")
    sd = torch.load(path, weights_only=True)
    assert isinstance(sd, OrderedDict) and detect_kind(sd) == "ms_transformer"
    assert any(k.startswith("backbone.0.body._blocks.15.") for k in sd) and "backbone.0.body._fc.weight" in sd
    back = load_official_checkpoint(path)
    c = back.config
    assert (c.t_encoder_layers, c.t_decoder_layers, c.rot_encoder_layers, c.rot_decoder_layers) == (*t, *rot)
    assert c.num_scenes == scenes
    _assert_same_outputs(model, back, random_images(2, seed=4))


def test_per_scene_heads_round_trip(tmp_path):
    model = random_ms_transformer(seed=5, num_scenes=3, per_scene_heads=True)
    sd = to_official_state_dict(model)
    assert "regressor_head_t.2.fc_h.weight" in sd and "regressor_head_t.fc_h.weight" not in sd
    back = load_official_checkpoint(save_official_checkpoint(model, tmp_path / "ms.pth"))
    assert back.config.per_scene_heads
    _assert_same_outputs(model, back, random_images(3, seed=6))


@pytest.mark.parametrize(("rot", "keys", "params"), [(4, 686, 16_432_748), (6, 746, 18_543_212)])
def test_published_structures_match_the_spec(rot, keys, params):
    torch.manual_seed(0)
    model = MSTransformer(MSTransformerConfig(num_scenes=7, rot_encoder_layers=rot, rot_decoder_layers=rot))
    sd = to_official_state_dict(model)
    assert len(sd) == keys
    assert (
        sum(v.numel() for k, v in sd.items() if not k.endswith("num_batches_tracked") and v.is_floating_point())
        - sum(v.numel() for k, v in sd.items() if k.endswith(("running_mean", "running_var")))
        == params
    )


def test_iapr_official_structure_and_round_trip(tmp_path):
    torch.manual_seed(0)
    full = IAPR(__import__("apr_localizer.models", fromlist=["IAPRConfig"]).IAPRConfig())
    sd = to_official_state_dict(full)
    assert len(sd) == 800 and list(sd)[:2] == ["rel_x_token", "rel_q_token"]
    rpr_params = sum(v.numel() for k, v in sd.items() if not k.startswith(("mstransformer.", "pae.")))
    assert rpr_params == 3_165_191
    small = random_iapr(seed=2)
    back = load_official_checkpoint(save_official_checkpoint(small, tmp_path / "iapr.pth"))
    assert isinstance(back, IAPR) and back.config.rpr_dim_feedforward == 512
    for k, v in small.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_reference_checkpoint_exports_back_to_identical_keys(reference_dir):
    path = reference_dir / "checkpoints" / "ms_transformer_7scenes_t2-2_rot1-1.pth"
    original = torch.load(path, weights_only=True)
    model = load_official_checkpoint(path)
    exported = to_official_state_dict(model)
    assert list(exported) == list(original)  # same keys, same order
    for k, v in original.items():
        used = not any(s in k for s in ("_blocks.11.", "_blocks.12.", "_blocks.13.", "_blocks.14.", "_blocks.15."))
        used = (
            used
            and not any(k.endswith(s) for s in ())
            and not k.startswith(("backbone.0.body._conv_head", "backbone.0.body._bn1.", "backbone.0.body._fc"))
        )
        if used:
            assert torch.equal(exported[k], v), k
        assert exported[k].shape == v.shape and exported[k].dtype == v.dtype, k


@pytest.mark.parametrize(
    ("cfg", "width"),
    [
        (PAEConfig(), 52),
        (PAEConfig(multi_scene=False), 39),
        (PAEConfig(multi_scene=False, apply_positional_encoding=False, shallow_mlp=True), 3),
    ],
)
def test_pae_round_trip(tmp_path, cfg, width):
    torch.manual_seed(1)
    pae = build_pae(cfg)
    assert pae.x_encoder[0].in_features == width
    back = load_official_checkpoint(save_official_checkpoint(pae, tmp_path / "pae.pth"))
    assert isinstance(back, PoseAutoEncoder) and back.config == cfg


# --------------------------------------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_official_checkpoint(tmp_path / "nope.pth")


def test_corrupt_file(tmp_path):
    p = tmp_path / "bad.pth"
    p.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(CheckpointError, match=r"bad\.pth: cannot be read as a raw PyTorch state_dict"):
        load_official_checkpoint(p)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_objects_are_refused(tmp_path):
    p = tmp_path / "evil.pth"
    with open(p, "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_official_checkpoint(p)


def test_unknown_keys(tmp_path):
    p = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, p)
    with pytest.raises(CheckpointError, match="not an MS-Transformer, pose auto-encoder or iAPR state_dict"):
        load_official_checkpoint(p)


def test_missing_and_misshapen_keys(tmp_path):
    sd = to_official_state_dict(random_ms_transformer(seed=0))
    broken = OrderedDict(sd)
    del broken["scene_embed.bias"]
    torch.save(broken, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"1 missing \(e\.g\. scene_embed\.bias\)"):
        load_official_checkpoint(tmp_path / "missing.pth")
    bad = OrderedDict(sd)
    bad["regressor_head_t.fc_o.weight"] = torch.zeros(5, 1024)
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"has shape \(5, 1024\), expected \(3, 1024\)"):
        load_official_checkpoint(tmp_path / "shape.pth")


def test_wrapped_and_ddp_state_dicts_are_accepted(tmp_path):
    model = random_ms_transformer(seed=0)
    sd = to_official_state_dict(model)
    torch.save({"state_dict": OrderedDict(("module." + k, v) for k, v in sd.items())}, tmp_path / "w.pth")
    _assert_same_outputs(model, load_official_checkpoint(tmp_path / "w.pth"), random_images(1))


# --------------------------------------------------------------------------------------------- our format
def test_own_format_round_trip_with_shared_encoder(tmp_path):
    apr = random_ms_transformer(seed=7)
    iapr = random_iapr(seed=8, mstransformer=apr)
    pae = build_pae()
    path = save_model(
        tmp_path / "bundle.safetensors", apr, iapr, pae, scene_names=["a", "b", "c"], provenance={"command": "test"}
    )
    meta = read_metadata(path)
    assert meta["scene_names"] == ["a", "b", "c"] and meta["components"]["iapr"]["shares_apr_encoder"]
    assert meta["preprocess"]["crop"] == 224 and meta["provenance"]["command"] == "test"
    b = load_model(path)
    assert b.shares_encoder and b.scene_names == ["a", "b", "c"] and not b.apr.training
    _assert_same_outputs(apr, b.apr, random_images(2, seed=9))
    for k, v in iapr.state_dict().items():
        assert torch.equal(v, b.iapr.state_dict()[k]), k
    # the shared encoder is stored once
    with open(path, "rb") as f:
        size = len(f.read())
    single = save_model(tmp_path / "apr_only.safetensors", apr)
    assert size < single.stat().st_size + 20_000_000


def test_own_format_fp16_halves_the_file(tmp_path):
    apr = random_ms_transformer(seed=7)
    p32 = save_model(tmp_path / "a32.safetensors", apr)
    p16 = save_model(tmp_path / "a16.safetensors", apr, dtype=torch.float16)
    assert p16.stat().st_size < 0.55 * p32.stat().st_size
    b = load_model(p16)
    assert next(b.apr.parameters()).dtype == torch.float32
    with torch.inference_mode():
        diff = (b.apr(random_images(1))["pose"] - apr(random_images(1))["pose"]).abs().max()
    assert diff < 5e-2


def test_load_bundle_from_official_files(reference_dir, tmp_path):
    ckpt = reference_dir / "checkpoints"
    b = load_bundle(ckpt / "ms_transformer_7scenes_t2-2_rot1-1.pth", pae=ckpt / "pae_multiscene_256.pth")
    assert b.scene_names[0] == "chess" and b.iapr is None and isinstance(b.pae, PoseAutoEncoder)
    with pytest.raises(CheckpointError, match="expected an iAPR checkpoint"):
        load_bundle(ckpt / "ms_transformer_7scenes_t2-2_rot1-1.pth", iapr=ckpt / "pae_multiscene_256.pth")
    with pytest.raises(CheckpointError, match="scene names"):
        load_bundle(ckpt / "ms_transformer_7scenes_t2-2_rot1-1.pth", scene_names=["x"])


def test_own_format_errors(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="without apr_localizer metadata"):
        load_model(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="no such model file"):
        load_model(tmp_path / "absent.safetensors")
