import math

import pytest
import torch

from smoe import TopKRouter, ops, router_z_loss, switch_balance_loss
from smoe import reference as ref


def test_router_matches_topk_softmax_on_its_logits():
    r = TopKRouter(16, 8, 2)
    x = torch.randn(30, 16)
    out = r(x)
    torch.testing.assert_close(out.logits, x @ r.weight.T)
    w, e = ops.topk_softmax(out.logits, 2)
    assert torch.equal(out.expert, e) and torch.equal(out.weight, w)
    assert out.weight.dtype == torch.float32


def test_sigmoid_gate_weights_the_softmax_selection_by_sigmoid_of_the_logit():
    torch.manual_seed(0)
    soft, sig = TopKRouter(16, 8, 2), TopKRouter(16, 8, 2, gate="sigmoid")
    sig.load_state_dict(soft.state_dict())
    x = torch.randn(30, 16, dtype=torch.float64)
    a, b = soft(x), sig(x)
    assert torch.equal(a.expert, b.expert)
    w = sig.weight.detach().double().requires_grad_()
    expected = torch.sigmoid(x @ w.T).gather(1, b.expert.long())
    torch.testing.assert_close(b.weight, expected)
    assert (b.weight.sum(-1) - 1).abs().max() > 0.1  # not renormalised
    b.weight.sum().backward()
    (grad,) = torch.autograd.grad(expected.sum(), w)
    torch.testing.assert_close(sig.weight.grad.double(), grad)


def test_router_is_fp32_under_bf16_autocast():
    r = TopKRouter(16, 4, 2)
    x = torch.randn(10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = r(x.bfloat16())
    assert out.logits.dtype == torch.float32 and out.weight.dtype == torch.float32
    torch.testing.assert_close(out.logits, x.bfloat16().float() @ r.weight.T)


def test_balance_loss_matches_reference_and_conventions():
    logits = torch.randn(50, 6)
    _, e = ops.topk_softmax(logits, 2)
    torch.testing.assert_close(
        switch_balance_loss(logits, e, 6).double(), ref.switch_balance_loss(logits, e, 6)
    )
    torch.testing.assert_close(
        switch_balance_loss(logits, e, 6, first_choice_only=True).double(),
        ref.switch_balance_loss(logits, e, 6, first_choice_only=True),
    )


def test_balance_loss_spec_values():
    E, k, T = 4, 2, 8
    # uniform probabilities and perfectly balanced choices: k under the default, 1 first-choice only
    logits = torch.zeros(T, E)
    e = torch.tensor([[t % E, (t + 1) % E] for t in range(T)], dtype=torch.int32)
    assert switch_balance_loss(logits, e, E).item() == pytest.approx(k)
    assert switch_balance_loss(logits, e, E, first_choice_only=True).item() == pytest.approx(1.0)
    # top-1, every token and all probability mass on one expert: E
    collapsed = torch.full((T, E), -1e4)
    collapsed[:, 0] = 0
    e0 = torch.zeros(T, 1, dtype=torch.int32)
    assert switch_balance_loss(collapsed, e0, E).item() == pytest.approx(E)


def test_balance_loss_equals_transformers():
    pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = torch.randn(64, 8)
    _, e = ops.topk_softmax(logits, 2)
    want = load_balancing_loss_func((logits,), num_experts=8, top_k=2)
    torch.testing.assert_close(switch_balance_loss(logits, e, 8), want)


def test_z_loss_value_and_gradient():
    E = 8
    assert router_z_loss(torch.zeros(5, E)).item() == pytest.approx(math.log(E) ** 2)
    h = torch.randn(6, E, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(router_z_loss(h), h)
    want = (2 / 6) * torch.logsumexp(h, -1, keepdim=True) * torch.softmax(h, -1)
    torch.testing.assert_close(g.double(), want.detach(), atol=1e-6, rtol=1e-5)


def test_noisy_router_eval_has_no_noise_and_uses_noise_in_training():
    r = TopKRouter(8, 4, 2, noisy=True)
    x = torch.randn(200, 8)
    r.eval()
    a, b = r(x), r(x)
    assert torch.equal(a.expert, b.expert)
    w, e = ops.topk_softmax(a.logits, 2, renormalize=True)
    assert torch.equal(a.expert, e) and torch.equal(a.weight, w)
    r.train()
    c = r(x)
    assert not torch.equal(c.expert, a.expert)  # noise std >= noise_epsilon... and W_noise=0 init
    assert c.weight.sum(-1).allclose(torch.ones(200))


def test_noisy_router_with_zero_weights_selects_uniformly_in_training():
    # specs/classic_routers.md §8.2: W_g = W_noise = 0 -> selection driven by noise alone.
    r = TopKRouter(8, 4, 1, noisy=True, noise_epsilon=1.0)
    torch.nn.init.zeros_(r.weight)
    counts = torch.bincount(r(torch.randn(4000, 8)).expert.flatten().long(), minlength=4)
    assert (counts > 800).all()
    r.eval()
    assert torch.allclose(r(torch.randn(5, 8)).weight, torch.ones(5, 1))


def test_router_rejects_bad_config():
    with pytest.raises(ValueError, match="k must be in"):
        TopKRouter(8, 4, 5)
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        TopKRouter(8, 0, 1)
    with pytest.raises(ValueError, match="jitter"):
        TopKRouter(8, 4, 1, jitter=1.5)
