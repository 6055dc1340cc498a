"""Fuzz of the X-MoE op (cosine_scores) and its backward against smoe.reference.cosine_scores:
values by STYLE.md's rule against float64 math on the same (rounded) inputs, the spec's
properties (cos in [-1, 1] when normalised, no NaN, a zero vector scores 0), float64-oracle
gradients (τ included), a bitwise rerun, fake vs real metadata."""

import pytest
import torch
from hypothesis import given

from smoe import ops
from smoe import reference as ref
from tests.fuzz.properties import (
    assert_fake_matches,
    assert_grads,
    assert_rerun_equal,
    assert_values,
    grads,
)
from tests.fuzz.strategies_xmoe import build_cosine_inputs, cosine_scores_cases
from tests.fuzz.values import Values, dtype_of, fuzz_settings, materialize

pytestmark = pytest.mark.fuzz


def condition(h, proj, emb, eps: float, normalize: bool) -> torch.Tensor:
    """``[T, N]``: the magnitude scale of cos's rounding error (see assert_values' ``scale``):
    ``z = h projᵀ`` is a sum of products whose float32 error is relative to ``|h| |proj|ᵀ``, so
    the normalised ``ẑ`` is off by that over ``max(‖z‖, eps)``; unnormalised, cos = ``z · ê`` is
    off relative to ``|h| |proj|ᵀ |ê|``."""
    h, proj, emb = h.double(), proj.double(), emb.double()
    a = h.abs() @ proj.abs().T
    e_hat = emb / torch.linalg.vector_norm(emb, dim=-1, keepdim=True).clamp_min(eps)
    if not normalize:
        return a @ e_hat.abs().T
    z = torch.linalg.vector_norm(h @ proj.T, dim=-1, keepdim=True).clamp_min(eps)
    return (torch.linalg.vector_norm(a, dim=-1, keepdim=True) / z).expand(-1, emb.shape[0])


@fuzz_settings()
@given(case=cosine_scores_cases)
def test_cosine_scores_fuzz(case):
    h, proj, emb, tau = build_cosine_inputs(case)
    eps, norm, dt = case.eps, case.normalize_tokens, dtype_of(case.dtype)
    out = torch.float64 if dt == torch.float64 else torch.float32
    T, N = case.T, case.N

    def run():
        return ops.cosine_scores(h, proj, emb, tau, eps=eps, normalize_tokens=norm)

    got = run()
    assert got.cos.dtype == got.logits.dtype == out
    assert got.cos.shape == got.logits.shape == (T, N)
    assert not got.cos.isnan().any() and not got.logits.isnan().any()
    want = ref.cosine_scores(h, proj, emb, tau, eps=eps, normalize_tokens=norm)  # same inputs
    cond = condition(h, proj, emb, eps, norm)
    tau_c = max(case.tau, 1e-4)
    # outputs are float32 (float64) for every input dtype: float32's (float64's) rule applies
    assert_values(got.cos, want.cos.double(), scale=cond)
    assert_values(got.logits, want.logits.double(), scale=cond / tau_c)
    if norm:
        assert (got.cos.abs() <= 1 + 4 * torch.finfo(out).eps).all(), "a cosine outside [-1, 1]"
    # specs/xmoe.md §8: a zero token (normalised or not) or a zero expert scores exactly 0
    if T:
        assert (got.cos[(h == 0).all(dim=1)] == 0).all(), "a zero token scored non-zero"
    assert (got.cos[:, (emb == 0).all(dim=1)] == 0).all(), "a zero expert scored non-zero"
    assert_rerun_equal(run, got)
    op = torch.ops.smoe.cosine_scores.default
    kwargs = {"eps": eps, "normalize_tokens": norm}
    assert_fake_matches(op, (h, proj, emb, tau), kwargs, tuple(got))

    # gradients through the op's autograd (cosine_scores_backward) vs autograd through the
    # reference, both outputs pulled back at once; the logits' upstream is scaled by τ so that
    # its gradients are of the cos's size
    g_cos = materialize(Values(case.h.seed + 1), (T, N), out, 1.0)
    g_logits = materialize(Values(case.h.seed + 2), (T, N), out, 1.0) * tau_c
    upstream = torch.cat([g_cos, g_logits], dim=1)

    def op_fn(*a):
        return torch.cat(ops.cosine_scores(*a, eps=eps, normalize_tokens=norm), dim=1)

    def ref_fn(*a):
        return torch.cat(ref.cosine_scores(*a, eps=eps, normalize_tokens=norm), dim=1)

    inputs = (h, proj, emb, tau)
    theirs = grads(ref_fn, [t.double() for t in inputs], upstream.double())
    # A nonlinear op: each gradient's magnitude is that of the reference gradient, its rounding
    # error grows with cos's conditioning; τ's gradient -Σ g_l cos / τ² is a sum over T N terms.
    grow = 10 + (float(cond.max()) if cond.numel() else 0.0)
    scales = [t.abs().max() * grow if t.numel() else None for t in theirs[:3]]
    c64 = want.cos.double()
    g_l = g_logits.double().abs()
    scales.append((g_l * (c64.abs() + cond)).sum() / tau_c**2 if case.tau > 1e-4 else None)
    assert_grads(op_fn, ref_fn, inputs, upstream, scales=scales)
    if case.tau < 1e-4:  # τ clamped: no gradient
        (g_tau,) = grads(lambda t: op_fn(h, proj, emb, t), [tau], upstream)
        assert g_tau.item() == 0.0

    # the backward op itself: a bitwise rerun and its fake kernel
    backward = torch.ops.smoe.cosine_scores_backward.default
    args = (g_cos, g_logits, h, proj, emb, tau, eps, norm)
    grad = backward(*args)
    assert_rerun_equal(lambda: backward(*args), grad)
    assert_fake_matches(backward, args, {}, grad)
    assert all(not x.isnan().any() for x in grad), "NaN gradient"
