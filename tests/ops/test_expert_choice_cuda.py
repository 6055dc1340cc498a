"""expert_choice on CUDA: parity with the CPU op over the shape table (plan and weights, and the
backward), determinism without a host sync, CUDA-graph capture and replay, exact ties. The CPU
tests and the shared shape table are test_expert_choice.py's."""

import pytest
import torch

from smoe import ops
from tests.helpers import CUDA_DTYPES, assert_close, capture_cuda_graph
from tests.ops.test_expert_choice import SHAPES, assert_same, separated_logits, tied_logits


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("T,E,C,S", SHAPES)
def test_expert_choice_cuda_matches_cpu(T, E, C, S, dtype):
    # CPU and CUDA sum the softmax in different orders, so probabilities equal to an ulp could
    # pick different tokens: the logits keep every two tokens' probabilities 1e-5 apart, 30x what
    # float32 softmaxes summed in other orders differ by (1e-4 is more than random logits at
    # E = 16, with many probabilities near 0, ever give: no draw was found).
    logits = separated_logits(T, E, S, margin=1e-5, dtype=dtype)
    cpu = ops.expert_choice(logits, C, group_size=S)
    gpu = ops.expert_choice(logits.cuda(), C, group_size=S)
    for name in cpu.plan._fields:
        assert torch.equal(getattr(gpu.plan, name).cpu(), getattr(cpu.plan, name)), name
    assert gpu.weight.dtype == dtype
    assert_close(gpu.weight.cpu(), cpu.weight)
    g = torch.randn(T, E).to(dtype)
    lg = logits.cuda().requires_grad_()
    (gg,) = torch.autograd.grad(ops.expert_choice(lg, C, group_size=S).weight, lg, g.cuda())
    lc = logits.clone().requires_grad_()
    (gc,) = torch.autograd.grad(ops.expert_choice(lc, C, group_size=S).weight, lc, g)
    assert_close(gg.cpu(), gc)


@pytest.mark.cuda
@pytest.mark.parametrize("S", [None, 1024])
def test_expert_choice_cuda_is_deterministic_and_sync_free(S):
    logits = tied_logits(4096, 64).cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        a = ops.expert_choice(logits, 128, group_size=S)
        b = ops.expert_choice(logits, 128, group_size=S)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_same(a, b)
    cpu = ops.expert_choice(logits.cpu(), 128, group_size=S)
    for name in cpu.plan._fields:
        assert torch.equal(getattr(a.plan, name).cpu(), getattr(cpu.plan, name)), name


@pytest.mark.cuda
def test_expert_choice_cuda_graph_capture_and_replay():
    static = torch.randn(300, 16, device="cuda")
    fn = lambda x: ops.expert_choice(x, 40, group_size=128)  # noqa: E731
    graph, captured = capture_cuda_graph(lambda: fn(static))
    for _ in range(2):
        fresh = torch.randn(300, 16, device="cuda")
        static.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        assert_same(captured, fn(fresh))


@pytest.mark.cuda
def test_expert_choice_cuda_exact_ties_match_cpu():
    logits = tied_logits(64, 8)  # exact ties in any summation order: both pick lower tokens
    cpu = ops.expert_choice(logits, 5, group_size=16)
    gpu = ops.expert_choice(logits.cuda(), 5, group_size=16)
    for name in cpu.plan._fields:
        assert torch.equal(getattr(gpu.plan, name).cpu(), getattr(cpu.plan, name)), name
