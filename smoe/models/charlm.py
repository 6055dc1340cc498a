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
from smoe.models.moe_factory import moe_layer
from smoe.models.xl import XLAttention
from smoe.momentum import MomentumMoE, MomentumState
from smoe.routing.context import RoutingContext
from smoe.routing.registry import registered_info, router_info

__all__ = ["ATTENTIONS", "LAYOUTS", "CausalSelfAttention", "CharLM", "DenseFFN", "LMBlock"]


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


LAYOUTS = ("pre_ln", "post_ln", "pre_ln_out")
ATTENTIONS = ("causal", "xl")


class LMBlock(nn.Module):
    """One Transformer block with a dense, MoE or momentum-MoE feed-forward layer.

    ``layout="pre_ln"``: ``x + attn(ln1(x))``, then ``x + ffn(ln2(x))``. ``layout="post_ln"``
    (the WikiText-103 reference of MomentumSMoE, specs/momentum_smoe.md §6): ``h = ln1(h +
    attn(h))``, then ``ln2(h + ln_m(h + u))`` for an MoE layer (the reference's double residual)
    and ``ln2(h + ffn(h))`` for a dense one. ``layout="pre_ln_out"`` (V-MoE's momentum block,
    §6): pre-LN with a LayerNorm after the residual, ``ln_out(x + ffn(ln2(x)))``, in MoE and
    dense blocks alike. GLaM's layout is ``post_ln`` with MoE every other block (``CharLM(...,
    moe_every=2)``). A :class:`smoe.momentum.MomentumMoE` adds its
    ``delta`` where a plain MoE layer adds u, and hands the momentum state on; other layers pass
    the state unchanged.

    ``attn_span=None``: causal self-attention over the block (:class:`CausalSelfAttention`); an
    int L: Transformer-XL attention over the previous L tokens (:class:`smoe.models.xl.
    XLAttention`), whose memory ``xl=(h_cache, key_pe)`` the caller hands to ``forward``
    (h_cache: the block inputs of the previous L tokens; the block applies its ln1 to them as to
    x). An attention-aware router then gets probabilities ``[B, H, S, L + S]``.
    """

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        ffn: nn.Module,
        dropout: float = 0.0,
        layout: str = "pre_ln",
        attn_span: int | None = None,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"LMBlock: layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        if attn_span is None:
            self.attn: nn.Module = CausalSelfAttention(d_model, n_heads, dropout)
        else:
            self.attn = XLAttention(d_model, n_heads, attn_span, dropout)
        self.ffn = ffn
        moe = isinstance(ffn, (MoELayer, MomentumMoE))
        self.ln_m = nn.LayerNorm(d_model) if layout == "post_ln" and moe else None
        if layout == "pre_ln_out":
            self.ln_out = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    # Class-level default keeps blocks pickled whole before layouts existed working (ln_m is read
    # with getattr: a class attribute would shadow the registered submodule).
    layout: str = "pre_ln"

    @property
    def moe(self) -> MoELayer | None:
        """The block's MoE layer (inside its momentum wrapper, if any), or None."""
        ffn = self.ffn.moe if isinstance(self.ffn, MomentumMoE) else self.ffn
        return ffn if isinstance(ffn, MoELayer) else None

    def needs_attention(self) -> bool:
        info = registered_info(self.moe.router) if self.moe is not None else None
        return info is not None and info.needs_attention

    def forward(
        self,
        x: Tensor,
        context: RoutingContext,
        state: MomentumState | None = None,
        xl: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, MoEAux | None, MomentumState | None]:
        post = self.layout == "post_ln"
        if isinstance(self.attn, XLAttention):
            if xl is None:
                raise ValueError("LMBlock: Transformer-XL attention needs xl=(h_cache, key_pe)")
            h_cache, key_pe = xl
            a, probs = self.attn(
                x if post else self.ln1(x), h_cache if post else self.ln1(h_cache), key_pe
            )
            probs = probs if self.needs_attention() else None
        else:
            a, probs = self.attn(x if post else self.ln1(x), need_weights=self.needs_attention())
        x = self.ln1(x + self.drop(a)) if post else x + self.drop(a)
        h = x if post else self.ln2(x)
        aux = None
        if isinstance(self.ffn, MomentumMoE):
            if state is None:
                raise ValueError("LMBlock: a momentum MoE layer needs the momentum state")
            y, state, aux = self.ffn(h, state, context._replace(attention=probs))
        elif isinstance(self.ffn, MoELayer):
            y, aux = self.ffn(h, context._replace(attention=probs))
            y = self.drop(y)
        else:
            y = self.drop(self.ffn(h))
        if not post:
            ln_out = getattr(self, "ln_out", None)
            return (x + y if ln_out is None else ln_out(x + y)), aux, state
        ln_m = getattr(self, "ln_m", None)
        if ln_m is not None:
            y = ln_m(x + y)
        return self.ln2(x + y), aux, state


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
        layout: ``"pre_ln"`` (default, the leaderboard's), ``"post_ln"`` (MomentumSMoE's
            WikiText-103 reference block) or ``"pre_ln_out"`` (V-MoE's momentum block, a
            LayerNorm after each residual); see :class:`LMBlock`.
        momentum_options: for a stack-level router (``router_info(router).stack``: "momentum",
            "adam", "robust_momentum"), the options of the :class:`smoe.momentum.MomentumMoE`
            every MoE layer is wrapped in (mu, gamma, sign, ...; its dropout defaults to
            ``dropout``). The momentum state starts as zeros after the embeddings at every
            forward and passes through the blocks.
        layer_options: for a layer-level router (``router_info(router).layer``: "s2moe"), the
            options of the layer built in place of :class:`smoe.MoELayer`
            (:class:`smoe.S2MoELayer`'s noise form, statistics, noisy routing, eval output,
            InfoNCE temperature, ...). S2MoE's "sequence" noise statistics span a training
            sequence, later tokens too (both re-implementations do this); evaluation draws no
            noise, so validation stays causal.
        activation, expert_bias, expert_dropout: the experts' activation (``"gelu"``,
            ``"relu"``, ``"swiglu"``), per-expert biases and dropout inside each expert
            (MomentumSMoE's reference experts: ``"relu"``, biases, dropout = the model's).
        attention: ``"causal"`` (default: causal self-attention over the sequence, learned
            absolute position embeddings) or ``"xl"`` (Transformer-XL attention over the previous
            ``attn_span`` tokens with relative position logits ``key_pe`` shared by the layers and
            no absolute positions: the fastmoe / MomentumSMoE backbone, specs/graph_routing.md
            §2.3).
        attn_span: L for ``attention="xl"`` (default ``context``).
        xl_memory: with ``"xl"``, carry each layer's memory (its inputs of the last L tokens,
            detached) from one forward to the next, as Transformer-XL does over consecutive
            segments; it starts as zeros and is reset by :meth:`reset_memory`, by a change of
            train/eval mode (``train()``/``eval()``), batch size, device or dtype. False: zeros
            at every forward.

    ``forward(idx [B, S])`` returns ``(logits [B, S, vocab], [MoEAux per MoE layer])``.
    """

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict
    stack: str | None = None  # class-level default for models pickled before momentum stacks

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
        layout: str = "pre_ln",
        momentum_options: Mapping[str, Any] | None = None,
        layer_options: Mapping[str, Any] | None = None,
        activation: str = "gelu",
        expert_bias: bool = False,
        expert_dropout: float = 0.0,
        attention: str = "causal",
        attn_span: int | None = None,
        xl_memory: bool = True,
    ) -> None:
        super().__init__()
        self.causal_training = causal_training
        if attention not in ATTENTIONS:
            raise ValueError(f"CharLM: attention must be one of {ATTENTIONS}, got {attention!r}")
        if attn_span is not None and attention != "xl":
            raise ValueError("CharLM: attn_span applies to attention='xl' only")
        self.attention, self.xl_memory = attention, bool(xl_memory)
        span = (attn_span if attn_span is not None else context) if attention == "xl" else None
        if span is not None and (isinstance(span, bool) or not isinstance(span, int) or span < 1):
            raise ValueError(f"CharLM: attn_span must be an int >= 1, got {attn_span!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"CharLM: layout must be one of {LAYOUTS}, got {layout!r}")
        self.stack = router_info(router).stack
        if momentum_options and self.stack is None:
            raise ValueError(
                f"CharLM: momentum_options apply to a stack-level router (momentum, adam, "
                f"robust_momentum), not {router!r}"
            )
        if layer_options and router_info(router).layer is None:
            raise ValueError(
                f"CharLM: layer_options apply to a layer-level router (s2moe), not {router!r}"
            )
        momentum = {"dropout": dropout, **dict(momentum_options or {})}
        if "kind" in momentum or "moe_index" in momentum:
            raise ValueError("CharLM: momentum_options must not set kind or moe_index")
        if moe_every < 1:
            raise ValueError(f"CharLM: moe_every must be >= 1, got {moe_every}")
        if k < 1:
            raise ValueError(f"CharLM: k must be >= 1, got {k}")
        self.context = context
        d_ff = d_ff if d_ff is not None else 4 * d_model // k
        self.tok = nn.Embedding(vocab_size, d_model)
        if span is None:
            self.pos = nn.Embedding(context, d_model)
        else:
            if n_heads < 1 or d_model % n_heads:
                raise ValueError(f"CharLM: d_model={d_model} not divisible by n_heads={n_heads}")
            # relative position logits shared by the layers, as in the reference (randn init)
            self.key_pe = nn.Parameter(torch.randn(1, d_model // n_heads, span))
        self._mems: list[Tensor] | None = None
        self._mem_key: tuple | None = None
        blocks, moe_index = [], 0
        for i in range(n_layers):
            if (i + 1) % moe_every == 0:
                ffn: nn.Module = moe_layer(
                    d_model,
                    d_ff,
                    num_experts,
                    k,
                    router=router,
                    router_options=router_options,
                    layer_options=layer_options,
                    layer_index=i,
                    activation=activation,
                    bias=expert_bias,
                    expert_dropout=expert_dropout,
                )
                if self.stack is not None:
                    ffn = MomentumMoE(ffn, kind=self.stack, moe_index=moe_index, **momentum)
                moe_index += 1
            else:
                ffn = DenseFFN(d_model, 4 * d_model)
            blocks.append(LMBlock(d_model, n_heads, ffn, dropout, layout, span))
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
        return [b.moe for b in self.blocks if b.moe is not None]

    # class-level defaults for models pickled before Transformer-XL attention existed
    attention: str = "causal"
    xl_memory: bool = True
    _mems: list[Tensor] | None = None
    _mem_key: tuple | None = None

    def reset_memory(self) -> None:
        """Forget the Transformer-XL memory and the routers' caches aligned with it (a router's
        ``reset_memory``, e.g. AttentionAwareRouter's ``memory="cache"``)."""
        self._mems, self._mem_key = None, None
        for moe in self.moe_layers():
            reset = getattr(moe.router, "reset_memory", None)
            if reset is not None:
                reset()

    def train(self, mode: bool = True) -> CharLM:
        if mode != self.training:  # training and evaluation never share a memory
            self.reset_memory()
        return super().train(mode)

    def _memories(self, x: Tensor) -> list[Tensor]:
        key = (x.shape[0], x.device, x.dtype)
        if not self.xl_memory or self._mems is None or self._mem_key != key:
            self.reset_memory()
            self._mem_key = key
            span = self.key_pe.shape[-1]
            return [x.new_zeros(x.shape[0], span, x.shape[-1]) for _ in self.blocks]
        return self._mems

    def forward(self, idx: Tensor, *, step: int | None = None) -> tuple[Tensor, list[MoEAux]]:
        B, S = idx.shape
        if S > self.context:
            raise ValueError(f"CharLM: sequence length {S} exceeds context={self.context}")
        xl = self.attention == "xl"
        x = self.tok(idx)
        if not xl:
            x = x + self.pos(torch.arange(S, device=idx.device))
        causal = self.causal_training or not self.training
        context = RoutingContext(batch_shape=(B, S), causal=causal, step=step)
        auxes = []
        state = MomentumState.zeros(x, self.stack) if self.stack is not None else None
        mems = self._memories(x) if xl else None
        new_mems = []
        for i, block in enumerate(self.blocks):
            if mems is not None:
                span = mems[i].shape[1]
                new_mems.append(torch.cat([mems[i], x], dim=1)[:, -span:].detach())
                x, aux, state = block(x, context, state, xl=(mems[i], self.key_pe))
            else:
                x, aux, state = block(x, context, state)
            if aux is not None:
                auxes.append(aux)
        if xl and self.xl_memory:
            self._mems = new_mems
        return self.head(self.ln_f(x)), auxes
