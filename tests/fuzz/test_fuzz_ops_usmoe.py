"""Fuzz of unified_topk (USMoE's joint top-N per group) against smoe.reference_usmoe: the indices
exact (the op only compares scores, so it is exact in every dtype), and independently of the
oracle a valid joint top-N (spec §10.1, §10.4: ascending, the group's count, every chosen score
above every one left out, ties to the lower index); a bitwise rerun; fake vs real metadata; the
wrapper equal to the op; NaN scores refused, naming the first group that holds one."""

import pytest
import torch
from hypothesis import example, given

from smoe import ops
from smoe import reference_usmoe as ref
from tests.fuzz.properties import assert_fake_matches, assert_index_equal, assert_rerun_equal
from tests.fuzz.strategies_usmoe import UnifiedTopKCase, build_usmoe_inputs, unified_topk_cases
from tests.fuzz.values import Values, fuzz_settings

pytestmark = pytest.mark.fuzz


def assert_joint_topk(idx: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor | None):
    """Each group's row of ``idx [G, n]``: its count of distinct indices in ascending order, then
    -1; no score left out beats a chosen one, and a left-out score equal to the lowest chosen one
    sits at a higher index (ties to the lower index)."""
    G, n = idx.shape
    for g in range(G):
        c = n if counts is None else int(counts[g])
        row, s = idx[g], scores[g].double()
        where = f"group {g} (count {c}): {row.tolist()}"
        assert (row[c:] == -1).all(), f"{where}: not -1 past the count"
        chosen = row[:c]
        assert (chosen[1:] > chosen[:-1]).all(), f"{where}: not strictly ascending"
        assert ((chosen >= 0) & (chosen < s.numel())).all(), f"{where}: index out of range"
        if c == 0 or c == s.numel():
            continue
        left = torch.ones(s.numel(), dtype=torch.bool)
        left[chosen] = False
        low = s[chosen].min()
        assert s[left].max() <= low, f"{where}: left out {s[left].max().item()} > {low.item()}"
        tied_left = left.nonzero().flatten()[s[left] == low]
        tied_in = chosen[s[chosen] == low]
        if tied_left.numel():
            assert tied_left.min() > tied_in.max(), f"{where}: a tie went to the higher index"


@fuzz_settings()
@given(case=unified_topk_cases)
# Zeros of both signs only (they compare equal: index order decides), a group of only -inf
# (padding: the lowest indices), and +inf among ties.
@example(
    case=UnifiedTopKCase(
        G=3,
        S=4,
        E=3,
        n=5,
        dtype="float32",
        layout="contiguous",
        scores=Values(seed=1, specials=("zero", "neg_zero"), density=1.0),
        counts="random",
        counts_seed=2,
    )
)
@example(
    case=UnifiedTopKCase(
        G=2,
        S=5,
        E=2,
        n=7,
        dtype="bfloat16",
        layout="strided",
        scores=Values(seed=3, scale=0.1, grid=True, specials=("neg_inf",), density=0.5),
        overlay="pos_inf",
    )
)
@example(
    case=UnifiedTopKCase(
        G=2,
        S=3,
        E=2,
        n=4,
        dtype="float16",
        layout="transposed",
        scores=Values(seed=4, specials=("neg_inf",), density=1.0),
    )
)
def test_unified_topk_fuzz(case):
    scores, counts = build_usmoe_inputs(case)
    op = torch.ops.smoe.unified_topk.default
    nan = scores.isnan().any(dim=1)
    if bool(nan.any()):  # (n = 0 too: the scores are always scanned)
        first = int(nan.nonzero()[0, 0])
        with pytest.raises(
            RuntimeError, match=rf"scores must not be NaN, got NaN in group {first}\b"
        ):
            op(scores, case.n, counts)
        return

    def run():
        return op(scores, case.n, counts)

    got = run()
    assert_index_equal(got, ref.unified_topk(scores, case.n, counts=counts), "indices")
    assert got.is_contiguous()
    if not bool(nan.any()):
        assert_joint_topk(got, scores, counts)
    assert_rerun_equal(run, got)
    assert_fake_matches(op, (scores, case.n, counts), {}, got)
    assert torch.equal(ops.unified_topk(scores, case.n, counts=counts), got)
