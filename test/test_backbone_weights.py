"""Pretrained backbones: variant selection, torchvision weight files, the ImageNet hub-cache file, the scratch warning.

A torchvision-format EfficientNet-B0 weight file written here is loaded into the torchvision variant (symmetric
padding, BN eps 1e-5) and changes the features; "imagenet" reads torchvision's hub-cache file and, when it is absent
offline, fails with one sentence naming where to put it; training from scratch warns.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from test_training import _run
from torchvision.models import efficientnet_b0

from apr_localizer.models import MSTransformerConfig, build_ms_transformer
from apr_localizer.models.backbone import (
    BackboneWeightsError,
    backbone_state_dict,
    imagenet_weights_file,
    variant_for_weights,
)
from apr_training.train.config import ModelConfig
from apr_training.train.helpers import FROM_SCRATCH_WARNING, init_backbone
from apr_training.train.task import TrainError

TINY = {"t_encoder_layers": 1, "t_decoder_layers": 1, "rot_encoder_layers": 1, "rot_decoder_layers": 1}


def _weight_file(path: Path, seed: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = efficientnet_b0(weights=None)
    with torch.no_grad():  # non-trivial BatchNorm statistics too
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    sd = net.state_dict()
    torch.save(sd, path)
    return sd


def _model(mcfg: ModelConfig):
    torch.manual_seed(0)
    return build_ms_transformer(MSTransformerConfig(**mcfg.ms_config(2))).eval()


def test_torchvision_file_loads_into_torchvision_variant_and_changes_features(tmp_path):
    sd = _weight_file(tmp_path / "effb0.pth")
    scratch = ModelConfig(**TINY)
    pretrained = ModelConfig(**TINY, backbone_weights=str(tmp_path / "effb0.pth"))
    assert scratch.backbone_variant() == "official" and pretrained.backbone_variant() == "torchvision"
    a, b = _model(scratch), _model(pretrained)
    assert a.backbone.official and not b.backbone.official
    assert init_backbone(b, pretrained) > 0
    for k, v in b.backbone.state_dict().items():
        assert torch.equal(v, sd[k]), k  # loaded exactly, torchvision names
    bn = next(m for m in b.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.eps == pytest.approx(1e-5)  # the network those weights were trained for
    assert all(
        m.padding != (0, 0) for m in b.backbone.modules() if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)
    )
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fresh = _model(pretrained)
        assert not torch.allclose(fresh.backbone(x)[0], b.backbone(x)[0])  # the weights change the features
    explicit = ModelConfig(**TINY, official_backbone=True, backbone_weights=str(tmp_path / "effb0.pth"))
    assert explicit.backbone_variant() == "official"  # an explicit choice is kept (and warned about)


def test_imagenet_reads_the_hub_cache_and_fails_offline_with_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # hub dir = $TORCH_HOME/hub
    expected = tmp_path / "torch" / "hub" / "checkpoints" / imagenet_weights_file().name
    assert imagenet_weights_file() == expected and variant_for_weights("imagenet") == "torchvision"
    try:  # the test network namespace is loopback-only: the download fails
        backbone_state_dict("imagenet")
    except BackboneWeightsError as e:
        assert str(expected) in str(e) and "download" in str(e)
    else:  # pragma: no cover - only where downloads work
        pytest.skip("the download succeeded (network available)")
    expected.unlink(missing_ok=True)
    sd = _weight_file(tmp_path / "x.pth")
    expected.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, expected)
    got = backbone_state_dict("imagenet")
    assert torch.equal(got["features.0.0.weight"], sd["features.0.0.weight"])


def test_bad_weight_files_are_one_sentence_errors(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    model = _model(ModelConfig(**TINY))
    for path, words in ((tmp_path / "none.pth", "do not exist"), (tmp_path / "other.pth", "features.*")):
        with pytest.raises(TrainError, match="model.backbone_weights") as info:
            init_backbone(model, ModelConfig(**TINY, backbone_weights=str(path)))
        assert words in str(info.value) and str(path) in str(info.value)


def test_training_from_scratch_warns(caplog, tmp_path):
    caplog.set_level(logging.WARNING, logger="apr_training.train")
    assert init_backbone(_model(ModelConfig(**TINY)), ModelConfig(**TINY)) == 0
    assert FROM_SCRATCH_WARNING in caplog.text


def test_apr_train_backbone_weights_flag(tmp_path, caplog):
    from test_training import TINY as TINY_YAML
    from test_training import _write_dataset

    from apr_localizer.checkpoints import load_model

    data = tmp_path / "data"
    _write_dataset(data)
    (data / "tiny.yaml").write_text(TINY_YAML)
    _weight_file(tmp_path / "effb0.pth")
    caplog.set_level(logging.WARNING, logger="apr_training.train")
    assert _run("ms-transformer", data, tmp_path / "o", "--epochs", "1",
                "--backbone-weights", str(tmp_path / "effb0.pth")) == 0  # fmt: skip
    assert FROM_SCRATCH_WARNING not in caplog.text
    assert not load_model(tmp_path / "o" / "last.safetensors").apr.config.official_backbone
