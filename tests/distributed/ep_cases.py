"""Expert-parallel cases run by tests/distributed/ep_worker.py on every rank of a Gloo group.

Each case builds the same MoELayer on every rank from one seed, shards it with
smoe.parallel.shard_experts, runs each rank's own tokens forward and backward, and gathers on
rank 0 everything a single process running the unsharded layer on the rank-major concatenation of
all ranks' tokens computes: the output, the input gradient and every expert-weight gradient must be
bitwise equal; the router's gradient (a sum over ranks) equal to float32 tolerance.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from smoe import MoELayer
from smoe.parallel import shard_experts


@dataclass(frozen=True)
class Case:
    name: str
    tokens: tuple[int, ...]  # tokens of each rank (len = world size)
    E: int
    k: int
    router: str = "topk"
    options: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    route: str = "random"  # "random" | "one_rank" (every token to rank 0's experts) | "skip_last"
    activation: str = "swiglu"
    bias: bool = False
    d: int = 16
    d_ff: int = 24
    seed: int = 0
    seq: int = 0  # > 0: each rank's tokens are tokens[r] // seq sequences of seq tokens
    training: bool = True  # False: eval mode (no routing noise, no training-only coupling)
    device: str = "cpu"  # "cuda": every rank's tensors on its GPU (Gloo stages them on the host)


def cases(world: int) -> list[Case]:
    P = world
    uneven = (13, 7, 0, 5)[:P] if P == 4 else (13, 7)
    equal = (8,) * P
    return [
        Case("uneven", uneven, E=2 * P, k=2),
        Case("uneven-bf16", uneven, E=2 * P, k=2, dtype="bfloat16"),
        Case("zero-tokens-rank", (0,) + (6,) * (P - 1), E=2 * P, k=1),
        Case("no-tokens-anywhere", (0,) * P, E=P, k=1),
        Case("one-rank-takes-all", uneven, E=2 * P, k=2, route="one_rank"),
        Case("expert-without-tokens", uneven, E=2 * P, k=1, route="skip_last"),
        Case("k-equals-E", uneven, E=P, k=P),
        Case("one-expert-per-rank", uneven, E=P, k=1, activation="gelu", bias=True),
        Case(
            "capacity-bpr",
            equal,
            E=2 * P,
            k=2,
            router="vmoe",
            # each rank's tokens are one routing group: group_size = its token count
            options=dict(noise_std=0.0, capacity_factor=0.5, batch_priority=True, group_size=8),
        ),
        Case(
            "expert-choice",
            equal,
            E=2 * P,
            k=1,
            router="expert_choice",
            options=dict(capacity_factor=1.0, group_size=8),
        ),
    ]


SEQ = 4  # tokens per sequence in the registry sweep

# Options per registered router for the registry sweep: routing groups no larger than a sequence
# (each rank's sequences are then routed as in one process), no capacity dropping across ranks.
ROUTER_OPTIONS: dict[str, dict[str, Any]] = {
    "vmoe": dict(group_size=SEQ),
    "expert_choice": dict(group_size=SEQ),
}


def router_cases(world: int) -> list[Case]:
    """Every registered router, in eval mode, on 2 (or 1) sequences of SEQ tokens per rank."""
    from smoe.routing.registry import available_routers

    tokens = (2 * SEQ, SEQ) if world == 2 else (2 * SEQ, SEQ, SEQ, 2 * SEQ)
    return [
        Case(
            f"router-{name}",
            tokens,
            E=2 * world,
            k=2,
            router=name,
            options=ROUTER_OPTIONS.get(name, {}),
            seq=SEQ,
            training=False,
        )  # fmt: skip
        for name in available_routers()
    ]


def build(case: Case) -> MoELayer:
    from smoe.models import moe_layer

    torch.manual_seed(case.seed)
    kw = dict(router=case.router, router_options=case.options or None, activation=case.activation)
    layer = moe_layer(case.d, case.d_ff, case.E, case.k, bias=case.bias, **kw)
    layer.train(case.training)
    if case.route == "random":
        return layer.to(case_device(case), getattr(torch, case.dtype))
    w = layer.router.weight
    with torch.no_grad():
        if case.route == "one_rank":  # positive tokens; rank 0's experts score > 0, others < 0
            E_loc = case.E // len(case.tokens)
            w.abs_()
            w[E_loc:].neg_()
        elif case.route == "skip_last":  # the last expert scores far below the rest
            w[-1].fill_(-10.0)
    return layer.to(case_device(case), getattr(torch, case.dtype))


def case_device(case: Case) -> torch.device:
    """The case's device on this process: with NCCL, rank r drives GPU r (set by the worker);
    Gloo with CUDA tensors puts every rank on the current GPU."""
    if case.device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(case.device)


def inputs(case: Case) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every rank's tokens and output cotangents, the same on every rank."""
    g = torch.Generator().manual_seed(1000 + case.seed)
    dt = getattr(torch, case.dtype)
    xs, cots = [], []
    for T in case.tokens:
        x = torch.randn(T, case.d, generator=g)
        if case.route in ("one_rank", "skip_last"):
            x = x.abs() + 0.1
        dev = case_device(case)
        xs.append(x.to(dev, dt))
        cots.append(torch.randn(T, case.d, generator=g).to(dev, dt))
    return xs, cots


