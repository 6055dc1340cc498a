import io

import pytest
import torch
from torch import nn

from smoe import Experts, MoELayer
from smoe import reference as ref
from tests.helpers import capture_cuda_graph


def reference_output(layer: MoELayer, x: torch.Tensor, capacity=None):
    return ref.moe_layer(
        x,
        layer.router.weight,
        layer.experts.w_in,
        layer.experts.w_out,
        layer.router.k,
        activation=layer.experts.activation,
        renormalize=layer.router.renormalize,
        capacity=capacity,
    )


@pytest.mark.parametrize("activation", ["gelu", "swiglu", "relu", "gelu_tanh"])
@pytest.mark.parametrize(
    "T,E,k", [(0, 4, 2), (1, 1, 1), (9, 4, 2), (9, 4, 4), (33, 16, 3)], ids=lambda v: str(v)
)
def test_layer_matches_reference(T, E, k, activation):
    layer = MoELayer(12, 20, E, k, activation=activation).double()
    x = torch.randn(T, 12, dtype=torch.float64)
    y, aux = layer(x)
    torch.testing.assert_close(y, reference_output(layer, x))
    assert aux.tokens_per_expert.sum() == T * k


def test_layer_with_capacity_matches_reference_and_drops():
    layer = MoELayer(8, 16, 4, 2, capacity_factor=0.5).double()
    x = torch.randn(40, 8, dtype=torch.float64)
    y, aux = layer(x)
    cap = ref.capacity_for(40, 2, 4, 0.5)
    torch.testing.assert_close(y, reference_output(layer, x, capacity=cap))
    assert (aux.tokens_per_expert <= cap).all() and aux.dropped_fraction > 0


