"""Bad inputs of the X-MoE op: cosine_scores and its backward.

NaN / inf in the inputs are not errors: a non-finite score is replaced by the smallest finite
score of its row (0 if the row has none; smoe.ops.xmoe's docstring). The ``nan`` rows here are
defined rows that check exactly that. No overflow rows: the op indexes with int64 throughout and
counts no T*N in int32 (csrc/checks.h ``check_cosine_scores`` checks none).

``temperature`` is a 0-dim tensor, so its rows are written out (standard_rows' rank-1 change
indexes a dimension it does not have); a temperature of another float dtype than ``h`` is valid.
"""

from __future__ import annotations

import torch

import smoe
from tests.bad_inputs.cases import (
    Case,
    D,
    E,
    T,
    arg,
    defined,
    on_meta,
    op_cases,
    row,
    standard_rows,
)

DE = 2  # d_e of the good call
NAN, INF = float("nan"), float("inf")


def _temperature_rows() -> list:
    return [
        row(
            "dtype",
            "temperature int64",
            arg("temperature"),
            temperature=lambda d, a: torch.tensor(1, device=d.device),
        ),
        row(
            "dtype",
            "temperature bool",
            arg("temperature"),
            temperature=lambda d, a: torch.tensor(True, device=d.device),
        ),
        row(
            "rank",
            "temperature 1-D",
            arg("temperature"),
            temperature=lambda d, a: a["temperature"].reshape(1),
        ),
        row(
            "device",
            "temperature on the other device",
            arg("temperature"),
            temperature=lambda d, a: a["temperature"].to(d.other),
        ),
    ]


def _all_meta(*names: str) -> dict:
    return {n: on_meta(n) for n in names}


# ---- cosine_scores -----------------------------------------------------------------------------
_FWD = ("h", "proj", "expert_emb", "temperature")


def _fwd_good(d):
    return {
        "h": d.f(T, D),
        "proj": d.f(DE, D),
        "expert_emb": d.f(E, DE),
        "temperature": torch.tensor(0.3, device=d.device),
        "eps": 1e-4,
        "normalize_tokens": True,
    }


def _nan_expert_replaced(d) -> bool:
    """A NaN expert embedding: its column of cos is each row's smallest finite score."""
    a = _fwd_good(d)
    a["expert_emb"][1, 0] = NAN
    cos, logits = smoe.cosine_scores(**a)
    others = cos[:, [0, 2]]
    return bool(
        torch.isfinite(cos).all()
        and torch.equal(cos[:, 1], others.min(dim=1).values)
        and torch.isfinite(logits).all()
    )


def _inf_token_zero(d) -> bool:
    """An inf token: no finite score in its row, so the row is 0; other rows unchanged."""
    a = _fwd_good(d)
    good_cos = smoe.cosine_scores(**a).cos
    a["h"][2, 1] = INF
    cos, logits = smoe.cosine_scores(**a)
    rest = [0, 1, 3]
    return bool(
        (cos[2] == 0).all() and (logits[2] == 0).all() and torch.equal(cos[rest], good_cos[rest])
    )


_fwd_rows = [
    *standard_rows(
        {"h": ("int32", "bool"), "proj": ("float64", "float16"), "expert_emb": ("float64",)}
    ),
    *_temperature_rows(),
    row("size", "proj wrong d", arg("proj"), proj=lambda d, a: d.f(DE, D + 1)),
    row("size", "expert_emb wrong d_e", arg("expert_emb"), expert_emb=lambda d, a: d.f(E, DE + 1)),
    row("size", "expert_emb N = 0", arg("expert_emb"), expert_emb=lambda d, a: d.f(0, DE)),
    row(
        "size",
        "d_e = 0",
        arg("proj"),
        proj=lambda d, a: d.f(0, D),
        expert_emb=lambda d, a: d.f(E, 0),
    ),
    row("eps", "eps = 0", arg("eps"), eps=lambda d, a: 0.0),
    row("eps", "eps = -1", arg("eps"), eps=lambda d, a: -1.0),
    row("eps", "eps NaN", arg("eps"), eps=lambda d, a: NAN),
    row("eps", "eps inf", arg("eps"), eps=lambda d, a: INF),
    row(
        "meta",
        "meta h 1-D",
        arg("h"),
        **_all_meta("proj", "expert_emb", "temperature"),
        h=lambda d, a: torch.empty(T, device="meta"),
    ),
    row(
        "meta",
        "meta proj wrong d",
        arg("proj"),
        **_all_meta("h", "expert_emb", "temperature"),
        proj=lambda d, a: torch.empty(DE, D + 1, device="meta"),
    ),
    row(
        "meta",
        "meta temperature int64",
        arg("temperature"),
        **_all_meta("h", "proj", "expert_emb"),
        temperature=lambda d, a: torch.empty((), dtype=torch.int64, device="meta"),
    ),
    row(
        "meta",
        "meta eps = 0",
        arg("eps"),
        **_all_meta(*_FWD),
        eps=lambda d, a: 0.0,
    ),
    row("sparse", "h sparse COO", arg("h"), h=lambda d, a: a["h"].to_sparse()),
    row("sparse", "proj sparse COO", arg("proj"), proj=lambda d, a: a["proj"].to_sparse()),
]


