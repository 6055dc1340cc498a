"""experts_implementation="smoe" in whole transformers models (issue 26): Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE, DeepSeek-V3 and GPT-OSS, built from their config classes at tiny random sizes
(2 layers, 4 experts, top-2), never downloaded. Also the three switching routes, generate with a
cache, a save/load round trip into plain transformers, torch.compile of one experts module, the
errors of bad inputs and autocast. torch.export of these models: test_transformers_export.py."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from transformers.integrations import moe  # noqa: E402

import smoe.integrations.transformers  # noqa: E402, F401  (registers "smoe")
from smoe import ops  # noqa: E402
from tests.integrations.tiny_models import (  # noqa: E402
    MODELS,
    PLAIN_LOADER,
    build,
    close,
    token_ids,
)

NAMES = list(MODELS)


def _build(name: str, impl: str = "eager"):
    model = build(name)
    model.set_experts_implementation(impl)
    return model


def _experts(model) -> list[torch.nn.Module]:
    """The modules whose forward is use_experts_implementation's dispatching wrapper."""
    code = [getattr(type(m).forward, "__code__", None) for m in model.modules()]
    return [m for m, c in zip(model.modules(), code) if c and c.co_filename == moe.__file__]


def _logits_and_grads(model, impl: str):
    model.set_experts_implementation(impl)
    model.zero_grad(set_to_none=True)
    out = model(token_ids(), labels=token_ids())
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.logits.detach(), grads


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


@pytest.fixture
def make_plan_calls(monkeypatch):
    """How many times smoe's experts forward ran (it calls ops.make_plan once per call)."""
    calls = []
    real = ops.make_plan

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "make_plan", counting)
    return calls


# ---------------------------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_fp32_logits_and_grads_match_eager_and_grouped_mm(name, make_plan_calls):
    model = _build(name)
    assert len(_experts(model)) == 2
    ref_logits, ref_grads = _logits_and_grads(model, "eager")
    for impl in ("grouped_mm", "smoe"):
        logits, grads = _logits_and_grads(model, impl)
        close(logits, ref_logits, f"{name} {impl} logits")
        for n, g in ref_grads.items():
            assert g is not None and grads[n] is not None, f"{name}: no gradient for {n}"
            close(grads[n], g, f"{name} {impl} grad {n}")
    assert len(make_plan_calls) == 2  # smoe ran, once per MoE layer


