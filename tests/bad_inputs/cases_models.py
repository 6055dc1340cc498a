"""Bad inputs of smoe.models' public constructors (the cheap ones: tiny sizes)."""

from __future__ import annotations

from typing import Any

import torch

import smoe
import smoe.models
from tests.bad_inputs.cases import Case, Expect, arg, error


def _case(target: str, label: str, kind: str, fn, expect: Expect) -> Case:
    return Case(f"{target}/{label}", target, kind, fn, expect)


# ---- smoe.models' public constructors (the cheap ones) ---------------------------------------
def _vit(d, **kw: Any):
    from smoe.models import quickdraw_vit, vmoe_vit

    return vmoe_vit(quickdraw_vit(depth=2, embed_dim=16, num_heads=2), num_experts=2, **kw)


def _charlm(**kw: Any):
    def fn(d):
        from smoe.models.charlm import CharLM

        config = dict(d_model=16, n_layers=1, n_heads=2, context=8, num_experts=2, k=1)
        return CharLM(11, **{**config, **kw})

    return fn


def _xl(span: int = 4, pe_span: int = 4):
    def fn(d):
        att = smoe.models.XLAttention(8, 2, 4).to(d.device)
        x = torch.randn(2, 3, 8, device=d.device)
        return att(
            x, torch.zeros(2, span, 8, device=d.device), torch.zeros(1, 4, pe_span, device=d.device)
        )

    return fn


CASES: list[Case] = [
    _case(
        "SMoEVAE",
        "routing unknown",
        "config",
        lambda d: smoe.SMoEVAE(routing="bogus"),
        error(arg("routing"), ValueError),
    ),
    _case(
        "SMoEVAE",
        "reduction unknown",
        "config",
        lambda d: smoe.SMoEVAE(reduction="bogus"),
        error(arg("reduction"), ValueError),
    ),
    _case(
        "SMoEVAE",
        "num_experts = 0",
        "config",
        lambda d: smoe.SMoEVAE(num_experts=0),
        error(arg("num_experts"), ValueError),
    ),
    _case(
        "SMoEVAE",
        "oracle_eval without supervision",
        "config",
        lambda d: smoe.SMoEVAE(oracle_eval=True),
        error(arg("oracle_eval"), ValueError),
    ),
    _case(
        "CharLM", "router unknown", "config", _charlm(router="bogus"), error("bogus", ValueError)
    ),
    _case(
        "CharLM",
        "moe_every = 0",
        "config",
        _charlm(moe_every=0),
        error(arg("moe_every"), ValueError),
    ),
    _case("CharLM", "k = 0", "config", _charlm(k=0), error(arg("k"), ValueError)),
    _case(
        "CharLM",
        "router_options unknown",
        "config",
        _charlm(router_options={"bogus_option": 1}),
        error("bogus_option", ValueError),
    ),
    _case(
        "CharLM",
        "layout unknown",
        "config",
        _charlm(layout="bogus"),
        error(arg("layout"), ValueError),
    ),
    _case(
        "CharLM",
        "momentum_options without a stack router",
        "config",
        _charlm(momentum_options={"mu": 0.5}),
        error(arg("momentum_options"), ValueError),
    ),
    *(
        _case(
            "CharLM",
            f"{router} {name} = {value}",
            "config",
            _charlm(router=router, momentum_options={name: value}),
            error(arg(name), ValueError),
        )
        for router, name, value in [
            ("momentum", "mu", 1.0),
            ("momentum", "gamma", -1.0),
            ("momentum", "sign", 0.5),
            ("adam", "adam_layers", -1),
            ("adam", "beta2", 1.0),
            ("robust_momentum", "kappa", 1.0),
            ("robust_momentum", "dropout", 1.0),
        ]
    ),
    _case(
        "CharLM",
        "attention unknown",
        "config",
        _charlm(attention="local"),
        error(arg("attention"), ValueError),
    ),
    _case(
        "CharLM",
        "attn_span without xl",
        "config",
        _charlm(attn_span=4),
        error(arg("attn_span"), ValueError),
    ),
    _case(
        "CharLM",
        "attn_span = 0",
        "config",
        _charlm(attention="xl", attn_span=0),
        error(arg("attn_span"), ValueError),
    ),
    _case(
        "XLAttention",
        "attn_span = 0",
        "config",
        lambda d: smoe.models.XLAttention(8, 2, 0),
        error(arg("attn_span"), ValueError),
    ),
    *(
        _case("XLAttention", label, "size", _xl(**change), error(arg(name), ValueError))
        for label, name, change in [
            ("h_cache too short", "h_cache", {"span": 3}),
            ("key_pe of another span", "key_pe", {"pe_span": 5}),
        ]
    ),
    _case(
        "MomentumMoE",
        "kind unknown",
        "config",
        lambda d: smoe.MomentumMoE(torch.nn.Identity(), kind="nesterov"),
        error(arg("kind"), ValueError),
    ),
    _case(
        "MomentumMoE",
        "moe not a module",
        "config",
        lambda d: smoe.MomentumMoE(lambda x: x),
        error(arg("moe"), TypeError),
    ),
    _case(
        "vmoe_vit",
        "router unknown",
        "config",
        lambda d: _vit(d, router="bogus"),
        error(arg("router"), ValueError),
    ),
    _case(
        "vmoe_vit",
        "every and last both",
        "config",
        lambda d: _vit(d, every=1, last=1),
        error(arg("every"), ValueError),
    ),
    _case(
        "vmoe_vit",
        "blocks out of range",
        "config",
        lambda d: _vit(d, blocks=[5]),
        error(arg("blocks"), ValueError),
    ),
    _case(
        "vmoe_vit",
        "group_images = 0",
        "config",
        lambda d: _vit(d, group_images=0),
        error(arg("group_images"), ValueError),
    ),
    _case(
        "vmoe_vit",
        "vit not a ViT",
        "config",
        lambda d: __import__("smoe.models", fromlist=["vmoe_vit"]).vmoe_vit(torch.nn.Linear(2, 2)),
        error(arg("vit"), TypeError),
    ),
]
