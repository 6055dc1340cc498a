"""The float64 reference of USMoE's routing for the layer-level fuzz (kind "usmoe" of
strategies.LAYER_ROUTERS; specs/usmoe.md §3-§5): the unified score from the router's parameters,
the competition of each group written out one unit at a time with smoe.reference_usmoe's
unified_topk, and the weights. The plan the router made is checked to be the expert-choice layout
of what it chose; the routed experts are then reference.routed_moe's (layer_reference.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from smoe.reference_usmoe import unified_topk


def groups(router, T: int, batch_shape) -> tuple[int, int]:
    """(G, S): the competing groups of S consecutive tokens (the last padded past T); grouped by
    position, the S positions' groups of B tokens in position order."""
    if router.group == "batch":
        return 1, T
    if router.group == "sequence":
        return int(batch_shape[0]), int(batch_shape[1])
    if router.group == "position":
        return int(batch_shape[1]), int(batch_shape[0])
    S = min(router.group, T) if T else router.group
    return -(-T // S), S


def unified_score(router, z: Tensor, real: Tensor, G: int, S: int) -> Tensor:
    """U = α X + (1 - α) T over the G·S padded tokens ``[G·S, E]`` (§3): T the softmax over
    experts, X = (2/E) sigmoid(z) or the softmax over each group's real tokens per expert."""
    E = z.shape[1]
    token_side = torch.softmax(z, dim=-1)
    if router.expert_score == "sigmoid":
        expert_side = (2.0 / E) * torch.sigmoid(z)
    else:
        expert_side = torch.zeros_like(z)
        for g in range(G):
            rows = torch.arange(g * S, (g + 1) * S)[real[g * S : (g + 1) * S]]
            if len(rows):
                expert_side[rows] = torch.softmax(z[rows], dim=0)
    return router.alpha * expert_side + (1.0 - router.alpha) * token_side


def _take(chosen: Tensor, rows: list[int], cols: list[int], scores: Tensor, n: int, c: int):
    """Mark the best ``c`` (of at most ``n``) entries of ``scores`` (one competing unit, laid out
    over (rows[i], cols[i]))."""
    picked = unified_topk(scores[None], n, counts=torch.tensor([c]))[0]
    for i in picked[picked >= 0].tolist():
        chosen[rows[i], cols[i]] = True


def select(router, U: Tensor, real: Tensor, G: int, S: int) -> Tensor:
    """The chosen pairs ``[G·S, E]`` bool: per token, per expert of a group, or jointly over the
    group's S·E pairs (§3, §5); padding rows are never chosen."""
    E, budget = U.shape[1], router.budget
    U = U.detach().masked_fill(~real[:, None], -torch.inf)
    chosen = torch.zeros(G * S, E, dtype=torch.bool)
    if router.selection == "per_token" or (router.group == "sequence" and S == 1):
        n = min(E, max(1, round(budget)))  # incremental decoding falls back to per token
        for t in torch.nonzero(real).flatten().tolist():
            _take(chosen, [t] * E, list(range(E)), U[t], n, n)
        return chosen
    for g in range(G):
        rows = list(range(g * S, (g + 1) * S))
        s_real = int(real[g * S : (g + 1) * S].sum())
        if router.selection == "per_expert":  # each expert its top-C tokens of the group
            C = min(S, max(1, round(S * budget / E)))
            c = min(C, max(1, round(s_real * budget / E)), s_real)
            for e in range(E):
                _take(chosen, rows, [e] * S, U[g * S : (g + 1) * S, e], C, c)
        else:  # joint: the best round(budget·S_real) pairs of the group's S·E
            n = min(S * E, max(1, round(budget * S)))
            c = min(round(s_real * budget), n, s_real * E)
            pairs = [(t, e) for t in rows for e in range(E)]
            flat = U[g * S : (g + 1) * S].reshape(-1)
            _take(chosen, [t for t, _ in pairs], [e for _, e in pairs], flat, n, c)
    return chosen


def _units(router, chosen: Tensor, G: int, S: int) -> list[Tensor]:
    """The index sets of ``[G·S, E]`` that compete with each other (rows, columns or groups)."""
    E = chosen.shape[1]
    idx = torch.arange(G * S * E).view(G * S, E)
    if router.selection == "per_token" or (router.group == "sequence" and S == 1):
        return list(idx)
    per_group = idx.view(G, S, E)
    if router.selection == "per_expert":
        return [per_group[g, :, e] for g in range(G) for e in range(E)]
    return [per_group[g].reshape(-1) for g in range(G)]


def check_expert_choice_layout(plan, kept: Tensor) -> None:
    """The router's plan lists its chosen pairs expert-major, tokens ascending in each expert
    (row[t, e] the pair's row, slot t·E + e), as ExpertChoiceRouter's; rows past offsets[E] are
    empty."""
    T, E = kept.shape
    order = [(t, e) for e in range(E) for t in range(T) if kept[t, e]]
    counts = kept.sum(dim=0).tolist()
    assert plan.offsets.tolist() == [sum(counts[:e]) for e in range(E + 1)], "plan offsets"
    n = len(order)
    assert plan.token[:n].tolist() == [t for t, _ in order], "plan tokens"
    assert plan.slot[:n].tolist() == [t * E + e for t, e in order], "plan slots"
    assert (plan.token[n:] == -1).all() and (plan.slot[n:] == -1).all(), "plan padding rows"
    row = torch.full((T, E), -1, dtype=torch.int32)
    for i, (t, e) in enumerate(order):
        row[t, e] = i
    assert torch.equal(plan.row.cpu(), row) and torch.equal(plan.kept.cpu(), kept), "plan rows"


def usmoe_routing(router, flat: Tensor, context) -> tuple[Tensor, Tensor, Tensor]:
    """(expert, weight, kept) ``[T, E]`` of USMoE in float64: a token's chosen experts (-1
    elsewhere), U at its chosen pairs (over Σ_e U when ``norm_topk_prob``), the chosen mask.
    Where the router chose otherwise only among scores tied up to float64 rounding, its own
    choice is weighed."""
    T, E = flat.shape[0], router.num_experts
    with torch.no_grad():
        own = router(flat, context=context)
    G, S = groups(router, T, context.batch_shape)
    # the tokens in competition order: as given, or by position (token b·S' + s at s·B + b)
    order = torch.arange(T)
    if router.group == "position":
        order = order.view(S, G).T.reshape(-1)
    real = torch.zeros(G * S, dtype=torch.bool)
    real[:T] = True if context.padding_mask is None else context.padding_mask.reshape(-1).cpu()
    real[:T] = real[:T][order]
    z = flat.double()[order] @ router.weight.double().T
    z = torch.cat([z, z.new_zeros(G * S - T, E)])
    U = unified_score(router, z, real, G, S)
    chosen = select(router, U, real, G, S)
    mine = torch.zeros(G * S, E, dtype=torch.bool)
    mine[:T] = own.plan.kept.cpu()[order]
    if not torch.equal(mine, chosen):  # the same top values of every unit, up to rounding
        u = U.detach().reshape(-1)
        for unit in _units(router, chosen, G, S):
            a = u[unit[mine.reshape(-1)[unit]]].sort().values
            b = u[unit[chosen.reshape(-1)[unit]]].sort().values
            same = a.shape == b.shape and torch.allclose(a, b, rtol=1e-12, atol=1e-12)
            assert same, "USMoE chose others"
        chosen = mine
    back = torch.argsort(order)
    kept = chosen[:T][back]
    check_expert_choice_layout(own.plan, kept)
    U = U[:T][back]
    if router.norm_topk_prob:
        U = U / U.sum(dim=-1, keepdim=True)
    expert = torch.where(kept, torch.arange(E, dtype=torch.int32), -1)
    return expert, torch.where(kept, U, 0.0), kept
