import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

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
