"""MomentumV-MoE / Robust MomentumV-MoE on the QuickDraw ViT (smoe.models.vit_momentum;
specs/momentum_smoe.md §5, §6 "V-MoE (pre-LN)", §11)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smoe.data.quickdraw import load_subset
from smoe.momentum import MomentumMoE, MomentumState
from smoe.ops.momentum import robust_coefficients

pytest.importorskip("timm")

from smoe.models import (  # noqa: E402
    MoEMlp,
    MomentumBlock,
    MomentumViT,
    moe_aux_loss,
    moe_auxes,
    moe_blocks,
    momentum_vit,
    momentum_vmoe_vit,
    quickdraw_vit,
    set_batch_priority,
    set_capacity_factor,
    vmoe_vit,
)
from smoe.routing import TopKRouter  # noqa: E402


def tiny_vmoe(seed: int = 0, **router_options):
    torch.manual_seed(seed)
    vit = quickdraw_vit(embed_dim=32, depth=4, num_heads=2)
    return vmoe_vit(vit, num_experts=4, k=2, every=2, upcycle=False, **router_options)


def tiny(kind: str = "robust", seed: int = 0, **options) -> MomentumViT:
    return momentum_vit(tiny_vmoe(seed, capacity_factor=1.05), kind, **options)


def images(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def run_blocks(model: MomentumViT, x: torch.Tensor):
    """The tokens and state entering each block, and the final ones."""
    h = model.embed(x)
    state = MomentumState.zeros(h, model.kind)
    seen = []
    for block in model.blocks:
        seen.append((h, state))
        h, state = block(h, state)
    return seen, (h, state)


# ---------------------------------------------------------------------------------------------
# structure
# ---------------------------------------------------------------------------------------------
def test_momentum_vit_wraps_every_block_and_keeps_the_moe_layers_in_place():
    vmoe = tiny_vmoe(capacity_factor=1.05)
    layers = moe_blocks(vmoe)
    model = momentum_vit(vmoe, "adam")
    assert all(isinstance(b, MomentumBlock) for b in model.blocks)
    assert moe_blocks(model) == layers  # the very MoEMlp objects, where vit_control reads them
    moms = model.momentum_layers()
    assert list(moms) == [1, 3] and [m.moe_index for m in moms.values()] == [0, 1]
    assert all(m.kind == "adam" for m in moms.values())
    assert model.blocks[0].momentum is None and model.blocks[2].momentum is None


def test_state_dict_holds_each_weight_once_and_round_trips():
    a, b = tiny(seed=0), tiny(seed=1)
    sd = a.state_dict()
    assert "vit.blocks.1.mlp.moe.router.weight" in sd and "vit.blocks.0.norm_out.weight" in sd
    assert not any(".momentum." in key for key in sd)  # the forwarder registers nothing
    assert len(sd) == len(dict(a.named_parameters())) + len(dict(a.named_buffers()))
    b.load_state_dict(sd)
    a.eval(), b.eval()
    x = images()
    assert torch.equal(a(x), b(x))


def test_copies_and_pickles_call_their_own_moe_layer():
    model = tiny().eval()
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        mom = twin.blocks[1].momentum
        assert mom.moe.target is twin.blocks[1].mlp and mom.moe.target is not model.blocks[1].mlp
        assert torch.equal(twin(images()), model(images()))


# ---------------------------------------------------------------------------------------------
# parity (§11)
# ---------------------------------------------------------------------------------------------
def test_dense_blocks_leave_the_state_untouched():
    model = tiny("heavy_ball").eval()
    seen, _ = run_blocks(model, images())
    for i in (0, 2):  # dense blocks
        x, state = seen[i]
        out, new = model.blocks[i](x, state)
        assert new is state
        block = model.blocks[i]
        h = x + block.attn(block.norm1(x))
        assert torch.equal(out, block.norm_out(h + block.mlp(block.norm2(h))))  # LN_extra(x + MLP)


@pytest.mark.parametrize("kind", ["robust", "heavy_ball", "adam"])
def test_two_forwards_are_bitwise_equal(kind):
    model = tiny(kind).eval()
    x = images()
    assert torch.equal(model(x), model(x))  # the state never outlives a forward
    assert not any("m" == n.split(".")[-1] for n, _ in model.named_buffers())


def test_heavy_ball_mu0_gamma1_plus_sign_is_ln_out_of_the_plain_moe_block():
    model = tiny("heavy_ball", mu=0.0, gamma=1.0, sign=1.0).eval()
    seen, _ = run_blocks(model, images())
    for i in (1, 3):
        x, state = seen[i]
        block = model.blocks[i]
        out, _ = block(x, state)
        h = x + block.attn(block.norm1(x))
        assert torch.equal(out, block.norm_out(h + block.mlp(block.norm2(h))))


def test_without_the_extra_norms_the_trivial_stack_is_the_vmoe():
    vmoe = tiny_vmoe(capacity_factor=1.05).eval()
    model = momentum_vit(vmoe, "heavy_ball", copy_model=True, mu=0.0, gamma=1.0, sign=1.0).eval()
    for block in model.blocks:
        block.norm_out = nn.Identity()
    x = images()
    assert torch.equal(model(x), vmoe(x))  # timm's stem, final norm and head are kept


def test_robust_router_input_is_the_look_ahead_point():
    model = tiny("robust").eval()
    a, _, c = robust_coefficients(0.2, 1.25)
    inputs = {}
    for i, layer in moe_blocks(model).items():
        layer.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0]))
    seen, _ = run_blocks(model, images())
    for i in (1, 3):
        x, state = seen[i]
        block = model.blocks[i]
        block(x, state)
        h = block.norm2(x + block.attn(block.norm1(x)))
        assert torch.equal(inputs[i], h + c * a * state.m)
    # zero after the first MoE block, then shifted (a token the capacity dropped in both keeps 0)
    assert not seen[1][1].m.any() and seen[3][1].m.any(-1).float().mean() > 0.5


@pytest.mark.parametrize("kind, options", [("robust", {}), ("heavy_ball", {"mu": 0.7})])
def test_gradient_reaches_the_first_moe_block_through_the_state(kind, options):
    model = tiny(kind, **options)
    h = model.embed(images())
    state = MomentumState.zeros(h, model.kind)
    kept = None
    for i, block in enumerate(model.blocks):
        h, state = block(h, state)
        if i == 1:  # the first MoE block's new state
            state.m.retain_grad()
            kept = state.m
    F.cross_entropy(model.vit.forward_head(model.vit.norm(h)), torch.arange(16) % 9).backward()
    assert kept is not None and kept.grad is not None and kept.grad.abs().sum() > 0
    assert model.blocks[1].mlp.moe.experts.w_in.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# training hooks (vit_control)
# ---------------------------------------------------------------------------------------------
def test_aux_loss_capacity_and_bpr_reach_the_moe_layers():
    model = tiny()
    model(images())
    assert set(moe_auxes(model)) == {1, 3} and torch.isfinite(moe_aux_loss(model))
    set_capacity_factor(model, 0.5)
    set_batch_priority(model, True)
    for layer in moe_blocks(model).values():
        assert layer.moe.router.eval_capacity_factor == 0.5 and layer.moe.router.batch_priority


def test_short_training_on_quickdraw_lowers_the_loss():
    data = load_subset("train")
    idx = torch.randperm(len(data.images), generator=torch.Generator().manual_seed(0))[:256]
    x, y = data.images[idx], data.labels[idx]
    model = tiny("robust")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(F.cross_entropy(model(x), y))

    before = loss()
    model.train()
    for step in range(40):
        batch = slice(64 * (step % 4), 64 * (step % 4 + 1))
        total = F.cross_entropy(model(x[batch]), y[batch]) + moe_aux_loss(model)
        opt.zero_grad()
        total.backward()
        opt.step()
        model.train()
    assert loss() < before - 0.1


# ---------------------------------------------------------------------------------------------
# entry points and errors
# ---------------------------------------------------------------------------------------------
def test_momentum_vmoe_vit_takes_the_stack_of_the_registered_router():
    torch.manual_seed(0)
    vit = quickdraw_vit(embed_dim=32, depth=4, num_heads=2)
    model = momentum_vmoe_vit(vit, 4, 2, router="robust_momentum", upcycle=False)
    assert model.kind == "robust"
    assert all(isinstance(m.moe.router, TopKRouter) for m in moe_blocks(model).values())
    torch.manual_seed(0)
    vit = quickdraw_vit(embed_dim=32, depth=4, num_heads=2)
    hb = momentum_vmoe_vit(
        vit, 4, 2, router="vmoe", stack="heavy_ball", momentum_options={"mu": 0.5}
    )
    assert hb.kind == "heavy_ball" and hb.blocks[3].momentum.mu == 0.5
    assert hb(images()).shape == (16, 9)


def test_blocks_refuse_a_forward_without_state():
    model = tiny()
    with pytest.raises(ValueError, match="state must be given"):
        model.vit(images())  # timm's own forward cannot carry the state


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"kind": "nesterov"}, ValueError, "kind must be one of"),
        ({"mu": 1.0}, ValueError, "mu must be in"),
        ({"kappa": 1.0}, ValueError, "kappa"),
        ({"gamma": -1.0}, ValueError, "gamma must be"),
        ({"sign": 2.0}, ValueError, "sign must be"),
        ({"moe_index": 1}, ValueError, "moe_index is set by momentum_vit"),
        ({"momentum": 0.9}, TypeError, "unknown option 'momentum'"),
    ],
)
def test_momentum_vit_rejects_bad_options(kwargs, error, match):
    kwargs = {"kind": "heavy_ball", **kwargs}
    with pytest.raises(error, match=match):
        momentum_vit(tiny_vmoe(), **kwargs)


def test_momentum_vit_rejects_bad_models():
    with pytest.raises(TypeError, match="model must be a timm VisionTransformer"):
        momentum_vit(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no MoE block"):
        momentum_vit(quickdraw_vit(embed_dim=32, depth=2, num_heads=2))
    vmoe = tiny_vmoe()
    model = momentum_vit(vmoe)
    with pytest.raises(ValueError, match="already a momentum stack"):
        momentum_vit(model.vit)
    with pytest.raises(ValueError, match="not a stack-level method"):
        momentum_vmoe_vit(quickdraw_vit(embed_dim=32, depth=2, num_heads=2), router="vmoe")
    assert isinstance(model.blocks[1].mlp, MoEMlp) and isinstance(
        model.blocks[1].momentum, MomentumMoE
    )
