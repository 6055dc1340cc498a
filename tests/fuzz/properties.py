"""The properties every fuzz draw is checked for: values against the reference (STYLE.md §8), a
bitwise-equal rerun, the fake kernel's metadata against the real output, float64 gradients
against autograd through the reference."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_map_only

from tests.helpers import TOL

LOW = (torch.float16, torch.bfloat16)


def _same_nonfinite(got: Tensor, want: Tensor) -> Tensor:
    """Entries where both are the same infinity or both NaN (exactly right, no tolerance)."""
    return (got == want) | (torch.isnan(got) & torch.isnan(want))


def assert_values(
    got: Tensor, ref64: Tensor, ref_low: Tensor | None = None, *, scale: Tensor | None = None
) -> None:
    """STYLE.md §8 values rule, element-wise.

    float32/float64: ``|got - ref64| <= atol + rtol * (|ref64| + scale)`` (TOL table), i.e.
    torch.testing.assert_close's rule when ``scale`` is None. fp16/bf16: the error against the
    float64 reference is at most 3x the error of the reference run in that precision (``ref_low``)
    plus the TOL floor; where that run itself overflows (an infinity, or a NaN from one, where
    the float64 value is finite: a value or an intermediate past the dtype's range), ``got`` must
    be exactly that non-finite value, and the entry does not count in the 3x error.
    ``scale`` is, for an op that sums products, the same sum over absolute
    values: a sum that cancels to ~0 keeps the rounding error of its terms (the standard bound
    of a floating-point dot product), which the relative part must allow for; the low-precision
    floor then includes float32 accumulation, ``1e-5 * scale``.
    """
    assert got.shape == ref64.shape, (got.shape, ref64.shape)
    if got.numel() == 0:
        return
    g, r = got.double(), ref64.double()
    s = torch.zeros_like(r) if scale is None else scale.double().expand_as(r)
    exact = _same_nonfinite(g, r)
    err = torch.where(exact, 0.0, (g - r).abs())
    if got.dtype in LOW:
        assert ref_low is not None
        lo = ref_low.double()
        overflow = ~torch.isfinite(lo) & torch.isfinite(r)
        exact = exact | (overflow & _same_nonfinite(g, lo))
        err = torch.where(exact, 0.0, err)
        base = torch.where(_same_nonfinite(lo, r) | overflow, 0.0, (lo - r).abs()).max()
        bound = 3 * base + TOL[got.dtype]["atol"] + TOL[torch.float32]["rtol"] * s
    else:
        tol = TOL[got.dtype]
        bound = tol["atol"] + tol["rtol"] * (torch.where(exact, 0.0, r.abs()) + s)
    bad = ~(err <= bound)
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{int(bad.sum())} of {got.numel()} {got.dtype} values off; first at {i}: got "
            f"{g[i].item()!r}, float64 reference {r[i].item()!r}, bound {bound.expand_as(r)[i]!r}"
        )


def assert_index_equal(got: Tensor, want: Tensor, name: str) -> None:
    """Index outputs equal the reference's exactly: dtype, shape and every entry."""
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != reference {want.dtype}"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not torch.equal(got, want):
        i = tuple((got != want).nonzero()[0].tolist())
        raise AssertionError(
            f"{name}: differs from the reference first at {i}: {got[i]} != {want[i]}"
        )


def _bits(t: Tensor) -> Tensor:
    t = t.contiguous()
    if t.dtype == torch.bool or t.element_size() == 1:
        return t.view(torch.uint8)
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bitwise_equal(a, b) -> None:
    """Every tensor of two (nested) results is bitwise equal, with the same strides."""
    xs, _ = tree_flatten(a)
    ys, _ = tree_flatten(b)
    assert len(xs) == len(ys)
    for i, (x, y) in enumerate(zip(xs, ys)):
        if not isinstance(x, Tensor):
            assert x == y, f"output {i}: {x!r} != {y!r}"
            continue
        assert x.dtype == y.dtype and x.shape == y.shape and x.stride() == y.stride(), i
        assert torch.equal(_bits(x), _bits(y)), f"output {i} differs between two runs"


def assert_rerun_equal(fn: Callable[[], object], first: object) -> None:
    """A second run of ``fn`` is bitwise equal to ``first``."""
    assert_bitwise_equal(fn(), first)


def _significant_strides(t: Tensor) -> tuple[int, ...]:
    # A dimension of size <= 1 may have any stride (opcheck's rule); so may an empty tensor.
    if t.numel() == 0:
        return ()
    return tuple(s for s, n in zip(t.stride(), t.shape) if n > 1)


def assert_fake_matches(op, args: Sequence, kwargs: dict, real: object) -> None:
    """The op's fake kernel, run under FakeTensorMode on the same inputs, gives outputs of the
    real kernel's shapes, strides, dtypes and devices."""
    mode = FakeTensorMode()
    fake_args = tree_map_only(Tensor, mode.from_tensor, (tuple(args), dict(kwargs)))
    with mode:
        fake = op(*fake_args[0], **fake_args[1])
    fakes, _ = tree_flatten(fake)
    reals, _ = tree_flatten(real)
    assert len(fakes) == len(reals), f"{op}: fake gives {len(fakes)} outputs, real {len(reals)}"
    for i, (f, r) in enumerate(zip(fakes, reals)):
        what = f"{op} output {i}"
        assert tuple(f.shape) == tuple(r.shape), f"{what}: fake shape {f.shape} != {r.shape}"
        assert f.dtype == r.dtype, f"{what}: fake dtype {f.dtype} != {r.dtype}"
        assert f.device == r.device, f"{what}: fake device {f.device} != {r.device}"
        fs, rs = _significant_strides(f), _significant_strides(r)
        assert fs == rs, f"{what}: fake strides {f.stride()} != real {r.stride()}"


def grads(fn: Callable[..., Tensor], inputs: Sequence[Tensor], upstream: Tensor) -> list[Tensor]:
    """d <fn(*inputs), upstream> / d inputs, on fresh leaves (inputs keep their layout)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    if not out.requires_grad:  # e.g. the reference's zeros for T = 0: a zero gradient
        return [torch.zeros_like(t) for t in leaves]
    got = torch.autograd.grad(out, leaves, upstream, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, got)]


def abs_grads(fn: Callable[..., Tensor], inputs: Sequence[Tensor], upstream: Tensor):
    """The gradient magnitude scale of a (multi)linear ``fn``: its gradients at ``|inputs|`` for
    ``|upstream|``, i.e. each gradient's sum over absolute products (see assert_values)."""
    return grads(fn, [t.abs() for t in inputs], upstream.abs())


def assert_grads(
    op_fn: Callable[..., Tensor],
    ref_fn: Callable[..., Tensor],
    inputs: Sequence[Tensor],
    upstream: Tensor,
    *,
    multilinear: bool = False,
    scales: Sequence[Tensor | None] | None = None,
) -> None:
    """Gradients through the op's autograd (its *_backward op) match autograd through the
    reference run in float64, by assert_values' rule in the inputs' dtype (float64: equal up to
    the TOL table). ``multilinear``: ``ref_fn`` is linear in each input, so each gradient's
    magnitude scale is known (abs_grads) and the bound allows for cancellation; ``scales`` gives
    such scales explicitly for a nonlinear op."""
    mine = grads(op_fn, inputs, upstream)
    wide = [t.double() for t in inputs]
    theirs = grads(ref_fn, wide, upstream.double())
    if scales is None:
        scales = abs_grads(ref_fn, wide, upstream.double()) if multilinear else [None] * len(mine)
    for i, (m, t, s) in enumerate(zip(mine, theirs, scales)):
        assert m.dtype == inputs[i].dtype and m.shape == inputs[i].shape, f"grad {i}"
        assert_values(m, t, t.to(m.dtype), scale=s)
