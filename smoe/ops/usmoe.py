"""USMoE's op: ``unified_topk``, the joint top-N of a group's token-expert scores.

One section per op, in schema order (csrc/registration.cpp): wrapper, fake.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smoe.ops import _checks_methods
from smoe.ops._common import check_devices

__all__ = ["unified_topk"]


# ---------------------------------------------------------------------------------------------
# unified_topk
# ---------------------------------------------------------------------------------------------
def unified_topk(scores: Tensor, n: int, *, counts: Tensor | None = None) -> Tensor:
    """USMoE's unified competitive selection (specs/usmoe.md §3, §8): in every group (row) of
    ``scores [G, L]`` (``L = S·E``, flat index ``s·E + e``) the ``n`` largest scores.

    Args:
        scores: ``[G, L]`` float; -inf marks pairs that must not be chosen unless nothing else is
            left (padding tokens); NaN is an error.
        n: pairs per group, ``0 <= n <= L``.
        counts: None, or ``[G]`` int64 in ``[0, n]``: group g takes only ``counts[g]`` pairs (a
            fractional budget over the group's real tokens).

    Returns:
        ``[G, n]`` int64: the chosen flat indices of each group in ascending order (token-major),
        -1 after the group's count. Ties go to the lower flat index. Not differentiable (the
        weights are gathered from the scores outside it).

    Note:
        CPU: nth_element per group; CUDA: a radix select per group (one block each), no host sync,
        the same indices as the CPU. On CUDA a NaN or a bad count is an asynchronous device assert.
    """
    if not isinstance(n, (int, torch.SymInt)) or isinstance(n, bool):
        raise TypeError(f"unified_topk: n must be an int, got {type(n).__name__}")
    return torch.ops.smoe.unified_topk.default(scores, n, counts)


@torch.library.register_fake("smoe::unified_topk")
def _unified_topk_fake(scores: Tensor, n: int, counts: Tensor | None = None) -> Tensor:
    if counts is not None:
        check_devices("unified_topk", scores=scores, counts=counts)
    _checks_methods.check_unified_topk(scores, n, counts)
    return scores.new_empty((scores.shape[0], n), dtype=torch.int64)
