"""benchmarks/claims.py (a paper's own comparison at small scale) and benchmarks/bench_sinkhorn.py:
the quick runs write their tables, resume, and the timing verdicts follow their bounds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
pytest.importorskip("timm")  # router_zoo (whose verdict rule claims.py uses) imports it
claims = pytest.importorskip("claims")


def _run(tmp_path: Path, study: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "claims.py"),
        study,
        "--quick",
        "--seeds",
        "0",
        "1",
        "--out",
        str(tmp_path / "runs"),
        "--results",
        str(tmp_path / "RESULTS.md"),
        "--plot",
        str(tmp_path / "plot.png"),
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)


def test_claims_quick_writes_table_verdicts_plot_and_resumes(tmp_path):
    (tmp_path / "RESULTS.md").write_text("# Results\n\nkept text\n")
    proc = _run(tmp_path, "xmoe", "--arms", "smoe_softmax", "xmoe_softmax", "--jobs", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (tmp_path / "RESULTS.md").read_text()
    assert "kept text" in text and "<!-- claims-xmoe:begin -->" in text
    assert "X-MoE, softmax (n = 2)" in text and "SMoE (Switch), softmax (n = 2)" in text
    assert "softmax: lower validation loss" in text
    assert (tmp_path / "plot.png").stat().st_size > 0
    runs = sorted(p.name for p in (tmp_path / "runs").glob("*.json"))
    assert runs == [f"{a}_seed{s}.json" for a in ("smoe_softmax", "xmoe_softmax") for s in (0, 1)]
    rec = json.loads((tmp_path / "runs" / "xmoe_softmax_seed0.json").read_text())
    assert len(rec["rc_curve"]) == len(rec["steps"]) and rec["setup"]["k"] == 1
    assert rec["setup"]["router_options"] == {"gate": "softmax"}
    # a second invocation reuses every run (same setup): no training
    again = _run(tmp_path, "xmoe", "--arms", "smoe_softmax", "xmoe_softmax")
    assert again.returncode == 0 and "claims: smoe_softmax seed" not in again.stdout


def test_claims_ssr_study_times_the_arms_and_records_the_sinkhorn_rate(tmp_path):
    proc = _run(tmp_path, "ssr", "--arms", "smoe", "sinkhorn_p1", "--seeds", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (tmp_path / "RESULTS.md").read_text()
    assert "always-on Sinkhorn markedly slower than SMoE" in text
    rec = json.loads((tmp_path / "runs" / "sinkhorn_p1_seed0.json").read_text())
    assert rec["setup"]["causal_training"] is False
    rates = [s["sinkhorn_rate"] for s in rec["router_stats"].values()]
    assert rates and all(r == 1.0 for r in rates)  # p = 1: every training forward
    timing = json.loads((tmp_path / "runs" / "timing.json").read_text())["timing"]
    assert set(timing) == {"smoe", "sinkhorn_p1"}


def test_claims_rejects_unknown_arm(tmp_path):
    proc = _run(tmp_path, "xmoe", "--arms", "nope")
    assert proc.returncode != 0 and "unknown arm 'nope'" in proc.stderr


def test_timing_verdicts_follow_their_bounds():
    study = claims.STUDIES["ssr"]
    timing = {
        "smoe": {"step_s": 1.0},
        "ssr_p0.001": {"step_s": 1.01, "expected_s": 1.02},
        "ssr_p0.01": {"step_s": 1.0, "expected_s": 1.10},
        "sinkhorn_p1": {"step_s": 1.5},
    }
    got = {v["claim"]: v["verdict"] for v in claims.timing_verdicts(study, timing)}
    assert got == {
        "SSR (p = 0.001) step time within a few % of SMoE": "held",
        "SSR (p = 0.01) step time within a few % of SMoE": "did not hold",
        "always-on Sinkhorn markedly slower than SMoE": "held",
    }


def test_every_study_arm_is_a_registered_router_and_every_claim_names_its_arms():
    from smoe.routing import available_routers

    for study in claims.STUDIES.values():
        assert all(a.router in available_routers() for a in study.arms.values())
        for c in study.comparisons:
            assert c.arm in study.arms and (c.baseline is None or c.baseline in study.arms)
            assert c.claim.metric in claims.METRICS


def test_bench_sinkhorn_quick_writes_its_table(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_sinkhorn.py"),
        "--quick",
        "--out",
        str(tmp_path),
        "--results",
        str(tmp_path / "RESULTS.md"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((tmp_path / "bench_sinkhorn_cpu_quick.json").read_text())["rows"]
    assert [(r["T"], r["E"]) for r in rows] == [(512, 8), (1024, 16)]
    for r in rows:
        expected = (1 - 0.001) * r["ssr_p0_s"] + 0.001 * r["ssr_p1_s"]
        assert r["ssr_avg_s"] == pytest.approx(expected)
        assert r["ssr_p1_iters"] is not None and 1 <= r["ssr_p1_iters"] <= 100
    assert "Target SSR avg" in (tmp_path / "RESULTS.md").read_text()


def test_a_trend_claim_compares_one_arm_with_zero():
    study = claims.STUDIES["xmoe"]

    def rec(seed, rc):
        return {"seed": seed, "rc_curve": rc, "bpc": 2.0, "late_rf": 0.1, "rc": rc[-1]}

    runs = {
        "xmoe_softmax": [rec(s, [1.0, 2.0, 3.0, 4.0 + s * 0.1]) for s in range(3)],  # rising
        "smoe_softmax": [rec(s, [1.0, 3.0, 2.9, 2.5 - s * 0.1]) for s in range(3)],  # declining
    }
    got = {v["claim"]: v for v in claims.summarize(study, runs)["verdicts"]}
    rises = got["softmax: X-MoE's RC rises late in training (Fig 2c)"]
    assert rises["verdict"] == "held" and rises["delta"] == pytest.approx(2.1)  # 4.1 - 2.0
    assert got["softmax: ... while SMoE's declines (Fig 2c)"]["verdict"] == "held"


def test_a_stored_setup_lacking_a_new_field_still_matches_at_its_default():
    from common import same_setup

    current = {"steps": 600, "causal_training": True}
    assert same_setup({"steps": 600}, current, {"steps": 1000, "causal_training": True})
    assert not same_setup({"steps": 600}, {"steps": 600, "causal_training": False}, current)
    assert not same_setup({"steps": 500}, current, current)
    assert not same_setup(None, current, current)


def test_report_only_renders_the_stored_runs_and_trains_nothing(tmp_path):
    # the s2moe study (per-arm k, inference FLOPs): one arm trained, the other left for later
    r = _run(tmp_path, "s2moe", "--arms", "smoe_k1")
    assert r.returncode == 0, r.stderr
    r = _run(tmp_path, "s2moe", "--arms", "smoe_k1", "smoe_k2", "--report-only")
    assert r.returncode == 0, r.stderr
    assert "not run: smoe_k2 seed 0, smoe_k2 seed 1" in r.stdout
    assert not list((tmp_path / "runs").glob("smoe_k2_*"))
    text = (tmp_path / "RESULTS.md").read_text()
    assert "k = per arm" not in text  # one arm has runs: its k
    assert "| SMoE, k = 1 | 1 |" in text  # the FLOPs table row of the trained arm
