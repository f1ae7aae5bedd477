"""Small random-weight models with calibrated BatchNorm statistics, shared by model/export/runtime tests."""

from __future__ import annotations

import torch

from apr_localizer.models import (
    IAPRConfig,
    MSTransformerConfig,
    PAEConfig,
    build_iapr,
    build_ms_transformer,
    calibrate_batchnorm,
)


def small_ms_config(num_scenes: int = 3, t: tuple[int, int] = (1, 1), rot: tuple[int, int] = (1, 1), **kw):
    return MSTransformerConfig(
        num_scenes=num_scenes,
        t_encoder_layers=t[0],
        t_decoder_layers=t[1],
        rot_encoder_layers=rot[0],
        rot_decoder_layers=rot[1],
        **kw,
    )


def random_ms_transformer(seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = build_ms_transformer(small_ms_config(**kw))
    calibrate_batchnorm(model, batches=2, batch_size=4, seed=seed)
    return model.eval()


def random_iapr(seed: int = 1, mstransformer=None, num_scenes: int = 3, rpr_dim_feedforward: int = 512, **kw):
    torch.manual_seed(seed)
    ms_cfg = mstransformer.config if mstransformer is not None else small_ms_config(num_scenes=num_scenes, **kw)
    cfg = IAPRConfig(ms_transformer=ms_cfg, pae=PAEConfig(), rpr_dim_feedforward=rpr_dim_feedforward)
    model = build_iapr(cfg, mstransformer)
    if mstransformer is None:
        calibrate_batchnorm(model, batches=2, batch_size=4, seed=seed)
    return model.eval()


def random_images(n: int = 2, seed: int = 0, size: int = 224) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
