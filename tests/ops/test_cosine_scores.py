"""cosine_scores (X-MoE hypersphere scores, specs/xmoe.md §6-§9): parity with the float64
reference, opcheck, gradcheck, compile, determinism, errors and the op-level spec properties."""

from __future__ import annotations

import math

import pytest
import torch

from smoe import ops
from smoe import reference as ref
from tests.helpers import CUDA_DTYPES, DTYPES, TOL, assert_low_precision_close, noncontig

# (T, N, d_e, d): empty batch, one token and one expert, d_e = 1, d off the 8-wide unroll, more
# tokens than one reduction chunk (256) and d past one 64-column block of the d proj reduction.
SHAPES = [
    pytest.param(0, 4, 8, 16, id="T0-N4-de8"),
    pytest.param(1, 1, 1, 8, id="T1-N1-de1"),
    pytest.param(7, 4, 8, 16, id="T7-N4-de8"),
    pytest.param(7, 16, 1, 5, id="T7-N16-de1"),
    pytest.param(64, 16, 8, 32, id="T64-N16-de8"),
    pytest.param(64, 4, 1, 33, id="T64-N4-de1"),
    pytest.param(300, 4, 8, 70, id="T300-N4-de8-d70"),
]


def _inputs(T, N, de, d, dtype=torch.float64, device="cpu", tau=0.3, requires_grad=False):
    h = torch.randn(T, d, dtype=torch.float64).to(dtype=dtype, device=device)
    proj = (torch.randn(de, d, dtype=torch.float64) / math.sqrt(d)).to(dtype=dtype, device=device)
    emb = torch.randn(N, de, dtype=torch.float64).to(dtype=dtype, device=device)
    temp = torch.tensor(tau, dtype=torch.float32, device=device)
    for t in (h, proj, emb, temp):
        t.requires_grad_(requires_grad)
    return h, proj, emb, temp


def _grads(fn, inputs, g_cos, g_logits):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    cos, logits = fn(*inputs)
    torch.autograd.backward((cos, logits), (g_cos.to(cos.dtype), g_logits.to(logits.dtype)))
    return [t.grad for t in inputs]


# --- parity with the reference ------------------------------------------------------------------


