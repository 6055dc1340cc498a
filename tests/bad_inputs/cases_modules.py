"""Bad inputs of MoELayer (with each registered router) and of the routers' constructors and
factories.

``ROUTER_ROWS`` lists every registered router by name, each with its own misconfigurations; every
listed router also gets the shared rows (an unknown option, ``d_model = 0``, ``num_experts = 0``)
and MoELayer rows (NaN tokens, a wrong token width, integer tokens, tokens on the other device),
with attention for a router that needs it. The graph-of-tokens routers' rows are in
cases_graph_routers.py. A router registered without rows fails ``test_matrix.py``'s gate.

NaN tokens: an error naming the router's ``logits`` (a NaN token makes a NaN logit row; the
routing ops refuse it, CPU: RuntimeError, CUDA: the documented asynchronous device assert).
"""

from __future__ import annotations

from typing import Any

import torch

import smoe
from tests.bad_inputs.cases import ASYNC_ASSERT, Case, Expect, arg, context_for, defined, error

D_MODEL, D_FF, NUM_E, TOKENS = 8, 16, 4, 6


def _case(target: str, label: str, kind: str, fn, expect: Expect, **kw: Any) -> Case:
    return Case(f"{target}/{label}", target, kind, fn, expect, **kw)


def _build(name: str, *args: Any, **options: Any):
    return lambda d: smoe.build_router(name, *args, **options)


def _layer(d, **kw: Any) -> smoe.MoELayer:
    return smoe.MoELayer(D_MODEL, D_FF, NUM_E, 2, **kw).to(d.device)


def _forward(router: str, make_x, **kw: Any):
    def fn(d):
        layer = _layer(d, router=router, **kw)
        x = make_x(d)
        return layer(x, context_for(d, router, x))

    return fn


def _nan_tokens(d):
    x = d.f(TOKENS, D_MODEL)
    x[2, 3] = float("nan")
    return x


# ---- routers: the registry's names, each with its own misconfigurations --------------------------
_TOPK_OWN = [
    ("jitter = 1.5", {"jitter": 1.5}, "jitter"),
    ("init_scale = 0", {"init_scale": 0.0}, "init_scale"),
    ("init_scale = -1", {"init_scale": -1.0}, "init_scale"),
    ("noise_epsilon = -1", {"noise_epsilon": -1.0}, "noise_epsilon"),
    ("gate unknown", {"gate": "relu"}, "gate"),
]

_XMOE_OWN = [
    ("k > E", {"k": NUM_E + 1}, "k"),
    ("k = 0", {"k": 0}, "k"),
    ("mix unknown", {"mix": "sum"}, "mix"),
    ("expert_norm = 0", {"expert_norm": 0.0}, "expert_norm"),
    ("expert_norm = -1", {"expert_norm": -1.0}, "expert_norm"),
    ("expert_norm inf", {"expert_norm": float("inf")}, "expert_norm"),
    ("routing_dim = 0", {"routing_dim": 0}, "routing_dim"),
]

ROUTER_ROWS: dict[str, list[tuple[str, dict[str, Any], str]]] = {
    "topk": [*_TOPK_OWN, ("k > E", {"k": NUM_E + 1}, "k"), ("k = 0", {"k": 0}, "k")],
    "switch": [*_TOPK_OWN, ("k > E", {"k": NUM_E + 1}, "k")],
    "noisy_topk": [*_TOPK_OWN, ("k = 0", {"k": 0}, "k")],
    "vmoe": [
        ("k > E", {"k": NUM_E + 1}, "k"),
        ("capacity_factor = 0", {"capacity_factor": 0.0}, "capacity_factor"),
        ("capacity_factor NaN", {"capacity_factor": float("nan")}, "capacity_factor"),
        ("eval_capacity_factor = -1", {"eval_capacity_factor": -1.0}, "eval_capacity_factor"),
        ("noise_std = -1", {"noise_std": -1.0}, "noise_std"),
        ("group_size = 0", {"group_size": 0}, "group_size"),
        ("priority unknown", {"priority": "median"}, "priority"),
        ("rounding unknown", {"rounding": "floor"}, "rounding"),
        ("multiple_of = 0", {"multiple_of": 0}, "multiple_of"),
    ],
    "xmoe": [
        *_XMOE_OWN,
        ("gate unknown", {"gate": "relu"}, "gate"),
        ("variant unknown", {"variant": "median"}, "variant"),
        ("temperature_init = 0", {"temperature_init": 0.0}, "temperature_init"),
        ("temperature_init = -1", {"temperature_init": -1.0}, "temperature_init"),
        ("temperature_init inf", {"temperature_init": float("inf")}, "temperature_init"),
        ("temperature_init NaN", {"temperature_init": float("nan")}, "temperature_init"),
    ],
    "xmoe_community": [
        *_XMOE_OWN,
        ("gate sigmoid", {"gate": "sigmoid"}, "gate"),
        ("temperature_init given", {"temperature_init": 0.3}, "temperature_init"),
    ],
    "stablemoe_community": [("k > E", {"k": NUM_E + 1}, "k"), ("k = 0", {"k": 0}, "k")],
    "ssr": [
        ("k > E", {"k": NUM_E + 1}, "k"),
        ("k = 0", {"k": 0}, "k"),
        ("p = -0.1", {"p": -0.1}, "p"),
        ("p = 1.5", {"p": 1.5}, "p"),
        ("p NaN", {"p": float("nan")}, "p"),
        ("xi = 0", {"xi": 0.0}, "xi"),
        ("xi = -1", {"xi": -1.0}, "xi"),
        ("max_iter = 0", {"max_iter": 0}, "max_iter"),
        ("tol = -1", {"tol": -1.0}, "tol"),
        ("draw unknown", {"draw": "per_token"}, "draw"),
        ("grad_mode unknown", {"grad_mode": "implicit"}, "grad_mode"),
        ("cost unknown", {"cost": "cosine"}, "cost"),
        ("weights_from unknown", {"weights_from": "router"}, "weights_from"),
        ("scope unknown", {"scope": "node"}, "scope"),
        ("noise_std = -1", {"noise_std": -1.0}, "noise_std"),
        ("logit_noise_std = -1", {"logit_noise_std": -1.0}, "logit_noise_std"),
        ("route_scale = 0", {"route_scale": 0.0}, "route_scale"),
    ],
    "sinkhorn": [
        ("k > E", {"k": NUM_E + 1}, "k"),
        ("max_iter = 0", {"max_iter": 0}, "max_iter"),
        ("tol = -1", {"tol": -1.0}, "tol"),
        ("balance_weight = 0.01", {"balance_weight": 0.01}, "balance_weight"),
        ("scope unknown", {"scope": "node"}, "scope"),
    ],
    # S2MoE's gate (a layer-level method: its router is the plain TopKRouter)
    "s2moe": [*_TOPK_OWN, ("k > E", {"k": NUM_E + 1}, "k"), ("k = 0", {"k": 0}, "k")],
    # the stack-level momentum methods' gate (TopKRouter with a bias, no aux loss)
    **{name: [*_TOPK_OWN, ("k > E", {"k": NUM_E + 1}, "k")] for name in smoe.MOMENTUM_ROUTERS},
    "expert_choice": [
        ("k = 0 (capacity factor 0)", {"k": 0}, "capacity_factor"),
        ("capacity_factor = -1", {"capacity_factor": -1.0}, "capacity_factor"),
        ("capacity_factor NaN", {"capacity_factor": float("nan")}, "capacity_factor"),
        ("group_size = 0", {"group_size": 0}, "group_size"),
        ("group_size unknown string", {"group_size": "sequence"}, "group_size"),
        ("group_size True", {"group_size": True}, "group_size"),
        ("init_scale = 0", {"init_scale": 0.0}, "init_scale"),
    ],
}


