"""Attention building blocks: DETR-style pre-norm encoder/decoder (MS-Transformer) and a post-norm encoder (iAPR).

All modules are batch-first internally: sequences are ``(B, L, D)``. Parameter names follow the official
checkpoints (``self_attn.in_proj_weight``, ``linear1``, ``norm1`` ...), so official state_dicts load without renaming.
Attention runs through ``F.scaled_dot_product_attention`` with no mask (inputs are never padded), and the query/key
projections are fused into one matmul whenever query and key are the same tensor.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Attention",
    "DecoderLayer",
    "DETRTransformer",
    "EncoderLayer",
    "PostNormEncoder",
    "PostNormEncoderLayer",
]


class Attention(nn.Module):
    """Multi-head attention with fused ``in_proj_weight (3D, D)`` as ``nn.MultiheadAttention`` stores it.

    ``forward(q (B,Lq,D), k (B,Lk,D), v (B,Lk,D)) -> (B,Lq,D)``. Pass ``k=None`` when key is the same tensor as query.
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model {d_model} is not divisible by nhead {nhead}")
        self.d_model, self.nhead, self.dropout = d_model, nhead, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
        d = self.d_model
        w, b = self.in_proj_weight, self.in_proj_bias
        if k is None:  # self-attention with q == k: one matmul for both projections
            qk = F.linear(q, w[: 2 * d], b[: 2 * d])
            qp, kp = qk[..., :d], qk[..., d:]
        else:
            qp = F.linear(q, w[:d], b[:d])
            kp = F.linear(k, w[d : 2 * d], b[d : 2 * d])
        vp = F.linear(v, w[2 * d :], b[2 * d :])
        B, Lq, _ = qp.shape
        Lk = kp.shape[1]
        h, hd = self.nhead, d // self.nhead
        qp = qp.reshape(B, Lq, h, hd).transpose(1, 2)
        kp = kp.reshape(B, Lk, h, hd).transpose(1, 2)
        vp = vp.reshape(B, Lk, h, hd).transpose(1, 2)
        out = F.scaled_dot_product_attention(qp, kp, vp, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(B, Lq, d))


class _FFN(nn.Module):
    """Mixin holding ``linear1 → GELU → dropout → linear2`` with the official parameter names."""

    def _init_ffn(self, d_model: int, dim_feedforward: int, dropout: float) -> None:
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.gelu(self.linear1(x))))


class EncoderLayer(_FFN):
    """Pre-norm DETR encoder layer: ``x += SA(q=k=LN1(x)+pos, v=LN1(x))``; ``x += FFN(LN2(x))``."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = Attention(d_model, nhead, dropout)
        self._init_ffn(d_model, dim_feedforward, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.dropout1(self.self_attn(y + pos, None, y))
        return x + self.dropout2(self._ffn(self.norm2(x)))


class DecoderLayer(_FFN):
    """Pre-norm DETR decoder layer with query positional embeddings added at every layer.

    ``t += SA(q=k=LN1(t)+query, v=LN1(t))``; ``t += CA(q=LN2(t)+query, k=memory+pos, v=memory)``; ``t += FFN(LN3(t))``.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = Attention(d_model, nhead, dropout)
        self.multihead_attn = Attention(d_model, nhead, dropout)
        self._init_ffn(d_model, dim_feedforward, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self, t: torch.Tensor, memory: torch.Tensor, memory_key: torch.Tensor, query_pos: torch.Tensor
    ) -> torch.Tensor:
        y = self.norm1(t)
        t = t + self.dropout1(self.self_attn(y + query_pos, None, y))
        t = t + self.dropout2(self.multihead_attn(self.norm2(t) + query_pos, memory_key, memory))
        return t + self.dropout3(self._ffn(self.norm3(t)))


class _Stack(nn.Module):
    def __init__(self, layer: nn.Module, num_layers: int, d_model: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(d_model)
        for m in self.layers.modules():  # deep copies share their initial values: draw fresh ones per layer
            if isinstance(m, nn.Linear):
                m.reset_parameters()
            elif isinstance(m, Attention):
                nn.init.xavier_uniform_(m.in_proj_weight)


class DETRTransformer(nn.Module):
    """DETR encoder-decoder (pre-norm, GELU, final LayerNorms) with a zero-initialised target.

    ``forward(src (B,L,D), pos (1|B,L,D), query (Q,D)) -> (B,Q,D)`` decoder output after the final LayerNorm.
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.encoder = _Stack(EncoderLayer(d_model, nhead, dim_feedforward, dropout), num_encoder_layers, d_model)
        self.decoder = _Stack(DecoderLayer(d_model, nhead, dim_feedforward, dropout), num_decoder_layers, d_model)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        x = src
        for layer in self.encoder.layers:
            x = layer(x, pos)
        memory = self.encoder.norm(x)
        memory_key = memory + pos
        query_pos = query.unsqueeze(0)
        t = torch.zeros(src.shape[0], query.shape[0], self.d_model, dtype=src.dtype, device=src.device)
        for layer in self.decoder.layers:
            t = layer(t, memory, memory_key, query_pos)
        return self.decoder.norm(t)


class PostNormEncoderLayer(_FFN):
    """Post-norm encoder layer as ``nn.TransformerEncoderLayer(norm_first=False, activation=gelu)``.

    ``x = LN1(x + SA(x, x, x))``; ``x = LN2(x + FFN(x))``.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = Attention(d_model, nhead, dropout)
        self._init_ffn(d_model, dim_feedforward, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout1(self.self_attn(x, None, x)))
        return self.norm2(x + self.dropout2(self._ffn(x)))


class PostNormEncoder(_Stack):
    """Stack of :class:`PostNormEncoderLayer` plus a final LayerNorm; ``(B,L,D) -> (B,L,D)``."""

    def __init__(self, d_model: int, nhead: int, num_layers: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__(PostNormEncoderLayer(d_model, nhead, dim_feedforward, dropout), num_layers, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)
