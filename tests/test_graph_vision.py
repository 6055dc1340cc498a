"""benchmarks/graph_vision.py (issue 24's vision arm): the quick run writes its runs, table,
verdicts and plot, leaves RESULTS.md alone unless asked, and resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
pytest.importorskip("timm")
gv = pytest.importorskip("graph_vision")


def _run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "graph_vision.py"),
        "--quick",
        "--threads",
        "1",
        "--out",
        str(tmp_path / "runs"),
        "--plot",
        str(tmp_path / "plot.png"),
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_graph_vision_quick_writes_runs_table_verdicts_plot_and_resumes(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = sorted(p.name for p in (tmp_path / "runs").glob("*.json"))
    arms = ("attention_aware", "similarity_aware", "topk")
    assert runs == [f"{a}_seed0.json" for a in arms]
    for arm in arms:
        rec = json.loads((tmp_path / "runs" / f"{arm}_seed0.json").read_text())
        cfg = rec["setup"]
        assert cfg["router"] == arm and (cfg["num_experts"], cfg["k"], cfg["every"]) == (8, 2, 2)
        assert cfg["router_options"] == ({} if arm == "topk" else {"causal": False})
        assert set(rec["by_noise"]) == {"noise 0.25", "noise 0.5", "noise 1"}
        assert 0.0 <= rec["clean"] <= 1.0 and 0.0 <= rec["corrupted"] <= 1.0
        assert 0.0 < rec["entropy"] <= 2.0795 and 0.0 < rec["entropy_gate"] <= 2.0795
        assert len(rec["entropy_layers"]) == 3  # blocks 1, 3, 5
        if arm == "topk":
            assert rec["entropy"] == rec["entropy_gate"]  # top-k routes with its gate
    block = (tmp_path / "runs" / "table.md").read_text()
    assert block in proc.stdout
    assert "| SMoE (softmax top-2) (n = 1) |" in block
    assert "| Attention-Aware (poe, head mean, λ = 1) (n = 1) |" in block
    verdicts = [ln for ln in block.splitlines() if ln.startswith(("| Similarity-", "| Attention-"))]
    verdicts = [v for v in verdicts if "(n = " not in v]
    assert len(verdicts) == 6
    assert all(
        v.endswith(("| held |", "| did not hold |", "| inconclusive at this scale |"))
        for v in verdicts
    )
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "RESULTS.md").exists()

    (tmp_path / "RESULTS.md").write_text("# Results\n\nkept text\n")
    again = _run(tmp_path, "--results", str(tmp_path / "RESULTS.md"))  # nothing trained again
    assert again.returncode == 0, again.stderr[-3000:]
    assert "done in" not in again.stdout
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.startswith("# Results\n\nkept text\n") and text.count(gv.BEGIN) == 1
    changed = _run(tmp_path, "--arms", "topk", "--noise", "0.3")
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert changed.stdout.count("done in") == 1  # another setup: that run alone is redone


def test_graph_vision_rejects_unknown_arm(tmp_path):
    proc = _run(tmp_path, "--arms", "nope")
    assert proc.returncode != 0 and "unknown arm 'nope'" in proc.stderr
