"""benchmarks/bench_graph.py cannot rot: --quick runs and reports every row and column, its torch
baseline of graph_mix computes what the op computes, and the CUDA memory section's logic (peak/S,
peak/S², the fit exponent, its table) works when fed CPU peaks. Nothing is timed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_graph  # noqa: E402
from common import peak_bytes  # noqa: E402

QUICK_S, QUICK_E = (32, 64), (4, 8)
HEADER = (
    "| S | B | E | top-k ms | sim fused | sim window 8 | attention | graph_mix ms | torch ms "
    "| graph_mix / torch |"
)


def test_quick_runs_and_reports_every_cell(tmp_path):
    png = tmp_path / "p.png"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_graph.py"), "--quick",
           "--threads", "1", "--out", str(tmp_path), "--plot", str(png)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "bench_graph_quick.json").read_text())
    rows = data["rows"]
    cells = [(r["S"], r["E"], r["mode"]) for r in rows]
    assert cells == [(S, E, m) for S in QUICK_S for E in QUICK_E for m in bench_graph.MODES]
    for r in rows:
        assert r["B"] * r["S"] == 128 and r["skipped"] == []
        assert r["topk_s"] > 0 and r["op_s"] > 0 and r["torch_s"] > 0
        for name in bench_graph.ROUTERS:
            assert r[f"{name}_ratio"] == pytest.approx(r[f"{name}_s"] / r["topk_s"])
        assert math.isfinite(r["op_ratio"])
    assert data["memory"] is None  # the CUDA section never runs on CPU
    assert data["machine"]["threads"] == 1 and data["machine"]["sdpa_backend"] == "flash_attention"
    md = (tmp_path / "bench_graph_quick.md").read_text()
    assert md.startswith("## Graph-of-tokens routing cost") and md in proc.stdout
    lines = md.splitlines()
    assert lines.count(HEADER) == 2 and "**fwd**" in lines and "**fwd+bwd**" in lines
    body = [ln for ln in lines if ln.startswith("| ") and ln != HEADER]
    assert len(body) == len(rows)
    by_mode = [r for m in bench_graph.MODES for r in rows if r["mode"] == m]  # a table per mode
    for ln, r in zip(body, by_mode):
        cols = [c.strip() for c in ln.strip("|").split("|")]
        assert len(cols) == 10 and cols[:3] == [str(r["S"]), str(r["B"]), str(r["E"])]
    assert png.stat().st_size > 10_000


def test_torch_baseline_matches_the_op():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 5, generator=g, requires_grad=True)
    A = bench_graph.causal_softmax(torch.randn(3, 17, 17, generator=g)).requires_grad_()
    gy = torch.randn(3, 17, 5, generator=g)
    grads = []
    for fn in (bench_graph.smoe_mix, bench_graph.torch_mix):
        y = fn(x, A)
        grads.append((y, *torch.autograd.grad((y * gy).sum(), (x, A))))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(A.sum(-1), torch.ones(3, 17))
    assert (A.triu(1) == 0).all()


def test_fit_exponent():
    S = [256, 512, 1024, 2048]
    assert bench_graph.fit_exponent(S, [3.0 * s for s in S]) == pytest.approx(1.0)
    assert bench_graph.fit_exponent(S, [5.0 * s * s for s in S]) == pytest.approx(2.0)


def test_memory_section_logic_on_cpu_peaks():
    mem = bench_graph.memory_scaling("cpu", (64, 128, 256), 4, 16, peak_bytes, fit_from=128)
    assert len(mem["rows"]) == 3 * 2 * 2  # S x (fused, explicit) x mode
    for r in mem["rows"]:
        assert r["peak_bytes"] > 0 and r["per_S"] == pytest.approx(r["peak_bytes"] / r["S"])
        assert r["per_S2"] == pytest.approx(r["peak_bytes"] / r["S"] ** 2)
    assert set(mem["fits"]) == {
        f"{v}/{m}" for v in ("fused", "explicit") for m in ("fwd", "fwd+bwd")
    }
    # explicit A is [S, S]: on CPU (math SDPA, too) the growth is clearly super-linear
    assert mem["fits"]["explicit/fwd"] > 1.5
    lines = bench_graph.render_memory(mem)
    table = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| S |")]
    assert len(table) == 3 * 2 and all(len(ln.strip("|").split("|")) == 8 for ln in table)
    assert any(ln.startswith("Fit exponents: fused/fwd **") for ln in lines)