def test_layer_keeps_leading_dims_and_noncontiguous_input():
    layer = MoELayer(8, 16, 4, 2)
    x = torch.randn(3, 5, 16)[..., ::2]
    y, _ = layer(x)
    assert y.shape == (3, 5, 8)
    torch.testing.assert_close(y, layer(x.contiguous())[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_runs_in_half_precision(dtype):
    layer = MoELayer(16, 32, 4, 2)
    x = torch.randn(20, 16)
    y32, _ = layer(x)
    y, _ = layer.to(dtype)(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), y32, atol=5e-2, rtol=5e-2)


def test_layer_gradients_match_reference():
    layer = MoELayer(6, 10, 3, 2, activation="swiglu").double()
    x = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    params = [x, layer.router.weight, layer.experts.w_in, layer.experts.w_out]
    g = torch.randn(11, 6, dtype=torch.float64)
    got = torch.autograd.grad(layer(x)[0], params, g)
    want = torch.autograd.grad(reference_output(layer, x), params, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


class TimmMlp(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LlamaMlp(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize(
    "dense",
    [TimmMlp(8, 24), LlamaMlp(8, 24), nn.Sequential(nn.Linear(8, 24), nn.GELU(), nn.Linear(24, 8))],
    ids=["timm", "llama", "sequential"],
)
def test_from_dense_upcycling_reproduces_the_dense_ffn(dense):
    layer = MoELayer.from_dense(dense, num_experts=4, k=2)
    x = torch.randn(2, 7, 8)
    # renormalised weights sum to 1 and every expert is the dense FFN: output == dense output
    torch.testing.assert_close(layer(x)[0], dense(x), atol=1e-5, rtol=1e-5)


def test_from_dense_rejects_unknown_ffn():
    with pytest.raises(ValueError, match="Experts.from_dense"):
        Experts.from_dense(nn.Linear(4, 4), 2)


def test_layer_state_dict_round_trip():
    a = MoELayer(8, 16, 4, 2, activation="swiglu", bias=True)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = MoELayer(8, 16, 4, 2, activation="swiglu", bias=True)
    b.load_state_dict(torch.load(buf))
    assert sorted(a.state_dict()) == [
        "experts.b_in",
        "experts.b_out",
        "experts.w_in",
        "experts.w_out",
        "router.weight",
    ]
    x = torch.randn(10, 8)
    assert torch.equal(a(x)[0], b(x)[0])


@pytest.mark.parametrize("dynamic", [False, True])
def test_layer_compiles_fullgraph_forward_and_backward(dynamic):
    layer = MoELayer(16, 32, 4, 2, activation="swiglu", capacity_factor=1.5)
    x = torch.randn(2, 24, 16, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    (y1, a1), (y2, a2) = layer(x), compiled(x)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(a1.losses["balance"], a2.losses["balance"])
    g1 = torch.autograd.grad((y1.square().sum() + a1.loss()), [x, *layer.parameters()])
    g2 = torch.autograd.grad((y2.square().sum() + a2.loss()), [x, *layer.parameters()])
    for u, v in zip(g1, g2):
        torch.testing.assert_close(u, v)


@pytest.mark.slow
def test_layer_compiles_with_inductor():
    layer = MoELayer(16, 32, 4, 2)
    x = torch.randn(40, 16, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x)[0], layer(x)[0], atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(compiled(x)[0].sum(), x)
    torch.testing.assert_close(
        g, torch.autograd.grad(layer(x)[0].sum(), x)[0], atol=1e-5, rtol=1e-5
    )


def test_layer_is_deterministic():
    layer = MoELayer(32, 64, 8, 2)
    x = torch.randn(300, 32)
    runs = []
    for _ in range(2):
        y, _ = layer(x)
        runs.append(torch.autograd.grad(y.sin().sum(), list(layer.parameters())))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_layer_rejects_bad_input():
    layer = MoELayer(8, 16, 4, 2)
    with pytest.raises(ValueError, match="d_model=8"):
        layer(torch.randn(3, 9))
    with pytest.raises(ValueError, match="capacity_factor"):
        MoELayer(8, 16, 4, 2, capacity_factor=0)
    with pytest.raises(ValueError, match="activation"):
        MoELayer(8, 16, 4, 2, activation="tanh")
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="expert_dropout"):
            MoELayer(8, 16, 4, 2, expert_dropout=bad)
        with pytest.raises(ValueError, match="dropout"):
            Experts(4, 8, 16, dropout=bad)
    with pytest.raises(ValueError, match="expert_dropout applies to experts='ffn'"):
        MoELayer(8, 16, 4, 2, experts="base_stack", expert_dropout=0.1)


def test_relu_experts_with_biases_match_the_reference():
    torch.manual_seed(0)
    ex = Experts(3, 6, 10, "relu", bias=True).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    offsets = torch.tensor([0, 2, 2, 7])
    want = torch.cat(
        [
            ref.expert_ffn(x[a:b], ex.w_in[e], ex.w_out[e], "relu", ex.b_in[e], ex.b_out[e])
            for e, (a, b) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist()))
        ]
    )
    torch.testing.assert_close(ex(x, offsets), want)


def test_expert_dropout_acts_on_the_hidden_activations_in_training_only():
    torch.manual_seed(0)
    ex = Experts(2, 6, 10, "relu", dropout=0.5).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    offsets = torch.tensor([0, 3, 5])
    rows = [(0, 3), (3, 5)]

    def manual(drop):
        h = torch.cat([x[a:b] @ ex.w_in[e].T for e, (a, b) in enumerate(rows)])
        a = drop(torch.relu(h))
        return torch.cat([a[a0:b0] @ ex.w_out[e].T for e, (a0, b0) in enumerate(rows)])

    torch.manual_seed(1)
    got = ex(x, offsets)
    torch.manual_seed(1)
    want = manual(lambda a: torch.nn.functional.dropout(a, 0.5, True))
    torch.testing.assert_close(got, want)
    assert not torch.equal(got, manual(lambda a: a))  # the mask did something
    ex.eval()
    torch.testing.assert_close(ex(x, offsets), manual(lambda a: a))
    assert "dropout=0.5" in repr(ex)


def test_layer_training_on_quickdraw_lowers_the_loss():
    from smoe.examples.quickdraw_moe import train

    results = train(epochs=2, num_experts=4, k=2, limit=4096, progress=False)
    assert results[-1].train_loss < results[0].train_loss
    assert results[-1].test_accuracy > 0.5  # 9 classes: chance is 0.11
    assert all(share > 0 for share in results[-1].load)


@pytest.mark.cuda
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_layer_cuda_matches_cpu_forward_and_backward(activation):
    layer = MoELayer(32, 64, 8, 2, activation=activation, capacity_factor=1.25)
    x = torch.randn(3, 50, 32, requires_grad=True)
    y, aux = layer(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
    gpu = layer.cuda()
    xg = x.detach().cuda().requires_grad_()
    yg, auxg = gpu(xg)
    grads_g = torch.autograd.grad(yg.square().sum(), [xg, *gpu.parameters()])
    torch.testing.assert_close(yg.cpu(), y, atol=1e-4, rtol=1e-4)
    assert torch.equal(auxg.tokens_per_expert.cpu(), aux.tokens_per_expert)
    for a, b in zip(grads_g, grads):
        torch.testing.assert_close(a.cpu(), b, atol=1e-3, rtol=1e-3)


@pytest.mark.cuda
def test_layer_cuda_graph_capture_and_replay():
    layer = MoELayer(32, 64, 8, 2, activation="swiglu").cuda().eval()
    static_x = torch.randn(128, 32, device="cuda")
    with torch.no_grad():
        graph, (static_y, _) = capture_cuda_graph(lambda: layer(static_x))
        new_x = torch.randn(128, 32, device="cuda")
        static_x.copy_(new_x)
        graph.replay()
        torch.testing.assert_close(static_y, layer(new_x)[0])


@pytest.mark.cuda
def test_layer_cuda_forward_has_no_host_sync():
    layer = MoELayer(32, 64, 8, 2, capacity_factor=1.0).cuda()
    x = torch.randn(256, 32, device="cuda")
    layer(x)
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, aux = layer(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert y.shape == x.shape


@pytest.mark.parametrize("router", ["topk", "noisy_topk", "vmoe", "expert_choice"])
def test_layer_float64_routes_in_float64(router):
    # "at least float32": a float64 layer keeps float64 through the gate (gradcheck-able)
    layer = MoELayer(8, 16, 4, 2, router=router).double()
    x = torch.randn(12, 8, dtype=torch.float64)
    routing = layer.router(x)
    assert routing.logits.dtype == routing.weight.dtype == torch.float64
    y, _ = layer(x)
    assert y.dtype == torch.float64
    half = MoELayer(8, 16, 4, 2, router=router).to(torch.bfloat16)
    r16 = half.router(x.to(torch.bfloat16))
    assert r16.logits.dtype == r16.weight.dtype == torch.float32  # upcast, not kept in bf16
