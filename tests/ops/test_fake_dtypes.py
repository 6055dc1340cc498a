"""The fakes of the dispatch ops (make_plan, permute, combine, gather_mm and their backwards)
refuse a wrong dtype (make_plan: any bad argument) with the kernel's own message, so that
`torch.compile` fails while tracing rather than when the compiled graph first runs: each case is
called on CPU tensors (the kernel) and on meta tensors (the fake) and both must raise the same
first line."""

from __future__ import annotations

import pytest
import torch

from smoe import ops

T, d, E, k, N = 6, 4, 3, 2, 5


def _args(device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, d, generator=g)
    plan = ops.make_plan(torch.randint(0, E, (T, k), generator=g, dtype=torch.int32), E)
    M = plan.token.shape[0]
    args = dict(
        x=x,
        token=plan.token,
        slot=plan.slot,
        row=plan.row,
        offsets=plan.offsets,
        y=torch.randn(M, d, generator=g),
        weight=torch.rand(T, k, generator=g),
        grad_t=torch.randn(T, d, generator=g),
        grad_m=torch.randn(M, d, generator=g),
        w=torch.randn(E, d, N, generator=g),
        grad_n=torch.randn(M, N, generator=g),
    )
    return {name: t.to(device) for name, t in args.items()}


CALLS = {
    "permute": lambda a: torch.ops.smoe.permute(a["x"], a["token"], a["row"]),
    "permute_backward": lambda a: torch.ops.smoe.permute_backward(a["grad_m"], a["row"]),
    "combine": lambda a: torch.ops.smoe.combine(
        a["y"], a["weight"], a["token"], a["slot"], a["row"]
    ),
    "combine_backward": lambda a: torch.ops.smoe.combine_backward(
        a["grad_t"], a["y"], a["weight"], a["token"], a["slot"], a["row"]
    ),
    "gather_mm": lambda a: torch.ops.smoe.gather_mm(
        a["x"], a["token"], a["row"], a["w"], a["offsets"]
    ),
    "gather_mm_backward": lambda a: torch.ops.smoe.gather_mm_backward(
        a["grad_n"], a["x"], a["token"], a["row"], a["w"], a["offsets"], True, True
    ),
}
# (op, argument, the wrong dtype): every index tensor as int64 (offsets as int32), every float
# input the fakes check as an integer tensor
CASES = [
    ("permute", "x", torch.int32),
    ("permute", "token", torch.int64),
    ("permute", "row", torch.int64),
    ("permute_backward", "grad_m", torch.int64),
    ("permute_backward", "row", torch.int64),
    ("combine", "y", torch.int32),
    ("combine", "token", torch.int64),
    ("combine", "slot", torch.int64),
    ("combine", "row", torch.int64),
    ("combine_backward", "token", torch.int64),
    ("combine_backward", "slot", torch.int64),
    ("combine_backward", "row", torch.int64),
    ("gather_mm", "x", torch.int32),
    ("gather_mm", "token", torch.int64),
    ("gather_mm", "row", torch.int64),
    ("gather_mm", "offsets", torch.int32),
    ("gather_mm_backward", "token", torch.int64),
    ("gather_mm_backward", "row", torch.int64),
    ("gather_mm_backward", "offsets", torch.int32),
]


def _message(op: str, arg: str, dtype: torch.dtype, device: str) -> str:
    a = _args(device)
    a[arg] = a[arg].to(dtype)
    if op == "gather_mm" and arg == "x":
        a["w"] = a["w"].to(dtype)  # else the w-dtype check would speak first
    with pytest.raises(RuntimeError) as err:
        CALLS[op](a)
    return str(err.value).splitlines()[0]


@pytest.mark.parametrize("op,arg,dtype", CASES, ids=[f"{o}-{a}-{d}" for o, a, d in CASES])
def test_the_fake_refuses_a_wrong_dtype_as_the_kernel_does(op, arg, dtype):
    want = _message(op, arg, dtype, "cpu")
    assert want.startswith(f"smoe::{op}: ") and " must be " in want, want
    assert _message(op, arg, dtype, "meta") == want


def test_right_dtypes_pass_the_fakes():
    a = _args("meta")
    for op, call in CALLS.items():
        out = call(a)
        outs = out if isinstance(out, tuple) else (out,)
        assert all(t is None or t.device.type == "meta" for t in outs), op


_EXPERT = torch.tensor([[0, 1], [2, 0], [1, 1], [0, 2]], dtype=torch.int32)
# make_plan's fake makes every check of its kernel (csrc/checks.h check_make_plan), in its order:
# each case is (expert, num_experts, capacity, priority) as built on one device
PLAN_CASES = {
    "expert int64": lambda dev: (_EXPERT.long().to(dev), E, None, None),
    "expert float32": lambda dev: (_EXPERT.float().to(dev), E, None, None),
    "expert 1-D": lambda dev: (_EXPERT[:, 0].to(dev), E, None, None),
    "expert 3-D": lambda dev: (_EXPERT[None].to(dev), E, None, None),
    "num_experts 0": lambda dev: (_EXPERT.to(dev), 0, None, None),
    "num_experts 2^31": lambda dev: (_EXPERT.to(dev), 2**31, None, None),
    "capacity -1": lambda dev: (_EXPERT.to(dev), E, -1, None),
    "priority int32": lambda dev: (_EXPERT.to(dev), E, None, torch.ones(4, 2, device=dev).int()),
    "priority [4, 1]": lambda dev: (_EXPERT.to(dev), E, None, torch.ones(4, 1, device=dev)),
    "priority [3]": lambda dev: (_EXPERT.to(dev), E, None, torch.ones(3, device=dev)),
    "priority []": lambda dev: (_EXPERT.to(dev), E, None, torch.ones((), device=dev)),
}  # fmt: skip


def _plan_message(case: str, device: str) -> str:
    expert, num_experts, capacity, priority = PLAN_CASES[case](device)
    with pytest.raises(RuntimeError) as err:
        torch.ops.smoe.make_plan(expert, num_experts, capacity=capacity, priority=priority)
    return str(err.value).splitlines()[0]


@pytest.mark.parametrize("case", PLAN_CASES)
def test_the_make_plan_fake_refuses_as_the_kernel_does(case):
    want = _plan_message(case, "cpu")
    assert want.startswith("smoe::make_plan: ") and " must " in want, want
    assert _plan_message(case, "meta") == want


def test_the_make_plan_fake_takes_both_priority_shapes():
    for priority in (torch.ones(4, device="meta"), torch.ones(4, 2, device="meta")):
        offsets, token, slot, row, kept = torch.ops.smoe.make_plan(
            _EXPERT.to("meta"), E, capacity=1, priority=priority
        )
        assert offsets.shape == (E + 1,) and row.shape == kept.shape == (4, 2)
