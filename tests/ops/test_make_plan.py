import pytest
import torch

from smoe import ops
from smoe import reference as ref


def random_experts(T, k, E, *, unassigned=0.0, distinct=True):
    """[T, k] int32 experts; distinct per token like top-k output; a fraction set to -1."""
    if distinct and k <= E:
        ex = torch.stack([torch.randperm(E)[:k] for _ in range(T)]) if T else torch.empty(0, k)
    else:
        ex = torch.randint(0, E, (T, k))
    ex = ex.to(torch.int32)
    if unassigned:
        ex[torch.rand(T, k) < unassigned] = -1
    return ex


# (T, k, E, capacity, unassigned fraction)
CASES = [
    pytest.param(0, 2, 4, None, 0.0, id="T0"),
    pytest.param(0, 2, 4, 3, 0.0, id="T0-cap"),
    pytest.param(1, 1, 1, None, 0.0, id="T1-E1"),
    pytest.param(7, 2, 4, None, 0.0, id="T7-E4-k2"),
    pytest.param(7, 4, 4, None, 0.0, id="T7-kE"),
    pytest.param(7, 4, 4, 2, 0.0, id="T7-kE-cap2"),
    pytest.param(13, 3, 16, None, 0.0, id="empty-experts"),
    pytest.param(64, 2, 8, 5, 0.0, id="tight"),
    pytest.param(64, 2, 8, 16, 0.0, id="exact"),
    pytest.param(64, 2, 8, 1000, 0.0, id="loose"),
    pytest.param(64, 2, 8, 0, 0.0, id="cap0"),
    pytest.param(33, 3, 5, 7, 0.2, id="unassigned-cap"),
    pytest.param(33, 3, 5, None, 0.3, id="unassigned"),
    pytest.param(50, 1, 1, 20, 0.0, id="E1-cap"),
]


@pytest.mark.parametrize("T,k,E,capacity,unassigned", CASES)
def test_make_plan_matches_reference(T, k, E, capacity, unassigned):
    ex = random_experts(T, k, E, unassigned=unassigned)
    got = ops.make_plan(ex, E, capacity=capacity)
    want = ref.make_plan(ex, E, capacity=capacity)
    for name in got._fields:
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("T,k,E,capacity,unassigned", CASES)
def test_make_plan_invariants(T, k, E, capacity, unassigned):
    ex = random_experts(T, k, E, unassigned=unassigned)
    p = ops.make_plan(ex, E, capacity=capacity)
    counts = p.tokens_per_expert()
    assert p.offsets[0] == 0 and (counts >= 0).all()
    if capacity is not None:
        assert (counts <= capacity).all()
    n = int(p.offsets[-1])
    assert n == int(p.kept.sum())
    assert (p.token[n:] == -1).all() and (p.slot[n:] == -1).all()
    # row and slot are inverse maps; every kept slot sits in its expert's range, in token order.
    for i in range(n):
        s = int(p.slot[i])
        assert int(p.row.flatten()[s]) == i and int(p.token[i]) == s // k
        e = int(ex.flatten()[s])
        assert p.offsets[e] <= i < p.offsets[e + 1]
    for e in range(E):
        seg = p.slot[p.offsets[e] : p.offsets[e + 1]]
        assert torch.equal(seg, seg.sort().values)


def test_make_plan_capacity_is_rank_major():
    # Expert 0 has room for 2. Token 2's first choice beats tokens 0 and 1's second choices.
    ex = torch.tensor([[1, 0], [2, 0], [0, 1]], dtype=torch.int32)
    p = ops.make_plan(ex, 3, capacity=2)
    assert p.kept.tolist() == [[True, True], [True, False], [True, True]]
    # Kept slots of expert 0 listed in token order: token 0 (second choice), then token 2.
    assert p.token[p.offsets[0] : p.offsets[1]].tolist() == [0, 2]


