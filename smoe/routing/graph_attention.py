"""Attention-Aware routing (Nguyen, Tran, Nguyen and Baraniuk 2025, arXiv 2505.00792;
specs/graph_routing.md): the mix of smoe/routing/graph.py over the attention probabilities of the
block's own attention, with the Transformer-XL memory options of §2.3."""

from __future__ import annotations

import torch
from torch import Tensor

from smoe import ops
from smoe.routing import _graph as G
from smoe.routing.graph import _GraphRouter, graph_causal
from smoe.routing.registry import register_router

__all__ = ["AttentionAwareRouter"]


class AttentionAwareRouter(_GraphRouter):
    """Attention-Aware (S)MoE (Nguyen et al. 2025, arXiv 2505.00792; specs/graph_routing.md): the
    mix of :class:`SimilarityAwareRouter` over A = the attention probabilities of the block's own
    attention layer, ``context.attention [B, H, S, S]`` (pre-dropout; ``[B, S, S]`` is one head).

    ``heads="mean"``: A = the mean over heads (in fp32); ``"max"``: the max over heads, each row
    renormalised; an int h: head h alone. The sequences are the attention's: flat tokens
    ``[T, d]`` (T = B·S) are read row-major as ``[B, S, d]``. When causal (``causal``, or
    ``context.causal`` when None) the entries j > i are zeroed (a no-op, bit for bit, on causal
    attention; rows are not renormalised). A is mixed by :func:`smoe.ops.graph_mix`.
    ``detach_graph``: no gradient into A, hence none into the attention's Q and K through the
    routing.

    Transformer-XL attention (``[B, H, S, C + S]``, the C memory columns first, as
    :class:`smoe.models.xl.XLAttention` hands it on; §2.3) is read by ``memory``: ``"drop"``
    (default, stateless) keeps the current-block columns and gives each token the row's mass
    off them as its own weight (rows sum to 1; token 0 of a block keeps only itself);
    ``"cache"`` uses the whole row over ``[cache; block]``, where the cache holds the detached
    logits of the layer's last C tokens (zeros after :meth:`reset_memory`, the logits of a zero
    memory; the probabilities of the cached logits with ``mix="probs"``). The cache is kept
    aligned with the backbone's memory: :meth:`smoe.CharLM.reset_memory` resets both. Attention
    within the block (C = 0) ignores ``memory``.

    ``context.padding_mask`` (True for real tokens): the columns of padding tokens are zeroed
    (but a token's own), rows not renormalised (with ``memory="drop"`` the self-weight takes the
    removed mass).

    Args: those of :class:`SimilarityAwareRouter` without sim, tau, window, topm and fused,
    plus ``heads`` and ``memory``. Errors at forward: attention missing, of the wrong shape for
    the tokens, not floating, on another device, or ``heads`` >= H (each a ValueError naming it).
    """

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict
    who = "AttentionAwareRouter"

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        *,
        mix: str = "poe",
        lam: float | None = None,
        heads: str | int = "mean",
        memory: str = "drop",
        causal: bool | None = None,
        detach_graph: bool = False,
        top1_weight: str = "one",
        bias: bool = False,
        aux: bool = True,
        init_scale: float = 0.1,
    ) -> None:
        super().__init__(
            d_model,
            num_experts,
            k,
            mix=mix,
            lam=lam,
            causal=causal,
            detach_graph=detach_graph,
            top1_weight=top1_weight,
            bias=bias,
            aux=aux,
            init_scale=init_scale,
        )
        if isinstance(heads, str):
            valid = heads in G.HEADS
        else:
            valid = isinstance(heads, int) and not isinstance(heads, bool) and heads >= 0
        if not valid:
            raise ValueError(
                f"{self.who}: heads must be 'mean', 'max' or a head index >= 0, got {heads!r}"
            )
        self.heads = heads
        G.check_choice(self.who, "memory", memory, G.MEMORIES)
        self.memory = memory
        self._z_cache: Tensor | None = None  # memory="cache": detached logits [B, C, E]

    # class-level defaults for routers pickled before the memory option existed
    memory: str = "drop"
    _z_cache: Tensor | None = None

    def extra_repr(self) -> str:
        return f"{self._repr_common()}, heads={self.heads!r}, memory={self.memory!r}"

    def reset_memory(self) -> None:
        """Forget the cached logits of ``memory="cache"`` (the next forward starts from zeros)."""
        self._z_cache = None

    def _cached(self, z: Tensor, C: int) -> Tensor:
        """The cache [B, C, E] for this forward (zeros when absent or of another shape), and the
        cache of the next one: the last C logits of [cache; z], detached."""
        cache = self._z_cache
        want = (z.shape[0], C, z.shape[-1])
        if cache is None or tuple(cache.shape) != want or cache.device != z.device:
            cache = z.new_zeros(want)
        cache = cache.to(z.dtype)
        self._z_cache = torch.cat([cache, z.detach()], dim=1)[:, -C:]
        return cache

    def _propagate(self, u, z, v, self_coef, causal, context):
        B, S = z.shape[0], z.shape[1]
        attention = None if context is None else context.attention
        A = G.attention_graph(self.who, attention, self.heads, B * S, context, z.dtype, z.device)
        if A.shape[0] != B:  # no 2-D batch_shape: take the sequences from the attention
            v = v.reshape(A.shape[0], A.shape[1], v.shape[-1])
        if self.detach_graph:
            A = A.detach()
        S, C = A.shape[1], A.shape[2] - A.shape[1]
        keep = G.padding_keep(self.who, context, A.shape[0], S, A.device)
        if keep is not None:  # padding tokens are nobody's neighbour but their own
            A = _mask_block(A, G.keep_columns(keep))
        if C and self.memory == "drop":
            return ops.graph_mix(v, G.drop_memory(A, causal), self_coef=self_coef, lam=self.lam)
        ok = G.allowed(S, causal, None, A.device)
        if ok is not None:
            A = _mask_block(A, ok)
        if not C:
            return ops.graph_mix(v, A, self_coef=self_coef, lam=self.lam)
        cache = self._cached(z.detach().reshape(A.shape[0], S, -1), C)
        if self.mix == "probs":
            cache = torch.softmax(cache, dim=-1)
        return ops.graph_mix(v, A, self_coef=self_coef, lam=self.lam, cache=cache)


def _mask_block(A: Tensor, ok: Tensor) -> Tensor:
    """Zero the current-block entries of ``A [B, S, C + S]`` where ``ok`` (``[S, S]`` or
    ``[B, S, S]``) is False; the C memory columns are left as they are."""
    C = A.shape[-1] - A.shape[-2]
    block = A[..., C:].masked_fill(~ok, 0.0)
    return torch.cat([A[..., :C], block], dim=-1) if C else block


register_router(
    "attention_aware",
    AttentionAwareRouter,
    description="Attention-Aware SMoE (Nguyen et al. 2025, arXiv 2505.00792): gate logits mixed "
    "over the block's attention probabilities, then top-k",
    causal=graph_causal,
    needs_attention=True,
    aux_losses=("balance", "z"),
)
