"""ep_implementation="smoe": transformers' expert parallelism (DistributedConfig(ep_size=2,
fsdp_size=2)) on a tiny saved Mixtral, 2 spawned Gloo ranks, each with its own batch: logits
equal the plain model's and transformers' "all_to_all" implementation's, expert-weight gradients
equal "all_to_all"'s, to float32 rounding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' distributed loading needs it
pytest.importorskip("transformers.distributed.expert_parallel")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_ep")
    cfg = transformers.MixtralConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=64,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(cfg).save_pretrained(tmp / "tiny")
    out = tmp / "report.json"
    cmd = [sys.executable, str(ROOT / "tests/distributed/hf_ep_worker.py"), "--model",
           str(tmp / "tiny"), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_smoe_ep_is_registered():
    from transformers.distributed.expert_parallel import EPImplementationInterface

    import smoe.integrations.transformers  # noqa: F401
    from smoe.integrations.transformers_ep import SmoeEP

    assert EPImplementationInterface()["smoe"] is SmoeEP


def test_logits_equal_the_plain_model_and_all_to_all(report):
    for rank, r in enumerate(report):
        assert r["vs_plain"] < 1e-5, (rank, r)
        assert r["vs_all_to_all"] < 1e-5, (rank, r)


def test_expert_gradients_equal_all_to_all(report):
    for rank, r in enumerate(report):
        assert len(r["grad_names"]) == 4  # gate_up_proj and down_proj of both layers
        for name, rel in r["grad_vs_all_to_all"].items():
            assert rel < 1e-5, (rank, name, rel)