@pytest.mark.parametrize("strided", [False, True], ids=["contig", "noncontig"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,N,de,d", SHAPES)
def test_cosine_scores_matches_reference(T, N, de, d, dtype, normalize, strided):
    h, proj, emb, temp = _inputs(T, N, de, d, dtype)
    if strided and T > 0:  # an empty tensor is contiguous whatever its strides
        h = noncontig(h)
    cos, logits = ops.cosine_scores(h, proj, emb, temp, normalize_tokens=normalize)
    rc, rl = ref.cosine_scores(
        h.double(), proj.double(), emb.double(), temp, normalize_tokens=normalize
    )
    out = torch.float64 if dtype == torch.float64 else torch.float32
    assert cos.dtype == logits.dtype == out and cos.shape == logits.shape == (T, N)
    # The op upcasts 16-bit inputs exactly and accumulates in float32, so against float64 math
    # on the same values it meets float32's tolerance (tighter than STYLE.md's 16-bit rule).
    tol = TOL[out]
    torch.testing.assert_close(cos.double(), rc.double(), **tol)
    torch.testing.assert_close(logits.double(), rl.double(), **tol)

    g_cos, g_logits = torch.randn(T, N, dtype=torch.float64), torch.randn(T, N, dtype=torch.float64)
    fn = lambda *a: ops.cosine_scores(*a, normalize_tokens=normalize)  # noqa: E731
    rfn = lambda *a: ref.cosine_scores(*a, normalize_tokens=normalize)  # noqa: E731
    got = _grads(fn, (h, proj, emb, temp), g_cos, g_logits)
    want = _grads(rfn, (h.double(), proj.double(), emb.double(), temp.double()), g_cos, g_logits)
    assert [g.dtype for g in got] == [dtype, dtype, dtype, torch.float32]
    for a, b in zip(got, want):
        scale = max(b.abs().max().item(), 1.0) if b.numel() else 1.0
        if a.dtype in (torch.float16, torch.bfloat16):
            assert_low_precision_close(a, b, b.to(a.dtype))
        else:
            torch.testing.assert_close(
                a.double(),
                b,
                atol=TOL[a.dtype]["atol"] * 10 * scale,
                rtol=TOL[a.dtype]["rtol"] * 10,
            )


def test_cosine_scores_temperature_dtype_and_clamp():
    h, proj, emb, _ = _inputs(5, 4, 2, 6)
    for tau in (torch.tensor(0.07, dtype=torch.float64), torch.tensor(0.5, dtype=torch.bfloat16)):
        _, logits = ops.cosine_scores(h, proj, emb, tau)
        torch.testing.assert_close(logits, ref.cosine_scores(h, proj, emb, tau).logits)
    cos, logits = ops.cosine_scores(h, proj, emb, torch.tensor(-3.0, dtype=torch.float64))
    torch.testing.assert_close(logits, cos / 1e-4)  # tau clamped to >= 1e-4


# --- opcheck, gradcheck, compile --------------------------------------------------------------


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("T,N,de,d", [(0, 4, 8, 16), (7, 4, 8, 16), (3, 1, 1, 5)])
def test_cosine_scores_opcheck(T, N, de, d, requires_grad):
    args = _inputs(T, N, de, d, requires_grad=requires_grad)
    for kwargs in ({}, {"eps": 1e-3, "normalize_tokens": False}):
        torch.library.opcheck(torch.ops.smoe.cosine_scores.default, args, kwargs)


def test_cosine_scores_backward_opcheck():
    h, proj, emb, temp = _inputs(6, 4, 3, 8)
    g = torch.randn(6, 4, dtype=torch.float64)
    args = (g, g.flip(0), h, proj, emb, temp, 1e-4, True)
    torch.library.opcheck(torch.ops.smoe.cosine_scores_backward.default, args)


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("T,N,de,d", [(0, 3, 2, 4), (1, 1, 1, 3), (6, 5, 3, 7)])
def test_cosine_scores_gradcheck(T, N, de, d, normalize):
    inputs = _inputs(T, N, de, d, requires_grad=True)
    temp = inputs[3].detach().double().requires_grad_()
    fn = lambda *a: ops.cosine_scores(*a, normalize_tokens=normalize)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (*inputs[:3], temp), eps=1e-6, atol=1e-6)


def test_cosine_scores_gradcheck_below_the_norm_floor():
    # |z| and one |e_i| far below eps (the z / eps branch), and tau below its clamp (gradient 0).
    h, proj, emb, _ = _inputs(4, 3, 2, 5)
    h = (h * 1e-7).requires_grad_()
    emb = emb.detach().clone()
    emb[1] *= 1e-7
    emb.requires_grad_()
    proj.requires_grad_()
    for tau in (0.3, 5e-5):
        temp = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(ops.cosine_scores, (h, proj, emb, temp), eps=1e-9)
    _, logits = ops.cosine_scores(h, proj, emb, temp)
    (g_tau,) = torch.autograd.grad(logits.sum(), temp)
    assert g_tau.item() == 0.0


def test_cosine_scores_double_backward_is_refused():
    h, proj, emb, temp = _inputs(3, 2, 2, 4, requires_grad=True)
    cos, _ = ops.cosine_scores(h, proj, emb, temp)
    (g,) = torch.autograd.grad(cos.square().sum(), h, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        g.sum().backward()


def test_cosine_scores_one_output_unused_in_backward():
    h, proj, emb, temp = _inputs(5, 3, 2, 4, requires_grad=True)
    cos, _ = ops.cosine_scores(h, proj, emb, temp)
    cos.sum().backward()  # the logits' gradient arrives as None (or zeros): tau gets 0
    assert temp.grad is not None and temp.grad.item() == 0.0
    assert h.grad is not None and torch.isfinite(h.grad).all()


@pytest.mark.parametrize("dynamic", [False, True])
def test_cosine_scores_compiles_without_graph_breaks(dynamic):
    torch._dynamo.reset()
    h, proj, emb, temp = _inputs(12, 6, 3, 8, dtype=torch.float32, requires_grad=True)

    def fn(h, proj, emb, temp):
        cos, logits = ops.cosine_scores(h, proj, emb, temp)
        return (cos * logits).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    a, b = fn(h, proj, emb, temp), compiled(h, proj, emb, temp)
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a, (h, proj, emb, temp))
    gb = torch.autograd.grad(b, (h, proj, emb, temp))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)


# --- determinism ------------------------------------------------------------------------------


