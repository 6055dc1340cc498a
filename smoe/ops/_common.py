"""What every op module shares: the accepted float dtypes and the float32-or-float64 dtype of
outputs computed at float32 precision, the fakes' device check, the double-backward guard and
the refusal of sparse inputs."""

from __future__ import annotations

import torch
from torch import Tensor

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def acc_dtype(t: Tensor) -> torch.dtype:
    """The dtype of an output an op computes in float32 from ``t`` (16-bit values read exactly):
    float64 for float64 ``t``, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


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

    def setup_context(ctx, inputs, output, keyword_only_inputs=None) -> None:
        pass  # torch passes keyword_only_inputs when the backward op has keyword-only options

    torch.library.register_autograd(f"smoe::{op}_backward", backward, setup_context=setup_context)


def check_devices(op: str, **tensors: Tensor | None) -> None:
    """In a fake: every tensor argument on the first one's device.

    A call mixing meta with real tensors dispatches to the fake, which would otherwise return
    meta (or uninitialised) outputs without a word; the kernels check devices themselves.
    """
    present = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = present[0]
    for name, t in present[1:]:
        torch._check(
            t.device == first.device,
            lambda name=name, t=t: (
                f"smoe::{op}: {name} must be on {first.device} like {first_name}, got {t.device}"
            ),
        )


_SPARSE_KEYS = ("SparseCPU", "SparseCUDA", "SparseMeta", "SparseCsrCPU", "SparseCsrCUDA")
_sparse_lib: torch.library.Library | None = None


def refuse_sparse(namespace: str = "smoe") -> None:
    """Give every op of ``namespace`` a kernel for the sparse dispatch keys that names the
    sparse argument (the dispatcher's own "Could not run ... with arguments from the 'SparseCPU'
    backend" names none). Ops take dense (strided) tensors only."""
    global _sparse_lib
    if _sparse_lib is None:
        _sparse_lib = torch.library.Library(namespace, "IMPL")
    prefix = f"{namespace}::"
    for qualname in torch._C._dispatch_get_all_op_names():
        if qualname.startswith(prefix):
            op = qualname[len(prefix) :]
            for key in _SPARSE_KEYS:
                _sparse_lib.impl(op, _sparse_refusal(namespace, op), key)


def _sparse_refusal(namespace: str, op: str):
    names = [a.name for a in getattr(getattr(torch.ops, namespace), op).default._schema.arguments]

    def kernel(*args, **kwargs):
        for name, value in [*zip(names, args), *kwargs.items()]:
            if isinstance(value, Tensor) and value.layout != torch.strided:
                raise RuntimeError(
                    f"{namespace}::{op}: {name} must be a dense (strided) tensor, got "
                    f"{value.layout}"
                )
        raise RuntimeError(f"{namespace}::{op}: all tensor arguments must be dense (strided)")

    return kernel
