"""smoe's CPU output cache (csrc/cpu/workspace.h): outputs of 4 MiB or more of smoe's CPU ops
come from freed blocks of earlier calls (the same pages, no fresh page faults), smaller ones do
not; blocks in use are never handed out twice; the cap (SMOE_CPU_CACHE_MB, read once per process:
those cases run in a subprocess), release, the report, what the memory profiler sees, and the bad
setting."""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys

import pytest
import torch

import smoe
from smoe import MoELayer, ops

ROWS, D = 20000, 512  # float32 [20000, 512]: 41 MB, past the 4 MiB threshold


def _empty_cache() -> None:
    """No cached block left, and none held by a reference cycle of an earlier test that the
    collector could free in the middle of this one."""
    gc.collect()
    smoe.release_cpu_cache()


def _case(rows=ROWS, d=D):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d, generator=g)
    expert = torch.randint(0, 8, (rows, 1), generator=g, dtype=torch.int32)
    return x, ops.make_plan(expert, 8)


def test_a_freed_large_output_is_reused_with_its_pages():
    x, plan = _case()
    _empty_cache()
    want = x[plan.token.long()]
    a = ops.permute(x, plan)
    ptr = a.data_ptr()
    assert torch.equal(a, want)
    del a
    assert smoe.cpu_cache_info()["cached_bytes"] == ROWS * D * 4
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    b = ops.permute(x, plan)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert b.data_ptr() == ptr and torch.equal(b, want)
    assert faults < ROWS * D * 4 // 4096 // 10  # a fresh block would fault in ~10,000 pages
    assert smoe.cpu_cache_info()["cached_bytes"] == 0


def test_blocks_in_use_are_never_shared_and_small_outputs_bypass_the_cache():
    x, plan = _case()
    _empty_cache()
    a, b = ops.permute(x, plan), ops.permute(x * 2, plan)
    assert a.data_ptr() != b.data_ptr()
    assert torch.equal(b, 2 * a)
    small = ops.permute(x[:100], ops.make_plan(plan.token[:100, None].remainder(8).int(), 8))
    del small
    assert smoe.cpu_cache_info()["cached_bytes"] == 0
    del a, b
    assert smoe.cpu_cache_info()["cached_bytes"] == 2 * ROWS * D * 4
    assert smoe.release_cpu_cache() == 2 * ROWS * D * 4
    assert smoe.cpu_cache_info()["cached_bytes"] == 0


def _profiled_bytes(fn) -> tuple[int, int]:
    """(peak, net) bytes of the CPU memory events torch's profiler records during fn()."""
    import itertools

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = [
        e.nbytes()
        for e in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns())
        if e.name() == "[memory]"
    ]
    return max(itertools.accumulate(sizes, initial=0)), sum(sizes)


def test_cached_outputs_are_reported_to_the_memory_profiler():
    """A cached block counts as a tensor's memory while the tensor lives, and a fresh and a reused
    block alike: profile_memory (and the benchmarks' peak memory) see smoe's large outputs."""
    x, plan = _case()
    _empty_cache()
    size = ROWS * D * 4

    def two_live_then_one():
        a = ops.permute(x, plan)  # a fresh block
        b = ops.permute(x, plan)
        del a
        c = ops.permute(x, plan)  # a's block, reused
        del b, c

    peak, net = _profiled_bytes(two_live_then_one)
    assert peak == 2 * size and net == 0
    assert smoe.cpu_cache_info()["cached_bytes"] == 2 * size  # held, but no tensor's