def test_cosine_scores_is_deterministic_and_thread_count_independent():
    h, proj, emb, temp = _inputs(700, 16, 8, 96, dtype=torch.float32)
    g = torch.randn(700, 16), torch.randn(700, 16)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            out = ops.cosine_scores(h, proj, emb, temp)
            results.append((*out, *_grads(ops.cosine_scores, (h, proj, emb, temp), *g)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


# --- spec properties (specs/xmoe.md §8, §9) ---------------------------------------------------


def test_cosine_scores_are_cosines_and_one_for_parallel_vectors():
    # §9.1: cos in [-1, 1]; h_t a positive multiple of e_i (proj = I) gives cos[t, i] = 1.
    N, de = 5, 4
    emb = torch.randn(N, de, dtype=torch.float64)
    h = emb[[3, 0, 4]] * torch.tensor([[2.0], [0.01], [1e3]], dtype=torch.float64)
    cos, _ = ops.cosine_scores(h, torch.eye(de, dtype=torch.float64), emb, torch.tensor(0.3))
    assert (cos.abs() <= 1 + 1e-12).all()
    torch.testing.assert_close(cos[[0, 1, 2], [3, 0, 4]], torch.ones(3, dtype=torch.float64))
    x = _inputs(50, 8, 4, 16)
    assert (ops.cosine_scores(*x).cos.abs() <= 1 + 1e-12).all()


def test_cosine_scores_are_scale_invariant():
    # §9.2: scaling h or any e_i by c > 0 leaves the scores alone (so expert_norm never matters).
    h, proj, emb, temp = _inputs(9, 6, 3, 8)
    base = ops.cosine_scores(h, proj, emb, temp)
    scale = torch.tensor([0.1, 3.0, 1e-2, 7.0, 1.0, 1e3], dtype=torch.float64).unsqueeze(1)
    for args in ((h * 37.0, proj, emb, temp), (h, proj, emb * scale, temp)):
        out = ops.cosine_scores(*args)
        torch.testing.assert_close(out.cos, base.cos)
        torch.testing.assert_close(out.logits, base.logits)


def test_cosine_scores_zero_vectors_give_zero_not_nan():
    # §8: the eps floor turns a zero token or expert into cos 0.
    h, proj, emb, temp = _inputs(4, 3, 2, 5, dtype=torch.float32)
    h[1] = 0
    emb[2] = 0
    cos, logits = ops.cosine_scores(h, proj, emb, temp)
    assert torch.isfinite(cos).all() and torch.isfinite(logits).all()
    assert (cos[1] == 0).all() and (cos[:, 2] == 0).all()


def test_cosine_scores_huge_inputs_do_not_overflow_the_norm():
    # |z|^2 would overflow float32; the max-scaled norm does not.
    h, proj, emb, temp = _inputs(3, 4, 2, 6, dtype=torch.float32)
    cos, _ = ops.cosine_scores(h * 1e30, proj, emb, temp)
    want = ops.cosine_scores(h.double(), proj.double(), emb.double(), temp).cos
    torch.testing.assert_close(cos.double(), want, **TOL[torch.float32])


def test_cosine_scores_replace_non_finite_scores_per_row():
    # §8, per row: token 0's score against e_0 overflows float32 (inf) and takes the smallest
    # finite score of row 0 (0 here); token 1 and token 2 are untouched; a NaN token gets 0s.
    s = 3e38
    h = torch.tensor([[s, s], [1.0, 2.0], [float("nan"), 1.0]])
    emb = torch.tensor([[1.0, 1.0], [1.0, -1.0], [0.0, 1.0]])
    temp = torch.tensor(1.0)
    cos, logits = ops.cosine_scores(h, torch.eye(2), emb, temp, normalize_tokens=False)
    torch.testing.assert_close(cos[0], torch.tensor([0.0, 0.0, s]))
    alone = ops.cosine_scores(h[1:2], torch.eye(2), emb, temp, normalize_tokens=False).cos
    assert torch.equal(cos[1], alone[0])
    assert cos[2].tolist() == [0.0, 0.0, 0.0] and torch.equal(logits, cos)
    # replaced entries get no gradient
    hh = h[:1].clone().requires_grad_()
    ee = emb.clone().requires_grad_()
    c, _ = ops.cosine_scores(hh, torch.eye(2), ee, temp, normalize_tokens=False)
    c[0, 0].backward()
    assert (hh.grad == 0).all() and (ee.grad == 0).all()


# --- errors (each names the argument) --------------------------------------------------------


def test_cosine_scores_rejects_sizes_that_disagree():
    h, proj, emb, temp = _inputs(3, 4, 2, 5)
    with pytest.raises(RuntimeError, match=r"proj must be \[d_e, d\] with d = h.size\(1\) = 5"):
        ops.cosine_scores(h, proj[:, :4], emb, temp)
    with pytest.raises(RuntimeError, match=r"expert_emb must be \[N, d_e\] with d_e = proj"):
        ops.cosine_scores(h, proj, torch.randn(4, 3, dtype=torch.float64), temp)
    with pytest.raises(RuntimeError, match="expert_emb must be .*N >= 1"):
        ops.cosine_scores(h, proj, emb[:0], temp)
    with pytest.raises(RuntimeError, match="proj must be .*d_e >= 1"):
        ops.cosine_scores(h, proj[:0], emb[:, :0], temp)


def test_cosine_scores_rejects_bad_dtypes_and_ranks():
    h, proj, emb, temp = _inputs(3, 4, 2, 5)
    with pytest.raises(RuntimeError, match="h must be float"):
        ops.cosine_scores(h.long(), proj.long(), emb.long(), temp)
    with pytest.raises(RuntimeError, match="proj must have h's dtype"):
        ops.cosine_scores(h, proj.float(), emb, temp)
    with pytest.raises(RuntimeError, match="expert_emb must have h's dtype"):
        ops.cosine_scores(h, proj, emb.float(), temp)
    with pytest.raises(RuntimeError, match="h must be 2-D"):
        ops.cosine_scores(h.unsqueeze(0), proj, emb, temp)
    with pytest.raises(RuntimeError, match="temperature must be a 0-dim"):
        ops.cosine_scores(h, proj, emb, temp.reshape(1))
    with pytest.raises(RuntimeError, match="temperature must be float"):
        ops.cosine_scores(h, proj, emb, torch.tensor(1))


def test_cosine_scores_rejects_bad_eps():
    h, proj, emb, temp = _inputs(3, 4, 2, 5)
    for eps in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="eps must be finite and > 0"):
            ops.cosine_scores(h, proj, emb, temp, eps=eps)
    with pytest.raises(RuntimeError, match="eps must be finite and > 0"):
        torch.ops.smoe.cosine_scores(h, proj, emb, temp, eps=0.0)


def test_cosine_scores_backward_rejects_bad_grads():
    h, proj, emb, temp = _inputs(3, 4, 2, 5)
    g = torch.zeros(3, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"grad_cos must be \[T, N\] = \[3, 4\]"):
        torch.ops.smoe.cosine_scores_backward(g[:2], g, h, proj, emb, temp, 1e-4, True)
    with pytest.raises(RuntimeError, match=r"grad_logits must be \[T, N\]"):
        torch.ops.smoe.cosine_scores_backward(g, g.float(), h, proj, emb, temp, 1e-4, True)


# --- CUDA ------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("T,N,de,d", SHAPES)
def test_cosine_scores_cuda_matches_cpu(T, N, de, d, dtype, normalize):
    inputs = _inputs(T, N, de, d, dtype)
    fn = lambda *a: ops.cosine_scores(*a, normalize_tokens=normalize)  # noqa: E731
    cpu = fn(*inputs)
    gpu = fn(*[t.cuda() for t in inputs])
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu(), b, **TOL[torch.float32])
    g = torch.randn(T, N), torch.randn(T, N)
    gc = _grads(fn, inputs, *g)
    gg = _grads(fn, [t.cuda() for t in inputs], *[x.cuda() for x in g])
    for a, b in zip(gg, gc):
        scale = max(b.abs().max().item(), 1.0) if b.numel() else 1.0
        tol = TOL[b.dtype]
        torch.testing.assert_close(
            a.cpu().double(), b.double(), atol=tol["atol"] * 10 * scale, rtol=tol["rtol"] * 10
        )


