"""MomentumV-MoE and Robust MomentumV-MoE: a V-MoE ViT run as a momentum stack (issue 23).

Spec: specs/momentum_smoe.md §2 (state), §5 (Robust Momentum), §6 "V-MoE (pre-LN)" (the
reference ``rachtsy/vmoe`` layout). :func:`momentum_vit` turns a V-MoE from
:func:`smoe.models.vmoe_vit` into a :class:`MomentumViT`; every block becomes a
:class:`MomentumBlock`:

- MoE block: ``x <- x + Attn(LN1(x))``; ``(delta, state) <- MomentumMoE(LN2(x), state)``;
  ``x <- LN_out(x + delta)``. The robust kind evaluates the router and experts at the look-ahead
  point ``LN2(x) + c·a·m`` (inside :class:`smoe.momentum.MomentumMoE`);
- dense block: ``x <- LN_out(x + MLP(LN2(x)))`` (the extra LayerNorm the reference adds when
  momentum is on); the state passes unchanged.

The state (:class:`smoe.momentum.MomentumState`) is zeros right after the patch and position
embeddings at every forward and is threaded through the blocks; it is never a parameter or a
buffer, and gradients flow through it. timm's pieces are kept: ``patch_embed``, ``_pos_embed``,
``patch_drop``, ``norm_pre``, ``norm``, ``forward_head`` and every block's LayerScale and
DropPath (``ls2``/``drop_path2`` act on delta where they acted on the MLP output).

Each MoE block keeps its :class:`smoe.models.MoEMlp` as ``block.mlp``, so that
:func:`smoe.models.moe_aux_loss`, :func:`smoe.models.set_capacity_factor` and
:func:`smoe.models.set_batch_priority` work on a :class:`MomentumViT` as on the V-MoE (it exposes
``blocks``). The :class:`MomentumMoE` of the block calls that same layer through a forwarder that
does not register it a second time, so the state-dict keys are the V-MoE's (under ``vit.``) plus
``blocks.{i}.norm_out.*``.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from smoe.layer import MoEAux
from smoe.models.vit import MoEMlp, vmoe_vit
from smoe.models.vit_attention import explicit_attention, needs_attention
from smoe.models.vit_control import moe_blocks
from smoe.momentum import MomentumMoE, MomentumState
from smoe.ops.momentum import KINDS
from smoe.routing.context import RoutingContext
from smoe.routing.registry import router_info

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

__all__ = ["MomentumBlock", "MomentumViT", "momentum_vit", "momentum_vmoe_vit"]

# the MomentumMoE options a user may set (kind and moe_index are set per block here)
_OPTIONS = tuple(
    n for n in inspect.signature(MomentumMoE.__init__).parameters if n not in ("self", "moe")
)


class _MoEMlpCall(nn.Module):
    """``(x, context) -> (y, aux)`` over a block's :class:`MoEMlp`, for :class:`MomentumMoE`.

    The MoEMlp stays registered as the block's ``mlp`` only (not here), so that the state dict
    holds it once and :mod:`smoe.models.vit_control` finds it where a V-MoE has it. The context is
    not passed on, but for its attention probabilities (attention-aware routing): a ViT MoE layer
    routes in groups of whole images by its router's ``group_size`` (specs/vmoe.md §2), as
    :class:`MoEMlp` always does.
    """

    def __init__(self, mlp: MoEMlp) -> None:
        super().__init__()
        object.__setattr__(self, "target", mlp)  # not a submodule: the block owns it

    def extra_repr(self) -> str:
        return "calls the block's mlp"

    def forward(self, x: Tensor, context: RoutingContext | None = None) -> tuple[Tensor, MoEAux]:
        y = self.target(x, attention=None if context is None else context.attention)
        assert self.target.last_aux is not None
        return y, self.target.last_aux


def _norm_like(norm: nn.Module) -> nn.Module:
    """A fresh copy of ``norm`` (same class, shape, eps), reset to the identity affine map."""
    out = copy.deepcopy(norm)
    if hasattr(out, "reset_parameters"):
        out.reset_parameters()
    return out


class MomentumBlock(nn.Module):
    """A timm ViT ``Block`` of a momentum stack (specs/momentum_smoe.md §6, V-MoE pre-LN).

    Args:
        block: the timm block; its ``norm1, attn, ls1, drop_path1, norm2, mlp, ls2,
            drop_path2`` are taken over (same state-dict keys).
        momentum: the :class:`MomentumMoE` over ``block.mlp`` for an MoE block, None for a dense
            one.

    ``forward(x [B, N, d], state)`` returns ``(x, state)``: the MoE block returns the new state,
    a dense block the very ``state`` it got. An MoE block whose router needs the attention
    probabilities (attention-aware) computes its attention explicitly
    (:func:`smoe.models.vit_attention.explicit_attention`) and hands them on.
    """

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict

    def __init__(self, block: nn.Module, momentum: MomentumMoE | None = None) -> None:
        super().__init__()
        for name in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"):
            setattr(self, name, getattr(block, name))
        self.norm_out = _norm_like(block.norm2)
        self.momentum = momentum

    def reset_parameters(self) -> None:
        """Resets the extra LayerNorm only (the other pieces are timm's and the V-MoE's)."""
        if hasattr(self.norm_out, "reset_parameters"):
            self.norm_out.reset_parameters()

    def extra_repr(self) -> str:
        return f"moe={self.momentum is not None}"

    def forward(self, x: Tensor, state: MomentumState | None = None) -> tuple[Tensor, Any]:
        if state is None:
            raise ValueError(
                "MomentumBlock: state must be given (run the model through MomentumViT, which "
                "creates the momentum state after the embeddings)"
            )
        if self.momentum is not None and needs_attention(self.mlp):  # attention-aware routing
            a, probs = explicit_attention(self.attn, self.norm1(x))
            context = RoutingContext(attention=probs)
        else:
            a, context = self.attn(self.norm1(x)), None
        x = x + self.drop_path1(self.ls1(a))
        h = self.norm2(x)
        if self.momentum is None:
            y = self.mlp(h)
        else:
            y, state, _ = self.momentum(h, state, context)
        return self.norm_out(x + self.drop_path2(self.ls2(y))), state


class MomentumViT(nn.Module):
    """A V-MoE ViT whose MoE blocks form a momentum stack; build it with :func:`momentum_vit`.

    Attributes:
        vit: the timm ``VisionTransformer`` (its ``blocks`` are :class:`MomentumBlock`\\ s).
        kind: the stack kind, ``"heavy_ball"``, ``"adam"`` or ``"robust"``.

    ``blocks`` is ``vit.blocks``, so :mod:`smoe.models.vit_control` reads the MoE blocks as on
    a V-MoE. ``forward(images)`` returns the logits; ``forward_features`` the final tokens.
    Attention masks and timm's gradient checkpointing are not supported.
    """

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict

    def __init__(self, vit: VisionTransformer, kind: str) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"MomentumViT: kind must be one of {KINDS}, got {kind!r}")
        if not all(isinstance(b, MomentumBlock) for b in vit.blocks):
            raise ValueError("MomentumViT: vit.blocks must be MomentumBlocks (use momentum_vit)")
        self.vit, self.kind = vit, kind

    @property
    def blocks(self) -> nn.Sequential:
        return self.vit.blocks

    def momentum_layers(self) -> dict[int, MomentumMoE]:
        """The :class:`MomentumMoE` of every MoE block, by block index."""
        return {i: b.momentum for i, b in enumerate(self.blocks) if b.momentum is not None}

    def reset_parameters(self) -> None:
        for b in self.blocks:
            b.reset_parameters()

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, moe_blocks={tuple(self.momentum_layers())}"

    def embed(self, images: Tensor) -> Tensor:
        """timm's stem: patch embedding, position embedding (and class token), norm_pre."""
        vit = self.vit
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))

    def forward_features(self, images: Tensor) -> Tensor:
        x = self.embed(images)
        state = MomentumState.zeros(x, self.kind)  # fresh at every forward (§2)
        for block in self.blocks:
            x, state = block(x, state)
        return self.vit.norm(x)

    def forward(self, images: Tensor) -> Tensor:
        return self.vit.forward_head(self.forward_features(images))


