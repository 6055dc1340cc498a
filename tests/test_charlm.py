"""The router lab's char-level LM: model, training harness and CLI at the quick size."""

from __future__ import annotations

import json
import math

import pytest
import torch

from smoe import MoELayer, RoutingContext
from smoe.data.text import tiny_shakespeare
from smoe.examples.charlm import late_mean, lr_at, main, parse_options, quick_config, run
from smoe.models.charlm import CharLM


@pytest.fixture(scope="module")
def corpus():
    return tiny_shakespeare()


def test_charlm_places_moe_layers_and_routes_causally():
    model = CharLM(20, d_model=16, n_layers=4, n_heads=2, context=8, num_experts=4, moe_every=2)
    assert [type(b.ffn).__name__ for b in model.blocks] == [
        "DenseFFN",
        "MoELayer",
        "DenseFFN",
        "MoELayer",
    ]
    assert [m.layer_index for m in model.moe_layers()] == [1, 3]
    assert model.moe_layers()[0].experts.d_ff == 4 * 16 // 2  # equal active compute at k = 2
    seen = []
    for m in model.moe_layers():
        m.router.register_forward_hook(
            lambda mod, args, kwargs, out: seen.append(kwargs["context"]), with_kwargs=True
        )
    logits, auxes = model(torch.randint(0, 20, (3, 8)), step=7)
    assert logits.shape == (3, 8, 20) and len(auxes) == 2
    assert [(c.batch_shape, c.causal, c.step, c.layer_index) for c in seen] == [
        ((3, 8), True, 7, 1),
        ((3, 8), True, 7, 3),
    ]


def test_charlm_is_causal_for_token_choice_routers():
    torch.manual_seed(0)
    model = CharLM(20, d_model=16, n_layers=2, n_heads=2, context=8, num_experts=4).eval()
    idx = torch.randint(0, 20, (2, 8))
    changed = idx.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 20  # change only the future of position 4
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=0)


def test_charlm_refuses_a_non_causal_router():
    model = CharLM(20, d_model=16, n_layers=1, n_heads=2, context=8, router="expert_choice")
    with pytest.raises(ValueError, match="not causal"):
        model(torch.randint(0, 20, (2, 8)))


def test_charlm_rejects_bad_input():
    with pytest.raises(ValueError, match="moe_every"):
        CharLM(20, moe_every=0)
    model = CharLM(20, d_model=16, n_layers=1, n_heads=2, context=8)
    with pytest.raises(ValueError, match="context=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_charlm_state_dict_round_trip():
    torch.manual_seed(0)
    a = CharLM(20, d_model=16, n_layers=2, n_heads=2, context=8, router="vmoe").eval()
    torch.manual_seed(1)
    b = CharLM(20, d_model=16, n_layers=2, n_heads=2, context=8, router="vmoe").eval()
    idx = torch.randint(0, 20, (2, 8))
    assert not torch.equal(a(idx)[0], b(idx)[0])
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(idx)[0], b(idx)[0])


def test_parse_options_reads_literals():
    assert parse_options(["capacity_factor=1.25", "noisy=True", "priority=max", "g=None"]) == {
        "capacity_factor": 1.25,
        "noisy": True,
        "priority": "max",
        "g": None,
    }
    with pytest.raises(ValueError, match="key=value"):
        parse_options(["capacity_factor"])


def test_lr_schedule_warms_up_then_decays():
    cfg = quick_config(steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    lrs = [lr_at(cfg, s) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)
    assert late_mean([1.0, 2.0, 3.0, 4.0]) == 3.5 and math.isnan(late_mean([]))


def test_charlm_quick_lowers_the_loss_and_reports_metrics(corpus, tmp_path):
    cfg = quick_config(router="topk", steps=60, eval_every=10)
    r = run(cfg, 0, corpus=corpus, out_dir=tmp_path, progress=False)
    bpc = [h["val_bpc"] for h in r["history"]]
    assert len(bpc) == 6
    uniform = math.log2(len(corpus.vocab))
    assert bpc[-1] < bpc[0] < uniform  # it learns
    f = r["final"]
    assert f["val_bpc_attacked"] > 0 and 0 <= f["late_rf"] <= 1 and f["max_vio"] >= 0
    assert 0 <= f["entropy"] <= math.log(cfg.num_experts) + 1e-9 and f["step_time_s"] > 0
    assert len(r["rf"]["previous"]) == len(r["rf"]["final"]) == 5
    assert r["rf"]["final"][-1] == 0.0  # the final checkpoint against itself
    layer = r["history"][-1]["layers"]["blocks.0.ffn"]
    tokens = cfg.eval_batches * cfg.batch_size * cfg.context
    assert layer["tokens"] == tokens
    assert sum(r["history"][-1]["load"]["blocks.0.ffn"]) == tokens * cfg.k  # no capacity: all kept
    assert r["attack"] == {"rate": 0.04, "placeholder": "AAA", "seed": 0}
    saved = json.loads((tmp_path / "charlm_topk_seed0.json").read_text())
    assert saved["final"] == f
    state = torch.load(tmp_path / "charlm_topk_seed0.pt", weights_only=True)
    assert any(k.endswith("router.weight") for k in state)


def test_charlm_same_seed_same_run(corpus):
    cfg = quick_config(router="noisy_topk", steps=12, eval_every=6)
    a = run(cfg, 3, corpus=corpus, progress=False)
    b = run(cfg, 3, corpus=corpus, progress=False)
    assert [h["val_loss"] for h in a["history"]] == [h["val_loss"] for h in b["history"]]


def test_charlm_cli_quick_writes_json_and_figures(tmp_path, capsys):
    results = main(
        [
            "--quick",
            "--router",
            "vmoe",
            "--router-option",
            "capacity_factor=1.25",
            "--steps",
            "10",
            "--eval-every",
            "5",
            "--out",
            str(tmp_path),
        ]
    )
    assert results[0]["config"]["router_options"] == {"capacity_factor": 1.25}
    out = capsys.readouterr().out
    assert "vmoe seed 0: val bpc" in out
    for name in ("curves", "rf", "load"):
        assert (tmp_path / f"vmoe_{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["--list-routers"]) == []
    assert "expert_choice" in capsys.readouterr().out


def test_moe_layer_in_charlm_accepts_explicit_context():
    layer = MoELayer(16, 32, 4, 2)
    y, _ = layer(torch.randn(2, 5, 16), RoutingContext(causal=True, step=1))
    assert y.shape == (2, 5, 16)
