"""The graphs of graph-of-tokens routing (specs/graph_routing.md §2.2, §7): the token groups, the
similarity graph (explicit, or fused through ``scaled_dot_product_attention``), the attention
graph, the option checks and the routing entropy. The routers: smoe/routing/graph.py."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from smoe.routing.context import RoutingContext, size_of

MIXES = ("poe", "logits", "probs")
MEMORIES = ("drop", "cache")
SIMS = ("dot", "cosine", "router")
HEADS = ("mean", "max")
TOP1_WEIGHTS = ("one", "prob")
# The floor of ‖u‖ of sim="cosine" (as X-MoE's cosine_scores): F.normalize's 1e-12 gave a zero
# token a gradient of ~1e11 (inf in fp16); 1e-4 bounds the amplification by 1e4.
COSINE_EPS = 1e-4


# --- option checks --------------------------------------------------------------------------


def check_choice(who: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{who}: {name} must be one of {choices}, got {value!r}")


def check_positive_int(who: str, name: str, value: object) -> None:
    """None (off) or an int >= 1."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{who}: {name} must be None or an int >= 1, got {value!r}")


def resolve_lam(who: str, mix: str, lam: float | None) -> float:
    """λ: 1.0 for poe, 0.5 for the convex mixes when None; >= 0, and <= 1 for the convex mixes
    (λ > 1 would give negative mixing coefficients, and p̃ would not be a distribution)."""
    if lam is None:
        return 1.0 if mix == "poe" else 0.5
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ValueError(f"{who}: lam must be a finite float >= 0, got {lam!r}")
    if lam < 0:
        raise ValueError(f"{who}: lam must be >= 0, got {lam}")
    if mix != "poe" and lam > 1:
        raise ValueError(f"{who}: lam must be in [0, 1] for mix={mix!r} (a convex mix), got {lam}")
    return float(lam)


def check_causal(who: str, causal: object) -> None:
    if causal is not None and not isinstance(causal, bool):
        raise ValueError(f"{who}: causal must be None, True or False, got {causal!r}")


# --- token groups ---------------------------------------------------------------------------


def groups(who: str, T: int, context: RoutingContext | None) -> tuple[int, int]:
    """(B, S): the sequences the T flat tokens form. ``context.batch_shape`` ``(..., S)`` groups
    them per sequence (row-major, as :class:`smoe.MoELayer` flattens); without one, or with a
    1-D shape, all T tokens are one sequence."""
    shape = None if context is None else context.batch_shape
    if shape is None or len(shape) < 2:
        return 1, T
    S, B = size_of(shape[-1]), 1
    for n in shape[:-1]:  # (no generator: dynamo traces a loop)
        B *= size_of(n)
    if B * S != T:
        raise ValueError(
            f"{who}: context.batch_shape {tuple(shape)} does not hold the {T} tokens of x"
        )
    return B, S


