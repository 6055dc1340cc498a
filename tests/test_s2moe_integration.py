"""S2MoE as a layer-level method of the library (issue 27): its registry entry, the model
factory, the char-LM, the V-MoE ViT, the claims study and its inference-FLOPs table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from smoe import MoELayer, S2MoELayer
from smoe.models import layer_kind, moe_layer
from smoe.models.charlm import CharLM
from smoe.routing import TopKRouter, register_router, router_info

ROOT = Path(__file__).resolve().parents[1]


def test_the_registry_entry_names_the_layer_and_a_top_k_gate():
    info = router_info("s2moe")
    assert info.layer == "s2moe" and info.stack is None and info.factory is TopKRouter
    assert info.selection == "token_choice" and info.is_causal()
    assert layer_kind("s2moe") == "s2moe" and layer_kind("topk") is None
    assert layer_kind(TopKRouter(8, 4, 1)) is None  # a module is never a layer-level method


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layer": "dropout"}, "layer must be None or one of"),
        ({"layer": "s2moe", "stack": "adam"}, "not both"),
    ],
)
def test_register_router_refuses_a_bad_layer(kwargs, match):
    with pytest.raises(ValueError, match=match):
        register_router("s2moe_test", TopKRouter, description="x", **kwargs)


def test_moe_layer_builds_the_layer_the_entry_names():
    torch.manual_seed(0)
    plain = moe_layer(8, 16, 4, 2, router="topk")
    s2 = moe_layer(8, 16, 4, 1, router="s2moe", layer_options={"noise_form": "instnorm"})
    assert type(plain) is MoELayer and isinstance(s2, S2MoELayer)
    assert s2.noise_form == "instnorm" and s2.router.k == 1 and isinstance(s2.router, TopKRouter)
    assert hasattr(s2, "s2moe_norm")


def test_moe_layer_refuses_layer_options_for_a_plain_router():
    with pytest.raises(ValueError, match="layer_options .*'topk'"):
        moe_layer(8, 16, 4, 2, router="topk", layer_options={"noise_form": "dsu"})


def test_a_bad_layer_option_names_itself():
    with pytest.raises(ValueError, match="noise_form"):
        moe_layer(8, 16, 4, 1, router="s2moe", layer_options={"noise_form": "uniform"})


def test_charlm_builds_s2moe_layers_and_evaluates_as_its_smoe():
    torch.manual_seed(0)
    model = CharLM(
        20,
        d_model=16,
        n_layers=2,
        n_heads=2,
        context=8,
        num_experts=4,
        k=1,
        router="s2moe",
        layer_options={"unc_pair": "outputs"},
    )
    layers = model.moe_layers()
    assert len(layers) == 2 and all(isinstance(m, S2MoELayer) for m in layers)
    assert all(m.unc_pair == "outputs" for m in layers)
    idx = torch.randint(0, 20, (3, 8))
    model.train()
    _, auxes = model(idx)
    assert all("s2moe_unc" in a.losses for a in auxes)
    model.eval()  # eval: no noise, the clean SMoE; RNG untouched
    state = torch.get_rng_state()
    logits, auxes = model(idx)
    assert torch.equal(torch.get_rng_state(), state)
    assert all("s2moe_unc" not in a.losses for a in auxes)
    assert torch.isfinite(logits).all()


def test_charlm_refuses_layer_options_for_a_plain_router():
    with pytest.raises(ValueError, match="layer_options apply to a layer-level router"):
        CharLM(
            20,
            d_model=16,
            n_layers=1,
            n_heads=2,
            context=8,
            num_experts=4,
            router="topk",
            layer_options={"noise_form": "dsu"},
        )


def test_charlm_cli_passes_layer_options(tmp_path):
    from smoe.examples.charlm import main

    (r,) = main(
        [
            "--quick",
            "--router",
            "s2moe",
            "-k",
            "1",
            "--steps",
            "4",
            "--eval-every",
            "2",
            "--layer-option",
            "route_noisy=shared",
            "--out",
            str(tmp_path),
            "--no-figures",
        ]
    )
    assert r["config"]["layer_options"] == {"route_noisy": "shared"}
    assert r["config"]["router"] == "s2moe" and r["config"]["k"] == 1


def test_s2moe_vit_wraps_every_moe_block_and_keeps_eval_outputs():
    pytest.importorskip("timm")
    from smoe.models import quickdraw_vit, s2moe_vit, vmoe_vit
    from smoe.models.vit import MoEMlp

    torch.manual_seed(0)
    vit = vmoe_vit(
        quickdraw_vit(embed_dim=32, depth=4, num_heads=2),
        4,
        2,
        every=2,
        upcycle=False,
        router="topk",
    ).eval()
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    before = vit(x)
    keys = set(vit.state_dict())
    s2 = s2moe_vit(vit, copy_model=True, route_noisy="shared")
    mlps = [b.mlp for b in s2.blocks if isinstance(b.mlp, MoEMlp)]
    assert len(mlps) == 2 and all(isinstance(m.moe, S2MoELayer) for m in mlps)
    assert all(m.moe.route_noisy == "shared" for m in mlps)
    assert keys < set(s2.state_dict())  # the old keys kept, the gates added beside them
    assert torch.equal(s2.eval()(x), before)  # eval_output="clean": the same model in eval
    s2.train()
    s2(x).sum().backward()  # the noisy path runs over [B, N, d] image tokens
    assert all(m.moe.s2moe_gate.weight.grad is not None for m in mlps)
    with pytest.raises(ValueError, match="already has S2MoE layers"):
        s2moe_vit(s2)
    with pytest.raises(ValueError, match="no MoEMlp block"):
        s2moe_vit(quickdraw_vit(embed_dim=32, depth=2, num_heads=2))


def test_charlm_inference_flops_by_hand():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from claims_report import charlm_inference_flops

    cfg = {"d_model": 8, "n_layers": 2, "k": 1, "d_ff": 16, "num_experts": 4, "context": 10}
    attn = 8 * 64 + 4 * 8 * 5
    moe1 = 2 * 8 * 4 + 1 * 2 * 2 * 8 * 16
    total, moe = charlm_inference_flops(cfg)
    assert moe == 2 * moe1 and total == 2 * attn + 2 * moe1 + 2 * 8 * 65
    total2, moe2 = charlm_inference_flops({**cfg, "k": 2})
    assert moe2 - moe == 2 * 2 * 2 * 8 * 16  # one more expert per token in each of 2 layers
    dense = charlm_inference_flops({**cfg, "moe_every": 2})
    assert dense[1] == moe1 and dense[0] == 2 * attn + moe1 + 16 * 64 + 2 * 8 * 65
