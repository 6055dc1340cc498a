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


class _Net(torch.nn.Module):
    """Linear -> MoELayer (residual) -> Linear: replicated parameters around the experts."""

    def __init__(self, case) -> None:
        from tests.distributed.ep_cases import build

        super().__init__()
        torch.manual_seed(case.seed + 1)
        self.inp = torch.nn.Linear(case.d, case.d)
        self.out = torch.nn.Linear(case.d, case.d)
        self.moe = build(case)

    def forward(self, x):
        h = self.inp(x)
        y, _ = self.moe(h)
        return self.out(h + y)


def _fsdp_training(rank: int, world: int, steps: int = 20) -> dict:
    """A 2 x 2 (dp x ep) mesh: experts sharded over ep, FSDP2 over dp for the experts and over
    all ranks for the rest (torchtitan's layout, gradients summed: divide factor 1, each rank's
    loss already divided by the global token count); ``steps`` SGD steps against one process
    training on all ranks' tokens. Returns the largest parameter differences (rank 0)."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from smoe.parallel import shard_experts
    from tests.distributed.ep_cases import Case

    case = Case("fsdp", (6,) * world, E=4, k=2)
    net = _Net(case)
    reference = copy.deepcopy(net)
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "ep"))
    flat = init_device_mesh("cpu", (world,), mesh_dim_names=("all",))
    shard_experts(net, mesh, ep_dim="ep")
    fully_shard(net.moe.experts, mesh=mesh["dp"])
    fully_shard(net, mesh=flat)
    # FSDP2 averages gradients over each module's mesh (Gloo has no PREMUL_SUM, so no custom
    # divide factor): scaling each rank's loss by the world size makes the replicated gradients
    # the sum over all ranks; the experts' are averaged over dp only, so they are scaled back by
    # dp / world after the backward (with NCCL, set_gradient_divide_factor(1.0) does both)
    expert_params = list(net.moe.experts.parameters())
    dp = mesh["dp"].size()
    # SGD, not Adam: Adam's update does not see a constant factor on a gradient, SGD's does
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    n_total = sum(case.tokens)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        xs = [torch.randn(T, case.d, generator=g) for T in case.tokens]
        ts = [torch.randn(T, case.d, generator=g) for T in case.tokens]
        loss = ((net(xs[rank]) - ts[rank]) ** 2).sum() * world / n_total
        opt.zero_grad()
        loss.backward()
        for p in expert_params:
            p.grad.mul_(dp / world)
        opt.step()
        ref_loss = ((reference(torch.cat(xs)) - torch.cat(ts)) ** 2).sum() / n_total
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
    diffs = {}
    initial = {n: p.detach() for n, p in _Net(case).named_parameters()}
    for (name, p), (_, q) in zip(net.named_parameters(), reference.named_parameters()):
        # every parameter is a DTensor: FSDP2's over all ranks, or the experts' over (dp, ep)
        full = p.full_tensor()
        diffs[name] = dict(
            max_abs=float((full - q.detach()).abs().max()),
            scale=float(q.detach().abs().max()),
            moved=float((q.detach() - initial[name]).abs().max()),
        )
    return diffs


def _ddp_training(rank: int, world: int, steps: int = 20) -> dict:
    """DistributedDataParallel around an expert-parallel model (ep group = the world): DDP
    all-reduces the replicated parameters' gradients and ignores the expert shards, which no
    other rank holds (``_set_params_and_buffers_to_ignore_for_model``, the documented way to keep
    parameters out of DDP). ``steps`` SGD steps against one process on all ranks' tokens;
    returns the largest parameter differences (every rank's, gathered parameter by parameter)."""
    import copy

    from torch.nn.parallel import DistributedDataParallel as DDP

    from smoe.parallel import shard_experts
    from tests.distributed.ep_cases import Case

    case = Case("ddp", (6,) * world, E=2 * world, k=2)
    net = _Net(case)
    reference = copy.deepcopy(net)
    shard_experts(net)
    experts = {f"moe.experts.{n}" for n, _ in net.moe.experts.named_parameters()}
    DDP._set_params_and_buffers_to_ignore_for_model(net, list(experts))
    model = DDP(net)
    # SGD, not Adam: Adam's update does not see a constant factor on a gradient, SGD's does
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    n_total = sum(case.tokens)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        xs = [torch.randn(T, case.d, generator=g) for T in case.tokens]
        ts = [torch.randn(T, case.d, generator=g) for T in case.tokens]
        # DDP averages over ranks: scaling by the world makes the replicated gradients the sum
        # of the ranks' (the loss of all tokens); an expert's gradient already sums every rank's
        # rows (they came through the all-to-all), so the world factor is taken back off it
        loss = ((model(xs[rank]) - ts[rank]) ** 2).sum() * world / n_total
        opt.zero_grad()
        loss.backward()
        for p in net.moe.experts.parameters():
            p.grad.div_(world)
        opt.step()
        ref_loss = ((reference(torch.cat(xs)) - torch.cat(ts)) ** 2).sum() / n_total
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
    diffs = {}
    initial = {n: p.detach() for n, p in _Net(case).named_parameters()}
    for (name, p), (_, q) in zip(net.named_parameters(), reference.named_parameters()):
        full = p.full_tensor() if name in experts else p.detach()
        diffs[name] = dict(
            max_abs=float((full - q.detach()).abs().max()),
            scale=float(q.detach().abs().max()),
            moved=float((q.detach() - initial[name]).abs().max()),
        )
    return diffs


# routers with batch-statistic losses, and the options that make their routing deterministic
GLOBAL_ROUTERS: dict[str, dict] = {
    "topk": {},
    "vmoe": dict(noise_std=0.0, capacity_factor=None),  # importance over one routing group
    "xmoe": {},
    "xmoe_community": {},
    "stablemoe_community": {},
    "similarity_aware": {},
}


def _aux_losses(m, x: torch.Tensor, seq: int) -> tuple[dict, torch.Tensor]:
    """The layer's aux losses on ``x`` (as sequences of ``seq`` tokens), and the router
    gradient of their weighted sum, flattened."""
    _, aux = m(x.view(-1, seq, x.shape[-1]))
    params = list(m.router.parameters())
    grads = torch.autograd.grad(aux.loss(), params, allow_unused=True)
    g = torch.cat([(gp if gp is not None else torch.zeros_like(p)).reshape(-1)
                   for gp, p in zip(grads, params)])  # fmt: skip
    return {k: v.detach() for k, v in aux.losses.items()}, g


def _global_stats(rank: int, world: int) -> dict:
    """shard_experts(global_stats=True), per router of GLOBAL_ROUTERS: with equal tokens per rank,
    the mean over ranks of each auxiliary loss, and of the router gradient of the weighted sum,
    equal one process's on all tokens. For top-k also the default (per-rank) loss, which must
    differ."""
    import copy

    from smoe.parallel import shard_experts
    from tests.distributed.ep_cases import SEQ, Case, build, inputs

    out = {}
    for name, options in GLOBAL_ROUTERS.items():
        case = Case(f"global-{name}", (2 * SEQ,) * world, E=2 * world, k=2, router=name,
                    options=options, seq=SEQ)  # fmt: skip
        layer = build(case)
        reference = copy.deepcopy(layer)
        local = shard_experts(copy.deepcopy(layer))
        shard_experts(layer, global_stats=True)
        xs, _ = inputs(case)

        mine, g = _aux_losses(layer, xs[rank], SEQ)
        theirs, _ = _aux_losses(local, xs[rank], SEQ)
        want, g_want = _aux_losses(reference, torch.cat(xs), SEQ)
        names = sorted(want)
        both = torch.stack([mine[n] for n in names] + [theirs[n] for n in names]).double()
        dist.all_reduce(both)
        dist.all_reduce(g)
        out[name] = dict(
            names=names,
            global_mean=[float(v) / world for v in both[: len(names)]],
            local_mean=[float(v) / world for v in both[len(names) :]],
            want=[float(want[n]) for n in names],
            grad_err=float((g / world - g_want).abs().max()),
            grad_scale=float(g_want.abs().max()),
            stats_group_set=layer.router.stats_group is not None,
        )
    out["load_loss"] = _global_load_loss(rank, world)
    return out


def _global_load_loss(rank: int, world: int) -> dict:
    """V-MoE's load loss (noisy routing: the layers above cannot match one process's noise) on
    given clean and noisy logits: stats_group over the world against one process on all rows,
    the value and the gradient w.r.t. the clean logits (the mean over ranks)."""
    from smoe.losses import load_loss

    g = torch.Generator().manual_seed(3)
    T, E, k = 5, 2 * world, 2
    clean = torch.randn(world * T, E, generator=g, dtype=torch.float64)
    noisy = clean + torch.randn(world * T, E, generator=g, dtype=torch.float64) / E
    mine_in = clean[rank * T : (rank + 1) * T].clone().requires_grad_()
    mine = load_loss(mine_in, noisy[rank * T : (rank + 1) * T], k, 1 / E,
                     stats_group=dist.group.WORLD)  # fmt: skip
    (grad,) = torch.autograd.grad(mine, mine_in)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (float(mine), grad))
    full = clean.clone().requires_grad_()
    want = load_loss(full, noisy, k, 1 / E)
    (g_want,) = torch.autograd.grad(want, full)
    got = torch.cat([gr for _, gr in everyone]) / world
    return dict(
        values=[v for v, _ in everyone], want=float(want),
        grad_err=float((got - g_want).abs().max()), grad_scale=float(g_want.abs().max()),
    )  # fmt: skip


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
        dist.barrier()
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def worker(rank: int, world: int, rdv: str, out: str, only: str | None) -> None:
    from tests.distributed.ep_cases import cases, router_cases, run_case

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
            report["fsdp"] = _fsdp_training(rank, world)
        ddp: list = [None] * world
        dist.all_gather_object(ddp, _ddp_training(rank, world))
        report["ddp_by_rank"] = ddp
        report["global_stats"] = _global_stats(rank, world)  # identical on every rank
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
        dist.barrier()  # no rank tears its group down while another is still in a collective
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


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
