"""ViT blocks that hand their attention probabilities to their MoE router (issue 24:
attention-aware routing, specs/graph_routing.md §2.2, §5).

timm's ``Attention`` runs the fused ``scaled_dot_product_attention`` kernel, which does not return
the probabilities. :func:`smoe.models.vmoe_vit` therefore makes every block whose MoE router
declares ``needs_attention`` (``"attention_aware"``) an :class:`AttentionMoEBlock`: it computes
its attention explicitly with timm's own non-fused operations, in timm's order (so the output is
timm's non-fused output bit for bit), and hands the pre-dropout softmax probabilities
``[B, H, N, N]`` (non-causal, every token, the class token included) to its :class:`MoEMlp`,
which routes with ``RoutingContext(batch_shape=(B, N), attention=probs, causal=False)``. The other
blocks keep timm's block and its fused attention.

The block takes over timm's pieces under their own names and adds no parameter or buffer, so the
state-dict keys are those of the V-MoE built before this existed.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from smoe.routing.registry import registered_info

__all__ = ["AttentionMoEBlock", "check_explicit_attention", "explicit_attention", "needs_attention"]

_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


def needs_attention(mlp: nn.Module) -> bool:
    """Whether ``mlp`` is an MoE block (``mlp.moe.router``) whose registered router reads the
    block's attention probabilities."""
    router = getattr(getattr(mlp, "moe", None), "router", None)
    info = registered_info(router) if isinstance(router, nn.Module) else None
    return info is not None and info.needs_attention


def check_explicit_attention(attn: nn.Module, who: str) -> None:
    """Raise ValueError unless ``attn`` is timm's plain ``Attention`` (whose non-fused path
    :func:`explicit_attention` reproduces); subclasses and other attention layers compute
    something else."""
    from timm.models.vision_transformer import Attention

    if type(attn) is not Attention:
        raise ValueError(
            f"{who}: attention-aware routing needs the block's attention to be timm's Attention "
            f"(its probabilities are recomputed explicitly), got {type(attn).__name__}"
        )


def explicit_attention(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """timm ``Attention.forward(x)`` without a mask, computed explicitly.

    Args:
        attn: timm's ``Attention``.
        x: ``[B, N, C]``, the block's normalised tokens.

    Returns:
        ``(out [B, N, C_out], probs [B, H, N, N])``: out is timm's non-fused output (the same
        operations in the same order); probs the softmax probabilities before attention dropout,
        in x's dtype, with their autograd graph (gradient flows into Q and K through them).
    """
    B, N, _ = x.shape
    gate = getattr(attn, "gate", None)
    g = gate(x).sigmoid() if gate is not None else None
    H, Dh = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    y = attn.attn_drop(probs) @ v
    y = attn.norm(y.transpose(1, 2).reshape(B, N, getattr(attn, "attn_dim", H * Dh)))
    if g is not None:
        y = y * g
    return attn.proj_drop(attn.proj(y)), probs


class AttentionMoEBlock(nn.Module):
    """timm's pre-LN ViT ``Block`` whose MoE layer gets the block's attention probabilities.

    ``x <- x + drop_path1(ls1(Attn(norm1(x))))``; ``x <- x + drop_path2(ls2(mlp(norm2(x),
    attention=P)))`` with P the attention's pre-dropout probabilities ``[B, H, N, N]``
    (:func:`explicit_attention`). While ``mlp``'s router does not need them (a router swapped
    later), the block is timm's, fused attention included.

    Args:
        block: timm's ``Block`` with an :class:`smoe.models.MoEMlp` as ``mlp``; its ``norm1,
            attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2`` are taken over (same
            state-dict keys).

    ``forward(x [B, N, d])`` -> ``[B, N, d]``. Attention masks and ``is_causal`` are refused.
    """

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        check_explicit_attention(block.attn, "AttentionMoEBlock")
        for name in _PARTS:
            setattr(self, name, getattr(block, name))

    def forward(self, x: Tensor, attn_mask: Any = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError(
                "AttentionMoEBlock: attn_mask and is_causal are not supported (the routing "
                "graph is the block's full, non-causal attention)"
            )
        h = self.norm1(x)
        if needs_attention(self.mlp):
            a, probs = explicit_attention(self.attn, h)
            x = x + self.drop_path1(self.ls1(a))
            y = self.mlp(self.norm2(x), attention=probs)
        else:
            x = x + self.drop_path1(self.ls1(self.attn(h)))
            y = self.mlp(self.norm2(x))
        return x + self.drop_path2(self.ls2(y))
