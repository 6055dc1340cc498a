import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_bench_layer_quick_runs_and_reports(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_layer.py"),
        "--quick",
        "--dtype",
        "fp32",
        "--min-run-time",
        "0.01",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["machine"]["threads"] >= 1 and len(data["rows"]) == 4  # 2 shapes x fwd, fwd+bwd
    for row in data["rows"]:
        assert row["smoe_s"] > 0 and math.isfinite(row["efficiency"])
        assert set(row["peers_s"]) == {"transformers-eager", "transformers-grouped_mm"}
        assert math.isclose(sum(row["shares"].values()), 1.0, rel_tol=1e-6)
    assert "| mixtral-like | fp32 | fwd+bwd |" in proc.stdout


def test_vmoe_capacity_quick_runs_and_reports(tmp_path):
    pytest.importorskip("timm")
    out, png = tmp_path / "vmoe.json", tmp_path / "vmoe.png"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "vmoe_capacity.py"),
        "--quick",
        "--no-progress",
        "--capacities",
        "0.1",
        "1.0",
        "--json",
        str(out),
        "--plot",
        str(png),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["group_tokens"] == 400 and png.stat().st_size > 10_000
    rows = data["rows"]
    assert [(r["C"], r["bpr"]) for r in rows] == [
        (0.1, False),
        (0.1, True),
        (1.0, False),
        (1.0, True),
    ]
    # vmoe's capacity: ceil(2 * 400 * C / 8) padded to a multiple of 4 -> 12 (C = 0.1), 100
    assert [r["capacity"] for r in rows] == [12, 12, 100, 100]
    assert rows[0]["effective"] == pytest.approx(8 * 12 / (2 * 400))
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0
        # the experts keep at most what the capacity allows of the routed slots
        assert 0.0 < r["kept"] <= min(1.0, r["effective"]) + 1e-9
    assert set(data["summary"]) == {"dense", "vmoe_train_C", "vmoe_no_capacity", "expert_choice"}
    assert "| 0.1 | 12 | 0.120 |" in proc.stdout