def attention(case: Case, batch: int) -> torch.Tensor | None:
    """Head-averaged attention probabilities [B, S, S] for routers that read them (seeded by the
    sequence index, so the rank-major concatenation is one process's batch)."""
    from smoe.routing.registry import router_info

    if not case.seq or not router_info(case.router).needs_attention:
        return None
    g = torch.Generator().manual_seed(7)
    return torch.randn(batch, case.seq, case.seq, generator=g).softmax(-1).to(case_device(case))


def run_one(
    layer: MoELayer, x: torch.Tensor, cot: torch.Tensor, case: Case | None = None,
    first: int = 0,
) -> dict[str, torch.Tensor]:  # fmt: skip
    from smoe import RoutingContext

    context = None
    if case is not None and case.seq:
        x, cot = x.view(-1, case.seq, case.d), cot.view(-1, case.seq, case.d)
        att = attention(case, first + x.shape[0])
        if att is not None:
            context = RoutingContext(attention=att[first:].to(x.dtype))
    x = x.clone().requires_grad_()
    y, _ = layer(x, context) if context is not None else layer(x)
    (y.float() * cot.float()).sum().backward()
    out = {"y": y.detach().reshape(-1, y.shape[-1]), "dx": x.grad.reshape(-1, x.shape[-1])}
    for name, p in layer.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        out[name] = g.to_local() if hasattr(g, "to_local") else g  # an expert shard's DTensor
    return {k: v.cpu() for k, v in out.items()}  # compared (and gathered) on the host


def run_case(case: Case, rank: int, world: int) -> dict[str, Any] | None:
    """Runs ``case`` on this rank; on rank 0 returns the comparison with the single process."""
    layer = build(case)
    reference = copy.deepcopy(layer)
    shard_experts(layer)
    xs, cots = inputs(case)
    first = sum(case.tokens[:rank]) // case.seq if case.seq else 0
    mine = run_one(layer, xs[rank], cots[rank], case, first)
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank != 0:
        return None
    want = run_one(reference, torch.cat(xs), torch.cat(cots), case)
    report: dict[str, Any] = {}
    for name, w in want.items():
        parts = [r[name] for r in everyone]
        if name in ("y", "dx") or name.startswith("experts."):
            got = torch.cat(parts)  # token rows / expert slices, rank-major
            report[name] = dict(
                kind="bitwise", equal=bool(torch.equal(got, w)), shape=list(w.shape),
                max_abs=float((got.double() - w.double()).abs().max()) if w.numel() else 0.0,
            )  # fmt: skip
        else:  # replicated parameters: gradients summed over ranks (DDP's all-reduce)
            wide = torch.stack([p.double() for p in parts])
            got = wide.sum(0)
            err = (got - w.double()).abs()
            # float32: rtol 1e-6; 16-bit: each rank's gradient and the single process's are
            # rounded to the parameter's dtype, so its eps relative to the magnitudes summed
            rtol = 1e-6 if w.dtype in (torch.float32, torch.float64) else torch.finfo(w.dtype).eps
            scale = wide.abs().sum(0) + w.double().abs()
            bound = rtol * scale + rtol * 1e-3 * float(scale.max()) if w.numel() else scale
            report[name] = dict(
                kind="tolerance", equal=bool((err <= bound).all()), shape=list(w.shape),
                max_abs=float(err.max()) if w.numel() else 0.0,
            )  # fmt: skip
    return report
