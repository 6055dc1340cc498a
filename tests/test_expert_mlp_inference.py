"""Where smoe's modules run the fused expert MLP (smoe.ops.expert_mlp): MoELayer/Experts and
transformers' experts_implementation="smoe" forward without a gradient, at sizes past the fusion
rule; the result equals the training path's, and training, dropout and small calls keep the
unfused chain."""

from __future__ import annotations

import pytest
import torch

from smoe import MoELayer, ops
from tests.helpers import op_calls


def _ran_expert_mlp(fn) -> bool:
    return op_calls(fn)[1]["smoe::expert_mlp"] > 0


def _layer(**kw):
    torch.manual_seed(0)
    return MoELayer(64, 256, num_experts=4, k=2, activation="swiglu", **kw)


X = torch.randn(2, 700, 64, generator=torch.Generator().manual_seed(1))  # 2800 rows x 512 hidden


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen"])
def test_layer_forward_without_gradient_runs_the_fused_op_with_the_training_result(mode):
    layer = _layer().eval()
    want = layer(X)[0].detach()
    if mode == "frozen":  # grad mode on, but nothing requires a gradient
        layer.requires_grad_(False)
        run = lambda: layer(X)  # noqa: E731
    else:
        ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode

        def run():
            with ctx():
                return layer(X)

    assert _ran_expert_mlp(run)
    torch.testing.assert_close(run()[0], want, atol=1e-5, rtol=1e-5)


def test_training_small_calls_and_dropout_keep_the_unfused_chain():
    layer = _layer()
    assert not _ran_expert_mlp(lambda: layer(X))  # the weights need gradients
    with torch.no_grad():
        assert not _ran_expert_mlp(lambda: layer(X[:, :20]))  # a hidden under 4 MiB
        dropped = MoELayer(64, 256, num_experts=4, k=2, activation="swiglu", expert_dropout=0.1)
        assert dropped.experts.drop is not None
        assert not _ran_expert_mlp(lambda: dropped.train()(X))  # active dropout
        assert _ran_expert_mlp(lambda: dropped.eval()(X))


def test_bf16_inference_is_close_to_the_training_path():
    layer = _layer().bfloat16().eval()
    x = X.bfloat16()
    want = layer(x)[0].detach()
    with torch.inference_mode():
        got = layer(x)[0]
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_transformers_experts_inference_runs_the_fused_op():
    pytest.importorskip("transformers")
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    import smoe.integrations.transformers  # noqa: F401  (registers "smoe")

    cfg = MixtralConfig(hidden_size=64, intermediate_size=256, num_local_experts=4)
    cfg._experts_implementation = "smoe"
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():  # a bare module's parameters are uninitialised
        for p in block.parameters():
            p.normal_(0.0, 0.05)
    x = X.clone()
    want = block(x)
    want = want[0] if isinstance(want, tuple) else want
    with torch.no_grad():
        assert _ran_expert_mlp(lambda: block(x))
        got = block(x)
    got = got[0] if isinstance(got, tuple) else got
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)
    assert ops.experts.FUSE_MIN_BYTES < 1400 * 2 * 512 * 4


def test_compiled_inference_runs_the_fused_op_without_graph_breaks():
    layer = _layer().eval()
    compiled = torch.compile(lambda t: layer(t)[0], fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        want = layer(X)[0]
        assert _ran_expert_mlp(lambda: compiled(X))
        torch.testing.assert_close(compiled(X), want)


def test_dynamic_compile_decides_the_size_rule_when_the_graph_runs():
    """Under torch.compile(dynamic=True) the token count is symbolic: the graph holds the
    expert_mlp op with the 4 MiB rule as its fuse_min_bytes, so one graph runs the fused items at
    a large length and the unfused chain (inside the op) at a small one, with eager's bits."""
    from torch._dynamo.testing import CompileCounterWithBackend

    layer = _layer().eval()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda t: layer(t)[0], dynamic=True, fullgraph=True, backend=counter)
    with torch.no_grad():
        for n, fused in ((20, False), (700, True), (33, False)):
            x = X[:, :n].clone()  # not a view: a view of X would recompile on its own account
            got, calls = op_calls(lambda x=x: compiled(x))
            assert calls["smoe::expert_mlp"]
            assert (calls["smoe::grouped_mm"] == 0) == fused, x.shape
            assert torch.equal(got, layer(x)[0])
    assert counter.frame_count == 1
