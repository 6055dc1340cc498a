"""Fuzz of topk_sigmoid (DeepSeek-V3's router) and its backward against smoe.reference_sigmoid:
experts exact where the op's float32 ranking and the reference's float64 one agree, else a valid
group-limited top-k up to the rounding of the ranking; weights by STYLE.md's rule at the op's
experts; float64 gradients; a bitwise rerun; fake vs real metadata; NaN logits refused."""

import pytest
import torch
from hypothesis import example, given

from smoe import ops
from smoe import reference_sigmoid as ref
from tests.fuzz.properties import (
    assert_fake_matches,
    assert_index_equal,
    assert_rerun_equal,
    assert_values,
    grads,
)
from tests.fuzz.strategies_sigmoid import (
    TopKSigmoidCase,
    build_sigmoid_inputs,
    topk_sigmoid_cases,
)
from tests.fuzz.values import Values, dtype_of, fuzz_settings, materialize

pytestmark = pytest.mark.fuzz


def rank_tolerance(dtype: torch.dtype, bias: torch.Tensor | None) -> float:
    """How far the op's ranking value s + bias may be from the float64 one: a few ulps of
    float32 (the op ranks 16-bit and float32 logits in float32), of float64 for float64 logits."""
    big = 1.0 + (0.0 if bias is None or not bias.numel() else bias.abs().max().item())
    return (1e-12 if dtype == torch.float64 else 2e-6) * big