def test_make_plan_large_capacity_equals_no_capacity():
    ex = random_experts(40, 2, 6)
    a, b = ops.make_plan(ex, 6), ops.make_plan(ex, 6, capacity=80)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_make_plan_noncontiguous_input():
    ex = random_experts(20, 4, 8)
    strided = ex[:, ::2]
    assert not strided.is_contiguous()
    a, b = ops.make_plan(strided, 8, capacity=3), ops.make_plan(strided.contiguous(), 8, capacity=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("capacity", [None, 3])
@pytest.mark.parametrize("T,k,E", [(0, 2, 4), (9, 2, 4), (5, 3, 3)])
def test_make_plan_opcheck(T, k, E, capacity):
    ex = random_experts(T, k, E)
    torch.library.opcheck(torch.ops.smoe.make_plan.default, (ex, E), {"capacity": capacity})


def test_make_plan_compiles_without_graph_breaks():
    ex = random_experts(16, 2, 4)
    fn = torch.compile(
        lambda e: ops.make_plan(e, 4, capacity=5), fullgraph=True, backend="aot_eager"
    )
    assert all(torch.equal(x, y) for x, y in zip(fn(ex), ops.make_plan(ex, 4, capacity=5)))


def test_make_plan_is_deterministic():
    ex = random_experts(1000, 4, 32)
    a, b = ops.make_plan(ex, 32, capacity=100), ops.make_plan(ex, 32, capacity=100)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("value", [4, -2, 1000])
def test_make_plan_rejects_out_of_range_experts(value):
    ex = random_experts(5, 2, 4)
    ex[3, 1] = value
    with pytest.raises(
        RuntimeError, match=r"expert values must be in \[0, num_experts\).*\[3, 1\]"
    ):
        ops.make_plan(ex, 4)


def test_make_plan_rejects_negative_capacity():
    ex = random_experts(5, 2, 4)
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        ops.make_plan(ex, 4, capacity=-1)
    with pytest.raises(RuntimeError, match="capacity must be >= 0"):
        torch.ops.smoe.make_plan(ex, 4, capacity=-1)


def test_make_plan_rejects_bad_expert_tensor():
    with pytest.raises(RuntimeError, match="expert must be a 2-D int32"):
        ops.make_plan(torch.zeros(4, 2, dtype=torch.int64), 4)
    with pytest.raises(RuntimeError, match="expert must be a 2-D int32"):
        ops.make_plan(torch.zeros(4, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        ops.make_plan(torch.zeros(4, 2, dtype=torch.int32), 0)


@pytest.mark.cuda
@pytest.mark.parametrize("T,k,E,capacity,unassigned", CASES)
def test_make_plan_cuda_matches_cpu(T, k, E, capacity, unassigned):
    ex = random_experts(T, k, E, unassigned=unassigned)
    cpu = ops.make_plan(ex, E, capacity=capacity)
    gpu = ops.make_plan(ex.cuda(), E, capacity=capacity)
    for name in cpu._fields:
        assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name)), name


@pytest.mark.cuda
def test_make_plan_cuda_is_sync_free_and_deterministic():
    ex = random_experts(4096, 8, 64).cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        a = ops.make_plan(ex, 64, capacity=600)
        b = ops.make_plan(ex, 64, capacity=600)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---- Batch Prioritized Routing (specs/vmoe.md §3, §10) ----
BPR_CASES = [
    pytest.param(40, 1, 4, 6, "token", id="k1"),
    pytest.param(40, 2, 4, 12, "token", id="k2"),
    pytest.param(30, 4, 4, 20, "token", id="kE"),
    pytest.param(30, 2, 4, 9, "rank", id="per-rank-priority"),
    pytest.param(24, 2, 3, 0, "token", id="cap0"),
    pytest.param(16, 2, 8, 1, "token", id="empty-and-full-experts"),
]


def priorities(T, k, kind, ties):
    shape = (T,) if kind == "token" else (T, k)
    if ties:  # few distinct values: many ties, broken by the lower token index
        return torch.randint(0, 3, shape).float()
    return torch.rand(shape)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("T,k,E,capacity,kind", BPR_CASES)
def test_make_plan_bpr_matches_reference(T, k, E, capacity, kind, ties):
    ex = random_experts(T, k, E, unassigned=0.1)
    prio = priorities(T, k, kind, ties)
    got = ops.make_plan(ex, E, capacity=capacity, priority=prio)
    want = ref.make_plan(ex, E, capacity=capacity, priority=prio)
    for name in got._fields:
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_make_plan_bpr_keeps_highest_priority_within_each_expert_and_rank():
    T, k, E, cap = 60, 2, 4, 10
    ex = random_experts(T, k, E)
    prio = torch.rand(T)
    p = ops.make_plan(ex, E, capacity=cap, priority=prio)
    for e in range(E):
        first = (ex[:, 0] == e).nonzero().flatten()  # rank 0 fills first, by priority
        kept_first = first[p.kept[first, 0]]
        dropped_first = first[~p.kept[first, 0]]
        if len(dropped_first):
            assert prio[kept_first].min() >= prio[dropped_first].max()
        # rank-major: no second choice kept where a first choice for e was dropped
        if len(dropped_first):
            assert not p.kept[:, 1][ex[:, 1] == e].any()


def test_make_plan_bpr_with_ample_capacity_equals_vanilla():
    ex = random_experts(50, 2, 4)
    a = ops.make_plan(ex, 4, capacity=100, priority=torch.rand(50))
    b = ops.make_plan(ex, 4, capacity=100)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_make_plan_bpr_ignores_priority_without_capacity():
    ex = random_experts(20, 2, 4)
    a, b = ops.make_plan(ex, 4, priority=torch.rand(20)), ops.make_plan(ex, 4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_make_plan_bpr_accepts_half_precision_and_noncontiguous_priority():
    ex = random_experts(30, 2, 4)
    prio = torch.rand(30, 4)[:, 1]
    a = ops.make_plan(ex, 4, capacity=8, priority=prio.half())
    b = ref.make_plan(ex, 4, capacity=8, priority=prio.half())
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_make_plan_bpr_opcheck():
    ex = random_experts(12, 2, 3)
    for prio in (torch.rand(12), torch.rand(12, 2)):
        torch.library.opcheck(
            torch.ops.smoe.make_plan.default, (ex, 3), {"capacity": 4, "priority": prio}
        )


def test_make_plan_rejects_bad_priority():
    ex = random_experts(5, 2, 4)
    with pytest.raises(RuntimeError, match=r"priority must be \[T\] = \[5\]"):
        ops.make_plan(ex, 4, capacity=2, priority=torch.rand(6))
    with pytest.raises(RuntimeError, match="priority must be float"):
        ops.make_plan(ex, 4, capacity=2, priority=torch.ones(5, dtype=torch.int64))
    nan = torch.rand(5)
    nan[3] = float("nan")
    with pytest.raises(RuntimeError, match="priority must not contain NaN"):
        ops.make_plan(ex, 4, capacity=2, priority=nan)


@pytest.mark.cuda
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("T,k,E,capacity,kind", BPR_CASES)
def test_make_plan_bpr_cuda_matches_cpu(T, k, E, capacity, kind, ties):
    ex = random_experts(T, k, E, unassigned=0.1)
    prio = priorities(T, k, kind, ties)
    cpu = ops.make_plan(ex, E, capacity=capacity, priority=prio)
    gpu = ops.make_plan(ex.cuda(), E, capacity=capacity, priority=prio.cuda())
    for name in cpu._fields:
        assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name)), name


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_make_plan_bpr_treats_signed_zeros_as_equal(device):
    # -0.0 and +0.0 are the same priority: ties go to the lower token on every device
    ex = torch.zeros(4, 1, dtype=torch.int32, device=device)
    prio = torch.tensor([-0.0, 0.0, 1.0, -1.0], device=device)
    plan = ops.make_plan(ex, 1, capacity=2, priority=prio)
    assert plan.kept.flatten().tolist() == [True, False, True, False]
    assert plan.token[:2].tolist() == [0, 2]  # kept slots listed in token order
