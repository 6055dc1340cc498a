"""Grouping by position (smoe.routing.pairs): expert choice and USMoE with the B tokens of each
position of a [B, S] batch as one group. The same selection as sequence groups of the
transposed batch, a valid plan, causal in a decoder layer (and sequence groups are not),
incremental decoding reproduces the full forward, gradients, errors."""

from __future__ import annotations

import pytest
import torch

from smoe import MoELayer
from smoe.routing import RoutingContext
from smoe.routing.pairs import from_positions, to_positions
from smoe.routing.registry import build_router, router_info
from tests.fuzz.layer_reference_usmoe import check_expert_choice_layout

B, S, D, E, K = 4, 6, 16, 8, 2

# (registry name, grouped by position, grouped by sequence of the transposed batch)
ROUTERS = {
    "usmoe": ({"group": "position"}, {"group": "sequence"}),
    "expert_choice": ({"group_size": "position"}, {"group_size": B}),
}


def _router(name: str, by_position: bool = True, dtype=torch.float32):
    torch.manual_seed(0)
    options = ROUTERS[name][0 if by_position else 1]
    return build_router(name, D, E, K, **options).to(dtype)


def _x(T: int = B * S, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _check_plan(routing, T: int) -> None:
    """The plan lists exactly the chosen (t, e) pairs, expert-major, tokens ascending within each
    expert (the expert-choice layout the fuzz checks too)."""
    kept = routing.plan.kept
    assert kept.shape == (T, E) and torch.equal(routing.expert >= 0, kept)
    check_expert_choice_layout(routing.plan, kept)


@pytest.mark.parametrize("name", ROUTERS)
def test_position_groups_are_sequence_groups_of_the_transposed_batch(name):
    x = _x()
    got = _router(name)(x, RoutingContext(batch_shape=(B, S)))
    want = _router(name, by_position=False)(to_positions(x, B, S), RoutingContext((S, B)))
    assert torch.equal(got.plan.kept, from_positions(want.plan.kept, B, S))
    assert torch.equal(got.weight, from_positions(want.weight, B, S))
    assert torch.equal(got.logits, from_positions(want.logits, B, S))
    _check_plan(got, B * S)
    per_position = got.plan.kept.view(B, S, E).sum(dim=(0, 2))
    assert per_position.tolist() == [B * K] * S  # every position's group spends its budget


@pytest.mark.parametrize("name", ROUTERS)
def test_registry_says_position_groups_are_causal(name):
    info = router_info(name)
    assert info.is_causal(_router(name)) and not info.is_causal(_router(name, by_position=False))


def _layer(name: str, by_position: bool) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(D, 32, E, K, router=_router(name, by_position)).eval()


@pytest.mark.parametrize("name", ROUTERS)
def test_a_decoder_layer_grouped_by_position_never_sees_later_tokens(name):
    x = _x().view(B, S, D)
    later = x.clone()
    later[:, 3:] = torch.randn(B, S - 3, D, generator=torch.Generator().manual_seed(7))
    causal = RoutingContext(causal=True)
    layer = _layer(name, by_position=True)
    y, _ = layer(x, causal)
    y_later, _ = layer(later, causal)
    assert torch.equal(y[:, :3], y_later[:, :3])
    assert not torch.equal(y[:, 3:], y_later[:, 3:])
    # the same layer grouped by sequence: refused in a decoder, and it does see later tokens
    seq = _layer(name, by_position=False)
    with pytest.raises(ValueError, match="is not causal"):
        seq(x, causal)
    if name == "usmoe":  # (expert choice's sequence groups here are B-token slices)
        seq.router.group = "sequence"
        y, _ = seq(x)
        y_later, _ = seq(later)
        assert not torch.equal(y[:, :3], y_later[:, :3])


@pytest.mark.parametrize("name", ROUTERS)
def test_decoding_one_position_at_a_time_reproduces_the_full_forward(name):
    router, x = _router(name), _x()
    full = router(x, RoutingContext(batch_shape=(B, S))).weight.view(B, S, E)
    xs = x.view(B, S, D)
    for s in range(S):  # one decoding step: the B sequences' tokens at position s
        step = router(xs[:, s].contiguous(), RoutingContext(batch_shape=(B, 1))).weight
        assert torch.equal(step, full[:, s])


@pytest.mark.parametrize("name", ROUTERS)
def test_empty_batch_and_one_sequence(name):
    router = _router(name)
    empty = router(_x(T=0), RoutingContext(batch_shape=(0, S)))
    assert empty.weight.shape == (0, E) and int(empty.plan.offsets[-1]) == 0
    one = router(_x(T=S), RoutingContext(batch_shape=(1, S)))  # a group of one token
    # USMoE: the token's top-k of U; expert choice: C = ceil(1·k/E) = 1, every expert takes it
    experts = K if name == "usmoe" else E
    assert one.plan.kept.sum(dim=1).tolist() == [experts] * S
    _check_plan(one, S)


@pytest.mark.parametrize("name", ROUTERS)
def test_gradcheck_of_the_weight_path(name):
    router = _router(name, dtype=torch.float64)
    x = _x(dtype=torch.float64).requires_grad_()
    ctx = RoutingContext(batch_shape=(B, S))
    kept = router(x, ctx).plan.kept
    fn = lambda inp: router(inp, ctx).weight  # noqa: E731  (random inputs: the selection stays)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6)
    assert torch.equal(router(x, ctx).plan.kept, kept)


@pytest.mark.parametrize("name", ROUTERS)
def test_compiles_without_graph_breaks(name):
    router, x, ctx = _router(name), _x(), RoutingContext(batch_shape=(B, S))
    compiled = torch.compile(
        lambda inp: router(inp, ctx).weight, fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(compiled(x), router(x, ctx).weight)


@pytest.mark.parametrize("name", ROUTERS)
def test_position_groups_need_a_matching_batch_shape(name):
    router, x = _router(name), _x()
    with pytest.raises(ValueError, match="grouping by 'position' needs context.batch_shape"):
        router(x, None)
    with pytest.raises(ValueError, match="grouping by 'position' needs context.batch_shape"):
        router(x, RoutingContext(batch_shape=(B * S,)))
    with pytest.raises(ValueError, match=r"batch_shape \(5, 6\) does not hold the 24 tokens"):
        router(x, RoutingContext(batch_shape=(5, S)))


def test_expert_choice_refuses_other_group_strings():
    with pytest.raises(ValueError, match="group_size must be an int >= 1, None or 'position'"):
        build_router("expert_choice", D, E, K, group_size="sequence")


@pytest.mark.cuda
@pytest.mark.parametrize("name", ROUTERS)
def test_position_groups_cuda_match_cpu(name):
    torch.manual_seed(0)
    layer = MoELayer(D, 32, E, K, router=_router(name)).eval()
    x = _x().view(B, S, D)
    ctx = RoutingContext(causal=True)
    with torch.no_grad():
        y_cpu, a_cpu = layer(x, ctx)
        y_gpu, a_gpu = layer.cuda()(x.cuda(), ctx)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, atol=1e-5, rtol=1e-5)
    assert torch.equal(a_gpu.tokens_per_expert.cpu(), a_cpu.tokens_per_expert)
