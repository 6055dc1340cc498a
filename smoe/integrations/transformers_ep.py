"""smoe's dispatch as a transformers expert-parallel implementation: ``ep_implementation="smoe"``.

    import smoe.integrations.transformers  # registers "smoe" (experts and EP)
    from transformers.distributed import DistributedConfig

    config = DistributedConfig(ep_size=2, fsdp_size=2, ep_implementation="smoe")
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=config)  # torchrun

transformers shards each experts module's weights by expert over the EP mesh (its
``grouped_gemm`` rule) and hands every ``ep_dispatch_experts`` module's call ``(hidden_states
[T, d], top_k_index [T, k] global ids, top_k_weights [T, k])`` to the implementation. This one
runs smoe's path, with the all-to-all of :mod:`smoe.parallel`: ``make_plan`` over the global
experts → ``permute`` → counts all-to-all, one host read of the splits, rows all-to-all →
regroup by local expert → the module's local experts through ``grouped_mm`` (the same code as
``experts_implementation="smoe"``) → inverse exchange → ``combine`` on the sending rank (the
routing weights never travel). Requires a TP size of 1 (ranks of the EP group hold different
batches); ``"all_to_all"`` and ``"all_reduce"`` remain for shared-batch layouts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.distributed.expert_parallel import EPImplementation

from smoe import ops
from smoe.integrations.transformers import expert_rows
from smoe.parallel import exchange_rows

__all__ = ["SmoeEP"]


class SmoeEP(EPImplementation):
    """``ep_implementation="smoe"``: smoe's plan, gathers and grouped GEMMs around
    :func:`smoe.parallel.exchange_rows`."""

    def __init__(self, experts: nn.Module, ep_mesh, tp_mesh) -> None:
        super().__init__(experts, ep_mesh, tp_mesh)
        if tp_mesh.size() > 1:
            raise ValueError(
                f"ep_implementation='smoe' needs tp_size = 1 (each rank of the expert group with "
                f"its own batch), got a TP group of {tp_mesh.size()} ranks for "
                f"{type(experts).__name__}; use 'all_to_all' there"
            )
        self.experts = experts

    def __call__(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        E_loc, P = self.num_local_experts, self.ep_mesh.size()
        E = E_loc * P
        k = top_k_index.shape[1]
        expert = top_k_index.to(torch.int32)
        weight = top_k_weights
        if weight.shape[1] != k:  # full [T, E] routing weights: the chosen experts' entries
            weight = weight.gather(1, expert.clamp(0, E - 1).long())
        plan = ops.make_plan(expert, E)
        x = ops.permute(hidden_states, plan)
        y = exchange_rows(
            x,
            plan.offsets,
            self.ep_mesh.get_group(),
            lambda rows, offsets: expert_rows(self.experts, rows, offsets),
        )
        return ops.combine(y, weight.to(y.dtype), plan).to(hidden_states.dtype)
