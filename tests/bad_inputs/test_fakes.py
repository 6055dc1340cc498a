"""The fakes refuse what the kernels refuse, so that `torch.compile` fails while tracing a bad call,
with the kernel's error, instead of tracing it and failing when the compiled graph first runs (or
failing inside a fake with an IndexError).

Every op row of the bad-input matrix whose bad input is metadata (a dtype, a rank, a size, a
configuration value, a T*k past int32, ...) is called on CPU tensors (the kernel) and on meta
tensors (the fake), in this process. On meta it must meet the row's expectation, as on the CPU,
and since each fake runs its kernel's checks from a Python mirror (smoe/ops/_checks*.py), raise
the kernel's own first line, devices aside. Rows whose bad input is a value (expert ids, NaN,
offsets' entries) are the kernels' alone: a fake has no values. And end to end: one bad call per
op under ``torch.compile(fullgraph=True)`` fails while dynamo traces it, with the kernel's message.
"""

from __future__ import annotations

import re
from collections import defaultdict

import pytest
import torch

from tests.bad_inputs.cases import Case, Dev, all_cases, smoe_ops

VALUE_KINDS = {"ids", "nan", "offsets"}
NOT_META = {"device", "meta", "sparse"}  # rows about devices: on meta they test nothing new


def _rows() -> dict[str, list[Case]]:
    by_op = defaultdict(list)
    for c in all_cases():
        if (
            c.target.startswith("smoe::")
            and "cpu" in c.devices
            and c.expect.exc is not None
            and c.kind not in VALUE_KINDS | NOT_META
        ):
            by_op[c.target].append(c)
    return dict(by_op)


ROWS = _rows()


def _first_line(case: Case, device: str) -> tuple[BaseException | None, str]:
    try:
        case.fn(Dev(device))
    except Exception as e:  # noqa: BLE001 - the row says which exception is right
        return e, (str(e).splitlines() or [""])[0]
    return None, ""


def test_the_table_reaches_every_op():
    assert sorted(op.removeprefix("smoe::") for op in ROWS) == smoe_ops()
    assert sum(map(len, ROWS.values())) > 500


@pytest.mark.parametrize("op", sorted(ROWS))
def test_the_fake_refuses_what_the_kernel_refuses(op):
    off = []
    for case in ROWS[op]:
        err, line = _first_line(case, "meta")
        if err is None:
            off.append(f"{case.name}: the fake accepted it")
        elif not (isinstance(err, case.expect.exc) and re.search(case.expect.pattern, str(err))):
            off.append(f"{case.name}: {type(err).__name__}: {line}")
        else:
            _, want = _first_line(case, "cpu")
            if re.sub(r"\bmeta\b", "cpu", line) != want:
                off.append(f"{case.name}:\n  kernel: {want}\n  fake:   {line}")
    assert not off, f"{len(off)} of {len(ROWS[op])} rows:\n" + "\n".join(off)


@pytest.mark.parametrize("op", sorted(ROWS))
def test_torch_compile_refuses_a_bad_call_while_tracing(op):
    # one row per op (a wrong dtype where it has one): under torch.compile the call fails while
    # dynamo runs the fake (TorchRuntimeError, before any kernel), with the kernel's message
    case = next((c for c in ROWS[op] if c.kind == "dtype"), ROWS[op][0])
    _, want = _first_line(case, "cpu")
    torch._dynamo.reset()
    compiled = torch.compile(lambda: case.fn(Dev("cpu")), fullgraph=True, backend="eager")
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError) as err:
        compiled()
    assert want in str(err.value)
