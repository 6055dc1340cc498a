"""sinkhorn and sinkhorn_backward on CUDA (specs/sinkhorn_ssr.md §3, §7, §8): parity of all eight
outputs and of the backward with the CPU op, backward steps past iters_done skipped on the device,
bitwise determinism, no host sync at tol = 0, CUDA-graph capture, the tolerance stop, edge shapes
(T = 0, E = 1, E past one warp and one column tile, T on and off the 256-row chunk, T past the
capped grids), strided scores in every dtype, large logits, errors. The ops are called through
torch.ops directly.

Tolerances. Low-precision scores are upcast before any math, so the CUDA and CPU ops run float32
on identical S and differ only by float32 rounding (expf vs std::exp, summation orders). Measured
on the CPU, float32 vs float64 differs by <= 7e-6 relative (x / (1 + |x|)) for log_plan, f, g and
the histories after 30 iterations, and by <= 8e-6 of max |grad| for the backward after 12: 1e-4
leaves a >= 10x margin for the GPU's own rounding. The residual norms are the exception: near
convergence they are float32 rounding noise of the plan's mass sums (~u * |f + S + g| relative per
entry, e.g. col_err 3.7e-4 in float32 against 2.1e-5 in float64 at T = 4097, E = 16), so they are
compared within that noise floor (_residual_atol)."""

from __future__ import annotations

import pytest
import torch

import smoe  # noqa: F401  (loads the extension: registers torch.ops.smoe)
from tests.helpers import CUDA_DTYPES, capture_cuda_graph, noncontig

SINKHORN = torch.ops.smoe.sinkhorn.default
BACKWARD = torch.ops.smoe.sinkhorn_backward.default
NAMES = ("log_plan", "f", "g", "iters_done", "row_err", "col_err", "f_hist", "g_hist")

# (T, E): one token, one expert, E not a power of two, E past one warp, T exactly one chunk, one
# row past it, T off the chunk (1000, 4097), E past one 256-column tile (300; 257: a 1-column tile).
SHAPES = [
    pytest.param(1, 6, id="T1-E6"),
    pytest.param(300, 1, id="T300-E1"),
    pytest.param(17, 5, id="T17-E5"),
    pytest.param(64, 33, id="T64-E33"),
    pytest.param(256, 3, id="T256-E3"),
    pytest.param(257, 7, id="T257-E7"),
    pytest.param(1000, 8, id="T1000-E8"),
    pytest.param(4097, 16, id="T4097-E16"),
    pytest.param(300, 300, id="T300-E300"),
    pytest.param(40, 257, id="T40-E257"),
]
ATOL, RTOL = 1e-4, 1e-4  # float32 vs float32 (see the module docstring)


def _scores(T, E, dtype=torch.float32, scale=2.0, device="cpu"):
    return (scale * torch.randn(T, E)).to(dtype=dtype, device=device)


def _residual_atol(T, E, row_mass=1.0, col_mass=None):
    # float32 noise floor of |plan 1 - r| and |plan^T 1 - c|: a few 1e-6 of each mass, summed
    # in L2 over T rows and E columns (measured up to 3.6e-7 * col_mass * sqrt(E)).
    col_mass = T * row_mass / E if col_mass is None else col_mass
    return 4e-6 * (row_mass * T**0.5 + col_mass * E**0.5)


