"""USMoERouter (specs/usmoe.md §10): the unified score, the joint top-N per group and its plan,
the α = 0 special cases (token choice, expert choice), selection properties, padding,
incremental decoding, gradients, errors; and smoe.convert(model, router="usmoe")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import smoe
from smoe import ops
from smoe.routing import ExpertChoiceRouter, RoutingContext
from smoe.routing.usmoe import USMoERouter, plan_from_pairs

B, S, D, E, K = 3, 10, 16, 8, 2


def _router(**kw) -> USMoERouter:
    torch.manual_seed(0)
    return USMoERouter(D, E, K, **kw)


def _x(T: int = B * S, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


CTX = RoutingContext(batch_shape=(B, S))


def _unified(router: USMoERouter, x: torch.Tensor) -> torch.Tensor:
    """U from the spec's formula (sigmoid expert score), in float64."""
    z = F.linear(x.double(), router.weight.double())
    return router.alpha * (2 / E) * torch.sigmoid(z) + (1 - router.alpha) * torch.softmax(z, -1)


@pytest.mark.parametrize("budget", [K, 1.5, 0.7])
def test_joint_selection_takes_the_best_n_pairs_of_each_sequence(budget):
    router, x = _router(budget=budget), _x()
    routing = router(x, CTX)
    n = round(budget * S)
    chosen = routing.plan.kept.view(B, S, E)
    assert chosen.sum(dim=(1, 2)).tolist() == [n] * B  # §10.1
    U = _unified(router, x).view(B, S, E)
    for b in range(B):  # §10.4: every chosen U >= every unchosen U of the sequence
        assert U[b][chosen[b]].min() >= U[b][~chosen[b]].max()
    torch.testing.assert_close(
        routing.weight, torch.where(routing.plan.kept, U.view(-1, E), 0.0).float()
    )
    assert torch.equal(routing.expert >= 0, routing.plan.kept) and routing.aux == {}


def test_budget_monotonicity_and_group_isolation():
    x = _x()
    small = _router(budget=1.0)(x, CTX).plan.kept
    large = _router(budget=2.5)(x, CTX).plan.kept
    assert not (small & ~large).any()  # §10.5
    changed = x.clone()
    changed[:S] = torch.randn(S, D)  # sequence 0 only
    again = _router(budget=1.0)(changed, CTX).plan.kept
    assert torch.equal(again[S:], small[S:])  # §10.8


def test_permuting_tokens_permutes_the_selection():
    router, x = _router(), _x()
    perm = torch.randperm(S, generator=torch.Generator().manual_seed(3))
    full = torch.cat([perm + b * S for b in range(B)])
    assert torch.equal(router(x[full], CTX).plan.kept, router(x, CTX).plan.kept[full])  # §10.7


def test_alpha_0_per_token_is_token_choice():
    router = _router(alpha=0.0, selection="per_token")
    x = _x()
    routing = router(x, CTX)
    w, e = ops.topk_softmax(F.linear(x, router.weight), K, renormalize=False)
    dense = torch.zeros(B * S, E).scatter(1, e.long(), w)
    assert torch.equal(routing.plan.kept, dense > 0)  # §10.2
    torch.testing.assert_close(routing.weight, dense)


def test_alpha_0_per_expert_is_the_librarys_expert_choice():
    # S k / E = 3 tokens per expert (the library's EC rounds up, USMoE's baseline to nearest)
    s = 12
    router = _router(alpha=0.0, selection="per_expert")
    ec = ExpertChoiceRouter(D, E, capacity_factor=K, group_size=s)
    ec.weight.data.copy_(router.weight.data)
    x = _x(T=B * s)
    got, want = router(x, RoutingContext(batch_shape=(B, s))), ec(x)
    n = int(want.plan.offsets[-1])
    assert torch.equal(got.plan.offsets, want.plan.offsets)  # §10.3
    assert torch.equal(got.plan.token[:n], want.plan.token[:n])
    assert torch.equal(got.plan.row, want.plan.row)
    torch.testing.assert_close(got.weight, want.weight)


def test_plan_from_pairs_lists_tokens_in_order_within_each_expert():
    flat = torch.tensor([1, 2, 4, -1, 7, 8, -1])  # T = 3, E = 3: (0,1) (0,2) (1,1) (2,1) (2,2)
    plan = plan_from_pairs(flat, 3, 3)
    assert plan.offsets.tolist() == [0, 0, 3, 5]
    assert plan.token[:5].tolist() == [0, 1, 2, 0, 2]
    assert plan.slot[:5].tolist() == [1, 4, 7, 2, 8]
    assert plan.row.tolist() == [[-1, 0, 3], [-1, 1, -1], [-1, 2, 4]]
    assert plan.token[5:].tolist() == [-1, -1]


def test_tokens_without_experts_get_zero_from_the_routed_experts():
    torch.manual_seed(0)
    layer = smoe.MoELayer(D, 32, E, K, router=USMoERouter(D, E, K, budget=0.5))
    x = _x().view(B, S, D)
    y, aux = layer(x)
    none = ~layer.router(x.reshape(-1, D), CTX).plan.kept.any(dim=1)
    assert none.any() and not none.all()
    assert (y.reshape(-1, D)[none] == 0).all()  # §10.6
    y.square().sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_padding_is_never_chosen_and_not_counted():
    router, x = _router(), _x()
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, 6:] = False
    routing = router(x, RoutingContext(batch_shape=(B, S), padding_mask=mask))
    kept = routing.plan.kept.view(B, S, E)
    assert not kept[1, 6:].any()
    assert kept.sum(dim=(1, 2)).tolist() == [K * S, K * 6, K * S]


