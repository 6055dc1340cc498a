"""CUDA grouped_mm's two paths: bf16 on sm90/sm100 takes ATen's _grouped_mm (CUTLASS tensor cores,
csrc/cuda/grouped_mm_tensor_core.h), everything else smoe's tiled kernel, which
SMOE_CUDA_GROUPED_MM=tiled forces. Both must give the same values (to bf16 rounding: the
accumulation orders differ), zero rows past offsets[E], zero weight gradients for empty groups, the
same layouts, and no host sync. CUDA-only: collected and skipped without a GPU."""

import pytest
import torch

from smoe import _C, ops
from smoe import reference as ref

# (counts per expert, padding rows past offsets[E]): uneven with an empty expert, all empty, big
CASES = [([5, 0, 7, 3], 4), ([0, 0, 0], 3), ([300, 1, 0, 129, 64], 0)]


def _tensor_core_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] in (9, 10)


def _run(x, w, off, g, *, tiled: bool, monkeypatch):
    if tiled:
        monkeypatch.setenv("SMOE_CUDA_GROUPED_MM", "tiled")
    else:
        monkeypatch.delenv("SMOE_CUDA_GROUPED_MM", raising=False)
    xs, ws = x.clone().requires_grad_(), w.detach().clone().requires_grad_()
    if w.stride(1) == 1:  # a transposed view stays one
        ws = w.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = ops.grouped_mm(xs, ws, off)
            out.backward(g)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ran = any(e.name == "aten::_grouped_mm" for e in prof.events())
    return out.detach(), xs.grad, ws.grad, ran


@pytest.mark.cuda
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("counts,pad", CASES)
def test_grouped_mm_tensor_core_path_matches_the_tiled_kernel(counts, pad, transposed, monkeypatch):
    torch.manual_seed(0)
    E, K, N = len(counts), 64, 96
    off = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], device="cuda")
    M = int(off[-1]) + pad
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, K, N, device="cuda", dtype=torch.bfloat16) / 8
    if transposed:
        w = w.transpose(1, 2).contiguous().transpose(1, 2)
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    fast = _run(x, w, off, g, tiled=False, monkeypatch=monkeypatch)
    tiled = _run(x, w, off, g, tiled=True, monkeypatch=monkeypatch)
    assert fast[3] == _tensor_core_gpu() and not tiled[3]  # which path ran
    want = ref.grouped_mm(x.double().cpu(), w.double().cpu(), off.cpu())
    for a, b in zip(fast[:3], tiled[:3], strict=True):
        assert a.stride() == b.stride()
        torch.testing.assert_close(a.float(), b.float(), atol=0.06, rtol=0.02)
    torch.testing.assert_close(fast[0].double().cpu(), want, atol=0.06, rtol=0.02)
    used = int(off[-1])
    assert torch.all(fast[0][used:] == 0) and torch.all(fast[1][used:] == 0)
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.all(fast[2][e] == 0)


@pytest.mark.cuda
def test_grouped_mm_tensor_core_path_is_skipped_where_torch_would_sync(monkeypatch):
    # fp16, a bias, or a K that is not a multiple of 8: the tiled kernel, never _grouped_mm's
    # host-syncing fallback
    monkeypatch.delenv("SMOE_CUDA_GROUPED_MM", raising=False)
    off = torch.tensor([0, 3, 9], device="cuda")
    cases = [
        (torch.randn(9, 16, dtype=torch.float16), torch.randn(2, 16, 8, dtype=torch.float16), None),
        (
            torch.randn(9, 16).bfloat16(),
            torch.randn(2, 16, 8).bfloat16(),
            torch.randn(2, 8).bfloat16(),
        ),
        (torch.randn(9, 12).bfloat16(), torch.randn(2, 12, 8).bfloat16(), None),
    ]
    for x, w, b in cases:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            ops.grouped_mm(x.cuda(), w.cuda(), off, None if b is None else b.cuda())
        assert not any(e.name == "aten::_grouped_mm" for e in prof.events())


def test_grouped_mm_cuda_path_is_reported():
    assert _C.cuda_grouped_mm_path().startswith("CUDA grouped_mm: ")


def _refused_by_aten(kind: str):
    """bf16 CUDA inputs that pass the tensor-core path's size rules but that ATen's _grouped_mm
    would refuse with an error (its stride rule throws rather than falls back): (x, w, offsets,
    grad), x a leaf that requires grad."""
    g = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=g).bfloat16().cuda()

    if kind == "1024 experts":  # torch's CUTLASS grouped GEMM takes fewer than 1024 groups
        E = 1024
        x, w, grad = randn(2 * E, 16), randn(E, 16, 16), randn(2 * E, 16)
        off = torch.arange(0, 2 * E + 1, 2)
    elif kind == "one row, stride 19":  # a size-1 dim's stride is checked too
        x = torch.zeros(1, 19, dtype=torch.bfloat16, device="cuda")[:, :16].copy_(randn(1, 16))
        w, grad, off = randn(2, 16, 8), randn(1, 8), torch.tensor([0, 1, 1])
        assert x.stride() == (19, 1)
    else:  # "expanded grad": out.sum(0)'s gradient, rows of stride 0
        x, w, grad, off = (
            randn(9, 16),
            randn(2, 16, 8),
            randn(8).expand(9, 8),
            torch.tensor([0, 3, 9]),
        )
    return x.requires_grad_(), w.requires_grad_(), off.cuda(), grad


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["1024 experts", "one row, stride 19", "expanded grad"])
def test_grouped_mm_inputs_aten_refuses_take_the_tiled_kernel(kind, monkeypatch):
    monkeypatch.delenv("SMOE_CUDA_GROUPED_MM", raising=False)
    x, w, off, grad = _refused_by_aten(kind)
    backward = torch.ops.smoe.grouped_mm_backward.default  # the grad's strides reach the glue
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = ops.grouped_mm(x, w, off)
        gx, gw = backward(grad, x.detach(), w.detach(), off, True, True)
    # no error and the right values; the other products of the stride cases may take the
    # tensor-core path (their operands are aligned), so only the 1024-expert case has none
    if kind == "1024 experts":
        assert not any(e.name == "aten::_grouped_mm" for e in prof.events())
    xd, wd = (t.detach().double().cpu().requires_grad_() for t in (x, w))
    want = ref.grouped_mm(xd, wd, off.cpu())
    want_gx, want_gw = torch.autograd.grad(want, (xd, wd), grad.double().cpu())
    for got, expected in ((out, want), (gx, want_gx), (gw, want_gw)):
        torch.testing.assert_close(got.double().cpu(), expected, atol=0.06, rtol=0.02)
