"""The bad-input matrix on the CPU: every case must meet its expectation (nearly all: a clear
error naming the argument), and every registered op and router must have rows.

The matrix runs in a fresh ``run.py`` process (a fork server that has run no torch op), not in
this one: forking a process whose OpenMP pool is live can hang the child.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from smoe.routing.registry import available_routers
from tests.bad_inputs.cases import Dev, all_cases, smoe_ops

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cases():
    return all_cases()


def test_bad_input_matrix_on_cpu_has_only_clear_errors(tmp_path):
    out = tmp_path / "results.json"
    cmd = [sys.executable, "tests/bad_inputs/run.py", "--device", "cpu", "--no-report"]
    proc = subprocess.run(
        [*cmd, "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert out.exists(), f"run.py wrote no results:\n{proc.stdout}\n{proc.stderr}"
    results = json.loads(out.read_text())
    assert len(results) == sum("cpu" in c.devices for c in all_cases())
    off = [f"{r['outcome']}: {r['name']} ({r['detail'][:200]})" for r in results if not r["ok"]]
    assert not off, f"{len(off)} cases not as expected:\n" + "\n".join(off)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_smoe_op_has_wrong_dtype_and_wrong_rank_rows(cases):
    kinds = defaultdict(set)
    for c in cases:
        kinds[c.target].add(c.kind)
    ops = smoe_ops()
    assert "topk_softmax" in ops and "grouped_mm_backward" in ops  # the enumeration works
    missing = [
        f"smoe::{op} lacks {need} rows"
        for op in ops
        for need in ("dtype", "rank")
        if need not in kinds[f"smoe::{op}"]
    ]
    assert not missing, "\n".join(missing)


def test_every_registered_router_has_misconfiguration_and_layer_rows(cases):
    targets = defaultdict(set)
    for c in cases:
        targets[c.target].add(c.kind)
    missing = []
    for name in available_routers():
        if "config" not in targets[f"router:{name}"]:
            missing.append(f"router {name!r} has no misconfiguration row")
        if not targets[f"MoELayer[{name}]"]:
            missing.append(f"router {name!r} has no MoELayer row")
    assert not missing, "\n".join(missing)


def test_mixed_device_rows_run_on_cuda_against_the_cpu(cases):
    dev = Dev("cuda")
    assert (dev.device, dev.other) == ("cuda", "cpu")
    assert Dev("cpu").other == "meta"
    mixed = {c.target for c in cases if c.kind == "device" and "cuda" in c.devices}
    multi_tensor_ops = {
        f"smoe::{op}"
        for op in smoe_ops()
        if sum(
            isinstance(a.type, torch.TensorType)
            for a in getattr(torch.ops.smoe, op).default._schema.arguments
        )
        > 1
    }
    assert multi_tensor_ops <= mixed, sorted(multi_tensor_ops - mixed)
