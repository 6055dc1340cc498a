"""A symbolic token count: every registered router, through MoELayer, exports with `torch.export`
with the sequence length dynamic (unbounded), and compiles once under
`torch.compile(dynamic=True)` for several sequence lengths.

What kept them from it: expert choice's and V-MoE's capacities, computed from the token count,
reached `int` op arguments (expert_choice's capacity, make_plan's, unified_topk's n), which froze
the token count into the graph; the graph-of-tokens and USMoE routers read the batch shape with
``int()``; the fakes' checks added guards sympy could not prove for every size; and the experts'
4 MiB rule for their fused path guarded on the token count. The ops now take those sizes as
SymInt, the routers keep them symbolic, the fakes' checks refuse a bad traced call without
guarding a good one, and on symbolic sizes the experts take the unfused path.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.export import Dim, export

from smoe import MoELayer, ops
from smoe.routing import RoutingContext, available_routers, router_info
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


def test_export_serves_both_sides_of_the_fused_paths_size_rule():
    # eager picks the fused expert_mlp above ops.experts.FUSE_MIN_BYTES of hidden; the exported
    # program holds one path for every length (a guard on the rule would have tied it to the
    # traced length's side), and both agree to float rounding
    layer = _layer("topk")
    big = -(-ops.experts.FUSE_MIN_BYTES // (B * K * 2 * D_FF * 4)) + 1  # hidden past 4 MiB
    program = export(layer, (_inputs("topk", SEQ[0])[0],), dynamic_shapes=({1: Dim("S")},))
    for n in (SEQ[0], big):
        x, _ = _inputs("topk", n)
        with torch.no_grad():
            _same(program.module()(x), layer(x))
