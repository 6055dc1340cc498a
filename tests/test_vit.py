"""V-MoE on timm's VisionTransformer (smoe.models.vit, specs/vmoe.md §5)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from smoe import ExpertChoiceRouter, VMoERouter
from smoe.data.quickdraw import load_subset
from smoe.models import (
    MoEMlp,
    moe_aux_loss,
    moe_auxes,
    moe_block_indices,
    moe_blocks,
    quickdraw_vit,
    set_batch_priority,
    set_capacity_factor,
    tokens_per_image,
    vmoe_vit,
)

pytest.importorskip("timm")


def tiny_vit(**kw):
    torch.manual_seed(0)
    return quickdraw_vit(embed_dim=32, depth=4, num_heads=2, **kw)


# ---------------------------------------------------------------------------------------------
# placement (§5)
# ---------------------------------------------------------------------------------------------
def test_block_indices_spec_examples():
    assert moe_block_indices(12, every=2) == (1, 3, 5, 7, 9, 11)
    assert moe_block_indices(8, last=2) == (5, 7)
    assert moe_block_indices(6, every=3) == (2, 5)
    assert moe_block_indices(4, every=1) == (0, 1, 2, 3)
    assert moe_block_indices(48, every=2)[-1] == 47 and len(moe_block_indices(48, every=2)) == 24


def test_block_indices_reject_bad_rules():
    with pytest.raises(ValueError, match="exactly one of every= and last="):
        moe_block_indices(8)
    with pytest.raises(ValueError, match="exactly one of every= and last="):
        moe_block_indices(8, every=2, last=2)
    with pytest.raises(ValueError, match=r"last must be in \[1, 4\]"):
        moe_block_indices(8, last=5)
    with pytest.raises(ValueError, match="every must be in"):
        moe_block_indices(8, every=0)
    with pytest.raises(TypeError, match="every must be an int"):
        moe_block_indices(8, every=2.0)


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------
def test_vmoe_vit_places_moe_blocks_and_keeps_the_rest():
    dense = tiny_vit()
    moe = vmoe_vit(dense, num_experts=4, k=2, last=1, copy_model=True)
    assert list(moe_blocks(moe)) == [3] and not moe_blocks(dense)
    layer = moe.blocks[3].mlp
    assert isinstance(layer, MoEMlp) and isinstance(layer.moe.router, VMoERouter)
    assert layer.tokens_per_image == tokens_per_image(dense) == 50
    assert layer.moe.router.group_size == 8 * 50
    # upcycled: every expert is a copy of the dense MLP it replaced
    fc1 = dense.blocks[3].mlp.fc1
    for e in range(4):
        assert torch.equal(layer.moe.experts.w_in[e], fc1.weight)
        assert torch.equal(layer.moe.experts.b_in[e], fc1.bias)
    sd = moe.state_dict()
    assert "blocks.3.mlp.moe.router.weight" in sd and "blocks.3.mlp.moe.experts.w_in" in sd
    assert "blocks.2.mlp.fc1.weight" in sd


@pytest.mark.parametrize("router", ["vmoe", "expert_choice"])
def test_upcycled_vmoe_routing_every_token_to_every_expert_equals_the_dense_vit(router):
    # k = E with no capacity (top-k) or c = E (expert choice): the combine weights are the full
    # softmax, which sums to 1 over identical experts, so the V-MoE computes the dense ViT.
    dense = tiny_vit().eval()
    kwargs = {"capacity_factor": None} if router == "vmoe" else {"capacity_factor": 4.0}
    moe = vmoe_vit(dense, 4, 4, router=router, copy_model=True, **kwargs).eval()
    x = torch.rand(10, 1, 28, 28)
    torch.testing.assert_close(moe(x), dense(x), atol=2e-5, rtol=1e-4)


def test_vmoe_vit_without_upcycling_has_fresh_experts():
    dense = tiny_vit()
    moe = vmoe_vit(dense, 4, 2, every=2, upcycle=False, copy_model=True)
    w = moe.blocks[1].mlp.moe.experts.w_in
    assert not torch.equal(w[0], w[1])
    assert w.shape == (4, dense.blocks[1].mlp.fc1.out_features, 32)


def test_vmoe_vit_expert_choice_router_defaults_to_equal_compute():
    moe = vmoe_vit(tiny_vit(), 8, 2, router="expert_choice", group_images=2)
    r = moe.blocks[1].mlp.moe.router
    assert isinstance(r, ExpertChoiceRouter) and r.capacity_factor == 2.0
    assert r.capacity(10 * 50) == 25  # ceil(100 tokens * 2 / 8)


def test_vmoe_vit_rejects_bad_input():
    dense = tiny_vit()
    with pytest.raises(TypeError, match="vit must be a timm VisionTransformer"):
        vmoe_vit(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="router must be one of"):
        vmoe_vit(dense, router="no_such_router", copy_model=True)
    with pytest.raises(ValueError, match="give at most one of every=, last=, blocks="):
        vmoe_vit(dense, every=2, blocks=[1], copy_model=True)
    with pytest.raises(ValueError, match=r"blocks must be non-empty indices in \[0, 4\)"):
        vmoe_vit(dense, blocks=[4], copy_model=True)
    with pytest.raises(ValueError, match="group_images must be >= 1"):
        vmoe_vit(dense, group_images=0, copy_model=True)
    moe = vmoe_vit(dense, every=2, copy_model=True)
    with pytest.raises(ValueError, match="block 1 already holds an MoE layer"):
        vmoe_vit(moe, blocks=[1])
    with pytest.raises(ValueError, match="dropout"):
        vmoe_vit(tiny_vit(proj_drop_rate=0.1), every=2)
    with pytest.raises(ValueError, match="x must be"):
        moe.blocks[1].mlp(torch.randn(2, 49, 32))


# ---------------------------------------------------------------------------------------------
# training-time helpers
# ---------------------------------------------------------------------------------------------
def test_aux_loss_sums_the_blocks_losses():
    moe = vmoe_vit(tiny_vit(), 4, 2, every=2).train()
    with pytest.raises(RuntimeError, match="has not run a forward yet"):
        moe_aux_loss(moe)
    moe(torch.rand(4, 1, 28, 28))
    auxes = moe_auxes(moe)
    assert list(auxes) == [1, 3]
    assert all(set(a.losses) == {"importance", "load"} for a in auxes.values())
    torch.testing.assert_close(moe_aux_loss(moe), auxes[1].loss() + auxes[3].loss())
    with pytest.raises(ValueError, match="has no MoE block"):
        moe_aux_loss(tiny_vit())


def test_capacity_and_bpr_setters():
    moe = vmoe_vit(tiny_vit(), 4, 2, every=2, capacity_factor=1.05).eval()
    set_capacity_factor(moe, 0.25)
    set_batch_priority(moe, True)
    routers = [m.moe.router for m in moe_blocks(moe).values()]
    assert all(r.eval_capacity_factor == 0.25 and r.batch_priority for r in routers)
    assert all(r.capacity_factor == 1.05 for r in routers)
    moe(torch.rand(16, 1, 28, 28))
    for aux in moe_auxes(moe).values():
        assert aux.dropped_fraction > 0.5  # C = 0.25 keeps at most ~1/4 (+ padding)
    ec = vmoe_vit(tiny_vit(), 4, router="expert_choice")
    with pytest.raises(TypeError, match="has no batch_priority"):
        set_batch_priority(ec, True)
    with pytest.raises(ValueError, match="value must be > 0"):
        set_capacity_factor(moe, 0.0)


def test_state_dict_round_trip_and_deepcopy():
    a = vmoe_vit(tiny_vit(), 4, 2, every=2, upcycle=False).eval()
    b = vmoe_vit(tiny_vit(), 4, 2, every=2, upcycle=False)
    b.eval()
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.01)
    assert not torch.equal(a(x), b(x))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))
    c = copy.deepcopy(a)  # the last forward's aux (with its graph) is not copied
    assert all(m.last_aux is None for m in moe_blocks(c).values())
    assert torch.equal(c(x), a(x))


@pytest.mark.parametrize("router", ["vmoe", "expert_choice"])
def test_short_training_on_quickdraw_lowers_the_loss(router):
    # fit one fixed batch of real drawings: the loss must fall well below chance (ln 9 = 2.2)
    torch.manual_seed(0)
    data = load_subset("train").balanced(8)
    x, y = data.images, data.labels
    model = vmoe_vit(tiny_vit(), 4, 2, every=2, router=router, group_images=4).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        (loss + moe_aux_loss(model)).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses
    router_w = model.blocks[1].mlp.moe.router.weight
    assert router_w.grad is not None and router_w.grad.abs().sum() > 0
