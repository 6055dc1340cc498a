"""Expert parallelism over ``torch.distributed``: each rank of an expert-parallel (ep) group holds
E / P of a layer's experts, and the rows routed to another rank's experts travel there and back
by ``all_to_all_single``.

    import torch.distributed as dist
    from smoe.parallel import shard_experts

    dist.init_process_group("gloo")        # or "nccl"; run under torchrun
    model = build_model()                   # the same model on every rank, from one seed
    shard_experts(model)                    # ep group = the world (or mesh=..., ep_dim="ep")

After :func:`shard_experts`, every :class:`smoe.MoELayer` in the module keeps only the experts of
its rank: rank r of an ep group of size P holds experts ``[r·E/P, (r+1)·E/P)``. The experts
module keeps its class's forward and parameter names; its per-expert parameters become DTensors
sharded along the expert dim over the ep mesh (``Shard(0)``), so a state_dict has the unsharded
keys and global shapes (``torch.distributed.checkpoint`` saves and loads it against an unsharded
model's), FSDP2 composes over the other mesh dims, and ``p.full_tensor()`` gathers a parameter;
the forward runs on the local shards (``to_local``). Its class becomes an
``ExpertParallel<name>`` subclass (as FSDP2's ``fully_shard`` does) whose forward runs, per layer:

1. the router and ``make_plan`` over the E global experts, locally (the layer, unchanged);
2. ``all_to_all_single`` of the per-expert counts (int64 ``[P, E/P]``);
3. one host read of both count tables, the layer's **one host sync** (the split sizes of the
   next two exchanges must be known on the host);
4. ``all_to_all_single`` of the kept rows of ``x_sorted`` with explicit input/output splits;
5. a regroup of the received rows by local expert, keeping the source ranks' order (a gather
   by a permutation, not a sort);
6. the local experts (``grouped_mm``, activation, ``grouped_mm``);
7. the inverse regroup and the inverse all-to-all; ``combine`` then runs on the sending rank.

The routing weights stay on the sending rank, so router gradients never travel; the backward of
each all-to-all is the inverse exchange with the splits swapped
(``torch.distributed._functional_collectives.all_to_all_single_autograd``).

Since ``make_plan`` keeps token order within an expert and the regroup keeps source-rank order,
each expert sees its rows in the order a single process would give the rank-major concatenation
of all ranks' tokens: outputs and gradients equal that process's (tests/distributed). Routing,
capacity and aux statistics are per rank (each rank's tokens are one routing group, GShard's
group semantics); ``expert_choice`` and ``usmoe`` pick within each rank's tokens;
``global_stats=True`` computes the batch-statistic losses over all ranks' tokens.

Data parallelism composes: FSDP2 over the other dims of a DeviceMesh (the experts over the ranks
that replicate them), or DDP with the expert shards kept out of it
(``DDP._set_params_and_buffers_to_ignore_for_model``): tests/distributed trains both like one
process. Costs, and what is not built (hierarchical exchange, overlap, padded sync-free
dispatch): benchmarks/EXPERT_PARALLEL.md.

Backends: Gloo on CPU (tested: tests/distributed, 2 and 4 ranks); NCCL, and CUDA tensors over
Gloo, are the same calls but have not run yet (no GPU so far). Only the ``all_to_all_single``
form is used (Gloo lacks the list form). Routers whose selection needs statistics beyond a rank
(SSR's ``scope="global"``) take them over the data-parallel group, as their docstrings say.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from smoe.experts import Experts, StackedExperts

__all__ = [
    "ExpertParallel",
    "GroupRef",
    "exchange_rows",
    "layer_signature",
    "resolve_group",
    "shard_experts",
]


def _a2a_autograd(x: Tensor, output_splits: list[int], input_splits: list[int], group) -> Tensor:
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

    return wait_tensor(all_to_all_single_autograd(x, output_splits, input_splits, group))


class GroupRef:
    """A process group held by a module. Deep copies of the module share the group (a handle to
    the ranks, not data); pickling it is refused with a clear error (a group means nothing in
    another process: save state_dicts with ``torch.distributed.checkpoint`` instead)."""

    __slots__ = ("group",)

    def __init__(self, group: Any) -> None:
        self.group = group

    def __deepcopy__(self, memo: dict) -> GroupRef:
        return self

    def __reduce__(self):
        raise TypeError(
            "smoe.parallel: a module holding a process group (shard_experts) cannot be pickled; "
            "save its state_dict (torch.distributed.checkpoint keeps the unsharded keys)"
        )


def resolve_group(group: Any) -> Any:
    """The process group of a :class:`GroupRef`, or ``group`` itself."""
    return group.group if isinstance(group, GroupRef) else group


class ExpertParallel:
    """Mixin that makes an experts module (:class:`smoe.Experts` or
    :class:`smoe.experts.StackedExperts`) holding ``E / P`` local experts run the rows of all
    ``E`` global experts through an all-to-all. Built by :func:`shard_experts`; see the module
    docstring for the steps. ``copy.deepcopy`` works (the copy shares the group); pickling the
    module whole does not (save its state_dict)."""

    ep_group_ref: GroupRef
    ep_size: int
    ep_rank: int
    ep_num_experts: int  # E, the global count

    @property
    def ep_group(self) -> Any:
        return self.ep_group_ref.group

    def __reduce_ex__(self, protocol):
        raise TypeError(
            f"{type(self).__name__} (smoe.parallel.shard_experts) cannot be pickled whole; save "
            "the model's state_dict (torch.distributed.checkpoint keeps the unsharded keys)"
        )

    def __deepcopy__(self, memo: dict) -> ExpertParallel:
        # what copy.deepcopy does for an nn.Module, which __reduce_ex__ above no longer provides
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__dict__, memo))
        return new

    def forward(self, x_sorted: Tensor, offsets: Tensor) -> Tensor:
        """``x_sorted [M, d]`` grouped by ``offsets [E+1]`` over the E global experts (rows past
        ``offsets[E]`` are padding) -> ``[M, d]``, padding rows 0."""
        E = self.ep_num_experts
        if offsets.shape != (E + 1,):
            raise ValueError(
                f"{type(self).__name__}: offsets must be [E+1] = [{E + 1}] over the global "
                f"experts, got shape {tuple(offsets.shape)}"
            )
        return exchange_rows(x_sorted, offsets, self.ep_group, self._local_forward)

    def _local_forward(self, x: Tensor, offsets: Tensor) -> Tensor:
        """The experts' own forward on this rank's experts: the DTensor parameters swapped for
        their local shards (``to_local``, differentiable) while it runs."""
        from torch.distributed.tensor import DTensor
        from torch.nn.utils.stateless import _reparametrize_module

        local = {n: p.to_local() for n, p in self.named_parameters() if isinstance(p, DTensor)}
        with _reparametrize_module(self, local):
            return super().forward(x, offsets)

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", ep_rank={self.ep_rank}, ep_size={self.ep_size}, global_experts="
            + f"{self.ep_num_experts}"
        )


def exchange_rows(
    x_sorted: Tensor,
    offsets: Tensor,
    group: Any,
    run_local: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    """Steps 2-7 of the module docstring: rows grouped by the E global experts (``offsets [E+1]``,
    E a multiple of the group's size P) go to their experts' ranks, ``run_local(x_local,
    local_offsets [E/P + 1])`` computes this rank's experts on the rows it received, and the
    results come back in ``x_sorted``'s row order (padding rows past ``offsets[E]`` are 0).
    Differentiable; one host read of the split sizes. A group of one rank runs its experts
    directly (nothing to exchange, no host read)."""
    P = dist.get_world_size(group)
    if P == 1:
        return run_local(x_sorted, offsets)
    E = offsets.shape[0] - 1
    E_loc = E // P
    counts = (offsets[1:] - offsets[:-1]).to(torch.int64)
    received = torch.empty_like(counts)
    # counts is [P, E_loc] rank-major: chunk p (rank p's experts) goes to rank p
    dist.all_to_all_single(received, counts, group=group)
    send, recv = torch.stack([counts, received]).view(2, P, E_loc).tolist()  # the host sync
    send_splits = [sum(c) for c in send]
    recv_splits = [sum(c) for c in recv]
    used = sum(send_splits)
    x_recv = _a2a_autograd(x_sorted[:used].contiguous(), recv_splits, send_splits, group)
    order, local_counts = _regroup(recv, x_sorted.device)
    local_offsets = torch.tensor([0, *local_counts], dtype=torch.int64).cumsum(0)
    y_local = run_local(x_recv.index_select(0, order), local_offsets.to(x_sorted.device))
    y_recv = torch.empty_like(y_local).index_copy(0, order, y_local)
    y_send = _a2a_autograd(y_recv, send_splits, recv_splits, group)
    if used == x_sorted.shape[0]:
        return y_send
    return torch.cat([y_send, y_send.new_zeros(x_sorted.shape[0] - used, y_send.shape[1])])


def _regroup(recv: list[list[int]], device: torch.device) -> tuple[Tensor, list[int]]:
    """The received rows come source-rank-major (``recv[p][j]`` rows of source p for local expert
    j); the gather order that makes them local-expert-major with the sources in rank order, and
    the rows per local expert."""
    P, E_loc = len(recv), len(recv[0])
    start, base = [[0] * E_loc for _ in range(P)], 0
    for p in range(P):
        for j in range(E_loc):
            start[p][j] = base
            base += recv[p][j]
    pieces = [
        torch.arange(start[p][j], start[p][j] + recv[p][j])
        for j in range(E_loc)
        for p in range(P)
        if recv[p][j]
    ]
    order = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)
    return order.to(device), [sum(recv[p][j] for p in range(P)) for j in range(E_loc)]


def layer_signature(layer: nn.Module) -> dict[str, Any]:
    """What every rank of an ep group must agree on for one layer."""
    experts = layer.experts
    ref = next(experts.parameters())
    return dict(
        num_experts=layer.num_experts,
        k=getattr(getattr(layer, "router", None), "k", None),
        d_model=layer.d_model,
        d_ff=getattr(experts, "d_ff", None),
        activation=getattr(experts, "activation", None),
        experts=type(experts).__name__,
        router=type(getattr(layer, "router", None)).__name__,
        dtype=str(ref.dtype),
    )


def _shard(p: nn.Parameter, dim: int, lo: int, hi: int, ep_mesh: Any) -> nn.Parameter:
    """Experts [lo, hi) of ``p`` along ``dim`` (a copy, so the full tensor is freed), as a DTensor
    sharded on ``dim`` over the ep mesh: its global shape is the unsharded one."""
    from torch.distributed.tensor import DTensor, Shard

    local = p.detach().narrow(dim, lo, hi - lo).clone()
    shard = DTensor.from_local(local, ep_mesh, [Shard(dim)], run_check=False)
    return nn.Parameter(shard, p.requires_grad)


def _local(experts: nn.Module, lo: int, hi: int, ep_mesh: Any) -> None:
    """Keep experts [lo, hi) of ``experts`` in place: every per-expert parameter becomes this
    rank's slice, a DTensor sharded along its expert dim over ``ep_mesh``."""
    if isinstance(experts, Experts):
        for name in ("w_in", "w_out", "b_in", "b_out"):
            p = getattr(experts, name)
            if p is not None:
                setattr(experts, name, _shard(p, 0, lo, hi, ep_mesh))
        experts.num_experts = hi - lo
    elif isinstance(experts, StackedExperts):
        for ffn in experts.ffns:
            _local(ffn, lo, hi, ep_mesh)
        for name in ("norm_weight", "norm_bias"):
            setattr(experts, name, _shard(getattr(experts, name), 1, lo, hi, ep_mesh))
        experts.num_experts = hi - lo
    else:
        raise TypeError(
            "shard_experts: the experts must be smoe.Experts or smoe.experts.StackedExperts, got "
            f"{type(experts).__name__}"
        )


_CLASSES: dict[type, type] = {}


def _parallel_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"ExpertParallel{cls.__name__}", (ExpertParallel, cls), {})
    return _CLASSES[cls]


