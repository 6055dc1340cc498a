"""Fuzz of the Sinkhorn op and its backward against smoe.reference.sinkhorn (float64, the op's
iteration order, on the same rounded inputs): values by STYLE.md's rule with the conditioning of
S = scores / eps, the rows carrying their mass after every iteration, the reported residuals,
float64-oracle gradients through the unrolled iterations, a bitwise rerun, fake vs real."""

import pytest
import torch
from hypothesis import example, given

from smoe import ops
from smoe import reference as ref
from tests.fuzz.properties import (
    assert_fake_matches,
    assert_grads,
    assert_rerun_equal,
    assert_values,
)
from tests.fuzz.strategies_sinkhorn import (
    SinkhornCase,
    build_sinkhorn_scores,
    sinkhorn_cases,
    sinkhorn_masses,
)
from tests.fuzz.values import Values, fuzz_settings, materialize
from tests.helpers import TOL

pytestmark = pytest.mark.fuzz


@fuzz_settings()
@given(case=sinkhorn_cases)
# float32 scores of 1e4 at eps = 0.3 (|S| = 33333, ulp 0.004): gradients off by 0.027 of ~6,
# the rounding of S (the op in float64 equals the reference); found by a 1000-example run
@example(
    case=SinkhornCase(
        T=13, E=1, dtype="float32", eps=0.3, max_iter=5, tol=0.0, check_every=1,
        marginals="ssr", layout="contiguous",
        scores=Values(seed=0, scale=1.0, grid=False, specials=("zero", "large"), density=0.5,
                      dup_rows=False),
    )
)  # fmt: skip
def test_sinkhorn_fuzz(case):
    scores = build_sinkhorn_scores(case)
    row_mass, col_mass = sinkhorn_masses(case)
    out_dt = torch.float64 if scores.dtype == torch.float64 else torch.float32
    T, E = case.T, case.E
    kwargs = dict(
        eps=case.eps,
        max_iter=case.max_iter,
        tol=case.tol,
        row_mass=row_mass,
        col_mass=col_mass,
        check_every=case.check_every,
    )

    def run():
        return ops.sinkhorn(scores, **kwargs)

    got = run()
    n = int(got.iters_done)
    assert got.log_plan.shape == (T, E) and got.log_plan.dtype == out_dt
    assert 0 <= n <= case.max_iter and (n >= 1) == (T > 0)
    if case.tol == 0 and T:
        assert n == case.max_iter
    for name, t in zip(got._fields, got):
        assert not t.isnan().any(), f"NaN in {name}"
    assert_rerun_equal(run, got)
    raw = torch.ops.smoe.sinkhorn.default(scores, **kwargs)
    assert_fake_matches(torch.ops.smoe.sinkhorn.default, (scores,), kwargs, raw)
    if T == 0:
        return
    # against float64 math on the same inputs, the iterations the op ran
    lp, f, g = ref.sinkhorn(
        scores.double(), eps=case.eps, max_iter=n, row_mass=row_mass, col_mass=col_mass
    )
    # rounding S = scores / eps to float32 costs ~|S| ulp per entry, and every potential is a
    # log-sum-exp over such entries: the error scale is max |S|, and the potentials (defined up
    # to a shared constant, which no iteration pins down) gather it over the n iterations
    cond = (scores.double().abs().max() / case.eps).expand(T, E)
    drift = cond * (1 + n / 4)
    assert_values(got.log_plan, lp, scale=drift)
    assert_values(got.f, f, scale=drift[:, 0])
    assert_values(got.g, g, scale=drift[0])
    # every iteration ends with the row update: the rows carry their mass up to rounding, which
    # is that of log_plan = f + S + g: ~ulp(max |S|) absolute in the exponent
    plan = got.log_plan.double().exp()
    rows = plan.sum(1)
    ulp = torch.finfo(out_dt).eps
    lim = E * (100 * ulp) + 8 * ulp * cond.max().item()
    assert ((rows - row_mass).abs() <= lim * row_mass).all(), "a row lost its mass"
    col = T * row_mass / E if col_mass is None else col_mass
    col_err = torch.linalg.vector_norm(plan.sum(0) - col)
    assert abs(col_err.item() - got.col_err.item()) <= 4 * lim * col * E + 1e-12
    if case.tol > 0 and n < case.max_iter:
        assert got.row_err.item() <= case.tol and got.col_err.item() <= case.tol

    # gradients through sinkhorn_backward vs autograd through the reference (all three outputs)
    up = materialize(Values(case.scores.seed + 1), (T, E + 1), out_dt, 1.0)
    upstream = torch.cat([up, materialize(Values(case.scores.seed + 2), (1, E + 1), out_dt, 1.0)])

    def pack(lp_, f_, g_):  # [T + 1, E + 1]: the plan and f beside it, g below
        top = torch.cat([lp_, f_[:, None]], dim=1)
        return torch.cat([top, torch.cat([g_, g_.new_zeros(1)])[None]], dim=0)

    def op_fn(s):
        o = ops.sinkhorn(s, **kwargs)
        return pack(o.log_plan, o.f, o.g)

    def ref_fn(s):
        return pack(
            *ref.sinkhorn(s, eps=case.eps, max_iter=n, row_mass=row_mass, col_mass=col_mass)
        )

    # each gradient entry sums up to n (T + E) softmax-weighted upstream terms over eps, and its
    # rounding error is relative to that sum times S's conditioning: S rounds to out_dt with an
    # absolute error of ~ulp * max |S|, and every softmax weight inherits it as a relative error.
    # In TOL's rtol units that is ulp / rtol * cond; the former factor, 1e-3 * cond, undercounted
    # float32's ulp / rtol (1.2e-2) and failed a draw whose op equals the reference in float64
    ulp_in_rtol = torch.finfo(out_dt).eps / TOL[out_dt]["rtol"]
    gscale = upstream.double().abs().sum() / case.eps * (1 + ulp_in_rtol * cond.max())
    assert_grads(op_fn, ref_fn, [scores], upstream, scales=[gscale.expand(T, E)])

    # the backward op itself: a bitwise rerun and its fake kernel
    backward = torch.ops.smoe.sinkhorn_backward.default
    args = (
        up[:, :E].contiguous(),
        up[:, E].contiguous(),
        upstream[T, :E].contiguous(),
        scores,
        raw[6],
        raw[7],
        raw[3],
        case.eps,
    )
    grad = backward(*args)
    assert_rerun_equal(lambda: backward(*args), grad)
    assert_fake_matches(backward, args, {}, grad)
    assert not grad.isnan().any(), "NaN gradient"
