"""Typed Python wrappers of the ``torch.ops.smoe`` custom ops, with their fakes and autograd.

One module per op family, each with one section per op in schema order (csrc/registration.cpp):
wrapper, fake, autograd. The kernels live in csrc/; nothing numerical happens here.

- :mod:`smoe.ops.routing`: ``topk_softmax``, ``expert_choice``
- :mod:`smoe.ops.dispatch`: ``make_plan``, ``permute``, ``combine`` (and :class:`Plan`)
- :mod:`smoe.ops.experts`: ``grouped_mm``, ``swiglu``
- :mod:`smoe.ops.xmoe`: ``cosine_scores`` (X-MoE)

A new router family adds its own module here (and its csrc files), then re-exports it below.
"""

from smoe import _loader

_loader.load_library()

from smoe.ops._common import refuse_sparse  # noqa: E402
from smoe.ops.dispatch import Plan, combine, make_plan, permute  # noqa: E402
from smoe.ops.experts import grouped_mm, swiglu  # noqa: E402
from smoe.ops.routing import ExpertChoice, TopK, expert_choice, topk_softmax  # noqa: E402
from smoe.ops.xmoe import CosineScores, cosine_scores  # noqa: E402

refuse_sparse()  # every smoe op: a sparse argument is an error naming it

__all__ = [
    "CosineScores",
    "ExpertChoice",
    "Plan",
    "TopK",
    "combine",
    "cosine_scores",
    "expert_choice",
    "grouped_mm",
    "make_plan",
    "permute",
    "swiglu",
    "topk_softmax",
]
