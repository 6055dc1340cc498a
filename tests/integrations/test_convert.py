"""smoe.convert / smoe.unconvert on tiny random transformers models (issue 26, part 2): the six
supported blocks with their own routers on smoe's ops, against the original models; state_dict
keys, save/load into plain transformers, unconvert; DeepSeek-V3's group-limited routing and its
bias under ExpertBiasUpdater; every registered router converted or refused; errors."""

from __future__ import annotations

import contextvars
import functools
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

import smoe  # noqa: E402
from smoe.integrations.convert import SUPPORTED_BLOCKS, ConvertedMoE  # noqa: E402
from smoe.routing import available_routers, router_info  # noqa: E402
from smoe.routing.registry import build_router, registered_info  # noqa: E402
from tests.integrations.tiny_models import (  # noqa: E402
    MODELS,
    PLAIN_LOADER,
    build,
    close,
    token_ids,
)

NAMES = list(MODELS)
# DeepSeek-V3 with what its default tiny config leaves off: 2 groups of 2 experts, one kept, a
# renormalised and scaled weight, and (set in the tests) a nonzero e_score_correction_bias.
DEEPSEEK_GROUPS = dict(n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5)


def _model(name: str, **overrides):
    model = build(name, **overrides)
    if name == "deepseek_v3":
        for block in _blocks(model):
            block.gate.e_score_correction_bias.normal_(std=0.3)
    return model


def _blocks(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in SUPPORTED_BLOCKS]