@pytest.mark.parametrize("name", NAMES)
def test_bf16_logits(name):
    """bf16 logits against the fp32 ones. Eager and grouped_mm are themselves 1e-2 to 2e-1 off in
    bf16 (at these sizes a bf16 router flips some top-2 choices), and smoe differs from
    grouped_mm by up to 1.5e-2 (it rounds at other points: fused swiglu, fp32 combine), so a
    flat 5e-3 is unreachable here; the bar is smoe's error <= 2x grouped_mm's + 2e-3. (With the
    norm epsilons at 1, transformers' own setup, 5e-3 against eager holds: the test below.)"""
    ref = _build(name)(token_ids()).logits.detach()
    model = copy.deepcopy(_build(name)).to(torch.bfloat16)
    err = {}
    with torch.no_grad():
        for impl in ("grouped_mm", "smoe"):
            model.set_experts_implementation(impl)
            logits = model(token_ids()).logits
            assert logits.dtype == torch.bfloat16
            err[impl] = _rel(logits, ref)
    assert err["smoe"] <= 2 * err["grouped_mm"] + 2e-3, (name, err)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_inference_matches_eager_as_transformers_own_model_test_checks(
    name, dtype, tmp_path, make_plan_calls
):
    """The check transformers' common model test makes of every experts implementation against
    "eager" (`_test_eager_matches_batched_and_grouped_inference`, transformers 5.24), made for
    "smoe": norm epsilons 1 (its less-flaky setup, transformers.testing_utils), a save/load round
    trip, inference in the dtype, logits equal within 1e-4 / 1e-3 / 5e-3 (rtol = atol)."""
    from transformers.testing_utils import (
        set_config_for_less_flaky_test,
        set_model_for_less_flaky_test,
    )

    dt, tol = {"fp32": (torch.float32, 1e-4), "fp16": (torch.float16, 1e-3),
               "bf16": (torch.bfloat16, 5e-3)}[dtype]  # fmt: skip
    cls, config = type(build(name)), build(name).config
    set_config_for_less_flaky_test(config)
    torch.manual_seed(42)
    model = cls(config).eval()
    set_model_for_less_flaky_test(model)
    model.save_pretrained(tmp_path)
    model = cls.from_pretrained(tmp_path).eval().to(dt)
    ids = torch.randint(3, 64, (13, 7), generator=torch.Generator().manual_seed(0))
    logits = {}
    with torch.no_grad():
        for impl in ("eager", "smoe"):
            model.set_experts_implementation(impl)
            logits[impl] = model(ids).logits
    assert logits["smoe"].dtype == dt and make_plan_calls  # smoe ran
    torch.testing.assert_close(logits["smoe"], logits["eager"], rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# switching, generate, save/load
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("route", ["set_experts_implementation", "config", "from_pretrained"])
@pytest.mark.parametrize("name", NAMES)
def test_switch_routes(name, route, tmp_path, make_plan_calls):
    model = _build(name)
    with torch.no_grad():
        want = model(token_ids()).logits
        if route == "set_experts_implementation":
            model.set_experts_implementation("smoe")
        elif route == "config":  # the config the experts modules hold
            for experts in _experts(model):
                experts.config._experts_implementation = "smoe"
        else:
            model.save_pretrained(tmp_path)
            model = type(model).from_pretrained(tmp_path, experts_implementation="smoe").eval()
            assert model.config._experts_implementation == "smoe"
        assert make_plan_calls == []
        got = model(token_ids()).logits
    assert len(make_plan_calls) == 2, f"{name} via {route}: smoe did not run"
    assert all(e.config._experts_implementation == "smoe" for e in _experts(model))
    close(got, want, f"{name} via {route}")


@pytest.mark.parametrize("name", NAMES)
def test_generate_with_cache_matches_eager(name, make_plan_calls):
    model = _build(name)
    prompt = token_ids()[:, :5]
    kw = dict(
        max_new_tokens=4, do_sample=False, use_cache=True, attention_mask=torch.ones_like(prompt)
    )
    want = model.generate(prompt, **kw)
    model.set_experts_implementation("smoe")
    got = model.generate(prompt, **kw)
    assert len(make_plan_calls) == 2 * 4  # prefill + 3 cached decode steps, 2 MoE layers each
    assert torch.equal(got, want), (name, got.tolist(), want.tolist())


def test_save_load_round_trip_into_plain_transformers(tmp_path):
    """Models running smoe save checkpoints that a process without smoe loads, with equal logits."""
    torch.save(token_ids(), tmp_path / "ids.pt")
    want = {}
    for name in NAMES:
        model = _build(name, "smoe")
        with torch.no_grad():
            want[name] = model(token_ids()).logits
        model.save_pretrained(tmp_path / name)
        with open(tmp_path / name / "config.json") as f:
            assert "smoe" not in json.dumps(json.load(f)), f"{name}: smoe leaked into config.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-c", PLAIN_LOADER, str(tmp_path), *NAMES]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(tmp_path / "plain.pt")
    for name in NAMES:
        impl, logits = got[name]
        assert impl != "smoe", name
        close(logits, want[name], f"{name} reloaded in plain transformers ({impl})")


# ---------------------------------------------------------------------------------------------
# one experts module: compile, bad inputs, autocast
# ---------------------------------------------------------------------------------------------
def _mixtral_experts():
    experts = _experts(_build("mixtral"))[0]
    experts.config._experts_implementation = "smoe"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 32, generator=g)
    idx = torch.rand(7, 4, generator=g).argsort(1)[:, :2]
    w = torch.rand(7, 2, generator=g)
    return experts, x, idx, w


