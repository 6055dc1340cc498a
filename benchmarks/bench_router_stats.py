"""The routers' auxiliary losses on ``smoe.ops.router_stats`` against the ATen compositions they
replaced (softmax, column sum, logsumexp: three passes each way), measured side by side in one
process.

    python benchmarks/bench_router_stats.py [--tokens 4096] [--dtype fp32 bf16] [--quick] [--out D]

For each of bench_layer.py's shapes (at ``--tokens`` tokens): (1) the Switch balance loss plus the
z-loss from ``logits [T, E]`` (smoe: one ``router_stats`` shared by both), forward and
forward+backward; (2) a whole ``TopKRouter`` forward
(gate, top-k, both losses) and its backward through the weights and both losses, once with
smoe's losses and once with the ATen compositions patched in. Ratios are ATen time / smoe time
(> 1: smoe ahead). Writes ``bench_router_stats.md`` and ``.json`` under ``--out`` (git-ignored by
default); never writes RESULTS.md.
"""

from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import torch
from bench_layer import SHAPES  # benchmarks/bench_layer.py
from common import bench_args, machine, measure, table, write_report
from tqdm import tqdm

import smoe.routing.topk as topk_module
from smoe import ops
from smoe.losses import router_z_loss, switch_balance_loss
from smoe.routing import TopKRouter

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def aten_balance(logits, expert, num_experts, *, first_choice_only=False, stats_group=None,
                 stats=None):  # fmt: skip
    """The Switch balance loss as smoe computed it before router_stats (softmax, column sum)."""
    T = logits.shape[0]
    probs = torch.softmax(logits.float(), dim=-1)
    chosen = (expert[:, :1] if first_choice_only else expert).reshape(-1)
    valid = (chosen >= 0).float()
    counts = probs.new_zeros(num_experts).scatter_add_(0, chosen.clamp_min(0).long(), valid)
    return num_experts * (counts / max(T, 1) * probs.sum(dim=0) / max(T, 1)).sum()


def aten_z(logits, *, stats=None):
    """The z-loss as smoe computed it before router_stats (logsumexp)."""
    lse = torch.logsumexp(logits.float(), dim=-1)
    return (lse * lse).sum() / max(logits.shape[0], 1)


@contextmanager
def aten_losses():
    """TopKRouter with the ATen compositions in place of its losses (and no router_stats)."""
    stats = mock.patch.object(topk_module.ops, "router_stats", lambda logits: None)
    with stats, mock.patch.object(topk_module, "switch_balance_loss", aten_balance), \
            mock.patch.object(topk_module, "router_z_loss", aten_z):  # fmt: skip
        yield


def time_row(shape: dict, dtype: torch.dtype, backward: bool, clock) -> dict[str, float]:
    """Milliseconds of the four contenders at one shape, dtype and mode."""
    T, E, k, d = shape["T"], shape["E"], shape["k"], shape["d"]
    logits = (torch.randn(T, E) * 2).to(dtype).requires_grad_(backward)
    expert = torch.topk(logits.detach().float(), k, dim=-1).indices.int()
    router = TopKRouter(d, E, k).to(dtype)
    x = torch.randn(T, d, dtype=dtype, requires_grad=backward)

    def losses_smoe():  # one router_stats for both losses, as TopKRouter computes them
        stats = ops.router_stats(logits)
        loss = switch_balance_loss(logits, expert, E, stats=stats) + router_z_loss(
            logits, stats=stats
        )
        if backward:
            loss.backward()

    def losses_aten():
        loss = aten_balance(logits, expert, E) + aten_z(logits)
        if backward:
            loss.backward()

    def route():
        r = router(x)
        if backward:
            (r.weight.float().sum() + r.aux["balance"] + r.aux["z"]).backward()

    ms = {
        "losses smoe": clock(losses_smoe),
        "losses aten": clock(losses_aten),
        "router smoe": clock(route),
    }
    with aten_losses():
        ms["router aten"] = clock(route)
    return {key: v * 1e3 for key, v in ms.items()}


def main(argv: list[str] | None = None) -> dict:
    args = bench_args(__doc__, DTYPES, tokens=4096, quick_tokens=64, argv=argv)

    def clock(fn) -> float:
        return measure(fn, min_run_time=args.min_run_time).median

    torch.manual_seed(0)
    rows = []
    jobs = [(s, d, b) for s in SHAPES for d in args.dtype for b in (False, True)]
    for shape_name, dname, backward in tqdm(jobs, desc="bench_router_stats"):
        shape = dict(SHAPES[shape_name], T=args.tokens)
        ms = time_row(shape, DTYPES[dname], backward, clock)
        rows.append(dict(shape=shape_name, dtype=dname, mode="fwd+bwd" if backward else "fwd",
                         T=shape["T"], E=shape["E"], ms=ms))  # fmt: skip

    head = ["shape", "dtype", "mode", "losses: aten ms", "smoe ms", "aten / smoe",
            "TopKRouter: aten ms", "smoe ms", "aten / smoe"]  # fmt: skip
    info = machine()

    def cells(r: dict) -> list[str]:
        ms = r["ms"]
        return [r["shape"], r["dtype"], r["mode"],
                f"{ms['losses aten']:.3f}", f"{ms['losses smoe']:.3f}",
                f"{ms['losses aten'] / ms['losses smoe']:.2f}x",
                f"{ms['router aten']:.3f}", f"{ms['router smoe']:.3f}",
                f"{ms['router aten'] / ms['router smoe']:.2f}x"]  # fmt: skip

    lines = [
        f"machine: {info}",
        f"tokens: {args.tokens}",
        "",
        *table(head, [cells(r) for r in rows]),
    ]
    data = dict(rows=rows, machine=info, tokens=args.tokens)
    write_report(args.out, "bench_router_stats", "\n".join(lines), data)
    return data


if __name__ == "__main__":
    main()