def _run(model, labels: bool = True):
    """Logits, loss (with the router aux loss when the model has one) and every gradient."""
    model.zero_grad(set_to_none=True)
    out = model(token_ids(), labels=token_ids(1), output_router_logits=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    aux = getattr(out, "aux_loss", None)
    return out.logits.detach(), out.loss.detach(), aux, grads


@pytest.mark.parametrize("name", NAMES)
def test_converted_model_equals_the_original(name):
    overrides = DEEPSEEK_GROUPS if name == "deepseek_v3" else {}
    model = _model(name, **overrides).train()  # training mode: dropout is 0, routing the same
    want = _run(model)
    keys = list(model.state_dict())
    smoe.convert(model)
    converted = [m for m in model.modules() if isinstance(m, ConvertedMoE)]
    assert len(converted) == 2 and all(isinstance(m, smoe.MoELayer) for m in converted)
    assert not _blocks(model)
    assert list(model.state_dict()) == keys  # same keys, same order
    got = _run(model)
    close(got[0], want[0], f"{name} logits")
    close(got[1], want[1], f"{name} loss")
    if want[2] is not None:  # output_router_logits: the same aux loss from the same logits
        close(got[2], want[2], f"{name} router aux loss")
    assert set(got[3]) == set(want[3])
    for key in want[3]:
        close(got[3][key], want[3][key], f"{name} grad {key}")


def test_converted_blocks_route_with_smoe_ops(monkeypatch):
    calls = []
    for op in ("topk_softmax", "topk_sigmoid", "make_plan"):
        real = getattr(smoe.ops, op)
        monkeypatch.setattr(
            smoe.ops, op, lambda *a, _r=real, _n=op, **k: calls.append(_n) or _r(*a, **k)
        )
    for name in ("mixtral", "deepseek_v3"):
        model = smoe.convert(_model(name))
        with torch.no_grad():
            model(token_ids())
    assert calls.count("topk_softmax") == 2 and calls.count("topk_sigmoid") == 2
    assert calls.count("make_plan") == 4


def test_gpt_oss_block_returns_hidden_and_router_scores():
    block = _blocks(_model("gpt_oss"))[0]
    x = torch.randn(2, 5, 32)
    want_h, want_s = block(x)
    converted = smoe.convert(block)
    assert isinstance(converted, ConvertedMoE)
    got_h, got_s = converted(x)
    close(got_h, want_h, "hidden")
    close(got_s, want_s, "router scores")


def test_save_pretrained_loads_in_plain_transformers(tmp_path):
    torch.save(token_ids(), tmp_path / "ids.pt")
    want = {}
    for name in NAMES:
        model = smoe.convert(_model(name))
        with torch.no_grad():
            want[name] = model(token_ids()).logits
        model.save_pretrained(tmp_path / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-c", PLAIN_LOADER, str(tmp_path), *NAMES]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(tmp_path / "plain.pt")
    for name in NAMES:
        close(got[name][1], want[name], f"{name} reloaded in plain transformers")


@pytest.mark.parametrize("name", NAMES)
def test_unconvert_restores_the_blocks_and_keeps_trained_tensors(name):
    model = _model(name).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(b) for b in _blocks(model)]
    smoe.convert(model)
    smoe.unconvert(model)
    assert [type(b) for b in _blocks(model)] == classes
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    # a training step on the converted model: the original blocks come back with its tensors
    smoe.convert(model)
    _run(model)
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    smoe.unconvert(model)
    assert not any(isinstance(m, ConvertedMoE) for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
    changed = [k for k in before if not torch.equal(before[k], trained[k])]
    assert any(".gate." in k or ".router." in k for k in changed), "the router did not train"
    assert any(".experts." in k for k in changed), "the experts did not train"


def test_deepseek_bias_trains_with_expert_bias_updater_and_never_weighs():
    model = smoe.convert(_model("deepseek_v3", **DEEPSEEK_GROUPS)).train()
    updater = smoe.ExpertBiasUpdater(model, coeff=0.1, center=False)
    assert len(updater.routers) == 2
    gate = [m for m in model.modules() if isinstance(m, ConvertedMoE)][0].gate
    bias0 = gate.e_score_correction_bias.clone()
    _run(model)
    counts = gate.expert_counts.clone()
    assert counts.sum().item() == token_ids().numel() * 2  # T tokens x k
    updater.step()
    want = bias0 + 0.1 * torch.sign(counts.mean() - counts)
    assert torch.equal(gate.e_score_correction_bias, want)
    assert not gate.expert_counts.any()
    # the weights are those of the unbiased sigmoid scores, whatever the bias
    x = torch.randn(11, 32)
    routing = gate(x)
    gate.e_score_correction_bias.add_(5.0 * torch.randn(4))
    again = gate(x)
    scores = torch.sigmoid(torch.nn.functional.linear(x, gate.weight))
    for r in (routing, again):
        w = scores.gather(1, r.expert.long())
        close(r.weight, 2.5 * w / w.sum(dim=1, keepdim=True), "weights from unbiased scores")


def test_generate_with_cache_after_conversion():
    model = _model("mixtral")
    prompt = token_ids()[:, :5]
    kw = dict(max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(prompt))
    want = model.generate(prompt, **kw)
    assert torch.equal(smoe.convert(model).generate(prompt, **kw), want)


@pytest.mark.parametrize("model_name", ["mixtral", "olmoe"])
def test_every_registered_router_converts_or_is_refused_with_a_reason(model_name):
    for router in available_routers():
        info = router_info(router)
        # refused: stack-level methods, routers needing attention, routers not causal as built
        refuse = info.stack is not None or info.layer is not None or info.needs_attention
        refuse = refuse or not info.is_causal(build_router(router, 32, 4, 2))
        model = _model(model_name).train()
        if refuse:
            with pytest.raises(ValueError, match=f"router {router!r} cannot replace the router"):
                smoe.convert(model, router=router)
            continue
        smoe.convert(model, router=router)
        gates = [m.gate for m in model.modules() if isinstance(m, ConvertedMoE)]
        assert len(gates) == 2 and all(registered_info(g).name == router for g in gates)
        logits, loss, _, grads = _run(model)
        assert torch.isfinite(logits).all() and torch.isfinite(loss), router
        assert any(k.endswith("gate_up_proj") for k in grads), f"{router}: no expert gradient"
        assert any(".gate." in k for k in grads), f"{router}: its router got no gradient"
    ec = router_info("expert_choice")
    assert not ec.is_causal(build_router("expert_choice", 32, 4, 2))  # the refusal is exercised


def test_convert_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="no supported MoE block in Linear; supported: Mixtral"):
        smoe.convert(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="router must be None, a registered router name"):
        smoe.convert(_model("mixtral"), router=3)
    with pytest.raises(ValueError, match="need a router given by name"):
        smoe.convert(_model("mixtral"), capacity_factor=1.0)
    with pytest.raises(ValueError, match="unknown router|not registered|registered"):
        smoe.convert(_model("mixtral"), router="no_such_router")


def test_converting_twice_says_unconvert_first():
    model = smoe.convert(_model("mixtral"))
    with pytest.raises(ValueError, match="MixtralForCausalLM is converted already; smoe.unconvert"):
        smoe.convert(model, router="xmoe")
    smoe.unconvert(model)
    smoe.convert(model, router="xmoe")  # then it converts again
    gates = [m.gate for m in model.modules() if isinstance(m, ConvertedMoE)]
    assert len(gates) == 2 and all(isinstance(g, smoe.XMoERouter) for g in gates)


def test_a_router_module_is_copied_into_each_block():
    router = smoe.TopKRouter(32, 4, k=2)
    model = smoe.convert(_model("olmoe"), router=router)
    gates = [m.gate for m in model.modules() if isinstance(m, ConvertedMoE)]
    assert len(gates) == 2 and gates[0] is not gates[1] and all(g is not router for g in gates)
    for gate in gates:
        want = router.state_dict()
        assert all(torch.equal(v, want[k]) for k, v in gate.state_dict().items())


@functools.cache
def _dynamo_traces_context_vars() -> bool:
    """Whether this torch's dynamo traces ``ContextVar.get`` (2.14 does, 2.11 does not):
    transformers' output capture, which a converted block hands its router logits, reads one."""
    var = contextvars.ContextVar("probe", default=None)

    def f(x):
        return x + (1 if var.get() is None else 2)

    try:
        torch.compile(f, fullgraph=True, backend="eager")(torch.ones(1))
    except Exception:  # torch._dynamo.exc.Unsupported
        return False
    finally:
        torch._dynamo.reset()
    return True


@pytest.mark.parametrize("name", ["deepseek_v3", "gpt_oss"])
def test_converted_block_compiles_without_graph_breaks(name):
    block = smoe.convert(
        _blocks(_model(name, **(DEEPSEEK_GROUPS if name == "deepseek_v3" else {})))[0]
    )
    # a break raises; on a torch that cannot trace the capture's ContextVar, the block's one break
    # is there, as in transformers' own capture hooks, and the results must still agree
    fullgraph = _dynamo_traces_context_vars()
    compiled = torch.compile(block, fullgraph=fullgraph, backend="aot_eager")
    x = torch.randn(2, 5, 32)
    results = []
    for fn in (block, compiled):
        xr = x.clone().requires_grad_()
        out = fn(xr)
        out = out[0] if isinstance(out, tuple) else out
        out.square().sum().backward()
        results.append((out.detach(), xr.grad))
    close(results[1][0], results[0][0], "compiled output")
    close(results[1][1], results[0][1], "compiled input gradient")


# ---------------------------------------------------------------------------------------------
# momentum across the converted blocks (MomentumSMoE, AdamSMoE, Robust MomentumSMoE)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_momentum_with_mu_0_gamma_1_reproduces_the_model(name):
    model = _model(name)
    want = _run(model)
    smoe.convert(model, momentum="heavy_ball", momentum_options=dict(mu=0.0, gamma=1.0))
    got = _run(model)
    close(got[0], want[0], f"{name} logits")
    for key in want[3]:
        close(got[3][key], want[3][key], f"{name} grad {key}")


def _momentum_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_momentum_state_runs_across_blocks_and_resets_every_forward(monkeypatch):
    model = _model("olmoe")
    plain = _momentum_logits(model, token_ids())
    smoe.convert(model, momentum="heavy_ball", momentum_options=dict(mu=0.7))
    blocks = [m for m in model.modules() if isinstance(m, ConvertedMoE)]
    seen = []
    real = blocks[1].__dict__["_momentum"].forward

    def spy(h, state, context=None):
        seen.append(state.m.abs().sum().item())
        return real(h, state, context)

    monkeypatch.setattr(blocks[1].__dict__["_momentum"], "forward", spy)
    first = _momentum_logits(model, token_ids())
    second = _momentum_logits(model, token_ids())
    assert torch.equal(first, second)  # no state carried over from the first forward
    assert seen[0] > 0 and seen[0] == seen[1]  # block 1 reads block 0's momentum
    assert not torch.allclose(first, plain, atol=1e-4)  # mu = 0.7 changes the function
    smoe.unconvert(model)
    torch.testing.assert_close(_momentum_logits(model, token_ids()), plain)
    assert not model._forward_pre_hooks  # the reset hook went with the conversion


@pytest.mark.parametrize("kind", ["adam", "robust"])
def test_adam_and_robust_momentum_train(kind):
    model = smoe.convert(_model("qwen3_moe").train(), momentum=kind)
    logits, loss, _, grads = _run(model)
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    assert any(k.endswith("gate_up_proj") for k in grads) and any(".gate." in k for k in grads)
    assert list(model.state_dict()) == list(_model("qwen3_moe").state_dict())


def test_momentum_errors():
    with pytest.raises(ValueError, match="momentum must be None or one of"):
        smoe.convert(_model("mixtral"), momentum="nesterov")
    with pytest.raises(ValueError, match="momentum_options need momentum="):
        smoe.convert(_model("mixtral"), momentum_options=dict(mu=0.5))
    model = _model("mixtral")
    with pytest.raises(ValueError, match="MomentumMoE: mu must be in"):
        smoe.convert(model, momentum="heavy_ball", momentum_options=dict(mu=1.5))
    assert len(_blocks(model)) == 2  # nothing converted
    with pytest.raises(ValueError, match="momentum runs across the blocks of a model"):
        smoe.convert(_blocks(model)[0], momentum="heavy_ball")


def test_a_router_built_by_name_takes_the_block_router_weight():
    model = _model("mixtral")
    want = _run(model)
    # "topk" (softmax, top-k, renormalised) on Mixtral's own router weight: the same model
    smoe.convert(model, router="topk")
    gates = [m.gate for m in model.modules() if isinstance(m, ConvertedMoE)]
    originals = [m.gate for m in _blocks(_model("mixtral"))]
    assert all(torch.equal(g.weight, o.weight) for g, o in zip(gates, originals))
    got = _run(model)
    close(got[0], want[0], "logits")
    assert list(model.state_dict()) == list(_model("mixtral").state_dict())
    # a router with other parameters starts fresh (and GPT-OSS's biased router is not aliased)
    fresh = smoe.convert(_model("gpt_oss"), router="topk")
    assert not any(
        torch.equal(m.router.weight, o.router.weight)
        for m, o in zip(
            [m for m in fresh.modules() if isinstance(m, ConvertedMoE)], _blocks(_model("gpt_oss"))
        )
    )


def test_causal_false_allows_routers_that_see_the_sequence():
    model = _model("olmoe")
    with pytest.raises(ValueError, match=r"causal=False\) allows it"):
        smoe.convert(model, router="expert_choice")
    smoe.convert(model, router="expert_choice", causal=False)
    logits, loss, _, grads = _run(model)
    assert torch.isfinite(logits).all() and any(".gate." in k for k in grads)