def shard_experts(
    module: nn.Module,
    mesh: Any = None,
    *,
    ep_dim: str = "ep",
    group: Any = None,
    global_stats: bool = False,
) -> nn.Module:
    """Make every :class:`smoe.MoELayer` in ``module`` expert-parallel, in place; returns
    ``module``.

    Args:
        module: a model (or one layer) built identically on every rank of the group.
        mesh: a ``torch.distributed.DeviceMesh``; its ``ep_dim`` dimension is the ep group.
        ep_dim: the mesh dimension's name.
        group: a process group instead of a mesh (default: the world).
        global_stats: compute the routers' batch-statistic losses over the tokens of all ranks
            (each holds its own: the world), global-batch balancing. Switch/X-MoE/StableMoE
            balance: the expert counts f all-reduced, each rank's own mean probabilities P
            (:func:`smoe.losses.switch_balance_loss`); V-MoE importance and load with one
            routing group: the per-expert sums all-reduced (:func:`smoe.losses.importance_loss`).
            With equal tokens per rank, the mean over ranks of each loss and of its gradient is
            the loss of all tokens at once. One all-reduce per loss, in the forward. False
            (default): each rank's tokens only. The z-loss is a per-token mean: already global.

    Raises:
        RuntimeError: torch.distributed is not initialised.
        ValueError: ``global_stats`` with a router that has no batch-statistic loss, a layer's
            ``num_experts`` not divisible by the ep size, or the ranks
            disagree on a layer's signature (E, k, d_model, d_ff, activation, dtype, classes):
            the same error on every rank, raised at setup, never a hang later.
    """
    from smoe.layer import MoELayer

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("shard_experts: torch.distributed is not initialised")
    if mesh is not None and group is not None:
        raise ValueError("shard_experts: give mesh or group, not both")
    if mesh is not None:
        ep_mesh = mesh[ep_dim]
        group = ep_mesh.get_group()
    else:
        from torch.distributed.device_mesh import DeviceMesh

        group = dist.group.WORLD if group is None else group
        device = next(module.parameters()).device.type
        ep_mesh = DeviceMesh.from_group(group, device, mesh_dim_names=(ep_dim,))
    P, r = dist.get_world_size(group), dist.get_rank(group)
    layers = [m for m in module.modules() if isinstance(m, MoELayer)]
    signatures = [layer_signature(layer) for layer in layers]
    everyone: list[Any] = [None] * P
    dist.all_gather_object(everyone, signatures, group=group)
    if any(s != signatures for s in everyone):
        diff = "; ".join(f"rank {i}: {s}" for i, s in enumerate(everyone) if s != everyone[0])
        raise ValueError(
            f"shard_experts: the ranks of the ep group disagree on their MoE layers (rank 0: "
            f"{everyone[0]}; {diff})"
        )
    if global_stats:
        for i, layer in enumerate(layers):
            if not hasattr(layer.router, "stats_group"):
                raise ValueError(
                    "shard_experts: global_stats applies to routers whose auxiliary losses are "
                    "batch statistics (top-k family, V-MoE, X-MoE, StableMoE, graph routers), got "
                    f"{type(layer.router).__name__} in MoE layer {i}, which has none"
                )
    for i, layer in enumerate(layers):
        if global_stats:
            layer.router.stats_group = GroupRef(dist.group.WORLD)
        E = layer.num_experts
        if isinstance(layer.experts, ExpertParallel):
            raise ValueError(f"shard_experts: MoE layer {i} is already expert-parallel")
        if E % P:
            raise ValueError(
                f"shard_experts: num_experts = {E} (MoE layer {i}) must be divisible by the ep "
                f"group's size {P}"
            )
        E_loc = E // P
        experts = layer.experts
        _local(experts, r * E_loc, (r + 1) * E_loc, ep_mesh)
        experts.__class__ = _parallel_class(type(experts))
        experts.ep_group_ref, experts.ep_size, experts.ep_rank = GroupRef(group), P, r
        experts.ep_num_experts = E
    return module
