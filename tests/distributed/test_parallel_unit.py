"""smoe.parallel pieces that need no process group: the regroup order, the setup errors."""

from __future__ import annotations

import pytest
import torch

from smoe import MoELayer
from smoe.parallel import _regroup, layer_signature, shard_experts


def test_regroup_makes_rows_local_expert_major_keeping_source_order():
    # 2 sources x 3 local experts: source 0 sent (2, 0, 1) rows, source 1 sent (1, 2, 0)
    order, counts = _regroup([[2, 0, 1], [1, 2, 0]], torch.device("cpu"))
    # received layout: s0e0 s0e0 | s0e2 | s1e0 | s1e1 s1e1  (rows 0..5)
    assert order.tolist() == [0, 1, 3, 4, 5, 2]
    assert counts == [3, 2, 1]


def test_regroup_of_nothing():
    order, counts = _regroup([[0, 0], [0, 0]], torch.device("cpu"))
    assert order.numel() == 0 and order.dtype == torch.int64 and counts == [0, 0]


def test_shard_experts_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        shard_experts(MoELayer(8, 8, 4, 1))


def test_layer_signature_names_what_ranks_must_agree_on():
    sig = layer_signature(MoELayer(8, 16, 4, 2, activation="swiglu"))
    assert sig == dict(
        num_experts=4, k=2, d_model=8, d_ff=16, activation="swiglu", experts="Experts",
        router="TopKRouter", dtype="torch.float32",
    )  # fmt: skip
