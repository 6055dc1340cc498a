"""Fuzz of the routing ops (topk_softmax, expert_choice) and their backwards against
smoe.reference: index outputs exact, values by STYLE.md's rule, float64 gradients, a bitwise rerun,
fake vs real metadata."""

import pytest
import torch
from hypothesis import example, given

from smoe import ops
from smoe import reference as ref
from tests.fuzz.properties import (
    assert_fake_matches,
    assert_index_equal,
    assert_rerun_equal,
    assert_values,
    grads,
)
from tests.fuzz.strategies import (
    ExpertChoiceCase,
    TopKCase,
    Values,
    build_logits,
    dtype_of,
    expert_choice_cases,
    materialize,
    topk_cases,
)
from tests.fuzz.values import fuzz_settings

pytestmark = pytest.mark.fuzz


def upstream(seed: int, shape, dtype: torch.dtype) -> torch.Tensor:
    """A gradient to pull back: normal values, drawn from the case's seed."""
    return materialize(Values(seed + 1), shape, dtype, 1.0)


@fuzz_settings()
@given(case=topk_cases)
# Found by the fuzz: a row of only -inf has no probability to select by; the op refuses it.
@example(
    case=TopKCase(
        T=1,
        E=1,
        k=1,
        dtype="float64",
        renormalize=False,
        layout="contiguous",
        logits=Values(0, specials=("neg_inf",), density=1.0),
    )
)
def test_topk_softmax_fuzz(case):
    logits = build_logits(case.T, case.E, case.dtype, case.layout, case.logits)
    k, renorm, dt = case.k, case.renormalize, dtype_of(case.dtype)
    if case.T and bool((logits == -torch.inf).all(dim=1).any()):  # no probability to select by
        with pytest.raises(RuntimeError, match="logits"):
            ops.topk_softmax(logits, k, renormalize=renorm)
        return

    def run():
        return ops.topk_softmax(logits, k, renormalize=renorm)

    got, want = run(), ref.topk_softmax(logits, k, renormalize=renorm)
    assert_index_equal(got.expert, want.expert, "expert")
    ref64 = ref.topk_softmax(logits.double(), k, renormalize=renorm).weight
    assert got.weight.dtype == dt
    assert_values(got.weight, ref64, want.weight)
    assert_rerun_equal(run, got)
    assert_fake_matches(
        torch.ops.smoe.topk_softmax.default, (logits, k), {"renormalize": renorm}, got
    )

    g = upstream(case.logits.seed, (case.T, k), dt)
    backward = torch.ops.smoe.topk_softmax_backward.default
    args = (g, logits, got.expert, renorm)
    grad = backward(*args)
    assert_rerun_equal(lambda: backward(*args), grad)
    assert_fake_matches(backward, args, {}, grad)
    if dt == torch.float64:
        (mine,) = grads(lambda x: ops.topk_softmax(x, k, renormalize=renorm).weight, [logits], g)
        (theirs,) = grads(lambda x: ref.topk_softmax(x, k, renormalize=renorm).weight, [logits], g)
        assert_values(mine, theirs)


def group_ranges(T: int, S: int | None) -> list[tuple[int, int]]:
    step = T if S is None else S
    return [(a, min(a + step, T)) for a in range(0, T, max(step, 1))]


def assert_top_capacity_sets(kept: torch.Tensor, p64: torch.Tensor, C: int, S, dt) -> None:
    """In every group, each expert took min(C, group size) tokens, none less probable than a
    token it left, up to the rounding of the kernel's softmax (float32 math below float64)."""
    rel, tiny = (1e-12, 1e-300) if dt == torch.float64 else (1e-5, 1e-37)
    for a, b in group_ranges(p64.shape[0], S):
        k, p = kept[a:b], p64[a:b]
        assert (k.sum(0) == min(C, b - a)).all(), "an expert took the wrong number of tokens"
        low = torch.where(k, p, torch.inf).min(0).values  # least probable chosen token
        high = torch.where(k, -torch.inf, p).max(0).values  # most probable token left out
        slack = rel * torch.maximum(low, high).clamp_min(0) + tiny
        bad = high > low + slack
        assert not bad.any(), f"expert {bad.nonzero()[0].item()} left a more probable token"