@pytest.mark.cuda
def test_cosine_scores_cuda_is_deterministic_and_sync_free():
    inputs = _inputs(3000, 32, 16, 256, torch.float32, device="cuda", requires_grad=True)
    g = torch.randn(3000, 32, device="cuda")
    runs = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            cos, logits = ops.cosine_scores(*inputs)
            grads = torch.autograd.grad((cos * g + logits).sum(), inputs)
            runs.append((cos, logits, *grads))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.cuda
def test_cosine_scores_cuda_rejects_mixed_devices_and_float64():
    h, proj, emb, temp = _inputs(3, 4, 2, 5, torch.float32, device="cuda")
    with pytest.raises(RuntimeError, match="temperature must be on cuda"):
        ops.cosine_scores(h, proj, emb, temp.cpu())
    with pytest.raises(RuntimeError, match="proj must be on cuda"):
        ops.cosine_scores(h, proj.cpu(), emb, temp)
    with pytest.raises(RuntimeError, match="float64 is supported on CPU only"):
        ops.cosine_scores(h.double(), proj.double(), emb.double(), temp)


@pytest.mark.cuda
@pytest.mark.parametrize("tau_dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_cosine_scores_cuda_clamps_the_temperature_as_the_cpu(tau_dtype):
    # a float32 1e-4 (9.99999974e-05, what clamp_(min=1e-4) of a float32 temperature gives) is
    # below the clamp in double: its gradient is 0 on CPU and CUDA alike, and just above it is not
    for value in (1e-4, 1.0001e-4, 0.3):
        inputs = list(_inputs(6, 4, 3, 5, torch.float32))
        inputs[3] = torch.tensor(value, dtype=torch.float32).to(tau_dtype)
        fn = ops.cosine_scores
        g = torch.randn(6, 4), torch.randn(6, 4)
        cpu = _grads(fn, inputs, *g)
        gpu = _grads(fn, [t.cuda() for t in inputs], *[x.cuda() for x in g])
        assert gpu[3].dtype == tau_dtype
        assert (cpu[3] == 0).item() == (gpu[3].cpu() == 0).item(), value
        torch.testing.assert_close(gpu[3].cpu().double(), cpu[3].double(), rtol=1e-4, atol=0)
