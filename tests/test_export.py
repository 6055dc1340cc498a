"""A symbolic token count: every registered router, through MoELayer, exports with `torch.export`
with the sequence length dynamic (unbounded), and compiles once under
`torch.compile(dynamic=True)` for several sequence lengths.

What kept them from it: expert choice's and V-MoE's capacities, computed from the token count,
reached `int` op arguments (expert_choice's capacity, make_plan's, unified_topk's n), which froze
the token count into the graph; the graph-of-tokens and USMoE routers read the batch shape with
``int()``; the fakes' checks added guards sympy could not prove for every size; and the experts'
4 MiB rule for their fused path guarded on the token count. The ops now take those sizes as
SymInt, the routers keep them symbolic, the fakes' checks refuse a bad traced call without
guarding a good one, and on symbolic sizes the experts call gather_mm (training) or expert_mlp
(inference) with the size rule as an argument (gather_min_bytes, fuse_min_bytes), which the op
applies to the real size when it runs.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.export import Dim, export

from smoe import MoELayer, ops
from smoe.routing import RoutingContext, available_routers, router_info
from tests.helpers import op_calls, program_targets
from tests.router_helpers import D_FF, D, E, K, attention_context

ROUTERS = list(available_routers())
B, SEQ = 2, (16, 24, 37)  # the first length traces; the others run the same graph


def _inputs(name: str, S: int) -> tuple[torch.Tensor, RoutingContext | None]:
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(S))
    return x, attention_context(name, x)


def _layer(name: str) -> MoELayer:
    if not router_info(name).compiles:
        pytest.skip(f"router {name!r} declares compiles=False")
    torch.manual_seed(0)
    return MoELayer(D, D_FF, E, K, router=name).eval()


def _same(got, want) -> None:
    (y, aux), (y0, aux0) = got, want
    torch.testing.assert_close(y, y0)
    assert torch.equal(aux.tokens_per_expert, aux0.tokens_per_expert)


@pytest.mark.parametrize("name", ROUTERS)
def test_registered_router_exports_with_a_dynamic_sequence_length(name):
    layer = _layer(name)
    x, ctx = _inputs(name, SEQ[0])
    S = Dim("S")
    # a RoutingContext's dynamic shapes mirror its fields: the attention [B, H, S, S]
    ctx_dims = None if ctx is None else RoutingContext(None, {2: S, 3: S}, None, None, None, None)
    program = export(
        layer, (x,), {"context": ctx}, dynamic_shapes={"x": {1: S}, "context": ctx_dims}
    )
    for n in SEQ:
        x, ctx = _inputs(name, n)
        with torch.no_grad():
            _same(program.module()(x, context=ctx), layer(x, ctx))


@pytest.mark.parametrize("name", ROUTERS)
def test_registered_router_compiles_once_for_several_sequence_lengths(name):
    layer = _layer(name)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend=counter)
    frames = []
    with torch.no_grad():
        for n in SEQ:
            x, ctx = _inputs(name, n)
            _same(compiled(x, ctx), layer(x, ctx))
            frames.append(counter.frame_count)
    # the first length compiles (an empty frame may come with it); the others reuse its graph
    assert frames[0] >= 1 and frames[-1] == frames[0], f"{name}: frames compiled {frames}"


def _past_rule(layer: MoELayer, row_width: int) -> int:
    """A sequence length whose [B * S * K, row_width] fp32 rows pass ops.experts.FUSE_MIN_BYTES."""
    return ops.experts.FUSE_MIN_BYTES // (B * K * row_width * 4) + 1


def test_export_serves_both_sides_of_the_gathering_paths_size_rule():
    # traced with gradients (the training path): eager gathers the first GEMM's rows through the
    # plan (gather_mm) once the grouped rows [B S K, d] pass 4 MiB, and permutes them below; the
    # program holds one gather_mm whose gather_min_bytes carries the rule to run time (a guard
    # would have tied the program to the traced length's side), so it permutes inside the op at
    # the small length only, with eager's bits
    layer = _layer("topk")
    program = export(layer, (_inputs("topk", SEQ[0])[0],), dynamic_shapes=({1: Dim("S")},))
    targets = program_targets(program)
    assert "smoe.gather_mm.default" in targets, sorted(targets)
    assert "smoe.permute.default" not in targets, sorted(targets)
    for n, gathers in ((SEQ[0], False), (_past_rule(layer, D), True)):
        x, _ = _inputs("topk", n)
        want, calls = op_calls(lambda x=x: layer(x))
        assert calls["smoe::gather_mm"] == gathers, (n, calls)
        got, calls = op_calls(lambda x=x: program.module()(x))
        assert calls["smoe::permute"] == (not gathers), (n, calls)
        assert torch.equal(got[0], want[0])
        assert torch.equal(got[1].tokens_per_expert, want[1].tokens_per_expert)


def test_exported_inference_fuses_the_expert_mlp_past_the_size_rule_only():
    # traced without gradients (inference): the experts are one smoe::expert_mlp whose
    # fuse_min_bytes carries the 4 MiB rule to run time, so the program runs the fused items at
    # a large length and the unfused chain (inside the op) at a small one, as eager does, with
    # eager's bits
    layer = _layer("topk")
    with torch.no_grad():
        program = export(layer, (_inputs("topk", SEQ[0])[0],), dynamic_shapes=({1: Dim("S")},))
    targets = program_targets(program)
    assert "smoe.expert_mlp.default" in targets, sorted(targets)
    assert "smoe.grouped_mm.default" not in targets, sorted(targets)
    hidden_width = layer.experts.w_in.shape[1]  # [E, n_in, d]
    for n, chain in ((SEQ[0], True), (_past_rule(layer, hidden_width), False)):
        x, _ = _inputs("topk", n)
        with torch.no_grad():
            (y, aux), calls = op_calls(lambda x=x: program.module()(x))
            y0, aux0 = layer(x)
        assert calls["smoe::grouped_mm"] == (2 if chain else 0), (n, calls)
        assert torch.equal(y, y0) and torch.equal(aux.tokens_per_expert, aux0.tokens_per_expert)
