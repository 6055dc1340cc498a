"""V-MoE routing (specs/vmoe.md): capacity, per-group plans with Batch Prioritized Routing, and
the importance and load losses. The router and the layer built on them: test_vmoe_layer.py."""

import math

import pytest
import torch

from smoe import (
    importance_loss,
    load_loss,
    make_plan,
    vmoe_capacity,
)
from smoe import reference as ref
from tests.ops.test_make_plan import random_experts


# ---------------------------------------------------------------------------------------------
# capacity (§3)
# ---------------------------------------------------------------------------------------------
def test_vmoe_capacity_spec_example():
    assert vmoe_capacity(400, 8, 2, 1.05) == 108  # ceil(105) = 105 -> multiple of 4
    assert vmoe_capacity(400, 8, 2, 1.05, multiple_of=None) == 105
    assert vmoe_capacity(400, 8, 2, 1.05, rounding="round", multiple_of=None) == 105
    assert vmoe_capacity(400, 8, 2, 1.05, rounding="round", multiple_of=None) == 105


@pytest.mark.parametrize("S,E,k,C", [(400, 8, 2, 1.05), (50, 8, 1, 0.1), (37, 5, 3, 0.7)])
def test_vmoe_capacity_matches_reference_and_formulas(S, E, k, C):
    assert vmoe_capacity(S, E, k, C) == ref.vmoe_capacity(S, E, k, C)
    raw = k * S * C / E
    assert vmoe_capacity(S, E, k, C, multiple_of=None) == math.ceil(raw)
    assert vmoe_capacity(S, E, k, C, rounding="round", multiple_of=None) == round(raw)
    assert vmoe_capacity(S, E, k, C) % 4 == 0


def test_vmoe_capacity_padding_inflates_small_capacities():
    # k S C / E = 0.625 -> ceil 1 -> padded to 4: the effective capacity is 6.4x the asked one
    assert vmoe_capacity(50, 8, 1, 0.1) == 4
    assert vmoe_capacity(50, 8, 1, 0.1, multiple_of=None) == 1


def test_vmoe_capacity_rejects_bad_input():
    with pytest.raises(ValueError, match="expert capacity 0 < 1"):
        vmoe_capacity(50, 8, 1, 0.05, rounding="round", multiple_of=None)
    with pytest.raises(ValueError, match="rounding must be one of"):
        vmoe_capacity(50, 8, 1, 1.0, rounding="floor")
    with pytest.raises(ValueError, match="multiple_of must be >= 1"):
        vmoe_capacity(50, 8, 1, 1.0, multiple_of=0)
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        vmoe_capacity(50, 8, 1, 0.0)


# ---------------------------------------------------------------------------------------------
# per-group plans (§2, §3)
# ---------------------------------------------------------------------------------------------
GROUP_CASES = [
    pytest.param(20, 2, 5, 6, 2, id="T20-S6-short-last"),
    pytest.param(24, 2, 4, 8, 3, id="T24-S8"),
    pytest.param(7, 1, 3, 3, 1, id="T7-k1-S3"),
    pytest.param(9, 3, 3, 4, 2, id="T9-kE-S4"),
    pytest.param(10, 2, 4, 20, 3, id="S-above-T"),
    pytest.param(12, 2, 4, 4, 0, id="cap0"),
    pytest.param(0, 2, 4, 4, 2, id="T0"),
]


@pytest.mark.parametrize("priority", [None, "max", "per-rank"])
@pytest.mark.parametrize("T,k,E,S,cap", GROUP_CASES)
def test_grouped_make_plan_matches_reference(T, k, E, S, cap, priority):
    ex = random_experts(T, k, E, unassigned=0.1)
    prio = None
    if priority == "max":
        prio = torch.rand(T).round(decimals=1)  # ties, broken by token index
    elif priority == "per-rank":
        prio = torch.rand(T, k)
    got = make_plan(ex, E, capacity=cap, priority=prio, group_size=S)
    want = ref.make_plan(ex, E, capacity=cap, priority=prio, group_size=S)
    for name in got._fields:
        assert torch.equal(getattr(got, name), getattr(want, name)), name


@pytest.mark.parametrize("T,k,E,S,cap", GROUP_CASES)
def test_grouped_make_plan_never_exceeds_capacity_per_group(T, k, E, S, cap):
    ex = random_experts(T, k, E)
    plan = make_plan(ex, E, capacity=cap, priority=torch.rand(T), group_size=S)
    kept_expert = torch.where(plan.kept, ex, -1)
    for g0 in range(0, T, S):
        counts = torch.bincount(kept_expert[g0 : g0 + S].flatten() + 1, minlength=E + 1)[1:]
        assert (counts <= cap).all()
    # rank-major: no second choice of an expert kept in a group where a first choice was dropped
    for g0 in range(0, T, S):
        blk, kb = ex[g0 : g0 + S], plan.kept[g0 : g0 + S]
        for e in range(E):
            first_dropped = ((blk[:, 0] == e) & ~kb[:, 0]).any()
            later_kept = ((blk[:, 1:] == e) & kb[:, 1:]).any()
            assert not (first_dropped and later_kept)


