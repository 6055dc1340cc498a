"""Transformer-XL-style attention with a memory of the previous ``attn_span`` tokens and relative
position logits (the adaptive-span ``SeqAttention`` of the fastmoe / MomentumSMoE LM backbone;
specs/graph_routing.md §2.3).

Query i of a block of M tokens sits at absolute position L + i of ``[h_cache; h]`` (L = span)
and attends to the L positions i … L + i − 1 before it, not to itself. Its logits, in relative
("unskewed") form ``[B, H, M, L]``, are ``(q_i · k_{i+r} + q_i · key_pe[:, r]) / sqrt(d_head)``
for r = 0 … L − 1 (r = 0 is the farthest token). :func:`skew` maps the probabilities to absolute
form ``[B, H, M, L + M]`` (column c = position c of ``[h_cache; h]``), the form
:class:`smoe.AttentionAwareRouter` reads with its ``memory`` option.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["XLAttention", "skew", "unskew"]


def skew(X: Tensor, pad_value: float = 0.0) -> Tensor:
    """``[..., M, L]`` relative form to ``[..., M, L + M]`` absolute form: row i shifted right by
    i places, the rest filled with ``pad_value``."""
    *lead, M, L = X.shape
    X = F.pad(X, (0, M + 1), value=pad_value)  # [..., M, L + M + 1]
    X = X.reshape(*lead, M * (L + M + 1))[..., :-M]  # drop the last row's padding
    return X.reshape(*lead, M, L + M)


def unskew(X: Tensor) -> Tensor:
    """``[..., M, L + M]`` absolute form to ``[..., M, L]``: row i keeps columns i … i + L − 1
    (the inverse of :func:`skew` on those entries)."""
    *lead, M, LM = X.shape
    L = LM - M
    X = F.pad(X.reshape(*lead, M * LM), (0, M))  # [..., M (L + M) + M]
    return X.reshape(*lead, M, LM + 1)[..., :L]


class XLAttention(nn.Module):
    """Multi-head attention over a memory ``h_cache [B, L, d]`` of the previous L tokens and the
    current block ``x [B, M, d]``, with learned relative position logits ``key_pe``.

    ``forward(x, h_cache, key_pe)`` returns ``(out [B, M, d], probs [B, H, M, L + M])``: the
    attention probabilities before dropout in absolute form (zero outside each row's span, so
    ``probs[..., i, L + i] = 0``: a token does not attend to itself). The keys and values of the
    memory are recomputed from ``h_cache`` with the current weights, as in the reference.

    Args:
        d_model: width; n_heads: heads (d_model divisible by it).
        attn_span: L, the number of previous tokens each query sees (>= 1).
        dropout: on the attention probabilities (training only).
    """

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict

    def __init__(self, d_model: int, n_heads: int, attn_span: int, dropout: float = 0.0) -> None:
        super().__init__()
        if n_heads < 1 or d_model % n_heads:
            raise ValueError(f"XLAttention: d_model={d_model} not divisible by n_heads={n_heads}")
        if isinstance(attn_span, bool) or not isinstance(attn_span, int) or attn_span < 1:
            raise ValueError(f"XLAttention: attn_span must be an int >= 1, got {attn_span!r}")
        self.n_heads, self.attn_span, self.dropout = n_heads, attn_span, dropout
        self.d_head = d_model // n_heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, attn_span={self.attn_span}, dropout={self.dropout}"

    def forward(self, x: Tensor, h_cache: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        B, M, d = x.shape
        L, H, Dh = self.attn_span, self.n_heads, self.d_head
        if tuple(h_cache.shape) != (B, L, d):
            raise ValueError(
                f"XLAttention: h_cache must be [B, attn_span, d] = {[B, L, d]}, "
                f"got {list(h_cache.shape)}"
            )
        if tuple(key_pe.shape) != (1, Dh, L):
            raise ValueError(
                f"XLAttention: key_pe must be [1, d_head, attn_span] = {[1, Dh, L]}, "
                f"got {list(key_pe.shape)}"
            )
        q = self.q(x).view(B, M, H, Dh).transpose(1, 2)  # [B, H, M, Dh]
        k, v = self.kv(torch.cat([h_cache, x], dim=1)).view(B, L + M, 2, H, Dh).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L + M, Dh]
        scores = unskew(q @ k.transpose(-2, -1)) + q @ key_pe  # [B, H, M, L]
        rel = torch.softmax(scores / math.sqrt(Dh), dim=-1)
        probs = skew(rel)
        if self.training and self.dropout > 0:
            y = skew(F.dropout(rel, self.dropout)) @ v  # [B, H, M, Dh]
        else:
            y = probs @ v
        return self.proj(y.transpose(1, 2).reshape(B, M, d)), probs