def assert_valid_choice(expert, r64, n_group: int, topk_group: int, tol: float) -> None:
    """Every row's experts are distinct, best first, and a group-limited top-k of ``r64`` (the
    float64 s + bias) up to ``tol``: some topk_group groups holding them are the best groups by
    their top-2 sums (within 2 tol), and no expert of those groups that was left out ranks
    above a chosen one (within tol)."""
    T, E = r64.shape
    G, k = E // n_group, expert.shape[1]
    for t in range(T):
        chosen = expert[t].long()
        where = f"row {t}, experts {chosen.tolist()}"
        assert ((chosen >= 0) & (chosen < E)).all(), where
        assert len(set(chosen.tolist())) == k, f"{where}: an expert chosen twice"
        r = r64[t]
        rc = r[chosen]
        assert (rc[:-1] >= rc[1:] - tol).all(), f"{where}: not best first ({rc.tolist()})"
        low = rc.min().item()
        left = torch.ones(E, dtype=torch.bool)
        left[chosen] = False
        per_group = r.reshape(n_group, G)
        score = per_group.topk(min(2, G), dim=1).values.sum(1)
        best_left = torch.where(left.reshape(n_group, G), per_group, -torch.inf).max(1).values
        used = torch.zeros(n_group, dtype=torch.bool)
        used[chosen // G] = True
        n_used = int(used.sum())
        assert n_used <= topk_group, f"{where}: experts from {n_used} groups > {topk_group}"
        # Fill the kept set with the best-scoring groups whose experts may all be left out.
        harmless = ~used & (best_left <= low + tol)
        extra = torch.where(harmless, score, -torch.inf).sort(descending=True, stable=True)
        need = topk_group - n_used
        assert bool(harmless.sum() >= need), f"{where}: no valid set of {topk_group} groups"
        kept = used.clone()
        kept[extra.indices[:need]] = True
        if not kept.all():
            top_out = score[~kept].max().item()
            assert score[kept].min().item() >= top_out - 2 * tol, (
                f"{where}: a kept group scores {score[kept].min().item()!r} < a dropped group's "
                f"{top_out!r}"
            )
        worst = best_left[kept].max().item()
        assert worst <= low + tol, f"{where}: left out an expert ranked {worst!r} > {low!r}"


def weight_at(logits, expert, renormalize: bool, scale: float) -> torch.Tensor:
    """The reference's weights (float64 math, logits' dtype kept) at the given experts."""
    w = torch.sigmoid(logits.double()).gather(1, expert.long())
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * scale


@fuzz_settings()
@given(case=topk_sigmoid_cases)
# Found by the fuzz: logits from ~17 up saturate sigmoid to 1.0 in float32, so the op (ties to
# the lower index) and the float64 reference order experts (row 1: 4, 5, 7 vs 7, 5, 4) and keep
# groups (row 3 of the second: two groups of two saturated experts) differently, equally well.
@example(
    case=TopKSigmoidCase(
        T=2,
        n_group=2,
        G=4,
        topk_group=1,
        k=3,
        dtype="float32",
        renormalize=True,
        scale=2.5,
        layout="contiguous",
        logits=Values(seed=19, scale=10.0),
    )
)
@example(
    case=TopKSigmoidCase(
        T=4,
        n_group=4,
        G=2,
        topk_group=1,
        k=2,
        dtype="float32",
        renormalize=True,
        scale=2.5,
        layout="contiguous",
        logits=Values(seed=110, scale=10.0),
    )
)
def test_topk_sigmoid_fuzz(case):
    logits, bias = build_sigmoid_inputs(case)
    k, dt = case.k, dtype_of(case.dtype)
    kw = dict(
        n_group=case.n_group,
        topk_group=case.topk_group,
        renormalize=case.renormalize,
        scale=case.scale,
    )
    if case.T and bool(logits.isnan().any()):
        with pytest.raises(RuntimeError, match="logits must not be NaN"):
            ops.topk_sigmoid(logits, k, selection_bias=bias, **kw)
        return

    def run():
        return ops.topk_sigmoid(logits, k, selection_bias=bias, **kw)

    got, want = run(), ref.topk_sigmoid(logits, k, selection_bias=bias, **kw)
    assert got.weight.dtype == dt and got.weight.shape == (case.T, k)
    assert got.expert.dtype == torch.int32 and got.expert.shape == (case.T, k)
    agreed = torch.equal(got.expert, want.expert)
    if agreed:
        assert_index_equal(got.expert, want.expert, "expert")
        ref64 = ref.topk_sigmoid(logits.double(), k, selection_bias=bias, **kw).weight
        assert_values(got.weight, ref64, want.weight)
    else:
        # A tie or near-tie that the op's float32 ranking (float64 for float64 logits) resolves
        # otherwise than the reference's float64 one: the op's experts must still be a valid
        # choice up to that rounding, and carry the reference's weights.
        r64 = torch.sigmoid(logits.double())
        r64 = r64 if bias is None else r64 + bias.double()
        tol = rank_tolerance(dt, bias)
        assert_valid_choice(got.expert, r64, case.n_group, case.topk_group, tol)
        ref64 = weight_at(logits, got.expert, case.renormalize, case.scale)
        assert_values(got.weight, ref64, ref64.to(dt))
    assert_rerun_equal(run, got)
    op = torch.ops.smoe.topk_sigmoid.default
    assert_fake_matches(op, (logits, k, bias), kw, got)

    g = materialize(Values(case.logits.seed + 1), (case.T, k), dt, 1.0)
    backward = torch.ops.smoe.topk_sigmoid_backward.default
    args = (g, logits, got.expert, case.renormalize, case.scale)
    grad = backward(*args)
    assert grad.dtype == dt and grad.shape == logits.shape
    assert_rerun_equal(lambda: backward(*args), grad)
    assert_fake_matches(backward, args, {}, grad)
    if dt == torch.float64:
        (mine,) = grads(
            lambda x: ops.topk_sigmoid(x, k, selection_bias=bias, **kw).weight, [logits], g
        )
        if agreed:
            fn = lambda x: ref.topk_sigmoid(x, k, selection_bias=bias, **kw).weight  # noqa: E731
        else:  # the reference's weights through the op's experts
            fn = lambda x: weight_at(x, got.expert, case.renormalize, case.scale)  # noqa: E731
        (theirs,) = grads(fn, [logits], g)
        assert_values(mine, theirs)