def momentum_vit(
    model: VisionTransformer,
    kind: str = "robust",
    *,
    copy_model: bool = False,
    **options: Any,
) -> MomentumViT:
    """Run a V-MoE (from :func:`smoe.models.vmoe_vit`) as a momentum stack.

    Spec: specs/momentum_smoe.md §6 "V-MoE (pre-LN)"; see the module docstring for the layout.

    Args:
        model: a timm ``VisionTransformer`` with at least one :class:`MoEMlp` block. Its blocks
            are replaced in place unless ``copy_model``; the MoE layers keep their weights and
            routers (a trained V-MoE can be converted, its extra LayerNorms start as identity).
        kind: ``"robust"`` (Robust MomentumV-MoE, §5: rho 0.2, kappa 1.25 by default),
            ``"heavy_ball"`` (MomentumV-MoE, §3: mu 0.7, gamma 1, sign -1 by default) or
            ``"adam"`` (§4).
        copy_model: work on a deep copy and leave ``model`` untouched.
        **options: :class:`smoe.momentum.MomentumMoE`'s options (mu, gamma, sign, beta1, beta2,
            gamma1, eps, adam_layers, rho, kappa, lipschitz, dropout), the same for every MoE
            block; each block's ``moe_index`` is its rank among the MoE blocks.

    Returns:
        The :class:`MomentumViT` (holding ``model``, or its copy, as ``.vit``).

    Raises:
        TypeError: ``model`` is not a timm ``VisionTransformer``; an unknown option.
        ValueError: an unknown kind, ``kind``/``moe_index`` among the options, an option out of
            range (the message names it), a model without MoE blocks or already converted.
    """
    _check_vit(model)
    if kind not in KINDS:
        raise ValueError(f"momentum_vit: kind must be one of {KINDS}, got {kind!r}")
    for name in options:
        if name in ("kind", "moe_index"):
            raise ValueError(f"momentum_vit: {name} is set by momentum_vit, not an option")
        if name not in _OPTIONS:
            raise TypeError(f"momentum_vit: unknown option {name!r}; accepted: {_OPTIONS}")
    if any(isinstance(b, MomentumBlock) for b in model.blocks):
        raise ValueError("momentum_vit: model is already a momentum stack")
    moe = moe_blocks(model)
    if not moe:
        raise ValueError("momentum_vit: model has no MoE block (build it with vmoe_vit first)")
    if copy_model:
        model = copy.deepcopy(model)
    rank = {i: r for r, i in enumerate(moe)}
    for i, block in enumerate(model.blocks):
        momentum = None
        if i in rank:
            momentum = MomentumMoE(_MoEMlpCall(block.mlp), kind=kind, moe_index=rank[i], **options)
        model.blocks[i] = MomentumBlock(block, momentum)
    return MomentumViT(model, kind)


