"""benchmarks/router_zoo.py: the quick leaderboard writes its table and resumes; its verdicts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
pytest.importorskip("timm")
router_zoo = pytest.importorskip("router_zoo")


def _run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "router_zoo.py"),
        "--quick",
        "--routers",
        "switch",
        "expert_choice",
        "--out",
        str(tmp_path / "runs"),
        "--results",
        str(tmp_path / "RESULTS.md"),
        "--plot",
        str(tmp_path / "zoo.png"),
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_router_zoo_quick_writes_its_table_and_resumes(tmp_path):
    (tmp_path / "RESULTS.md").write_text("# Results\n\nkept text\n")
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["expert_choice_seed0.json", "switch_seed0.json", "topk_seed0.json"]
    ec = json.loads((tmp_path / "runs" / "expert_choice_seed0.json").read_text())
    assert ec["charlm"] is None  # not causal: never trained as a decoder
    assert 0.0 <= ec["vit"]["vit_acc"] <= 1.0 and 0.0 <= ec["vit"]["vit_acc_noisy"] <= 1.0
    sw = json.loads((tmp_path / "runs" / "switch_seed0.json").read_text())
    assert sw["charlm"]["bpc"] > 0 and sw["charlm"]["config"]["router"] == "switch"
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.startswith("# Results\n\nkept text\n")
    block = text.split(router_zoo.BEGIN, 1)[1].split(router_zoo.END, 1)[0]
    rows = [line for line in block.splitlines() if line.startswith("| `")]
    # top-k (the baseline) first, then the routers in the order asked
    assert [r.split("`")[1] for r in rows[:3]] == ["topk", "switch", "expert_choice"]
    assert "not causal" in rows[2] and "verdict" in block
    assert (tmp_path / "zoo.png").read_bytes()[:4] == b"\x89PNG"

    again = _run(tmp_path)  # every run exists: nothing is trained again
    assert again.returncode == 0, again.stderr[-3000:]
    assert "done in" not in again.stdout
    assert (tmp_path / "RESULTS.md").read_text().count(router_zoo.BEGIN) == 1


def test_router_zoo_rejects_unknown_router(tmp_path):
    proc = _run(tmp_path, "--routers", "nope")
    assert proc.returncode != 0 and "unknown router 'nope'" in proc.stderr


Claim = router_zoo.Claim


@pytest.mark.parametrize(
    "direction, mean, expected",
    [
        ("lower", 1.0, "held"),  # 2 below the baseline, standard error 0.5
        ("lower", 4.5, "did not hold"),
        ("lower", 2.9, "inconclusive at this scale"),
        ("higher", 1.0, "did not hold"),
        ("same", 4.5, "did not hold"),  # worse (bpc: lower is better) beyond 2 s
        ("same", 3.5, "held"),
        ("same", 1.0, "held"),  # better is no worse
    ],
)
def test_verdict_rule(direction, mean, expected):
    base = {"bpc": (3.0, 0.5)}
    row = {"bpc": (mean, 0.5)}
    v = router_zoo.verdict(Claim("c", "bpc", direction), row, base, n=2)
    assert v["verdict"] == expected
    assert v["se"] == pytest.approx(0.5)
    assert v["delta"] == pytest.approx(mean - 3.0)


def test_every_zoo_entry_is_a_registered_router():
    from smoe.routing import available_routers

    assert set(router_zoo.ZOO) <= set(available_routers())
    assert set(available_routers()) <= set(router_zoo.ZOO)  # a new router must add its row
