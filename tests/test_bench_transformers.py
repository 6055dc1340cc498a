"""benchmarks/bench_transformers.py cannot rot: --quick runs every model, dtype and experts
implementation, and its JSON and markdown table have the structure the report promises. Nothing is
timed (no assertion on a time or a ratio's size)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import run_quick_benchmark

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_transformers as bt  # noqa: E402
from transformers_report import HEADER  # noqa: E402

MODELS = ("mixtral", "olmoe", "deepseek_v3")
IMPLS = ("eager", "grouped_mm", "batched_mm", "smoe", "null")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_transformers")
    return run_quick_benchmark("bench_transformers.py", out, "--threads", "1",
                               stem="bench_transformers_cpu_quick")  # fmt: skip


def test_quick_has_a_row_per_model_dtype_and_implementation(quick):
    data, _, _ = quick
    rows = data["rows"]
    cells = [(r["model"], r["dtype"], r["impl"]) for r in rows]
    assert cells == [(m, d, i) for m in MODELS for d in ("fp32", "bf16") for i in IMPLS]
    assert data["machine"]["threads"] == 1 and "load_start" in data["machine"]
    assert data["machine"]["malloc"]["mode"] == "default"
    for r in rows:
        assert r["skipped"] is None  # the quick models are small enough for batched_mm
        assert r["tokens"] == 64 and len(r["round_s"]) == 2
        assert all(t > 0 for t in r["round_s"]) and r["step_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["step_s"])
        assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
        assert len(r["phase_s"]) == 3 and all(s > 0 for s in r["phase_s"])
        assert sum(r["phase_s"]) <= 1.5 * max(r["round_s"])  # parts of the timed steps
        assert math.isfinite(r["load_start"]) and math.isfinite(r["load_end"])
        if r["impl"] == "null":
            assert r["experts_share"] is None and r["loss_rel_diff"] is None
        else:
            assert r["experts_share"] < 1
            assert r["loss_rel_diff"] < (1e-5 if r["dtype"] == "fp32" else 2e-2)
        if r["impl"] == "grouped_mm":
            assert r["ratio"] == r["ratio_min"] == r["ratio_max"] == 1.0


def test_quick_markdown_table(quick):
    data, md, stdout = quick
    assert (
        md.startswith("## transformers training steps by experts implementation") and md in stdout
    )
    assert "Allocator: glibc, defaults." in md
    lines = md.splitlines()
    assert lines.count(HEADER) == 1
    body = lines[lines.index(HEADER) + 2 :]
    body = [ln for ln in body if ln.startswith("| ")]
    assert len(body) == len(data["rows"])
    for ln, r in zip(body, data["rows"]):
        cols = [c.strip() for c in ln.strip("|").split("|")]
        assert len(cols) == 9 and cols[:3] == [r["model"], r["dtype"], r["impl"]]
        assert cols[4] == " / ".join(f"{s * 1e3:.0f}" for s in r["phase_s"])
        assert cols[5] == f"{r['tokens_per_s']:,.0f}"
        assert cols[6].strip("*").startswith(f"{r['ratio']:.2f} (")
        assert (cols[7] == "") == (r["impl"] == "null")
    for m in MODELS:
        assert any(ln.startswith(f"- `{m}`: d 64,") for ln in lines)


def test_batched_mm_memory_estimate():
    shape = dict(d=256, d_ff=1024, E=8, k=2, shared=0, layers=2, vocab=512)
    need = bt.batched_mm_bytes(shape, 1024, torch.float32)  # (x, grad) x S x weights x layers
    assert need == 2 * (1024 * 2) * (256 * 2048 + 1024 * 256) * 2 * 4
    assert bt.batched_mm_bytes(shape, 1024, torch.bfloat16) == need // 2


def test_batched_mm_is_skipped_beyond_its_budget_and_malloc_tuned_reruns_tuned(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_transformers.py"), "--quick",
           "--threads", "1", "--models", "olmoe", "--dtype", "fp32", "--batched-mm-gib", "0",
           "--malloc", "tuned", "--out", str(tmp_path)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "bench_transformers_cpu_quick.json").read_text())
    assert data["machine"]["malloc"] == {"mode": "tuned", "env": bt.TUNED_MALLOC}  # re-executed
    rows = data["rows"]
    assert [r["impl"] for r in rows] == list(IMPLS)
    skipped = [r for r in rows if r["skipped"]]
    assert [r["impl"] for r in skipped] == ["batched_mm"] and "GiB" in skipped[0]["skipped"]
    md = (tmp_path / "bench_transformers_cpu_quick.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("| olmoe | fp32 | batched_mm |"))
    assert "skipped: needs ~" in line and len(line.strip("|").split("|")) == 9
    assert "Allocator: glibc, tuned (`--malloc tuned`)." in md


@pytest.mark.parametrize("zero", ["none", "zeros"])
def test_step_drops_or_zeroes_gradients_between_steps(zero):
    prefix, kw = bt.configs(True, "cpu")["mixtral"]
    model = bt.build(prefix, kw, torch.float32, "cpu")
    ids = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    phases = []
    step = bt.step_fn(model, torch.optim.AdamW(model.parameters(), lr=0.0), ids, zero, phases)
    step()
    first = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    step()
    kept = [model.get_parameter(n).grad is g for n, g in first.items()]
    assert len(kept) > 10 and (all(kept) if zero == "zeros" else not any(kept))
    assert len(phases) == 2 and all(len(p) == 3 and min(p) > 0 for p in phases)
