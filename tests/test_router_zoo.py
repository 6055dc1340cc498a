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
        "vmoe",
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
    assert runs == [
        "expert_choice_seed0.json",
        "switch_seed0.json",
        "timing.json",
        "topk_seed0.json",
        "vmoe_seed0.json",
    ]
    ec = json.loads((tmp_path / "runs" / "expert_choice_seed0.json").read_text())
    # expert choice runs in the decoder grouped by position (causal), by image in the ViT
    assert ec["charlm"]["setup"]["router_options"] == {"group_size": "position"}
    assert ec["charlm"]["bpc"] > 0
    assert 0.0 <= ec["vit"]["vit_acc"] <= 1.0 and 0.0 <= ec["vit"]["vit_acc_noisy"] <= 1.0
    sw = json.loads((tmp_path / "runs" / "switch_seed0.json").read_text())
    assert sw["charlm"]["bpc"] > 0 and sw["charlm"]["setup"]["router"] == "switch"
    vm = json.loads((tmp_path / "runs" / "vmoe_seed0.json").read_text())
    # V-MoE runs in the decoder without capacity (causal), and with C = 1.05 on the ViT
    assert vm["charlm"]["setup"]["router_options"] == {"capacity_factor": None}
    assert vm["vit"]["setup"]["options"] == {"capacity_factor": 1.05}
    timing = json.loads((tmp_path / "runs" / "timing.json").read_text())["timing"]
    assert set(timing) == {"topk", "switch", "vmoe", "expert_choice"}
    assert timing["topk"]["ratio"] == 1.0
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.startswith("# Results\n\nkept text\n")
    block = text.split(router_zoo.BEGIN, 1)[1].split(router_zoo.END, 1)[0]
    leaderboard, claims = block.split("Claims against top-k", 1)
    rows = [line for line in leaderboard.splitlines() if line.startswith("| `")]
    assert "| `vmoe` |" in claims and "| `topk` |" not in claims  # the baseline claims nothing
    # top-k (the baseline) first, then the routers in the order asked
    assert [r.split("`")[1] for r in rows] == ["topk", "switch", "vmoe", "expert_choice"]
    assert "not causal" not in block and "verdict" in block
    cells = rows[0].split("|")[2:-1]
    assert cells[4].strip() == "1.00"  # top-k's step time against itself
    for row in rows:
        cells = row.split("|")[2:-1]
        for cell in cells[:4] + cells[5:]:
            mean, std = (float(v) for v in cell.split("±"))  # every cell is "mean ± std"
            assert mean >= 0 and std == 0.0  # one seed (expert choice's MaxVio is 0)
    assert (tmp_path / "zoo.png").read_bytes()[:4] == b"\x89PNG"

    again = _run(tmp_path)  # every run exists: nothing is trained again
    assert again.returncode == 0, again.stderr[-3000:]
    assert "done in" not in again.stdout
    assert (tmp_path / "RESULTS.md").read_text().count(router_zoo.BEGIN) == 1

    # one router asked (its runs exist): the table still shows every router with stored runs,
    # and the timing keeps the other routers' ratios from the invocation that measured them
    partial = _run(tmp_path, "--routers", "switch")
    assert partial.returncode == 0, partial.stderr[-3000:]
    block = (tmp_path / "RESULTS.md").read_text().split(router_zoo.BEGIN, 1)[1]
    rows = [line for line in block.split("Claims against top-k", 1)[0].splitlines()]
    assert sum(line.startswith("| `") for line in rows) == 4
    timing = json.loads((tmp_path / "runs" / "timing.json").read_text())["timing"]
    assert set(timing) == {"topk", "switch", "vmoe", "expert_choice"}

    changed = _run(tmp_path, "--noise-std", "0.25")  # another setup: the ViT runs again
    assert changed.returncode == 0, changed.stderr[-3000:]
    done = [line for line in changed.stdout.splitlines() if "done in" in line]
    assert len(done) == 4 and all(" vit done" in line for line in done)


def test_a_router_not_causal_as_configured_gets_no_decoder_run(tmp_path, monkeypatch):
    # expert choice over whole sequences (no position groups) would see later tokens
    monkeypatch.setitem(router_zoo.ZOO, "expert_choice", router_zoo.ZooEntry())
    assert not router_zoo.runs_in_charlm("expert_choice")
    (tmp_path / "RESULTS.md").write_text("# Results\n")
    paths = [tmp_path / "runs", tmp_path / "RESULTS.md", tmp_path / "zoo.png"]
    args = ["--quick", "--tasks", "charlm", "--routers", "expert_choice", "--threads", "1"]
    router_zoo.main(
        [*args, "--out", str(paths[0]), "--results", str(paths[1]), "--plot", str(paths[2])]
    )
    assert not (tmp_path / "runs" / "expert_choice_seed0.json").exists()  # nothing trained
    assert json.loads((tmp_path / "runs" / "topk_seed0.json").read_text())["charlm"]["bpc"] > 0
    block = paths[1].read_text().split(router_zoo.BEGIN, 1)[1]
    row = next(line for line in block.splitlines() if line.startswith("| `expert_choice` |"))
    assert "not causal" in row


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
        ("same", 3.5, "inconclusive at this scale"),  # within 2 s, but 2 s exceeds the margin
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


def test_verdict_same_within_margin_holds():
    base, row = {"bpc": (3.0, 0.5)}, {"bpc": (3.5, 0.5)}
    v = router_zoo.verdict(Claim("c", "bpc", "same", margin=2.0), row, base, n=2)
    assert v["verdict"] == "held"  # |d| + 2 s = 1.5 <= 2


def test_every_zoo_entry_is_a_registered_router():
    from smoe.routing import available_routers

    assert set(router_zoo.ZOO) <= set(available_routers())
    assert set(available_routers()) <= set(router_zoo.ZOO)  # a new router must add its row


def test_usmoe_runs_in_the_vit_with_each_image_competing_alone_and_in_the_decoder_by_position():
    import torch

    from smoe.models import quickdraw_vit, vmoe_vit
    from smoe.models.vit import tokens_per_image

    # joint top-N over a sequence is not causal; over the batch's tokens at one position, it is
    assert router_zoo.ZOO["usmoe"].charlm == {"group": "position"}
    assert router_zoo.runs_in_charlm("usmoe") and router_zoo.runs_in_vit("usmoe")
    torch.manual_seed(0)
    vit = quickdraw_vit(9, embed_dim=16, depth=2, num_heads=2)
    N = tokens_per_image(vit)
    model = vmoe_vit(
        vit, 8, 2, every=2, upcycle=False, router="usmoe", **router_zoo.ZOO["usmoe"].vit
    )
    kept = []
    for block in model.blocks:
        if hasattr(block.mlp, "moe"):
            block.mlp.moe.router.register_forward_hook(lambda m, a, out: kept.append(out.plan.kept))
    images = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    changed = images.clone()
    changed[0] = -images[0]
    with torch.no_grad():
        model.eval()(images)
        model(changed)
    assert len(kept) == 2
    first, again = (k.view(3, N, 8) for k in kept)
    assert first.sum(dim=(1, 2)).tolist() == [2 * N] * 3  # budget k: 2 N pairs per image
    assert torch.equal(first[1:], again[1:]) and not torch.equal(first[0], again[0])