def test_grouped_make_plan_bpr_keeps_highest_priority_tokens():
    # one expert, capacity 2 per group of 4: each group keeps its two highest-priority tokens
    ex = torch.zeros(8, 1, dtype=torch.int32)
    prio = torch.tensor([0.1, 0.9, 0.5, 0.5, 0.7, 0.2, 0.3, 0.8])
    plan = make_plan(ex, 1, capacity=2, priority=prio, group_size=4)
    assert plan.kept.flatten().tolist() == [False, True, True, False, True, False, False, True]
    vanilla = make_plan(ex, 1, capacity=2, group_size=4)
    assert vanilla.kept.flatten().tolist() == [True, True, False, False, True, True, False, False]
    assert plan.token[: int(plan.offsets[1])].tolist() == [1, 2, 4, 7]  # token order


def test_grouped_make_plan_without_drops_equals_ungrouped():
    ex = random_experts(30, 2, 4)
    a = make_plan(ex, 4, capacity=100, group_size=7)
    b = make_plan(ex, 4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_grouped_make_plan_rejects_bad_input():
    ex = random_experts(10, 2, 4)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        make_plan(ex, 4, capacity=2, group_size=0)
    ex[3, 1] = 9  # out of range: rejected, not wrapped into another group's bucket
    with pytest.raises(RuntimeError, match=r"expert values must be in .*at \[3, 1\]"):
        make_plan(ex, 4, capacity=2, group_size=4)
    with pytest.raises(RuntimeError, match="expert must be a 2-D int32"):
        make_plan(ex.long(), 4, capacity=2, group_size=4)


def test_grouped_make_plan_compiles_without_graph_breaks():
    ex = random_experts(21, 2, 4)
    prio = torch.rand(21)
    fn = torch.compile(
        lambda e, p: make_plan(e, 4, capacity=3, priority=p, group_size=8),
        fullgraph=True,
        backend="aot_eager",
    )
    want = make_plan(ex, 4, capacity=3, priority=prio, group_size=8)
    assert all(torch.equal(x, y) for x, y in zip(fn(ex, prio), want))


@pytest.mark.cuda
@pytest.mark.parametrize("T,k,E,S,cap", GROUP_CASES)
def test_grouped_make_plan_cuda_matches_cpu(T, k, E, S, cap):
    ex = random_experts(T, k, E, unassigned=0.1)
    prio = torch.rand(T)
    cpu = make_plan(ex, E, capacity=cap, priority=prio, group_size=S)
    gpu = make_plan(ex.cuda(), E, capacity=cap, priority=prio.cuda(), group_size=S)
    for name in cpu._fields:
        assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name)), name


# ---------------------------------------------------------------------------------------------
# losses (§4)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [None, 5, 8])
def test_importance_and_load_losses_match_reference(group_size):
    logits = torch.randn(21, 6, dtype=torch.float64)
    noisy = logits + torch.randn_like(logits) / 6
    torch.testing.assert_close(
        importance_loss(logits, group_size=group_size).double(),
        ref.importance_loss(logits, group_size=group_size),
        rtol=1e-6,
        atol=1e-7,
    )
    torch.testing.assert_close(
        load_loss(logits, noisy, 2, 1 / 6, group_size=group_size).double(),
        ref.load_loss(logits, noisy, 2, 1 / 6, group_size=group_size),
        rtol=1e-6,
        atol=1e-7,
    )


def test_importance_loss_spec_values():
    E = 5
    assert importance_loss(torch.zeros(10, E)).item() == pytest.approx(0.0, abs=1e-12)
    onehot = torch.full((10, E), -1e4)
    onehot[:, 2] = 0.0
    assert importance_loss(onehot).item() == pytest.approx(E - 1)


def test_load_loss_threshold_is_kth_noisy_logit_without_exclusion():
    # one token, E = 3, k = 1: threshold = the largest noisy logit, for every expert (itself too)
    clean = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)
    noisy = torch.tensor([[0.5, 0.2, 3.0]], dtype=torch.float64)
    sigma = 0.5
    P = 1 - torch.distributions.Normal(0.0, 1.0).cdf((3.0 - clean) / sigma)
    load = P[0]
    want = ((load - load.mean()) ** 2).mean() / load.mean() ** 2
    torch.testing.assert_close(load_loss(clean, noisy, 1, sigma).double(), want)


def test_load_loss_gradcheck_wrt_router_weights():
    x = torch.randn(12, 5, dtype=torch.float64)
    W = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(12, 4, dtype=torch.float64) / 4

    def fn(W):
        logits = x @ W.T
        return load_loss(logits, logits + noise, 2, 0.25, group_size=5)

    # noise fixed (§10.8); gradient through Phi and through the threshold's gather (§8)
    assert fn(W).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (W,))
    assert torch.autograd.gradcheck(lambda W: importance_loss(x @ W.T, group_size=5), (W,))


def test_losses_reject_bad_input_and_handle_no_tokens():
    z = torch.zeros(0, 4)
    assert importance_loss(z).item() == 0.0 and load_loss(z, z, 2, 0.25).item() == 0.0
    with pytest.raises(ValueError, match="noise_std must be > 0"):
        load_loss(torch.zeros(3, 4), torch.zeros(3, 4), 2, 0.0)
    with pytest.raises(ValueError, match="k must be in"):
        load_loss(torch.zeros(3, 4), torch.zeros(3, 4), 5, 0.1)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        importance_loss(torch.zeros(3, 4), group_size=0)
