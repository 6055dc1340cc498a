"""Graph-of-tokens routing in the V-MoE ViT (issue 24, specs/graph_routing.md §2.2, §5): the
blocks of an attention-aware router hand their explicit attention probabilities to it
(smoe.models.vit_attention); similarity-aware routes per image."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from smoe.data.quickdraw import load_subset
from smoe.models import moe_aux_loss, moe_blocks, momentum_vmoe_vit, quickdraw_vit, vmoe_vit
from smoe.models.vit_attention import AttentionMoEBlock, explicit_attention

pytest.importorskip("timm")
from timm.models.vision_transformer import Attention, Block  # noqa: E402

E, K = 4, 2


def tiny_vit(**kw):
    torch.manual_seed(0)
    return quickdraw_vit(embed_dim=32, depth=4, num_heads=2, **kw)


def graph_vit(router="attention_aware", **kw):
    return vmoe_vit(tiny_vit(), E, K, every=2, router=router, upcycle=False, **kw)


def images(n=4, seed=1):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def spy(model):
    """Per MoE block: the router's last context and routing, recorded by hooks."""
    seen = {}
    for i, layer in moe_blocks(model).items():
        router = layer.moe.router

        def pre(mod, args, kwargs, i=i):
            seen.setdefault(i, {})["context"] = kwargs.get("context")

        def post(mod, args, kwargs, out, i=i):
            seen[i]["routing"] = out

        router.register_forward_pre_hook(pre, with_kwargs=True)
        router.register_forward_hook(post, with_kwargs=True)
    return seen


# ---------------------------------------------------------------------------------------------
# the explicit attention
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qk_norm", [False, True])
def test_explicit_attention_equals_timms_attention(qk_norm):
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qkv_bias=True, qk_norm=qk_norm, norm_layer=torch.nn.LayerNorm)
    x = torch.randn(3, 50, 32)
    out, probs = explicit_attention(attn, x)
    attn.fused_attn = False
    assert torch.equal(out, attn(x))  # timm's non-fused path, bit for bit
    attn.fused_attn = True
    torch.testing.assert_close(out, attn(x), rtol=1e-5, atol=1e-6)  # the fused kernel
    assert probs.shape == (3, 4, 50, 50)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 4, 50))


