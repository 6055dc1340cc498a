"""How the benchmarks measure (common.py, layer_metrics.py, bench_layer.py): the layer's stage
shares, training steps and their peak memory start from no gradients, and a row's contenders are
timed interleaved. Nothing here is a timing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from smoe import MoELayer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.parametrize("T,fused", [(16, False), (3000, True)])
def test_stage_times_count_no_permute_where_the_forward_fuses(T, fused):
    # A forward without gradients past the fusion rule runs one expert_mlp that gathers its own
    # rows: the time shares then have no permute stage. Small calls and fwd+bwd keep it.
    from layer_metrics import stage_times

    layer = MoELayer(64, 256, num_experts=4, k=2, activation="swiglu")
    x = torch.randn(T, 64)

    def clock(fn):
        fn()
        return type("Stat", (), {"median": 1.0})()

    fwd = stage_times(layer, x, False, clock=clock)
    assert (fwd["permute"] == 0.0) == fused and fwd["experts"] == 1.0
    assert stage_times(layer, x, True, clock=clock)["permute"] == 1.0


def test_timed_training_steps_start_from_no_gradients():
    # A timed forward+backward is one training step after optimizer.zero_grad(): calling it twice
    # leaves the gradients of one call, not their sum (an add_ over every weight gradient that no
    # training step pays and the dense limit never pays).
    from bench_layer import run_layer

    torch.manual_seed(0)
    layer = MoELayer(32, 48, num_experts=4, k=2, activation="swiglu")
    x = torch.randn(64, 32, requires_grad=True)
    step = run_layer(layer, x, True)
    step()
    once = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]
    step()
    twice = [p.grad for p in layer.parameters()] + [x.grad]
    for a, b in zip(once, twice, strict=True):
        torch.testing.assert_close(b, a)

    # a function's step drops the gradients of the parameters it is given
    lin = torch.nn.Linear(32, 8)
    step = run_layer(lambda z: lin(z), x, True, params=lin)
    step()
    first = lin.weight.grad.clone()
    step()
    torch.testing.assert_close(lin.weight.grad, first)


def test_stage_times_start_each_stage_from_no_gradients():
    # Each stage's timed call drops the gradients the call before left: two calls of a stage
    # leave one call's gradients on every parameter they reach.
    from layer_metrics import stage_times

    layer = MoELayer(32, 48, num_experts=4, k=2, activation="swiglu")
    x = torch.randn(64, 32)
    params = dict(layer.named_parameters())
    checked: set[str] = set()

    def clock(fn):
        fn()
        first = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
        fn()
        for n, g in first.items():
            torch.testing.assert_close(params[n].grad, g, msg=n)
        checked.update(first)
        return type("Stat", (), {"median": 1.0})()

    stage_times(layer, x, True, clock=clock)
    assert checked == set(params)  # the route and experts stages reach every parameter


def test_probed_step_peak_counts_the_gradients_a_step_holds():
    # The suite's peak memory of a training step: it starts from no gradients (those of the call
    # before dropped, not accumulated into) and holds its new ones to the end, so they count.
    from bench_layer import probe_step
    from common import peak_bytes

    lin = torch.nn.Linear(1024, 1024, bias=False)  # a 4 MiB weight, so a 4 MiB gradient
    x = torch.randn(4, 1024, requires_grad=True)
    lin(x).sum().backward()  # gradients from an earlier step
    one_step = lin.weight.grad.clone()
    assert peak_bytes(probe_step(lin, x, True)) >= 1024 * 1024 * 4
    torch.testing.assert_close(lin.weight.grad, one_step)  # kept, and not added to the last


def test_contenders_of_a_row_are_timed_interleaved():
    # One block of each contender per round, so that a drift of the machine touches all alike; a
    # contender that fails gets its error and leaves the rounds, the others go on.
    from common import measure, measure_many

    calls: list[str] = []

    def contender(name: str):
        return lambda: calls.append(name)

    def broken():
        calls.append("broken")
        if calls.count("broken") > 1:
            raise RuntimeError("out of memory")

    out = measure_many(
        {"a": contender("a"), "b": contender("b"), "broken": broken},
        min_run_time=0.0,
        min_samples=4,
        block_s=0.0,
    )
    assert out["a"].n == out["b"].n == 4
    assert isinstance(out["broken"], RuntimeError)
    # warm-up calls first, then rounds: a and b alternate (broken left in the first round)
    assert calls[:3] == ["a", "b", "broken"]
    assert calls[3:] == ["a", "b", "broken"] + ["a", "b"] * 3
    with pytest.raises(RuntimeError, match="out of memory"):
        measure(lambda: broken(), min_run_time=0.0)
