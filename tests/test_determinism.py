"""Determinism: every smoe op (forward and backward ops) and MoELayer with every registered router.

On CPU the results are bitwise equal across reruns, under ``torch.use_deterministic_algorithms``
(which also fills fresh outputs with NaN, so an element an op forgets to write shows up), across
``torch.set_num_threads(1/2/4)`` and across processes (a child process at the same and at another
thread count). One exception, torch's and not ours: the router's weight gradient (nn.Linear's
backward, a sum over tokens in MKL's multi-threaded GEMM) follows the thread count unless MKL runs
in strict reproducibility mode (``MKL_CBWR=AUTO,STRICT``), with which the whole layer is bitwise
equal across thread counts too; XMoERouter has no nn.Linear (its gradients come from
cosine_scores_backward), so its layers are bitwise equal across thread counts without it. On CUDA
the results are bitwise equal across reruns and under ``torch.use_deterministic_algorithms(True)``,
which none of them refuses: no smoe kernel uses floating-point atomics (a router that runs torch's
scaled_dot_product_attention, whose memory-efficient backward does, is compared in that mode).
The cases live in tests/determinism_cases.py (shared with the children).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from smoe.routing import XMoERouter
from smoe.routing.registry import available_routers, router_info
from tests.determinism_cases import OP_CASES, Results, all_cases, layer_case

ROOT = Path(__file__).resolve().parents[1]
ROUTERS = sorted(available_routers())
THREADS = (1, 2, 4)
# Results that come from torch's own multi-threaded GEMM over tokens (nn.Linear's weight gradient).
ATEN_THREADED = ("grad_router.",)
# Routers whose weight gradients come from smoe's own ops (XMoERouter: cosine_scores_backward sums
# over tokens in a fixed order), so that they are bitwise equal across thread counts too.
SMOE_GRAD_ROUTERS = {r for r in ROUTERS if router_info(r).factory is XMoERouter}
_INT_OF_SIZE = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _bits(t: Tensor) -> Tensor:
    """t reinterpreted as integers, so that equality is bitwise (NaN == NaN, -0.0 != 0.0)."""
    t = t.detach().cpu()
    if t.dtype == torch.bool or t.is_floating_point():
        return t.view(_INT_OF_SIZE[t.element_size()])
    return t


def assert_bitwise_equal(
    actual: Results, expected: Results, where: str, close_only: tuple[str, ...] = ()
) -> None:
    """Every result bitwise equal, except that names starting with close_only need only be close."""
    assert actual.keys() == expected.keys(), where
    for name, e in expected.items():
        a = actual[name]
        assert (a.dtype, a.shape) == (e.dtype, e.shape), f"{where}: {name}"
        if name.startswith(close_only):
            torch.testing.assert_close(a, e, msg=lambda m, name=name: f"{where}: {name}: {m}")
            continue
        differ = _bits(a) != _bits(e)
        if differ.any():
            pytest.fail(f"{where}: {name} differs in {int(differ.sum())} of {e.numel()} elements")


@pytest.fixture
def restore_threads():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield threads
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(scope="module")
def expected() -> dict[str, Results]:
    """Every case run once in this process, at its default thread count."""
    return all_cases()


def _check_cpu(
    run: Callable[[], Results], expected: Results, where: str, close_only: tuple[str, ...] = ()
) -> None:
    threads = torch.get_num_threads()
    assert_bitwise_equal(run(), expected, f"{where} rerun")
    torch.use_deterministic_algorithms(True)
    assert_bitwise_equal(run(), expected, f"{where} under use_deterministic_algorithms")
    torch.use_deterministic_algorithms(False)
    for n in (n for n in THREADS if n != threads):  # the rerun covers `threads`
        torch.set_num_threads(n)
        where_n = f"{where} at {n} threads (expected at {threads})"
        assert_bitwise_equal(run(), expected, where_n, close_only)
    torch.set_num_threads(threads)


def _close_only(case: str) -> tuple[str, ...]:
    """What of a case's results need only be close across thread counts."""
    router = case.removeprefix("layer:") if case.startswith("layer:") else None
    return ATEN_THREADED if router is not None and router not in SMOE_GRAD_ROUTERS else ()


def _child(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    """Runs tests/determinism_cases.py in a fresh process; returns what it saved."""
    out = tmp_path / "child.pt"
    cmd = [sys.executable, "-m", "tests.determinism_cases", str(out), *args]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=300, env=env)
    return torch.load(out)


# ---- the gate: every registered op has a case --------------------------------------------------
def test_every_smoe_op_has_a_determinism_case():
    ops = {
        name.split("::", 1)[1].split(".")[0]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("smoe::")
    }
    assert "grouped_mm" in ops  # the registry was read
    missing, stale = sorted(ops - OP_CASES.keys()), sorted(OP_CASES.keys() - ops)
    assert not missing, f"smoe ops without a case in tests/determinism_cases.py: {missing}"
    assert not stale, f"cases for ops that are not registered: {stale}"