def plan_of_choice(kept: torch.Tensor, weight: torch.Tensor, C: int, S) -> ops.ExpertChoice:
    """The plan and weights the reference gives for these chosen (token, expert) pairs."""
    T, E = kept.shape
    tokens = [t for e in range(E) for t in range(T) if kept[t, e]]
    experts = [e for e in range(E) for t in range(T) if kept[t, e]]
    per = sum(min(C, b - a) for a, b in group_ranges(T, S))
    row = torch.full((T, E), -1, dtype=torch.int32)
    for i, (t, e) in enumerate(zip(tokens, experts)):
        row[t, e] = i
    plan = ops.Plan(
        offsets=torch.arange(E + 1, dtype=torch.int64) * per,
        token=torch.tensor(tokens, dtype=torch.int32),
        slot=torch.tensor([t * E + e for t, e in zip(tokens, experts)], dtype=torch.int32),
        row=row,
        kept=kept.clone(),
    )
    return ops.ExpertChoice(torch.where(kept, weight, 0.0), plan)


@fuzz_settings()
@given(case=expert_choice_cases)
# Found by the fuzz: two rows holding the same logits in another order tie in exact arithmetic,
# but torch.softmax's float64 sum rounds them 1 ulp apart; the kernel keeps the tie (lower token).
@example(
    case=ExpertChoiceCase(
        T=2,
        E=9,
        capacity=1,
        group_size=None,
        dtype="float64",
        layout="contiguous",
        logits=Values(seed=1, specials=("zero", "one"), density=1.0),
    )
)
def test_expert_choice_fuzz(case):
    logits = build_logits(case.T, case.E, case.dtype, case.layout, case.logits)
    C, S, dt = case.capacity, case.group_size, dtype_of(case.dtype)
    if case.T and bool((logits == -torch.inf).all(dim=1).any()):
        with pytest.raises(RuntimeError, match="logits"):
            ops.expert_choice(logits, C, group_size=S)
        return

    def run():
        return ops.expert_choice(logits, C, group_size=S)

    got, want = run(), ref.expert_choice(logits, C, group_size=S)
    p64 = torch.softmax(logits.double(), dim=-1)
    agreed = torch.equal(got.plan.kept, want.plan.kept)
    if not agreed:
        # A near-tie the reference's float64 softmax (other summation order) resolves otherwise:
        # the kernel's choice must still be a top-C set up to rounding; then the plan it implies.
        assert_top_capacity_sets(got.plan.kept, p64, C, S, dt)
        want = plan_of_choice(got.plan.kept, p64.to(dt), C, S)
    for name in got.plan._fields:
        assert_index_equal(getattr(got.plan, name), getattr(want.plan, name), name)
    ref64 = torch.where(got.plan.kept, p64, 0.0)
    assert got.weight.dtype == dt
    assert_values(got.weight, ref64, want.weight)
    assert_rerun_equal(run, got)
    real = (got.weight, *got.plan[:4])  # the op's outputs; kept is the wrapper's row >= 0
    assert_fake_matches(torch.ops.smoe.expert_choice.default, (logits, C), {"group_size": S}, real)

    g = upstream(case.logits.seed, (case.T, case.E), dt)
    backward = torch.ops.smoe.expert_choice_backward.default
    args = (g, logits, got.plan.row)
    grad = backward(*args)
    assert_rerun_equal(lambda: backward(*args), grad)
    assert_fake_matches(backward, args, {}, grad)
    if dt == torch.float64:
        (mine,) = grads(lambda x: ops.expert_choice(x, C, group_size=S).weight, [logits], g)
        if agreed:
            (theirs,) = grads(lambda x: ref.expert_choice(x, C, group_size=S).weight, [logits], g)
        else:  # the reference's weight through the kernel's choice
            (theirs,) = grads(lambda x: torch.where(got.plan.kept, x.softmax(-1), 0), [logits], g)
        assert_values(mine, theirs)
