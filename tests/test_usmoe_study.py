"""The USMoE experiments of issue 27: benchmarks/usmoe_study.py and usmoe_lm_study.py (training-free
swap into a trained token-choice ViT and char-LM, quick) and benchmarks/usmoe_mteb.py's code path
on a tiny random OLMoE (the paper's setting needs the weights on disk and mteb)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
pytest.importorskip("timm")
pytest.importorskip("transformers")
usmoe_study = pytest.importorskip("usmoe_study")
usmoe_lm_study = pytest.importorskip("usmoe_lm_study")
usmoe_mteb = pytest.importorskip("usmoe_mteb")

from tests.integrations.tiny_models import build  # noqa: E402


def test_study_quick_writes_every_arm_and_its_expert_evaluations(tmp_path):
    results = tmp_path / "RESULTS.md"
    argv = ["--quick", "--seeds", "0", "--budgets", "1.0", "0.5", "--out", str(tmp_path / "runs"),
            "--results", str(results), "--threads", "1"]  # fmt: skip
    usmoe_study.main(argv)
    rec = json.loads((tmp_path / "runs" / "seed0.json").read_text())
    arms = rec["arms"]
    assert set(arms) == {"tc", "ec", "usmoe_1.00", "usmoe_0.50"}
    assert arms["tc"]["evals"] == pytest.approx(2.0)  # k = 2
    assert arms["usmoe_1.00"]["evals"] == pytest.approx(2.0)  # N = S k pairs per image
    assert arms["usmoe_0.50"]["evals"] == pytest.approx(1.0)  # half the budget
    assert arms["ec"]["evals"] == pytest.approx(13 * 8 / 50)  # ceil(50 * 2 / 8) per expert
    text = results.read_text()
    assert "<!-- usmoe-study:begin -->" in text and "USMoE, budget 0.50 k" in text
    assert "(ii) USMoE at 0.86" not in text  # no 0.86 arm asked for: its claim is left out
    before = (tmp_path / "runs" / "seed0.json").read_text()
    usmoe_study.main(argv)  # resumes: the stored seed is reused as it is
    assert (tmp_path / "runs" / "seed0.json").read_text() == before


def test_swapped_routers_read_the_trained_weight_and_swap_back():
    torch.manual_seed(0)
    from smoe.models import moe_blocks, quickdraw_vit, vmoe_vit

    model = vmoe_vit(quickdraw_vit(9, embed_dim=32, depth=2, num_heads=2), 8, 2, every=2,
                     upcycle=False, router="topk").eval()  # fmt: skip
    (mlp,) = moe_blocks(model).values()
    trained = mlp.moe.router
    usmoe_study.swap_routers(model, "usmoe", budget=2.0)
    assert type(mlp.moe.router).__name__ == "USMoERouter"
    assert mlp.moe.router.weight is trained.weight  # aliased, not copied
    usmoe_study.swap_routers(model, "expert_choice", capacity_factor=2.0, group_size="image")
    assert mlp.moe.router.group_size == mlp.tokens_per_image
    usmoe_study.swap_routers(model, "topk")
    assert mlp.moe.router is trained


def test_lm_study_quick_swaps_causal_routers_into_the_trained_char_lm(tmp_path):
    results = tmp_path / "RESULTS.md"
    argv = ["--quick", "--seeds", "0", "--budgets", "1.0", "0.5", "--out", str(tmp_path / "runs"),
            "--results", str(results), "--threads", "1"]  # fmt: skip
    usmoe_lm_study.main(argv)
    rec = json.loads((tmp_path / "runs" / "seed0.json").read_text())
    arms = rec["arms"]
    assert set(arms) == {"tc", "ec", "usmoe_1.00", "usmoe_0.50"}
    # quick: B = 8 sequences, E = 4, k = 2; every position's 8 tokens form one group
    assert arms["tc"]["evals"] == pytest.approx(2.0)
    assert arms["ec"]["evals"] == pytest.approx(2.0)  # ceil(8 * 2 / 4) = 4 tokens per expert
    assert arms["usmoe_1.00"]["evals"] == pytest.approx(2.0)  # 16 pairs per position
    assert arms["usmoe_0.50"]["evals"] == pytest.approx(1.0)
    for arm in arms.values():
        assert 0 < arm["bpc"] < 8 and 0 < arm["bpc_attacked"] < 8
    text = results.read_text()
    assert "<!-- usmoe-lm-study:begin -->" in text and "USMoE by position, budget 0.50 k" in text
    before = (tmp_path / "runs" / "seed0.json").read_text()
    usmoe_lm_study.main(argv)  # resumes: the stored seed is reused as it is
    assert (tmp_path / "runs" / "seed0.json").read_text() == before


def test_lm_study_swaps_read_the_trained_weight_and_swap_back():
    from smoe.models.charlm import CharLM

    torch.manual_seed(0)
    model = CharLM(20, d_model=16, n_layers=2, n_heads=2, context=8, num_experts=4)
    layer = model.moe_layers()[0]
    trained = layer.router
    usmoe_lm_study.swap_routers(model, "usmoe", budget=2.0, group="position")
    assert type(layer.router).__name__ == "USMoERouter" and layer.router.weight is trained.weight
    model(torch.randint(0, 20, (3, 8)))  # causal: the decoder accepts it
    usmoe_lm_study.swap_routers(model, "topk")
    assert layer.router is trained


@pytest.mark.parametrize("emb, width", [("HS", 32), ("RW", 2 * 4), ("MoEE", 32 + 2 * 4)])
def test_mteb_embeddings_of_every_method_on_a_tiny_olmoe(emb, width):
    ids = torch.randint(3, 64, (3, 7), generator=torch.Generator().manual_seed(0))
    want = usmoe_mteb.embed(build("olmoe"), ids, emb)
    assert want.shape == (3, width) and torch.isfinite(want).all()
    for method in ("ec", "usmoe_1.0", "usmoe_0.5"):
        got = usmoe_mteb.embed(usmoe_mteb.swap(build("olmoe"), method), ids, emb)
        assert got.shape == want.shape and torch.isfinite(got).all(), method
        if emb != "RW":  # other experts, other hidden states (router logits stay the model's)
            assert not torch.equal(got, want), method
    # a sentence's embedding does not depend on the others of its batch (one group per sequence)
    alone = usmoe_mteb.embed(usmoe_mteb.swap(build("olmoe"), "usmoe_1.0"), ids[:1], emb)
    batch = usmoe_mteb.embed(usmoe_mteb.swap(build("olmoe"), "usmoe_1.0"), ids, emb)
    torch.testing.assert_close(alone[0], batch[0], rtol=1e-5, atol=1e-6)


def test_mteb_encoder_batches_by_length_without_padding():
    class Tok:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [1] + [3 + (ord(c) % 60) for c in text]}

    model = build("olmoe")
    enc = usmoe_mteb.Encoder(usmoe_mteb.swap(model, "usmoe_1.0"), Tok(), "HS", "none", "cpu")
    sentences = ["abc", "hello", "xyz", "hi"]
    out = enc.encode(sentences, batch_size=2)
    assert out.shape == (4, 32)
    single = [enc.encode([s])[0] for s in sentences]
    for a, b in zip(out, single):
        assert torch.allclose(torch.from_numpy(a), torch.from_numpy(b), rtol=1e-5, atol=1e-6)


def test_mteb_refuses_unknown_methods_and_embeddings():
    with pytest.raises(ValueError, match="method must be tc, ec or usmoe_<budget>"):
        usmoe_mteb.swap(build("olmoe"), "random")
    with pytest.raises(ValueError, match="must be > 0"):
        usmoe_mteb.swap(build("olmoe"), "usmoe_0")
    with pytest.raises(ValueError, match="emb must be HS, RW or MoEE"):
        usmoe_mteb.embed(build("olmoe"), torch.ones(1, 3, dtype=torch.long), "CLS")
