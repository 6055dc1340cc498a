"""The routers' backwards keep their relative accuracy near saturation, in every precision: a
weight that dominates (w_0 = 1 - 3e-22) or a sigmoid score next to 1 (1 - s = 4e-18) gives a
gradient that is tiny but not 0, within a few ulps of the float64 one (the kernels use forms that
do not cancel: STYLE.md §8). Split from tests/test_low_precision.py."""

from __future__ import annotations

import pytest
import torch

from smoe import ops
from tests.low_precision import oracle_ops
from tests.test_low_precision import DEVICES, LOW


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_softmax_backward_keeps_relative_accuracy_when_one_weight_dominates(
    renormalize, dtype, device
):
    # w_0 = 1 - 3e-22: the gradient of the first logit is tiny but not 0 (the kernel's
    # g_0 - sum_j g_j w_j cancelled to 0 in fp32 before it was rewritten). fp16 cannot hold
    # 1e-22: there w_0 = 1 - 2e-4.
    top = 9.0 if dtype == torch.float16 else 50.0
    logits = torch.tensor([[top, 0.0, -1.0]], dtype=torch.float64).to(dtype)
    grad = torch.tensor([[1.0, -2.0]], dtype=torch.float64).to(dtype)
    lg = logits.to(device).requires_grad_()
    weight = ops.topk_softmax(lg, 2, renormalize=renormalize).weight
    (got,) = torch.autograd.grad(weight, lg, grad.to(device))
    l64 = logits.double().requires_grad_()
    w64 = oracle_ops["topk_softmax"](l64, 2, renormalize=renormalize).weight
    (want,) = torch.autograd.grad(w64, l64, grad.double())
    assert (want[:, :2].abs() > 0).all()
    rel = ((got.cpu().double() - want).abs() / want.abs().clamp_min(1e-300)).max().item()
    assert rel <= 2 * torch.finfo(dtype).eps, f"relative error {rel}: {got} vs {want}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_sigmoid_backward_keeps_relative_accuracy_when_s_is_near_1(renormalize, dtype, device):
    # s = sigmoid(40) = 1 - 4e-18: s (1 - s) rounds to 0 through 1 - s, in float64 too; the kernel
    # takes 1 - s as sigmoid(-x). fp16 cannot hold 4e-18: there x = 9, 1 - s = 1.2e-4.
    top = 9.0 if dtype == torch.float16 else 40.0
    logits = torch.tensor([[top, 0.5, -1.0]], dtype=torch.float64).to(dtype)
    grad = torch.tensor([[1.0, -2.0]], dtype=torch.float64).to(dtype)
    lg = logits.to(device).requires_grad_()
    weight = ops.topk_sigmoid(lg, 2, renormalize=renormalize, scale=2.5).weight
    (got,) = torch.autograd.grad(weight, lg, grad.to(device))
    l64 = logits.double().requires_grad_()
    w64 = oracle_ops["topk_sigmoid"](l64, 2, renormalize=renormalize, scale=2.5).weight
    (want,) = torch.autograd.grad(w64, l64, grad.double())
    assert (want[:, :2].abs() > 0).all()
    rel = ((got.cpu().double() - want).abs() / want.abs().clamp_min(1e-300)).max().item()
    assert rel <= 4 * torch.finfo(dtype).eps, f"relative error {rel}: {got} vs {want}"


@pytest.mark.parametrize("device", DEVICES)
# (not float16: its smallest subnormal, 6e-8, is far above the 9.5e-14 gradient)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_sigmoid_backward_keeps_relative_accuracy_when_one_weight_dominates(dtype, device):
    # s = (0.88, 9.4e-14): w_0 = 1 - 1e-13; d l_0 = 9.5e-14 (c (g_j / S - dot / S^2) gave 0 in
    # fp32: the kernels sum the non-cancelling form sum_{l != j} s_l (g_j - g_l) + g_j 1e-20)
    logits = torch.tensor([[2.0, -30.0, -40.0]], dtype=torch.float64).to(dtype)
    grad = torch.tensor([[1.0, -2.0]], dtype=torch.float64).to(dtype)
    lg = logits.to(device).requires_grad_()
    weight = ops.topk_sigmoid(lg, 2, renormalize=True, scale=2.5).weight
    (got,) = torch.autograd.grad(weight, lg, grad.to(device))
    l64 = logits.double().requires_grad_()
    s = torch.sigmoid(l64[:, :2])
    want = (
        s[0, 1] * (grad[0, 0] - grad[0, 1]).double() / s.sum() ** 2 * 2.5 * s[0, 0] * (1 - s[0, 0])
    )
    got0 = got[0, 0].cpu().double()
    rel = ((got0 - want).abs() / want.abs()).item()
    assert rel <= 4 * torch.finfo(dtype).eps, (
        f"relative error {rel}: {got0.item()} vs {want.item()}"
    )