@pytest.mark.parametrize("op", ["expert_mlp", "gather_mm", "gather_mm_weight_grad"])
def test_every_threads_scratch_is_reported_to_the_memory_profiler(op):
    """The per-worker scratch of expert_mlp, gather_mm and gather_mm's weight gradient (gathered
    rows; expert_mlp's hidden too) is made on the calling thread (gemm_glue.h's
    for_each_block_with), where the profiler sees it: each thread that runs adds one."""
    g = torch.Generator().manual_seed(0)
    T, d, f = 2048, 256, 512
    E = 64 if op == "gather_mm_weight_grad" else 8  # many experts: the per-expert gather path
    x = torch.randn(T, d, generator=g)
    plan = ops.make_plan(torch.randint(0, E, (T, 2), generator=g, dtype=torch.int32), E)
    w_in, w_out = torch.randn(E, d, 2 * f, generator=g), torch.randn(E, f, d, generator=g)
    if op == "expert_mlp":
        fn = lambda: ops.expert_mlp(x, plan.offsets, w_in, w_out, plan=plan, fused=True)  # noqa: E731
    elif op == "gather_mm":
        fn = lambda: ops.gather_mm(x, plan, w_in)  # noqa: E731
    else:  # one output column block (d_out = 128), so each expert is one item
        w, grad = torch.randn(E, d, 128, generator=g), torch.randn(2 * T, 128, generator=g)
        fn = lambda: torch.ops.smoe.gather_mm_backward(  # noqa: E731
            grad, x, plan.token, plan.row, w, plan.offsets, False, True
        )
    threads = torch.get_num_threads()
    peaks = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            fn()
            _empty_cache()
            peaks.append(_profiled_bytes(fn)[0])
    finally:
        torch.set_num_threads(threads)
    elems = {
        "expert_mlp": 2 * T * d,
        "gather_mm": 2 * T * 2 * f,
        "gather_mm_weight_grad": E * d * 128,
    }
    out = 4 * elems[op]
    assert peaks[0] > out  # the output and one thread's scratch
    assert peaks[1] - peaks[0] == peaks[0] - out  # and one more


def test_a_block_handed_out_before_profiling_is_not_reported_when_freed():
    """The profiler hears of a return only where it heard of the hand-out: an output made before
    profile_memory began, freed inside it, must not drive the count below zero (which would hide
    the peak of what follows)."""
    x, plan = _case()
    _empty_cache()
    size = ROWS * D * 4
    held = [ops.permute(x, plan)]

    def free_then_make():
        held.pop()
        ops.permute(x, plan)  # the freed block, reused and dropped

    peak, net = _profiled_bytes(free_then_make)
    assert peak == size and net == 0


def test_training_steps_through_cached_blocks_repeat_bitwise():
    # x_sorted [16384, 512], the hidden [16384, 1024] and their gradients all pass 4 MiB
    torch.manual_seed(0)
    layer = MoELayer(D, 512, 8, 2, activation="swiglu")
    x = torch.randn(8192, D)
    _empty_cache()
    runs = []
    for _ in range(2):
        layer.zero_grad(set_to_none=True)
        xs = x.clone().requires_grad_()
        y, aux = layer(xs)
        (y.square().mean() + aux.loss()).backward()
        runs.append([y.detach(), xs.grad, *(p.grad for p in layer.parameters())])
        del y, aux, xs
        assert smoe.cpu_cache_info()["cached_bytes"] > 0  # the step's intermediates, freed
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


PROBE = """
import json, torch, smoe
from smoe import ops
x = torch.randn(20000, 512)
plan = ops.make_plan(torch.randint(0, 8, (20000, 1), dtype=torch.int32), 8)
a, b = ops.permute(x, plan), ops.permute(x, plan)
del a, b
print(json.dumps(dict(smoe.cpu_cache_info(), info=[l for l in smoe.info().splitlines()
                                                    if l.startswith("CPU output cache")])))
"""


def _probe(value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SMOE_CPU_CACHE_MB=value)
    return subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("mb,held", [("0", 0), ("50", 1), ("100", 2)])
def test_the_cap_bounds_what_is_held(mb, held):
    out = _probe(mb)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["cap_bytes"] == int(mb) << 20
    assert res["cached_bytes"] == held * 20000 * 512 * 4
    held_mb = res["cached_bytes"] >> 20
    on = f"CPU output cache: {held_mb} MB held, cap {mb} MB (SMOE_CPU_CACHE_MB)"
    assert res["info"] == ["CPU output cache: off (SMOE_CPU_CACHE_MB=0)" if mb == "0" else on]


def test_a_bad_setting_is_refused_by_name():
    message = "SMOE_CPU_CACHE_MB must be a whole number of MB, got 'lots'"
    out = _probe("lots")  # an op's large output: the dispatcher's RuntimeError
    assert out.returncode == 1 and message in out.stderr
    env = dict(os.environ, SMOE_CPU_CACHE_MB="lots")
    info = subprocess.run(  # the report: a RuntimeError too, never an abort
        [sys.executable, "-c", "import smoe; smoe.info()"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert info.returncode == 1 and "RuntimeError" in info.stderr and message in info.stderr
