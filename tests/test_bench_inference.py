"""benchmarks/bench_inference.py cannot rot: --quick runs both blocks, both dtypes and every
implementation, the implementations compute the same block as eager, and the JSON and markdown
have the structure the report promises. Nothing is timed (no assertion on a ratio's size)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.helpers import run_quick_benchmark

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_inference as bi  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_inference")
    data, md, _ = run_quick_benchmark("bench_inference.py", out, "--threads", "1",
                                      stem="bench_inference_cpu_quick")  # fmt: skip
    return data, md


def test_quick_has_a_row_per_block_dtype_tokens_and_implementation(quick):
    data, md = quick
    cells = [(r["block"], r["dtype"], r["T"]) for r in data["results"]]
    assert cells == [
        (b, d, T) for b in ("mixtral", "olmoe") for d in ("fp32", "bf16") for T in (1, 8)
    ]
    assert data["machine"]["threads"] == 1 and data["rounds"] == 1
    for r in data["results"]:
        assert list(r["impls"]) == list(bi.IMPLS)
        assert r["impls"]["eager"]["vs_eager"] == 1.0
        assert r["impls"]["grouped_mm"]["vs_grouped_mm"] == 1.0
        for v in r["impls"].values():
            assert v["ms"] > 0 and v["vs_eager"] > 0 and v["vs_grouped_mm"] > 0
            # every implementation computes eager's block on the same weights
            assert v["max_rel_diff"] < (1e-5 if r["dtype"] == "fp32" else 3e-2)
    rows = [ln for ln in md.splitlines() if ln.startswith("| mixtral") or ln.startswith("| olmoe")]
    assert len(rows) == 2 * 2 * 2 * len(bi.IMPLS)
    assert md.count("\n- ") == 4  # one target verdict per (block, dtype)


def test_exported_row_runs_one_program_for_every_length(tmp_path):
    data, md, _ = run_quick_benchmark("bench_inference.py", tmp_path, "--threads", "1", "--blocks",
                                      "mixtral", "--dtype", "fp32", "--exported",
                                      stem="bench_inference_cpu_quick")  # fmt: skip
    assert [r["T"] for r in data["results"]] == [1, 8]
    for r in data["results"]:
        assert list(r["impls"]) == [*bi.IMPLS, "smoe-exported"]
        assert r["impls"]["smoe-exported"]["max_rel_diff"] < 1e-5  # the block eager computes
    assert md.count("| smoe-exported |") == 2


def test_verdicts_name_each_miss():
    impls = {"smoe": {"vs_eager": 1.05, "vs_grouped_mm": 0.9}}
    results = [dict(block="b", dtype="fp32", T=T, impls=impls) for T in (1, 512)]
    (line,) = bi.verdicts(results)
    assert "T=1: 0.90x < 1.0x" in line and "T=512: 0.90x < 1.1x" in line
    ok = {"smoe": {"vs_eager": 1.2, "vs_grouped_mm": 1.15}}
    assert bi.verdicts([dict(block="b", dtype="bf16", T=4096, impls=ok)]) == ["- b bf16: met"]


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit, match="unknown --blocks"):
        bi.main(["--quick", "--blocks", "nope"])
    with pytest.raises(SystemExit, match="--tokens must be >= 1"):
        bi.main(["--quick", "--tokens", "0"])
