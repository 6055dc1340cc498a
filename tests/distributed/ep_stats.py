"""shard_experts(global_stats=True) cases run on every rank by tests/distributed/ep_worker.py: each
batch-statistic loss, and its router gradient, against one process on all ranks' tokens."""

from __future__ import annotations

import torch
import torch.distributed as dist

# routers with batch-statistic losses, and the options that make their routing deterministic
GLOBAL_ROUTERS: dict[str, dict] = {
    "topk": {},
    "vmoe": dict(noise_std=0.0, capacity_factor=None),  # importance over one routing group
    "xmoe": {},
    "xmoe_community": {},
    "stablemoe_community": {},
    "similarity_aware": {},
}


def aux_losses(m, x: torch.Tensor, seq: int) -> tuple[dict, torch.Tensor]:
    """The layer's aux losses on ``x`` (as sequences of ``seq`` tokens), and the router
    gradient of their weighted sum, flattened."""
    _, aux = m(x.view(-1, seq, x.shape[-1]))
    params = list(m.router.parameters())
    grads = torch.autograd.grad(aux.loss(), params, allow_unused=True)
    g = torch.cat([(gp if gp is not None else torch.zeros_like(p)).reshape(-1)
                   for gp, p in zip(grads, params)])  # fmt: skip
    return {k: v.detach() for k, v in aux.losses.items()}, g


def global_stats(rank: int, world: int) -> dict:
    """shard_experts(global_stats=True), per router of GLOBAL_ROUTERS: with equal tokens per rank,
    the mean over ranks of each auxiliary loss, and of the router gradient of the weighted sum,
    equal one process's on all tokens. For top-k also the default (per-rank) loss, which must
    differ."""
    import copy

    from smoe.parallel import shard_experts
    from tests.distributed.ep_cases import SEQ, Case, build, inputs

    out = {}
    for name, options in GLOBAL_ROUTERS.items():
        case = Case(f"global-{name}", (2 * SEQ,) * world, E=2 * world, k=2, router=name,
                    options=options, seq=SEQ)  # fmt: skip
        layer = build(case)
        reference = copy.deepcopy(layer)
        local = shard_experts(copy.deepcopy(layer))
        shard_experts(layer, global_stats=True)
        xs, _ = inputs(case)

        mine, g = aux_losses(layer, xs[rank], SEQ)
        theirs, _ = aux_losses(local, xs[rank], SEQ)
        want, g_want = aux_losses(reference, torch.cat(xs), SEQ)
        names = sorted(want)
        both = torch.stack([mine[n] for n in names] + [theirs[n] for n in names]).double()
        dist.all_reduce(both)
        dist.all_reduce(g)
        out[name] = dict(
            names=names,
            global_mean=[float(v) / world for v in both[: len(names)]],
            local_mean=[float(v) / world for v in both[len(names) :]],
            want=[float(want[n]) for n in names],
            grad_err=float((g / world - g_want).abs().max()),
            grad_scale=float(g_want.abs().max()),
            stats_group_set=layer.router.stats_group is not None,
        )
    out["load_loss"] = global_load_loss(rank, world)
    return out


def global_load_loss(rank: int, world: int) -> dict:
    """V-MoE's load loss (noisy routing: the layers above cannot match one process's noise) on
    given clean and noisy logits: stats_group over the world against one process on all rows,
    the value and the gradient w.r.t. the clean logits (the mean over ranks)."""
    from smoe.losses import load_loss

    g = torch.Generator().manual_seed(3)
    T, E, k = 5, 2 * world, 2
    clean = torch.randn(world * T, E, generator=g, dtype=torch.float64)
    noisy = clean + torch.randn(world * T, E, generator=g, dtype=torch.float64) / E
    mine_in = clean[rank * T : (rank + 1) * T].clone().requires_grad_()
    mine = load_loss(mine_in, noisy[rank * T : (rank + 1) * T], k, 1 / E,
                     stats_group=dist.group.WORLD)  # fmt: skip
    (grad,) = torch.autograd.grad(mine, mine_in)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (float(mine), grad))
    full = clean.clone().requires_grad_()
    want = load_loss(full, noisy, k, 1 / E)
    (g_want,) = torch.autograd.grad(want, full)
    got = torch.cat([gr for _, gr in everyone]) / world
    return dict(
        values=[v for v, _ in everyone], want=float(want),
        grad_err=float((got - g_want).abs().max()), grad_scale=float(g_want.abs().max()),
    )  # fmt: skip