# Routers whose scores stay finite for a NaN token (cosine_scores, and the StableMoE gate likewise,
# replace a non-finite score by the smallest finite one of its row, 0 when none): the NaN token's
# logits are 0, the others' are those of the same tokens without it. A defined row, not an error.
NAN_TOKENS_ROUTE = {"xmoe", "xmoe_community", "stablemoe_community"}


def _nan_token_logits_zero(name: str):
    def fn(d) -> bool:
        layer = _layer(d, router=name).eval()  # eval: E is not re-projected between calls
        x = _nan_tokens(d)
        logits = layer.router(x).logits
        rest = [t for t in range(TOKENS) if t != 2]
        clean = layer.router(x[rest]).logits
        return bool((logits[2] == 0).all() and torch.equal(logits[rest], clean))

    return fn


def _nan_case(layer: str, name: str) -> Case:
    if name in NAN_TOKENS_ROUTE:
        return _case(
            layer,
            "x NaN (defined)",
            "nan",
            _nan_token_logits_zero(name),
            defined("a NaN token's logits are 0; the other tokens' are unchanged"),
        )
    return _case(
        layer,
        "x NaN",
        "nan",
        _forward(name, _nan_tokens),
        error(r"\blogits\b.*finite", RuntimeError),
        cuda_expect=ASYNC_ASSERT,
    )


def router_cases(name: str, own: list[tuple[str, dict[str, Any], str]]) -> list[Case]:
    """The rows of router ``name``: the shared ones, then its ``own`` misconfigurations (label,
    options, the argument the error names), then the shared MoELayer rows."""
    target = f"router:{name}"
    cases = [
        _case(
            target,
            "unknown option",
            "config",
            _build(name, D_MODEL, NUM_E, 2, bogus_option=1),
            error("bogus_option", ValueError),
        ),
        _case(
            target,
            "d_model = 0",
            "config",
            _build(name, 0, NUM_E, 2),
            error(arg("d_model"), ValueError),
        ),
        _case(
            target,
            "num_experts = 0",
            "config",
            _build(name, D_MODEL, 0, 1),
            error(arg("num_experts"), ValueError),
        ),
    ]
    for label, options, pattern in own:
        opts = dict(options)
        k = opts.pop("k", 2)
        fn = _build(name, D_MODEL, NUM_E, k, **opts)
        cases.append(_case(target, label, "config", fn, error(arg(pattern), ValueError)))
    layer = f"MoELayer[{name}]"
    cases += [
        _case(
            layer,
            "router_options unknown",
            "config",
            lambda d, n=name: _layer(d, router=n, router_options={"bogus_option": 1}),
            error("bogus_option", ValueError),
        ),
        _nan_case(layer, name),
        _case(
            layer,
            "x width != d_model",
            "size",
            _forward(name, lambda d: d.f(TOKENS, D_MODEL + 1)),
            error(arg("x"), ValueError),
        ),
        _case(
            layer,
            "x int64",
            "dtype",
            _forward(
                name, lambda d: torch.ones(TOKENS, D_MODEL, dtype=torch.int64, device=d.device)
            ),
            error(arg("x"), TypeError),
        ),
        _case(
            layer,
            "x on the other device",
            "device",
            _forward(name, lambda d: d.f(TOKENS, D_MODEL).to(d.other)),
            error(arg("x"), ValueError),
        ),
        _case(
            layer,
            "x 0-D",
            "rank",
            _forward(name, lambda d: torch.tensor(1.0, device=d.device)),
            error(arg("x"), ValueError),
        ),
    ]
    return cases


CASES: list[Case] = [c for name, own in ROUTER_ROWS.items() for c in router_cases(name, own)]
