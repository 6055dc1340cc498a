"""The float64 reference of the layer-level fuzz (test_fuzz_layer.py): for each kind of
strategies.LAYER_ROUTERS, the routing of smoe.reference on the layer's own parameters, then
reference.routed_moe (or reference.moe_layer for plain top-k)."""

from __future__ import annotations

import torch

from smoe import reference as ref
from smoe.routing import AttentionAwareRouter
from tests.fuzz.layer_reference_usmoe import usmoe_routing


def xmoe_routing(router, flat):
    """(expert, weight) of X-MoE in float64: reference.cosine_scores on the router's parameters,
    then reference.xmoe_gate (paper) or the softmax over the k raw selected scores (community,
    specs/xmoe.md §11). The top-k must be the router's up to float64 rounding of near-ties."""
    with torch.no_grad():  # first: in training it re-projects E in place, as the layer did
        mine = router(flat).expert
    cos, _ = ref.cosine_scores(
        flat,
        router.proj,
        router.expert_emb,
        router.temperature,
        normalize_tokens=not router.community,
    )
    tau = router.temperature.double().clamp_min(1e-4)
    if router.community:
        expert = torch.sort(-cos.detach(), dim=-1, stable=True).indices[:, : router.k]
        expert = expert.to(torch.int32)
    else:
        expert, _ = ref.xmoe_gate(cos.detach(), tau.item(), router.k, gate=router.gate)
    # the selection as the router made it, if it differs only where scores tie up to rounding
    if not torch.equal(mine, expert):
        picked, best = cos.gather(1, mine.long()), cos.gather(1, expert.long())
        assert torch.allclose(picked, best, rtol=1e-12, atol=1e-12), "X-MoE chose others"
        expert = mine
    s = torch.gather(cos / tau, 1, expert.long())
    if router.gate == "sigmoid":
        weight = torch.sigmoid(s)
    elif router.k == 1 and not router.community:
        weight = torch.gather(torch.softmax(cos / tau, dim=-1), 1, expert.long())
    else:
        weight = torch.softmax(s, dim=-1)
    return expert, weight


def stablemoe_routing(router, flat):
    """(expert, weight) of fastmoe's StableMoE gate in float64 (specs/s2moe.md §8):
    reference.cosine_scores with W = I, τ = 1 and the token not normalised, the top-k (the
    router's where only float64 rounding of near-ties differs), the softmax over the k raw
    selected scores."""
    with torch.no_grad():
        mine = router(flat).expert
    eye = torch.eye(flat.shape[-1], dtype=torch.float64)
    s, _ = ref.cosine_scores(
        flat, eye, router.expert_emb, torch.ones((), dtype=torch.float64), normalize_tokens=False
    )
    expert = torch.sort(-s.detach(), dim=-1, stable=True).indices[:, : router.k].to(torch.int32)
    if not torch.equal(mine, expert):
        picked, best = s.gather(1, mine.long()), s.gather(1, expert.long())
        assert torch.allclose(picked, best, rtol=1e-12, atol=1e-12), "StableMoE chose others"
        expert = mine
    return expert, torch.softmax(torch.gather(s, 1, expert.long()), dim=-1)


def graph_routing(router, flat, context):
    """(expert, weight) of a Similarity-/Attention-Aware router in float64:
    reference.similarity_aware_routing / attention_aware_routing on the router's parameters (z,
    the graph, the mix, top-k after it, the weights). The top-k must be the router's up to
    float64 rounding of near-tied p̃; where only such ties differ, the router's selection is
    weighed."""
    with torch.no_grad():
        mine = router(flat, context=context).expert
    causal = router.causal if router.causal is not None else bool(context.causal)
    common = dict(
        mix=router.mix,
        lam=router.lam,
        causal=causal,
        detach_graph=router.detach_graph,
        top1_weight=router.top1_weight,
    )

    def route(expert=None):
        if isinstance(router, AttentionAwareRouter):
            return ref.attention_aware_routing(
                flat,
                router.weight,
                router.bias,
                context.attention,
                router.k,
                heads=router.heads,
                expert=expert,
                **common,
            )
        return ref.similarity_aware_routing(
            flat,
            router.weight,
            router.bias,
            router.k,
            batch_shape=context.batch_shape,
            sim=router.sim,
            tau=router.tau,
            window=router.window,
            topm=router.topm,
            expert=expert,
            **common,
        )

    routing = route()
    if torch.equal(mine, routing.expert):
        return routing.expert, routing.weight
    p = routing.probs.detach()
    picked, best = p.gather(1, mine.long()), p.gather(1, routing.expert.long())
    assert torch.allclose(picked, best, rtol=1e-12, atol=1e-12), "the graph router chose others"
    return mine, route(mine).weight


