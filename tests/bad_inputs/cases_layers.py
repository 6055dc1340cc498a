"""Bad inputs of the layers' own options: MoELayer's (shared experts, capacity, bias, the router
argument, its forward's tokens and context) and S2MoELayer's (specs/s2moe.md), at construction or
at a forward. The rows of each registered router inside a MoELayer are cases_modules.py's."""

from __future__ import annotations

from typing import Any

import torch

import smoe
from tests.bad_inputs.cases import Case, arg, error
from tests.bad_inputs.cases_modules import D_FF, D_MODEL, NUM_E, TOKENS, _case, _forward, _layer


# ---- MoELayer's own options ------------------------------------------------------------------
def _moe(**kw: Any):
    return lambda d: _layer(d, **kw)


def _moe_args(*args: Any, **kw: Any):
    return lambda d: smoe.MoELayer(*args, **kw)


_MOE = "MoELayer"
_moe_cases = [
    *(  # shared experts (DeepSeek, Qwen2-MoE)
        _case(_MOE, label, "config", _moe(**kw), error(arg(name), ValueError))
        for label, kw, name in [
            ("shared_experts = -1", {"shared_experts": -1}, "shared_experts"),
            ("shared_d_ff = 0", {"shared_experts": 1, "shared_d_ff": 0}, "shared_d_ff"),
            ("shared_gate unknown", {"shared_experts": 1, "shared_gate": "tanh"}, "shared_gate"),
            ("shared_gate without shared experts", {"shared_gate": "sigmoid"}, "shared_experts"),
        ]
    ),
    _case(_MOE, "router unknown name", "config", _moe(router="bogus"), error("bogus", ValueError)),
    _case(_MOE, "router an int", "config", _moe(router=3), error(arg("router"), TypeError)),
    _case(
        _MOE,
        "router_options with a module",
        "config",
        lambda d: _layer(d, router=torch.nn.Linear(2, 2), router_options={"k": 1}),
        error(arg("router_options"), ValueError),
    ),
    _case(
        _MOE,
        "activation unknown",
        "config",
        _moe(activation="bogus"),
        error(arg("activation"), ValueError),
    ),
    _case(
        _MOE,
        "capacity_factor = 0",
        "config",
        _moe(capacity_factor=0.0),
        error(arg("capacity_factor"), ValueError),
    ),
    _case(
        _MOE,
        "capacity_factor = -1",
        "config",
        _moe(capacity_factor=-1.0),
        error(arg("capacity_factor"), ValueError),
    ),
    _case(
        _MOE,
        "capacity_factor NaN",
        "config",
        _moe(capacity_factor=float("nan")),
        error(arg("capacity_factor"), ValueError),
    ),
    _case(
        _MOE,
        "renormalize=False with vmoe",
        "config",
        _moe(router="vmoe", renormalize=False),
        error(arg("renormalize"), ValueError),
    ),
    _case(
        _MOE,
        "num_experts = 0",
        "config",
        _moe_args(D_MODEL, D_FF, 0, 1),
        error(arg("num_experts"), ValueError),
    ),
    _case(
        _MOE, "d_ff = 0", "config", _moe_args(D_MODEL, 0, NUM_E, 2), error(arg("d_ff"), ValueError)
    ),
    _case(
        _MOE,
        "d_model = 0",
        "config",
        _moe_args(0, D_FF, NUM_E, 2),
        error(arg("d_model"), ValueError),
    ),
    _case(_MOE, "k = 0", "config", _moe_args(D_MODEL, D_FF, NUM_E, 0), error(arg("k"), ValueError)),
    _case(
        _MOE,
        "k > num_experts",
        "config",
        _moe_args(D_MODEL, D_FF, NUM_E, NUM_E + 1),
        error(arg("k"), ValueError),
    ),
    _case(
        _MOE,
        "capacity_factor with expert_choice",
        "config",
        _forward("expert_choice", lambda d: d.f(TOKENS, D_MODEL), capacity_factor=1.0),
        error(arg("capacity_factor"), ValueError),
    ),
    _case(
        _MOE,
        "context not a RoutingContext",
        "config",
        lambda d: _layer(d)(d.f(TOKENS, D_MODEL), context={"causal": True}),
        error(arg("context"), TypeError),
    ),
    _case(
        _MOE,
        "causal context with expert_choice",
        "config",
        lambda d: _layer(d, router="expert_choice")(
            d.f(2, 3, D_MODEL), context=smoe.RoutingContext(causal=True)
        ),
        error(arg("causal"), ValueError),
    ),
    _case(
        _MOE,
        "experts unknown",
        "config",
        _moe(experts="moe"),
        error(arg("experts"), ValueError),
    ),
    _case(
        _MOE,
        "depth = 0 (base_stack)",
        "config",
        _moe(experts="base_stack", depth=0),
        error(arg("depth"), ValueError),
    ),
    _case(
        _MOE,
        "xmoe router_options temperature_init = 0",
        "config",
        _moe(router="xmoe", router_options={"temperature_init": 0.0}),
        error(arg("temperature_init"), ValueError),
    ),
    _case(
        _MOE,
        "xmoe router_options routing_dim = 0",
        "config",
        _moe(router="xmoe", router_options={"routing_dim": 0}),
        error(arg("routing_dim"), ValueError),
    ),
    _case(
        _MOE,
        "xmoe_community router_options gate sigmoid",
        "config",
        _moe(router="xmoe_community", router_options={"gate": "sigmoid"}),
        error(arg("gate"), ValueError),
    ),
    _case(
        _MOE,
        "xmoe k > num_experts",
        "config",
        _moe_args(D_MODEL, D_FF, NUM_E, NUM_E + 1, router="xmoe"),
        error(arg("k"), ValueError),
    ),
    _case(
        _MOE,
        "x sparse COO",
        "sparse",
        _forward("topk", lambda d: d.f(TOKENS, D_MODEL).to_sparse()),
        error(arg("x"), TypeError, ValueError),
    ),
]


