"""benchmarks/momentum_vision.py (issue 23's vision arm): the quick run writes its runs, table,
verdicts and plot, and resumes; the corruptions do what they say."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
pytest.importorskip("timm")
mv = pytest.importorskip("momentum_vision")


def _run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "momentum_vision.py"),
        "--quick",
        "--threads",
        "1",
        "--out",
        str(tmp_path / "runs"),
        "--results",
        str(tmp_path / "RESULTS.md"),
        "--plot",
        str(tmp_path / "plot.png"),
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_momentum_vision_quick_writes_table_verdicts_plot_and_resumes(tmp_path):
    (tmp_path / "RESULTS.md").write_text("# Results\n\nkept text\n")
    proc = _run(tmp_path, "--seeds", "0", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = sorted(p.name for p in (tmp_path / "runs").glob("*.json"))
    arms = ("momentum", "robust_momentum", "vmoe")
    assert runs == [f"{a}_seed{s}.json" for a in arms for s in (0, 1)]
    rec = json.loads((tmp_path / "runs" / "robust_momentum_seed0.json").read_text())
    assert rec["setup"]["stack"] == "robust" and rec["setup"]["router"] == "vmoe"
    assert rec["setup"]["momentum"] == {"rho": 0.2, "kappa": 1.25}
    assert set(rec["by_corruption"]) == {"noise 0.25", "noise 0.5", "blur 1", "blur 2"}
    assert 0.0 <= rec["clean"] <= 1.0 and 0.0 <= rec["corrupted"] <= 1.0
    base = json.loads((tmp_path / "runs" / "vmoe_seed0.json").read_text())
    assert base["setup"]["stack"] is None and base["setup"]["router_options"] == {
        "capacity_factor": 1.05
    }
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.startswith("# Results\n\nkept text\n") and text.count(mv.BEGIN) == 1
    block = text.split(mv.BEGIN, 1)[1].split(mv.END, 1)[0]
    assert (
        "| V-MoE (n = 2) |" in block and "Robust MomentumV-MoE (ρ = 0.2, κ = 1.25) (n = 2)" in block
    )
    verdicts = [ln for ln in block.splitlines() if "beats V-MoE" in ln]
    assert len(verdicts) == 4
    assert all(
        v.endswith(("| held |", "| did not hold |", "| inconclusive at this scale |"))
        for v in verdicts
    )
    assert "stand-in for ImageNet-C" in block
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"

    again = _run(tmp_path, "--seeds", "0", "1")  # every run exists: nothing is trained again
    assert again.returncode == 0, again.stderr[-3000:]
    assert "done in" not in again.stdout
    changed = _run(tmp_path, "--seeds", "0", "--arms", "vmoe", "--noise", "0.3")
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert changed.stdout.count("done in") == 1  # another setup: that run alone is redone


def test_momentum_vision_rejects_unknown_arm(tmp_path):
    proc = _run(tmp_path, "--arms", "nope")
    assert proc.returncode != 0 and "unknown arm 'nope'" in proc.stderr


def test_corruptions_keep_shape_and_blur_keeps_mass():
    x = torch.zeros(2, 1, 28, 28)
    x[:, :, 14, 14] = 1.0
    for sigma in (1.0, 2.0):
        y = mv.gaussian_blur(x, sigma)
        assert y.shape == x.shape and torch.allclose(y.sum(), x.sum(), atol=1e-5)
        row = y[0, 0, 14, 8:21]  # centred on the impulse
        assert y[0, 0, 14, 14] < 1.0 and torch.allclose(row, row.flip(0))  # symmetric
    assert torch.equal(mv.gaussian_noise(x, 0.5), mv.gaussian_noise(x, 0.5))  # a fixed draw
    assert (mv.gaussian_noise(x, 0.5) - x).std() == pytest.approx(0.5, rel=0.1)
