import pytest
import torch

from smoe import ops
from smoe import reference as ref
from tests.helpers import (
    DTYPES,
    assert_close,
    assert_low_precision_close,
    noncontig,
)

# (T, E, capacity, group_size); capacity is clamped to each group's size.
SHAPES = [
    pytest.param(0, 4, 2, None, id="T0-E4-C2"),
    pytest.param(0, 4, 2, 3, id="T0-E4-C2-S3"),
    pytest.param(1, 1, 1, None, id="T1-E1-C1-exact"),
    pytest.param(1, 16, 5, None, id="T1-E16-C5-loose"),
    pytest.param(1, 4, 0, None, id="T1-E4-C0"),
    pytest.param(7, 4, 2, None, id="T7-E4-C2-tight"),
    pytest.param(7, 4, 7, None, id="T7-E4-C7-exact"),
    pytest.param(7, 4, 3, 3, id="T7-E4-C3-S3-short-last"),
    pytest.param(7, 16, 10, 4, id="T7-E16-C10-S4-loose"),
    pytest.param(7, 1, 3, 10, id="T7-E1-C3-S10-group-gt-T"),
    pytest.param(7, 4, 0, 3, id="T7-E4-C0-S3"),
    pytest.param(64, 4, 32, None, id="T64-E4-C32-tight"),
    pytest.param(64, 1, 64, None, id="T64-E1-C64-exact"),
    pytest.param(64, 16, 8, 16, id="T64-E16-C8-S16"),
    pytest.param(64, 16, 5, 24, id="T64-E16-C5-S24-short-last"),
    pytest.param(64, 4, 100, 100, id="T64-E4-C100-S100-loose"),
    pytest.param(64, 16, 3, 1, id="T64-E16-C3-S1"),
    pytest.param(64, 16, 0, 8, id="T64-E16-C0-S8"),
]


def groups(T, group_size):
    """[(start, end)] of the routing groups: consecutive, the last one possibly shorter."""
    S = T if group_size is None else group_size
    return [(a, min(a + S, T)) for a in range(0, T, S)] if T else []


def per_expert(T, capacity, group_size):
    """C_tot: tokens per expert, sum over groups of min(capacity, group length)."""
    return sum(min(capacity, b - a) for a, b in groups(T, group_size))


def random_logits(T, E, dtype=torch.float32):
    return (torch.randn(T, E) * 2).to(dtype)


def tied_logits(T, E, distinct=4):
    """Rows drawn from a few random rows: p[:, e] takes at most `distinct` values, so ties are
    exact in any precision (rows that are only permutations of each other would tie in exact
    arithmetic but not after rounding, which depends on the summation order)."""
    base = torch.randn(distinct, E) * 2
    return base[torch.randint(0, distinct, (T,))]


def separated_logits(T, E, group_size, margin=1e-4, dtype=torch.float64):
    """Logits (of ``dtype``) whose probabilities p[:, e] differ by >= margin between any two
    tokens of a group, for every expert, after rounding to ``dtype``: gradcheck's perturbation
    (eps = 1e-6) never flips a choice, and neither does a different summation order."""
    for _ in range(1000):
        logits = (torch.randn(T, E, dtype=torch.float64) * 2).to(dtype)
        p = torch.softmax(logits.double(), dim=-1)
        ok = True
        for a, b in groups(T, group_size):
            q = p[a:b].sort(dim=0).values
            if b - a > 1 and E > 1 and (q[1:] - q[:-1]).min() < margin:
                ok = False
        if ok:
            return logits
    raise AssertionError("no separated logits found")


def assert_same(a: ops.ExpertChoice, b: ops.ExpertChoice):
    assert torch.equal(a.weight, b.weight)
    for name in a.plan._fields:
        assert torch.equal(getattr(a.plan, name), getattr(b.plan, name)), name


