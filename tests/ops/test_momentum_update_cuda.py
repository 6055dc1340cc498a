"""momentum_update and its backward on CUDA (specs/momentum_smoe.md §3-§5, §9): parity with the CPU
op for every kind and dtype (any rank, empty, strided inputs), backward parity, bitwise
determinism, no host sync, CUDA-graph capture, bf16 with |u| up to 1e4, errors.

Tolerances. Both devices compute in float32 from the same rounded inputs and differ only by
float32 rounding (CUDA contracts a * b + c into one FMA, sqrtf and division are correctly rounded
on both): <= a few ulp, so 1e-5 relative for float32 results; fp16/bf16 results round those
float32 values and may differ by one ulp of their dtype (2^-10, 2^-7 relative)."""

from __future__ import annotations

import pytest
import torch

from smoe import ops
from tests.helpers import CUDA_DTYPES, capture_cuda_graph, noncontig

KINDS = ["heavy_ball", "adam", "robust"]
SHAPES = [
    pytest.param((), id="0d"),
    pytest.param((0,), id="n0"),
    pytest.param((4, 0, 3), id="4x0x3"),
    pytest.param((7,), id="7"),
    pytest.param((3, 5, 33), id="3x5x33"),
    pytest.param((1000, 257), id="1000x257"),
]
OPTS = {
    "heavy_ball": dict(mu=0.6, gamma=1.5, sign=-1.0),
    "adam": dict(mu=0.7, gamma=0.5, sign=1.0, beta1=0.8, beta2=0.99, gamma1=0.8, eps=1e-6),
    "robust": dict(robust_a=0.9, robust_b=0.3),
}
REL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _inputs(shape, kind, dtype=torch.float32, device="cpu", strided=False):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(shape, generator=g).to(dtype)
    m = torch.randn(shape, generator=g)
    p = v = None
    if kind == "adam":
        p = 0.3 * torch.randn(shape, generator=g)
        v = 0.1 + 0.5 * torch.rand(shape, generator=g)
    ts = [t.to(device) if t is not None else None for t in (u, m, p, v)]
    if strided and len(shape) and min(shape) > 0 and shape[-1] > 1:
        ts = [noncontig(t) if t is not None else None for t in ts]
    return ts


def _upstream(shape, dtype, kind, device):
    g = torch.Generator().manual_seed(1)
    ups = [torch.randn(shape, generator=g) for _ in range(4 if kind == "adam" else 2)]
    return [ups[0].to(device=device, dtype=dtype), *[x.to(device) for x in ups[1:]]]


