"""What the optimal-transport routers share (specs/sinkhorn_ssr.md): the names of their options,
SSR's counter-based draw, the transport problem over the real tokens of this rank or of the
data-parallel group (§3.1, §9), option checks and the linear gate's initialisation."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from smoe import ops
from smoe.routing.context import RoutingContext

DRAWS = ("per_layer", "per_step")
GRAD_MODES = ("unrolled", "detach")
COSTS = ("softmax", "logits")
WEIGHTS_FROM = ("plan", "router_softmax")
SCOPES = ("local", "global")

_M64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit ints that scrambles every bit."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def sinkhorn_draw(seed: int, step: int, layer_index: int | None = None) -> float:
    """The uniform number in [0, 1) that decides whether SSR uses Sinkhorn (``u < p``).

    A counter-based hash of ``(seed, step, layer_index)`` in pure host arithmetic (no RNG state,
    no device sync): the same triple always gives the same number, and different triples give
    independent-looking ones. ``layer_index=None`` is the shared draw of ``draw="per_step"``.
    """
    h = _mix64(seed & _M64)
    h = _mix64(h ^ (step & _M64))
    layer = 0 if layer_index is None else (layer_index + 1) & _M64
    h = _mix64(h ^ _mix64(layer))
    return (h >> 11) * 2.0**-53


def _padding_mask(context: RoutingContext | None, T: int, who: str) -> Tensor | None:
    mask = None if context is None else context.padding_mask
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.numel() != T:
        raise ValueError(
            f"{who}: context.padding_mask must be a bool tensor with one entry per token ({T}), "
            f"got {mask.dtype} of shape {tuple(mask.shape)}"
        )
    return mask.reshape(T)


def _world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _solve_rows(
    cost: Tensor,
    mask: Tensor | None,
    scope: str,
    solve: Callable[[Tensor], tuple[Tensor, Tensor]],
) -> tuple[Tensor, Tensor]:
    """Solve one transport problem over the real tokens and return this rank's rows.

    ``cost [T, E]`` holds row-wise quantities only (so every rank builds the same problem);
    ``solve(C [n, E]) -> (weight [n, k], expert [n, k])``. With ``scope="global"`` and a process
    group of more than one rank, the costs (and masks) of all ranks are all-gathered (with
    gradient), which needs the same T on every rank. Padding rows (mask False) are left out of
    the problem and come back as weight 0, expert 0: the caller routes them otherwise.
    """
    T = cost.shape[0]
    rank, world = _world()
    offset = 0
    if scope == "global" and world > 1:
        from torch.distributed.nn.functional import all_gather

        cost = torch.cat(all_gather(cost.contiguous()))
        if mask is not None:
            # as uint8: not every backend (gloo) gathers bool tensors
            masks = [torch.empty_like(mask, dtype=torch.uint8) for _ in range(world)]
            torch.distributed.all_gather(masks, mask.to(torch.uint8).contiguous())
            mask = torch.cat(masks).bool()
        offset = rank * T
    if mask is None:
        weight, expert = solve(cost)
    else:
        # nonzero() is a device->host sync on CUDA (the problem size is data dependent); only
        # on Sinkhorn forwards that are given a padding mask.
        index = mask.nonzero().squeeze(1)
        w, e = solve(cost.index_select(0, index))
        weight = w.new_zeros((cost.shape[0], w.shape[1])).index_copy(0, index, w)
        expert = e.new_zeros((cost.shape[0], e.shape[1])).index_copy(0, index, e)
    return weight[offset : offset + T], expert[offset : offset + T]


def _check_common(who: str, d_model: int, num_experts: int, k: int, max_iter: int) -> None:
    if d_model < 1:
        raise ValueError(f"{who}: d_model must be >= 1, got {d_model}")
    if num_experts < 1:
        raise ValueError(f"{who}: num_experts must be >= 1, got {num_experts}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"{who}: k must be in [1, num_experts={num_experts}], got {k}")
    if max_iter < 1:
        raise ValueError(f"{who}: max_iter must be >= 1, got {max_iter}")


def _choice(who: str, name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{who}: {name} must be one of {allowed}, got {value!r}")


def _positive(who: str, name: str, value: float, *, zero_ok: bool = False) -> None:
    ok = value >= 0 if zero_ok else value > 0
    if not (ok and math.isfinite(value)):
        raise ValueError(
            f"{who}: {name} must be finite and {'>=' if zero_ok else '>'} 0, got {value}"
        )


def _init_weight(weight: Tensor, init_scale: float) -> None:
    """TopKRouter's initialisation: truncated normal, std sqrt(init_scale / d_model)."""
    std = math.sqrt(init_scale / weight.shape[1])
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def _logits(x: Tensor, weight: Tensor) -> Tensor:
    return ops.gate_linear(x, weight)
