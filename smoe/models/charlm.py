"""A small causal pre-LN Transformer language model whose feed-forward layers are MoE layers.

The router lab's backbone (``python -m smoe.examples.charlm``): every router of the registry is
trained on it with the same blocks, widths and steps. Each MoE layer gets a
:class:`smoe.RoutingContext` with the ``[B, S]`` batch shape, ``causal=True`` and its layer index,
so routers that need sequence structure have it; a router that declares ``needs_attention`` gets the
block's attention probabilities (computed explicitly for that block instead of by the fused SDPA
kernel). Routers that are not causal (expert choice, V-MoE with a capacity at k = 2) are refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smoe.layer import MoEAux, MoELayer
from smoe.routing.context import RoutingContext
from smoe.routing.registry import registered_info

__all__ = ["CausalSelfAttention", "CharLM", "DenseFFN", "LMBlock"]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (fused QKV, ``scaled_dot_product_attention``).

    ``forward(x, need_weights=True)`` computes the softmax explicitly and also returns the
    attention probabilities ``[B, H, S, S]`` (for attention-aware routing).
    """

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"CausalSelfAttention: d_model={d_model} not divisible by {n_heads}")
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        B, S, d = x.shape
        q, k, v = (
            self.qkv(x).view(B, S, 3, self.n_heads, d // self.n_heads).transpose(1, 3).unbind(2)
        )
        dropout = self.dropout if self.training else 0.0
        if not need_weights:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
            probs = None
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            future = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1)
            probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
            y = F.dropout(probs, dropout, self.training) @ v
        return self.proj(y.transpose(1, 2).reshape(B, S, d)), probs


class DenseFFN(nn.Module):
    """The dense feed-forward block (Linear, GELU, Linear) of the non-MoE layers."""

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LMBlock(nn.Module):
    """Pre-LN block: ``x + attn(ln1(x))``, then ``x + ffn(ln2(x))`` with a dense or MoE FFN."""

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict

    def __init__(self, d_model: int, n_heads: int, ffn: nn.Module, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ffn = ffn
        self.drop = nn.Dropout(dropout)

    def needs_attention(self) -> bool:
        info = registered_info(self.ffn.router) if isinstance(self.ffn, MoELayer) else None
        return info is not None and info.needs_attention

    def forward(self, x: Tensor, context: RoutingContext) -> tuple[Tensor, MoEAux | None]:
        a, probs = self.attn(self.ln1(x), need_weights=self.needs_attention())
        x = x + self.drop(a)
        aux = None
        if isinstance(self.ffn, MoELayer):
            y, aux = self.ffn(self.ln2(x), context._replace(attention=probs))
        else:
            y = self.ffn(self.ln2(x))
        return x + self.drop(y), aux


class CharLM(nn.Module):
    """Character-level causal Transformer LM with MoE feed-forward layers.

    Args:
        vocab_size: number of characters.
        d_model, n_layers, n_heads: the Transformer's size (defaults sized for 2 CPU cores).
        context: maximum sequence length (learned position embeddings).
        num_experts: E; k: experts per token.
        d_ff: hidden width of each expert; default ``4 * d_model // k``, so that the active expert
            compute of a token equals a dense 4·d FFN whatever k. The dense layers (when
            ``moe_every > 1``) use ``4 * d_model``.
        moe_every: MoE in every layer (1) or every other (2, the layers 1, 3, ...), and so on.
        router, router_options: a registered router name and its options (see
            :func:`smoe.routing.build_router`), the same for every MoE layer.
        dropout: on attention and residual branches.
        causal_training: the training forward asks its routers for causal routing (the layer
            refuses a router that is not). False lets a router couple the tokens of the batch in
            training only, as the Sinkhorn routers of the SSR paper do in their LM (a Sinkhorn
            step's column normalisation sees later tokens); evaluation always routes causally,
            so validation losses stay honest.

    ``forward(idx [B, S])`` returns ``(logits [B, S, vocab], [MoEAux per MoE layer])``.
    """

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict

    def __init__(
        self,
        vocab_size: int,
        *,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        context: int = 128,
        num_experts: int = 8,
        k: int = 2,
        d_ff: int | None = None,
        moe_every: int = 1,
        router: str = "topk",
        router_options: Mapping[str, Any] | None = None,
        dropout: float = 0.0,
        causal_training: bool = True,
    ) -> None:
        super().__init__()
        self.causal_training = causal_training
        if moe_every < 1:
            raise ValueError(f"CharLM: moe_every must be >= 1, got {moe_every}")
        if k < 1:
            raise ValueError(f"CharLM: k must be >= 1, got {k}")
        self.context = context
        d_ff = d_ff if d_ff is not None else 4 * d_model // k
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context, d_model)
        blocks = []
        for i in range(n_layers):
            if (i + 1) % moe_every == 0:
                ffn: nn.Module = MoELayer(
                    d_model,
                    d_ff,
                    num_experts,
                    k,
                    router=router,
                    router_options=router_options,
                    layer_index=i,
                )
            else:
                ffn = DenseFFN(d_model, 4 * d_model)
            blocks.append(LMBlock(d_model, n_heads, ffn, dropout))
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied embeddings
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        # GPT-2's initialisation for the dense parts; MoE layers keep their own.
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def forward(self, idx: Tensor, *, step: int | None = None) -> tuple[Tensor, list[MoEAux]]:
        B, S = idx.shape
        if S > self.context:
            raise ValueError(f"CharLM: sequence length {S} exceeds context={self.context}")
        pos = torch.arange(S, device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        causal = self.causal_training or not self.training
        context = RoutingContext(batch_shape=(B, S), causal=causal, step=step)
        auxes = []
        for block in self.blocks:
            x, aux = block(x, context)
            if aux is not None:
                auxes.append(aux)
        return self.head(self.ln_f(x)), auxes
