"""smoe.metrics: load, entropy, top-1, routing fluctuation, RC, consistency, RoutingRecorder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import smoe
from smoe import metrics as M
from smoe.routing.base import Routing

INF = float("inf")


def _top1_loop(expert, weight):
    """Independent top-1: the largest positive weight of a token, ties to the lower expert."""
    out = []
    for ex, w in zip(expert.tolist(), weight.tolist()):
        pairs = [(v, -e) for e, v in zip(ex, w) if e >= 0 and v > 0]
        out.append(-max(pairs)[1] if pairs else -1)
    return torch.tensor(out, dtype=torch.long)


def test_tokens_per_expert_counts_and_ignores_minus_one():
    expert = torch.tensor([[0, 1], [1, -1], [3, 1]], dtype=torch.int32)
    assert M.tokens_per_expert(expert, 4).tolist() == [1, 3, 0, 1]
    assert M.tokens_per_expert(torch.empty(0, 2, dtype=torch.int32), 3).tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    "load, cv, max_vio, dead",
    [
        pytest.param([2, 2, 2, 2], 0.0, 0.0, 0, id="balanced"),
        pytest.param([8, 0, 0, 0], math.sqrt(3.0), 3.0, 3, id="one-expert"),
        pytest.param([1, 3], 0.5, 0.5, 0, id="1-3"),
    ],
)
def test_load_stats_known_loads(load, cv, max_vio, dead):
    stats = M.load_stats(torch.tensor(load))
    assert stats["cv"] == pytest.approx(cv, abs=1e-12)
    assert stats["max_vio"] == pytest.approx(max_vio, abs=1e-12)
    assert float(M.max_violation(torch.tensor(load))) == pytest.approx(max_vio, abs=1e-12)
    assert stats["dead"] == dead
    assert "dropped" not in stats


def test_load_stats_dropped_share_and_all_zero_load():
    assert M.load_stats(torch.tensor([3, 5]), assigned=10)["dropped"] == pytest.approx(0.2)
    assert M.load_stats(torch.tensor([3, 5]), assigned=torch.tensor(8))["dropped"] == 0.0
    assert M.load_stats(torch.tensor([0, 0]), assigned=0)["dropped"] == 0.0
    stats = M.load_stats(torch.zeros(4, dtype=torch.long))
    assert math.isnan(stats["cv"]) and math.isnan(stats["max_vio"]) and stats["dead"] == 4


@pytest.mark.parametrize("E", [1, 2, 7])
def test_routing_entropy_uniform_is_log_e(E):
    logits = torch.randn(5, 1).expand(5, E)  # equal logits within each row
    assert float(M.routing_entropy(logits)) == pytest.approx(math.log(E), abs=1e-12)


def test_routing_entropy_one_hot_is_zero():
    masked = torch.tensor([[0.0, -INF, -INF], [-INF, -INF, 3.0]])
    assert float(M.routing_entropy(masked)) == 0.0
    peaked = torch.tensor([[1e4, 0.0, 0.0]])
    assert float(M.routing_entropy(peaked)) == pytest.approx(0.0, abs=1e-12)


def test_routing_entropy_matches_formula_and_empty_is_nan():
    logits = torch.randn(6, 4)
    p = torch.softmax(logits.double(), dim=-1).numpy()
    expected = float(np.mean(-(p * np.log(p)).sum(axis=1)))
    assert float(M.routing_entropy(logits)) == pytest.approx(expected, rel=1e-12)
    assert math.isnan(float(M.routing_entropy(torch.empty(0, 4))))


def test_dense_weights_token_choice_router():
    routing = smoe.TopKRouter(8, 5, k=2)(torch.randn(9, 8))
    dense = M.dense_weights(routing, 5)
    expected = torch.zeros(9, 5)
    for t in range(9):
        for j in range(2):
            expected[t, routing.expert[t, j]] += routing.weight[t, j].detach()
    torch.testing.assert_close(dense.detach(), expected)
    assert torch.equal(M.top1_expert(routing, 5), routing.expert[:, 0].long())


def test_dense_weights_expert_choice_router():
    routing = smoe.ExpertChoiceRouter(8, 4, capacity_factor=0.5)(torch.randn(12, 8))
    dense = M.dense_weights(routing, 4).detach()
    chosen = routing.expert >= 0
    assert torch.equal(routing.expert[chosen].long(), torch.arange(4).expand(12, 4)[chosen])
    torch.testing.assert_close(dense, torch.where(chosen, routing.weight.detach(), 0.0))
    top1 = M.top1_expert(routing, 4)
    assert torch.equal(top1, _top1_loop(routing.expert, routing.weight.detach()))
    assert (top1 == -1).any()  # c = 0.5: some token is chosen by no expert


def test_top1_expert_hand_made_routing():
    expert = torch.tensor([[2, 0], [3, 1], [-1, -1], [1, -1]], dtype=torch.int32)
    weight = torch.tensor([[0.3, 0.7], [0.5, 0.5], [0.0, 0.0], [0.9, 0.0]])
    routing = Routing(expert, weight, torch.zeros(4, 4), {})
    dense = M.dense_weights(routing, 4)
    assert dense.dtype == torch.float32
    torch.testing.assert_close(
        dense,
        torch.tensor([[0.7, 0, 0.3, 0], [0, 0.5, 0, 0.5], [0, 0, 0, 0], [0, 0.9, 0, 0]]),
    )
    assert M.top1_expert(routing, 4).tolist() == [0, 1, -1, 1]  # tie -> lower index


def test_routing_fluctuation_identical_is_zero_and_all_moved_is_one():
    before = torch.randint(0, 4, (50,))
    assert M.routing_fluctuation(before, before.clone()) == 0.0
    assert M.routing_fluctuation(before, (before + 1) % 4) == 1.0
    assert M.routing_fluctuation(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 0])) == 0.5


def test_fluctuation_series_previous_and_final():
    cps = [torch.tensor(c) for c in ([0, 1, 2, 3], [0, 1, 2, 0], [1, 1, 2, 0], [1, 1, 3, 3])]
    assert M.fluctuation_series(cps) == [0.25, 0.25, 0.5]
    assert M.fluctuation_series(cps, against="previous") == [0.25, 0.25, 0.5]
    assert M.fluctuation_series(cps, against="final") == [0.75, 0.5, 0.0]
    assert M.fluctuation_series(cps[:1]) == [] == M.fluctuation_series(cps[:1], against="final")


def test_routing_fluctuation_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="before and after must be"):
        M.routing_fluctuation(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="before and after must be"):
        M.routing_fluctuation(torch.zeros(2, 2), torch.zeros(2, 2))


def test_routing_fluctuation_rejects_no_token():
    with pytest.raises(ValueError, match="no token to compare"):
        M.routing_fluctuation(torch.zeros(0), torch.zeros(0))


def test_fluctuation_series_rejects_unknown_against():
    with pytest.raises(ValueError, match="against must be 'previous' or 'final'"):
        M.fluctuation_series([torch.zeros(2)] * 2, against="first")


def _rc_numpy(h, labels):
    """Float64 Tr(Σ_W Σ_B^†) by a loop over classes (rows with a negative label dropped)."""
    h, labels = np.asarray(h, dtype=np.float64), np.asarray(labels)
    h, labels = h[labels >= 0], labels[labels >= 0]
    n, d = h.shape
    classes = sorted(set(labels.tolist()))
    mu = h.mean(axis=0)
    sw, sb = np.zeros((d, d)), np.zeros((d, d))
    for c in classes:
        hc = h[labels == c]
        mc = hc.mean(axis=0)
        for row in hc:
            sw += np.outer(row - mc, row - mc)
        sb += np.outer(mc - mu, mc - mu)
    sw, sb = sw / n, sb / len(classes)
    return float(np.trace(sw @ np.linalg.pinv(sb))), len(classes)


@pytest.mark.parametrize(
    "N, d, classes",
    [
        pytest.param(40, 6, [0, 1, 2, 3], id="rank-deficient-SigmaB"),
        pytest.param(30, 2, [0, 2, 5], id="full-rank-gaps"),
        pytest.param(25, 3, [-1, 1, 4], id="ignored-rows"),
    ],
)
def test_representation_collapse_matches_float64_formula(N, d, classes):
    h = torch.randn(N, d)
    idx = torch.arange(N) % len(classes)
    idx[: N // 3] = len(classes) - 1  # unequal class sizes: Σ_B is not count-weighted
    labels = torch.tensor(classes)[idx]
    expected, K = _rc_numpy(h.numpy(), labels.numpy())
    assert M.representation_collapse(h, labels) == pytest.approx(expected, rel=1e-9)
    scaled = M.representation_collapse(h, labels, nc1_scale=True)
    assert scaled == pytest.approx(expected / K, rel=1e-9)


def test_representation_collapse_rejects_bad_shapes():
    with pytest.raises(ValueError, match="h must be \\[N, d\\] and labels \\[N\\]"):
        M.representation_collapse(torch.randn(5), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="h must be \\[N, d\\] and labels \\[N\\]"):
        M.representation_collapse(torch.randn(5, 2), torch.zeros(4, dtype=torch.long))


def test_representation_collapse_rejects_single_class():
    with pytest.raises(ValueError, match="needs >= 2 classes present, got 1"):
        M.representation_collapse(torch.randn(4, 2), torch.tensor([1, 1, -1, -1]))


def test_inter_run_consistency_proportional_loads_is_one():
    loads = [
        torch.tensor([1, 2, 3, 7]),
        torch.tensor([2, 4, 6, 14]),
        torch.tensor([10, 20, 30, 70]),
    ]
    assert M.inter_run_consistency(loads) == pytest.approx(1.0, abs=1e-12)
    assert M.inter_run_consistency(torch.stack(loads)) == pytest.approx(1.0, abs=1e-12)
    assert M.inter_run_consistency([torch.tensor([5.0, 1.0])]) == pytest.approx(1.0)


def test_inter_run_consistency_hand_computed():
    a, b, c = [1, 2, 3, 4], [1, 2, 4, 3], [4, 3, 2, 1]
    # Pearson: r(a, b) = 4/5, r(a, c) = -1, r(b, c) = -4/5; mean over the 3x3 matrix.
    assert M.inter_run_consistency(torch.tensor([a, b])) == pytest.approx(0.9, abs=1e-12)
    assert M.inter_run_consistency(torch.tensor([a, b, c])) == pytest.approx(1 / 9, abs=1e-12)
    assert M.inter_run_consistency(torch.tensor([a, c])) == pytest.approx(0.0, abs=1e-12)


def test_inter_run_consistency_constant_load_is_nan():
    assert math.isnan(M.inter_run_consistency(torch.tensor([[1, 2, 3], [2, 2, 2]])))


def test_inter_run_consistency_rejects_no_run_and_bad_shape():
    for bad in ([], torch.zeros(0, 4), torch.tensor([1.0, 2.0])):
        with pytest.raises(ValueError, match="expected R >= 1 load vectors"):
            M.inter_run_consistency(bad)


class _TwoMoE(nn.Module):
    """Two MoE layers (top-k, then expert choice) under nested names; returns what they saw."""

    def __init__(self, d=8, E=4):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList(
            [smoe.MoELayer(d, 16, E, k=2), smoe.MoELayer(d, 16, E, router="expert_choice")]
        )

    def forward(self, x):
        h = self.inp(x)
        seen, auxes = [], []
        for layer in self.blocks:
            y, aux = layer(h)
            seen.append(h.reshape(-1, h.shape[-1]))
            auxes.append(aux)
            h = h + y
        return h, seen, auxes


def _run(model, batches):
    outs = [model(x) for x in batches]
    return [[o[1][i] for o in outs] for i in range(2)], [[o[2][i] for o in outs] for i in range(2)]


def test_routing_recorder_matches_layer_outputs():
    model = _TwoMoE()
    batches = [torch.randn(2, 5, 8), torch.randn(3, 4, 8), torch.randn(1, 7, 8)]
    rec = M.RoutingRecorder(model)
    assert list(rec.layers) == ["blocks.0", "blocks.1"]
    with rec, torch.no_grad():
        seen, auxes = _run(model, batches)
    n_tokens = sum(x.shape[0] * x.shape[1] for x in batches)
    summary = rec.summary()
    for i, name in enumerate(["blocks.0", "blocks.1"]):
        record, layer = rec.records[name], model.blocks[i]
        assert torch.equal(record.load, sum(a.tokens_per_expert for a in auxes[i]))
        with torch.no_grad():
            routings = [layer.router(h) for h in seen[i]]
        top1 = torch.cat([M.top1_expert(r, 4) for r in routings])
        assert torch.equal(rec.top1()[name], top1)
        assert rec.top1()[name].numel() == n_tokens == summary[name]["tokens"]
        torch.testing.assert_close(torch.cat(record.inputs), torch.cat(seen[i]))
        logits = torch.cat([r.logits for r in routings])
        torch.testing.assert_close(torch.cat(record.logits), logits)
        assert record.assigned == sum(int((r.expert >= 0).sum()) for r in routings)
        assert summary[name]["entropy"] == pytest.approx(float(M.routing_entropy(logits)))
        assert summary[name]["entropy_max"] == pytest.approx(math.log(4))
        stats = M.load_stats(record.load, assigned=record.assigned)
        assert {k: summary[name][k] for k in stats} == pytest.approx(stats, nan_ok=True)
        expected_rc = M.representation_collapse(torch.cat(seen[i]), top1)
        assert summary[name]["rc"] == pytest.approx(expected_rc)
    assert rec.records["blocks.0"].assigned == 2 * n_tokens  # top-2, no capacity


def test_routing_recorder_removes_hooks_and_records_nothing_outside():
    model = _TwoMoE()
    rec = M.RoutingRecorder(model)
    model(torch.randn(1, 3, 8))  # before: nothing hooked, nothing recorded
    assert rec.records == {}
    with rec, torch.no_grad():
        _, _, auxes = model(torch.randn(2, 3, 8))
        assert all(len(layer._forward_hooks) == 1 for layer in model.blocks)
    for layer in model.blocks:
        assert not layer._forward_hooks and not layer.router._forward_hooks
    with torch.no_grad():
        model(torch.randn(4, 3, 8))
    for i, record in enumerate(rec.records.values()):
        assert len(record.top1) == len(record.logits) == len(record.inputs) == 1
        assert record.top1_all().numel() == 6
        assert torch.equal(record.load, auxes[i].tokens_per_expert)


def test_routing_recorder_reentering_clears():
    model = _TwoMoE()
    rec = M.RoutingRecorder(model, keep_inputs=False)
    with rec, torch.no_grad():
        model(torch.randn(2, 5, 8))
    with rec, torch.no_grad():
        _, _, auxes = model(torch.randn(1, 3, 8))
    for i, (name, record) in enumerate(rec.records.items()):
        assert rec.top1()[name].numel() == 3
        assert torch.equal(record.load, auxes[i].tokens_per_expert)
        assert record.inputs == [] and "rc" not in rec.summary()[name]


def test_routing_recorder_rejects_model_without_moe_layer():
    with pytest.raises(ValueError, match="the model has no smoe.MoELayer"):
        M.RoutingRecorder(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


def test_representation_collapse_closed_form_two_classes():
    # 1-D: classes at -a and +a, each with within-class variance s2 (points c ± sqrt(s2)).
    a, s2 = 2.0, 0.25
    r = s2**0.5
    h = torch.tensor([[-a - r], [-a + r], [a - r], [a + r]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    # Σ_W = s2, Σ_B = (a² + a²) / 2 = a²  ->  RC = s2 / a²
    assert M.representation_collapse(h, labels) == pytest.approx(s2 / a**2)
    assert M.representation_collapse(h, labels, nc1_scale=True) == pytest.approx(s2 / a**2 / 2)


def test_representation_collapse_global_mean_choice_matters_for_unequal_classes():
    # classes at 0 (three rows) and 4 (one row), no within-class spread except class 0's
    h = torch.tensor([[-1.0], [0.0], [1.0], [4.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1])
    sigma_w = 2.0 / 4  # (1 + 0 + 1) / N
    # samples: μ = 1, Σ_B = ((0-1)² + (4-1)²) / 2 = 5;  classes: μ = 2, Σ_B = (4 + 4) / 2 = 4
    assert M.representation_collapse(h, labels) == pytest.approx(sigma_w / 5)
    assert M.representation_collapse(h, labels, global_mean="classes") == pytest.approx(sigma_w / 4)
    with pytest.raises(ValueError, match="global_mean must be"):
        M.representation_collapse(h, labels, global_mean="median")
