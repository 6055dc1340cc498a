"""smoe.upcycle.moefy: FFN -> MoE conversion of timm and transformers models (issue 26 §3)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from smoe import TopKRouter
from smoe.upcycle import MoEFFN, moe_aux_loss, moe_auxes, moefy

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
from timm.layers import GluMlp, Mlp, SwiGLU, SwiGLUPacked  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-5}
V, S = 64, 12


def tiny_llama(layers=4, family="Llama", **kw):
    cfg = getattr(transformers, f"{family}Config")(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw,
    )  # fmt: skip
    return getattr(transformers, f"{family}ForCausalLM")(cfg)


def tiny_gpt2(act="gelu"):
    cfg = transformers.GPT2Config(
        vocab_size=V, n_embd=32, n_layer=3, n_head=4, n_positions=32, activation_function=act,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def tiny_bert():
    cfg = transformers.BertConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.BertModel(cfg)


def tiny_hf_vit():
    cfg = transformers.ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4,
    )  # fmt: skip
    return transformers.ViTModel(cfg)


def tiny_timm_vit(**kw):
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3, **kw
    )


def tokens():
    return {"input_ids": torch.randint(0, V, (2, S))}


def images(size=32):
    return torch.randn(2, 3, size, size)


MODELS = {
    "llama": (tiny_llama, tokens),
    "mistral": (lambda: tiny_llama(family="Mistral"), tokens),
    "qwen2": (lambda: tiny_llama(family="Qwen2"), tokens),
    "llama_mlp_bias": (lambda: tiny_llama(mlp_bias=True), tokens),
    "gpt2": (tiny_gpt2, tokens),
    "gpt2_gelu_new": (lambda: tiny_gpt2("gelu_new"), tokens),  # tanh GELU: Experts "gelu_tanh"
    "timm_vit_gelu_tanh": (
        lambda: tiny_timm_vit(act_layer=lambda: nn.GELU(approximate="tanh")),
        images,
    ),
    "bert": (tiny_bert, tokens),
    "hf_vit": (tiny_hf_vit, lambda: {"pixel_values": images(16)}),
    "timm_vit": (tiny_timm_vit, images),
    "timm_vit_swiglu": (lambda: tiny_timm_vit(mlp_layer=SwiGLU, act_layer="silu"), images),
    "timm_vit_swiglu_packed": (
        lambda: tiny_timm_vit(mlp_layer=SwiGLUPacked, act_layer="silu"),
        images,
    ),
}


def run(model, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out if isinstance(out, torch.Tensor) else out[0]


class Holder(nn.Module):
    def __init__(self, ffn: nn.Module) -> None:
        super().__init__()
        self.mlp = ffn

    def forward(self, x):
        return self.mlp(x)


def n_moe(model):
    return sum(isinstance(m, MoEFFN) for m in model.modules())


@pytest.mark.parametrize("name", list(MODELS))
def test_moefy_upcycled_equals_dense(name):
    build, inputs = MODELS[name]
    dense = build().eval()
    moe = moefy(copy.deepcopy(dense), num_experts=4, k=2)
    assert n_moe(moe) >= 2
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(run(moe, x), run(dense, x), **TOL)


TIMM_FFNS = {
    "mlp_gelu": lambda: Mlp(16, 24),
    "mlp_relu": lambda: Mlp(16, 24, act_layer=nn.ReLU),
    "mlp_half_bias": lambda: Mlp(16, 24, bias=(True, False)),
    "glu_gate_last": lambda: GluMlp(16, 48, act_layer=nn.SiLU, gate_last=True),
    "glu_gate_first": lambda: GluMlp(16, 48, act_layer=nn.SiLU, gate_last=False),
    "swiglu": lambda: SwiGLU(16, 24),
    "swiglu_no_bias": lambda: SwiGLU(16, 24, bias=False),
}


@pytest.mark.parametrize("name", list(TIMM_FFNS))
def test_moefy_timm_ffn_equals_dense(name):
    dense = Holder(TIMM_FFNS[name]()).eval()
    for p in dense.parameters():  # GluMlp/SwiGLU init their gates near zero: make them matter
        nn.init.normal_(p, std=0.5)
    moe = moefy(copy.deepcopy(dense), num_experts=3, k=1)
    x = torch.randn(5, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), **TOL)


def test_moefy_keeps_dropout_where_it_was():
    model = moefy(Holder(Mlp(16, 24, drop=(0.1, 0.2))), num_experts=2)
    assert model.mlp.moe.experts.drop.p == 0.1 and model.mlp.drop.p == 0.2
    bert = moefy(tiny_bert(), num_experts=2)
    layer = bert.encoder.layer[0]
    assert isinstance(layer.intermediate, MoEFFN) and isinstance(layer.output.dense, nn.Identity)
    assert isinstance(layer.output.LayerNorm, nn.LayerNorm)
    assert isinstance(layer.output.dropout, nn.Dropout)


def test_moefy_gradients_reach_experts_and_routers():
    model = moefy(tiny_llama(), num_experts=4, k=2)
    out = model(**tokens(), labels=tokens()["input_ids"])
    (out.loss + moe_aux_loss(model)).backward()
    for m in model.modules():
        if isinstance(m, MoEFFN):
            for p in m.parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0
    assert len(moe_auxes(model)) == 4


@pytest.mark.parametrize(
    "layers, expected",
    [("all", [0, 1, 2, 3]), ("every_other", [1, 3]), ("last:1", [3]), ("last:3", [1, 2, 3]),
     ([0, 2], [0, 2]), ((3,), [3])],
)  # fmt: skip
def test_moefy_layers_selection(layers, expected):
    model = moefy(tiny_llama(), num_experts=2, layers=layers)
    got = [i for i, lay in enumerate(model.model.layers) if isinstance(lay.mlp, MoEFFN)]
    assert got == expected
    assert [model.model.layers[i].mlp.moe.layer_index for i in got] == expected


@pytest.mark.parametrize("layers", ["last:0", "last:5", "last:x", "odd", [4], [-1], [1, 1], 2])
def test_moefy_rejects_bad_layers(layers):
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="layers"):
        moefy(model, num_experts=2, layers=layers)
    assert n_moe(model) == 0 and model.state_dict().keys() == before.keys()


def test_moefy_rejects_an_empty_selection():
    with pytest.raises(ValueError, match="selects none"):
        moefy(tiny_llama(layers=1), num_experts=2, layers="every_other")


def test_moefy_noise_breaks_symmetry_and_follows_generator():
    dense = tiny_llama().eval()
    x = tokens()
    a, b, c = (
        moefy(copy.deepcopy(dense), num_experts=4, noise=0.1, generator=torch.Generator().manual_seed(s))  # noqa: E501
        for s in (1, 1, 2)
    )  # fmt: skip
    wa = a.model.layers[0].mlp.moe.experts.w_in
    assert not torch.equal(wa[0], wa[1])
    torch.testing.assert_close(wa, b.model.layers[0].mlp.moe.experts.w_in, rtol=0, atol=0)
    assert not torch.equal(wa, c.model.layers[0].mlp.moe.experts.w_in)
    with torch.no_grad():
        assert (run(a, x) - run(dense, x)).abs().max() > 1e-4


def test_moefy_without_upcycling_starts_fresh():
    dense = tiny_llama().eval()
    moe = moefy(copy.deepcopy(dense), num_experts=4, upcycle=False)
    w = moe.model.layers[0].mlp.moe.experts.w_out
    assert not torch.equal(w[0], dense.model.layers[0].mlp.down_proj.weight)
    with pytest.raises(ValueError, match="noise"):
        moefy(copy.deepcopy(dense), num_experts=4, upcycle=False, noise=0.1)
    with pytest.raises(ValueError, match="noise"):
        moefy(copy.deepcopy(dense), num_experts=4, noise=-1.0)


def test_moefy_router_callable_and_options():
    dense = tiny_gpt2().eval()
    moe = moefy(copy.deepcopy(dense), num_experts=4, router=lambda d: TopKRouter(d, 4, 1))
    assert isinstance(moe.transformer.h[0].mlp.moe.router, TopKRouter)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(run(moe, x), run(dense, x), **TOL)
    sw = moefy(tiny_gpt2(), num_experts=4, k=1, router="switch", router_options={"jitter": 0.1})
    assert sw.transformer.h[0].mlp.moe.router_name == "switch"


class MyMLP(nn.Module):
    def forward(self, x):
        return x


def test_moefy_refuses_what_it_cannot_reproduce():
    cases = [
        (Holder(MyMLP()), "MyMLP"),
        (nn.Sequential(nn.Linear(4, 4)), "Sequential holds no dense FFN"),
        (Holder(Mlp(16, 24, norm_layer=nn.LayerNorm)), "Mlp has a norm"),
        (Holder(Mlp(16, 24, act_layer=nn.Tanh)), "Mlp.act is Tanh"),
        (Holder(GluMlp(16, 24)), "GluMlp.act is Sigmoid"),
        (Holder(GluMlp(16, 24, act_layer=nn.GELU)), "needs SiLU"),
        (Holder(SwiGLU(16, 24, act_layer=nn.GELU)), "SwiGLU.act"),
        (tiny_llama(hidden_act="gelu"), "LlamaMLP.act_fn"),
        (Mlp(16, 24), "itself a dense FFN"),
    ]
    for model, match in cases:
        with pytest.raises(ValueError, match=match):
            moefy(model, num_experts=2)
        assert n_moe(model) == 0
    with pytest.raises(ValueError, match="not causal"):
        moefy(tiny_llama(), num_experts=2, router="expert_choice")


def test_moefy_refuses_transformers_moe_block():
    cfg = transformers.MixtralConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
    )  # fmt: skip
    with pytest.raises(ValueError, match="Mixtral"):
        moefy(transformers.MixtralForCausalLM(cfg), num_experts=2)


def test_moefy_skips_modules_already_moe():
    model = moefy(tiny_llama(), num_experts=2, layers=[0])
    moefy(model, num_experts=2, layers="all")
    assert n_moe(model) == 4
    assert model.model.layers[0].mlp.moe.layer_index == 0  # untouched
    assert model.model.layers[1].mlp.moe.layer_index == 0  # first of the remaining three


def test_moefy_state_dict_round_trip():
    dense = tiny_llama().eval()
    src = moefy(copy.deepcopy(dense), num_experts=4, noise=0.1)
    dst = moefy(copy.deepcopy(dense), num_experts=4, upcycle=False, layers="all")
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst.load_state_dict(torch.load(buf))
    assert "model.layers.0.mlp.moe.experts.w_in" in src.state_dict()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(run(dst, x), run(src, x), rtol=0, atol=0)


def test_moe_aux_loss_errors_and_copies():
    with pytest.raises(ValueError, match="no MoEFFN"):
        moe_aux_loss(tiny_llama())
    model = moefy(tiny_llama(layers=2), num_experts=2)
    with pytest.raises(RuntimeError, match="forward"):
        moe_aux_loss(model)
    run(model, tokens())
    assert moe_aux_loss(model).requires_grad
    assert n_moe(copy.deepcopy(model)) == 2  # last_aux (a graph) is dropped in copies
    assert copy.deepcopy(model).model.layers[0].mlp.last_aux is None


def test_moefy_training_lowers_the_loss():
    from smoe.data.text import random_batch, tiny_shakespeare

    corpus = tiny_shakespeare()
    vocab = int(corpus.train.max()) + 1
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = moefy(transformers.LlamaForCausalLM(cfg), num_experts=4, k=2, noise=0.01)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    xv, yv = random_batch(corpus.val, 16, 24, gen)

    def loss_of(x, y):
        return nn.functional.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())

    with torch.no_grad():
        before = loss_of(xv, yv).item()
    for _ in range(25):
        loss = loss_of(*random_batch(corpus.train, 4, 24, gen))
        opt.zero_grad()
        (loss + moe_aux_loss(model)).backward()
        opt.step()
    with torch.no_grad():
        after = loss_of(xv, yv).item()
    assert after < before - 0.5, (before, after)  # ln(vocab) ~ 4.2 -> unigram statistics ~ 3.3