def kept_and_weights(kind: str, layer, flat, context, seed, capacity):
    """(expert, weight, kept) [T, *] of the reference routing of ``kind`` in float64."""
    router, E, T = layer.router, layer.num_experts, flat.shape[0]
    if kind == "usmoe":  # layer_reference_usmoe.py (its own plan: no layer capacity)
        return usmoe_routing(router, flat, context)
    if kind in ("xmoe", "stablemoe", "graph"):
        if kind == "xmoe":
            expert, weight = xmoe_routing(router, flat)
        elif kind == "stablemoe":
            expert, weight = stablemoe_routing(router, flat)
        else:
            expert, weight = graph_routing(router, flat, context)
        return expert, weight, ref.make_plan(expert, E, capacity=capacity).kept
    logits = flat @ router.weight.T
    if getattr(router, "bias", None) is not None:  # TopKRouter(bias=True): the momentum gate
        logits = logits + router.bias
    if kind == "topk":
        weight, expert = ref.topk_softmax(logits, router.k, renormalize=router.renormalize)
        return expert, weight, ref.make_plan(expert, E, capacity=capacity).kept
    if kind == "vmoe":
        weight, expert = ref.topk_softmax(logits, router.k, renormalize=False)
        prio = None
        if router.batch_priority:
            prio = weight[:, 0] if router.priority == "max" else weight.sum(1)
        plan = ref.make_plan(
            expert, E, capacity=router.capacity(T), priority=prio, group_size=router.group_size
        )
        if prio is not None:
            # Priorities equal up to rounding (e.g. "sum_topk" at k = E sums to 1 +- ulp for
            # every token) order tokens by summation-order noise: there, accept the router's own
            # kept set if the tokens it keeps differently tie with each other within rounding.
            torch.manual_seed(seed)
            own = router(flat, context=context).plan.kept
            differ = (own != plan.kept).any(dim=1)
            if differ.any():
                spread = prio[differ].max() - prio[differ].min()
                if spread <= 64 * torch.finfo(prio.dtype).eps * prio.abs().max():
                    return expert, weight, own
        return expert, weight, plan.kept
    if kind == "expert_choice":
        if router.group_size == "position":  # groups of the B tokens at each position
            B, S = context.batch_shape
            order = torch.arange(T).view(B, S).T.reshape(-1)
            weight, plan = ref.expert_choice(logits[order], router.capacity(B), group_size=B)
            back = torch.argsort(order)
            weight, kept = weight[back], plan.kept[back]
        else:
            weight, plan = ref.expert_choice(
                logits, router.capacity(T), group_size=router.group_size
            )
            kept = plan.kept
        expert = torch.where(kept, torch.arange(E, dtype=torch.int32), -1)
        return expert, weight, kept
    # "dispatch": the router's own decisions (its noise redrawn from the same seed)
    torch.manual_seed(seed)
    routing = router(flat, context=context)
    kept = routing.plan.kept if routing.plan is not None else None
    if kept is None:
        kept = ref.make_plan(routing.expert, E, capacity=capacity).kept
    return routing.expert, routing.weight, kept


def reference_output(kind: str, layer, x, context, seed):
    """The float64 reference of the layer's output for routers of ``kind``."""
    flat = x.reshape(-1, x.shape[-1])
    capacity = None
    if layer.capacity_factor is not None:
        k, T = layer.router.k, flat.shape[0]
        capacity = ref.capacity_for(T, k, layer.num_experts, layer.capacity_factor)
    ex = layer.experts
    # ref.moe_layer has no router bias (TopKRouter(bias=True), the momentum gate; found by the
    # fuzz: its gradient was missing from this reference)
    router_bias = getattr(layer.router, "bias", None)
    if kind == "topk" and ex.b_in is None and router_bias is None and not noisy(layer):
        return ref.moe_layer(
            x,
            layer.router.weight,
            ex.w_in,
            ex.w_out,
            layer.router.k,
            activation=ex.activation,
            renormalize=layer.router.renormalize,
            capacity=capacity,
        )
    if noisy(layer):
        kind = "dispatch"
    context = context._replace(batch_shape=tuple(x.shape[:-1]))  # as the layer fills it in
    expert, weight, kept = kept_and_weights(kind, layer, flat, context, seed, capacity)
    out = ref.routed_moe(
        flat,
        expert,
        weight,
        kept,
        ex.w_in,
        ex.w_out,
        activation=ex.activation,
        b_in=ex.b_in,
        b_out=ex.b_out,
    )
    if getattr(layer.router, "mix", "gate") == "interpolate":  # X-MoE: + (1 - Σ kept g) x
        out = out + (1 - (weight.double() * kept).sum(-1, keepdim=True)) * flat.double()
    return out.reshape(x.shape)


def noisy(layer) -> bool:
    """Whether the router draws noise now (then only its dispatch is compared)."""
    r = layer.router
    return layer.training and (getattr(r, "noisy", False) or getattr(r, "noise_std", 0) > 0)