def padding_keep(who: str, context: RoutingContext | None, B: int, S: int, device) -> Tensor | None:
    """``context.padding_mask`` as ``[B, S]`` bool (True: a real token), or None without one.

    Raises:
        ValueError: not a bool tensor, not ``B * S`` entries, or on another device.
    """
    mask = None if context is None else context.padding_mask
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise ValueError(
            f"{who}: context.padding_mask must be a bool tensor (True for real tokens), got "
            f"{getattr(mask, 'dtype', type(mask).__name__)}"
        )
    if mask.numel() != B * S:
        raise ValueError(
            f"{who}: context.padding_mask must hold one entry per token ({B} x {S}), got shape "
            f"{tuple(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"{who}: context.padding_mask is on {mask.device}, the tokens on {device}")
    return mask.reshape(B, S)


def keep_columns(keep: Tensor) -> Tensor:
    """``[B, S, S]`` bool: column j is a neighbour of row i when j is a real token or j = i (a
    padding token keeps only itself, so no row is empty)."""
    S = keep.shape[1]
    eye = torch.eye(S, dtype=torch.bool, device=keep.device)
    return keep[:, None, :] | eye


def is_causal(causal: bool | None, context: RoutingContext | None) -> bool:
    """The router's own ``causal`` when set, else ``context.causal`` (False without a context)."""
    if causal is not None:
        return causal
    return bool(context.causal) if context is not None else False


def allowed(S: int, causal: bool, window: int | None, device: torch.device) -> Tensor | None:
    """``[S, S]`` bool, True where j ∈ N(i): j <= i when causal; ``window``: |i − j| < window
    (causal: i − window < j <= i). None when every pair is allowed."""
    if not causal and window is None:
        return None
    i = torch.arange(S, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    ok = torch.ones(S, S, dtype=torch.bool, device=device)
    if causal:
        ok = ok & (j <= i)
    if window is not None:
        ok = ok & ((i - j).abs() < window)
    return ok


# --- the similarity graph -------------------------------------------------------------------


def similarity_query(sim: str, u: Tensor, z: Tensor, tau: float) -> tuple[Tensor, float]:
    """The vectors whose scaled inner products are sim/τ, and the scale: ``"dot"`` u with
    1/(√d τ), ``"cosine"`` u/max(‖u‖, 1e-4) with 1/τ, ``"router"`` z with 1/(√E τ). u, z:
    ``[B, S, ·]``."""
    if sim == "dot":
        return u, 1.0 / (math.sqrt(u.shape[-1]) * tau)
    if sim == "cosine":
        return F.normalize(u, dim=-1, eps=COSINE_EPS), 1.0 / tau
    return z, 1.0 / (math.sqrt(z.shape[-1]) * tau)


def similarity_graph(
    q: Tensor,
    scale: float,
    *,
    causal: bool,
    window: int | None,
    topm: int | None,
    keep: Tensor | None = None,
) -> Tensor:
    """``A [B, S, S]`` = softmax over N(i) of ``scale · q_i·q_j``; ``topm``: only the m largest
    similarities of each row (ties at the m-th value are all kept) enter the softmax; ``keep``
    ``[B, S]``: padding tokens (False) are nobody's neighbour but their own. Computed in q's
    dtype (fp32 or fp64), the row max subtracted by the softmax; j = i is always allowed, so no
    row is empty."""
    S = q.shape[1]
    s = (q @ q.transpose(-2, -1)) * scale
    ok = allowed(S, causal, window, q.device)
    if ok is not None:
        s = s.masked_fill(~ok, float("-inf"))
    if keep is not None:
        s = s.masked_fill(~keep_columns(keep), float("-inf"))
    if topm is not None and topm < S:
        kth = s.topk(topm, dim=-1).values[..., -1:]
        s = s.masked_fill(s < kth, float("-inf"))
    return torch.softmax(s, dim=-1)


def fused_similarity_mix(
    q: Tensor, scale: float, v: Tensor, *, causal: bool, self_coef: float, lam: float
) -> Tensor:
    """``self_coef · v + lam · A v`` with A the dense similarity graph of ``q`` (no window, no
    top-m), through ``scaled_dot_product_attention``: on CUDA its fused kernels (memory-efficient
    in fp32) never materialise ``[S, S]``. q ``[B, S, D]``, v ``[B, S, E]``.

    On CPU the flash kernel (blocked, online softmax, O(S) memory) needs equal widths of q and
    v, else SDPA falls back to its math backend, which builds ``[S, S]``; zero columns padded to
    the narrower one change neither q·k nor A v (2-4x faster at S = 2048, d = 128, E = 16)."""
    qq, vv = q.unsqueeze(1), v.unsqueeze(1)
    E = v.shape[-1]
    if q.device.type == "cpu" and q.shape[-1] != E:
        width = max(q.shape[-1], E)
        qq, vv = F.pad(qq, (0, width - q.shape[-1])), F.pad(vv, (0, width - E))
    av = F.scaled_dot_product_attention(qq, qq, vv, scale=scale, is_causal=causal)
    return v * self_coef + av.squeeze(1)[..., :E] * lam


# --- the attention graph --------------------------------------------------------------------


def attention_graph(
    who: str,
    attention: Tensor | None,
    heads: str | int,
    T: int,
    context: RoutingContext | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """``A [B, S, C + S]`` in ``dtype`` from ``[B, H, S, C + S]`` (or ``[B, S, C + S]``, one
    head) attention probabilities: the mean over heads (fp32 at least), the max renormalised per
    row, or head ``heads``. C = 0 for attention within the block; C > 0 memory columns first
    (Transformer-XL, specs/graph_routing.md §2.3).

    Raises:
        ValueError: attention missing, not floating, on another device, of a shape that is not
            ``[B, H, S, C + S]`` with B·S = T (and (B, S) = ``context.batch_shape`` when that is
            2-D), or ``heads`` not below H.
    """
    if attention is None:
        raise ValueError(
            f"{who}: context.attention is missing: pass the block's attention probabilities "
            "[B, H, S, S] in RoutingContext(attention=...)"
        )
    if not isinstance(attention, Tensor) or not attention.is_floating_point():
        raise ValueError(
            f"{who}: context.attention must be a floating tensor, got "
            f"{getattr(attention, 'dtype', type(attention).__name__)}"
        )
    if attention.device != device:
        raise ValueError(
            f"{who}: context.attention is on {attention.device}, the tokens on {device}"
        )
    a = attention.unsqueeze(1) if attention.dim() == 3 else attention
    shape = tuple(attention.shape)
    if a.dim() != 4 or a.shape[-1] < a.shape[-2] or a.shape[0] * a.shape[-2] != T:
        raise ValueError(
            f"{who}: context.attention must be [B, H, S, S] (or [B, S, S]; [B, H, S, C + S] with "
            f"memory) with B*S = {T} tokens, got shape {shape}"
        )
    B, H, S = a.shape[0], a.shape[1], a.shape[-2]
    batch = None if context is None else context.batch_shape
    if batch is not None and len(batch) == 2 and (size_of(batch[0]), size_of(batch[1])) != (B, S):
        raise ValueError(
            f"{who}: context.attention of shape {shape} does not match context.batch_shape "
            f"{tuple(batch)}"
        )
    if H == 0:
        raise ValueError(f"{who}: context.attention has no heads (shape {shape})")
    a = a.to(dtype)
    if heads == "mean":
        return a.mean(dim=1)
    if heads == "max":
        m = a.amax(dim=1)
        return m / m.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    assert isinstance(heads, int)
    if not 0 <= heads < H:
        raise ValueError(
            f"{who}: heads={heads} is out of range for context.attention with H={H} heads"
        )
    return a[:, heads]


def drop_memory(A: Tensor, causal: bool) -> Tensor:
    """``memory="drop"`` (§2.3): keep the current-block columns of ``A [B, S, C + S]`` (the
    entries j > i zeroed when causal) and set each diagonal entry to the row's mass off it,
    ``Ã_ii = 1 − Σ_{j≠i} Ã_ij`` (clamped at 0 against rounding): rows sum to 1 again, and a token
    whose attention lay on memory (token 0 of a block) keeps its own gate."""
    S = A.shape[-2]
    cur = A[..., A.shape[-1] - S :]
    eye = torch.eye(S, dtype=torch.bool, device=A.device)
    off = cur.masked_fill(eye, 0.0)
    if causal:
        off = off.tril()
    own = (1.0 - off.sum(dim=-1)).clamp_min(0.0)
    return off + torch.diag_embed(own)


# --- entropy --------------------------------------------------------------------------------


def mean_entropy_of_logits(logits: Tensor) -> Tensor:
    """``mean_t H(softmax(logits_t))`` in nats (0 for no token)."""
    logp = torch.log_softmax(logits, dim=-1)
    h = -(logp.exp() * logp).sum(dim=-1)
    return h.sum() / max(h.shape[0], 1)


def mean_entropy_of_probs(p: Tensor) -> Tensor:
    """``mean_t H(p_t)`` in nats for rows of probabilities (0·log 0 = 0)."""
    logp = torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))
    h = -(p * logp).sum(dim=-1)
    return h.sum() / max(h.shape[0], 1)
