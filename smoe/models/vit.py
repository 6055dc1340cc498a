"""V-MoE: a timm ``VisionTransformer`` whose chosen MLP blocks are sparse MoE layers.

Spec: specs/vmoe.md (Riquelme et al. 2021, "Scaling Vision with Sparse Mixture of Experts";
reference code ``google-research/vmoe``, ``vmoe/nn/vit_moe.py``). The MoE layers replace
``block.mlp`` of the blocks that §5's placement rules pick ("Every n", "Last n"); each routes its
tokens in groups of ``group_images`` whole images (§2: S = 8 images x tokens per image), with
V-MoE's noisy top-k router (:class:`smoe.VMoERouter`, §3) or with expert choice
(``smoe.ExpertChoiceRouter``, Zhou et al. 2022). With ``upcycle=True`` every expert starts as a
copy of the dense MLP it replaces, which is also what the paper's configs do at initialisation
(§3.5: all experts share one initialisation seed).

timm is imported lazily: ``import smoe`` works without it, and only :func:`quickdraw_vit` and
:func:`vmoe_vit` need it.

Training and evaluation helpers (aux loss, capacity and BPR of every MoE block) live in
:mod:`smoe.models.vit_control`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from smoe.layer import MoEAux, MoELayer
from smoe.models.vit_attention import AttentionMoEBlock, check_explicit_attention, needs_attention
from smoe.routing.context import RoutingContext
from smoe.routing.registry import available_routers, build_router, router_info

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

__all__ = [
    "MoEMlp",
    "moe_block_indices",
    "quickdraw_vit",
    "tokens_per_image",
    "vmoe_vit",
]


# ---------------------------------------------------------------------------------------------
# Placement (§5)
# ---------------------------------------------------------------------------------------------
def moe_block_indices(
    num_blocks: int, *, every: int | None = None, last: int | None = None
) -> tuple[int, ...]:
    """The 0-indexed blocks that hold an MoE layer, by V-MoE's placement rules (specs/vmoe.md §5).

    Args:
        num_blocks: L, the number of transformer blocks.
        every: "Every n": blocks ``n-1, 2n-1, ...`` ("Every 2" = the odd blocks).
        last: "Last n": the last n of the odd blocks (ViT-S, L = 8, "Last 2" -> (5, 7)).

    Exactly one of ``every`` and ``last`` must be given.

    Returns:
        The block indices, ascending.

    Raises:
        TypeError: a non-integer argument.
        ValueError: both or neither rule given, ``num_blocks < 1``, ``every`` not in
            ``[1, num_blocks]``, ``last`` not in ``[1, number of odd blocks]``.

    Example: ``moe_block_indices(12, every=2) == (1, 3, 5, 7, 9, 11)``;
    ``moe_block_indices(8, last=2) == (5, 7)``.
    """
    for name, value in (("num_blocks", num_blocks), ("every", every), ("last", last)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"moe_block_indices: {name} must be an int, got {value!r}")
    if num_blocks < 1:
        raise ValueError(f"moe_block_indices: num_blocks must be >= 1, got {num_blocks}")
    if (every is None) == (last is None):
        raise ValueError(
            f"moe_block_indices: give exactly one of every= and last=, got every={every}, "
            f"last={last}"
        )
    if every is not None:
        if not 1 <= every <= num_blocks:
            raise ValueError(
                f"moe_block_indices: every must be in [1, num_blocks={num_blocks}], got {every}"
            )
        return tuple(range(every - 1, num_blocks, every))
    assert last is not None
    odd = tuple(range(1, num_blocks, 2))
    if not 1 <= last <= len(odd):
        raise ValueError(
            f"moe_block_indices: last must be in [1, {len(odd)}] (the odd blocks of "
            f"num_blocks={num_blocks}), got {last}"
        )
    return odd[-last:]


# ---------------------------------------------------------------------------------------------
# The MoE block
# ---------------------------------------------------------------------------------------------
class MoEMlp(nn.Module):
    """A drop-in for timm's ``Mlp`` in a ViT block: an :class:`MoELayer` that returns a tensor.

    timm's ``Block`` calls ``self.mlp(self.norm2(x))`` on ``[B, N, d]`` and expects ``[B, N, d]``
    back, so the layer's :class:`MoEAux` is kept in :attr:`last_aux` (the last forward's, with its
    autograd graph) for the training loop to read (:func:`moe_aux_loss`).

    Args:
        moe: the MoE layer (its router decides capacity and groups).
        tokens_per_image: N, when known. Routing groups of whole images (specs/vmoe.md §2) need
            ``[B, N, d]`` inputs with this N; forward checks it. None: no check.

    Attributes:
        last_aux: :class:`MoEAux` of the latest forward, None before the first one (and in
            copies: ``copy.deepcopy`` and pickling drop it, since a graph cannot be copied).
    """

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict

    def __init__(self, moe: MoELayer, tokens_per_image: int | None = None) -> None:
        super().__init__()
        if tokens_per_image is not None and tokens_per_image < 1:
            raise ValueError(f"MoEMlp: tokens_per_image must be >= 1, got {tokens_per_image}")
        self.moe = moe
        self.tokens_per_image = tokens_per_image
        self.last_aux: MoEAux | None = None

    @classmethod
    def from_dense(
        cls,
        mlp: nn.Module,
        num_experts: int,
        k: int = 2,
        *,
        router: nn.Module,
        tokens_per_image: int | None = None,
    ) -> MoEMlp:
        """Upcycle timm's ``Mlp`` (fc1, GELU, fc2): every expert starts as a copy of it.

        Raises:
            ValueError: an MLP this layer cannot reproduce: a norm between the two linears
                (``scale_mlp_norm``), dropout (the experts have none; spec §6 expert dropout is
                not implemented), or a tanh-approximated GELU.
        """
        _check_dense_mlp(mlp)
        return cls(MoELayer.from_dense(mlp, num_experts, k, router=router), tokens_per_image)

    def reset_parameters(self) -> None:
        self.moe.reset_parameters()

    def extra_repr(self) -> str:
        return f"tokens_per_image={self.tokens_per_image}"

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["last_aux"] = None  # a graph cannot be deep-copied or pickled
        return state

    def forward(self, x: Tensor, attention: Tensor | None = None) -> Tensor:
        """``x [B, N, d]`` (or any ``[..., d]`` without the N check) -> same shape. ``attention
        [B, H, N, N]``: for the router, in ``RoutingContext(batch_shape=(B, N), causal=False)``."""
        if self.tokens_per_image is not None and (
            x.dim() != 3 or x.shape[1] != self.tokens_per_image
        ):
            raise ValueError(
                f"MoEMlp: x must be [B, N={self.tokens_per_image}, d] so that routing groups "
                f"hold whole images, got shape {tuple(x.shape)} (dynamic image sizes are not "
                "supported)"
            )
        if attention is None:
            y, self.last_aux = self.moe(x)
        else:
            ctx = RoutingContext(batch_shape=tuple(x.shape[:-1]), attention=attention, causal=False)
            y, self.last_aux = self.moe(x, ctx)
        return y


def _check_dense_mlp(mlp: nn.Module) -> None:
    norm = getattr(mlp, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        raise ValueError(f"MoEMlp: mlp has a norm between fc1 and fc2 ({norm}); not supported")
    for name in ("drop1", "drop2"):
        drop = getattr(mlp, name, None)
        if isinstance(drop, nn.Dropout) and drop.p > 0:
            raise ValueError(
                f"MoEMlp: mlp.{name} has dropout p={drop.p}; experts have no dropout "
                "(build the ViT with proj_drop_rate=0)"
            )
    act = getattr(mlp, "act", None)
    if isinstance(act, nn.GELU) and act.approximate != "none":
        raise ValueError(
            f"MoEMlp: mlp.act is GELU(approximate={act.approximate!r}); experts use the exact GELU"
        )


# ---------------------------------------------------------------------------------------------
# Building a V-MoE from a timm ViT
# ---------------------------------------------------------------------------------------------
def tokens_per_image(vit: VisionTransformer) -> int:
    """Tokens per image in ``vit``'s blocks: patches plus prefix (class, register) tokens."""
    return int(vit.patch_embed.num_patches) + int(vit.num_prefix_tokens)