def test_bench_cpu_gemm_quick_rates_every_gemm(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    bench_cpu_gemm = pytest.importorskip("bench_cpu_gemm")
    res = bench_cpu_gemm.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    rows = res["rows"]
    # per dtype and GEMM: dense, one expert, 1 even, 8 even/uneven, 64 even/uneven; + 3 router rows
    assert len(rows) == 2 * 2 * 7 + 3
    for dtype, what, gflops, ratio in rows:
        assert gflops > 0 and math.isfinite(ratio) and ratio > 0, (dtype, what)
    dense = [r for r in rows if "dense" in r[1]]
    assert len(dense) == 4 and all(r[3] == 1.0 for r in dense)
    assert (tmp_path / "bench_cpu_gemm_quick.md").read_text().count("| bf16 |") == 14


def test_bench_cpu_gemm_warmup_reports_each_span():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    bench_cpu_gemm = pytest.importorskip("bench_cpu_gemm")
    spans = bench_cpu_gemm.main(["--warmup", "--steps", "12", "--threads", "1"])["spans"]
    assert [s for s, _ in spans] == ["0-9", "10-11"] and all(ms > 0 for _, ms in spans)


def test_bench_gemm16_quick_times_both_paths(tmp_path):
    from tests.helpers import run_quick_benchmark

    data, md, _ = run_quick_benchmark("bench_gemm16.py", tmp_path, "--dtype", "bf16",
                                      stem="bench_gemm16")  # fmt: skip
    assert [(r["shape"], r["mode"]) for r in data["rows"]] == [
        ("mixtral-like", "fwd"), ("mixtral-like", "fwd+bwd"),
        ("fine-grained", "fwd"), ("fine-grained", "fwd+bwd"),
    ]  # fmt: skip
    for r in data["rows"]:
        assert set(r["ms"]) == {"native", "upcast", "float32 layer", "dense bf16", "dense float32"}
        assert all(math.isfinite(v) and v > 0 for v in r["ms"].values())
    assert "auto here: CPU 16-bit expert GEMMs" in md and md.count("| bf16 |") == 4
    assert data["machine"]["cpu_16bit_limit"]["bf16"] in ("float32", "bfloat16")


def test_bench_router_stats_quick_times_both_paths(tmp_path):
    from tests.helpers import run_quick_benchmark

    data, md, _ = run_quick_benchmark("bench_router_stats.py", tmp_path, stem="bench_router_stats")
    assert [(r["shape"], r["dtype"], r["mode"]) for r in data["rows"]][:2] == [
        ("mixtral-like", "fp32", "fwd"), ("mixtral-like", "fp32", "fwd+bwd"),
    ]  # fmt: skip
    assert len(data["rows"]) == 8  # 2 shapes x 2 dtypes x 2 modes
    for r in data["rows"]:
        assert set(r["ms"]) == {"losses smoe", "losses aten", "router smoe", "router aten"}
        assert all(math.isfinite(v) and v > 0 for v in r["ms"].values())
    assert md.count("| fine-grained |") == 4


def test_bench_router_stats_baselines_are_the_same_losses():
    """The ATen compositions the benchmark times against compute what smoe's losses compute, and
    its patched TopKRouter returns the same aux values: the comparison is like for like."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    bench = pytest.importorskip("bench_router_stats")
    from smoe.losses import router_z_loss, switch_balance_loss
    from smoe.routing import TopKRouter

    logits = torch.randn(300, 16, dtype=torch.float64).float()
    expert = torch.topk(logits, 2, dim=-1).indices.int()
    torch.testing.assert_close(
        bench.aten_balance(logits, expert, 16), switch_balance_loss(logits, expert, 16)
    )
    torch.testing.assert_close(bench.aten_z(logits), router_z_loss(logits))
    router, x = TopKRouter(32, 16, 2), torch.randn(300, 32)
    ours = router(x).aux
    with bench.aten_losses():
        theirs = router(x).aux
    for name in ("balance", "z"):
        torch.testing.assert_close(ours[name], theirs[name])


def test_bench_gather_mm_quick_times_both_paths(tmp_path):
    from tests.helpers import run_quick_benchmark

    data, md, _ = run_quick_benchmark("bench_gather_mm.py", tmp_path, stem="bench_gather_mm")
    assert [(r["shape"], r["dtype"]) for r in data["rows"]] == [
        ("mixtral-like", "fp32"), ("mixtral-like", "bf16"),
        ("fine-grained", "fp32"), ("fine-grained", "bf16"),
    ]  # fmt: skip
    for r in data["rows"]:
        assert len(r["ms"]) == 6 and all(math.isfinite(v) and v > 0 for v in r["ms"].values())
        assert not r["gathers"]  # 64 tokens: below the size rule, both layer runs are unfused
        assert r["saved"]["gather"] == r["saved"]["unfused"] > 0
        assert r["peak"]["gather"] > 0 and r["peak"]["unfused"] > 0
    assert md.count("| fine-grained |") == 2


def test_bench_gather_mm_switch_turns_the_gather_off():
    """The benchmark's unfused baseline really runs permute -> grouped_mm in the layer, and the
    saved-bytes probe sees the grouped rows only then."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    bench = pytest.importorskip("bench_gather_mm")
    from smoe import MoELayer

    layer, x = MoELayer(64, 48, 8, 8), torch.randn(2304, 64, requires_grad=True)
    grouped = 2304 * 8 * 64 * 4  # bytes of the [T k, d] grouped rows, past the size rule

    def ran(fn) -> set[str]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        return {e.name for e in prof.events()}

    assert "smoe::gather_mm" in ran(lambda: layer(x))
    gathered = bench.saved_bytes(lambda: layer(x))
    with bench.unfused_experts():
        names = ran(lambda: layer(x))
        unfused = bench.saved_bytes(lambda: layer(x))
    assert "smoe::permute" in names and "smoe::gather_mm" not in names
    assert unfused - gathered == grouped
