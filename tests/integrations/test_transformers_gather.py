"""A transformers experts module run through smoe in training, past the size rule: the first
GEMM gathers the tokens through the plan (smoe.ops.gather_mm), and the output and every gradient
equal the permute -> grouped_mm path's bitwise."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

pytest.importorskip("transformers")

import smoe.integrations.transformers as smoe_tf  # noqa: E402
from smoe import ops  # noqa: E402
from tests.integrations.tiny_models import build  # noqa: E402


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])  # gated SwiGLU; GPT-OSS with biases
def test_training_call_gathers_and_matches_the_permute_path(name):
    experts = build(name, experts_implementation="smoe").model.layers[0].mlp.experts.train()
    T, k, d = 16500, 2, experts.gate_up_proj.shape[-1 if name == "mixtral" else 1]
    assert T * k * d * 4 > ops.experts.FUSE_MIN_BYTES  # the grouped rows pass the size rule
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, d, generator=g)
    index = torch.rand(T, experts.num_experts, generator=g).topk(k, dim=-1).indices
    weight = torch.rand(T, k, generator=g)

    def step():
        xs = x.clone().requires_grad_()
        experts.zero_grad()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y = smoe_tf.smoe_experts_forward(experts, xs, index, weight)
        y.square().sum().backward()
        names = {e.name for e in prof.events()}
        return names, [y, xs.grad, *(p.grad for p in experts.parameters())]

    names, gathered = step()
    assert "smoe::gather_mm" in names and "smoe::permute" not in names
    with mock.patch.object(smoe_tf, "gathers", lambda x, plan: False):
        names, permuted = step()
    assert "smoe::permute" in names and "smoe::gather_mm" not in names
    for a, b in zip(gathered, permuted):
        assert torch.equal(a, b)