def vmoe_vit(
    vit: VisionTransformer,
    num_experts: int = 8,
    k: int = 2,
    *,
    every: int | None = None,
    last: int | None = None,
    blocks: Sequence[int] | None = None,
    router: str = "vmoe",
    group_images: int | None = 8,
    upcycle: bool = True,
    copy_model: bool = False,
    **router_kwargs: Any,
) -> VisionTransformer:
    """Turn a timm ``VisionTransformer`` into a V-MoE by replacing chosen blocks' MLPs.

    Placement (specs/vmoe.md §5): ``every=n`` ("Every n"), ``last=n`` ("Last n") or explicit
    ``blocks``; "Every 2" when none is given. Each chosen ``block.mlp`` becomes a
    :class:`MoEMlp` with E experts of the MLP's shape (d -> mlp_dim -> d, GELU, biases).

    Routing groups (§2): ``group_size = group_images * tokens_per_image(vit)`` consecutive tokens,
    i.e. whole images (V-MoE: 8 images); ``group_images=None`` routes each forward's tokens as
    one group. The batch size need not be a multiple of ``group_images``: the last group is
    shorter and keeps the full group's capacity.

    Args:
        vit: a timm ``VisionTransformer`` (fixed image size). Modified in place unless
            ``copy_model``.
        num_experts: E (V-MoE ImageNet configs: 8).
        k: experts per token (V-MoE: 2). For ``"expert_choice"`` it only sets the default
            capacity factor c = k (the same expert compute as top-k at C = 1).
        every, last, blocks: placement; give at most one.
        router: a registered router name (:func:`smoe.routing.available_routers`): ``"vmoe"``
            (:class:`smoe.VMoERouter`: noisy top-k, capacity, BPR; §3), ``"expert_choice"``
            (``smoe.ExpertChoiceRouter``: each expert takes its top ``ceil(S c / E)`` tokens per
            group), ``"topk"``, ``"switch"``, ... Routers with a ``group_size`` option get the
            image groups. A stack-level name (``"momentum"``, ``"adam"``,
            ``"robust_momentum"``) builds its gate only: wrap the result with
            :func:`smoe.models.momentum_vit` (or build with
            :func:`smoe.models.momentum_vmoe_vit`) for the momentum stack.
        group_images: images per routing group (§2, §6: 8), or None.
        upcycle: experts start as copies of the dense MLP (:meth:`MoELayer.from_dense`); else
            fresh, independently initialised experts.
        copy_model: work on a deep copy and leave ``vit`` untouched.
        **router_kwargs: the router's options (:func:`smoe.routing.build_router`), e.g.
            ``capacity_factor=1.05``, ``eval_capacity_factor``, ``noise_std``,
            ``batch_priority`` for V-MoE (§6 defaults otherwise).

    A block whose router reads the attention probabilities (``"attention_aware"``) becomes an
    :class:`smoe.models.vit_attention.AttentionMoEBlock` (same keys) that computes its attention
    explicitly and hands them on; every other block keeps timm's fused attention.

    Returns:
        The V-MoE (``vit`` itself unless ``copy_model``). Its state-dict keys for block i are
        ``blocks.{i}.mlp.moe.router.*`` and ``blocks.{i}.mlp.moe.experts.*``.

    Raises:
        TypeError: ``vit`` is not a timm ``VisionTransformer``.
        ValueError: bad placement, an unknown router, ``group_images < 1``, a dynamic image
            size, a block that already holds an MoE, an MLP that cannot be upcycled.
    """
    _check_vit(vit)
    if router not in available_routers():
        raise ValueError(
            f"vmoe_vit: router must be one of {tuple(available_routers())}, got {router!r}"
        )
    if group_images is not None and group_images < 1:
        raise ValueError(f"vmoe_vit: group_images must be >= 1 or None, got {group_images}")
    if getattr(vit, "dynamic_img_size", False):
        raise ValueError(
            "vmoe_vit: vit has dynamic_img_size=True; routing groups need a fixed number of "
            "tokens per image"
        )
    L = len(vit.blocks)
    indices = _placement(L, every, last, blocks)
    if router_info(router).needs_attention:
        for i in indices:
            check_explicit_attention(vit.blocks[i].attn, f"vmoe_vit: block {i}")
    if copy_model:
        vit = copy.deepcopy(vit)
    N = tokens_per_image(vit)
    group_size = None if group_images is None else group_images * N
    for i in indices:
        block = vit.blocks[i]
        if isinstance(block.mlp, MoEMlp):
            raise ValueError(f"vmoe_vit: block {i} already holds an MoE layer")
        _check_dense_mlp(block.mlp)
        d_model = block.mlp.fc1.in_features
        r = _make_router(router, d_model, num_experts, k, group_size, router_kwargs)
        if upcycle:
            block.mlp = MoEMlp.from_dense(block.mlp, num_experts, k, router=r, tokens_per_image=N)
        else:
            ref = block.mlp.fc1.weight
            layer = MoELayer(
                d_model,
                block.mlp.fc1.out_features,
                num_experts,
                k,
                activation="gelu",
                router=r,
                bias=block.mlp.fc1.bias is not None,
            )
            layer.experts.to(device=ref.device, dtype=ref.dtype)
            layer.router.to(device=ref.device)  # the router keeps float32 (spec §3: fp32 logits)
            block.mlp = MoEMlp(layer, N)
        if needs_attention(block.mlp):  # explicit attention, its probabilities to the router
            vit.blocks[i] = AttentionMoEBlock(block)
    return vit