# ---- parity with the reference ----
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,C,S", SHAPES)
def test_expert_choice_matches_reference(T, E, C, S, dtype):
    logits = random_logits(T, E, dtype)
    got = ops.expert_choice(logits, C, group_size=S)
    want = ref.expert_choice(logits, C, group_size=S)
    M = E * per_expert(T, C, S)
    assert got.weight.dtype == dtype and got.weight.shape == (T, E)
    assert got.plan.offsets.shape == (E + 1,) and got.plan.token.shape == (M,)
    for name in got.plan._fields:
        a, b = getattr(got.plan, name), getattr(want.plan, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    if dtype in (torch.float16, torch.bfloat16):
        r64 = ref.expert_choice(logits.double(), C, group_size=S).weight
        assert_low_precision_close(got.weight, r64, want.weight)
    else:
        assert_close(got.weight, want.weight)


@pytest.mark.parametrize("T,E,C,S", SHAPES)
def test_expert_choice_invariants(T, E, C, S):
    logits = random_logits(T, E, torch.float64)
    out = ops.expert_choice(logits, C, group_size=S)
    plan, p = out.plan, torch.softmax(logits, dim=-1)
    Ct = per_expert(T, C, S)
    # Perfect balance, no padding: expert e owns plan rows [e * C_tot, (e + 1) * C_tot).
    assert torch.equal(plan.offsets, torch.arange(E + 1) * Ct)
    assert plan.token.shape == plan.slot.shape == (E * Ct,)
    assert plan.row.shape == plan.kept.shape == (T, E)
    assert torch.equal(plan.kept, plan.row >= 0) and int(plan.kept.sum()) == E * Ct
    # token, slot and row are mutually inverse maps.
    i = torch.arange(E * Ct)
    expert_of_row = i // Ct if Ct else i
    assert torch.equal(plan.slot.long(), plan.token.long() * E + expert_of_row)
    assert torch.equal(plan.row.flatten()[plan.slot.long()], i.int())
    # weight = p where chosen, exactly 0 elsewhere.
    assert_close(out.weight, torch.where(plan.kept, p, torch.zeros_like(p)))
    assert (out.weight[~plan.kept] == 0).all()
    for e in range(E):
        tok = plan.token[e * Ct : (e + 1) * Ct].long()
        assert (tok[1:] > tok[:-1]).all()  # token order within the expert
        mask = torch.zeros(T, dtype=torch.bool)
        mask[tok] = True
        for a, b in groups(T, S):
            chosen = mask[a:b].nonzero().flatten() + a
            unchosen = (~mask[a:b]).nonzero().flatten() + a
            assert len(chosen) == min(C, b - a)
            if len(chosen) and len(unchosen):  # the top-C property within the group
                assert p[chosen, e].min() >= p[unchosen, e].max()


# ---- semantics ----
def test_expert_choice_ties_go_to_lower_index():
    # All-equal logits: every expert takes the first C tokens of each group.
    out = ops.expert_choice(torch.zeros(7, 4), 2, group_size=3)
    for e in range(4):
        assert out.plan.token[e * 5 : (e + 1) * 5].tolist() == [0, 1, 3, 4, 6]
    # Partial ties: tokens 1, 2, 4 tie at the top for expert 0, tokens 0 and 3 for expert 1.
    logits = torch.tensor([[0.0, 0], [1, 0], [1, 0], [0, 0], [1, 0]])
    out = ops.expert_choice(logits, 2)
    assert out.plan.token.tolist() == [1, 2, 0, 3]
    assert out.plan.kept.tolist() == [[0, 1], [1, 0], [1, 0], [0, 1], [0, 0]]


@pytest.mark.parametrize("group_size", [None, 64])
def test_expert_choice_many_ties_match_reference(group_size):
    logits = tied_logits(200, 6)
    got = ops.expert_choice(logits, 30, group_size=group_size)
    want = ref.expert_choice(logits, 30, group_size=group_size)
    for name in got.plan._fields:
        assert torch.equal(getattr(got.plan, name), getattr(want.plan, name)), name
    assert_close(got.weight, want.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T,E,S", [(7, 4, None), (64, 16, None), (10, 3, 4)])
def test_expert_choice_full_capacity_is_dense_softmax(T, E, S, dtype):
    # capacity = group size (c = E): every token goes to every expert, weight = softmax(logits).
    logits = random_logits(T, E, dtype).requires_grad_()
    out = ops.expert_choice(logits, T, group_size=S)
    assert out.plan.kept.all()
    expected_row = torch.arange(E).int() * T + torch.arange(T).int()[:, None]
    assert torch.equal(out.plan.row, expected_row)
    assert torch.equal(out.plan.token, torch.arange(T).int().repeat(E))
    dense = torch.softmax(logits, dim=-1)
    assert_close(out.weight, dense)
    g = torch.randn(T, E, dtype=dtype)
    (a,) = torch.autograd.grad(out.weight, logits, g)
    (b,) = torch.autograd.grad(dense, logits, g)
    assert_close(a, b)


def test_expert_choice_groups_are_routed_independently():
    logits = random_logits(50, 8)
    out = ops.expert_choice(logits, 4, group_size=16)
    parts = [ops.expert_choice(logits[a:b], 4) for a, b in groups(50, 16)]
    assert torch.equal(out.plan.kept, torch.cat([q.plan.kept for q in parts]))
    assert torch.equal(out.weight, torch.cat([q.weight for q in parts]))


def test_expert_choice_capacity_zero_routes_nothing():
    logits = random_logits(9, 4).requires_grad_()
    out = ops.expert_choice(logits, 0, group_size=4)
    assert out.plan.token.numel() == 0 and not out.plan.kept.any()
    assert torch.equal(out.plan.offsets, torch.zeros(5, dtype=torch.int64))
    assert (out.weight == 0).all()
    (g,) = torch.autograd.grad(out.weight, logits, torch.randn(9, 4))
    assert (g == 0).all()


def test_expert_choice_accepts_minus_inf_masks():
    logits = random_logits(6, 3)
    logits[:, 1] = float("-inf")  # expert 1 masked: p = 0 for every token, ties
    logits[2, 0] = float("-inf")
    out = ops.expert_choice(logits, 2)
    want = ref.expert_choice(logits, 2)
    assert torch.isfinite(out.weight).all()
    assert torch.equal(out.plan.token, want.plan.token)
    assert out.plan.token[2:4].tolist() == [0, 1]
    assert_close(out.weight, want.weight)


@pytest.mark.parametrize("S", [None, 4])
def test_expert_choice_noncontiguous(S):
    logits = random_logits(11, 6)
    want = ops.expert_choice(logits, 3, group_size=S)
    strided = noncontig(logits)
    transposed = logits.t().contiguous().t()
    for x in (strided, transposed):
        assert not x.is_contiguous()
        assert_same(ops.expert_choice(x, 3, group_size=S), want)
    # Every other row of a taller tensor: dense rows with a row stride of 2 * E.
    rows = torch.stack([logits, torch.zeros_like(logits)], 1).flatten(0, 1)[::2]
    assert not rows.is_contiguous() and torch.equal(rows, logits)
    assert_same(ops.expert_choice(rows, 3, group_size=S), want)


# ---- autograd ----
@pytest.mark.parametrize(
    "T,E,C,S",
    [
        (0, 4, 2, None),
        (1, 1, 1, None),
        (6, 3, 2, None),
        (7, 4, 2, 3),
        (5, 4, 5, None),
        (8, 3, 0, None),
        (9, 5, 3, 4),
    ],
)
def test_expert_choice_gradcheck(T, E, C, S):
    logits = separated_logits(T, E, S).requires_grad_()
    fn = lambda x: ops.expert_choice(x, C, group_size=S).weight  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_choice_backward_matches_softmax_times_mask(dtype):
    logits = random_logits(64, 8, dtype).requires_grad_()
    out = ops.expert_choice(logits, 10, group_size=20)
    g = torch.randn(64, 8).to(dtype)
    (got,) = torch.autograd.grad(out.weight, logits, g)
    l64 = logits.detach().double().requires_grad_()
    formula = torch.softmax(l64, dim=-1) * out.plan.kept
    (want,) = torch.autograd.grad(formula, l64, g.double())
    assert got.dtype == dtype
    assert_close(got, want, dtype)


# ---- opcheck ----
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize(
    "T,E,C,S", [(0, 4, 2, None), (0, 4, 2, 3), (7, 4, 3, 3), (9, 16, 20, 4), (5, 1, 2, None)]
)
def test_expert_choice_opcheck(T, E, C, S, requires_grad):
    logits = separated_logits(T, E, S).requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.smoe.expert_choice.default, (logits, C), {"group_size": S})


@pytest.mark.parametrize("T", [0, 6])
def test_expert_choice_backward_opcheck(T):
    logits = separated_logits(T, 5, None)
    row = ops.expert_choice(logits, 2).plan.row
    g = torch.randn(T, 5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.smoe.expert_choice_backward.default, (g, logits, row))


# ---- compile ----
def test_expert_choice_compiles_without_graph_breaks():
    logits = torch.randn(13, 4, requires_grad=True)

    def fn(x):
        ec = ops.expert_choice(x, 3, group_size=5)
        return (ec.weight * ec.weight).sum(), ec.plan

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    (a, pa), (b, pb) = fn(logits), compiled(logits)
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    torch.testing.assert_close(a, b)
    (ga,) = torch.autograd.grad(a, logits)
    (gb,) = torch.autograd.grad(b, logits)
    torch.testing.assert_close(ga, gb)


def test_expert_choice_compiles_with_dynamic_shapes():
    def fn(x):
        one, grouped = ops.expert_choice(x, 3), ops.expert_choice(x, 3, group_size=5)
        return (one.weight * grouped.weight).sum(), one.plan, grouped.plan

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    for T in (12, 23):
        logits = torch.randn(T, 4, requires_grad=True)
        (a, *pa), (b, *pb) = fn(logits), compiled(logits)
        for x, y in zip(pa, pb):
            assert all(torch.equal(u, v) for u, v in zip(x, y))
        torch.testing.assert_close(a, b)
        (ga,) = torch.autograd.grad(a, logits)
        (gb,) = torch.autograd.grad(b, logits)
        torch.testing.assert_close(ga, gb)


# ---- determinism ----
def test_expert_choice_is_deterministic():
    logits = tied_logits(3000, 16)
    a = ops.expert_choice(logits, 300, group_size=512)
    b = ops.expert_choice(logits, 300, group_size=512)
    assert_same(a, b)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        c = ops.expert_choice(logits, 300, group_size=512)
    finally:
        torch.set_num_threads(threads)
    assert_same(a, c)


# ---- errors ----
def test_expert_choice_rejects_non_2d_logits():
    with pytest.raises(RuntimeError, match="logits must be 2-D"):
        ops.expert_choice(torch.randn(2, 3, 4), 1)
    with pytest.raises(RuntimeError, match="logits must be 2-D"):
        ops.expert_choice(torch.randn(5), 1)


def test_expert_choice_rejects_integer_logits():
    with pytest.raises(RuntimeError, match="logits must be float32, float64, float16 or bfloat16"):
        ops.expert_choice(torch.ones(3, 4, dtype=torch.int64), 1)


def test_expert_choice_rejects_zero_experts():
    with pytest.raises(RuntimeError, match="logits must have at least one expert"):
        ops.expert_choice(torch.randn(3, 0), 1)


def test_expert_choice_rejects_negative_capacity():
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        ops.expert_choice(torch.randn(3, 4), -1)
    with pytest.raises(RuntimeError, match="capacity must be >= 0"):
        torch.ops.smoe.expert_choice(torch.randn(3, 4), -1)


@pytest.mark.parametrize("group_size", [0, -2])
def test_expert_choice_rejects_group_size_below_one(group_size):
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        ops.expert_choice(torch.randn(3, 4), 1, group_size=group_size)
    with pytest.raises(RuntimeError, match="group_size must be >= 1"):
        torch.ops.smoe.expert_choice(torch.randn(3, 4), 1, group_size=group_size)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_expert_choice_rejects_nan_logits(bad):
    logits = torch.randn(4, 3)
    logits[2, 1] = bad
    with pytest.raises(RuntimeError, match="logits must be finite or -inf.*row 2"):
        ops.expert_choice(logits, 1)


def test_expert_choice_backward_rejects_bad_row():
    logits = torch.randn(6, 5)
    row = ops.expert_choice(logits, 2).plan.row
    g = torch.randn(6, 5)
    with pytest.raises(RuntimeError, match="row must have logits' shape"):
        torch.ops.smoe.expert_choice_backward(g, logits, row[:, :3].contiguous())
    with pytest.raises(RuntimeError, match="row must be a 2-D int32 tensor"):
        torch.ops.smoe.expert_choice_backward(g, logits, row.long())


def test_expert_choice_backward_rejects_bad_grad_weight():
    logits = torch.randn(6, 5)
    row = ops.expert_choice(logits, 2).plan.row
    with pytest.raises(RuntimeError, match="grad_weight must match logits' shape"):
        torch.ops.smoe.expert_choice_backward(torch.randn(6, 4), logits, row)
    with pytest.raises(RuntimeError, match="grad_weight must match logits' shape"):
        torch.ops.smoe.expert_choice_backward(torch.randn(6, 5).double(), logits, row)
