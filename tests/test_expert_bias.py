"""Aux-loss-free balancing: topk_softmax's selection_bias, TopKRouter(expert_bias=True) and
smoe.ExpertBiasUpdater (DeepSeek-V3; Wang et al. 2024)."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from smoe import ExpertBiasUpdater, MoELayer, TopKRouter, ops, reference

E = 6


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_selection_bias_selects_and_never_weighs(renormalize, dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, E, generator=g).to(dtype)
    bias = torch.randn(E, generator=g) * 3
    w, ex = ops.topk_softmax(logits, 2, renormalize=renormalize, selection_bias=bias)
    rw, rex = reference.topk_softmax(logits, 2, renormalize=renormalize, selection_bias=bias)
    assert torch.equal(ex, rex)
    torch.testing.assert_close(w, rw)
    # the weights are the unbiased softmax's at the chosen experts
    p = torch.softmax(logits.double(), -1).gather(1, ex.long())
    want = p / p.sum(-1, keepdim=True) if renormalize else p
    torch.testing.assert_close(w.double(), want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6,
                               atol=1e-3 if dtype == torch.bfloat16 else 1e-7)  # fmt: skip
    # and the bias changes the choice: a huge bias on expert 0 puts it first everywhere
    big = torch.zeros(E)
    big[0] = 1e6
    assert (ops.topk_softmax(logits, 2, selection_bias=big).expert[:, 0] == 0).all()


def test_zero_bias_equals_no_bias_and_gradients_ignore_it():
    logits = torch.randn(30, E, requires_grad=True)
    a = ops.topk_softmax(logits, 3, selection_bias=torch.zeros(E))
    b = ops.topk_softmax(logits, 3)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.expert, b.expert)
    fixed = torch.randn(E, generator=torch.Generator().manual_seed(1))
    assert torch.autograd.gradcheck(
        lambda x: ops.topk_softmax(x, 3, selection_bias=fixed).weight,
        (torch.randn(5, E, dtype=torch.float64, requires_grad=True),),
    )
    torch.library.opcheck(
        torch.ops.smoe.topk_softmax.default,
        (logits.detach().requires_grad_(), 2, torch.randn(E)),
        {"renormalize": True},
    )


@pytest.mark.parametrize(
    "bias,match",
    [
        (torch.zeros(E, dtype=torch.float64), "float32"),
        (torch.zeros(E + 1), r"\[E\]"),
        (torch.full((E,), float("nan")), "finite"),
    ],
)
def test_bad_selection_bias_is_refused(bias, match):
    with pytest.raises(RuntimeError, match=f"selection_bias.*{match}"):
        ops.topk_softmax(torch.randn(4, E), 2, selection_bias=bias)


def _router(**kw) -> TopKRouter:
    torch.manual_seed(0)
    return TopKRouter(8, E, 2, expert_bias=True, aux=False, **kw)


def test_router_counts_loads_in_training_and_saves_the_bias():
    r = _router()
    x = torch.randn(20, 8)
    out = r(x)
    counts = torch.bincount(out.expert.flatten().long(), minlength=E).float()
    assert torch.equal(r.expert_counts, counts)
    r.eval()
    r(x)
    assert torch.equal(r.expert_counts, counts)  # evaluation counts nothing
    assert "expert_bias" in r.state_dict() and "expert_counts" not in r.state_dict()
    assert "expert_bias" not in TopKRouter(8, E, 2).state_dict()


def test_updater_formula_centering_and_zeroing():
    r = _router()
    r.expert_counts.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]))  # mean 2.5
    ExpertBiasUpdater(r, coeff=0.1, center=False).step()
    torch.testing.assert_close(r.expert_bias, torch.tensor([0.1, 0.1, 0.1, -0.1, -0.1, -0.1]))
    assert torch.equal(r.expert_counts, torch.zeros(E))
    r.expert_counts.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 6.0]))  # mean 1
    before = r.expert_bias.clone()
    ExpertBiasUpdater(r, coeff=0.1).step()
    delta = torch.tensor([0.1] * 5 + [-0.1])
    torch.testing.assert_close(r.expert_bias - before, delta - delta.mean())


def test_gate_values_never_depend_on_the_bias():
    r = _router()
    x = torch.randn(25, 8)
    with torch.no_grad():
        r.expert_bias.copy_(torch.randn(E) * 2)
    out = r(x)
    logits = x @ r.weight.T
    p = torch.softmax(logits, -1).gather(1, out.expert.long())
    torch.testing.assert_close(out.weight, p / p.sum(-1, keepdim=True))


def test_accumulated_micro_batches_update_as_one_batch():
    a, b = _router(), _router()
    x = torch.randn(32, 8)
    a(x)
    b(x[:16])
    b(x[16:])
    assert torch.equal(a.expert_counts, b.expert_counts)
    ExpertBiasUpdater(a).step()
    ExpertBiasUpdater(b).step()
    assert torch.equal(a.expert_bias, b.expert_bias)


def test_training_with_the_updater_lowers_imbalance():
    torch.manual_seed(0)
    layer = MoELayer(8, 16, E, 2, router_options={"expert_bias": True, "aux": False})
    with torch.no_grad():
        layer.router.weight[0] += 0.5  # a gate skewed towards expert 0
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)  # routing weights frozen: the bias alone
    ExpertBiasUpdater(layer, coeff=0.1).attach(opt)
    x = torch.randn(256, 8).abs()
    first = None
    for _ in range(60):
        y, aux = layer(x)
        load = aux.tokens_per_expert.float()
        vio = (load.max() / load.mean() - 1).item()
        first = vio if first is None else first
        y.sum().backward()
        opt.step()
        opt.zero_grad()
    assert vio < first / 2


def test_compiles_without_graph_breaks():
    r = _router()
    x = torch.randn(10, 8)
    compiled = torch.compile(r, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    counts = torch.bincount(out.expert.flatten().long(), minlength=E).float()
    assert torch.equal(r.expert_counts, counts)  # the buffer update survives compilation
    assert torch.equal(out.expert, r(x).expert)


def test_updater_errors():
    with pytest.raises(ValueError, match="expert_bias=True"):
        ExpertBiasUpdater(TopKRouter(8, E, 2))
    with pytest.raises(ValueError, match="coeff"):
        ExpertBiasUpdater(_router(), coeff=0.0)


def _rank(rank: int, rdv: str, out) -> None:
    import torch.distributed as dist

    from tests.distributed.teardown import end_rank

    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=2)
    try:
        r = _router()
        r.expert_counts.copy_(torch.tensor([4.0, 0, 0, 0, 0, 0]) if rank == 0 else torch.tensor(
            [0.0, 0, 0, 0, 0, 8.0]))  # fmt: skip
        ExpertBiasUpdater(r, coeff=1.0, center=False).step()
        out[rank] = r.expert_bias.clone()
    except BaseException:
        dist.destroy_process_group()
        raise
    end_rank()  # barrier, destroy, os._exit(0): no rank aborts in interpreter teardown


def test_counts_are_all_reduced_over_two_gloo_ranks(tmp_path):
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(str(tmp_path / "rendezvous"), out), nprocs=2, join=True)
    # summed counts [4, 0, 0, 0, 0, 8], mean 2: experts 0 and 5 over, the rest under
    want = torch.tensor([-1.0, 1.0, 1.0, 1.0, 1.0, -1.0])
    assert torch.equal(out[0], want) and torch.equal(out[1], want)


@pytest.mark.parametrize(
    "T,E_,k,strided",
    [(0, 4, 2, False), (5, 1, 1, False), (7, 4, 4, False), (9, 6, 2, True)],
    ids=["0 tokens", "1 expert", "k = E", "non-contiguous"],
)
def test_selection_bias_over_the_shape_table(T, E_, k, strided):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(T, 2 * E_ if strided else E_, generator=g)
    if strided:
        logits = logits[:, ::2]
    bias = torch.randn(E_, generator=g)
    got = ops.topk_softmax(logits, k, selection_bias=bias)
    want = reference.topk_softmax(logits, k, selection_bias=bias)
    assert torch.equal(got.expert, want.expert)
    torch.testing.assert_close(got.weight, want.weight)