def _check_vit(vit: nn.Module) -> None:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as e:  # pragma: no cover - without timm there is no ViT to convert
        raise TypeError("vmoe_vit: needs timm (pip install timm)") from e
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"vmoe_vit: vit must be a timm VisionTransformer, got {type(vit).__name__}")


def _placement(
    L: int, every: int | None, last: int | None, blocks: Sequence[int] | None
) -> tuple[int, ...]:
    given = sum(v is not None for v in (every, last, blocks))
    if given > 1:
        raise ValueError(
            f"vmoe_vit: give at most one of every=, last=, blocks=, got every={every}, "
            f"last={last}, blocks={blocks}"
        )
    if blocks is None:
        if every is None and last is None:
            every = 2
        return moe_block_indices(L, every=every, last=last)
    out = tuple(sorted(set(int(b) for b in blocks)))
    if not out or out[0] < 0 or out[-1] >= L:
        raise ValueError(
            f"vmoe_vit: blocks must be non-empty indices in [0, {L}), got {tuple(blocks)}"
        )
    return out


def _make_router(
    kind: str,
    d_model: int,
    num_experts: int,
    k: int,
    group_size: int | None,
    kwargs: Mapping[str, Any],
) -> nn.Module:
    options = dict(kwargs)
    accepted = router_info(kind).option_names()
    if accepted is None or "group_size" in accepted:
        options.setdefault("group_size", group_size)
    return build_router(kind, d_model, num_experts, k, **options)


