"""S-BASE (Clark et al. 2022) as Megatron-LM implements it, on :func:`smoe.ops.sinkhorn`
(specs/sinkhorn_ssr.md §12.2): Sinkhorn balances the training-time selection; the weights are the
router's own activation. Shared parts: smoe/routing/_transport.py."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from smoe import ops
from smoe.routing._transport import (
    SCOPES,
    _check_common,
    _choice,
    _init_weight,
    _logits,
    _padding_mask,
    _positive,
    _solve_rows,
)
from smoe.routing.base import Routing
from smoe.routing.context import RoutingContext
from smoe.routing.registry import register_router

__all__ = ["SinkhornRouter"]


class SinkhornRouter(nn.Module):
    """S-BASE (Clark et al. 2022) as Megatron-LM's ``sinkhorn_load_balancing`` does it
    (specs/sinkhorn_ssr.md §12.2): Sinkhorn balances the training-time selection; the weights are
    the router's own activation.

    Training: under no_grad, ``Π = sinkhorn(ℓ, eps=1)`` (Sinkhorn on ``exp(ℓ)``) with marginals
    row 1/T, column 1/E; each token takes the k largest entries of its row of Π. Eval: the k
    largest logits, no Sinkhorn. Weights (both modes) are the activation at the selection, not
    renormalised, and carry the router gradient: ``σ(ℓ)`` for k = 1, ``softmax(ℓ)`` over all E
    for k > 1. float32 (float64 for float64 x, also under autocast). No auxiliary loss.

    Stopping: Megatron iterates its scaling form (rows, then columns) until the mean absolute
    change of the column scaling is < 1e-4. Here the op (columns, then rows: the rows are exact
    after each iteration) stops when the L2 norms of the row and column residuals of Π are both
    <= ``tol``, an absolute criterion against a column mass of 1/E, checked every 10 iterations
    (on CUDA a device->host sync per check), or at ``max_iter``.

    The problem holds the real tokens (``context.padding_mask``; padding tokens take the plain
    top-k) of this rank, or of the data-parallel group with ``scope="global"`` (as in
    :class:`SelectiveSinkhornRouter`). Causal only in eval mode. Compiles with
    ``fullgraph=True`` in both modes (a padding mask adds a data-dependent size).

    Args:
        d_model: token width.
        num_experts: E.
        k: experts per token.
        max_iter: Sinkhorn iterations at most (>= 1).
        tol: residual tolerance (>= 0; 0 runs ``max_iter`` iterations, no sync).
        balance_weight: must be 0: S-BASE balances by Sinkhorn, and Megatron asserts a zero
            aux-loss coefficient. Any other value raises.
        scope: ``"local"`` (Megatron) or ``"global"``.
        init_scale: weights ~ truncated normal, std sqrt(init_scale / d_model) (TopKRouter's).
    """

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 1,
        *,
        max_iter: int = 1000,
        tol: float = 1e-4,
        balance_weight: float = 0.0,
        scope: str = "local",
        init_scale: float = 0.1,
    ) -> None:
        super().__init__()
        who = "SinkhornRouter"
        _check_common(who, d_model, num_experts, k, max_iter)
        if balance_weight != 0:
            raise ValueError(
                f"{who}: balance_weight must be 0 (S-BASE balances the load by Sinkhorn, without "
                f"an auxiliary loss), got {balance_weight}"
            )
        _positive(who, "tol", tol, zero_ok=True)
        _choice(who, "scope", scope, SCOPES)
        _positive(who, "init_scale", init_scale)
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.init_scale = init_scale
        self.max_iter, self.tol, self.scope, self.balance_weight = max_iter, tol, scope, 0.0
        self.last_transport: ops.Sinkhorn | None = None
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_weight(self.weight, self.init_scale)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, "
            f"max_iter={self.max_iter}, tol={self.tol}, scope={self.scope!r}"
        )

    def forward(self, x: Tensor, context: RoutingContext | None = None) -> Routing:
        """Route ``x [T, d_model]``; returns :class:`Routing`."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = _logits(x, self.weight)
            expert = ops.topk_softmax(logits, self.k).expert
            if self.training:
                mask = _padding_mask(context, logits.shape[0], "SinkhornRouter")
                with torch.no_grad():
                    _, balanced = _solve_rows(logits.detach(), mask, self.scope, self._solve)
                expert = balanced if mask is None else torch.where(mask[:, None], balanced, expert)
            if self.k == 1:
                weight = torch.sigmoid(torch.gather(logits, 1, expert.long()))
            else:
                weight = torch.gather(torch.softmax(logits, dim=-1), 1, expert.long())
        return Routing(expert=expert, weight=weight, logits=logits, aux={})

    def _solve(self, problem: Tensor) -> tuple[Tensor, Tensor]:
        row_mass = 1.0 / max(problem.shape[0], 1)
        result = ops.sinkhorn(
            problem, eps=1.0, max_iter=self.max_iter, tol=self.tol, row_mass=row_mass
        )
        self.last_transport = result
        return ops.topk_softmax(result.log_plan, self.k)


def _sbase_causal(router: nn.Module) -> bool:
    return not router.training


register_router(
    "sinkhorn",
    SinkhornRouter,
    description="S-BASE (Clark et al. 2022, Megatron): Sinkhorn-balanced top-k in training",
    causal=_sbase_causal,
)
