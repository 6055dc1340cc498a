"""Training composition cases run on every rank by tests/distributed/ep_worker.py: FSDP2 on a
dp x ep mesh and DDP around an expert-parallel model, each against one process training on all
ranks' tokens (SGD steps: Adam's update would hide a constant factor on a gradient)."""

from __future__ import annotations

import torch


class Net(torch.nn.Module):
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


def fsdp_training(rank: int, world: int, steps: int = 20) -> dict:
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
    net = Net(case)
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
    dp = mesh["dp"].size()
    return train_like_one_process(net, net, reference, case, rank, world, steps, dp / world)


def ddp_training(rank: int, world: int, steps: int = 20) -> dict:
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
    net = Net(case)
    reference = copy.deepcopy(net)
    shard_experts(net)
    experts = {f"moe.experts.{n}" for n, _ in net.moe.experts.named_parameters()}
    DDP._set_params_and_buffers_to_ignore_for_model(net, list(experts))
    model = DDP(net)
    # DDP averages over ranks: the world factor on the loss makes the replicated gradients the
    # sum of the ranks' (the loss of all tokens); an expert's gradient already sums every rank's
    # rows (they came through the all-to-all), so the factor is taken back off it
    return train_like_one_process(model, net, reference, case, rank, world, steps, 1 / world)


def train_like_one_process(model, net, reference, case, rank: int, world: int, steps: int,
                           expert_grad_scale: float) -> dict:  # fmt: skip
    """``steps`` SGD steps of ``model`` (wrapping ``net``) on this rank's tokens, each rank's loss
    scaled by the world size and the expert gradients by ``expert_grad_scale`` after the
    backward, against ``reference`` training on all ranks' tokens in one process. Returns, per
    parameter, the largest difference to the reference, the reference's scale and how far the
    reference moved from its initial value."""
    # SGD, not Adam: Adam's update does not see a constant factor on a gradient, SGD's does
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    n_total = sum(case.tokens)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        xs = [torch.randn(T, case.d, generator=g) for T in case.tokens]
        ts = [torch.randn(T, case.d, generator=g) for T in case.tokens]
        loss = ((model(xs[rank]) - ts[rank]) ** 2).sum() * world / n_total
        opt.zero_grad()
        loss.backward()
        for p in net.moe.experts.parameters():
            p.grad.mul_(expert_grad_scale)
        opt.step()
        ref_loss = ((reference(torch.cat(xs)) - torch.cat(ts)) ** 2).sum() / n_total
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
    diffs = {}
    initial = {n: p.detach() for n, p in Net(case).named_parameters()}
    for (name, p), (_, q) in zip(net.named_parameters(), reference.named_parameters()):
        # DTensors (FSDP2's shards, the experts' over ep) are gathered whole
        full = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
        diffs[name] = dict(
            max_abs=float((full - q.detach()).abs().max()),
            scale=float(q.detach().abs().max()),
            moved=float((q.detach() - initial[name]).abs().max()),
        )
    return diffs