# ---------------------------------------------------------------------------------------------
# The tiny QuickDraw ViT
# ---------------------------------------------------------------------------------------------
def quickdraw_vit(
    num_classes: int = 9,
    *,
    embed_dim: int = 64,
    depth: int = 6,
    num_heads: int = 4,
    mlp_ratio: float = 2.0,
    patch_size: int = 4,
    img_size: int = 28,
    **kwargs: Any,
) -> VisionTransformer:
    """A tiny timm ViT for 28 x 28 QuickDraw bitmaps (:func:`smoe.data.quickdraw.load_subset`).

    Patch 4 gives 7 x 7 = 49 patches plus the class token: 50 tokens per image, so V-MoE's group
    of 8 images is S = 400 tokens, the group size of the paper's 224 px /32 models
    (specs/vmoe.md §2). The defaults (d = 64, 6 blocks, 4 heads, MLP 128; about 0.21 M
    parameters) train to a useful accuracy in a couple of minutes on two CPU cores.

    Args:
        num_classes: classifier outputs (the shipped subset has 9 categories).
        embed_dim, depth, num_heads, mlp_ratio, patch_size, img_size: timm's arguments.
        **kwargs: more ``VisionTransformer`` arguments (``in_chans`` defaults to 1).

    Raises:
        ImportError: timm is not installed.
    """
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as e:
        raise ImportError("quickdraw_vit: needs timm (pip install timm)") from e
    kwargs.setdefault("in_chans", 1)
    return VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        **kwargs,
    )
