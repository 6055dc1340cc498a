"""SMoE-VAE (smoe.models.vae) against specs/smoe_vae_quickdraw.md §11; its example script is
tests/test_quickdraw_vae_example.py's."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from smoe.models import SMoEVAE
from smoe.models.vae import (
    DecoderExperts,
    balance_loss,
    entropy_loss,
    gate_ce_loss,
    kl_loss,
    mix_experts,
    recon_loss,
)

L = 32


def make(E: int, **kw) -> SMoEVAE:
    return SMoEVAE(E, **kw).double()


def images(B: int) -> torch.Tensor:
    return torch.rand(B, 1, 28, 28, dtype=torch.float64)


def loop_decoders(model: SMoEVAE, z: torch.Tensor) -> torch.Tensor:
    """``[B, E, 28, 28]``: every plain per-expert decoder on every latent, one at a time."""
    return torch.cat([model.experts.decoder(e)(z) for e in range(model.num_experts)], dim=1)


class FixedGate(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.logits


# ---------------------------------------------------------------------------------------------
# Shapes and architecture (§1, §2)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("E,B", [(1, 1), (3, 7), (5, 16)], ids=lambda v: str(v))
@pytest.mark.parametrize("routing", ["unsupervised", "supervised"])
def test_vae_shapes(E, B, routing):
    model = make(E, routing=routing)
    x, labels = images(B), torch.randint(0, 9, (B,))
    for train in (True, False):
        model.train(train)
        out = model(x, labels)
        assert out.mu.shape == out.log_var.shape == out.z.shape == (B, L)
        assert out.logits.shape == (B, E) and out.expert.shape == (B,)
        assert out.recon.shape == (B, 1, 28, 28)
        assert 0 <= out.recon.min() and out.recon.max() <= 1
        assert torch.equal(out.expert, out.logits.argmax(-1))


def test_vae_parameter_counts_match_the_reference():
    # spec §2: encoder 494,144; one lite decoder 14,249; gate 4,192 + 33E; E = 10 -> 641,156
    model = SMoEVAE(10)

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(model.encoder) == 494_144
    assert count(model.experts) == 10 * 14_249 == count(model.experts.decoder(3)) * 10
    assert count(model.gate) == 4_192 + 33 * 10
    assert count(model) == 641_156


def test_vae_empty_batch_in_eval():
    model = make(3).eval()
    out = model(images(0))
    assert out.recon.shape == (0, 1, 28, 28)


# ---------------------------------------------------------------------------------------------
# Batched experts vs a plain loop over decoders (§3, §4)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("E", [1, 2, 5])
def test_batched_decoders_match_a_loop_over_plain_decoders(E):
    experts = DecoderExperts(E).double()
    model = make(E)
    model.experts = experts
    z = torch.randn(6, L, dtype=torch.float64)
    want = loop_decoders(model, z)
    torch.testing.assert_close(experts(z), want, atol=1e-12, rtol=1e-10)
    for e in range(E):
        torch.testing.assert_close(experts.decode_one(e, z), want[:, e : e + 1])


def test_train_output_is_the_softmax_mixture_of_all_decoders():
    # §11.3, fp64, 1e-10
    model = make(4).train()
    z = torch.randn(9, L, dtype=torch.float64)
    recon, logits, _ = model.decode(z)
    p = torch.softmax(logits, dim=-1)
    y = loop_decoders(model, z)
    want = sum(p[:, e, None, None, None] * y[:, e : e + 1] for e in range(4))
    torch.testing.assert_close(recon, want, atol=1e-10, rtol=1e-10)


def test_eval_output_is_the_argmax_decoder_and_runs_only_routed_samples(monkeypatch):
    # §11.4: each decoder sees exactly its routed samples, once; the dense path never runs
    E, B = 5, 40
    model = make(E).eval()
    z = torch.randn(B, L, dtype=torch.float64)
    calls: list[tuple[int, torch.Tensor]] = []
    decode_one = model.experts.decode_one

    def recording(e, rows):
        calls.append((e, rows.clone()))
        return decode_one(e, rows)

    def dense(*args):
        raise AssertionError("the dense batched decoders must not run at inference")

    monkeypatch.setattr(model.experts, "decode_one", recording)
    monkeypatch.setattr(model.experts, "forward", dense)
    recon, logits, expert = model.decode(z)
    assert torch.equal(expert, logits.argmax(-1))
    routed = {e: z[expert == e] for e in range(E) if (expert == e).any()}
    assert len(routed) > 1  # the random gate spreads 40 samples over several experts
    assert [e for e, _ in calls] == sorted(routed)  # each non-empty expert once, no others
    for e, rows in calls:
        assert torch.equal(rows, routed[e])  # exactly its samples, in batch order
    want = torch.stack(
        [model.experts.decoder(int(e))(z[b : b + 1])[0] for b, e in enumerate(expert)]
    )
    torch.testing.assert_close(recon, want, atol=1e-12, rtol=1e-10)


def test_eval_forward_decodes_the_mean_with_its_argmax_expert():
    model = make(4, sample_in_eval=False).eval()
    x = images(8)
    out = model(x)
    mu, _ = model.encode(x)
    torch.testing.assert_close(out.z, mu)
    want = torch.cat(
        [model.experts.decoder(int(e))(mu[b : b + 1]) for b, e in enumerate(out.expert)]
    )
    torch.testing.assert_close(out.recon, want, atol=1e-12, rtol=1e-10)


def test_single_expert_train_and_eval_are_the_same_plain_vae():
    # §11.2: softmax of one logit is 1
    model = make(1)
    z = torch.randn(6, L, dtype=torch.float64)
    dense, _, _ = model.decode(z, top1=False)
    top1, _, _ = model.decode(z, top1=True)
    plain = model.experts.decoder(0)(z)
    torch.testing.assert_close(dense, plain, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(top1, plain, atol=1e-12, rtol=1e-10)


def test_dominant_gate_makes_train_and_eval_agree():
    # §11.5: logit margin > 50 -> the softmax mixture is the top-1 decoder to 1e-6
    E, B = 4, 12
    model = make(E)
    assign = torch.arange(B) % E
    model.gate = FixedGate(60.0 * nn.functional.one_hot(assign, E).double())
    z = torch.randn(B, L, dtype=torch.float64)
    dense, _, _ = model.decode(z, top1=False)
    top1, _, expert = model.decode(z, top1=True)
    assert torch.equal(expert, assign)
    torch.testing.assert_close(dense, top1, atol=1e-6, rtol=0)


def test_top1_path_is_differentiable_through_the_dispatch_ops():
    model = make(3, latent_dim=3)
    model.gate = FixedGate(torch.tensor([[0.0, 1, 0], [2, 0, 0], [0, 0, 3]], dtype=torch.float64))
    z = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda z: model.decode(z, top1=True)[0], (z,), fast_mode=True)


# ---------------------------------------------------------------------------------------------
# Losses (§4, §6, §7, §9, §10)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("E", [1, 2, 7])
def test_balance_and_entropy_at_uniform_and_one_hot(E):
    uniform = torch.zeros(5, E, dtype=torch.float64)
    one_hot = torch.zeros(5, E, dtype=torch.float64)
    one_hot[:, 0] = 1000.0  # exp(-1000) == 0 in float64: exactly one-hot probabilities
    torch.testing.assert_close(balance_loss(uniform), torch.tensor(0.0, dtype=torch.float64))
    want = E * ((1 - 1 / E) ** 2 + (E - 1) / E**2)
    torch.testing.assert_close(balance_loss(one_hot).item(), want)
    torch.testing.assert_close(entropy_loss(uniform).item(), math.log(E))
    assert entropy_loss(one_hot).item() == 0.0


def test_kl_matches_torch_distributions():
    # §11.7
    mu, log_var = torch.randn(6, L, dtype=torch.float64), torch.randn(6, L, dtype=torch.float64)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * log_var))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    want = torch.distributions.kl_divergence(q, p).sum()
    torch.testing.assert_close(kl_loss(mu, log_var), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(kl_loss(mu, log_var, "mean"), want / 6, atol=1e-6, rtol=1e-6)


def test_loss_matches_the_reference_formulas():
    # The reference's expressions (spec §4), including its log(p + 1e-8) entropy.
    model = make(5).train()
    x = images(10)
    out = model(x)
    got = model.loss(out, x)
    p = torch.softmax(out.logits, -1)
    recon = ((out.recon - x) ** 2).sum()
    kl = -0.5 * torch.sum(1 + out.log_var - out.mu**2 - out.log_var.exp())
    lb = 5 * ((p.mean(0) - 1 / 5) ** 2).sum()
    ent = (-(p * torch.log(p + 1e-8)).sum(-1)).mean()
    total = recon + 0.01 * kl + 200.0 * lb + 400.0 * ent
    torch.testing.assert_close(got.total, total, atol=1e-5, rtol=1e-7)
    for a, b in ((got.recon, recon), (got.kl, kl), (got.balance, lb)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(got.entropy, ent, atol=1e-7, rtol=0)
    assert got.gate_ce == 0


def test_mean_reduction_divides_recon_kl_and_ce_by_the_batch():
    x, labels = images(8), torch.randint(0, 3, (8,))
    a = make(3, routing="supervised", reduction="sum")
    b = make(3, routing="supervised", reduction="mean")
    b.load_state_dict(a.state_dict())
    torch.manual_seed(1)
    la = a.loss(a(x, labels), x, labels)
    torch.manual_seed(1)
    lb = b.loss(b(x, labels), x, labels)
    for name in ("recon", "kl", "gate_ce"):
        torch.testing.assert_close(getattr(lb, name), getattr(la, name) / 8)
    torch.testing.assert_close(lb.total, lb.recon + 0.01 * lb.kl + 200 * lb.gate_ce)


def test_recon_loss_is_the_per_image_pixel_sum():
    x, y = images(3), images(3)
    torch.testing.assert_close(recon_loss(x, y, "mean"), ((x - y) ** 2).sum() / 3)


def test_losses_gradcheck():
    # §11.10: the dense mixture and the balance / entropy / CE losses, float64
    w = torch.softmax(torch.randn(3, 4, dtype=torch.float64), -1).requires_grad_()
    y = torch.rand(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(mix_experts, (w, y))
    logits = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(balance_loss, (logits,))
    torch.autograd.gradcheck(entropy_loss, (logits,))
    labels = torch.tensor([0, 5, 2, 3, 1, 7])
    torch.autograd.gradcheck(lambda t: gate_ce_loss(t, labels), (logits,))
    mu, lv = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(kl_loss, (mu, lv))


def test_batched_decoders_gradcheck():
    # the grouped convolutions' gradients, to the latent and to every stacked weight
    experts = DecoderExperts(2, latent_dim=3).double()
    names = [n for n, _ in experts.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in experts.parameters()]
    z = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)

    def f(z, *ps):
        return torch.func.functional_call(experts, dict(zip(names, ps)), (z,))

    torch.autograd.gradcheck(f, (z, *params), fast_mode=True)


# ---------------------------------------------------------------------------------------------
# Supervised baseline (§5, §9)
# ---------------------------------------------------------------------------------------------
def test_supervised_gate_gets_no_gradient_from_reconstruction():
    model = make(3, routing="supervised", balance_coef=0.0)
    x, labels = images(12), torch.randint(0, 3, (12,))
    out = model(x, labels)
    model.loss(out, x, labels).total.backward()
    for p in model.gate.parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    assert torch.count_nonzero(model.experts.fc_weight.grad) > 0  # the routed decoders learn
    # with the CE weight back on, the gate learns from the labels
    model.zero_grad()
    model.balance_coef = 200.0
    model.loss(model(x, labels), x, labels).total.backward()
    assert all(torch.count_nonzero(p.grad) > 0 for p in model.gate.parameters())


def test_supervised_training_output_is_the_argmax_decoder():
    model = make(4, routing="supervised").train()
    z = torch.randn(10, L, dtype=torch.float64)
    recon, logits, expert = model.decode(z)
    y = loop_decoders(model, z)
    torch.testing.assert_close(recon[:, 0], y[torch.arange(10), logits.argmax(-1)])


def test_supervised_oracle_eval_routes_by_label():
    model = make(3, routing="supervised", oracle_eval=True, sample_in_eval=False).eval()
    x, labels = images(6), torch.tensor([0, 1, 2, 3, 4, 5])
    out = model(x, labels)
    assert torch.equal(out.expert, labels % 3)
    want = torch.cat(
        [model.experts.decoder(int(e))(out.z[b : b + 1]) for b, e in enumerate(labels % 3)]
    )
    torch.testing.assert_close(out.recon, want)


def test_supervised_loss_needs_labels():
    model = make(2, routing="supervised")
    x = images(2)
    with pytest.raises(ValueError, match="labels"):
        model.loss(model(x), x)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"routing": "topk"}, "routing"),
        ({"reduction": "none"}, "reduction"),
        ({"num_experts": 0}, "num_experts"),
        ({"oracle_eval": True}, "oracle_eval"),
    ],
)
def test_vae_rejects_bad_options(kwargs, match):
    kwargs = {"num_experts": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        SMoEVAE(**kwargs)


# ---------------------------------------------------------------------------------------------
# Module behaviour: state dict, determinism
# ---------------------------------------------------------------------------------------------
def test_vae_state_dict_round_trip():
    a = SMoEVAE(3, sample_in_eval=False).eval()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(123)
    b = SMoEVAE(3, sample_in_eval=False).eval()
    x = torch.rand(5, 1, 28, 28)
    assert not torch.equal(a(x).recon, b(x).recon)
    b.load_state_dict(torch.load(buf))
    assert torch.equal(a(x).recon, b(x).recon)
    assert sorted(k for k in a.state_dict() if k.startswith("experts.")) == [
        "experts.conv1_bias",
        "experts.conv1_weight",
        "experts.conv2_bias",
        "experts.conv2_weight",
        "experts.fc_bias",
        "experts.fc_weight",
    ]


def test_vae_eval_is_deterministic():
    x = torch.rand(16, 1, 28, 28)
    model = SMoEVAE(4, sample_in_eval=False).eval()
    assert torch.equal(model(x).recon, model(x).recon)
    sampling = SMoEVAE(4).eval()

    def run(seed):
        return sampling(x, generator=torch.Generator().manual_seed(seed)).recon

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))  # eval samples z (the reference's behaviour)


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("routing", ["unsupervised", "supervised"])
def test_vae_cuda_matches_cpu(routing, monkeypatch):
    # cuDNN convolutions default to TF32, whose 10-bit mantissas alone exceed the 1e-4 tolerance
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cpu = SMoEVAE(5, routing=routing, sample_in_eval=False)
    gpu = SMoEVAE(5, routing=routing, sample_in_eval=False).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x, labels = torch.rand(64, 1, 28, 28), torch.randint(0, 5, (64,))
    for train in (False, True):
        cpu.train(train)
        gpu.train(train)
        z = torch.randn(64, L)
        want = cpu.decode(z, labels=labels)
        got = gpu.decode(z.cuda(), labels=labels.cuda())
        torch.testing.assert_close(got[0].cpu(), want[0], atol=1e-4, rtol=1e-4)
        assert torch.equal(got[2].cpu(), want[2])
    gpu.train()
    out = gpu(x.cuda(), labels.cuda())
    gpu.loss(out, x.cuda(), labels.cuda()).total.backward()
    assert all(p.grad is not None for p in gpu.experts.parameters())
