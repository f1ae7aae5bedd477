"""The iAPR relative-pose regressor against an independent oracle built from torch's own modules.

Spec §7.1: the RPR encoder is ``nn.TransformerEncoder`` of post-norm GELU ``nn.TransformerEncoderLayer`` (4 heads,
sequence-first) plus a final LayerNorm, over 6 tokens without positional encoding; ``ln`` on output tokens 0 and 1;
heads Linear → GELU → Linear. The official-layout weights of our model load *strictly* into those torch modules, so
the oracle shares no code with ``apr_localizer.models`` beyond the weights, and a wrong head count, norm placement
or token order in our implementation shows up as a large difference.
"""

from __future__ import annotations

import pytest
import torch
from model_fixtures import random_iapr
from torch import nn

from apr_localizer.checkpoints import to_official_state_dict

D = 256


def _oracle_encoder(sd: dict[str, torch.Tensor], nhead: int, layers: int, ffn: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(D, nhead, ffn, dropout=0.0, activation="gelu", norm_first=False)
    enc = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(D), enable_nested_tensor=False)
    prefix = "rpr_transformer_encoder."
    enc.load_state_dict({k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
    return enc.eval()


def _oracle_head(sd: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    h = nn.functional.gelu(nn.functional.linear(x, sd[f"{name}.fc_h.weight"], sd[f"{name}.fc_h.bias"]))
    return nn.functional.linear(h, sd[f"{name}.fc_o.weight"], sd[f"{name}.fc_o.bias"])


def _oracle_rel(sd, enc, query_t, query_r, ref_t, ref_r) -> torch.Tensor:
    B = query_t.shape[0]
    tokens = torch.stack(
        [sd["rel_x_token"].expand(B, D), sd["rel_q_token"].expand(B, D), query_t, query_r, ref_t, ref_r]
    )  # (6, B, D): sequence-first, as the original
    out = enc(tokens)
    ln = lambda t: nn.functional.layer_norm(t, (D,), sd["ln.weight"], sd["ln.bias"])  # noqa: E731
    return torch.cat(
        [_oracle_head(sd, "rel_regressor_x", ln(out[0])), _oracle_head(sd, "rel_regressor_q", ln(out[1]))], 1
    )


@pytest.fixture(scope="module")
def case():
    iapr = random_iapr(seed=21, num_scenes=3)
    sd = {k: v.detach().float() for k, v in to_official_state_dict(iapr).items()}
    g = torch.Generator().manual_seed(3)
    query_t, query_r = torch.randn(4, D, generator=g), torch.randn(4, D, generator=g)
    pose = torch.cat(
        [torch.randn(4, 3, generator=g), nn.functional.normalize(torch.randn(4, 4, generator=g), dim=1)], 1
    )
    scene = torch.tensor([0, 1, 2, 1])
    with torch.inference_mode():
        ref = iapr.pae(pose, scene.reshape(-1, 1).float())
        ours = iapr.rel_from_latents(query_t, query_r, pose, scene)
    return iapr, sd, (query_t, query_r, ref["latent_t"], ref["latent_rot"]), ours


def test_rpr_matches_torch_transformer_oracle(case):
    iapr, sd, latents, ours = case
    c = iapr.config
    enc = _oracle_encoder(sd, c.rpr_num_heads, c.rpr_num_encoder_layers, c.rpr_dim_feedforward)
    with torch.inference_mode():
        expected = _oracle_rel(sd, enc, *latents)
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-5)


def test_oracle_discriminates_a_wrong_head_count(case):
    """The comparison above can fail: the same weights with another head count give clearly different outputs."""
    iapr, sd, latents, ours = case
    c = iapr.config
    wrong = _oracle_encoder(sd, c.rpr_num_heads * 2, c.rpr_num_encoder_layers, c.rpr_dim_feedforward)
    with torch.inference_mode():
        other = _oracle_rel(sd, wrong, *latents)
    assert (other - ours).abs().max() > 0.05