def _wrapper_fwd(a):
    return smoe.cosine_scores(
        a["h"],
        a["proj"],
        a["expert_emb"],
        a["temperature"],
        eps=a["eps"],
        normalize_tokens=a["normalize_tokens"],
    )


_fwd_wrapper_rows = [
    row("eps", "wrapper eps = 0", arg("eps"), exc=(ValueError,), eps=lambda d, a: 0.0),
    row("eps", "wrapper eps = -1", arg("eps"), exc=(ValueError,), eps=lambda d, a: -1.0),
    row("eps", "wrapper eps NaN", arg("eps"), exc=(ValueError,), eps=lambda d, a: NAN),
    row("dtype", "wrapper h int32", arg("h"), h=lambda d, a: a["h"].to(torch.int32)),
]


def _defined_case(label: str, fn, description: str) -> Case:
    target = "smoe::cosine_scores"
    return Case(f"{target}/{label}", target, "nan", fn, defined(description))


_defined_cases = [
    _defined_case(
        "expert_emb NaN (defined)",
        _nan_expert_replaced,
        "the NaN expert's scores are each row's smallest finite score",
    ),
    _defined_case(
        "h +inf token (defined)",
        _inf_token_zero,
        "a token with no finite score gets cos = logits = 0; other tokens unchanged",
    ),
]


# ---- cosine_scores_backward --------------------------------------------------------------------
def _bwd_good(d):
    a = _fwd_good(d)
    return {
        "grad_cos": d.f(T, E),
        "grad_logits": d.f(T, E),
        **{n: a[n] for n in _FWD},
        "eps": 1e-4,
        "normalize_tokens": True,
    }


_bwd_rows = [
    *standard_rows(
        {
            "grad_cos": ("float64", "int32"),
            "grad_logits": ("float16",),
            "h": ("int32",),
            "proj": ("float64",),
            "expert_emb": ("bfloat16",),
        }
    ),
    *_temperature_rows(),
    row("size", "grad_cos [T, N+1]", arg("grad_cos"), grad_cos=lambda d, a: d.f(T, E + 1)),
    row("size", "grad_logits [T+1, N]", arg("grad_logits"), grad_logits=lambda d, a: d.f(T + 1, E)),
    row("size", "proj wrong d", arg("proj"), proj=lambda d, a: d.f(DE, D + 1)),
    row("eps", "eps = 0", arg("eps"), eps=lambda d, a: 0.0),
    row(
        "meta",
        "meta grad_cos [T, N+1]",
        arg("grad_cos"),
        **_all_meta("grad_logits", *_FWD),
        grad_cos=lambda d, a: torch.empty(T, E + 1, device="meta"),
    ),
    row(
        "meta",
        "meta grad_logits float64",
        arg("grad_logits"),
        **_all_meta("grad_cos", *_FWD),
        grad_logits=lambda d, a: torch.empty(T, E, dtype=torch.float64, device="meta"),
    ),
    row(
        "meta",
        "meta eps = 0",
        arg("eps"),
        **_all_meta("grad_cos", "grad_logits", *_FWD),
        eps=lambda d, a: 0.0,
    ),
    row(
        "sparse",
        "grad_cos sparse COO",
        arg("grad_cos"),
        grad_cos=lambda d, a: a["grad_cos"].to_sparse(),
    ),
]


CASES: list[Case] = [
    *op_cases("cosine_scores", _fwd_good, _fwd_rows),
    *op_cases("cosine_scores", _fwd_good, _fwd_wrapper_rows, call=_wrapper_fwd),
    *_defined_cases,
    *op_cases("cosine_scores_backward", _bwd_good, _bwd_rows),
]
