"""The CPU expert GEMMs' 16-bit path (csrc/cpu/gemm16.h): ATen's own bf16/fp16 mm, or the float32
GEMM on upcast inputs rounded once, chosen per CPU ("auto") or forced through SMOE_CPU_GEMM16 /
``_C.set_cpu_gemm16``. Both paths are tested on every machine, whichever "auto" picks here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from smoe import _C, ops
from smoe import reference as ref
from tests.helpers import assert_low_precision_close

LOW = [torch.bfloat16, torch.float16]
MODES = ["native", "upcast"]


@pytest.fixture
def gemm16():
    """Sets the path for one test; puts "auto" back after it."""
    yield _C.set_cpu_gemm16
    _C.set_cpu_gemm16("auto")


def _grouped_case(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = [70, 0, 33, 140]
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    x = torch.randn(sum(counts) + 3, 40, generator=g)  # 3 rows past offsets[E]
    w = (torch.randn(4, 24, 40, generator=g) / 40**0.5).transpose(1, 2)  # transposed view
    bias = torch.randn(4, 24, generator=g)
    return x.to(dtype), w.to(dtype), bias.to(dtype), offsets


def _grouped_ref(x, w, bias, offsets):
    """smoe.reference.grouped_mm in float64 on the values of x, w and bias (differentiable)."""
    return ref.grouped_mm(x.double(), w.double(), offsets, bias.double())


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("mode", MODES)
def test_grouped_mm_and_its_gradients_match_the_reference_on_both_paths(gemm16, mode, dtype):
    gemm16(mode)
    x, w, bias, offsets = _grouped_case(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, w, bias)]
    y = ops.grouped_mm(leaves[0], leaves[1], offsets, leaves[2])
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = torch.autograd.grad(y, leaves, g)
    leaves64 = [t.double().requires_grad_() for t in (x, w, bias)]
    y64 = _grouped_ref(*leaves64, offsets)
    want = torch.autograd.grad(y64, leaves64, g.double())
    # the same math in float32, rounded once: what either path must be within rounding of
    leaves32 = [t.float().requires_grad_() for t in (x, w, bias)]
    y32 = _grouped_ref(*leaves32, offsets)
    want32 = torch.autograd.grad(y32, leaves32, g.float())
    assert y.dtype == dtype and torch.all(y[-3:] == 0)
    assert_low_precision_close(y, y64.detach(), y32.detach().to(dtype))
    for a, e64, e32 in zip(got, want, want32, strict=True):
        assert a.dtype == dtype
        assert_low_precision_close(a, e64, e32.to(dtype))


@pytest.mark.parametrize("dtype", LOW)
def test_the_upcast_path_is_the_float32_gemm_rounded_once(gemm16, dtype):
    gemm16("upcast")
    x, w, bias, offsets = _grouped_case(dtype, seed=3)
    y = ops.grouped_mm(x, w, offsets, bias)
    exact = _grouped_ref(x, w, bias, offsets)  # float64: float32 accumulation errs far below
    eps = torch.finfo(dtype).eps  # the spacing at 1; rounding once errs by at most half of it
    err = (y.double() - exact).abs()
    bound = exact.abs() * (eps / 2) * 1.01 + 1e-6
    assert bool((err <= bound).all()), float((err / bound).max())


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("mode", MODES)
def test_expert_mlp_equals_the_unfused_chain_bitwise_on_both_paths(gemm16, mode, dtype):
    gemm16(mode)
    g = torch.Generator().manual_seed(2)
    T, d, f, E = 300, 32, 24, 4
    x = torch.randn(T, d, generator=g).to(dtype)
    plan = ops.make_plan(torch.rand(T, E, generator=g).topk(2, dim=-1).indices.int(), E)
    w_in = (torch.randn(E, 2 * f, d, generator=g) / d**0.5).to(dtype).transpose(1, 2)
    w_out = (torch.randn(E, d, f, generator=g) / f**0.5).to(dtype).transpose(1, 2)
    kw = dict(activation="swiglu", plan=plan)
    fused = ops.expert_mlp(x, plan.offsets, w_in, w_out, fused=True, **kw)
    chain = ops.expert_mlp(x, plan.offsets, w_in, w_out, fused=False, **kw)
    assert torch.equal(fused, chain)
    want = ref.expert_mlp(x.double(), plan.offsets, w_in.double(), w_out.double(), **kw)
    assert_low_precision_close(fused, want, chain)


def test_the_upcast_path_is_deterministic_across_thread_counts(gemm16):
    gemm16("upcast")
    x, w, bias, offsets = _grouped_case(torch.bfloat16, seed=4)
    g = torch.randn(x.shape[0], 24).bfloat16()
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            y = ops.grouped_mm(x, w, offsets, bias)
            gx, gw = torch.ops.smoe.grouped_mm_backward(g, x, w, offsets, True, True)
            runs.append((y, gx, gw))
    finally:
        torch.set_num_threads(before)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run, strict=True))


def test_auto_upcasts_exactly_where_onednn_has_no_16bit_kernel(gemm16):
    gemm16("auto")
    native = {
        "bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
        "fp16": torch.ops.mkldnn._is_mkldnn_fp16_supported(),
    }
    line = _C.cpu_gemm16_path()
    assert line.startswith("CPU 16-bit expert GEMMs (grouped_mm, gather_mm, expert_mlp): ")
    for name, has in native.items():
        part = line.split(f"{name} ", 1)[1]
        want = "ATen's 16-bit mm" if has else "float32 GEMM on upcast inputs"
        assert part.startswith(want), line
        # the decision itself, as a bool (what benchmarks/common.limit_dtype reads)
        assert _C.cpu_gemm16_upcasts({"bf16": "bfloat16", "fp16": "float16"}[name]) == (not has)
    with torch.backends.mkldnn.flags(enabled=False):
        off = _C.cpu_gemm16_path()
        assert _C.cpu_gemm16_upcasts("bfloat16") and _C.cpu_gemm16_upcasts("float16")
    assert off.count("float32 GEMM on upcast inputs (torch.backends.mkldnn is disabled)") == 2


@pytest.mark.parametrize("mode", MODES)
def test_a_forced_mode_is_reported(gemm16, mode):
    gemm16(mode)
    line = _C.cpu_gemm16_path()
    assert line.count(f"(SMOE_CPU_GEMM16={mode})") == 2
    want = "float32 GEMM on upcast inputs" if mode == "upcast" else "ATen's 16-bit mm"
    assert line.count(want) == 2
    for dtype in ("bfloat16", "float16"):
        assert _C.cpu_gemm16_upcasts(dtype) == (mode == "upcast")


def test_the_upcast_query_rejects_what_is_not_a_16bit_dtype_name():
    with pytest.raises(ValueError, match=r"dtype must be \"bfloat16\" or \"float16\", got 'bf16'"):
        _C.cpu_gemm16_upcasts("bf16")
    with pytest.raises(TypeError, match="dtype must be a str"):
        _C.cpu_gemm16_upcasts(torch.bfloat16)


def test_set_cpu_gemm16_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match='mode must be "auto", "native" or "upcast", got "fast"'):
        _C.set_cpu_gemm16("fast")
    with pytest.raises(TypeError, match="mode must be a str"):
        _C.set_cpu_gemm16(1)
    assert "SMOE_CPU_GEMM16=" not in _C.cpu_gemm16_path()  # the failed calls changed nothing


def _run(code: str, value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SMOE_CPU_GEMM16=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_the_environment_variable_sets_the_mode():
    out = _run("from smoe import _C; print(_C.cpu_gemm16_path())", "upcast")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("(SMOE_CPU_GEMM16=upcast)") == 2


def test_a_bad_environment_variable_is_an_error_that_names_it():
    code = (
        "import torch, smoe\n"
        "x = torch.randn(4, 8).bfloat16(); w = torch.randn(1, 8, 3).bfloat16()\n"
        "smoe.ops.grouped_mm(x, w, torch.tensor([0, 4]))\n"
    )
    out = _run(code, "fastest")
    assert out.returncode != 0
    assert 'SMOE_CPU_GEMM16 must be "auto", "native" or "upcast", got "fastest"' in out.stderr


def _upcasts(fn) -> int:
    """How many float32 copies an op made (one work item: it runs on the calling thread)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events()].count("aten::_to_copy")


@pytest.mark.parametrize(("mode", "rows", "output_major", "upcasts"), [
    ("upcast", 5, True, 0), ("upcast", 6, True, 2), ("upcast", 1, False, 2),
    ("native", 6, True, 0), ("native", 1, False, 0),
])  # fmt: skip
def test_few_rows_over_an_output_major_weight_keep_the_native_dot_products(
    gemm16, mode, rows, output_major, upcasts
):
    # decoding: ATen's fallback runs a few rows against a weight stored [out, in] (how Experts
    # hands its weights over) as dot products that read each weight once, faster than upcasting
    # the block first; against a row-major [in, out] weight its scalar loop is slower at any M
    gemm16(mode)
    x = torch.randn(rows, 64).bfloat16()
    w = (
        torch.randn(1, 30, 64).bfloat16().transpose(1, 2)
        if output_major
        else torch.randn(1, 64, 30)
    )
    w = w.bfloat16()
    assert _upcasts(lambda: ops.grouped_mm(x, w, torch.tensor([0, rows]))) == upcasts
