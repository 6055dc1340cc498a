"""benchmarks/expert_bias.py (issue 26's aux-loss-free balancing experiment): the quick run writes
its runs, table, verdicts and plot, the expert-bias arm's updater moves the biases, and an
interrupted study resumes without training again."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
pytest.importorskip("matplotlib")
eb = pytest.importorskip("expert_bias")


def _main(tmp_path: Path, *extra: str) -> dict:
    return eb.main(
        [
            "--quick",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "runs"),
            "--results",
            str(tmp_path / "RESULTS.md"),
            "--plot",
            str(tmp_path / "plot.png"),
            *extra,
        ]
    )


def test_expert_bias_quick_writes_runs_table_verdicts_plot_and_resumes(tmp_path):
    (tmp_path / "RESULTS.md").write_text("# Results\n\nkept text\n")
    res = _main(tmp_path, "--seeds", "0", "1")
    assert res["trained"] == 8
    runs = {p.name for p in (tmp_path / "runs").glob("*.json")}
    assert runs == {f"{a}_seed{s}.json" for a in eb.ARMS for s in (0, 1)}
    assert set(eb.ARMS) == {"switch", "expert_bias", "neither", "expert_bias_fast"}

    recs = {a: json.loads((tmp_path / "runs" / f"{a}_seed0.json").read_text()) for a in eb.ARMS}
    steps = eb.QUICK_LIMIT // 128
    for arm, rec in recs.items():
        assert rec["setup"]["arm"] == arm and rec["setup"]["epochs"] == 1
        assert 0.0 <= rec["accuracy"] <= 1.0
        assert len(rec["step_vio"]) == steps and len(rec["epoch_vio"]) == 1
        assert all(0.0 <= v <= 7.0 for v in rec["step_vio"])  # MaxVio lies in [0, E - 1]
        assert math.isclose(rec["vio_train"], sum(rec["step_vio"]) / steps)
        assert math.isclose(rec["vio_last"], rec["epoch_vio"][-1])
        assert 0.0 <= rec["vio_test"] <= 7.0
    assert recs["switch"]["setup"]["router_options"] == {}
    assert recs["switch"]["expert_bias"] is None and recs["neither"]["expert_bias"] is None
    assert recs["expert_bias"]["setup"]["router_options"] == {"expert_bias": True, "aux": False}
    assert recs["expert_bias"]["setup"]["expert_bias_coeff"] == 1e-3
    assert recs["expert_bias_fast"]["setup"]["expert_bias_coeff"] == 1e-2
    # the updater ran once per step: every bias moved, by at most 2 coeff per step, mean zero
    for arm, coeff in (("expert_bias", 1e-3), ("expert_bias_fast", 1e-2)):
        biases = recs[arm]["expert_bias"]
        assert len(biases) == 2 and all(len(b) == 8 for b in biases)
        for b in biases:
            assert max(abs(v) for v in b) > 0
            assert max(abs(v) for v in b) <= 2 * coeff * steps + 1e-6  # centred: |δ| ≤ 2 coeff
            assert abs(sum(b)) < 1e-5 * coeff / 1e-3
        assert 0.0 < eb.bias_range(recs[arm]) <= 1.0 + 1e-6

    text = (tmp_path / "RESULTS.md").read_text()
    assert text.startswith("# Results\n\nkept text\n") and text.count(eb.BEGIN) == 1
    block = text.split(eb.BEGIN, 1)[1].split(eb.END, 1)[0]
    assert "| Switch balance loss + z-loss (n = 2) |" in block
    assert "| expert bias (u = 1e-3) (n = 2) |" in block and "| neither (n = 2) |" in block
    verdicts = [ln for ln in block.splitlines() if ln.startswith(("| expert bias", "| the "))]
    verdicts = [ln for ln in verdicts if " than " in ln]
    assert len(verdicts) == len(eb.CLAIMS) + len(eb.CHECKS)
    assert all(
        v.endswith(("| held |", "| did not hold |", "| inconclusive at this scale |"))
        for v in verdicts
    )
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"

    again = _main(tmp_path, "--seeds", "0", "1")  # every run exists: nothing is trained again
    assert again["trained"] == 0
    changed = _main(tmp_path, "--seeds", "0", "--arms", "neither", "--epochs", "2")
    assert changed["trained"] == 2  # another setup: switch (always run) and neither, seed 0
    assert "| expert bias (u = 1e-3)" not in (tmp_path / "RESULTS.md").read_text()


def test_expert_bias_rejects_unknown_arm(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _main(tmp_path, "--arms", "nope")
    assert "unknown arm 'nope'" in capsys.readouterr().err
