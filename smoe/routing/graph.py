"""Similarity-Aware and Attention-Aware routing with a graph of tokens (Nguyen, Tran, Nguyen and
Baraniuk 2025, "Improving Routing in Sparse Mixture of Experts with Graph of Tokens",
arXiv 2505.00792; specs/graph_routing.md). Every equation is the spec's inferred design (§2): the
paper's body and code were not available. The graphs: smoe/routing/_graph.py; the
attention-aware router: smoe/routing/graph_attention.py."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from smoe import ops
from smoe.losses import router_z_loss, switch_balance_loss
from smoe.routing import _graph as G
from smoe.routing.base import Routing, gate_dtype
from smoe.routing.context import RoutingContext
from smoe.routing.registry import register_router

__all__ = ["SimilarityAwareRouter"]

_EPS = 1e-9  # in the renormalisation of p̃ over the selected experts (§2, §7)
_FIXED = 2.0**-24  # the unit of the entropy sums of routing_stats()


class _GraphRouter(nn.Module):
    """What both graph-of-tokens routers share: the linear gate, the mix (§2), top-k after the
    mix, the losses and the entropy statistics. A subclass supplies the propagation
    ``_propagate(u, z, v, self_coef, causal, context) -> self_coef · v + λ A v`` per sequence."""

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict
    who = "GraphRouter"
    # A process group for global-batch balance statistics (smoe.parallel.shard_experts with
    # global_stats=True sets it; see smoe.losses.switch_balance_loss). None: this rank's tokens.
    stats_group: Any = None

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int,
        *,
        mix: str,
        lam: float | None,
        causal: bool | None,
        detach_graph: bool,
        top1_weight: str,
        bias: bool,
        aux: bool,
        init_scale: float,
    ) -> None:
        super().__init__()
        who = self.who
        if d_model < 1:
            raise ValueError(f"{who}: d_model must be >= 1, got {d_model}")
        if num_experts < 1:
            raise ValueError(f"{who}: num_experts must be >= 1, got {num_experts}")
        if not 1 <= k <= num_experts:
            raise ValueError(f"{who}: k must be in [1, num_experts={num_experts}], got {k}")
        G.check_choice(who, "mix", mix, G.MIXES)
        G.check_choice(who, "top1_weight", top1_weight, G.TOP1_WEIGHTS)
        G.check_causal(who, causal)
        if not init_scale > 0:
            raise ValueError(f"{who}: init_scale must be > 0, got {init_scale}")
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.mix, self.lam = mix, G.resolve_lam(who, mix, lam)
        self.causal, self.detach_graph = causal, bool(detach_graph)
        self.top1_weight, self.aux, self.init_scale = top1_weight, bool(aux), init_scale
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.bias = nn.Parameter(torch.empty(num_experts)) if bias else None
        # [Σ H(p̃), Σ H(p), forwards] summed on the device, read only by routing_stats(): int64
        # fixed point (2^-24 nats), so that .half() or .bfloat16() of the model leaves it exact
        self.register_buffer("entropy_sums", torch.zeros(3, dtype=torch.int64), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = math.sqrt(self.init_scale / self.d_model)  # TopKRouter's initialisation
        nn.init.trunc_normal_(self.weight, std=std, a=-2 * std, b=2 * std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _repr_common(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, "
            f"mix={self.mix!r}, lam={self.lam}, causal={self.causal}, "
            f"detach_graph={self.detach_graph}, top1_weight={self.top1_weight!r}, "
            f"bias={self.bias is not None}, aux={self.aux}"
        )

    def routing_stats(self) -> dict[str, float]:
        """Mean routing entropies (nats) over the forwards since construction (or
        :meth:`reset_routing_stats`): ``entropy_mixed`` = mean_t H(p̃_t), ``entropy_gate`` =
        mean_t H(p_t) of the plain gate, and ``forwards``. One device->host read, here only."""
        s = self.entropy_sums.detach().cpu().tolist()
        n = s[2]
        mixed, gate = (s[0] * _FIXED / n, s[1] * _FIXED / n) if n else (math.nan, math.nan)
        return {"entropy_mixed": mixed, "entropy_gate": gate, "forwards": n}

    def reset_routing_stats(self) -> None:
        self.entropy_sums.zero_()

    def _renormalize(self) -> bool:
        return self.k > 1 or self.top1_weight == "one"

    def forward(self, x: Tensor, context: RoutingContext | None = None) -> Routing:
        """Route ``x [T, d_model]`` (tokens grouped per sequence by ``context.batch_shape``);
        returns :class:`Routing` with the mixed logits (``log p̃`` for ``mix="probs"``).

        Weights float32 (float64 for float64 x, also under autocast)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = ops.gate_linear(x, self.weight, self.bias)
            T = z.shape[0]
            if self.lam == 0 or T == 0:  # the baseline gate, bit for bit (§8.1)
                weight, expert = ops.topk_softmax(z, self.k, renormalize=self._renormalize())
                mixed, p_mixed = z, None
            else:
                B, S = G.groups(self.who, T, context)
                causal = G.is_causal(self.causal, context)
                E = self.num_experts
                zs = z.view(B, S, E)
                if self.mix == "probs":
                    v, self_coef = torch.softmax(zs, dim=-1), 1.0 - self.lam
                else:
                    v, self_coef = zs, 1.0 if self.mix == "poe" else 1.0 - self.lam
                u = x.to(gate_dtype(x)).reshape(B, S, -1)  # the similarity's tokens
                out = self._propagate(u, zs, v, self_coef, causal, context)
                out = out.reshape(T, E)
                if self.mix == "probs":
                    weight, expert, mixed, p_mixed = self._select_probs(out)
                else:
                    weight, expert = ops.topk_softmax(out, self.k, renormalize=self._renormalize())
                    mixed, p_mixed = out, None
            aux: dict[str, Tensor] = {}
            if self.aux:
                # balance on what routes (p̃ and its selection); z-loss on the gate's own logits
                aux["balance"] = switch_balance_loss(
                    mixed, expert, self.num_experts, stats_group=self.stats_group
                )
                aux["z"] = router_z_loss(z)
            if T:
                self._record(z, mixed, p_mixed)
        return Routing(expert=expert, weight=weight, logits=mixed, aux=aux)

    def _select_probs(self, p_mixed: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Top-k of p̃ (ties: lower expert, as ``topk_softmax``); weights p̃ over the selection
        renormalised (+1e-9); at k = 1 the constant 1 or p̃ itself (``top1_weight``)."""
        logp = torch.log(p_mixed.clamp_min(torch.finfo(p_mixed.dtype).tiny))
        expert = ops.topk_softmax(logp.detach(), self.k).expert
        sel = torch.gather(p_mixed, 1, expert.long())
        if self.k > 1:
            weight = sel / (sel.sum(dim=-1, keepdim=True) + _EPS)
        elif self.top1_weight == "one":
            weight = torch.ones_like(sel)
        else:
            weight = sel
        return weight, expert, logp, p_mixed

    def _record(self, z: Tensor, mixed: Tensor, p_mixed: Tensor | None) -> None:
        with torch.no_grad():
            z, mixed = z.detach(), mixed.detach()
            h_gate = G.mean_entropy_of_logits(z)
            if p_mixed is not None:
                h_mixed = G.mean_entropy_of_probs(p_mixed.detach())
            else:
                h_mixed = G.mean_entropy_of_logits(mixed)
            one = torch.full((), _FIXED, dtype=h_gate.dtype, device=h_gate.device)
            step = torch.stack([h_mixed, h_gate, one]) / _FIXED
            self.entropy_sums.add_(step.round().to(torch.int64))

    def _propagate(
        self,
        u: Tensor,
        z: Tensor,
        v: Tensor,
        self_coef: float,
        causal: bool,
        context: RoutingContext | None,
    ) -> Tensor:
        raise NotImplementedError


class SimilarityAwareRouter(_GraphRouter):
    """Similarity-Aware (S)MoE (Nguyen et al. 2025, arXiv 2505.00792; specs/graph_routing.md):
    a linear gate whose logits are mixed over a token-similarity graph of each sequence before
    top-k.

    Per sequence of S tokens u (the router input), gate logits z = W u (+ b), p = softmax(z):
    ``mix="poe"``: z̃ = z + λ A z (a product of experts); ``"logits"``: z̃ = (1 − λ) z + λ A z;
    ``"probs"``: p̃ = (1 − λ) p + λ A p. p̃ = softmax(z̃); the k largest p̃ are the experts,
    their p̃ renormalised the weights (k = 1: ``top1_weight``). ``A = softmax_{j ∈ N(i)}(sim(u_i,
    u_j) / τ)``, fp32 (fp64 for fp64 x), row max subtracted; N(i) = the sequence, j <= i when
    causal, |i − j| < ``window`` (causal: i − window < j <= i), the ``topm`` most similar.
    Without window and topm the dense graph goes through ``scaled_dot_product_attention`` (never
    ``[S, S]`` on CUDA); otherwise A is built and mixed by :func:`smoe.ops.graph_mix`.

    Sequences: ``context.batch_shape`` ``(B, S)`` (``(..., S)``: all leading dims are batch);
    without it, or 1-D, the T tokens are one sequence. λ = 0 is :class:`smoe.TopKRouter` bit for
    bit (``renormalize=False`` at k = 1 with ``top1_weight="prob"``). ``context.padding_mask``
    (``batch_shape`` bool, True for real tokens): a padding token is no other token's neighbour
    (it keeps only itself); the graph is then built explicitly.

    Args:
        d_model: token width.
        num_experts: E.
        k: experts per token (the paper's experiments: 2).
        mix: ``"poe"`` (default), ``"logits"`` or ``"probs"`` (§2, §2.1).
        lam: λ >= 0 (<= 1 for the convex mixes); None: 1.0 for poe, 0.5 otherwise.
        sim: ``"dot"`` (u·u/√d), ``"cosine"`` or ``"router"`` (z·z/√E).
        tau: similarity temperature τ > 0.
        causal: None follows ``context.causal``; True/False force the mask on/off.
        window: None (the whole sequence) or the neighbourhood half-width (>= 1).
        topm: None or the number of neighbours per row (>= 1) after the mask.
        detach_graph: no gradient through A (into u, or z with ``sim="router"``).
        top1_weight: k = 1 weight: ``"one"`` (renormalised, 1) or ``"prob"`` (p̃).
        bias: a learned per-expert gate bias (zeros at init).
        aux: return the balance loss (on p̃ and the selection) and the z-loss (on z), as
            :class:`smoe.TopKRouter`.
        init_scale: gate weights ~ truncated normal, std sqrt(init_scale / d_model).
        fused: use ``scaled_dot_product_attention`` for the dense graph (False: always build A;
            the same routing to rounding).
    """

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict
    who = "SimilarityAwareRouter"

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        *,
        mix: str = "poe",
        lam: float | None = None,
        sim: str = "dot",
        tau: float = 1.0,
        causal: bool | None = None,
        window: int | None = None,
        topm: int | None = None,
        detach_graph: bool = False,
        top1_weight: str = "one",
        bias: bool = False,
        aux: bool = True,
        init_scale: float = 0.1,
        fused: bool = True,
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
        G.check_choice(self.who, "sim", sim, G.SIMS)
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
            raise ValueError(f"{self.who}: tau must be a float > 0, got {tau!r}")
        if not math.isfinite(tau):
            raise ValueError(f"{self.who}: tau must be finite, got {tau!r}")
        G.check_positive_int(self.who, "window", window)
        G.check_positive_int(self.who, "topm", topm)
        self.sim, self.tau, self.window, self.topm = sim, float(tau), window, topm
        self.fused = bool(fused)

    def extra_repr(self) -> str:
        return (
            f"{self._repr_common()}, sim={self.sim!r}, tau={self.tau}, window={self.window}, "
            f"topm={self.topm}, fused={self.fused}"
        )

    def _propagate(self, u, z, v, self_coef, causal, context):
        q, scale = G.similarity_query(self.sim, u, z, self.tau)
        if self.detach_graph:
            q = q.detach()
        keep = G.padding_keep(self.who, context, z.shape[0], z.shape[1], z.device)
        if self.fused and self.window is None and self.topm is None and keep is None:
            return G.fused_similarity_mix(
                q, scale, v, causal=causal, self_coef=self_coef, lam=self.lam
            )
        A = G.similarity_graph(
            q, scale, causal=causal, window=self.window, topm=self.topm, keep=keep
        )
        return ops.graph_mix(v, A, self_coef=self_coef, lam=self.lam)


def graph_causal(router: nn.Module) -> bool:
    return router.causal is not False


register_router(
    "similarity_aware",
    SimilarityAwareRouter,
    description="Similarity-Aware SMoE (Nguyen et al. 2025, arXiv 2505.00792): gate logits mixed "
    "over a token-similarity graph, then top-k",
    causal=graph_causal,
    aux_losses=("balance", "z"),
)
