"""The bad-input table: what a case is, the helpers the per-family tables share, and the whole
table (:func:`all_cases`).

A case is one call with one bad input and what it must do. Nearly every row expects a *clear
error*: the right exception type with a message matching a regex that names the bad argument
(STYLE.md §6). A few rows expect a *defined* behaviour instead: the call succeeds and the case
checks the documented result (the row's ``expect.pattern`` says what it is). On CUDA, checks of
tensor *values* (expert ids, offsets, NaN logits) are asynchronous device asserts, documented in
the ops' docstrings (an op never syncs to read a device value): those rows carry
``cuda_expect=ASYNC_ASSERT`` and the runner counts a device-side assert there as expected.

Choices the table makes explicit:
- NaN / +inf logits, and a logits row of only -inf, are errors naming ``logits`` (the routers
  cannot pick experts from them); NaN in expert *data* (x, w, h) is ordinary IEEE arithmetic
  and not a bad input.
- torch refuses ``requires_grad`` on an integer tensor when it is made, so the "integer input
  with requires_grad" rows pass an index argument as a float tensor that requires grad: a dtype
  error naming the argument.
- Overflow rows build ``T*k >= 2^31`` (or ``M >= 2^31``) from stride-0 ``expand`` views: the op
  must refuse them from the shapes, before allocating anything.
- Mixed-device rows put one tensor on ``Dev.other``; a lone tensor on another device is a valid
  call there, so single-tensor ops get no such row.

Nothing here builds a tensor at import time: the runner's parent process imports this table and
forks one child per case, and must run no torch op before forking.

The tables live beside this file, one per op family: ``cases_gate.py`` (gate_linear),
``cases_routing.py`` (topk_softmax, expert_choice), ``cases_sigmoid.py`` (topk_sigmoid),
``cases_dispatch.py`` (make_plan, permute, combine), ``cases_experts.py`` (grouped_mm, swiglu,
the Experts module), ``cases_expert_mlp.py`` (expert_mlp), ``cases_gather_mm.py`` (gather_mm),
``cases_xmoe.py`` (cosine_scores), ``cases_sinkhorn.py`` (sinkhorn), ``cases_momentum.py``
(momentum_update), ``cases_graph.py`` (graph_mix), ``cases_usmoe.py`` (unified_topk),
``cases_s2moe.py`` (s2moe_perturb), ``cases_stats.py`` (router_stats), ``cases_modules.py``
(MoELayer with each router, the routers' constructors), ``cases_layers.py`` (MoELayer's and
S2MoELayer's own options), ``cases_graph_routers.py`` (the graph-of-tokens routers, their
context), ``cases_usmoe_router.py`` (USMoE's router: options, sequences, padding) and
``cases_models.py`` (smoe.models' constructors).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

# Imported by the runner's parent before it forks (imports only, no torch op), so that no child
# pays for them: the fake-tensor machinery a meta call loads (sympy), and timm for vmoe_vit rows.
PRELOAD = (
    "torch._subclasses.fake_tensor",
    "torch.fx.experimental.symbolic_shapes",
    "smoe.models",
    "timm.models.vision_transformer",
)

# Sizes of the good calls every op row starts from.
T, E, K, D = 4, 3, 2, 5
INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Expect:
    """What a case must do: raise ``exc`` with a message matching ``pattern`` (an error row), or,
    when ``exc`` is None, return True (a defined-behaviour row; ``pattern`` describes it)."""

    exc: tuple[type[BaseException], ...] | None
    pattern: str
    async_assert: bool = False  # CUDA's documented asynchronous device assert

    @property
    def label(self) -> str:
        if self.async_assert:
            return "device assert (async, documented)"
        if self.exc is None:
            return f"defined: {self.pattern}"
        return f"{'/'.join(e.__name__ for e in self.exc)} /{self.pattern}/"

    @property
    def outcome(self) -> str:
        """The outcome class that meets this expectation."""
        if self.async_assert:
            return "crash"
        return "defined" if self.exc is None else "clear error"


def error(pattern: str, *exc: type[BaseException]) -> Expect:
    """An error row: ``exc`` (default RuntimeError, as TORCH_CHECK) matching ``pattern``."""
    return Expect(exc or (RuntimeError,), pattern)


def defined(description: str) -> Expect:
    """A defined-behaviour row: the case returns True when the documented behaviour holds."""
    return Expect(None, description)


ASYNC_ASSERT = Expect(None, "device assert", async_assert=True)


@dataclass(frozen=True)
class Case:
    """One row of the matrix.

    Fields:
        name: unique id, ``<target>/<what is bad>``.
        target: the op (``smoe::grouped_mm``), module (``MoELayer``) or router (``router:vmoe``).
        kind: the family of bad input (dtype, rank, size, device, ids, nan, offsets, layout, meta,
            sparse, grad, overflow, config).
        fn: ``fn(dev)`` makes the inputs on ``dev.device`` and makes the call.
        expect: what it must do (CPU; also CUDA unless ``cuda_expect`` says otherwise).
        devices: where the row runs.
        cuda_expect: CUDA's documented behaviour where it differs.
    """

    name: str
    target: str
    kind: str
    fn: Callable[[Dev], Any]
    expect: Expect
    devices: tuple[str, ...] = ("cpu", "cuda")
    cuda_expect: Expect | None = None

    def expect_on(self, device: str) -> Expect:
        if device == "cuda" and self.cuda_expect is not None:
            return self.cuda_expect
        return self.expect


class Dev:
    """Tensor makers on the device under test; ``other`` is the device of the mixed-device rows
    (meta when testing the CPU, the CPU when testing CUDA)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.other = "meta" if device == "cpu" else "cpu"

    def f(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, dtype=dtype, device=self.device)

    def i32(self, data: Any) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.int32, device=self.device)

    def i64(self, data: Any) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.int64, device=self.device)

    def huge(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        """``like``'s first row repeated ``rows`` times as a stride-0 view: no allocation."""
        return like[:1].expand(rows, *like.shape[1:])


def context_for(d: Dev, router: str, x: torch.Tensor):
    """The RoutingContext a router that needs attention gets with tokens ``x [..., d]``: causal
    uniform probabilities ``[1, 1, T, T]`` on the device under test (x's T tokens, one
    sequence); None for the other routers."""
    from smoe import RoutingContext
    from smoe.routing import router_info

    if not router_info(router).needs_attention:
        return None
    T = math.prod(x.shape[:-1])
    a = torch.ones(T, T, device=d.device).tril()
    return RoutingContext(attention=(a / a.sum(-1, keepdim=True))[None, None])


def arg(name: str) -> str:
    """The regex of a message naming ``name`` as a word."""
    return rf"\b{re.escape(name)}\b"


# ---- op rows: a good call, and rows that change one or two of its arguments -------------------

Change = Callable[[Dev, dict[str, Any]], Any]


@dataclass(frozen=True)
class Row:
    """One bad variant of an op's good call: ``changes`` maps an argument name to
    ``fn(dev, good_args) -> bad value``."""

    kind: str
    label: str
    expect: Expect
    changes: Mapping[str, Change]
    devices: tuple[str, ...] = ("cpu", "cuda")
    cuda_expect: Expect | None = None


def row(
    kind: str,
    label: str,
    pattern: str | Expect,
    *,
    exc: tuple[type[BaseException], ...] = (RuntimeError,),
    devices: tuple[str, ...] = ("cpu", "cuda"),
    cuda_expect: Expect | None = None,
    **changes: Change,
) -> Row:
    expect = pattern if isinstance(pattern, Expect) else Expect(exc, pattern)
    return Row(kind, label, expect, changes, devices, cuda_expect)


def value_row(kind: str, label: str, pattern: str, **changes: Change) -> Row:
    """A row whose bad input is a tensor *value*: a clear error on the CPU, the documented
    asynchronous device assert on CUDA."""
    return row(kind, label, pattern, cuda_expect=ASYNC_ASSERT, **changes)


def standard_rows(tensors: Mapping[str, tuple[str, ...]]) -> list[Row]:
    """The rows every tensor argument gets: each wrong dtype listed for it, one rank too many and
    one too few, and (ops with several tensors) on the other device. ``tensors`` maps an
    argument to its wrong dtypes (torch dtype names)."""
    rows: list[Row] = []
    for name, bad_dtypes in tensors.items():
        for dt in bad_dtypes:
            dtype = getattr(torch, dt)
            rows.append(row("dtype", f"{name} {dt}", arg(name), **{name: _to_dtype(name, dtype)}))
        rows.append(row("rank", f"{name} rank+1", arg(name), **{name: _rank_up(name)}))
        rows.append(row("rank", f"{name} rank-1", arg(name), **{name: _rank_down(name)}))
        if len(tensors) > 1:  # a lone tensor on another device is a valid call there
            rows.append(
                row("device", f"{name} on the other device", arg(name), **{name: _other(name)})
            )
    return rows


def _to_dtype(name: str, dtype: torch.dtype) -> Change:
    return lambda d, a: a[name].to(dtype)


def _rank_up(name: str) -> Change:
    return lambda d, a: a[name].unsqueeze(-1)


def _rank_down(name: str) -> Change:
    return lambda d, a: a[name].flatten() if a[name].dim() > 1 else a[name][0]


def _other(name: str) -> Change:
    return lambda d, a: a[name].to(d.other)


def set_entry(name: str, index: Any, value: Any) -> Change:
    """The good value of ``name`` (a copy) with ``[index]`` set to ``value``."""

    def change(d: Dev, a: dict[str, Any]) -> Any:
        t = a[name].clone()
        t[index] = value
        return t

    return change


def on_meta(name: str) -> Change:
    """The good value of ``name``, moved to the meta device."""
    return lambda d, a: a[name].to("meta")


def op_cases(
    op: str,
    good: Callable[[Dev], dict[str, Any]],
    rows: Iterable[Row],
    call: Callable[[dict[str, Any]], Any] | None = None,
) -> list[Case]:
    """The cases of ``torch.ops.smoe.<op>`` (or of ``call(args)``, e.g. a Python wrapper): each
    row's changes applied to the good call ``good(dev)``."""
    target = f"smoe::{op}"
    invoke = call or (lambda a: getattr(torch.ops.smoe, op).default(**a))
    cases = []
    for r in rows:

        def fn(d: Dev, r: Row = r) -> Any:
            args = good(d)
            bad = {name: change(d, args) for name, change in r.changes.items()}
            return invoke({**args, **bad})

        name = f"{target}/{r.label}"
        cases.append(Case(name, target, r.kind, fn, r.expect, r.devices, r.cuda_expect))
    return cases


def smoe_ops() -> list[str]:
    """The registered smoe ops' names (without ``smoe::``), sorted."""
    return sorted(
        name.removeprefix("smoe::")
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("smoe::")
    )


def all_cases() -> list[Case]:
    """The whole table, in a fixed order; names are unique."""
    from tests.bad_inputs import (
        cases_dispatch,
        cases_expert_mlp,
        cases_experts,
        cases_gate,
        cases_gather_mm,
        cases_graph,
        cases_graph_routers,
        cases_layers,
        cases_models,
        cases_modules,
        cases_momentum,
        cases_routing,
        cases_s2moe,
        cases_sigmoid,
        cases_sinkhorn,
        cases_stats,
        cases_usmoe,
        cases_usmoe_router,
        cases_xmoe,
    )

    cases = [
        *cases_gate.CASES,
        *cases_routing.CASES,
        *cases_sigmoid.CASES,
        *cases_dispatch.CASES,
        *cases_experts.CASES,
        *cases_expert_mlp.CASES,
        *cases_gather_mm.CASES,
        *cases_xmoe.CASES,
        *cases_sinkhorn.CASES,
        *cases_momentum.CASES,
        *cases_graph.CASES,
        *cases_usmoe.CASES,
        *cases_s2moe.CASES,
        *cases_stats.CASES,
        *cases_modules.CASES,
        *cases_layers.CASES,
        *cases_graph_routers.CASES,
        *cases_usmoe_router.CASES,
        *cases_models.CASES,
    ]
    seen: set[str] = set()
    for c in cases:
        if c.name in seen:
            raise ValueError(f"duplicate bad-input case name {c.name!r}")
        seen.add(c.name)
    return cases
