"""Spawns ``--world`` Gloo ranks (file rendezvous) that run every case of ep_cases.py, plus the
error cases, and writes rank 0's report as JSON. Run by tests/distributed/test_expert_parallel.py
(which bounds it with a timeout and checks the exit code)."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.distributed.teardown import end_rank  # noqa: E402


def _errors(rank: int, world: int) -> dict[str, str]:
    """The setup errors, as each rank sees them."""
    from smoe import MoELayer
    from smoe.parallel import shard_experts

    out = {}
    torch.manual_seed(0)
    try:  # E not divisible by the ep size
        shard_experts(MoELayer(8, 8, world + 1, 1))
    except ValueError as e:
        out["indivisible"] = str(e)
    try:  # the ranks disagree on d_model
        shard_experts(MoELayer(8 + rank, 8, world, 1))
    except ValueError as e:
        out["disagree"] = str(e)
    try:  # global statistics for a router without the Switch balance loss
        shard_experts(MoELayer(8, 8, 2 * world, 1, router="expert_choice"), global_stats=True)
    except ValueError as e:
        out["global_stats"] = str(e)
    layer = shard_experts(MoELayer(8, 8, 2 * world, 1))
    try:  # offsets over the local experts instead of the global ones
        layer.experts(torch.zeros(3, 8), torch.tensor([0, 1, 3]))
    except ValueError as e:
        out["offsets"] = str(e)
    return out


def _compiled(rank: int, world: int) -> dict:
    """The sharded layer under torch.compile(backend="aot_eager") against eager, on this rank's
    tokens (forward and input gradient), and dynamo's graph-break count for one call."""
    import torch._dynamo

    from smoe.parallel import shard_experts
    from tests.distributed.ep_cases import Case, build, inputs, run_one

    case = Case("compiled", (9, 4, 0, 6)[:world] if world == 4 else (9, 4), E=2 * world, k=2)
    layer = shard_experts(build(case))
    xs, cots = inputs(case)
    eager = run_one(layer, xs[rank], cots[rank])
    layer.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager")
    x = xs[rank].clone().requires_grad_()
    y, _ = compiled(x)
    (y.float() * cots[rank].float()).sum().backward()
    explained = torch._dynamo.explain(layer)(xs[rank])
    return dict(
        y_equal=bool(torch.equal(y.detach(), eager["y"])),
        dx_equal=bool(torch.equal(x.grad, eager["dx"])),
        graph_breaks=explained.graph_break_count,
        break_reasons=sorted(
            {str(b.reason).splitlines()[0][:160] for b in explained.break_reasons}
        ),
    )


def checkpoint_case(world: int, seed: int = 0):
    from tests.distributed.ep_cases import Case

    return Case("dcp", (5,) * world, E=2 * world, k=2, bias=True, seed=seed)


def _checkpoint(rank: int, world: int, tmp: Path) -> dict:
    """torch.distributed.checkpoint of a sharded layer: its state_dict keys and global shapes are
    the unsharded layer's; it saves to ``tmp/ep_ckpt`` (the test loads that in one process) and
    loads ``tmp/plain_ckpt`` (saved by the test from one process, seed 5) into its shards."""
    import torch.distributed.checkpoint as dcp

    from smoe.parallel import shard_experts
    from tests.distributed.ep_cases import build

    plain = build(checkpoint_case(world)).state_dict()
    layer = shard_experts(build(checkpoint_case(world)))
    sd = layer.state_dict()
    shapes_equal = {k: list(v.shape) == list(plain[k].shape) for k, v in sd.items()}
    dcp.save(sd, checkpoint_id=str(tmp / "ep_ckpt"))
    back = shard_experts(build(checkpoint_case(world, seed=9)))
    target = back.state_dict()
    dcp.load(target, checkpoint_id=str(tmp / "plain_ckpt"))
    back.load_state_dict(target)
    want = build(checkpoint_case(world, seed=5)).state_dict()
    loaded = {}
    for k, v in back.state_dict().items():
        full = v.full_tensor() if hasattr(v, "full_tensor") else v
        loaded[k] = bool(torch.equal(full, want[k]))
    return dict(keys=sorted(sd), plain_keys=sorted(plain), shapes_equal=shapes_equal, loaded=loaded)


def gpu_worker(rank: int, world: int, rdv: str, out: str, backend: str) -> None:
    """The dispatch cases and the registry sweep with CUDA tensors: over Gloo (host-staged) every
    rank on GPU 0, over NCCL rank r on GPU r. Writes rank 0's report."""
    import dataclasses

    from tests.distributed.ep_cases import cases, router_cases, run_case

    torch.set_num_threads(1)
    torch.cuda.set_device(rank if backend == "nccl" else 0)
    dist.init_process_group(backend, init_method=f"file://{rdv}", rank=rank, world_size=world)
    try:
        report: dict = {"cases": {}, "backend": backend}
        for case in cases(world) + router_cases(world):
            result = run_case(dataclasses.replace(case, device="cuda"), rank, world)
            if rank == 0:
                report["cases"][case.name] = result
        if rank == 0:
            Path(out).write_text(json.dumps(report, indent=1))
    except Exception:
        traceback.print_exc()
        dist.destroy_process_group()
        raise
    end_rank()


def worker(rank: int, world: int, rdv: str, out: str, only: str | None) -> None:
    from tests.distributed.ep_cases import cases, router_cases, run_case
    from tests.distributed.ep_stats import global_stats
    from tests.distributed.ep_training import ddp_training, fsdp_training

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    try:
        report: dict = {"cases": {}, "errors": _errors(rank, world)}
        errors = [None] * world
        dist.all_gather_object(errors, report["errors"])
        report["errors_by_rank"] = errors
        compiled = [None] * world
        dist.all_gather_object(compiled, _compiled(rank, world))
        report["compiled_by_rank"] = compiled
        if world == 4:
            report["fsdp"] = fsdp_training(rank, world)
        ddp: list = [None] * world
        dist.all_gather_object(ddp, ddp_training(rank, world))
        report["ddp_by_rank"] = ddp
        report["global_stats"] = global_stats(rank, world)  # identical on every rank
        ckpt = [None] * world
        dist.all_gather_object(ckpt, _checkpoint(rank, world, Path(rdv).parent))
        report["checkpoint_by_rank"] = ckpt
        for case in cases(world) + router_cases(world):
            if only and only not in case.name:
                continue
            result = run_case(case, rank, world)
            if rank == 0:
                report["cases"][case.name] = result
        if rank == 0:
            Path(out).write_text(json.dumps(report, indent=1))
    except Exception:
        traceback.print_exc()
        dist.destroy_process_group()
        raise
    end_rank()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--tmp", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("-k", dest="only", default=None)
    p.add_argument("--cuda", choices=["gloo", "nccl"], default=None,
                   help="the dispatch cases with CUDA tensors over this backend")  # fmt: skip
    a = p.parse_args()
    rdv = str(Path(a.tmp) / "rendezvous")
    if a.cuda:
        mp.spawn(gpu_worker, args=(a.world, rdv, a.out, a.cuda), nprocs=a.world, join=True)
    else:
        mp.spawn(worker, args=(a.world, rdv, a.out, a.only), nprocs=a.world, join=True)


if __name__ == "__main__":
    main()
