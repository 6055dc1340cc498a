"""Selective Sinkhorn Routing (SSR, Nguyen et al. 2025) on :func:`smoe.ops.sinkhorn`.

Spec: specs/sinkhorn_ssr.md. On a random fraction p of training forwards the router solves an
entropic transport problem between the tokens of the batch and the experts, so a token's
training-time routing then depends on the other tokens, later ones included (through the column
marginals); at inference it routes every token on its own. Shared parts: smoe/routing/_transport.py;
S-BASE: smoe/routing/sbase.py.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from smoe import ops
from smoe.routing._transport import (
    COSTS,
    DRAWS,
    GRAD_MODES,
    SCOPES,
    WEIGHTS_FROM,
    _check_common,
    _choice,
    _init_weight,
    _logits,
    _padding_mask,
    _positive,
    _solve_rows,
    sinkhorn_draw,
)
from smoe.routing.base import Routing
from smoe.routing.context import RoutingContext
from smoe.routing.registry import register_router

__all__ = ["SelectiveSinkhornRouter", "sinkhorn_draw"]


class SelectiveSinkhornRouter(nn.Module):
    """Selective Sinkhorn Routing (specs/sinkhorn_ssr.md §3-§5): a linear softmax top-k router
    that, on a random fraction p of training forwards, takes its gates from an entropic
    optimal-transport plan balancing the tokens over the experts.

    Sinkhorn forward: ``C = softmax(ℓ)`` (or ℓ), plus Gaussian ``noise_std``; ``Π = sinkhorn(C,
    eps=xi)`` with marginals row 1, column T/E; the k largest entries of each row of Π,
    renormalised to sum to ``route_scale`` (§4). Otherwise, and always in eval mode: softmax over
    the top-k logits (in training on ``ℓ + N(0, logit_noise_std²)``); at p = 0 this is
    :class:`smoe.TopKRouter` bit for bit, without its losses. Weights float32 (float64 for
    float64 x, also under autocast). No auxiliary loss, no z-loss (``Routing.aux`` is empty).

    Draws: Sinkhorn iff ``sinkhorn_draw(seed, step, layer) < p``, ``step = context.step`` (else
    the count of this router's training forwards), ``layer = context.layer_index`` with
    ``"per_layer"`` (None, shared by all layers, with ``"per_step"`` or without a layer index).
    Host arithmetic only: no RNG state, no sync. ``train_steps``, ``sinkhorn_steps``,
    :attr:`sinkhorn_rate` and ``last_used_sinkhorn`` record the draws; ``last_transport`` keeps
    the last :class:`smoe.ops.Sinkhorn` result, detached (``iters_done``, ``col_err``: log them
    without a sync).

    The problem (§3.1) holds the real tokens (``context.padding_mask``; padding tokens take the
    plain router) of this rank (``scope="local"``) or of the data-parallel group (``"global"``:
    the costs are all-gathered with gradient; every rank must route the same T and draw alike,
    which equal ``step``/``layer_index`` guarantee; one rank or no process group: local).

    Causal only in eval mode or at p = 0: on a Sinkhorn forward a token's gates depend on every
    token of the problem, later ones included (the column marginals). torch.compile: eval traces
    with ``fullgraph=True``; a training forward traces too, but the draw is Python control flow
    on the step and on int counters, so every step recompiles (fullgraph then stops at dynamo's
    recompile limit).

    Args:
        d_model: token width.
        num_experts: E.
        k: experts per token.
        p: probability of a Sinkhorn forward in training, in [0, 1].
        draw: ``"per_layer"`` or ``"per_step"`` (one draw per step shared by all layers).
        grad_mode: ``"unrolled"`` (gradient through the iterations, the op's backward) or
            ``"detach"`` (the Sinkhorn input is detached: with ``weights_from="plan"`` the router
            gets exactly zero gradient on Sinkhorn forwards).
        weights_from: ``"plan"`` (§4) or ``"router_softmax"``: the plan selects, the weights are
            ``softmax(ℓ)`` at the selection renormalised over the k (the authors' prototype),
            times ``route_scale``; the plan is then solved without gradient.
        cost: ``"softmax"`` (C = softmax(ℓ)) or ``"logits"`` (C = ℓ).
        xi: entropic regularisation ξ > 0.
        max_iter: Sinkhorn iterations at most (>= 1).
        tol: stop when both residual norms are <= tol, checked every 10 iterations (on CUDA a
            device->host sync per check); 0 runs ``max_iter`` iterations, no sync.
        noise_std: std of the Gaussian noise on C (>= 0).
        logit_noise_std: std of the Gaussian noise on the plain branch's logits (>= 0).
        route_scale: the sum of a Sinkhorn forward's k gates (> 0).
        scope: ``"local"`` or ``"global"``.
        seed: seed of the draws.
        init_scale: weights ~ truncated normal, std sqrt(init_scale / d_model) (TopKRouter's).
    """

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        *,
        p: float = 0.001,
        draw: str = "per_layer",
        grad_mode: str = "unrolled",
        weights_from: str = "plan",
        cost: str = "softmax",
        xi: float = 0.05,
        max_iter: int = 100,
        tol: float = 1e-4,
        noise_std: float = 0.0,
        logit_noise_std: float = 0.0,
        route_scale: float = 1.0,
        scope: str = "local",
        seed: int = 0,
        init_scale: float = 0.1,
    ) -> None:
        super().__init__()
        who = "SelectiveSinkhornRouter"
        _check_common(who, d_model, num_experts, k, max_iter)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{who}: p must be in [0, 1], got {p}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"{who}: seed must be an int, got {type(seed).__name__}")
        _choice(who, "draw", draw, DRAWS)
        _choice(who, "grad_mode", grad_mode, GRAD_MODES)
        _choice(who, "weights_from", weights_from, WEIGHTS_FROM)
        _choice(who, "cost", cost, COSTS)
        _choice(who, "scope", scope, SCOPES)
        _positive(who, "xi", xi)
        _positive(who, "tol", tol, zero_ok=True)
        _positive(who, "noise_std", noise_std, zero_ok=True)
        _positive(who, "logit_noise_std", logit_noise_std, zero_ok=True)
        _positive(who, "route_scale", route_scale)
        _positive(who, "init_scale", init_scale)
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.init_scale = init_scale
        self.p, self.draw, self.grad_mode, self.weights_from = p, draw, grad_mode, weights_from
        self.cost, self.xi, self.max_iter, self.tol = cost, xi, max_iter, tol
        self.noise_std, self.logit_noise_std = noise_std, logit_noise_std
        self.route_scale, self.scope, self.seed = route_scale, scope, seed
        self.train_steps = 0  # training forwards since reset_sinkhorn_stats
        self.sinkhorn_steps = 0  # of which used Sinkhorn
        self.last_used_sinkhorn = False
        self.last_transport: ops.Sinkhorn | None = None
        self._own_step = 0  # the step of a context without one (never reset)
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_weight(self.weight, self.init_scale)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, p={self.p}, "
            f"draw={self.draw!r}, grad_mode={self.grad_mode!r}, "
            f"weights_from={self.weights_from!r}, cost={self.cost!r}, xi={self.xi}, "
            f"max_iter={self.max_iter}, tol={self.tol}, scope={self.scope!r}"
        )

    @property
    def sinkhorn_rate(self) -> float:
        """The realised fraction of training forwards that used Sinkhorn (0 before any)."""
        return self.sinkhorn_steps / self.train_steps if self.train_steps else 0.0

    def routing_stats(self) -> dict[str, float]:
        """What a training harness logs per layer (smoe.examples.charlm's ``router_stats``): the
        training forwards, those that used Sinkhorn, and the realised rate."""
        return {
            "train_steps": self.train_steps,
            "sinkhorn_steps": self.sinkhorn_steps,
            "sinkhorn_rate": self.sinkhorn_rate,
        }

    def reset_sinkhorn_stats(self) -> None:
        """Zero ``train_steps`` and ``sinkhorn_steps`` (e.g. per logging window); the draws do
        not change."""
        self.train_steps = self.sinkhorn_steps = 0

    def _draw(self, context: RoutingContext | None) -> bool:
        step = self._own_step if context is None or context.step is None else int(context.step)
        layer = context.layer_index if self.draw == "per_layer" and context is not None else None
        self._own_step += 1
        use = sinkhorn_draw(self.seed, step, layer) < self.p
        self.train_steps += 1
        self.sinkhorn_steps += int(use)
        self.last_used_sinkhorn = use
        return use

    def forward(self, x: Tensor, context: RoutingContext | None = None) -> Routing:
        """Route ``x [T, d_model]``; returns :class:`Routing`. A training forward draws (see the
        class); eval never runs Sinkhorn nor adds noise."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = _logits(x, self.weight)
            if self.training and self._draw(context):
                weight, expert = self._sinkhorn_gates(logits, context)
            else:
                selection = logits
                if self.training and self.logit_noise_std > 0:
                    selection = logits + torch.randn_like(logits) * self.logit_noise_std
                weight, expert = ops.topk_softmax(selection, self.k, renormalize=True)
        return Routing(expert=expert, weight=weight, logits=logits, aux={})

    def _sinkhorn_gates(
        self, logits: Tensor, context: RoutingContext | None
    ) -> tuple[Tensor, Tensor]:
        mask = _padding_mask(context, logits.shape[0], "SelectiveSinkhornRouter")
        from_plan = self.weights_from == "plan"
        z = logits if from_plan and self.grad_mode == "unrolled" else logits.detach()
        C = torch.softmax(z, dim=-1) if self.cost == "softmax" else z
        if self.noise_std > 0:
            C = C + torch.randn_like(C) * self.noise_std

        def solve(problem: Tensor) -> tuple[Tensor, Tensor]:
            result = ops.sinkhorn(problem, eps=self.xi, max_iter=self.max_iter, tol=self.tol)
            self.last_transport = ops.Sinkhorn(*(t.detach() for t in result))
            # Softmax over the k selected entries of a row of log Π, renormalised, is exactly
            # Π_k / Σ Π_k (§4): selection and weights in one op, differentiable through log Π.
            return ops.topk_softmax(result.log_plan, self.k, renormalize=True)

        weight, expert = _solve_rows(C, mask, self.scope, solve)
        if not from_plan:
            probs = torch.gather(torch.softmax(logits, dim=-1), 1, expert.long())
            weight = probs / probs.sum(-1, keepdim=True)
        if self.route_scale != 1.0:
            weight = weight * self.route_scale
        if mask is not None:
            plain_weight, plain_expert = ops.topk_softmax(logits, self.k, renormalize=True)
            weight = torch.where(mask[:, None], weight, plain_weight)
            expert = torch.where(mask[:, None], expert, plain_expert)
        return weight, expert


def _ssr_causal(router: nn.Module) -> bool:
    return not router.training or router.p == 0


register_router(
    "ssr",
    SelectiveSinkhornRouter,
    description="Selective Sinkhorn Routing: softmax top-k; gates from an OT plan w.p. p (train)",
    causal=_ssr_causal,
)
