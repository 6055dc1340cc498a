"""benchmarks/bench_expert_parallel.py cannot rot: --quick runs the plain layer and 1, 2 and 4
expert-parallel ranks, the bytes counted at the collectives equal the design note's formula on
the routing's counts, and the report has its rows and verdicts. Nothing is timed (no assertion on
a time's size)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import run_quick_benchmark

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_expert_parallel as bep  # noqa: E402

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_ep")
    script, stem = "bench_expert_parallel.py", "bench_expert_parallel_cpu_quick"
    data, md, _ = run_quick_benchmark(script, out, "--ranks", "1,2,4", stem=stem, timeout=300)
    return data, md


def test_a_row_per_shape_and_rank_count(quick):
    data, md = quick
    cells = [(r["shape"], r["P"], r["ep"]) for r in data["rows"]]
    shapes = list(bep.SHAPES)
    assert cells == [(s, 1, False) for s in shapes] + [
        (s, P, True) for P in (1, 2, 4) for s in shapes
    ]
    assert md.count("\n| mixtral-like") == 4 and md.count("\n| fine-grained") == 4
    assert md.count("\n- ") == 2  # one verdict per shape at 2 ranks


def test_bytes_at_the_collectives_equal_the_formula(quick):
    data, _ = quick
    for r in data["rows"]:
        if not r["ep"]:
            continue
        assert len(r["bytes_measured"]) == r["P"]
        assert r["bytes_measured"] == r["bytes_formula"], r
        if r["P"] == 1:
            assert r["bytes_measured"] == [0]  # nothing leaves a lone rank
        else:
            assert min(r["bytes_measured"]) > 8 * (r["E"] // r["P"]) * (r["P"] - 1)


def test_phases_are_parts_of_the_forward(quick):
    data, _ = quick
    for r in data["rows"]:
        ph = r["phases_ms"]
        assert list(ph) == list(bep.PHASES)
        assert all(v >= 0 for v in ph.values()), r
        assert ph["experts"] > 0 and ph["route"] > 0
        if r["ep"] and r["P"] > 1:
            assert ph["counts"] > 0 and ph["tokens"] > 0
        if not r["ep"]:
            assert ph["counts"] == ph["tokens"] == ph["regroup"] == ph["gathers"] == 0


def test_formula_on_a_known_count_matrix():
    """2 ranks, E = 4 (2 per rank), d = 3, fp32: rank 0 sends 3+1 rows to itself and 2+2 to
    rank 1; rank 1 sends 0+2 to rank 0 and 5+1 to itself."""
    shape = dict(T=8, d=3, d_ff=5, E=4, k=2)
    rank = dict(fwd=[1.0], total=[2.0], phases={p: 0.1 for p in bep.PHASES})
    every = [
        {**rank, "counts": [3, 1, 2, 2], "sent": {"tokens": 4 * 3 * (4 + 2), "counts": 16}},
        {**rank, "counts": [0, 2, 5, 1], "sent": {"tokens": 4 * 3 * (2 + 4), "counts": 16}},
    ]
    row = bep.summarise("s", shape, torch.float32, every, ep=True)
    # rank 0: 4 rows out (to rank 1) + 2 rows back (rank 1's rows to rank 0's experts)
    assert row["bytes_formula"] == [4 * 3 * (4 + 2) + 8 * 2, 4 * 3 * (2 + 4) + 8 * 2]
    assert row["bytes_measured"] == row["bytes_formula"]
    assert row["bytes_uniform"] == 2 * 4 * 3 * 2 * 4 * 1 / 2 + 8 * 2
    assert row["bookkeeping_share"] == pytest.approx(0.3)


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit, match="every rank count must divide"):
        bep.main(["--quick", "--ranks", "3"])
    with pytest.raises(SystemExit, match="--ranks must be >= 1"):
        bep.main(["--quick", "--ranks", "0,2"])
    with pytest.raises(SystemExit, match="comma-separated integers"):
        bep.main(["--quick", "--ranks", "two"])
