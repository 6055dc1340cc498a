"""X-MoE ops: hypersphere (cosine) routing scores.

One section per op, in schema order (csrc/registration.cpp): wrapper, fake, autograd.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from smoe.ops import _checks_methods
from smoe.ops._common import acc_dtype, check_devices, refuse_double_backward

__all__ = ["CosineScores", "cosine_scores"]


# ---------------------------------------------------------------------------------------------
# cosine_scores
# ---------------------------------------------------------------------------------------------
class CosineScores(NamedTuple):
    """``cos [T, N]`` (the scores) and ``logits [T, N] = cos / max(tau, 1e-4)``, both float32
    (float64 for float64 inputs)."""

    cos: Tensor
    logits: Tensor


def cosine_scores(
    h: Tensor,
    proj: Tensor,
    expert_emb: Tensor,
    temperature: Tensor,
    *,
    eps: float = 1e-4,
    normalize_tokens: bool = True,
) -> CosineScores:
    """X-MoE routing scores: cosine between the projected token and each expert embedding.

    Spec: specs/xmoe.md §3 (Eq. 7), §6, §8. ``z = h projᵀ`` accumulated in float32 (float64 for
    float64 inputs); ``ẑ = z / max(‖z‖, eps)`` when ``normalize_tokens`` (else ``ẑ = z``, the
    fastmoe community variant of §11); ``ê_i = e_i / max(‖e_i‖, eps)``; ``cos = ẑ êᵀ``;
    ``logits = cos / max(τ, 1e-4)``. A zero vector gives cos 0 (the eps floor), never NaN.
    Norms are scaled by the largest entry, so huge activations do not overflow them.

    Non-finite scores (from inf/NaN inputs or an overflowing ``z``) are replaced by the smallest
    finite score *of the same row* (0 if the row has none) and get no gradient. The spec and
    torchscale take the minimum over the whole batch; a per-row minimum keeps one bad token from
    changing the scores of the others (and keeps a token's routing independent of the batch).

    Args:
        h: ``[T, d]`` token hidden states (float32/float16/bfloat16; float64 on CPU); rows may be
            strided.
        proj: ``[d_e, d]`` projection W, h's dtype.
        expert_emb: ``[N, d_e]`` expert embeddings E, h's dtype.
        temperature: 0-dim float tensor τ on h's device (learnable; clamped to >= 1e-4 at use,
            its gradient 0 where clamped).
        eps: floor of the norms, > 0.
        normalize_tokens: L2-normalise ``z`` (the paper) or not (fastmoe's "XMoE" gate).

    Returns:
        CosineScores: ``cos [T, N]`` and ``logits [T, N]``, float32 (float64 for float64 h).
        Differentiable w.r.t. h, proj, expert_emb and temperature.

    Raises:
        ValueError: eps <= 0. RuntimeError (from the op): devices, dtypes or shapes that
            disagree (the message names the argument).

    Note:
        Deterministic on CPU and CUDA (reductions over tokens in a fixed order, no atomics); no
        host sync on CUDA (the temperature is read on the device).
    """
    if not 0.0 < eps < math.inf:  # also refuses NaN; traceable with a symbolic eps
        raise ValueError(f"cosine_scores: eps must be finite and > 0, got {eps}")
    cos, logits = torch.ops.smoe.cosine_scores.default(
        h, proj, expert_emb, temperature, eps=eps, normalize_tokens=normalize_tokens
    )
    return CosineScores(cos, logits)


@torch.library.register_fake("smoe::cosine_scores")
def _cosine_scores_fake(
    h: Tensor,
    proj: Tensor,
    expert_emb: Tensor,
    temperature: Tensor,
    *,
    eps: float = 1e-4,
    normalize_tokens: bool = True,
) -> tuple[Tensor, Tensor]:
    check_devices("cosine_scores", h=h, proj=proj, expert_emb=expert_emb, temperature=temperature)
    _checks_methods.check_cosine_scores("cosine_scores", h, proj, expert_emb, temperature, eps)
    shape = (h.shape[0], expert_emb.shape[0])
    dt = acc_dtype(h)
    return h.new_empty(shape, dtype=dt), h.new_empty(shape, dtype=dt)


def _setup_context_cosine_scores(ctx, inputs, keyword_only_inputs, output) -> None:
    h, proj, expert_emb, temperature = inputs
    ctx.eps = keyword_only_inputs.get("eps", 1e-4)
    ctx.normalize_tokens = keyword_only_inputs.get("normalize_tokens", True)
    ctx.save_for_backward(h, proj, expert_emb, temperature)


def _backward_cosine_scores(ctx, grad_cos: Tensor | None, grad_logits: Tensor | None):
    h, proj, expert_emb, temperature = ctx.saved_tensors
    shape = (h.shape[0], expert_emb.shape[0])
    dt = acc_dtype(h)
    grad_cos = h.new_zeros(shape, dtype=dt) if grad_cos is None else grad_cos.contiguous()
    grad_logits = h.new_zeros(shape, dtype=dt) if grad_logits is None else grad_logits.contiguous()
    grads = torch.ops.smoe.cosine_scores_backward.default(
        grad_cos, grad_logits, h, proj, expert_emb, temperature, ctx.eps, ctx.normalize_tokens
    )
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))


@torch.library.register_fake("smoe::cosine_scores_backward")
def _cosine_scores_backward_fake(
    grad_cos: Tensor,
    grad_logits: Tensor,
    h: Tensor,
    proj: Tensor,
    expert_emb: Tensor,
    temperature: Tensor,
    eps: float,
    normalize_tokens: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    op = "cosine_scores_backward"
    check_devices(op, h=h, proj=proj, expert_emb=expert_emb, temperature=temperature)
    _checks_methods.check_cosine_scores_backward(
        grad_cos, grad_logits, h, proj, expert_emb, temperature, eps
    )
    return (
        h.new_empty(h.shape),
        proj.new_empty(proj.shape),
        expert_emb.new_empty(expert_emb.shape),
        temperature.new_empty(()),
    )


torch.library.register_autograd(
    "smoe::cosine_scores", _backward_cosine_scores, setup_context=_setup_context_cosine_scores
)


refuse_double_backward("cosine_scores")
