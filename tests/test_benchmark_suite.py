"""The benchmark suite cannot rot: it runs (--quick), reports every row, and its baselines are
correct (they compute what smoe's MoELayer computes on the same weights). Nothing is timed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import smoe
from smoe import MoELayer
from smoe.routing import TopKRouter

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

from baselines import build_baselines, torch_route  # noqa: E402
from common import LOADS, PatternRouter, pattern_bias, pattern_experts  # noqa: E402

HAS_TRANSFORMERS = True
try:
    import transformers  # noqa: F401
except ImportError:
    HAS_TRANSFORMERS = False

BASELINES = ["sort+grouped_mm", "gshard-einsum"] + (
    ["transformers-eager", "transformers-grouped_mm", "transformers-batched_mm"]
    if HAS_TRANSFORMERS
    else []
)
SHAPES = ["dispatch", "mixtral-like", "fine-grained", "v-moe"]
DTYPES = ["fp32", "bf16"]
MODES = ["fwd", "fwd+bwd"]
PLOTS = ["efficiency.png", "stage_shares.png", "scaling_tokens.png", "scaling_experts.png"]


def _finite_positive(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# ---------------------------------------------------------------------------------------------
# The quick run, once
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    results = out / "RESULTS.md"
    results.write_text("# Results\n\nkept text\n")
    cmd = [
        sys.executable,
        str(BENCH / "suite.py"),
        "--quick",
        "--threads",
        "1",  # a shared CI machine: one thread avoids stalls on a busy second core
        "--json",
        str(out / "suite.json"),
        "--results",
        str(results),
        "--plots",
        str(out / "plots"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "suite.json").read_text()), proc.stdout


def test_suite_quick_describes_the_machine(quick_run):
    _, data, _ = quick_run
    m = data["machine"]
    assert m["cores"] >= 1 and m["threads"] == 1
    assert m["torch"] == torch.__version__ and m["smoe"] == smoe.__version__
    assert m["cpu"] and m["isa"]
    assert data["quick"] is True and data["wall_s"] > 0


def test_suite_quick_has_every_layer_row_and_baseline(quick_run):
    _, data, _ = quick_run
    rows = data["sections"]["layer"]
    keys = {(r["shape"], r["dtype"], r["load"], r["mode"]) for r in rows}
    assert keys == {(s, d, ld, m) for s in SHAPES for d in DTYPES for ld in LOADS for m in MODES}
    for r in rows:
        assert _finite_positive(r["smoe"]["median"]) and r["smoe"]["n"] >= 3
        assert _finite_positive(r["dense"]["median"])
        assert _finite_positive(r["efficiency"]) and _finite_positive(r["tokens_per_s"])
        assert math.isclose(sum(r["shares"].values()), 1.0, rel_tol=1e-9)
        assert 0.0 <= r["overhead_share"] < 1.0
        for b in BASELINES:
            assert r["baselines"][b] is not None, (b, r["skipped"].get(b))
            assert _finite_positive(r["baselines"][b]["median"])
        if r["load"] == "natural":
            assert set(r["peak_bytes"]) == {"smoe", *BASELINES}
            assert all(v > 0 for v in r["peak_bytes"].values())
        else:
            assert r["peak_bytes"] is None
    assert any(r["dropped_fraction"] > 0 for r in rows if r["shape"] == "v-moe")
    assert all(r["dropped_fraction"] == 0 for r in rows if r["shape"] != "v-moe")


def test_suite_quick_has_every_other_section(quick_run):
    _, data, _ = quick_run
    sec = data["sections"]
    routers = {r["router"] for r in sec["routers"]}
    assert {"topk", "topk-noisy (train)", "topk_softmax op", "softmax+topk (torch)"} <= routers
    assert {"router_stats op", "softmax sums+logsumexp (torch)"} <= routers
    assert {"vmoe (train)", "vmoe-bpr (eval, C=0.5)", "expert-choice (c=k)"} <= routers
    assert {"expert_choice op (c=k)", "softmax+topk over tokens (torch)"} <= routers
    assert all(_finite_positive(r["time"]["median"]) for r in sec["routers"])
    ops = {(r["op"], r["mode"]) for r in sec["ops"]}
    assert {("make_plan", "fwd"), ("permute", "fwd+bwd"), ("combine", "fwd+bwd")} <= ops
    assert all(_finite_positive(r["speedup"]) for r in sec["ops"])
    sweeps = {(r["sweep"], r["mode"]) for r in sec["scaling"]}
    assert sweeps == {(s, m) for s in ("tokens", "experts") for m in MODES}
    for r in sec["scaling"]:
        assert all(_finite_positive(t["median"]) for t in r["times"].values())
    smoe_compile = [r for r in sec["compile"] if r["contender"] == "smoe"]
    assert smoe_compile and all(r["graph_breaks"] == 0 for r in smoe_compile)
    assert all(r["fullgraph_fwd_bwd"] == "ok" for r in smoe_compile)
    if sec.get("vae") is not None and sec["vae"]:
        assert {r["load"] for r in sec["vae"]} == set(LOADS)
        assert all(_finite_positive(r["efficiency"]) for r in sec["vae"])
    targets = {t["target"] for t in data["targets"]}
    assert "fwd+bwd efficiency >= 0.90" in targets and "fwd+bwd efficiency >= 0.80" in targets
    assert {f"ahead of {b}" for b in BASELINES} <= targets


def test_suite_quick_writes_plots_and_results_between_markers(quick_run):
    out, _, stdout = quick_run
    for name in PLOTS:
        png = out / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    text = (out / "RESULTS.md").read_text()
    assert text.startswith("# Results\n\nkept text\n")
    assert text.count("<!-- suite:begin -->") == 1 and text.count("<!-- suite:end -->") == 1
    block = text.split("<!-- suite:begin -->")[1].split("<!-- suite:end -->")[0]
    assert "#### Targets (CPU)" in block and "| mixtral-like | fp32 | natural | fwd+bwd |" in block
    assert "#### Routers" in block and "#### Scaling" in block
    assert "| shape | dtype | load | mode |" in stdout


def test_suite_write_results_replaces_only_the_marked_block(tmp_path):
    from suite import write_results

    path = tmp_path / "R.md"
    path.write_text("before\n<!-- suite:begin -->\nold\n<!-- suite:end -->\nafter\n")
    write_results(str(path), "new\n")
    write_results(str(path), "newer\n")
    assert path.read_text() == "before\n<!-- suite:begin -->\nnewer\n<!-- suite:end -->\nafter\n"


# ---------------------------------------------------------------------------------------------
# Load patterns
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("E,k", [(8, 2), (64, 8)], ids=["E8-k2", "E64-k8"])
def test_load_patterns_force_the_documented_assignment(E, k):
    T, g = 256, torch.Generator().manual_seed(0)
    counts = {
        load: torch.bincount(pattern_experts(load, T, E, k, g).reshape(-1), minlength=E)
        for load in ("balanced", "skewed", "degenerate")
    }
    assert torch.equal(counts["balanced"], torch.full((E,), T * k // E))
    assert counts["skewed"][0] == T // 2
    assert torch.equal(counts["degenerate"][:k], torch.full((k,), T))
    for load in ("balanced", "skewed", "degenerate"):  # k distinct experts per token
        idx = pattern_experts(load, T, E, k, g)
        assert all(len(set(row.tolist())) == k for row in idx)


@pytest.mark.parametrize("load", LOADS)
def test_pattern_router_selects_the_pattern_and_keeps_clean_weights(load):
    T, d, E, k = 64, 16, 8, 2
    bias = pattern_bias(load, T, E, k)
    router = PatternRouter(TopKRouter(d, E, k), bias)
    x = torch.randn(T, d)
    r = router(x)
    if bias is not None:
        chosen = torch.zeros(T, E, dtype=torch.bool).scatter_(1, r.expert.long(), True)
        assert torch.equal(chosen, bias > 0)
    # Renormalised weights are the softmax of the clean logits of the chosen experts.
    clean = torch.gather(r.logits, 1, r.expert.long()).softmax(dim=-1)
    torch.testing.assert_close(r.weight, clean)


# ---------------------------------------------------------------------------------------------
# Baselines compute what smoe computes
# ---------------------------------------------------------------------------------------------
def _layer(activation: str, load: str, capacity_factor: float | None):
    T, d, f, E, k = 128, 32, 48, 8, 2
    renormalize = capacity_factor is None
    bias = pattern_bias(load, T, E, k)
    router = PatternRouter(TopKRouter(d, E, k, renormalize=renormalize), bias)
    layer = MoELayer(
        d, f, E, k, activation=activation, router=router, capacity_factor=capacity_factor
    )
    return layer, bias, renormalize, T


@pytest.mark.parametrize("load", LOADS)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_baselines_match_smoe_layer_dropless(activation, load):
    layer, bias, renormalize, T = _layer(activation, load, None)
    E, k = 8, 2
    baselines, skipped = build_baselines(
        layer, k, tokens=T, bias=bias, renormalize=renormalize, capacity_factor=E / k
    )  # GShard with C = S: nothing dropped, so every baseline is dropless here
    assert set(baselines) == set(BASELINES), skipped
    x = torch.randn(T, layer.d_model, requires_grad=True)
    y, _ = layer(x)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    for name, module in baselines.items():
        xb = x.detach().clone().requires_grad_()
        yb = module(xb)
        torch.testing.assert_close(yb, y, atol=1e-5, rtol=1e-4, msg=name)
        (gb,) = torch.autograd.grad(yb, xb, g)
        torch.testing.assert_close(gb, gx, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("load", LOADS)
def test_gshard_baseline_drops_like_smoe_capacity(load):
    layer, bias, renormalize, T = _layer("gelu", load, 1.25)
    baselines, _ = build_baselines(
        layer, 2, tokens=T, bias=bias, renormalize=renormalize, capacity_factor=1.25
    )
    x = torch.randn(T, layer.d_model)
    y, aux = layer(x)
    torch.testing.assert_close(baselines["gshard-einsum"](x), y, atol=1e-5, rtol=1e-4)
    if float(aux.dropped_fraction) == 0:  # dropless baselines agree only when nothing drops
        torch.testing.assert_close(baselines["sort+grouped_mm"](x), y, atol=1e-5, rtol=1e-4)


def test_torch_route_matches_smoe_router():
    T, d, E, k = 64, 16, 8, 2
    router = TopKRouter(d, E, k)
    x = torch.randn(T, d)
    r = router(x)
    index, weight = torch_route(x, router.weight, k, None, True)
    assert torch.equal(index, r.expert.long())
    torch.testing.assert_close(weight, r.weight)


def test_bench_gpu_logic_runs_on_cpu(tmp_path):
    cmd = [
        sys.executable,
        str(BENCH / "bench_gpu.py"),
        "--device",
        "cpu",
        "--quick",
        "--threads",
        "1",
        "--load",
        "natural",
        "degenerate",
        "--json",
        str(tmp_path / "gpu.json"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert {r["shape"] for r in data["rows"]} == {"mixtral-8x7b", "qwen3-30b-a3b", "olmoe"}
    for r in data["rows"]:
        assert _finite_positive(r["times"]["smoe"]["median"]) and _finite_positive(r["efficiency"])
        for b in BASELINES:
            assert r["times"][b] is not None, (b, r["skipped"].get(b))
    assert "| shape | dtype | load | mode |" in proc.stdout


def test_bench_gpu_times_the_contenders_and_names_the_one_that_fails(monkeypatch):
    import bench_gpu
    from common import Clock

    class Broken(torch.nn.Module):  # a kernel this torch lacks, say
        bias = None

        def forward(self, x):
            raise RuntimeError("no kernel for this dtype\nmore lines")

    def with_broken(*args, **kwargs):
        baselines, skipped = build_baselines(*args, **kwargs)
        return {**baselines, "broken": Broken()}, skipped

    monkeypatch.setattr(bench_gpu, "build_baselines", with_broken)
    shape = bench_gpu.CPU_SHAPES["olmoe"]
    rows, _ = bench_gpu.bench_shape("olmoe", shape, "fp32", ["natural"], "cpu", Clock(0.0, 2, 0.0))
    assert [r["mode"] for r in rows] == ["fwd", "fwd+bwd"]
    for r in rows:
        assert r["times"]["broken"] is None
        assert r["skipped"]["broken"] == "RuntimeError: no kernel for this dtype"
        assert all(r["times"][b]["n"] >= 2 for b in ("smoe", *BASELINES))
