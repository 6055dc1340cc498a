"""The README's Python examples run as written: each ```python block is executed with only what it
leaves to the reader filled in (a loss, a dense FFN, a model, a batch), so that a renamed function
or argument breaks this test instead of the first reader's copy-paste."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import smoe

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def _block(first_line: str) -> str:
    """The README block whose first line starts with ``first_line`` (one, and only one)."""
    found = [b for b in BLOCKS if b.startswith(first_line)]
    assert len(found) == 1, f"README: {len(found)} python blocks start with {first_line!r}"
    return found[0]


def _run(code: str, **given) -> dict:
    ns = {"torch": torch, **given}  # every block takes `import torch` as read
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 (the README's own code)
    return ns


def _tiny(prefix: str, **extra):
    transformers = pytest.importorskip("transformers")
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{prefix}Config")(**kw, **extra)
    return getattr(transformers, f"{prefix}ForCausalLM")(cfg)


def test_the_examples_are_all_covered():
    assert len(BLOCKS) == 6  # a new block needs a test below


def test_using_it():
    timm = pytest.importorskip("timm")
    ns = _run(
        _block("import torch\nfrom smoe import MoELayer"),
        task_loss=lambda y: y.square().mean(),
        dense_ffn=timm.layers.Mlp(512, 1792),
        x=torch.randn(2, 8, 512),
    )
    assert ns["y"].shape == (2, 8, 512) and ns["y"].dtype == torch.bfloat16  # under autocast
    assert ns["loss"].requires_grad and int(ns["aux"].tokens_per_expert.sum()) == 2 * 8 * 2
    assert isinstance(ns["moe"], smoe.MoELayer)


def test_shared_experts_expert_bias_and_moefy():
    timm = pytest.importorskip("timm")
    layer = smoe.MoELayer(512, 1408, 64, k=6, router_options={"expert_bias": True, "aux": False})
    model = torch.nn.Sequential(layer)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3
    )
    ns = _run(
        _block("layer = MoELayer(512, 1408, 64, k=6, shared_experts=2"),
        MoELayer=smoe.MoELayer,
        smoe=smoe,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        llama_or_gpt2_or_bert_or_timm_vit=vit,
        task_loss=lambda out: out.square().mean(),
        batch=torch.randn(2, 3, 16, 16),
    )
    assert ns["layer"].shared is not None
    assert len(smoe.upcycle.moe_auxes(ns["model"])) == 1  # every other block of two
    assert torch.isfinite(ns["loss"]) and ns["loss"].requires_grad


def test_experts_implementation(tmp_path):
    transformers = pytest.importorskip("transformers")
    _tiny("Mixtral", num_local_experts=4, num_experts_per_tok=2).save_pretrained(tmp_path)
    ns = _run(
        _block("import smoe.integrations.transformers"),
        AutoModelForCausalLM=transformers.AutoModelForCausalLM,
        path=str(tmp_path),
    )
    assert ns["model"].config._experts_implementation == "smoe"
    assert ns["model"](torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)


def test_convert():
    pytest.importorskip("transformers")
    model = _tiny(
        "DeepseekV3", n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
        moe_intermediate_size=32, first_k_dense_replace=0, q_lora_rank=16, kv_lora_rank=16,
        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
    )  # fmt: skip
    ns = _run(
        _block("smoe.convert(model)"),
        smoe=smoe,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
    )
    blocks = [m for m in ns["model"].modules() if isinstance(m, smoe.S2MoELayer)]
    assert len(blocks) == 2  # the last line's S2MoE blocks
    assert model(torch.tensor([[1, 2, 3, 4]])).logits.shape == (1, 4, 64)


def test_vmoe_and_expert_choice_on_a_vit():
    pytest.importorskip("timm")
    ns = _run(
        _block("from smoe import ExpertChoiceRouter, MoELayer, VMoERouter"),
        F=F,
        images=torch.randn(4, 1, 28, 28),
        labels=torch.randint(0, 9, (4,)),
    )
    assert torch.isfinite(ns["loss"]) and ns["loss"].requires_grad
    assert isinstance(ns["layer"].router, smoe.VMoERouter)
    assert ns["ec"](torch.randn(2, 1, 28, 28)).shape == (2, 9)


def test_router_lab():
    model = torch.nn.Sequential(smoe.MoELayer(16, 32, 4, k=2))
    ns = _run(
        _block("from smoe import MoELayer, RoutingContext"),
        x=torch.randn(2, 8, 512),
        step=3,
        model=model,
        held_out=torch.randn(2, 8, 16),
        top1_before=torch.tensor([0, 1, 2, 3]),
        top1_after=torch.tensor([0, 1, 3, 3]),
    )
    assert ns["y"].shape == (2, 8, 512)
    assert "noisy_topk" in ns["available_routers"]()
