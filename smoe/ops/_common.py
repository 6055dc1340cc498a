"""What every op module shares: the accepted float dtypes and the double-backward guard."""

from __future__ import annotations

import torch

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def refuse_double_backward(*ops: str) -> None:
    """Give each ``smoe::<op>_backward`` a derivative that raises a clear error.

    The *_backward ops have no derivative of their own. Registering one that raises turns
    autograd's confusing "appears to not have been used in the graph" (or a silent None with
    ``allow_unused=True``) into a clear error (STYLE.md §8).
    """
    for op in ops:
        _refuse(op)


def _refuse(op: str) -> None:
    def backward(ctx, *grads):
        raise RuntimeError(f"smoe::{op}: double backward is not supported")

    torch.library.register_autograd(
        f"smoe::{op}_backward", backward, setup_context=lambda ctx, inputs, output: None
    )
