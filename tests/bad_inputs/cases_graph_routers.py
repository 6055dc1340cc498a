"""Bad inputs of the graph-of-tokens routers (specs/graph_routing.md): ``similarity_aware`` and
``attention_aware``.

``ROUTER_ROWS``: each router's misconfigurations (label, options, the argument the ValueError
names), which :func:`cases_modules.router_cases` turns into the shared router and MoELayer rows
as for every router (the attention router's MoELayer rows get causal uniform attention). Then the
forward errors: the attention router's ``context.attention`` (missing, of the wrong shape, not
floating, on the other device, too few heads for ``heads``, not matching
``context.batch_shape``), NaN attention (an error naming the logits it makes NaN, as NaN tokens),
and the similarity router's ``context.batch_shape`` that does not hold the tokens.
"""

from __future__ import annotations

from typing import Any

import torch

import smoe
from tests.bad_inputs.cases import ASYNC_ASSERT, Case, Expect, arg, error
from tests.bad_inputs.cases_modules import D_MODEL, NUM_E, TOKENS, router_cases

_SHARED = [  # the options both routers check alike
    ("k > E", {"k": NUM_E + 1}, "k"),
    ("lam = -0.1", {"lam": -0.1}, "lam"),
    ("lam NaN", {"lam": float("nan")}, "lam"),
    ("mix unknown", {"mix": "sum"}, "mix"),
    ("top1_weight unknown", {"top1_weight": "raw"}, "top1_weight"),
    ("causal 'yes'", {"causal": "yes"}, "causal"),
    ("init_scale = 0", {"init_scale": 0.0}, "init_scale"),
]

ROUTER_ROWS: dict[str, list[tuple[str, dict[str, Any], str]]] = {
    "similarity_aware": [
        *_SHARED,
        ("mix logits, lam = 1.5", {"mix": "logits", "lam": 1.5}, "lam"),
        ("tau = 0", {"tau": 0.0}, "tau"),
        ("tau = -1", {"tau": -1.0}, "tau"),
        ("tau inf", {"tau": float("inf")}, "tau"),
        ("sim unknown", {"sim": "euclid"}, "sim"),
        ("window = 0", {"window": 0}, "window"),
        ("topm = 0", {"topm": 0}, "topm"),
    ],
    "attention_aware": [
        *_SHARED,
        ("mix probs, lam = 1.5", {"mix": "probs", "lam": 1.5}, "lam"),
        ("heads 'min'", {"heads": "min"}, "heads"),
        ("heads = -1", {"heads": -1}, "heads"),
        ("memory unknown", {"memory": "keep"}, "memory"),
    ],
}

B, S, H = 2, 3, 2  # the sequences of the TOKENS = B * S tokens of the forward rows