@pytest.mark.parametrize("group", ["batch", 4])
def test_flat_groups(group):
    routing = _router(group=group)(_x(), None)
    kept = routing.plan.kept
    if group == "batch":
        assert kept.sum().item() == K * B * S
    else:  # 30 tokens: groups of 4, the last of 2
        sizes = [4] * 7 + [2]
        counts = [int(kept[i * 4 : i * 4 + n].sum()) for i, n in enumerate(sizes)]
        assert counts == [K * n for n in sizes]


def test_incremental_decoding_falls_back_to_per_token_top_k():
    router, x = _router(), _x(T=B)
    routing = router(x, RoutingContext(batch_shape=(B, 1)))
    assert routing.plan.kept.sum(dim=1).tolist() == [K] * B
    U = _unified(router, x)
    assert torch.equal(
        routing.plan.kept, torch.zeros(B, E, dtype=torch.bool).scatter(1, U.topk(K).indices, True)
    )


def test_token_softmax_expert_score():
    router, x = _router(expert_score="token_softmax"), _x()
    z = F.linear(x.double(), router.weight.double()).view(B, S, E)
    U = 0.5 * torch.softmax(z, dim=1) + 0.5 * torch.softmax(z, dim=2)
    routing = router(x, CTX)
    torch.testing.assert_close(
        routing.weight, torch.where(routing.plan.kept, U.view(-1, E), 0).float()
    )


def test_norm_topk_prob_divides_by_the_sum_over_all_experts():
    router, x = _router(norm_topk_prob=True), _x()
    U = _unified(router, x)
    routing = router(x, CTX)
    torch.testing.assert_close(
        routing.weight, torch.where(routing.plan.kept, U / U.sum(-1, keepdim=True), 0).float()
    )


def test_gradcheck_of_the_weight_path():
    router = _router().double()
    x = _x().double().requires_grad_()
    kept = router(x, CTX).plan.kept
    fn = lambda inp: router(inp, CTX).weight  # noqa: E731  (random inputs: the selection stays)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6)
    assert torch.equal(router(x, CTX).plan.kept, kept)


def test_compiles_without_graph_breaks():
    router, x = _router(), _x()
    compiled = torch.compile(
        lambda inp: router(inp, CTX).weight, fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(compiled(x), router(x, CTX).weight)


def test_state_dict_round_trip():
    a, b = _router(), USMoERouter(D, E, K)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(_x(), CTX).weight, b(_x(), CTX).weight)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(alpha=1.5), "alpha must be in"),
        (dict(alpha=-0.1), "alpha must be in"),
        (dict(budget=0.0), "budget must be in"),
        (dict(budget=9.0), "budget must be in"),
        (dict(expert_score="cosine"), "expert_score must be one of"),
        (dict(selection="rows"), "selection must be one of"),
        (dict(group="tokens"), "group must be"),
        (dict(group=0), "group must be"),
    ],
)
def test_bad_options_raise_naming_them(kw, match):
    with pytest.raises(ValueError, match=match):
        USMoERouter(D, E, K, **kw)


def test_sequence_groups_need_a_batch_shape():
    with pytest.raises(ValueError, match="group='sequence' needs context.batch_shape"):
        _router()(_x(), None)


# ---- smoe.convert(model, router="usmoe"), training-free -------------------------------------
def test_convert_plugs_usmoe_into_a_pretrained_olmoe():
    pytest.importorskip("transformers")
    from tests.integrations.tiny_models import build

    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    model = build("olmoe")  # norm_topk_prob=False: the plain top-k softmax weights
    with torch.no_grad():
        want = model(ids).logits
    with pytest.raises(ValueError, match="not causal"):
        smoe.convert(model, router="usmoe")
    per_token = smoe.convert(build("olmoe"), router="usmoe", alpha=0.0, selection="per_token")
    with torch.no_grad():  # §10.10: alpha = 0 per token is the model's own routing
        got = per_token(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    joint = smoe.convert(build("olmoe"), router="usmoe", causal=False)
    gates = [
        m.gate for m in joint.modules() if isinstance(m, smoe.integrations.convert.ConvertedMoE)
    ]
    originals = [b.gate for b in build("olmoe").model.layers for b in [b.mlp]]
    assert all(torch.equal(g.weight, o.weight) for g, o in zip(gates, originals))  # plug-in
    assert list(joint.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        out = joint(ids).logits
    assert torch.isfinite(out).all() and not torch.allclose(out, want)


@pytest.mark.parametrize(
    "router, options, causal",
    [
        ("usmoe", {"group": "position"}, True),
        ("expert_choice", {"group_size": "position"}, True),
        ("usmoe", {"causal": False}, False),  # sequence groups: the control
        ("expert_choice", {"causal": False}, False),
    ],
)
def test_position_groups_plug_into_a_generating_olmoe(router, options, causal):
    # Grouped by position, a token competes only with the batch's tokens at its own position:
    # causal, so convert accepts it in a decoder; the logits at position t do not change when
    # later tokens are appended (every prefix's last logits equal the full forward's), and
    # generating with the KV cache (each step's B tokens one group) matches recomputing. Grouped
    # by sequence (converted with causal=False), later tokens change earlier logits.
    pytest.importorskip("transformers")
    from tests.integrations.tiny_models import build

    model = smoe.convert(build("olmoe"), router=router, **options)
    ids = torch.randint(3, 64, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        gap = max(
            float((model(ids[:, :t]).logits[:, -1] - full[:, t - 1]).abs().max())
            for t in range(1, ids.shape[1] + 1)
        )
    assert (gap < 1e-5) == causal, gap
    if causal:
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            cached = model.generate(ids[:, :5], use_cache=True, **kw)
            fresh = model.generate(ids[:, :5], use_cache=False, **kw)
        assert torch.equal(cached, fresh) and cached.shape == (3, 11)
