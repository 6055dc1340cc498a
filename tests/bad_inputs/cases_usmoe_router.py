"""Bad inputs of USMoE's router (``router:usmoe``, specs/usmoe.md; the op ``unified_topk``'s rows
are in cases_usmoe.py).

``ROUTER_ROWS``: its misconfigurations (label, options, the argument the ValueError names): α
outside [0, 1], a budget outside (0, E], unknown ``expert_score`` / ``selection`` / ``group``
strings, a group size that is not an int >= 1. :func:`cases_modules.router_cases` turns them into
the shared router and MoELayer rows, except its NaN row: flat tokens have no (B, S) sequences for
the default ``group="sequence"``, so the NaN tokens here come as ``[B, S, d]``. Then the forward
errors: ``group="sequence"`` without a ``(B, S)`` ``context.batch_shape`` (none, 1-D, or one that
does not hold the tokens) and a bad ``context.padding_mask``; and the same ``batch_shape`` rows
for grouping by position, USMoE's ``group="position"`` and expert choice's
``group_size="position"`` (smoe.routing.pairs).
"""

from __future__ import annotations

from typing import Any

import torch

import smoe
from tests.bad_inputs.cases import ASYNC_ASSERT, Case, arg, error
from tests.bad_inputs.cases_modules import D_MODEL, NUM_E, TOKENS, router_cases

NAN = float("nan")

ROUTER_ROWS: dict[str, list[tuple[str, dict[str, Any], str]]] = {
    "usmoe": [
        ("k > E", {"k": NUM_E + 1}, "k"),
        ("k = 0", {"k": 0}, "k"),
        ("alpha = 1.5", {"alpha": 1.5}, "alpha"),
        ("alpha = -0.1", {"alpha": -0.1}, "alpha"),
        ("alpha NaN", {"alpha": NAN}, "alpha"),
        ("budget = 0", {"budget": 0.0}, "budget"),
        ("budget = -1", {"budget": -1.0}, "budget"),
        ("budget > E", {"budget": NUM_E + 0.5}, "budget"),
        ("budget NaN", {"budget": NAN}, "budget"),
        ("expert_score unknown", {"expert_score": "cosine"}, "expert_score"),
        ("selection unknown", {"selection": "rows"}, "selection"),
        ("group unknown", {"group": "tokens"}, "group"),
        ("group = 0", {"group": 0}, "group"),
        ("group = -2", {"group": -2}, "group"),
        ("group float 2.0", {"group": 2.0}, "group"),
        ("group True", {"group": True}, "group"),
        ("init_scale = 0", {"init_scale": 0.0}, "init_scale"),
    ],
}

B, S = 2, 3  # the sequences of the TOKENS = B * S tokens of the forward rows
_R, _L = "router:usmoe", "MoELayer[usmoe]"


def _router_forward(make_context, name: str = "usmoe", **options: Any):
    """The router ``name`` (built with ``options``) on ``x [TOKENS, d]`` with
    ``make_context(d)``."""

    def fn(d):
        router = smoe.build_router(name, D_MODEL, NUM_E, 2, **options).to(d.device)
        return router(d.f(TOKENS, D_MODEL), make_context(d))

    return fn


def _ctx(**fields: Any):
    return lambda d: smoe.RoutingContext(
        **{k: v(d) if callable(v) else v for k, v in fields.items()}
    )


def _layer_forward(make_x):
    def fn(d):
        layer = smoe.MoELayer(D_MODEL, 16, NUM_E, 2, router="usmoe").to(d.device)
        return layer(make_x(d))

    return fn


def _nan_sequences(d):
    x = d.f(B, S, D_MODEL)
    x[1, 0, 3] = NAN
    return x


_SEQ = r"group='sequence' needs context\.batch_shape"

_forward_cases = [
    Case(
        f"{_R}/group 'sequence' without context",
        _R,
        "config",
        _router_forward(lambda d: None),
        error(_SEQ, ValueError),
    ),
    Case(
        f"{_R}/group 'sequence' with a 1-D batch_shape",
        _R,
        "rank",
        _router_forward(_ctx(batch_shape=(TOKENS,))),
        error(_SEQ, ValueError),
    ),
    Case(
        f"{_R}/group 'sequence' with a 3-D batch_shape",
        _R,
        "rank",
        _router_forward(_ctx(batch_shape=(1, B, S))),
        error(_SEQ, ValueError),
    ),
    Case(
        f"{_R}/batch_shape does not hold the tokens",
        _R,
        "size",
        _router_forward(_ctx(batch_shape=(S, S))),
        error(arg("batch_shape"), ValueError),
    ),
    Case(
        f"{_R}/batch_shape holds fewer tokens",
        _R,
        "size",
        _router_forward(_ctx(batch_shape=(B, B))),
        error(arg("batch_shape"), ValueError),
    ),
    *(
        Case(
            f"{_R}/padding_mask {label}",
            _R,
            kind,
            _router_forward(_ctx(batch_shape=(B, S), padding_mask=mask), group=group),
            error(r"context\.padding_mask", ValueError),
        )
        for group in ("sequence", "batch")
        for label, kind, mask in [
            (f"float ({group})", "dtype", lambda d: torch.ones(B, S, device=d.device)),
            (
                f"of another size ({group})",
                "size",
                lambda d: torch.ones(B, S + 1, dtype=torch.bool, device=d.device),
            ),
            (
                f"on the other device ({group})",
                "device",
                lambda d: torch.ones(B, S, dtype=torch.bool, device=d.other),
            ),
        ]
    ),
    Case(
        f"{_L}/flat x with group 'sequence'",
        _L,
        "rank",
        _layer_forward(lambda d: d.f(TOKENS, D_MODEL)),
        error(_SEQ, ValueError),
    ),
    # A NaN token makes its unified scores NaN: unified_topk refuses them, naming its group.
    Case(
        f"{_L}/x NaN",
        _L,
        "nan",
        _layer_forward(_nan_sequences),
        error(r"\bscores\b.*NaN.*\bgroup 1\b", RuntimeError),
        cuda_expect=ASYNC_ASSERT,
    ),
]

_POS = r"grouping by 'position' needs context\.batch_shape"
_position_cases = [
    Case(
        f"router:{name}/{option} 'position' {label}",
        f"router:{name}",
        kind,
        _router_forward(make_context, name, **{option: "position"}),
        error(expect, ValueError),
    )
    for name, option in (("usmoe", "group"), ("expert_choice", "group_size"))
    for label, kind, make_context, expect in [
        ("without context", "config", lambda d: None, _POS),
        ("with a 1-D batch_shape", "rank", _ctx(batch_shape=(TOKENS,)), _POS),
        (
            "with a batch_shape not holding the tokens",
            "size",
            _ctx(batch_shape=(S, S)),
            arg("batch_shape"),
        ),
    ]
]

CASES: list[Case] = [
    *(
        c
        for name, own in ROUTER_ROWS.items()
        for c in router_cases(name, own)
        if c.name != f"MoELayer[{name}]/x NaN"  # flat NaN tokens: replaced by the row above
    ),
    *_forward_cases,
    *_position_cases,
]
