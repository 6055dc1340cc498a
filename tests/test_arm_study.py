"""benchmarks/arm_study.py: the stored (arm, seed) runs are reused while their setup holds, rerun
when it changes, and the command line refuses what it cannot run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
arm_study = pytest.importorskip("arm_study")


def _study(tmp_path: Path, lr: float, todo):
    calls = []

    def run(cfg, seed, progress):
        calls.append((cfg["arm"], seed))
        return {"setup": cfg, "seconds": 0.0, "value": 10 * seed + len(cfg["arm"])}

    runs, trained = arm_study.stored_or_run(
        "t", todo, tmp_path, lambda arm: {"arm": arm, "lr": lr}, run, lambda r: f"v {r['value']}"
    )
    return runs, trained, calls


def test_stored_runs_are_reused_until_their_setup_changes(tmp_path, capsys):
    todo = [("a", 0), ("bb", 0), ("a", 1), ("bb", 1)]
    runs, trained, calls = _study(tmp_path, 0.1, todo)
    assert trained == 4 and calls == todo  # in todo's order
    assert {a: {s: r["value"] for s, r in by.items()} for a, by in runs.items()} == {
        "a": {0: 1, 1: 11},
        "bb": {0: 2, 1: 12},
    }
    assert capsys.readouterr().out.count("done in") == 4
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [
        "a_seed0.json",
        "a_seed1.json",
        "bb_seed0.json",
        "bb_seed1.json",
    ]
    again, trained, calls = _study(tmp_path, 0.1, todo)
    assert trained == 0 and calls == [] and again == runs
    assert "done in" not in capsys.readouterr().out
    _, trained, calls = _study(tmp_path, 0.2, todo[:1])  # another setup: that run alone is redone
    assert trained == 1 and calls == [("a", 0)]


def _args(tmp_path: Path, *argv: str):
    p = arm_study.study_parser("doc", ["x", "y"], epochs_help="e")
    return arm_study.parse_study_args(
        p, list(argv), ["x", "y"], name="t", out=tmp_path / "o", results=None, plot=tmp_path / "p"
    )


def test_study_args_defaults_and_errors(tmp_path, capsys):
    args = _args(tmp_path)
    assert args.seeds == [0, 1, 2] and args.arms == ["x", "y"] and args.results is None
    assert args.out == tmp_path / "o" and args.out.is_dir()
    quick = _args(tmp_path, "--quick", "--out", str(tmp_path / "q"))
    assert quick.seeds == [0] and quick.out == tmp_path / "q"
    assert quick.plot == arm_study.SCRATCH / "t_quick.png" and quick.results is None
    for bad, said in ((["--arms", "z"], "unknown arm 'z'"), (["--epochs", "0"], "--epochs must")):
        with pytest.raises(SystemExit):
            _args(tmp_path, *bad)
        assert said in capsys.readouterr().err
