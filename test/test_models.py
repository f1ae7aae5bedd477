"""Parametrised model tests: shapes, selection semantics, gradients, official vs plain backbone."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import random_ms_transformer, small_ms_config

from apr_localizer.models import (
    EfficientNetB0Features,
    MSTransformer,
    PAEConfig,
    build_ms_transformer,
    build_pae,
    calibrate_batchnorm,
)
from apr_localizer.models.backbone import SamePadConv2d


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(("scenes", "per_scene"), [(1, False), (4, False), (3, True)])
def test_output_shapes(batch, scenes, per_scene):
    model = random_ms_transformer(seed=scenes, num_scenes=scenes, per_scene_heads=per_scene)
    with torch.inference_mode():
        out = model(torch.randn(batch, 3, 224, 224))
    assert out["pose"].shape == (batch, 7)
    assert out["scene_log_probs"].shape == (batch, scenes)
    assert out["scene"].shape == (batch,) and out["scene"].dtype == torch.int64
    assert out["latent_t"].shape == out["latent_rot"].shape == (batch, 256)
    torch.testing.assert_close(out["scene_log_probs"].exp().sum(1), torch.ones(batch))


@pytest.mark.parametrize("size", [(224, 224), (256, 320)])
def test_backbone_endpoints(size):
    net = EfficientNetB0Features(official=True).eval()
    with torch.inference_mode():
        r4, r3 = net(torch.randn(1, 3, *size))
    assert r4.shape == (1, 112, size[0] // 16, size[1] // 16)
    assert r3.shape == (1, 40, size[0] // 8, size[1] // 8)
    pads = [m.static_pad for m in net.modules() if isinstance(m, SamePadConv2d)]
    assert pads == [(0, 1, 0, 1), (0, 1, 0, 1), (1, 2, 1, 2), (0, 1, 0, 1)]
    assert all(m.eps == 1e-3 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_plain_torchvision_backbone_option():
    net = EfficientNetB0Features(official=False)
    assert not any(isinstance(m, SamePadConv2d) for m in net.modules())
    assert all(m.eps == 1e-5 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_calibration_makes_outputs_input_dependent():
    torch.manual_seed(0)
    model = build_ms_transformer(small_ms_config(num_scenes=4))
    calibrate_batchnorm(model, batches=2)
    with torch.inference_mode():
        a = model(torch.randn(1, 3, 224, 224))
        b = model(torch.randn(1, 3, 224, 224))
    assert (a["pose"] - b["pose"]).abs().max() > 1e-4
    r4, _ = model.backbone(torch.randn(2, 3, 224, 224))
    assert r4.std() > 0.1


def test_forced_scene_changes_only_selection():
    model = random_ms_transformer(seed=1, num_scenes=4)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        enc = model.encode(x)
        forced = model(x, scene=torch.tensor([3, 1]))
    torch.testing.assert_close(forced["latent_t"], enc["local_t"][[0, 1], [3, 1]])
    torch.testing.assert_close(forced["latent_rot"], enc["local_rot"][[0, 1], [3, 1]])
    torch.testing.assert_close(forced["scene_log_probs"], enc["scene_log_probs"])


def test_quaternion_output_is_raw():
    model = random_ms_transformer(seed=2)
    with torch.inference_mode():
        q = model(torch.randn(4, 3, 224, 224))["pose"][:, 3:]
    assert not torch.allclose(q.norm(dim=1), torch.ones(4), atol=1e-3)


def test_gradients_reach_every_used_parameter():
    model = random_ms_transformer(seed=3, num_scenes=2).train()
    out = model(torch.randn(2, 3, 224, 224), scene=torch.tensor([0, 1]))
    (out["pose"].sum() + out["scene_log_probs"].sum() * 0 + out["scene_log_probs"][:, 0].sum()).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None]
    assert dead == [], dead


def test_dropout_is_active_in_train_mode_only():
    model = random_ms_transformer(seed=4)
    x = torch.randn(1, 3, 224, 224)
    model.train()
    a, b = model(x)["pose"], model(x)["pose"]
    assert not torch.allclose(a, b)
    model.eval()
    with torch.inference_mode():
        torch.testing.assert_close(model(x)["pose"], model(x)["pose"], rtol=0, atol=0)


def test_pae_shapes_and_parameter_count():
    pae = build_pae(PAEConfig())
    assert sum(p.numel() for p in pae.parameters()) == 221_888
    out = pae(torch.randn(5, 7), torch.arange(5))
    assert out["latent_t"].shape == out["latent_rot"].shape == (5, 256)
    with pytest.raises(ValueError, match="needs the scene index"):
        pae(torch.randn(1, 7))


def test_per_scene_heads_need_the_scene():
    model = random_ms_transformer(seed=5, per_scene_heads=True)
    with pytest.raises(ValueError, match="per-scene heads"):
        model.decode_pose(torch.randn(1, 256), torch.randn(1, 256))


def test_positional_encoding_size_limit():
    model = MSTransformer(small_ms_config())
    with pytest.raises(ValueError, match="exceeds the positional encoding size"):
        model.position_embedding(51, 10)
