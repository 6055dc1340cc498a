"""The suite's MoE layer sections: the shapes, the layer against its baselines (``layer``), and
the SMoE-VAE decoder experts (``vae``). See suite.py for what each section measures."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from baselines import build_baselines
from bench_layer import DTYPES, OVERHEAD_TARGET, SHAPES, TARGETS, probe_step, run_layer
from common import (
    LOADS,
    MODES,
    Clock,
    PatternRouter,
    Stat,
    log,
    pattern_bias,
    peak_bytes,
    profile_top,
    stat,
)
from layer_metrics import dense_limit, expert_flops, stage_times
from torch import Tensor, nn

from smoe import MoELayer
from smoe.routing import TopKRouter


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
VAE = {"full": dict(B=128, E=5, L=32), "quick": dict(B=32, E=5, L=32)}
BASELINE_ORDER = (
    "sort+grouped_mm",
    "gshard-einsum",
    "transformers-eager",
    "transformers-grouped_mm",
    "transformers-batched_mm",
)


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
            contenders = {"smoe": layer, **baselines}
            measured = clock.many({n: run_layer(m, xin, backward) for n, m in contenders.items()})
            ours = measured.pop("smoe")
            if isinstance(ours, RuntimeError):
                raise ours
            times: dict[str, dict | None] = {}
            errors: dict[str, str] = dict(skipped)
            for bname, res in measured.items():
                if isinstance(res, RuntimeError):  # a baseline that cannot run this case
                    errors[bname] = f"{type(res).__name__}: {res}"[:160]
                    times[bname] = None
                else:
                    times[bname] = stat(res)
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
                peaks = {"smoe": peak_bytes(probe_step(layer, xin, backward))}
                for bname, module in baselines.items():
                    if times[bname] is not None:
                        peaks[bname] = peak_bytes(probe_step(module, xin, backward))
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
                t = {
                    n: stat(clock(run_layer(f, z, backward, params=model)))
                    for n, f in contenders.items()
                }
                lim = clock(run_layer(dense, z, backward, params=model))
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