def test_compile_fullgraph_has_no_graph_break():
    experts, x, idx, w = _mixtral_experts()
    compiled = torch.compile(experts, fullgraph=True, backend="aot_eager")  # a break raises
    results = []
    for fn in (experts, compiled):
        xr = x.clone().requires_grad_()
        experts.zero_grad(set_to_none=True)
        y = fn(xr, idx, w)
        y.square().sum().backward()
        results.append((y.detach(), xr.grad, experts.gate_up_proj.grad, experts.down_proj.grad))
    for got, want, what in zip(results[1], results[0], ("output", "x", "gate_up", "down")):
        close(got, want, f"compiled {what}")


BAD = {
    "float top_k_index": (TypeError, "top_k_index", lambda x, i, w: (x, i.float(), w)),
    "short top_k_index": (ValueError, "top_k_index", lambda x, i, w: (x, i[:3], w)),
    "1-D top_k_index": (ValueError, "top_k_index", lambda x, i, w: (x, i[:, 0], w)),
    "wrong top_k_weights": (ValueError, "top_k_weights", lambda x, i, w: (x, i, w[:, :1])),
    "3-D hidden_states": (ValueError, "hidden_states", lambda x, i, w: (x[None], i, w)),
    "id == num_experts": (
        RuntimeError,
        r"expert values must be in \[0, num_experts\) = \[0, 4\).*got 4",
        lambda x, i, w: (x, i.masked_fill(i == i[0, 0], 4), w),
    ),
    "id > num_experts": (
        RuntimeError,
        r"expert values must be in \[0, num_experts\) = \[0, 4\).*got 9",
        lambda x, i, w: (x, i.masked_fill(i == i[0, 0], 9), w),
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise_clear_errors(case):
    """Without expert parallelism an id >= num_experts is an error (eager skips id == E)."""
    exc, match, mutate = BAD[case]
    experts, x, idx, w = _mixtral_experts()
    with pytest.raises(exc, match=match):
        experts(*mutate(x, idx, w))


def test_autocast_runs_the_expert_gemms_in_bf16(monkeypatch):
    """Under CPU autocast smoe's GEMMs run in bf16 (its grouped_mm autocast rule), as eager's
    nn.functional.linear does; the experts output keeps the fp32 residual stream's dtype.
    (transformers' grouped_mm casts the input to the fp32 weights and stays fp32 on CPU.)"""
    model = _build("mixtral")
    gemm_dtypes = []
    real = ops.grouped_mm

    def spy(x, w, offsets, bias=None):
        y = real(x, w, offsets, bias)
        gemm_dtypes.append(y.dtype)
        return y

    monkeypatch.setattr(ops, "grouped_mm", spy)
    layer0 = _experts(model)[0]
    seen = {}

    def hook(module, args, out):  # returns None: the output stays as is
        seen.setdefault(module.config._experts_implementation, (args, out))

    layer0.register_forward_hook(hook)
    with torch.no_grad():
        fp32 = model(token_ids()).logits  # eager, no autocast
        seen.clear()
        logits = {}
        for impl in ("eager", "smoe"):
            model.set_experts_implementation(impl)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits[impl] = model(token_ids()).logits.float()
        (args_e, out_e), (args, out_s) = seen["eager"], seen["smoe"]
        model.set_experts_implementation("eager")
        ref = layer0(*args)  # the same call in fp32, outside autocast
    assert gemm_dtypes and set(gemm_dtypes) == {torch.bfloat16}, gemm_dtypes
    assert all(torch.equal(a, b) for a, b in zip(args_e, args))
    assert args[0].dtype == out_s.dtype == out_e.dtype == torch.float32
    err_e, err_s = _rel(out_e, ref), _rel(out_s, ref)
    assert 1e-5 < err_s <= 3 * err_e + 1e-3, (err_s, err_e)  # bf16 ran, and no worse than eager
    assert _rel(logits["smoe"], fp32) <= 3 * _rel(logits["eager"], fp32) + 1e-3


def test_import_smoe_never_imports_transformers_and_registration_is_idempotent():
    code = (
        "import sys, smoe, smoe.models, smoe.routing\n"
        "assert 'transformers' not in sys.modules, 'import smoe imported transformers'\n"
        "import smoe.integrations.transformers as t\n"
        "from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS\n"
        "t.register(); t.register()\n"
        "assert ALL_EXPERTS_FUNCTIONS['smoe'] is t.smoe_experts_forward\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
