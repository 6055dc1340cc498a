"""What every op module shares: the accepted float dtypes and the float32-or-float64 dtype of
outputs computed at float32 precision, the fakes' device and dtype checks, the double-backward
guard and the refusal of sparse inputs."""

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


_INDEX_NAMES = {torch.int32: "int32", torch.int64: "int64"}
# c10's ScalarType names, which the kernels' messages print
_SCALAR_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
                 torch.bfloat16: "BFloat16", torch.int32: "Int", torch.int64: "Long",
                 torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
                 torch.bool: "Bool"}  # fmt: skip


def check_fake_dtypes(
    op: str,
    floats: dict[str, Tensor] | None = None,
    index: dict[str, tuple] | None = None,
) -> None:
    """In a fake: the dtype checks the kernels make (csrc/checks.h ``check_float`` and
    ``check_index``, the same messages), so that a wrong dtype fails when ``torch.compile``
    traces the op rather than when the compiled graph first runs. ``index`` maps a name to
    ``(tensor, dims)`` (an int32 tensor of that many dims) or ``(tensor, dims, dtype)``."""
    for name, t in (floats or {}).items():
        torch._check(
            t.dtype in FLOATS,
            lambda name=name, t=t: (
                f"smoe::{op}: {name} must be float32, float64, float16 or bfloat16, got "
                f"{_SCALAR_NAMES.get(t.dtype, str(t.dtype))}"
            ),
        )
    for name, (t, dim, *dtype) in (index or {}).items():
        want = dtype[0] if dtype else torch.int32
        torch._check(
            t.dtype == want,
            lambda name=name, t=t, dim=dim, want=want: (
                f"smoe::{op}: {name} must be a {dim}-D {_INDEX_NAMES[want]} tensor, got "
                f"{index_dtype_name(t.dtype)}"
            ),
        )


def index_dtype_name(dtype: torch.dtype) -> str:
    """How the kernels' index checks (csrc/checks.h ``index_type_name``) name a dtype."""
    return _INDEX_NAMES.get(dtype) or _SCALAR_NAMES.get(dtype, str(dtype))


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
