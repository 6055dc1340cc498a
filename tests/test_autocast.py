"""Autocast rules (csrc/autocast.cpp): under torch.autocast the experts' GEMMs run in the autocast
dtype, as nn.Linear's do; float64 is left alone; outside autocast nothing changes."""

from __future__ import annotations

import pytest
import torch

from smoe import MoELayer

LOW = [torch.bfloat16, torch.float16]


def _grouped(device: str, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 16, generator=g, dtype=dtype).to(device)
    w = torch.randn(3, 16, 8, generator=g, dtype=dtype).to(device)
    offsets = torch.tensor([0, 4, 4, 9], device=device)
    return x, w, offsets


def _check_grouped_mm(device: str, low: torch.dtype) -> None:
    x, w, offsets = _grouped(device)
    with torch.autocast(device, dtype=low):
        out = torch.ops.smoe.grouped_mm(x, w, offsets)
    assert out.dtype == low
    want = torch.ops.smoe.grouped_mm(x.to(low), w.to(low), offsets)
    assert torch.equal(out, want)
    plain = torch.ops.smoe.grouped_mm(x, w, offsets)  # autocast off: float32 as before
    assert plain.dtype == torch.float32


@pytest.mark.parametrize("low", LOW)
def test_grouped_mm_runs_in_the_autocast_dtype(low):
    _check_grouped_mm("cpu", low)


def test_float64_is_left_alone_under_autocast():
    x, w, offsets = _grouped("cpu", torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.ops.smoe.grouped_mm(x, w, offsets)
    assert out.dtype == torch.float64
    assert torch.equal(out, torch.ops.smoe.grouped_mm(x, w, offsets))


def test_autocast_of_another_device_type_changes_nothing():
    x, w, offsets = _grouped("cpu")
    with torch.autocast("cuda", dtype=torch.float16, enabled=torch.cuda.is_available()):
        assert torch.ops.smoe.grouped_mm(x, w, offsets).dtype == torch.float32


def _layer(activation: str, bias: bool, device: str = "cpu") -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(16, 32, 4, 2, activation=activation, bias=bias).to(device)


def _check_layer(device: str, low: torch.dtype, activation: str, bias: bool) -> None:
    layer = _layer(activation, bias, device)
    x = torch.randn(12, 16, device=device, requires_grad=True)
    with torch.autocast(device, dtype=low):
        y, _ = layer(x)
    assert y.dtype == low  # as nn.Linear under autocast
    ref, _ = layer(x)
    assert ref.dtype == torch.float32
    tol = 3e-2 if low == torch.bfloat16 else 5e-3
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol)
    y.float().square().sum().backward()
    # the parameters stay float32 and get float32 gradients through the casts
    assert layer.experts.w_in.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gelu", True)])
def test_moe_layer_runs_its_experts_in_the_autocast_dtype(low, activation, bias):
    _check_layer("cpu", low, activation, bias)


def test_moe_layer_under_autocast_compiles_without_graph_breaks():
    layer = _layer("swiglu", False)
    x = torch.randn(12, 16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = compiled(x)
        want, _ = layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, want)


@pytest.mark.cuda
@pytest.mark.parametrize("low", LOW)
def test_grouped_mm_runs_in_the_autocast_dtype_cuda(low):
    _check_grouped_mm("cuda", low)
    _check_layer("cuda", low, "swiglu", False)
