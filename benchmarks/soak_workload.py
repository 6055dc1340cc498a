"""The soak run's workload (benchmarks/soak.py): the router variants it rotates through, its
configuration, the residual MoE stack, its batches (shapes and loads) and the float64 parity check
against smoe.reference."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from smoe import MoELayer, RoutingContext
from smoe import reference as ref
from smoe.routing import ExpertChoiceRouter, TopKRouter, VMoERouter, available_routers, router_info

SHAPES = ((2, 16), (0, 8), (4, 16), (1, 1), (3, 7), (1, 32), (8, 8))  # (B, S): T 32 0 64 1 21..
LOADS = ("balanced", "skewed", "degenerate")


@dataclass(frozen=True)
class Spec:
    """One router variant of the rotation: a registry name, its options, k, a layer capacity."""

    label: str
    router: str
    k: int = 2
    options: tuple[tuple[str, Any], ...] = ()
    capacity_factor: float | None = None


VARIANTS = (
    Spec("topk+capacity", "topk", capacity_factor=1.0),
    Spec("switch-k1+capacity", "switch", k=1, capacity_factor=1.25),
    Spec("vmoe+bpr", "vmoe", options=(("batch_priority", True), ("group_size", 16))),
    Spec("expert_choice-g16", "expert_choice", options=(("group_size", 16),)),
    # USMoE in groups of 16 tokens (the last one padded), a fractional budget, the token softmax
    Spec(
        "usmoe-g16",
        "usmoe",
        options=(("group", 16), ("budget", 1.5), ("expert_score", "token_softmax")),
    ),
)


def router_specs() -> list[Spec]:
    """Every registered router with its defaults (new ones join by registering), then VARIANTS."""
    return [Spec(name, name) for name in available_routers()] + list(VARIANTS)


@dataclass
class SoakConfig:
    steps: int = 20_000
    device: str = "cpu"
    layers: int = 2
    d_model: int = 32
    d_ff: int = 64
    experts: int = 8
    lr: float = 1e-3
    seed: int = 0
    compile_every: int = 10  # 0: no compiled variant
    compile_backend: str = "inductor"
    compile_labels: tuple[str, ...] | None = None  # specs the compiled variant rotates (None: all)
    parity_every: int = 50  # 0: no parity checks
    mem_rel: float = 0.01
    mem_abs_mb: float = 8.0
    threads: int | None = None  # torch intra-op threads (None: leave as is)
    progress: bool = True


# ---------------------------------------------------------------------------------------------
# The workload
# ---------------------------------------------------------------------------------------------
class Stack(nn.Module):
    """Pre-norm residual MoE stack: ``h = h + MoE_l(norm_l(h))``; returns (h, summed aux loss)."""

    def __init__(self, spec: Spec, cfg: SoakConfig) -> None:
        super().__init__()
        acts = ("gelu", "swiglu")
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.d_model) for _ in range(cfg.layers))
        self.layers = nn.ModuleList(
            MoELayer(
                cfg.d_model,
                cfg.d_ff,
                cfg.experts,
                spec.k,
                activation=acts[i % 2],
                router=spec.router,
                router_options=dict(spec.options),
                capacity_factor=spec.capacity_factor,
                layer_index=i,
            )
            for i in range(cfg.layers)
        )

    def forward(self, x: Tensor, context: RoutingContext) -> tuple[Tensor, Tensor, Tensor]:
        h, aux_loss = x, x.new_zeros(())
        load = None
        for norm, layer in zip(self.norms, self.layers):
            y, aux = layer(norm(h), context)
            h, aux_loss = h + y, aux_loss + aux.loss()
            load = aux.tokens_per_expert if load is None else load
        return h, aux_loss, load


def make_batch(
    shape: tuple[int, int], load: str, spec: Spec, stack: Stack, g: torch.Generator, device: str
) -> tuple[Tensor, RoutingContext]:
    """Tokens ``[B, S, d]`` of a load pattern and their context (attention if the router needs
    it). skewed: half the tokens get a large push along expert 0's router row of layer 0;
    degenerate: one token repeated, so every token takes the same experts (ties for expert
    choice)."""
    B, S = shape
    d = stack.norms[0].normalized_shape[0]
    if load == "degenerate":
        x = torch.randn(1, 1, d, generator=g).repeat(B, S, 1)
    else:
        x = torch.randn(B, S, d, generator=g)
    if load == "skewed" and B * S > 0:
        w = getattr(stack.layers[0].router, "weight", None)
        u = torch.randn(d, generator=g) if w is None else w.detach()[0].float().cpu()
        hot = torch.rand(B, S, generator=g) < 0.5
        x = x + hot[..., None] * (2.0 * math.sqrt(d)) * u / u.norm()
    attention = None
    if router_info(spec.router).needs_attention:
        attention = torch.softmax(torch.randn(B, S, S, generator=g), dim=-1).to(device)
    return x.to(device), RoutingContext(attention=attention)


def _reference_layer(layer: MoELayer, x: Tensor) -> Tensor | None:
    """``smoe.reference`` output of a float64 eval-mode layer on ``x [T, d]`` (None: the reference
    does not cover this router)."""
    r, ex, T = layer.router, layer.experts, x.shape[0]
    E, w_in, w_out, act = ex.num_experts, ex.w_in, ex.w_out, ex.activation
    cap = None
    if type(r) is TopKRouter and layer.capacity_factor is not None:
        cap = ref.capacity_for(T, r.k, E, layer.capacity_factor)
    if type(r) is TopKRouter and getattr(r, "bias", None) is not None:  # the momentum gate
        weight, expert = ref.topk_softmax(x @ r.weight.T + r.bias, r.k, renormalize=r.renormalize)
        plan = ref.make_plan(expert, E, capacity=cap)
        return ref.routed_moe(x, expert, weight, plan.kept, w_in, w_out, activation=act)
    if type(r) is TopKRouter:
        return ref.moe_layer(
            x, r.weight, w_in, w_out, r.k, activation=act, renormalize=r.renormalize, capacity=cap
        )
    logits = x @ r.weight.T if hasattr(r, "weight") else None
    if type(r) is VMoERouter and (r.rounding, r.multiple_of) == ("ceil", 4):
        weight, expert = ref.topk_softmax(logits, r.k, renormalize=False)
        prio = None
        if r.batch_priority:
            prio = weight[:, 0] if r.priority == "max" else weight.sum(1)
        S = T if r.group_size is None else min(r.group_size, T)
        c = r.current_capacity_factor()
        cap = None if c is None or T == 0 else ref.vmoe_capacity(S, E, r.k, c)
        plan = ref.make_plan(expert, E, capacity=cap, priority=prio, group_size=r.group_size)
        return ref.routed_moe(x, expert, weight, plan.kept, w_in, w_out, activation=act)
    if type(r) is ExpertChoiceRouter:
        S = T if r.group_size is None else min(r.group_size, T)
        cap = min(S, math.ceil(S * r.capacity_factor / E))
        weight, plan = ref.expert_choice(logits, cap, group_size=r.group_size)
        expert = torch.where(plan.kept, torch.arange(E, device=x.device), -1)
        return ref.routed_moe(x, expert, weight, plan.kept, w_in, w_out, activation=act)
    return None


def parity_check(stack: Stack, x: Tensor, context: RoutingContext) -> float | None:
    """Max |smoe - reference| over the layers of a float64 eval copy of ``stack`` on ``x``
    (each layer on its input from the smoe path); None if the reference does not cover it.

    Raises:
        AssertionError: a layer differs from the reference beyond float64 tolerance.
    """
    twin = copy.deepcopy(stack).double().eval()
    if context.attention is not None:
        context = context._replace(attention=context.attention.double())
    h, worst = x.double(), 0.0
    with torch.no_grad():
        for norm, layer in zip(twin.norms, twin.layers):
            inp = norm(h)
            y, _ = layer(inp, context)
            want = _reference_layer(layer, inp.reshape(-1, inp.shape[-1]))
            if want is None:
                return None
            torch.testing.assert_close(y.reshape(want.shape), want)
            if want.numel():
                worst = max(worst, (y.reshape(want.shape) - want).abs().max().item())
            h = h + y
    return worst
