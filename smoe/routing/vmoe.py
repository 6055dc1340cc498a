"""V-MoE routing (Riquelme et al. 2021): noisy softmax-then-top-k per group of tokens, a fixed
per-group expert capacity, optional Batch Prioritized Routing, importance and load losses.

Spec: specs/vmoe.md; google-research/vmoe (``vmoe/nn/routing.py``, ``vmoe/moe.py``) is the
authority where the paper is silent.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from smoe import ops
from smoe.losses import importance_loss, load_loss
from smoe.routing.base import Routing
from smoe.routing.context import RoutingContext
from smoe.routing.registry import register_router

_ROUNDINGS = ("ceil", "round")
_PRIORITIES = ("max", "sum_topk")


def vmoe_capacity(
    group_size: int,
    num_experts: int,
    k: int,
    capacity_factor: float,
    *,
    rounding: str = "ceil",
    multiple_of: int | None = 4,
) -> int:
    """Per-group expert capacity, as vmoe's ``compute_capacity`` (specs/vmoe.md §3).

    ``C_e = ceil(k * S * C / E)`` (or ``round``), then padded up to a multiple of ``multiple_of``.
    The paper's own formula is ``round(k * S * C / E)`` with no padding
    (``rounding="round", multiple_of=None``).

    Raises:
        ValueError: a bad option, or a capacity below 1 (raise the capacity factor or the group
            size).

    Example: S = 400, E = 8, k = 2, C = 1.05 -> ceil(105) = 105 -> 108.
    """
    if rounding not in _ROUNDINGS:
        raise ValueError(f"vmoe_capacity: rounding must be one of {_ROUNDINGS}, got {rounding!r}")
    if multiple_of is not None and multiple_of < 1:
        raise ValueError(f"vmoe_capacity: multiple_of must be >= 1 or None, got {multiple_of}")
    if capacity_factor <= 0:
        raise ValueError(f"vmoe_capacity: capacity_factor must be > 0, got {capacity_factor}")
    raw = k * group_size * capacity_factor / num_experts
    # Python's round() is banker's rounding, like jnp.round; both agree except on exact .5.
    cap = math.ceil(raw) if rounding == "ceil" else int(round(raw))
    if multiple_of:
        cap += (-cap) % multiple_of
    if cap < 1:
        raise ValueError(
            f"vmoe_capacity: expert capacity {cap} < 1 for group_size={group_size}, "
            f"num_experts={num_experts}, k={k}, capacity_factor={capacity_factor}: raise the "
            "capacity factor or the group size"
        )
    return cap


class VMoERouter(nn.Module):
    """V-MoE's noisy top-k router with per-group capacity and Batch Prioritized Routing.

    In training, Gaussian noise of std ``noise_std / E`` is added to the logits; the softmax
    over all E experts is taken after the noise and the top-k probabilities are the combine
    weights, not renormalised. Tokens are routed in consecutive groups of ``group_size``: each
    expert accepts at most :func:`vmoe_capacity` slots per group, rank-major (all first choices
    before any second choice), in token order or, with ``batch_priority``, by priority.

    Args:
        d_model: token width.
        num_experts: E.
        k: experts per token (2 in V-MoE).
        noise_std: noise std in units of 1/E (V-MoE: 1.0, so sigma = 1/E); 0 turns it off.
        capacity_factor: C in training (V-MoE: 1.05); None = no capacity (nothing dropped).
        eval_capacity_factor: C in eval mode; None = the training value. Both may be changed
            at any time (e.g. to sweep C at inference).
        group_size: tokens per routing group (V-MoE: 8 images x tokens per image); None = all
            T tokens of a call form one group. The last group may be shorter: it gets the same
            capacity.
        batch_priority: Batch Prioritized Routing (drop the lowest-priority tokens first).
        priority: BPR score, ``"max"`` (the top-1 weight, V-MoE's default) or ``"sum_topk"``.
        rounding, multiple_of: see :func:`vmoe_capacity`.

    ``forward(x [T, d_model])`` returns a :class:`Routing` with its plan; ``aux`` holds the
    unweighted ``"importance"`` loss always and the ``"load"`` loss in training with noise.
    """

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict

    # A process group for global-batch loss statistics (smoe.parallel.shard_experts with
    # global_stats=True sets it; see smoe.losses). None: this rank's tokens.
    stats_group: Any = None

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        *,
        noise_std: float = 1.0,
        capacity_factor: float | None = 1.05,
        eval_capacity_factor: float | None = None,
        group_size: int | None = None,
        batch_priority: bool = False,
        priority: str = "max",
        rounding: str = "ceil",
        multiple_of: int | None = 4,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"VMoERouter: num_experts must be >= 1, got {num_experts}")
        if not 1 <= k <= num_experts:
            raise ValueError(f"VMoERouter: k must be in [1, num_experts={num_experts}], got {k}")
        if d_model < 1:
            raise ValueError(f"VMoERouter: d_model must be >= 1, got {d_model}")
        if noise_std < 0:
            raise ValueError(f"VMoERouter: noise_std must be >= 0, got {noise_std}")
        if group_size is not None and group_size < 1:
            raise ValueError(f"VMoERouter: group_size must be >= 1 or None, got {group_size}")
        if priority not in _PRIORITIES:
            raise ValueError(f"VMoERouter: priority must be one of {_PRIORITIES}, got {priority!r}")
        for name, c in (
            ("capacity_factor", capacity_factor),
            ("eval_capacity_factor", eval_capacity_factor),
        ):
            if c is not None and not c > 0:  # also refuses NaN
                raise ValueError(f"VMoERouter: {name} must be > 0 or None, got {c}")
        vmoe_capacity(1, 1, 1, 1.0, rounding=rounding, multiple_of=multiple_of)  # checks options
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.noise_std, self.group_size = noise_std, group_size
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.batch_priority, self.priority = batch_priority, priority
        self.rounding, self.multiple_of = rounding, multiple_of
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # vmoe's router is a flax Dense: LeCun normal (truncated) kernel init, no bias.
        std = 1.0 / math.sqrt(self.d_model)
        nn.init.trunc_normal_(self.weight, std=std, a=-2 * std, b=2 * std)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, "
            f"noise_std={self.noise_std}, capacity_factor={self.capacity_factor}, "
            f"eval_capacity_factor={self.eval_capacity_factor}, group_size={self.group_size}, "
            f"batch_priority={self.batch_priority}"
        )

    @property
    def sigma(self) -> float:
        """The std of the logit noise: ``noise_std / E``."""
        return self.noise_std / self.num_experts

    def is_causal(self) -> bool:
        """Whether a token's routing depends only on earlier tokens, as configured now.

        Not with Batch Prioritized Routing (the whole group is ranked by priority), nor with a
        capacity at k > 1: capacity is filled rank-major, so the first choices of later tokens
        can take a token's second place. Without capacity, or at k = 1 (kept in token order),
        it is causal.
        """
        if self.current_capacity_factor() is None:
            return True
        return self.k == 1 and not self.batch_priority

    def current_capacity_factor(self) -> float | None:
        """C for the current mode (training or eval)."""
        if not self.training and self.eval_capacity_factor is not None:
            return self.eval_capacity_factor
        return self.capacity_factor

    def capacity(self, num_tokens: int) -> int | None:
        """Per-group expert capacity for a call with ``num_tokens`` tokens (None: unbounded).

        The group is ``min(group_size, num_tokens)`` tokens.
        """
        factor = self.current_capacity_factor()
        if factor is None or num_tokens == 0:
            return None
        S = num_tokens if self.group_size is None else min(self.group_size, num_tokens)
        return vmoe_capacity(
            S,
            self.num_experts,
            self.k,
            factor,
            rounding=self.rounding,
            multiple_of=self.multiple_of,
        )

    def forward(self, x: Tensor, context: RoutingContext | None = None) -> Routing:
        """Route ``x [T, d_model]``; returns :class:`Routing` with its plan.

        Weights are float32 (float64 for float64 x).

        ``context`` is accepted for the common router interface and not used.
        """
        T = x.shape[0]
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = ops.gate_linear(x, self.weight)
            noisy = self.training and self.noise_std > 0
            selection = logits + torch.randn_like(logits) * self.sigma if noisy else logits
            weight, expert = ops.topk_softmax(selection, self.k, renormalize=False)
            prio = None
            if self.batch_priority:
                prio = weight[:, 0] if self.priority == "max" else weight.sum(dim=1)
            plan = ops.make_plan(
                expert,
                self.num_experts,
                capacity=self.capacity(T),
                priority=prio,
                group_size=self.group_size,
            )
            aux = {
                "importance": importance_loss(
                    logits, group_size=self.group_size, stats_group=self.stats_group
                )
            }
            if noisy:
                aux["load"] = load_loss(
                    logits,
                    selection,
                    self.k,
                    self.sigma,
                    group_size=self.group_size,
                    stats_group=self.stats_group,
                )
        return Routing(expert=expert, weight=weight, logits=logits, aux=aux, plan=plan)


register_router(
    "vmoe",
    VMoERouter,
    description="V-MoE: noisy softmax then top-k, per-group capacity, optional BPR (Riquelme 2021)",
    causal=lambda router: router.is_causal(),
    aux_losses=("importance", "load"),
)