def _assert_outputs_close(gpu, want, row_mass=1.0, col_mass=None):
    """gpu: the CUDA op's outputs; want: the CPU op's (float32, or float64 as the truth)."""
    assert len(gpu) == len(want) == len(NAMES)
    T, E = want[0].shape
    for name, a, b in zip(NAMES, gpu, want):
        assert a.device.type == "cuda", name
        assert a.shape == b.shape, (name, a.shape, b.shape)
        if name == "iters_done":
            assert a.dtype == b.dtype == torch.int64 and a.item() == b.item(), name
            continue
        assert a.dtype == torch.float32, (name, a.dtype)
        if name.endswith("_err"):
            tol = dict(atol=_residual_atol(T, E, row_mass, col_mass), rtol=RTOL)
        else:
            tol = dict(atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(a.cpu().double(), b.double(), **tol, msg=name)


def _grads(T, E, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(T, E, generator=gen),
        torch.randn(T, generator=gen),
        torch.randn(E, generator=gen),
    )


def _cuda(*ts):
    return [t.cuda() for t in ts]


def _backward_close(a, b, dtype):
    # float32: see the module docstring. fp16/bf16: both sides round float32 results that differ
    # by ~1e-6 relative to the output dtype, so they may differ by one output ulp (2^-10, 2^-7).
    assert a.device.type == "cuda" and a.dtype == dtype and a.shape == b.shape
    scale = max(b.abs().max().item(), 1.0) if b.numel() else 1.0
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(a.cpu().double(), b.double(), atol=tol * scale, rtol=tol)


# --- parity with the CPU op ---------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("T,E", SHAPES)
def test_sinkhorn_cuda_matches_cpu(T, E, dtype):
    s = _scores(T, E, dtype)
    kw = dict(eps=0.5, max_iter=30)
    cpu = SINKHORN(s.float(), **kw)
    gpu = SINKHORN(s.cuda(), **kw)
    _assert_outputs_close(gpu, cpu)
    assert gpu[3].item() == 30


@pytest.mark.cuda
@pytest.mark.parametrize("n", [12, 7, 1], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("T,E", SHAPES)
def test_sinkhorn_backward_cuda_matches_cpu(T, E, dtype, n):
    # n < max_iter = 12 with every history row filled: a step past n that ran on the device would
    # read those rows and change the result (the CPU op reads rows < n only).
    s = _scores(T, E, dtype)
    out = SINKHORN(s.float(), eps=0.5, max_iter=12)
    g_plan, g_f, g_g = _grads(T, E)
    args = (out[6], out[7], torch.tensor(n))  # f_hist, g_hist of the CPU forward, iters_done
    want = BACKWARD(g_plan, g_f, g_g, s.float(), *args, 0.5)
    got = BACKWARD(*_cuda(g_plan, g_f, g_g, s, *args), 0.5)
    _backward_close(got, want, dtype)


@pytest.mark.cuda
def test_sinkhorn_cuda_marginals_and_masses():
    s = _scores(1000, 8, device="cuda")
    for row_mass, col_mass in ((1.0, None), (1.0 / 1000, 1.0 / 8)):
        kw = dict(eps=1.0, max_iter=200, row_mass=row_mass, col_mass=col_mass)
        out = SINKHORN(s, **kw)
        _assert_outputs_close(out, SINKHORN(s.cpu(), **kw), row_mass, col_mass)
        plan = out[0].exp()
        c = 1000 * row_mass / 8 if col_mass is None else col_mass
        # converged (float64: both residuals < 1e-12); float32 mass sums are within ~1e-6
        torch.testing.assert_close(
            plan.sum(1), torch.full_like(plan[:, 0], row_mass), atol=0, rtol=1e-5
        )
        torch.testing.assert_close(plan.sum(0), torch.full_like(plan[0], c), atol=0, rtol=2e-5)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("T,E", [(600_000, 32), (17_000_000, 1)], ids=["T600k-E32", "T17M-E1"])
def test_sinkhorn_cuda_past_the_grid_caps_matches_float64(T, E):
    # 600k x 32: more rows than the row kernels' 65536 blocks cover at 8 rows a block, and more
    # elements than the element kernels' 65536 x 256 threads (grid-stride loops). 17M x 1: more
    # 256-row chunks than the column kernels' 65536 blocks. Compared with the float64 CPU op.
    s = _scores(T, E, device="cuda")
    kw = dict(eps=0.5, max_iter=3)
    want = SINKHORN(s.cpu().double(), **kw)
    _assert_outputs_close(SINKHORN(s, **kw), want)
    if E == 1:
        return  # the backward's kernels are the row and column kernels already covered
    g_plan, g_f, g_g = _grads(T, E)
    args = (want[6], want[7], want[3])
    grad64 = BACKWARD(g_plan.double(), g_f.double(), g_g.double(), s.cpu().double(), *args, 0.5)
    got = BACKWARD(*_cuda(g_plan, g_f, g_g, s, *(a.float() for a in args[:2]), args[2]), 0.5)
    _backward_close(got, grad64, torch.float32)


# --- strided scores, empty batch ---------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["row_stride", "col_stride", "transposed"])
def test_sinkhorn_cuda_strided_scores(layout, dtype):
    T, E = 700, 12
    s = _scores(T, E, dtype)
    if layout == "row_stride":  # stride(1) == 1, rows 2E apart: read in place
        wide = torch.randn(T, 2 * E, device="cuda").to(dtype)
        wide[:, :E] = s.cuda()
        g = wide[:, :E]
    elif layout == "col_stride":  # every column strided: copied first
        g = noncontig(s.cuda())
    else:
        g = s.t().contiguous().cuda().t()
    assert not g.is_contiguous()
    kw = dict(eps=0.5, max_iter=20)
    out = SINKHORN(s.float(), **kw)
    _assert_outputs_close(SINKHORN(g, **kw), out)
    g_plan, g_f, g_g = _grads(T, E)
    want = BACKWARD(g_plan, g_f, g_g, s.float(), out[6], out[7], out[3], 0.5)
    got = BACKWARD(*_cuda(g_plan, g_f, g_g), g, *_cuda(out[6], out[7], out[3]), 0.5)
    _backward_close(got, want, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("tol", [0.0, 1e-3])
def test_sinkhorn_cuda_empty_batch(tol, dtype):
    s = torch.empty(0, 4, dtype=dtype)
    cpu = SINKHORN(s.float(), eps=0.5, max_iter=7, tol=tol)
    gpu = SINKHORN(s.cuda(), eps=0.5, max_iter=7, tol=tol)
    _assert_outputs_close(gpu, cpu)
    assert gpu[3].item() == 0 and gpu[2].shape == (4,) and not gpu[6].any()
    grad = BACKWARD(
        torch.empty(0, 4, device="cuda"),
        torch.empty(0, device="cuda"),
        torch.zeros(4, device="cuda"),
        s.cuda(),
        gpu[6],
        gpu[7],
        gpu[3],
        0.5,
    )
    assert grad.shape == (0, 4) and grad.device.type == "cuda" and grad.dtype == dtype


# --- tolerance stop -----------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("check_every", [1, 7, 10])
def test_sinkhorn_cuda_tolerance_stops_like_cpu(check_every):
    s = _scores(500, 6, scale=1.0)
    kw = dict(eps=1.0, max_iter=1000, tol=1e-3, check_every=check_every)
    cpu = SINKHORN(s, **kw)
    gpu = SINKHORN(s.cuda(), **kw)
    n, n_cpu = gpu[3].item(), cpu[3].item()
    assert n < 1000 and n % check_every == 0
    # col_err crosses 1e-3 within float32 noise of it (1.01e-3 at iteration 5), so the two may
    # stop one check apart
    assert abs(n - n_cpu) <= check_every
    assert gpu[4].item() <= 1e-3 and gpu[5].item() <= 1e-3
    # f_hist / g_hist rows past iters_done stay zero
    assert not gpu[6][n:].any() and not gpu[7][n:].any()
    assert gpu[6][n - 1].abs().sum() > 0
    # the same iterations without the checks give the same bits
    fixed = SINKHORN(s.cuda(), eps=1.0, max_iter=n)
    for a, b in zip(fixed[:6], gpu[:6]):
        assert torch.equal(a, b)
    if n == n_cpu:
        _assert_outputs_close(gpu, cpu)


@pytest.mark.cuda
def test_sinkhorn_backward_cuda_after_an_early_stop_matches_cpu():
    # iters_done < max_iter: the backward's steps past n return at once on the device.
    T, E = 300, 5
    s = _scores(T, E, scale=1.0)
    out = SINKHORN(s, eps=1.0, max_iter=200, tol=1e-3, check_every=5)
    assert out[3].item() < 200
    g_plan, g_f, g_g = _grads(T, E)
    args = (out[6], out[7], out[3])
    want = BACKWARD(g_plan, g_f, g_g, s, *args, 1.0)
    got = BACKWARD(*_cuda(g_plan, g_f, g_g, s, *args), 1.0)
    _backward_close(got, want, torch.float32)


# --- determinism, syncs, graphs -----------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("T,E", [(5000, 16), (300, 300)], ids=["T5000-E16", "T300-E300"])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
def test_sinkhorn_cuda_is_deterministic_and_sync_free(dtype, T, E):
    s = _scores(T, E, dtype, device="cuda")
    g_plan, g_f, g_g = _cuda(*_grads(T, E))
    runs = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            out = SINKHORN(s, eps=0.3, max_iter=25)
            grad = BACKWARD(g_plan, g_f, g_g, s, out[6], out[7], out[3], 0.3)
            runs.append((*out, grad))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    first, second = runs
    assert len(first) == 9
    for name, a, b in zip((*NAMES, "grad"), first, second):
        assert torch.equal(a, b), name


@pytest.mark.cuda
def test_sinkhorn_cuda_tolerance_check_is_the_one_sync():
    s = _scores(100, 4, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            SINKHORN(s, eps=1.0, max_iter=50, tol=1e-3, check_every=10)
        SINKHORN(s, eps=1.0, max_iter=50, tol=1e-3, check_every=60)  # no check before max_iter
        SINKHORN(s, eps=1.0, max_iter=50, tol=1e-3, check_every=50)  # nor at i == max_iter
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_sinkhorn_cuda_graph_capture_and_replay():
    T, E = 700, 12
    static = _scores(T, E, device="cuda")
    g_plan, g_f, g_g = _cuda(*_grads(T, E))

    def fn(s):
        out = SINKHORN(s, eps=0.5, max_iter=15)
        return (*out, BACKWARD(g_plan, g_f, g_g, s, out[6], out[7], out[3], 0.5))

    graph, captured = capture_cuda_graph(lambda: fn(static))
    for _ in range(2):
        fresh = _scores(T, E, device="cuda")
        static.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        for name, a, b in zip((*NAMES, "grad"), captured, fn(fresh)):
            assert torch.equal(a, b), name


# --- large logits, errors -----------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
def test_sinkhorn_cuda_large_logits_stay_finite(dtype):
    # §10.10: |scores| ~ 1e4 with eps = 0.05, so |S| ~ 1e6 where a float32 ulp is 0.06: the
    # plan's rows still carry their mass to within that rounding (measured on the CPU: 0.06).
    T, E = 512, 8
    s = _scores(T, E, dtype, scale=1e4, device="cuda")
    out = SINKHORN(s, eps=0.05, max_iter=100)
    for name, t in zip(NAMES, out):
        assert torch.isfinite(t.float()).all(), name
    rows = out[0].exp().sum(1)
    torch.testing.assert_close(rows, torch.ones_like(rows), atol=0.25, rtol=0)
    g_plan, g_f, g_g = _cuda(*_grads(T, E))
    grad = BACKWARD(g_plan * out[0].exp(), g_f, g_g, s, out[6], out[7], out[3], 0.05)
    assert grad.dtype == dtype and torch.isfinite(grad.float()).all()


@pytest.mark.cuda
def test_sinkhorn_cuda_rejects_float64_and_mixed_devices():
    s = _scores(8, 4, device="cuda")
    with pytest.raises(RuntimeError, match="float64 is supported on CPU only"):
        SINKHORN(s.double(), eps=0.5, max_iter=3)
    out = SINKHORN(s, eps=0.5, max_iter=3)
    g_plan, g_f, g_g = _cuda(*_grads(8, 4))
    with pytest.raises(RuntimeError, match="iters_done must be on"):
        BACKWARD(g_plan, g_f, g_g, s, out[6], out[7], out[3].cpu(), 0.5)
    with pytest.raises(RuntimeError, match="grad_log_plan must be on"):
        BACKWARD(g_plan.cpu(), g_f, g_g, s, out[6], out[7], out[3], 0.5)
    with pytest.raises(RuntimeError, match="f_hist must be on"):  # scores on the CPU, rest CUDA
        BACKWARD(g_plan.cpu(), g_f.cpu(), g_g.cpu(), s.cpu(), out[6], out[7], out[3], 0.5)
    with pytest.raises(RuntimeError, match="float64 is supported on CPU only"):
        BACKWARD(
            g_plan.double(),
            g_f.double(),
            g_g.double(),
            s.double(),
            out[6].double(),
            out[7].double(),
            out[3],
            0.5,
        )
