"""The stack-level momentum methods across converted transformers blocks:
``smoe.convert(model, momentum="heavy_ball"|"adam"|"robust")`` (issue 23, specs/momentum_smoe.md).

Each converted block's output u (routed + shared experts) goes through
:class:`smoe.momentum.MomentumMoE`'s step; one state per model forward is handed from block to
block in model order by a carrier that a forward pre-hook on the model resets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from smoe.momentum import MomentumMoE
from smoe.ops.momentum import KINDS

if TYPE_CHECKING:
    from smoe.integrations.convert import ConvertedMoE

__all__ = ["add_momentum", "momentum_options_checked"]


class _BlockAsMoE(nn.Module):
    """A converted block's routed + shared output as MomentumMoE's ``moe(h, context) -> (u,
    aux)`` (aux: GPT-OSS's router scores, else None). The block is held unregistered, so the
    momentum wrapper never enters the model's module tree or state_dict."""

    def __init__(self, block: ConvertedMoE) -> None:
        super().__init__()
        self.__dict__["block"] = block

    def forward(self, h: Tensor, context=None):
        out = self.block._moe_forward(h)
        return out if isinstance(out, tuple) else (out, None)


class _MomentumCarrier:
    """The one momentum state of a model forward, handed from converted block to block; the
    model's forward pre-hook resets it, so nothing carries over between forwards."""

    def __init__(self) -> None:
        self.state, self.handle = None, None

    def reset(self, *args) -> None:
        self.state = None


def momentum_options_checked(kind: str, options: dict) -> dict:
    """MomentumMoE's options with this module's default sign, checked before any block is
    converted (a bad option leaves the model as it was)."""
    if kind not in KINDS:
        raise ValueError(f"smoe.convert: momentum must be None or one of {KINDS}, got {kind!r}")
    options = {"sign": 1.0, **options}
    MomentumMoE(nn.Identity(), kind=kind, **options)  # raises on a bad option, naming it
    return options


def add_momentum(model: nn.Module, blocks: list, kind: str, options: dict) -> None:
    carrier = _MomentumCarrier()
    carrier.handle = model.register_forward_pre_hook(carrier.reset)
    for index, block in enumerate(blocks):
        wrapper = MomentumMoE(_BlockAsMoE(block), kind=kind, moe_index=index, **options)
        block.__dict__["_momentum"], block.__dict__["_carrier"] = wrapper, carrier