# ---- CPU -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", sorted(OP_CASES))
def test_op_is_bitwise_deterministic_across_reruns_and_threads(op, expected, restore_threads):
    _check_cpu(lambda: OP_CASES[op]("cpu"), expected[f"op:{op}"], op)


@pytest.mark.parametrize("router", ROUTERS)
def test_layer_is_bitwise_deterministic_across_reruns_and_threads(
    router, expected, restore_threads
):
    run = lambda: layer_case(router, "cpu")  # noqa: E731
    case = f"layer:{router}"
    _check_cpu(run, expected[case], f"MoELayer({router!r})", _close_only(case))


def test_ops_and_layers_are_bitwise_equal_across_processes(tmp_path, expected, restore_threads):
    threads = restore_threads
    child = _child(tmp_path, str(threads), str(threads + 1))
    assert {f"layer:{r}" for r in ROUTERS} <= expected.keys()
    for n, results in child.items():
        assert results.keys() == expected.keys()
        for case in expected:
            where = f"{case}: child process at {n} threads vs this one at {threads}"
            close_only = _close_only(case) if n != threads else ()
            assert_bitwise_equal(results[case], expected[case], where, close_only)


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch is not built with MKL")
def test_layer_is_bitwise_equal_across_threads_with_strict_mkl(tmp_path):
    env = {**os.environ, "MKL_CBWR": "AUTO,STRICT"}
    child = _child(tmp_path, *map(str, THREADS), "--layers-only", env=env)
    first, *rest = THREADS
    for n in rest:
        for case, results in child[first].items():
            where = f"{case} under MKL_CBWR=AUTO,STRICT: {n} threads vs {first}"
            assert_bitwise_equal(child[n][case], results, where)


@pytest.mark.parametrize("op", ["topk_softmax", "topk_sigmoid", "expert_choice", "unified_topk"])
def test_router_error_names_the_first_bad_row_at_any_thread_count(op, restore_threads):
    logits = torch.randn(5000, 8)
    logits[[100, 2600, 4900], 3] = float("nan")  # in different chunks of the row loop
    call = {
        "topk_softmax": lambda: torch.ops.smoe.topk_softmax.default(logits, 2),
        "topk_sigmoid": lambda: torch.ops.smoe.topk_sigmoid.default(
            logits, 2, n_group=4, topk_group=2
        ),
        "expert_choice": lambda: torch.ops.smoe.expert_choice.default(logits, 1000),
        "unified_topk": lambda: torch.ops.smoe.unified_topk.default(logits, 2),  # rows = groups
    }[op]
    where = r"in group 100\b" if op == "unified_topk" else r"in row 100\b"
    for n in THREADS:
        torch.set_num_threads(n)
        with pytest.raises(RuntimeError, match=where):
            call()


# ---- CUDA ----------------------------------------------------------------------------------------
@pytest.fixture
def cuda_deterministic_mode(monkeypatch, restore_threads):
    """Turns deterministic mode on when called; cuBLAS (the routers' Linear) needs this config."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return lambda: torch.use_deterministic_algorithms(True)


def _check_cuda(run: Callable[[], Results], where: str, deterministic_mode) -> None:
    expected = run()
    assert_bitwise_equal(run(), expected, f"{where} rerun on CUDA")
    deterministic_mode()
    assert_bitwise_equal(run(), expected, f"{where} under use_deterministic_algorithms on CUDA")


@pytest.mark.cuda
@pytest.mark.parametrize("op", sorted(OP_CASES))
def test_op_cuda_is_bitwise_deterministic(op, cuda_deterministic_mode):
    _check_cuda(lambda: OP_CASES[op]("cuda"), op, cuda_deterministic_mode)


def runs_attention(router: str) -> bool:
    """Whether the layer case of ``router`` calls scaled_dot_product_attention (the fused graph
    routers), seen on CPU by a dispatch mode."""
    seen: set[str] = set()

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func.name())
            return func(*args, **(kwargs or {}))

    with Spy():
        layer_case(router, "cpu")
    return any("scaled_dot_product" in name for name in seen)


@pytest.mark.cuda
@pytest.mark.parametrize("router", ROUTERS)
def test_layer_cuda_is_bitwise_deterministic(router, cuda_deterministic_mode):
    if runs_attention(router):
        # torch's memory-efficient attention backward adds with atomics unless deterministic mode
        # is on (torch's kernel, not smoe's): such a layer's reruns are compared in that mode
        cuda_deterministic_mode()
    _check_cuda(
        lambda: layer_case(router, "cuda"), f"MoELayer({router!r})", cuda_deterministic_mode
    )
