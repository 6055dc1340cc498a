"""Shared experts of MoELayer (DeepSeek-MoE / V3: always on, added; Qwen2-MoE: sigmoid-gated)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smoe import MoELayer

D, F_, E = 16, 24, 4


def _layer(**kw) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(D, F_, E, 2, activation="swiglu", **kw)


def _dense_swiglu(x, w_in, w_out):
    h = x @ w_in.T
    f = h.shape[-1] // 2
    return (F.silu(h[..., :f]) * h[..., f:]) @ w_out.T


@pytest.mark.parametrize("gate", [None, "sigmoid"])
def test_shared_experts_add_a_dense_ffn_of_n_times_the_width(gate):
    layer = _layer(shared_experts=2, shared_d_ff=8, shared_gate=gate)
    plain = _layer()
    plain.load_state_dict(
        {k: v for k, v in layer.state_dict().items() if not k.startswith("shared")}
    )
    x = torch.randn(3, 5, D, requires_grad=True)
    y, _ = layer(x)
    routed, _ = plain(x)
    sh = layer.shared
    assert sh.w_in.shape == (1, 2 * 2 * 8, D) and sh.w_out.shape == (1, D, 16)
    extra = _dense_swiglu(x, sh.w_in[0], sh.w_out[0])
    if gate == "sigmoid":
        extra = extra * torch.sigmoid(x @ layer.shared_gate.weight.T)
    torch.testing.assert_close(y, routed + extra, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert sh.w_in.grad is not None and sh.w_in.grad.abs().sum() > 0
    if gate:
        assert layer.shared_gate.weight.grad.abs().sum() > 0


def test_shared_experts_state_dict_round_trip_freeze_and_zero_tokens():
    a, b = _layer(shared_experts=1, shared_gate="sigmoid"), _layer(shared_experts=1)
    assert {"shared.w_in", "shared.w_out", "shared_gate.weight"} <= set(a.state_dict())
    c = _layer(shared_experts=1, shared_gate="sigmoid")
    with torch.no_grad():
        c.shared.w_in.add_(1.0)
    c.load_state_dict(a.state_dict())
    x = torch.randn(7, D)
    assert torch.equal(c(x)[0], a(x)[0])
    assert "shared_gate.weight" not in b.state_dict()
    a.freeze()
    assert not a.shared.w_in.requires_grad
    y, aux = a(torch.randn(0, D))
    assert y.shape == (0, D)


def test_shared_experts_compile_without_graph_breaks():
    layer = _layer(shared_experts=1, shared_gate="sigmoid")
    x = torch.randn(2, 5, D)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x)[0], layer(x)[0])


@pytest.mark.parametrize(
    "kw,name",
    [
        ({"shared_experts": -1}, "shared_experts"),
        ({"shared_experts": 1.5}, "shared_experts"),
        ({"shared_experts": 1, "shared_d_ff": 0}, "shared_d_ff"),
        ({"shared_experts": 1, "shared_gate": "tanh"}, "shared_gate"),
        ({"shared_gate": "sigmoid"}, "shared_experts"),
        ({"shared_d_ff": 8}, "shared_experts"),
    ],
)
def test_bad_shared_options_are_refused(kw, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        _layer(**kw)