def _run(inputs, kind, upstream=None):
    """The outputs (None dropped) and, given upstream, the inputs' gradients."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    out = [o for o in ops.momentum_update(*leaves, kind=kind, **OPTS[kind]) if o is not None]
    if upstream is None:
        return out, []
    torch.autograd.backward(out, upstream)
    return [o.detach() for o in out], [t.grad for t in leaves if t is not None]


def _close(gpu, cpu):
    for a, b in zip(gpu, cpu):
        assert a.device.type == "cuda" and a.dtype == b.dtype and a.shape == b.shape
        scale = max(b.abs().max().item(), 1.0) if b.numel() else 1.0
        rel = REL[b.dtype]
        torch.testing.assert_close(a.cpu().double(), b.double(), atol=rel * scale, rtol=rel)


@pytest.mark.cuda
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "noncontig"])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_momentum_update_cuda_matches_cpu(shape, kind, dtype, strided):
    cpu_in = _inputs(shape, kind, dtype, strided=strided)
    gpu_in = _inputs(shape, kind, dtype, "cuda", strided=strided)
    cpu_out, _ = _run(cpu_in, kind)
    gpu_out, _ = _run(gpu_in, kind)
    assert len(gpu_out) == (4 if kind == "adam" else 2)
    _close(gpu_out, cpu_out)


@pytest.mark.cuda
def test_momentum_update_cuda_grid_stride_covers_more_elements_than_threads():
    # 65536 blocks x 256 threads = 2^24 threads: each thread also takes a second element
    shape = (2**24 + 4099,)
    cpu_in = _inputs(shape, "adam")
    up = _upstream(shape, torch.float32, "adam", "cpu")
    cpu = _run(cpu_in, "adam", up)
    gpu = _run([t.cuda() for t in cpu_in], "adam", [g.cuda() for g in up])
    _close(gpu[0], cpu[0])
    _close(gpu[1], cpu[1])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(), (0,), (5, 7), (300, 513)], ids=str)
def test_momentum_update_backward_cuda_matches_cpu(shape, kind, dtype):
    cpu = _run(_inputs(shape, kind, dtype), kind, _upstream(shape, dtype, kind, "cpu"))
    gpu = _run(_inputs(shape, kind, dtype, "cuda"), kind, _upstream(shape, dtype, kind, "cuda"))
    _close(gpu[0], cpu[0])
    _close(gpu[1], cpu[1])
    assert [g.dtype for g in gpu[1]] == [dtype] + [torch.float32] * (len(gpu[1]) - 1)


@pytest.mark.cuda
def test_momentum_update_cuda_unused_outputs_get_zero_gradients():
    # grad_p and grad_v of the linear kinds are empty [0] tensors; the autograd materialises None
    for kind in KINDS:
        u, m, p, v = _inputs((64, 33), kind, torch.bfloat16, "cuda", strided=True)
        for device in ("cuda", "cpu"):
            # fresh leaves each pass (detach: the last pass's leaves would make .to() a non-leaf)
            leaves = [
                t.detach().to(device).requires_grad_() if t is not None else None
                for t in (u, m, p, v)
            ]
            ops.momentum_update(*leaves, kind=kind).m.sum().backward()
            assert (leaves[1].grad == (0.7 if kind != "robust" else 0.04)).all()
            assert kind != "adam" or (leaves[2].grad == 0).all() and (leaves[3].grad == 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("kind", KINDS)
def test_momentum_update_cuda_is_deterministic_and_sync_free(kind):
    inputs = _inputs((512, 1024), kind, torch.bfloat16, "cuda", strided=True)
    up = _upstream((512, 1024), torch.bfloat16, kind, "cuda")
    runs = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            out, grads = _run(inputs, kind, up)
            runs.append(out + grads)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.cuda
def test_momentum_update_cuda_graph_capture_and_replay():
    u, m, p, v = _inputs((256, 96), "adam", torch.float16, "cuda")
    want = ops.momentum_update(u, m, p, v, kind="adam")
    graph, got = capture_cuda_graph(lambda: ops.momentum_update(u, m, p, v, kind="adam"))
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", KINDS)
def test_momentum_update_cuda_bf16_with_large_u_stays_finite(kind):
    u = (torch.rand(64, 256, device="cuda") * 2e4 - 1e4).to(torch.bfloat16).requires_grad_()
    state = [torch.zeros(64, 256, device="cuda") for _ in range(3 if kind == "adam" else 1)]
    m, p, v = state + [None] * (3 - len(state))
    x = torch.zeros(64, 256, device="cuda", dtype=torch.bfloat16)
    for _ in range(12):
        out = ops.momentum_update(u, m, p, v, kind=kind)
        m, p, v, x = out.m, out.p, out.v, x + out.delta
        assert all(t is None or torch.isfinite(t).all() for t in out)
    x.float().square().sum().backward()
    assert torch.isfinite(u.grad.float()).all()


@pytest.mark.cuda
def test_momentum_update_cuda_rejects_mixed_devices_and_float64():
    u, m, p, v = _inputs((3, 4), "adam", torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="m must be on cuda"):
        ops.momentum_update(u, m.cpu())
    with pytest.raises(RuntimeError, match="v must be on cuda"):
        ops.momentum_update(u, m, p, v.cpu(), kind="adam")
    with pytest.raises(RuntimeError, match="float64 is supported on CPU only"):
        ops.momentum_update(u.double(), m.double())