def test_the_router_gets_the_blocks_probabilities_as_a_float64_recomputation_says():
    model = graph_vit().eval()
    assert [type(b) for b in model.blocks] == [Block, AttentionMoEBlock] * 2
    seen = spy(model)
    inputs = {}
    for i in moe_blocks(model):
        model.blocks[i].norm1.register_forward_pre_hook(
            lambda m, a, i=i: inputs.__setitem__(i, a[0].detach())
        )
    x = images()
    with torch.no_grad():
        model(x)
    for i in moe_blocks(model):
        ctx = seen[i]["context"]
        assert ctx.batch_shape == (4, 50) and ctx.causal is False
        attn = copy.deepcopy(model.blocks[i].attn).double()
        norm1 = copy.deepcopy(model.blocks[i].norm1).double()
        h = norm1(inputs[i].double())
        B, N, _ = h.shape
        q, k, _ = attn.qkv(h).reshape(B, N, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
        want = torch.softmax(q @ k.transpose(-2, -1) / 16**0.5, dim=-1)
        assert ctx.attention.shape == (B, 2, N, N)  # all tokens, the class token included
        torch.testing.assert_close(ctx.attention.double(), want, rtol=1e-5, atol=1e-6)


def test_attention_aware_vit_forward_and_backward():
    model = graph_vit().train()
    y = model(images())
    loss = F.cross_entropy(y, torch.tensor([0, 1, 2, 3])) + moe_aux_loss(model)
    loss.backward()
    for i, layer in moe_blocks(model).items():
        w = layer.moe.router.weight.grad
        assert w is not None and w.abs().sum() > 0
        qkv = model.blocks[i].attn.qkv.weight.grad
        assert qkv is not None and torch.isfinite(qkv).all()


def test_routing_gradient_reaches_q_and_k_unless_the_graph_is_detached():
    grads = {}
    for detach in (False, True):
        model = graph_vit(detach_graph=detach).train()
        model(images())
        moe_aux_loss(model).backward()  # the balance loss reads A through the mixed logits
        grads[detach] = model.blocks[1].attn.qkv.weight.grad[:64].clone()  # q and k rows
    assert torch.isfinite(grads[False]).all() and not torch.allclose(grads[False], grads[True])


def test_blocks_of_other_routers_keep_timms_fused_attention(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("explicit attention computed")

    monkeypatch.setattr("smoe.models.vit_attention.explicit_attention", boom)
    for router in ("vmoe", "topk", "similarity_aware"):
        model = graph_vit(router)
        assert all(type(b) is Block for b in model.blocks)
        assert all(b.attn.fused_attn == Block(32, 2).attn.fused_attn for b in model.blocks)
        seen = spy(model)
        model(images())
        assert all(s["context"] is None or s["context"].attention is None for s in seen.values())


def test_a_block_whose_router_is_swapped_runs_timms_block(monkeypatch):
    model = graph_vit().eval()
    ref = vmoe_vit(tiny_vit(), E, K, every=2, router="topk", upcycle=False).eval()
    for i, layer in moe_blocks(model).items():
        layer.moe.router = copy.deepcopy(moe_blocks(ref)[i].moe.router)
    ref.load_state_dict(model.state_dict())
    monkeypatch.setattr(
        "smoe.models.vit_attention.explicit_attention", lambda *a: pytest.fail("explicit")
    )
    x = images()
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


# ---------------------------------------------------------------------------------------------
# per image
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("router", ["similarity_aware", "attention_aware"])
def test_an_images_routing_ignores_the_other_images_of_the_batch(router):
    model = graph_vit(router).eval()
    seen = spy(model)
    x = images(4)

    def run(batch):
        with torch.no_grad():
            logits = model(batch)
        return logits, {
            i: (
                s["routing"].expert.view(len(batch), 50, K),
                s["routing"].weight.view(len(batch), -1),
            )
            for i, s in seen.items()
        }

    logits, routing = run(x)
    assert all(s["context"].batch_shape == (4, 50) for s in seen.values())
    y = x.clone()
    y[2] = torch.rand(1, 28, 28)  # another drawing in slot 2
    logits2, routing2 = run(y)
    keep = [0, 1, 3]
    for i in routing:
        (e1, w1), (e2, w2) = routing[i], routing2[i]
        assert torch.equal(e1[keep], e2[keep])
        # the kept images' gate values to the last bit only up to the expert GEMMs' rounding in
        # the blocks before (a token's expert output can move by an ulp with its expert's row
        # count, which slot 2's tokens change)
        torch.testing.assert_close(w1[keep], w2[keep], rtol=1e-6, atol=1e-7)
        # slot 2's own routing saw the new drawing (its gate values: a fresh init can send all of
        # an image's tokens to the same experts, whatever the drawing)
        assert (w1[2] - w2[2]).abs().max() > 1e-3
    torch.testing.assert_close(logits[keep], logits2[keep])
    perm = torch.tensor([3, 0, 2, 1])  # permuting the batch permutes the routing
    logits3, routing3 = run(x[perm])
    for i in routing:
        assert torch.equal(routing3[i][0], routing[i][0][perm])
        torch.testing.assert_close(routing3[i][1], routing[i][1][perm], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logits3, logits[perm])


# ---------------------------------------------------------------------------------------------
# training, state, copies, the momentum stack, errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("router", ["attention_aware", "similarity_aware"])
def test_short_training_on_quickdraw_lowers_the_loss(router):
    torch.manual_seed(0)
    data = load_subset("train").balanced(4)  # 36 drawings, fitted as one batch
    x, y = data.images, data.labels
    model = graph_vit(router).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        (loss + moe_aux_loss(model)).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


def test_state_dict_keys_round_trip_copies_and_pickles():
    a = graph_vit().eval()
    keys = set(graph_vit("similarity_aware").state_dict())  # timm blocks, the same router params
    assert set(a.state_dict()) == keys
    assert sum(p.numel() for p in a.parameters()) == sum(
        p.numel() for p in graph_vit("similarity_aware").parameters()
    )
    b = graph_vit()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.01)
    b.eval()
    x = images()
    assert not torch.equal(a(x), b(x))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))
    for twin in (copy.deepcopy(a), pickle.loads(pickle.dumps(a))):
        assert all(m.last_aux is None for m in moe_blocks(twin).values())
        assert torch.equal(twin(x), a(x))


def test_momentum_stack_hands_the_probabilities_on():
    model = momentum_vmoe_vit(
        tiny_vit(), E, K, router="attention_aware", stack="robust", upcycle=False
    )
    seen = spy(model)
    out = model(images())
    out.sum().backward()
    for i, s in seen.items():
        assert s["context"].attention.shape == (4, 2, 50, 50)
        assert model.blocks[i].mlp.moe.router.weight.grad is not None


def test_errors_name_the_problem():
    model = graph_vit()
    with pytest.raises(ValueError, match="attn_mask and is_causal"):
        model.blocks[1](torch.randn(2, 50, 32), is_causal=True)

    class MyAttention(Attention):
        pass

    vit = tiny_vit()
    vit.blocks[1].attn = MyAttention(32, 2)
    with pytest.raises(ValueError, match="block 1.*timm's Attention.*MyAttention"):
        vmoe_vit(vit, E, K, every=2, router="attention_aware")
    assert type(vit.blocks[1]) is Block and type(vit.blocks[1].mlp).__name__ == "Mlp"
