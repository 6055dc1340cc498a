"""smoe.convert(model, layer="s2moe") on tiny random transformers models (issue 27): S2MoE
around the converted blocks, its training path, eval equal to the plain conversion, its loss,
unconvert, and the errors."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import smoe  # noqa: E402
from smoe.integrations.convert_s2moe import ConvertedS2MoE, s2moe_loss  # noqa: E402
from tests.integrations.tiny_models import build, token_ids  # noqa: E402


def _blocks(model) -> list[ConvertedS2MoE]:
    return [m for m in model.modules() if isinstance(m, ConvertedS2MoE)]


@pytest.mark.parametrize("name", ["mixtral", "olmoe", "qwen2_moe"])
def test_eval_equals_the_plain_conversion_and_training_runs_both_paths(name):
    torch.manual_seed(0)
    plain = smoe.convert(build(name)).eval()
    with torch.no_grad():
        want = plain(token_ids()).logits
    torch.manual_seed(0)
    model = smoe.convert(build(name), layer="s2moe").eval()
    blocks = _blocks(model)
    assert len(blocks) == 2 and all(hasattr(b, "s2moe_gate") for b in blocks)
    state = torch.get_rng_state()
    with torch.no_grad():
        got = model(token_ids()).logits
    assert torch.equal(torch.get_rng_state(), state)  # eval draws no noise
    assert torch.equal(got, want)
    model.train()
    out = model(token_ids(), labels=token_ids(1), output_router_logits=True)
    loss = out.loss + s2moe_loss(model)
    loss.backward()
    for b in blocks:
        assert b.last_s2moe_loss is not None and torch.isfinite(b.last_s2moe_loss)
        assert b.s2moe_gate.weight.grad is not None  # the gate mixes the two paths
    grads = [p.grad for n, p in model.named_parameters() if "experts" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_the_router_logits_are_the_clean_paths_only():
    torch.manual_seed(0)
    model = smoe.convert(build("mixtral"), layer="s2moe").train()
    out = model(token_ids(), output_router_logits=True)
    # one [T, E] per layer, as without S2MoE (the noisy path's are not recorded)
    assert len(out.router_logits) == 2 and all(r.shape[0] == 18 for r in out.router_logits)


def test_gated_eval_output_and_options_reach_every_block():
    torch.manual_seed(0)
    plain = smoe.convert(build("olmoe")).eval()
    torch.manual_seed(0)
    model = smoe.convert(
        build("olmoe"),
        layer="s2moe",
        layer_options={"eval_output": "gated", "noise_form": "instnorm"},
    ).eval()
    assert all(b.eval_output == "gated" and hasattr(b, "s2moe_norm") for b in _blocks(model))
    with torch.no_grad():
        assert not torch.equal(model(token_ids()).logits, plain(token_ids()).logits)


def test_unconvert_drops_the_s2moe_parameters():
    torch.manual_seed(0)
    original = build("mixtral")
    keys = set(original.state_dict())
    model = smoe.convert(original, layer="s2moe")
    assert any("s2moe_gate" in k for k in model.state_dict())
    smoe.unconvert(model)
    assert set(model.state_dict()) == keys


def test_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="layer must be None or 's2moe'"):
        smoe.convert(build("mixtral"), layer="momentum")
    with pytest.raises(ValueError, match="layer_options need layer='s2moe'"):
        smoe.convert(build("mixtral"), layer_options={"noise_form": "dsu"})
    with pytest.raises(ValueError, match="not combined"):
        smoe.convert(build("mixtral"), layer="s2moe", momentum="heavy_ball")
    with pytest.raises(ValueError, match="noise_form"):
        smoe.convert(build("mixtral"), layer="s2moe", layer_options={"noise_form": "uniform"})
    with pytest.raises(ValueError, match="must not set balance"):
        smoe.convert(build("mixtral"), layer="s2moe", layer_options={"balance": "kl_uniform"})
    with pytest.raises(ValueError, match="pass layer='s2moe'"):
        smoe.convert(build("mixtral"), router="s2moe")
    with pytest.raises(ValueError, match="no block converted with layer='s2moe'"):
        s2moe_loss(smoe.convert(build("mixtral")))
    model = smoe.convert(build("mixtral"), layer="s2moe").eval()
    with torch.no_grad():
        model(token_ids())
    with pytest.raises(ValueError, match="no S2MoE block has run a training forward"):
        s2moe_loss(model)