def momentum_vmoe_vit(
    vit: VisionTransformer,
    num_experts: int = 8,
    k: int = 2,
    *,
    router: str = "robust_momentum",
    stack: str | None = None,
    momentum_options: Mapping[str, Any] | None = None,
    **vmoe_options: Any,
) -> MomentumViT:
    """:func:`smoe.models.vmoe_vit` then :func:`momentum_vit`, in one call.

    Args:
        vit: a dense timm ``VisionTransformer`` (see :func:`vmoe_vit`).
        num_experts, k: E and k of every MoE layer.
        router: the registered router of every MoE layer. The stack-level entries
            (``"momentum"``, ``"adam"``, ``"robust_momentum"``) bring their gate (a biased top-k,
            no auxiliary loss) and their stack kind (``router_info(router).stack``).
        stack: the stack kind, to put any router in a stack (e.g. ``router="vmoe",
            stack="robust"``: Robust MomentumV-MoE with V-MoE's router); default: the router's.
        momentum_options: :class:`smoe.momentum.MomentumMoE`'s options (see
            :func:`momentum_vit`).
        **vmoe_options: :func:`vmoe_vit`'s placement, grouping and router options.

    Raises:
        ValueError: no stack kind (a plain router without ``stack``), or any error of
            :func:`vmoe_vit` and :func:`momentum_vit`.
    """
    kind = stack if stack is not None else router_info(router).stack
    if kind is None:
        raise ValueError(
            f"momentum_vmoe_vit: router {router!r} is not a stack-level method; give stack= "
            f"(one of {KINDS})"
        )
    if kind not in KINDS:
        raise ValueError(f"momentum_vmoe_vit: stack must be one of {KINDS}, got {kind!r}")
    model = vmoe_vit(vit, num_experts, k, router=router, **vmoe_options)
    return momentum_vit(model, kind, **dict(momentum_options or {}))


def _check_vit(model: nn.Module) -> None:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as e:  # pragma: no cover - without timm there is no ViT to convert
        raise TypeError("momentum_vit: needs timm (pip install timm)") from e
    if not isinstance(model, VisionTransformer):
        raise TypeError(
            f"momentum_vit: model must be a timm VisionTransformer (a V-MoE from vmoe_vit), got "
            f"{type(model).__name__}"
        )