def _attention(d, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    a = torch.ones(*shape, device=d.device).tril()
    return (a / a.sum(-1, keepdim=True).clamp_min(1)).to(dtype)


def _router_forward(name: str, make_context, **options: Any):
    """Router ``name`` (built with ``options``) on ``x [TOKENS, d]`` with ``make_context(d)``."""

    def fn(d):
        router = smoe.build_router(name, D_MODEL, NUM_E, 2, **options).to(d.device)
        return router(d.f(TOKENS, D_MODEL), make_context(d))

    return fn


def _ctx(make_attention=None, **fields: Any):
    def make(d):
        attention = None if make_attention is None else make_attention(d)
        made = {k: v(d) if callable(v) else v for k, v in fields.items()}
        return smoe.RoutingContext(attention=attention, **made)

    return make


_ATT, _SIM = "router:attention_aware", "router:similarity_aware"
_SHAPE = r"context\.attention must be \[B, H, S, S\]"


def _att(label: str, kind: str, make_context, expect: Expect, heads: Any = "mean", **kw) -> Case:
    fn = _router_forward("attention_aware", make_context, heads=heads)
    return Case(f"{_ATT}/{label}", _ATT, kind, fn, expect, **kw)


_forward_cases = [
    _att("context None", "config", lambda d: None, error(arg("attention"), ValueError)),
    _att("context.attention missing", "config", _ctx(), error(arg("attention"), ValueError)),
    _att(
        "attention 2-D [T, T]",
        "rank",
        _ctx(lambda d: _attention(d, TOKENS, TOKENS)),
        error(_SHAPE, ValueError),
    ),
    _att(
        "attention 5-D",
        "rank",
        _ctx(lambda d: _attention(d, B, H, 1, S, S)),
        error(_SHAPE, ValueError),
    ),
    _att(  # [B, H, S, C + S] is Transformer-XL attention with C memory columns; fewer is wrong
        "attention with fewer columns than rows",
        "size",
        _ctx(lambda d: _attention(d, B, H, S, S - 1)),
        error(_SHAPE, ValueError),
    ),
    _att(
        "attention B*S != tokens",
        "size",
        _ctx(lambda d: _attention(d, B, H, S + 1, S + 1)),
        error(_SHAPE, ValueError),
    ),
    _att(
        "attention with no heads",
        "size",
        _ctx(lambda d: _attention(d, B, 0, S, S)),
        error(arg("attention"), ValueError),
    ),
    _att(
        "attention int64",
        "dtype",
        _ctx(lambda d: _attention(d, B, H, S, S, dtype=torch.int64)),
        error(r"context\.attention must be a floating tensor", ValueError),
    ),
    _att(
        "attention bool",
        "dtype",
        _ctx(lambda d: _attention(d, B, H, S, S, dtype=torch.bool)),
        error(r"context\.attention must be a floating tensor", ValueError),
    ),
    _att(
        "attention on the other device",
        "device",
        _ctx(lambda d: _attention(d, B, H, S, S).to(d.other)),
        error(arg("attention"), ValueError),
    ),
    _att(
        "heads = 3 with H = 2",
        "size",
        _ctx(lambda d: _attention(d, B, H, S, S)),
        error(arg("heads"), ValueError),
        heads=3,
    ),
    _att(
        "attention [2, H, 3, 3] with batch_shape (3, 2)",
        "size",
        _ctx(lambda d: _attention(d, B, H, S, S), batch_shape=(S, B)),
        error(arg("batch_shape"), ValueError),
    ),
    _att(
        "attention NaN",
        "nan",
        _ctx(lambda d: _attention(d, B, H, S, S).index_fill(-1, torch.tensor([0]), float("nan"))),
        error(r"\blogits\b.*finite", RuntimeError),
        cuda_expect=ASYNC_ASSERT,
    ),
    *(
        Case(
            f"{target}/padding_mask {label}",
            target,
            kind,
            _router_forward(
                target.removeprefix("router:"),
                _ctx(att, batch_shape=(B, S), padding_mask=mask),
            ),
            error(r"context\.padding_mask", ValueError),
        )
        for target, att in [(_SIM, None), (_ATT, lambda d: _attention(d, B, H, S, S))]
        for label, kind, mask in [
            ("float", "dtype", lambda d: torch.ones(B, S, device=d.device)),
            ("of another size", "size", lambda d: torch.ones(B, S + 1, dtype=torch.bool)),
            (
                "on the other device",
                "device",
                lambda d: torch.ones(B, S, dtype=torch.bool).to(d.other),
            ),
        ]
    ),
    Case(
        f"{_SIM}/batch_shape does not hold the tokens",
        _SIM,
        "size",
        _router_forward("similarity_aware", _ctx(batch_shape=(S + 1, B))),
        error(arg("batch_shape"), ValueError),
    ),
    Case(
        "MoELayer[attention_aware]/context without attention",
        "MoELayer[attention_aware]",
        "config",
        lambda d: smoe.MoELayer(D_MODEL, 16, NUM_E, 2, router="attention_aware").to(d.device)(
            d.f(B, S, D_MODEL)
        ),
        error(arg("attention"), ValueError),
    ),
]


CASES: list[Case] = [
    *(c for name, own in ROUTER_ROWS.items() for c in router_cases(name, own)),
    *_forward_cases,
]
