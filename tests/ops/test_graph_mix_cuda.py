"""graph_mix and its backward on CUDA (specs/graph_routing.md §5): parity with the CPU op in every
dtype over a shape table (empty sizes, a cache, strided inputs, S = 1024), backward parity,
bitwise determinism, no host sync, CUDA-graph capture, lam = 0, errors.

Tolerances. Both devices sum in float32 (float64 for float64) from the same rounded inputs, in
the same k order but with different contraction (CUDA fuses a * b + c into FMAs): the sums differ
by float32 rounding, relative to the sum of the terms' magnitudes (the scale below), and
fp16/bf16 results may then round to neighbouring values (one ulp of their dtype)."""

from __future__ import annotations

import pytest
import torch

from smoe import ops
from tests.helpers import capture_cuda_graph, noncontig

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [  # (B, S, E, C)
    pytest.param(0, 3, 4, None, id="B0"),
    pytest.param(2, 0, 4, 3, id="S0-C3"),
    pytest.param(2, 1, 5, None, id="S1"),
    pytest.param(2, 7, 1, 2, id="E1-C2"),
    pytest.param(3, 33, 20, None, id="S33-E20"),
    pytest.param(2, 40, 70, 30, id="S40-E70-C30"),
    pytest.param(2, 1024, 16, None, id="S1024-E16"),
    pytest.param(1, 1024, 8, 512, id="S1024-E8-C512"),
]
REL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
OPTS = dict(self_coef=0.7, lam=1.3)


def _inputs(B, S, E, C, dtype, device="cpu", strided=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, S, E, generator=g)
    A = torch.softmax(2 * torch.randn(B, S, S + (C or 0), generator=g), dim=-1)
    cache = torch.randn(B, C, E, generator=g) if C is not None else None
    ts = [t.to(device=device, dtype=dtype) if t is not None else None for t in (x, A, cache)]
    if strided:
        ts = [noncontig(t) if t is not None and t.numel() and t.shape[-1] > 1 else t for t in ts]
    return ts


def _run(x, A, cache, up=None, **kw):
    """The output and, given the upstream gradient, the gradients of x and A."""
    x, A = x.detach().requires_grad_(), A.detach().requires_grad_()
    out = ops.graph_mix(x, A, cache=cache, **(OPTS | kw))
    if up is None:
        return [out]
    gx, gA = torch.autograd.grad(out, (x, A), up)
    return [out.detach(), gx, gA]


def _close(gpu, cpu, scale=1.0):
    for a, b in zip(gpu, cpu):
        assert a.device.type == "cuda" and a.dtype == b.dtype and a.shape == b.shape
        rel = REL[b.dtype]
        torch.testing.assert_close(a.cpu().double(), b.double(), atol=rel * scale, rtol=rel)


@pytest.mark.cuda
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "noncontig"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, S, E, C", SHAPES)
def test_graph_mix_cuda_matches_cpu(B, S, E, C, dtype, strided):
    cpu_in = _inputs(B, S, E, C, dtype, strided=strided)
    gpu_in = _inputs(B, S, E, C, dtype, "cuda", strided=strided)
    up = torch.randn(B, S, E, generator=torch.Generator().manual_seed(1)).to(dtype)
    cpu = _run(*cpu_in, up)
    gpu = _run(*gpu_in, up.cuda())
    assert gpu[0].is_contiguous() and gpu[2].shape == gpu_in[1].shape
    _close(gpu, cpu, scale=max(E, S + (C or 0)) ** 0.5 * 4)


@pytest.mark.cuda
@pytest.mark.parametrize("need", [(True, False), (False, True)])
def test_graph_mix_backward_cuda_one_output(need):
    x, A, cache = _inputs(2, 50, 12, 7, torch.float32, "cuda")
    g = torch.randn(2, 50, 12, device="cuda")
    kw = OPTS | dict(need_x=need[0], need_A=need[1])
    got = torch.ops.smoe.graph_mix_backward.default(g, x, A, cache, **kw)
    want = torch.ops.smoe.graph_mix_backward.default(g.cpu(), x.cpu(), A.cpu(), cache.cpu(), **kw)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a.cpu(), b, atol=1e-4, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_graph_mix_cuda_lam0_is_self_coef_x_exactly(dtype):
    x, A, cache = _inputs(2, 40, 9, 5, dtype, "cuda")
    A[0, 0, 0] = float("nan")
    got = ops.graph_mix(x, A, cache=cache, self_coef=0.5, lam=0.0)
    assert torch.equal(got, (0.5 * x.double()).to(dtype))
    assert torch.equal(
        got, ops.graph_mix(x.cpu(), A.cpu(), cache=cache.cpu(), lam=0.0, self_coef=0.5).cuda()
    )


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_graph_mix_cuda_is_deterministic_and_sync_free(dtype):
    x, A, cache = _inputs(4, 300, 24, 100, dtype, "cuda", strided=True)
    up = torch.randn(4, 300, 24, device="cuda", dtype=dtype)
    runs = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            runs.append(_run(x, A, cache, up))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.cuda
def test_graph_mix_cuda_graph_capture_and_replay():
    x, A, cache = _inputs(2, 64, 16, 8, torch.float16, "cuda")
    want = ops.graph_mix(x, A, cache=cache)
    graph, got = capture_cuda_graph(lambda: ops.graph_mix(x, A, cache=cache))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want)


@pytest.mark.cuda
def test_graph_mix_cuda_many_batch_entries_and_row_tiles():
    # more batch entries than one grid dimension holds (65535) walk the grid-stride loop
    B = 70000
    x, A, _ = _inputs(B, 2, 3, None, torch.float32)
    _close(_run(x.cuda(), A.cuda(), None), _run(x, A, None))


@pytest.mark.cuda
def test_graph_mix_cuda_rejects_mixed_devices():
    x, A, cache = _inputs(2, 3, 4, 2, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="A must be on cuda"):
        ops.graph_mix(x, A.cpu(), cache=cache)
    with pytest.raises(RuntimeError, match="cache must be on cuda"):
        ops.graph_mix(x, A, cache=cache.cpu())
