"""The fuzz gate: nothing joins smoe without joining the fuzz suite.

Every op registered in the ``smoe`` namespace (found at runtime, not from a list) needs a
strategy in ``tests/fuzz/strategies.OP_STRATEGIES``; a ``*_backward`` op counts as covered through
its forward (``BACKWARD_OF``), whose fuzz test runs it. Every registered router needs an entry in
``LAYER_ROUTERS``, the router table of the layer-level fuzz (test_fuzz_layer.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import torch

from smoe.routing import TopKRouter
from smoe.routing.registry import available_routers, register_router
from tests.fuzz.strategies import BACKWARD_OF, LAYER_ROUTERS, OP_STRATEGIES

pytestmark = pytest.mark.fuzz


def registered_ops() -> list[str]:
    """The op names registered in the ``smoe`` namespace now, without ``smoe::`` or overload."""
    names = torch._C._dispatch_get_all_op_names()
    return sorted({n.split("::", 1)[1].split(".")[0] for n in names if n.startswith("smoe::")})


def missing_fuzz(ops: Iterable[str], routers: Iterable[str]) -> list[str]:
    """One line per op or router the fuzz suite does not cover, naming it."""
    problems = []
    for op in ops:
        if op in OP_STRATEGIES:
            continue
        if op.endswith("_backward"):
            forward = BACKWARD_OF.get(op)
            if forward is None:
                problems.append(
                    f"smoe::{op}: a backward op with no forward in tests/fuzz/strategies.py "
                    "BACKWARD_OF"
                )
            elif forward not in OP_STRATEGIES:
                problems.append(f"smoe::{op}: its forward smoe::{forward} has no fuzz strategy")
            continue
        problems.append(
            f"smoe::{op}: no fuzz strategy in tests/fuzz/strategies.py OP_STRATEGIES (add one and "
            "a fuzz test against smoe/reference.py)"
        )
    for name in routers:
        if name not in LAYER_ROUTERS:
            problems.append(
                f"router {name!r}: missing from the layer-level fuzz (tests/fuzz/strategies.py "
                "LAYER_ROUTERS and tests/fuzz/test_fuzz_layer.py)"
            )
    return problems


def gate_problems() -> list[str]:
    return missing_fuzz(registered_ops(), available_routers())


def test_every_registered_op_and_router_is_fuzzed():
    problems = gate_problems()
    assert not problems, "not fuzzed:\n" + "\n".join(problems)


def test_gate_tables_name_only_registered_ops_and_routers():
    ops, routers = set(registered_ops()), set(available_routers())
    assert ops, "no smoe ops registered: the gate would check nothing"
    assert set(OP_STRATEGIES) <= ops, sorted(set(OP_STRATEGIES) - ops)
    assert set(BACKWARD_OF) <= ops and set(BACKWARD_OF.values()) <= set(OP_STRATEGIES)
    assert set(LAYER_ROUTERS) <= routers, sorted(set(LAYER_ROUTERS) - routers)


def test_gate_reports_a_new_op_and_a_backward_without_forward():
    lib = torch.library.Library("smoe", "FRAGMENT")
    try:
        lib.define("_gate_probe(Tensor x) -> Tensor")
        lib.define("_gate_probe_backward(Tensor grad) -> Tensor")
        problems = gate_problems()
    finally:
        lib._destroy()
    assert any(p.startswith("smoe::_gate_probe: no fuzz strategy") for p in problems), problems
    assert any(p.startswith("smoe::_gate_probe_backward: a backward op") for p in problems)
    assert "_gate_probe" not in registered_ops()


def test_gate_reports_a_backward_whose_forward_is_not_fuzzed():
    assert missing_fuzz(["topk_softmax_backward"], []) == []
    problems = missing_fuzz(["_gate_probe_backward"], [])
    assert len(problems) == 1 and "BACKWARD_OF" in problems[0]


def test_gate_reports_a_new_router(custom_name):
    register_router(custom_name, TopKRouter, description="a router the layer fuzz does not know")
    problems = gate_problems()
    assert problems == [
        f"router {custom_name!r}: missing from the layer-level fuzz (tests/fuzz/strategies.py "
        "LAYER_ROUTERS and tests/fuzz/test_fuzz_layer.py)"
    ]
