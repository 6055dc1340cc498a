"""The CPU benchmark suite: smoe's MoE layer, routers and dispatch ops against their baselines.

    python benchmarks/suite.py [--quick] [--malloc tuned] [--dtype fp32 bf16] [--section ...]
        [--json F] [--results F] [--plots DIR] [--render JSON]

One command, one process: every contender of a row runs in the same process and the same run,
and every row is reported as ratios (baseline time / smoe time, > 1 means smoe is ahead; and
efficiency = dense-GEMM time of the same FLOPs / layer time). Each time is the median of at
least 5 samples after a warm-up call (3 in --quick), with its interquartile range.

Sections (``--section``):

- ``layer``: MoELayer at four shapes (dispatch overhead: tiny d, many tokens; Mixtral-like
  scaled to CPU: E = 8, k = 2, d_ff = 3.5 d; fine-grained OLMoE/Qwen3-MoE-like: E = 64, k = 8,
  small d_ff; V-MoE: E = 8, k = 2, GELU, capacity factor 1.25), fp32 and bf16, four load
  patterns (balanced, natural, skewed, degenerate), forward and forward+backward. Baselines
  (baselines.py, same weights, same routing): torchtitan's sort + ``torch._grouped_mm``,
  GShard's capacity-padded one-hot einsum, transformers' experts with each
  ``experts_implementation`` (batched_mm where its gathered weights fit in 1 GiB), and the
  limit: dense ``torch.mm`` GEMMs with the FLOPs of the kept assignments. Also the time share
  of route / plan / permute / experts / combine (each stage timed alone) and peak memory
  (natural load).
- ``vae``: the SMoE-VAE decoder experts (smoe.models.SMoEVAE, E = 5 conv decoders): top-1
  dispatch through make_plan / permute / combine vs all decoders batched (the training path)
  vs a per-expert mask loop, and one decoder over every row as the limit.
- ``routers``: every router in smoe.routing (TopKRouter plain and noisy, VMoERouter in training
  and with BPR at C = 0.5, ExpertChoiceRouter at c = k), the topk_softmax op against softmax +
  topk in torch, and the expert_choice op against softmax + top-C over tokens in torch.
- ``ops``: make_plan / permute / combine alone against their torch equivalents.
- ``scaling``: layer time as tokens grow (1k to 64k) and as experts grow (8 to 256) at fixed
  FLOPs per token, plotted.
- ``compile``: graph breaks under ``torch._dynamo.explain`` for every contender, and whether
  smoe's layer compiles forward+backward with ``fullgraph=True`` (aot_eager).

Peak memory is the peak of bytes held by torch's CPU allocator during one call above what was
live before (torch.profiler memory events): tensors only, not the Python heap.

Outputs: JSON (``--json``), PNG plots (``--plots``), and markdown tables written into
``--results`` between ``<!-- suite:begin -->`` and ``<!-- suite:end -->`` (appended when the
markers are absent; text outside them is left alone). ``--quick`` runs tiny shapes in under a
minute and by default writes under benchmarks/out/, never to the committed RESULTS.md.
``--render JSON`` rewrites the tables and plots from a saved run without measuring.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from baselines import build_baselines  # noqa: E402
from bench_layer import (  # noqa: E402
    DTYPES,
    OVERHEAD_TARGET,
    SHAPES,
    TARGETS,
    TUNED_MALLOC,
    run_layer,
)
from common import (  # noqa: E402
    LOADS,
    STAGES,
    PatternRouter,
    Stat,
    dense_limit,
    expert_flops,
    machine,
    maybe_reexec_tuned_malloc,
    pattern_bias,
    peak_bytes,
    profile_top,
    stage_times,
)
from common import measure as _measure  # noqa: E402

import smoe  # noqa: E402
import smoe.routing  # noqa: E402
from smoe import MoELayer, ops  # noqa: E402
from smoe.routing import ExpertChoiceRouter, TopKRouter, VMoERouter  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "<!-- suite:begin -->", "<!-- suite:end -->"
SECTIONS = ("layer", "vae", "routers", "ops", "scaling", "compile")
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Shape:
    """An MoE layer shape: T tokens of width d, E experts of hidden width d_ff, k per token."""

    T: int
    d: int
    d_ff: int
    E: int
    k: int
    activation: str = "swiglu"
    capacity_factor: float | None = None
    renormalize: bool = True

    @property
    def inner(self) -> int:
        return 2 * self.d_ff if self.activation == "swiglu" else self.d_ff


FULL_SHAPES = {
    "dispatch": Shape(T=16384, d=32, d_ff=32, E=8, k=2),
    "mixtral-like": Shape(**{**SHAPES["mixtral-like"], "T": 1024}),
    "fine-grained": Shape(**{**SHAPES["fine-grained"], "T": 2048}),
    "v-moe": Shape(1024, 384, 1536, 8, 2, "gelu", capacity_factor=1.25, renormalize=False),
}
QUICK_SHAPES = {
    "dispatch": Shape(T=1024, d=16, d_ff=16, E=8, k=2),
    "mixtral-like": Shape(T=128, d=64, d_ff=224, E=8, k=2),
    "fine-grained": Shape(T=128, d=32, d_ff=16, E=64, k=8),
    "v-moe": Shape(128, 48, 192, 8, 2, "gelu", capacity_factor=1.25, renormalize=False),
}
SCALING = {  # d, d_ff, k fixed: FLOPs per token fixed
    "full": dict(d=128, d_ff=256, k=2, tokens=(1024, 4096, 16384, 65536), E_tokens=8,
                 experts=(8, 32, 128, 256), T_experts=8192),
    "quick": dict(d=32, d_ff=64, k=2, tokens=(256, 1024), E_tokens=8,
                  experts=(8, 32), T_experts=512),
}  # fmt: skip
ROUTER_SHAPES = {"full": [(8192, 256, 8, 2), (8192, 256, 64, 8)], "quick": [(256, 32, 8, 2)]}
VAE = {"full": dict(B=128, E=5, L=32), "quick": dict(B=32, E=5, L=32)}
BASELINE_ORDER = (
    "sort+grouped_mm",
    "gshard-einsum",
    "transformers-eager",
    "transformers-grouped_mm",
    "transformers-batched_mm",
)


class Clock:
    """Timing settings of this run (one place, so --quick changes them all)."""

    def __init__(
        self, min_run_time: float, min_samples: int, block_s: float, slow_s: float = float("inf")
    ) -> None:
        self.min_run_time, self.min_samples, self.block_s = min_run_time, min_samples, block_s
        self.slow_s = slow_s

    def __call__(self, fn: Callable[[], object], min_samples: int | None = None) -> Stat:
        return _measure(
            fn,
            min_run_time=self.min_run_time,
            min_samples=min_samples or self.min_samples,
            block_s=self.block_s,
            slow_s=self.slow_s,
        )


def stat(s: Stat) -> dict:
    return asdict(s)


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# layer
# ---------------------------------------------------------------------------------------------
def make_layer(shape: Shape, dtype: torch.dtype) -> tuple[MoELayer, PatternRouter]:
    router = PatternRouter(
        TopKRouter(shape.d, shape.E, shape.k, renormalize=shape.renormalize), bias=None
    )
    layer = MoELayer(
        shape.d,
        shape.d_ff,
        shape.E,
        shape.k,
        activation=shape.activation,
        router=router,
        capacity_factor=shape.capacity_factor,
    ).to(dtype)
    return layer.eval(), router


def bench_layer_shape(name: str, shape: Shape, dname: str, clock: Clock) -> tuple[list, dict]:
    """Every load x mode row of one shape and dtype; plus a profile when a target is missed."""
    dtype = DTYPES[dname]
    torch.manual_seed(0)
    layer, router = make_layer(shape, dtype)
    baselines, skipped = build_baselines(
        layer,
        shape.k,
        tokens=shape.T,
        renormalize=shape.renormalize,
        capacity_factor=shape.capacity_factor,
    )
    x = torch.randn(shape.T, shape.d, dtype=dtype)
    dense_cache: dict[tuple[int, bool], Stat] = {}
    rows = []
    for load in LOADS:
        bias = pattern_bias(load, shape.T, shape.E, shape.k)
        router.bias = bias
        for b in baselines.values():
            b.bias = bias
        with torch.no_grad():
            _, aux = layer(x)
        kept = int(aux.tokens_per_expert.sum())
        for mode in MODES:
            backward = mode == "fwd+bwd"
            xin = x.clone().requires_grad_(backward)
            ours = clock(run_layer(layer, xin, backward))
            times: dict[str, dict | None] = {}
            errors: dict[str, str] = dict(skipped)
            for bname, module in baselines.items():
                try:
                    times[bname] = stat(clock(run_layer(module, xin, backward)))
                except RuntimeError as e:  # a baseline that cannot run this case
                    errors[bname] = f"{type(e).__name__}: {e}"[:160]
                    times[bname] = None
            key = (kept, backward)
            if key not in dense_cache:
                fn = dense_limit(kept, shape.d, shape.inner, shape.d_ff, dtype, backward)
                dense_cache[key] = clock(fn)
            dense = dense_cache[key]
            stages = stage_times(layer, x, backward, clock=clock)
            total = sum(stages.values())
            shares = {s: v / total for s, v in stages.items()}
            peaks = None
            if load == "natural":
                peaks = {"smoe": peak_bytes(run_layer(layer, xin, backward))}
                for bname, module in baselines.items():
                    if times[bname] is not None:
                        peaks[bname] = peak_bytes(run_layer(module, xin, backward))
            flops = expert_flops(kept, shape.d, shape.inner, shape.d_ff, backward)
            row = dict(
                shape=name,
                dtype=dname,
                load=load,
                mode=mode,
                T=shape.T,
                kept=kept,
                dropped_fraction=float(aux.dropped_fraction),
                smoe=stat(ours),
                dense=stat(dense),
                baselines=times,
                skipped=errors,
                tokens_per_s=shape.T / ours.median,
                efficiency=dense.median / ours.median,
                gflops=flops / ours.median / 1e9,
                stage_s=stages,
                shares=shares,
                overhead_share=1.0 - shares["experts"],
                peak_bytes=peaks,
            )
            rows.append(row)
            log(layer_line(row))
    profile = None
    target = TARGETS.get(name)
    missed = any(
        r["efficiency"] < target or r["overhead_share"] > OVERHEAD_TARGET
        for r in rows
        if target is not None and r["mode"] == "fwd+bwd" and r["load"] != "degenerate"
    )
    if missed:
        router.bias = None
        xin = x.clone().requires_grad_(True)
        profile = {
            "shape": name,
            "dtype": dname,
            "load": "natural",
            "mode": "fwd+bwd",
            "smoe": profile_top(run_layer(layer, xin, True)),
            "dense": profile_top(
                dense_limit(shape.T * shape.k, shape.d, shape.inner, shape.d_ff, dtype, True)
            ),
        }
    return rows, profile


def layer_line(r: dict) -> str:
    vs = " ".join(
        f"{b.split('-', 1)[-1] if b.startswith('transformers') else b}="
        f"{r['baselines'][b]['median'] / r['smoe']['median']:.2f}x"
        for b in BASELINE_ORDER
        if r["baselines"].get(b)
    )
    return (
        f"  {r['shape']:<12} {r['dtype']:<4} {r['load']:<10} {r['mode']:<7} "
        f"{1e3 * r['smoe']['median']:8.2f} ms  eff {r['efficiency']:.2f}  "
        f"overhead {100 * r['overhead_share']:4.1f}%  {vs}"
    )


# ---------------------------------------------------------------------------------------------
# vae
# ---------------------------------------------------------------------------------------------
def vae_experts(load: str, B: int, E: int, gate_logits: Tensor, g: torch.Generator) -> Tensor:
    """Top-1 expert of each image under a load pattern (natural: the gate's argmax)."""
    if load == "natural":
        return gate_logits.argmax(dim=-1)
    if load == "balanced":
        return torch.randperm(B, generator=g) % E
    if load == "skewed":
        hot = torch.randperm(B, generator=g) < B // 2
        return torch.where(hot, 0, 1 + torch.randint(E - 1, (B,), generator=g))
    return torch.zeros(B, dtype=torch.long)


def bench_vae(cfg: dict, dtypes: list[str], clock: Clock) -> list[dict]:
    try:
        from smoe.models import SMoEVAE
    except ImportError as e:
        log(f"  vae: skipped ({e})")
        return []
    if not hasattr(SMoEVAE, "decode_top1"):
        log("  vae: skipped (SMoEVAE has no decode_top1)")
        return []
    B, E, L = cfg["B"], cfg["E"], cfg["L"]
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        torch.manual_seed(0)
        model = SMoEVAE(num_experts=E, latent_dim=L).to(dtype).eval()
        ex = model.experts
        z0 = torch.randn(B, L, dtype=dtype)
        with torch.no_grad():
            gate_logits = model.gate(z0)
        for load in LOADS:
            g = torch.Generator().manual_seed(0)
            expert = vae_experts(load, B, E, gate_logits, g)
            masks = [(expert == e).nonzero().squeeze(1) for e in range(E)]

            def top1(z: Tensor, expert: Tensor = expert, model: nn.Module = model) -> Tensor:
                return model.decode_top1(z, expert)

            def batched(z: Tensor, expert: Tensor = expert, ex: nn.Module = ex) -> Tensor:
                y = ex(z)  # [B, E, 28, 28]
                return y[torch.arange(z.shape[0]), expert].unsqueeze(1)

            def loop(z: Tensor, masks: list[Tensor] = masks, ex: nn.Module = ex) -> Tensor:
                out = z.new_zeros(z.shape[0], 1, 28, 28)
                for e, idx in enumerate(masks):
                    if idx.numel():
                        out = out.index_copy(0, idx, ex.decode_one(e, z[idx]))
                return out

            def dense(z: Tensor, ex: nn.Module = ex) -> Tensor:
                return ex.decode_one(0, z)

            contenders = {"smoe-top1": top1, "all-experts": batched, "mask-loop": loop}
            for mode in MODES:
                backward = mode == "fwd+bwd"
                z = z0.clone().requires_grad_(backward)
                t = {n: stat(clock(run_layer(f, z, backward))) for n, f in contenders.items()}
                lim = clock(run_layer(dense, z, backward))
                row = dict(
                    dtype=dname,
                    load=load,
                    mode=mode,
                    B=B,
                    E=E,
                    times=t,
                    dense=stat(lim),
                    images_per_s=B / t["smoe-top1"]["median"],
                    efficiency=lim.median / t["smoe-top1"]["median"],
                )
                rows.append(row)
                log(
                    f"  vae {dname} {load:<10} {mode:<7} top1 "
                    f"{1e3 * t['smoe-top1']['median']:.2f} ms eff {row['efficiency']:.2f} "
                    + " ".join(
                        f"{n}={t[n]['median'] / t['smoe-top1']['median']:.2f}x"
                        for n in ("all-experts", "mask-loop")
                    )
                )
    return rows


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

                def route(x: Tensor, router: nn.Module = router) -> Tensor:
                    r = router(x)
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


# ---------------------------------------------------------------------------------------------
# scaling
# ---------------------------------------------------------------------------------------------
def bench_scaling(cfg: dict, dname: str, clock: Clock) -> list[dict]:
    dtype = DTYPES[dname]
    points = [("tokens", T, cfg["E_tokens"]) for T in cfg["tokens"]]
    points += [("experts", cfg["T_experts"], E) for E in cfg["experts"]]
    rows = []
    for sweep, T, E in points:
        shape = Shape(T=T, d=cfg["d"], d_ff=cfg["d_ff"], E=E, k=cfg["k"])
        torch.manual_seed(0)
        layer, _ = make_layer(shape, dtype)
        baselines, _ = build_baselines(layer, shape.k, tokens=T, batched_mm_max_bytes=0)
        keep = ("sort+grouped_mm", "transformers-grouped_mm")
        contenders = {"smoe": layer, **{n: m for n, m in baselines.items() if n in keep}}
        x = torch.randn(T, shape.d, dtype=dtype)
        for mode in MODES:
            backward = mode == "fwd+bwd"
            xin = x.clone().requires_grad_(backward)
            res = {n: clock(run_layer(m, xin, backward), 3) for n, m in contenders.items()}
            fn = dense_limit(T * shape.k, shape.d, shape.inner, shape.d_ff, dtype, backward)
            res["dense"] = clock(fn, 3)
            rows.append(
                dict(
                    sweep=sweep,
                    T=T,
                    E=E,
                    d=shape.d,
                    d_ff=shape.d_ff,
                    k=shape.k,
                    dtype=dname,
                    mode=mode,
                    times={n: stat(s) for n, s in res.items()},
                    efficiency=res["dense"].median / res["smoe"].median,
                )
            )
            log(
                f"  scaling {sweep:<7} T={T:<6} E={E:<4} {mode:<7} "
                + " ".join(f"{n}={1e3 * s.median:.2f}ms" for n, s in res.items())
            )
    return rows


# ---------------------------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_dynamo():
    names = ("torch._dynamo", "torch._subclasses.fake_tensor", "torch._inductor")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for n, lv in levels.items():
                logging.getLogger(n).setLevel(lv)


def bench_compile(dtypes: list[str]) -> list[dict]:
    shape = Shape(T=64, d=32, d_ff=32, E=8, k=2)
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        torch.manual_seed(0)
        layer, _ = make_layer(shape, dtype)
        baselines, _ = build_baselines(layer, shape.k, tokens=shape.T)
        x = torch.randn(shape.T, shape.d, dtype=dtype)
        for name, module in {"smoe": layer, **baselines}.items():
            row: dict = dict(contender=name, dtype=dname)
            with quiet_dynamo():
                torch._dynamo.reset()
                try:
                    e = torch._dynamo.explain(module)(x)
                    row.update(
                        graphs=e.graph_count,
                        graph_breaks=e.graph_break_count,
                        reasons=sorted({_first_line(b.reason) for b in e.break_reasons})[:3],
                    )
                except Exception as ex:  # noqa: BLE001 - a trace failure is a result here
                    row.update(graphs=None, graph_breaks=None, error=_first_line(str(ex)))
                if name == "smoe":
                    row["fullgraph_fwd_bwd"] = _fullgraph_ok(layer, x)
            rows.append(row)
            log(
                f"  compile {dname} {name:<24} graphs={row['graphs']} "
                f"breaks={row['graph_breaks']} {row.get('error', '')[:80]}"
            )
    torch._dynamo.reset()
    return rows


def _first_line(s: object) -> str:
    lines = [ln.strip() for ln in str(s).splitlines() if ln.strip()]
    return lines[0][:120] if lines else ""


def _fullgraph_ok(layer: MoELayer, x: Tensor) -> str:
    """Whether the layer compiles forward+backward as one graph (aot_eager) and matches eager."""
    try:
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        yc, ye = compiled(xc)[0], layer(xe)[0]
        g = torch.randn_like(ye)
        yc.backward(g)
        ye.backward(g)
        ok = torch.allclose(yc, ye) and torch.allclose(xc.grad, xe.grad)
        return "ok" if ok else "mismatch"
    except Exception as ex:  # noqa: BLE001
        return f"error: {_first_line(ex)}"


# ---------------------------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------------------------
def evaluate_targets(layer_rows: list[dict]) -> list[dict]:
    """The CPU targets of the README, each met or missed, with the worst case and the margin."""
    out = []
    fb = [r for r in layer_rows if r["mode"] == "fwd+bwd" and r["load"] != "degenerate"]
    for shape, target in TARGETS.items():
        for dname in sorted({r["dtype"] for r in fb if r["shape"] == shape}):
            rs = [r for r in fb if r["shape"] == shape and r["dtype"] == dname]
            worst = min(rs, key=lambda r: r["efficiency"])
            out.append(
                dict(
                    target=f"fwd+bwd efficiency >= {target:.2f}",
                    scope=f"{shape} {dname}, loads but degenerate",
                    met=worst["efficiency"] >= target,
                    worst=f"{worst['efficiency']:.2f} ({worst['load']})",
                    margin=worst["efficiency"] - target,
                )
            )
    rs = [r for r in layer_rows if r["shape"] in TARGETS and r["load"] != "degenerate"]
    if rs:
        worst = max(rs, key=lambda r: r["overhead_share"])
        out.append(
            dict(
                target=f"route+plan+permute+combine <= {100 * OVERHEAD_TARGET:.0f}%",
                scope=", ".join(TARGETS) + ", fwd and fwd+bwd, loads but degenerate",
                met=worst["overhead_share"] <= OVERHEAD_TARGET,
                worst=f"{100 * worst['overhead_share']:.1f}% ({worst['shape']} "
                f"{worst['dtype']} {worst['load']} {worst['mode']})",
                margin=OVERHEAD_TARGET - worst["overhead_share"],
            )
        )
    for b in BASELINE_ORDER:
        rs = [r for r in layer_rows if r["baselines"].get(b)]
        if not rs:
            continue
        ratio = [(r["baselines"][b]["median"] / r["smoe"]["median"], r) for r in rs]
        behind = [(v, r) for v, r in ratio if v < 1.0]
        v, r = min(ratio, key=lambda p: p[0])
        out.append(
            dict(
                target=f"ahead of {b}",
                scope=f"every shape, dtype, load, mode ({len(rs)} rows)",
                met=not behind,
                worst=f"{v:.2f}x ({r['shape']} {r['dtype']} {r['load']} {r['mode']})"
                + (f"; behind in {len(behind)}/{len(rs)}" if behind else ""),
                margin=v - 1.0,
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# rendering: markdown and plots
# ---------------------------------------------------------------------------------------------
def fmt_ms(s: dict | None) -> str:
    if not s:
        return "-"
    return f"{1e3 * s['median']:.2f} ± {1e3 * s['iqr']:.2f}"


def ratio(b: dict | None, ours: dict) -> str:
    return f"{b['median'] / ours['median']:.2f}x" if b else "-"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out + [""]


def render_markdown(data: dict) -> str:
    m = data["machine"]
    lines = [
        f"### Suite run {data['date']}" + (" (quick)" if data["quick"] else ""),
        "",
        f"- command: `{data['command']}` (wall {data['wall_s']:.0f} s)",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, ISA {m['isa']}; "
        f"torch {m['torch']}, smoe {m['smoe']}, transformers {m['transformers']}, "
        f"Python {m['python']}; commit {m['commit']}",
        f"- malloc: {data['malloc']}" + (f" {data['env']}" if data["env"] else ""),
        f"- times: median ± IQR of >= {data['min_samples']} samples after a warm-up (3 for "
        "calls over 0.15 s); ratios are baseline time / smoe time "
        "(> 1: smoe ahead); efficiency = dense torch.mm time of the same expert FLOPs / smoe "
        "time.",
        "",
    ]
    sec = data["sections"]
    if data.get("targets"):
        lines += ["#### Targets (CPU)", ""]
        lines += table(
            ["target", "scope", "result", "worst case", "margin"],
            [
                [t["target"], t["scope"], "met" if t["met"] else "**missed**", t["worst"],
                 f"{t['margin']:+.2f}"]
                for t in data["targets"]
            ],
        )  # fmt: skip
    if sec.get("layer"):
        lines += layer_tables(sec["layer"], data.get("shapes", {}))
    for p in sec.get("profiles") or []:
        lines += [
            f"Profile where a target is missed: {p['shape']} {p['dtype']} {p['load']} "
            f"{p['mode']}, self CPU time by op (smoe layer | dense limit):",
            "",
        ]

        def split(ops_: list[dict]) -> tuple[list[dict], list[dict]]:
            return [o for o in ops_ if o["op"] != "(all ops)"], [
                o for o in ops_ if o["op"] == "(all ops)"
            ]

        (ours, ours_total), (dense, dense_total) = split(p["smoe"]), split(p["dense"])
        cells = []
        for i in range(max(len(ours), len(dense))):
            a = ours[i] if i < len(ours) else None
            b = dense[i] if i < len(dense) else None
            cells.append(_profile_cells(a) + _profile_cells(b))
        if ours_total or dense_total:
            total = _profile_cells(ours_total[0] if ours_total else None)
            cells.append(total + _profile_cells(dense_total[0] if dense_total else None))
        lines += table(["smoe op", "ms (share)", "dense op", "ms (share)"], cells)
    if sec.get("vae"):
        lines += ["#### SMoE-VAE decoder experts (top-1)", ""]
        rows = sec["vae"]
        lines += [
            f"B = {rows[0]['B']} latents, E = {rows[0]['E']} conv decoders; limit: one decoder "
            "over all B rows (the FLOPs of top-1).",
            "",
        ]
        lines += table(
            ["dtype", "load", "mode", "smoe top-1 ms", "images/s", "efficiency",
             "vs all-experts", "vs mask-loop"],
            [
                [r["dtype"], r["load"], r["mode"], fmt_ms(r["times"]["smoe-top1"]),
                 f"{r['images_per_s']:,.0f}", f"{r['efficiency']:.2f}",
                 ratio(r["times"]["all-experts"], r["times"]["smoe-top1"]),
                 ratio(r["times"]["mask-loop"], r["times"]["smoe-top1"])]
                for r in rows
            ],
        )  # fmt: skip
    if sec.get("routers"):
        lines += ["#### Routers", ""]
        lines += table(
            ["router", "T", "d", "E", "k", "dtype", "mode", "time (us)", "ns/token"],
            [
                [r["router"], r["T"], r["d"], r["E"], r["k"], r["dtype"], r["mode"],
                 f"{1e6 * r['time']['median']:.0f} ± {1e6 * r['time']['iqr']:.0f}",
                 f"{r['ns_per_token']:.1f}"]
                for r in sec["routers"]
            ],
        )  # fmt: skip
    if sec.get("ops"):
        lines += ["#### Dispatch ops alone (natural routing)", ""]
        lines += table(
            ["op", "shape", "dtype", "mode", "smoe (us)", "torch (us)", "torch / smoe",
             "GB/s"],
            [
                [r["op"], r["shape"], r["dtype"], r["mode"],
                 f"{1e6 * r['smoe']['median']:.1f}", f"{1e6 * r['torch']['median']:.1f}",
                 f"{r['speedup']:.2f}x",
                 f"{r['gb_per_s']:.1f}" if r["gb_per_s"] else "-"]
                for r in sec["ops"]
            ],
        )  # fmt: skip
    if sec.get("scaling"):
        lines += ["#### Scaling (natural routing)", ""]
        rs = sec["scaling"]
        names = list(rs[0]["times"])
        lines += table(
            ["sweep", "T", "E", "dtype", "mode", *[f"{n} ms" for n in names],
             "smoe us/token", "efficiency"],
            [
                [r["sweep"], r["T"], r["E"], r["dtype"], r["mode"],
                 *[f"{1e3 * r['times'][n]['median']:.2f}" for n in names],
                 f"{1e6 * r['times']['smoe']['median'] / r['T']:.2f}",
                 f"{r['efficiency']:.2f}"]
                for r in rs
            ],
        )  # fmt: skip
        lines += ["![tokens](plots/scaling_tokens.png) ![experts](plots/scaling_experts.png)", ""]
    if sec.get("compile"):
        lines += ["#### torch.compile (dynamo explain, T = 64)", ""]
        lines += table(
            ["contender", "dtype", "graphs", "graph breaks", "why / fullgraph fwd+bwd"],
            [
                [r["contender"], r["dtype"], r["graphs"], r["graph_breaks"],
                 r.get("error") or r.get("fullgraph_fwd_bwd") or "; ".join(r["reasons"])]
                for r in sec["compile"]
            ],
        )  # fmt: skip
    return "\n".join(lines).rstrip() + "\n"


def _profile_cells(o: dict | None) -> list[str]:
    if not o:
        return ["", ""]
    return [f"`{o['op']}` x{o['calls']}", f"{o['ms']:.1f} ({100 * o['share']:.0f}%)"]


def layer_tables(rows: list[dict], shapes: dict) -> list[str]:
    lines = ["#### MoE layer", ""]
    if shapes:
        lines += [
            "Shapes: "
            + "; ".join(
                f"{n}: T={s['T']} d={s['d']} d_ff={s['d_ff']} E={s['E']} k={s['k']} "
                f"{s['activation']}" + (f" cf={s['capacity_factor']}" if s["capacity_factor"]
                                        else "")
                for n, s in shapes.items()
            ),
            "",
        ]  # fmt: skip
    lines += [
        "Loads: balanced (T·k/E each), natural (random gate), skewed (expert 0 in the top-k "
        "of half the tokens), degenerate (every token on experts 0..k-1). gshard-einsum runs "
        "at capacity factor 1.25 (v-moe: the layer's) and drops what exceeds it; the other "
        "baselines are dropless.",
        "",
    ]
    names = [b for b in BASELINE_ORDER if any(r["baselines"].get(b) for r in rows)]
    short = [b.replace("transformers-", "hf-") for b in names]
    lines += table(
        ["shape", "dtype", "load", "mode", "smoe ms", "tokens/s", "efficiency", "overhead",
         *[f"vs {s}" for s in short]],
        [
            [r["shape"], r["dtype"], r["load"], r["mode"], fmt_ms(r["smoe"]),
             f"{r['tokens_per_s']:,.0f}", f"{r['efficiency']:.2f}",
             f"{100 * r['overhead_share']:.1f}%",
             *[ratio(r["baselines"].get(b), r["smoe"]) for b in names]]
            for r in rows
        ],
    )  # fmt: skip
    skipped = sorted({f"{b}: {why}" for r in rows for b, why in r["skipped"].items()})
    if skipped:
        lines += ["Not run: " + "; ".join(skipped[:6]), ""]
    lines += ["Time shares of the smoe layer (each stage timed alone), natural load:", ""]
    lines += table(
        ["shape", "dtype", "mode", *[f"{s} %" for s in STAGES]],
        [
            [r["shape"], r["dtype"], r["mode"], *[f"{100 * r['shares'][s]:.1f}" for s in STAGES]]
            for r in rows
            if r["load"] == "natural"
        ],
    )
    mem = [r for r in rows if r["peak_bytes"]]
    if mem:
        lines += ["Peak memory (MiB, torch CPU allocator, one call), natural load:", ""]
        lines += table(
            ["shape", "dtype", "mode", "smoe", *short],
            [
                [r["shape"], r["dtype"], r["mode"], f"{r['peak_bytes']['smoe'] / 2**20:.1f}",
                 *[f"{r['peak_bytes'][b] / 2**20:.1f}" if b in r["peak_bytes"] else "-"
                   for b in names]]
                for r in mem
            ],
        )  # fmt: skip
    lines += ["![efficiency](plots/efficiency.png) ![shares](plots/stage_shares.png)", ""]
    return lines


def write_results(path: str, block: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the text between the markers in ``path`` (append them when absent)."""
    text = open(path).read() if os.path.exists(path) else ""
    new = f"{begin}\n{block}{end}"
    if begin in text and end in text and text.index(begin) < text.index(end):
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + new + tail
    else:
        sep = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        text = text + sep + new + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def render_plots(data: dict, outdir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(outdir, exist_ok=True)
    written = []
    sec = data["sections"]
    colors = {"smoe": "C0", "sort+grouped_mm": "C1", "transformers-grouped_mm": "C2", "dense": "k"}
    for sweep, xkey, xlabel in (
        ("tokens", "T", "tokens T"),
        ("experts", "E", "experts E (fixed FLOPs per token)"),
    ):
        rs = [r for r in sec.get("scaling") or [] if r["sweep"] == sweep]
        if not rs:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, mode in zip(axes, MODES):
            mr = [r for r in rs if r["mode"] == mode]
            xs = [r[xkey] for r in mr]
            for n in mr[0]["times"]:
                per = [1e6 * r["times"][n]["median"] / r["T"] for r in mr]
                ax.plot(xs, per, "o-", label=n, color=colors.get(n))
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("us per token (flat = linear in T)" if sweep == "tokens" else
                          "us per token (flat = cost independent of E)")  # fmt: skip
            ax.set_title(f"{mode}, {mr[0]['dtype']}, d={mr[0]['d']} d_ff={mr[0]['d_ff']}")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(outdir, f"scaling_{sweep}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    rows = [r for r in sec.get("layer") or [] if r["mode"] == "fwd+bwd"]
    if rows:
        groups = sorted({(r["shape"], r["dtype"]) for r in rows}, key=str)
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 4))
        width = 0.8 / len(LOADS)
        for i, load in enumerate(LOADS):
            vals = [
                next((r["efficiency"] for r in rows if (r["shape"], r["dtype"]) == g
                      and r["load"] == load), 0.0)
                for g in groups
            ]  # fmt: skip
            ax.bar([j + i * width for j in range(len(groups))], vals, width, label=load)
        for j, (shape, _) in enumerate(groups):
            if shape in TARGETS:
                ax.hlines(TARGETS[shape], j - width / 2, j + 0.8 - width / 2, colors="r")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
        ax.set_xticklabels([f"{s}\n{d}" for s, d in groups], fontsize=8)
        ax.set_ylabel("efficiency (dense GEMM time / layer time)")
        ax.set_title("smoe forward+backward efficiency (red: target)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(outdir, "efficiency.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
        nat = [r for r in sec["layer"] if r["load"] == "natural"]
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(nat)), 4))
        bottom = [0.0] * len(nat)
        for s in STAGES:
            vals = [100 * r["shares"][s] for r in nat]
            ax.bar(range(len(nat)), vals, bottom=bottom, label=s)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(range(len(nat)))
        ax.set_xticklabels([f"{r['shape']}\n{r['dtype']} {r['mode']}" for r in nat], fontsize=7)
        ax.set_ylabel("% of stage time")
        ax.set_title("smoe layer time by stage (natural load)")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        path = os.path.join(outdir, "stage_shares.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    size = "quick" if args.quick else "full"
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    shapes = {n: s for n, s in shapes.items() if n in args.shape}
    if args.quick:  # exercise every path, not measure: 3 single-call samples after a warm-up
        clock = Clock(args.min_run_time or 0.0, 3, 0.0)
    else:
        clock = Clock(args.min_run_time or 0.3, 5, 2e-3, slow_s=0.15)
    sections: dict = {}
    walls: dict[str, float] = {}
    start = time.perf_counter()

    def section(name: str, fn: Callable[[], object]) -> None:
        if name not in args.section:
            return
        log(f"== {name}")
        t = time.perf_counter()
        sections[name] = fn()
        walls[name] = time.perf_counter() - t
        log(f"   ({walls[name]:.1f} s)")

    def layer() -> list[dict]:
        rows, profiles = [], []
        for name, shape in shapes.items():
            for dname in args.dtype:
                r, p = bench_layer_shape(name, shape, dname, clock)
                rows += r
                if p:
                    profiles.append(p)
        sections["profiles"] = profiles
        return rows

    section("layer", layer)
    section("vae", lambda: bench_vae(VAE[size], args.dtype, clock))
    section("routers", lambda: bench_routers(ROUTER_SHAPES[size], args.dtype, clock))
    section("ops", lambda: bench_ops(shapes, args.dtype, clock))
    section("scaling", lambda: bench_scaling(SCALING[size], args.dtype[0], clock))
    section("compile", lambda: bench_compile(args.dtype))
    return dict(
        date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        command="python " + " ".join(shlex.quote(a) for a in sys.argv),
        quick=args.quick,
        malloc=args.malloc,
        env=TUNED_MALLOC if args.malloc == "tuned" else {},
        machine=machine("cpu"),
        min_samples=clock.min_samples,
        shapes={n: asdict(s) for n, s in shapes.items()},
        sections=sections,
        section_wall_s=walls,
        targets=evaluate_targets(sections.get("layer") or []),
        wall_s=time.perf_counter() - start,
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes, short timing (< 1 min)")
    p.add_argument("--device", default="cpu", choices=["cpu"], help="GPU: bench_gpu.py")
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--shape", nargs="+", default=list(FULL_SHAPES), choices=list(FULL_SHAPES))
    p.add_argument("--section", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per measurement")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--malloc", choices=["default", "tuned"], default="default")
    p.add_argument("--json", default=None, help="default benchmarks/out/suite[.quick].json")
    p.add_argument("--results", default=None, help="markdown file (default: RESULTS.md; "
                   "--quick: benchmarks/out/RESULTS.quick.md)")  # fmt: skip
    p.add_argument("--plots", default=None, help="default benchmarks/plots (--quick: out/)")
    p.add_argument("--render", metavar="JSON", help="only re-render tables and plots from JSON")
    args = p.parse_args()
    maybe_reexec_tuned_malloc(args.malloc, TUNED_MALLOC)
    quick = args.quick
    out = os.path.join(HERE, "out")
    args.json = args.json or os.path.join(out, "suite.quick.json" if quick else "suite.json")
    args.results = args.results or (
        os.path.join(out, "RESULTS.quick.md") if quick else os.path.join(HERE, "RESULTS.md")
    )
    args.plots = args.plots or (os.path.join(out, "plots-quick") if quick else
                                os.path.join(HERE, "plots"))  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.render:
        with open(args.render) as f:
            data = json.load(f)
    else:
        log(f"machine: {machine('cpu')}")
        data = run(args)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    plots = render_plots(data, args.plots)
    block = render_markdown(data)
    write_results(args.results, block)
    print()
    print(block)
    print(f"json: {args.json}\nresults: {args.results}\nplots: {', '.join(plots)}")
    print(f"wall: {data['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