# ---- S2MoELayer's own options (specs/s2moe.md): at construction, or at a training forward ------
def _s2moe(shape: tuple[int, ...] | None = None, **kw: Any):
    """Builds an S2MoELayer; with ``shape``, runs a training forward on tokens of that shape."""

    def fn(d):
        layer = smoe.S2MoELayer(D_MODEL, D_FF, NUM_E, **kw).to(d.device)
        return layer if shape is None else layer(d.f(*shape))

    return fn


_S2 = "S2MoELayer"
_s2moe_cases = [
    _case(_S2, label, "config", _s2moe(shape, **kw), error(arg(name), ValueError))
    for label, shape, kw, name in [
        *((f"{n} unknown", None, {n: "bogus"}, n) for n in smoe.s2moe._CHOICES),
        ("seq_dim a float", None, {"seq_dim": 1.0}, "seq_dim"),
        ("eps = 0", None, {"eps": 0.0}, "eps"),
        ("eps NaN", None, {"eps": float("nan")}, "eps"),
        ("unc_temperature = 0", None, {"unc_temperature": 0.0}, "unc_temperature"),
        ("unc_temperature = -1", None, {"unc_temperature": -1.0}, "unc_temperature"),
        ("unc_max_tokens = 1", None, {"unc_max_tokens": 1}, "unc_max_tokens"),
        ("router expert_choice", None, {"router": "expert_choice"}, "router"),
        ("router vmoe (its own plan)", (2, 3, D_MODEL), {"router": "vmoe"}, "router"),
        ("x 2-D with sequence statistics", (TOKENS, D_MODEL), {}, "noise_stats"),
        ("x 2-D with instnorm", (TOKENS, D_MODEL), {"noise_form": "instnorm"}, "noise_form"),
        ("seq_dim = 3 for a 3-D x", (2, 3, D_MODEL), {"seq_dim": 3}, "seq_dim"),
        ("seq_dim = -1 (the features)", (2, 3, D_MODEL), {"seq_dim": -1}, "seq_dim"),
        ("x of the wrong width", (2, 3, D_MODEL + 1), {}, "d_model"),
    ]
]


CASES: list[Case] = [*_moe_cases, *_s2moe_cases]
