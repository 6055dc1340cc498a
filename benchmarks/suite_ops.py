"""The suite's ``routers`` section (every router in smoe.routing, and the topk_softmax and
expert_choice ops, against torch) and ``ops`` section (make_plan / permute / combine alone)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_layer import DTYPES, run_layer
from common import MODES, Clock, log, stat
from suite_layer import Shape
from torch import Tensor, nn

import smoe.routing
from smoe import ops
from smoe.routing import AttentionAwareRouter, ExpertChoiceRouter, TopKRouter, VMoERouter

ROUTER_SHAPES = {"full": [(8192, 256, 8, 2), (8192, 256, 64, 8)], "quick": [(256, 32, 8, 2)]}


# ---------------------------------------------------------------------------------------------
# routers
# ---------------------------------------------------------------------------------------------
def router_variants(d: int, E: int, k: int) -> dict[str, nn.Module]:
    """Every router class exported by smoe.routing, in each configuration worth timing.

    Known routers get their variants; a router added later is timed with its defaults
    ``cls(d, E, k)`` (or reported as not constructible), so the table grows with the package.
    """
    known = {
        "TopKRouter": {
            "topk": lambda: TopKRouter(d, E, k).eval(),
            "topk-noisy (train)": lambda: TopKRouter(d, E, k, noisy=True).train(),
        },
        "VMoERouter": {  # V-MoE: groups of 400 tokens, C = 1.05, noise + losses in training
            "vmoe (train)": lambda: VMoERouter(d, E, k, group_size=400).train(),
            "vmoe-bpr (eval, C=0.5)": lambda: VMoERouter(
                d, E, k, group_size=400, eval_capacity_factor=0.5, batch_priority=True
            ).eval(),
        },
        "ExpertChoiceRouter": {  # c = k: the expert compute of top-k without drops
            "expert-choice (c=k)": lambda: ExpertChoiceRouter(d, E, capacity_factor=float(k)),
        },
    }
    out: dict[str, nn.Module] = {}
    for cname in smoe.routing.__all__:
        cls = getattr(smoe.routing, cname)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            continue
        for vname, make in known.get(cname, {cname: lambda cls=cls: cls(d, E, k)}).items():
            try:
                out[vname] = make()
            except (TypeError, ValueError) as e:
                log(f"  router {vname}: not constructible with (d, E, k): {e}")
    return out


def bench_routers(shapes: list[tuple], dtypes: list[str], clock: Clock) -> list[dict]:
    rows = []
    for T, d, E, k in shapes:
        for dname in dtypes:
            dtype = DTYPES[dname]
            torch.manual_seed(0)
            x = torch.randn(T, d, dtype=dtype)
            logits = torch.randn(T, E)
            weight = torch.randn(E, d) * d**-0.5
            contenders: dict[str, Callable[[Tensor], Tensor]] = {}
            for vname, router in router_variants(d, E, k).items():
                router = router.to(dtype)
                context = None
                if isinstance(router, AttentionAwareRouter):
                    # the block's attention probabilities: one sequence of T tokens, one head,
                    # causal and uniform over each prefix (its values do not change the cost)
                    causal = torch.ones(T, T).tril()
                    attention = (causal / causal.sum(-1, keepdim=True)).view(1, 1, T, T)
                    context = smoe.routing.RoutingContext(attention=attention.to(dtype))
                elif isinstance(router, smoe.routing.USMoERouter):
                    # its pairs compete per sequence: the T tokens are one sequence
                    context = smoe.routing.RoutingContext(batch_shape=(1, T))

                def route(x: Tensor, router: nn.Module = router, context=context) -> Tensor:
                    r = router(x, context) if context is not None else router(x)
                    return r.weight.sum() + sum(r.aux.values())

                contenders[vname] = route

            def op(lg: Tensor, k: int = k) -> Tensor:
                return ops.topk_softmax(lg, k).weight

            def ref(lg: Tensor, k: int = k) -> Tensor:
                w, _ = lg.softmax(dim=-1).topk(k, dim=-1)
                return w / w.sum(dim=-1, keepdim=True)

            def torch_router(x: Tensor, k: int = k, weight: Tensor = weight) -> Tensor:
                """Linear + softmax + top-k + renormalise, and the same two losses, in torch."""
                logits = F.linear(x.float(), weight.float())
                probs = logits.softmax(dim=-1)
                w, idx = probs.topk(k, dim=-1)
                w = w / w.sum(dim=-1, keepdim=True)
                f = F.one_hot(idx, probs.shape[1]).sum(dim=(0, 1)).float() / x.shape[0]
                balance = probs.shape[1] * (f * probs.mean(dim=0)).sum()
                z = logits.logsumexp(dim=-1).square().mean()
                return w.sum() + balance + z

            def stats_op(lg: Tensor) -> Tensor:
                prob_sum, lse = ops.router_stats(lg)
                return prob_sum.square().sum() + lse.square().sum()

            def stats_torch(lg: Tensor) -> Tensor:
                """The losses' statistics as torch computes them: softmax column sums, logsumexp."""
                wide = lg.float()
                return (
                    wide.softmax(dim=-1).sum(0).square().sum() + wide.logsumexp(-1).square().sum()
                )

            def torch_expert_choice(lg: Tensor, c: int = min(T, -(-T * k // E))) -> Tensor:
                """Expert choice in torch: softmax, then top-C over tokens per expert."""
                probs = lg.softmax(dim=-1)
                w, _ = probs.t().topk(c, dim=-1)
                return w

            def ec_op(lg: Tensor, c: int = min(T, -(-T * k // E))) -> Tensor:
                return ops.expert_choice(lg, c).weight

            for mode in MODES:
                backward = mode == "fwd+bwd"
                xin = x.clone().requires_grad_(backward)
                lin = logits.clone().requires_grad_(backward)
                res = {n: clock(run_layer(f, xin, backward)) for n, f in contenders.items()}
                res["torch reference (same math + losses)"] = clock(
                    run_layer(torch_router, xin, backward)
                )
                res["topk_softmax op"] = clock(run_layer(op, lin, backward))
                res["softmax+topk (torch)"] = clock(run_layer(ref, lin, backward))
                res["router_stats op"] = clock(run_layer(stats_op, lin, backward))
                res["softmax sums+logsumexp (torch)"] = clock(run_layer(stats_torch, lin, backward))
                res["expert_choice op (c=k)"] = clock(run_layer(ec_op, lin, backward))
                res["softmax+topk over tokens (torch)"] = clock(
                    run_layer(torch_expert_choice, lin, backward)
                )
                for n, s in res.items():
                    rows.append(
                        dict(
                            router=n,
                            T=T,
                            d=d,
                            E=E,
                            k=k,
                            dtype=dname,
                            mode=mode,
                            time=stat(s),
                            ns_per_token=1e9 * s.median / T,
                        )
                    )
                log(
                    f"  routers T={T} E={E} k={k} {dname} {mode}: "
                    + " ".join(f"{n}={1e6 * s.median:.0f}us" for n, s in res.items())
                )
    return rows


# ---------------------------------------------------------------------------------------------
# ops
# ---------------------------------------------------------------------------------------------
def torch_plan(flat: Tensor, E: int) -> tuple[Tensor, Tensor, Tensor]:
    """make_plan's work in torch: stable sort by expert, counts, offsets, inverse order."""
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))
    return order, offsets, inverse


def bench_ops(shapes: dict[str, Shape], dtypes: list[str], clock: Clock) -> list[dict]:
    rows = []
    for name, shape in shapes.items():
        if name == "v-moe":
            continue  # the same dispatch as mixtral-like
        T, d, E, k = shape.T, shape.d, shape.E, shape.k
        torch.manual_seed(0)
        expert = torch.randn(T, E).topk(k, dim=1).indices.to(torch.int32)
        flat = expert.reshape(-1).long()
        plan = ops.make_plan(expert, E)
        order, _, inverse = torch_plan(flat, E)
        token = order // k
        res_plan = {
            "smoe": clock(lambda e=expert, E=E: ops.make_plan(e, E).offsets),
            "torch": clock(lambda f=flat, E=E: torch_plan(f, E)[1]),
        }
        rows.append(op_row("make_plan", name, shape, "-", "fwd", res_plan, 0))
        for dname in dtypes:
            dtype = DTYPES[dname]
            x = torch.randn(T, d, dtype=dtype)
            ys = torch.randn(T * k, d, dtype=dtype)
            w = torch.rand(T, k, dtype=dtype)

            def permute(x: Tensor, plan=plan) -> Tensor:
                return ops.permute(x, plan)

            def permute_ref(x: Tensor, token=token) -> Tensor:
                return x.index_select(0, token)

            def combine(ys: Tensor, w=w, plan=plan) -> Tensor:
                return ops.combine(ys, w, plan)

            def combine_ref(ys: Tensor, w=w, inverse=inverse, shape=(T, k, d)) -> Tensor:
                return (ys[inverse].view(shape) * w.unsqueeze(-1)).sum(dim=1)

            for mode in MODES:
                backward = mode == "fwd+bwd"
                xin = x.clone().requires_grad_(backward)
                yin = ys.clone().requires_grad_(backward)
                res = {
                    "smoe": clock(run_layer(permute, xin, backward)),
                    "torch": clock(run_layer(permute_ref, xin, backward)),
                }
                moved = 2 * T * k * d * x.element_size()  # rows read + written
                rows.append(op_row("permute", name, shape, dname, mode, res, moved))
                res = {
                    "smoe": clock(run_layer(combine, yin, backward)),
                    "torch": clock(run_layer(combine_ref, yin, backward)),
                }
                moved = (T * k + T) * d * x.element_size()
                rows.append(op_row("combine", name, shape, dname, mode, res, moved))
        for r in rows[-(1 + 4 * len(dtypes)) :]:
            log(
                f"  ops {r['op']:<9} {r['shape']:<12} {r['dtype']:<4} {r['mode']:<7} "
                f"smoe {1e6 * r['smoe']['median']:8.1f} us  torch/smoe {r['speedup']:.2f}x"
            )
    return rows


def op_row(op: str, name: str, shape: Shape, dname: str, mode: str, res: dict, moved: int):
    t = res["smoe"].median
    return dict(
        op=op,
        shape=name,
        T=shape.T,
        d=shape.d,
        E=shape.E,
        k=shape.k,
        dtype=dname,
        mode=mode,
        smoe=stat(res["smoe"]),
        torch=stat(res["torch"]),
        speedup=res["torch"].median / t,
        gb_per_s=moved / t / 1e9 if moved and mode == "fwd" else None,
    )
