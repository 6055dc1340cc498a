"""Token-choice top-k routing: Switch (k = 1), GShard/Mixtral top-k, Shazeer's noisy top-k."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smoe import ops
from smoe.losses import router_z_loss, switch_balance_loss
from smoe.routing.base import Float32Buffers, Routing, gate_dtype
from smoe.routing.context import RoutingContext
from smoe.routing.registry import register_router


class TopKRouter(Float32Buffers, nn.Module):
    """Linear gate + softmax + top-k, computed in float32 (also under autocast; float64 input
    stays float64).

    Spec: specs/classic_routers.md §1 (noisy top-k), §2 (Switch, balance loss), §3 (z-loss).

    Args:
        d_model: token width.
        num_experts: E.
        k: experts per token.
        renormalize: k weights sum to 1 (Mixtral, noisy top-k) or stay raw probabilities (Switch).
            Softmax gate only.
        gate: ``"softmax"`` (the weights are softmax probabilities) or ``"sigmoid"``: the same
            top-k selection, each selected expert weighted by ``σ(logit)``, not renormalised (the
            sigmoid "SMoE" baseline of X-MoE, specs/xmoe.md §10).
        noisy: Shazeer et al.'s noisy top-k: in training, select on
            ``h + n * (softplus(x W_noise) + noise_epsilon)``, ``n ~ N(0, 1)`` from torch's RNG.
        noise_epsilon: added to the softplus (fastmoe's 1e-2).
        jitter: multiply the router input by U(1 - jitter, 1 + jitter) in training (0 = off).
        balance_first_choice_only: balance loss convention (see :func:`switch_balance_loss`).
        init_scale: router weights ~ truncated normal with std sqrt(init_scale / d_model) (0.1 in
            Switch).
        bias: a learned per-expert bias on the logits, ``x W^T + b`` (zeros at init; the gate of
            MomentumSMoE's reference code, specs/momentum_smoe.md §7). Without it the state_dict
            holds no ``bias`` key.
        aux: return the balance and z losses in ``Routing.aux`` (False: none, the reference
            MomentumSMoE gate trains without an auxiliary loss).
        expert_bias: aux-loss-free balancing (DeepSeek-V3; Wang et al. 2024, arXiv 2408.15664):
            a per-expert bias buffer ``expert_bias [E]`` (float32, saved in the state_dict) added
            to the scores for the selection only, never to the weights; in training the forward
            counts each expert's assignments in ``expert_counts`` (no gradient, no host sync).
            :class:`smoe.ExpertBiasUpdater` moves the bias at each optimizer step. Usually with
            ``aux=False``.
    """

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict

    # A process group for global-batch balance statistics (smoe.parallel.shard_experts with
    # global_stats=True sets it; see smoe.losses.switch_balance_loss). None: this rank's tokens.
    stats_group: Any = None

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        *,
        renormalize: bool = True,
        gate: str = "softmax",
        noisy: bool = False,
        noise_epsilon: float = 1e-2,
        jitter: float = 0.0,
        balance_first_choice_only: bool = False,
        init_scale: float = 0.1,
        bias: bool = False,
        aux: bool = True,
        expert_bias: bool = False,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"TopKRouter: num_experts must be >= 1, got {num_experts}")
        if not 1 <= k <= num_experts:
            raise ValueError(f"TopKRouter: k must be in [1, num_experts={num_experts}], got {k}")
        if gate not in ("softmax", "sigmoid"):
            raise ValueError(f"TopKRouter: gate must be 'softmax' or 'sigmoid', got {gate!r}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"TopKRouter: jitter must be in [0, 1), got {jitter}")
        if d_model < 1:
            raise ValueError(f"TopKRouter: d_model must be >= 1, got {d_model}")
        if not init_scale > 0:
            raise ValueError(f"TopKRouter: init_scale must be > 0, got {init_scale}")
        if not noise_epsilon >= 0:
            raise ValueError(f"TopKRouter: noise_epsilon must be >= 0, got {noise_epsilon}")
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.renormalize, self.noisy, self.noise_epsilon = renormalize, noisy, noise_epsilon
        self.gate = gate
        self.jitter, self.balance_first_choice_only = jitter, balance_first_choice_only
        self.init_scale = init_scale
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.noise_weight = nn.Parameter(torch.empty(num_experts, d_model)) if noisy else None
        self.bias = nn.Parameter(torch.empty(num_experts)) if bias else None
        self.aux = aux
        if expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts))
            self.register_buffer("expert_counts", torch.zeros(num_experts), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = math.sqrt(self.init_scale / self.d_model)
        nn.init.trunc_normal_(self.weight, std=std, a=-2 * std, b=2 * std)
        if self.noise_weight is not None:
            nn.init.zeros_(self.noise_weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, "
            f"renormalize={self.renormalize}, gate={self.gate}, noisy={self.noisy}, "
            f"jitter={self.jitter}, bias={self.bias is not None}, aux={self.aux}, "
            f"expert_bias={self._selection_bias() is not None}"
        )

    # state kept in float32 whatever the module's dtype (tests/checkpoint reads this)
    keep_float32: tuple[str, ...] = ("expert_bias", "expert_counts")

    def _selection_bias(self) -> Tensor | None:
        # (a buffer registered only with expert_bias=True; routers pickled before have none)
        return self._buffers.get("expert_bias")

    def forward(self, x: Tensor, context: RoutingContext | None = None) -> Routing:
        """Route ``x [T, d_model]``; returns :class:`Routing`.

        Weights are float32 (float64 for float64 x).

        ``context`` is accepted for the common router interface and not used.
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            dt = gate_dtype(x)
            h = x  # gate_linear reads 16-bit x exactly: no float32 copy of it
            if self.training and self.jitter > 0:
                h = x.to(dt) * torch.empty(x.shape, dtype=dt, device=x.device).uniform_(
                    1.0 - self.jitter, 1.0 + self.jitter
                )
            logits = ops.gate_linear(h, self.weight, self.bias)
            selection = logits
            if self.noisy and self.training:
                assert self.noise_weight is not None
                std = F.softplus(ops.gate_linear(h, self.noise_weight)) + self.noise_epsilon
                selection = logits + torch.randn_like(logits) * std
            sel_bias = self._selection_bias()
            weight, expert = ops.topk_softmax(
                selection, self.k, renormalize=self.renormalize, selection_bias=sel_bias
            )
            if sel_bias is not None and self.training:
                with torch.no_grad():  # the loads ExpertBiasUpdater reads at the optimizer step
                    ones = torch.ones(expert.numel(), device=expert.device)
                    self.expert_counts.scatter_add_(0, expert.reshape(-1).long(), ones)
            if self.gate == "sigmoid":
                weight = torch.sigmoid(torch.gather(logits, 1, expert.long()))
            aux: dict[str, Tensor] = {}
            if self.aux:
                stats = ops.router_stats(logits)  # one pass for both losses
                aux["balance"] = switch_balance_loss(
                    logits,
                    expert,
                    self.num_experts,
                    first_choice_only=self.balance_first_choice_only,
                    stats_group=self.stats_group,
                    stats=stats,
                )
                aux["z"] = router_z_loss(logits, stats=stats)
        return Routing(expert=expert, weight=weight, logits=logits, aux=aux)


register_router(
    "topk",
    TopKRouter,
    description="GShard/Mixtral top-k: softmax gate, top-k, weights renormalised over the k",
    aux_losses=("balance", "z"),
)
register_router(
    "switch",
    TopKRouter,
    description="Switch Transformer: softmax gate, top-k (k = 1 in the paper), raw probabilities",
    aux_losses=("balance", "z"),
    defaults={"renormalize": False},
)
register_router(
    "noisy_topk",
    TopKRouter,
    description="Shazeer et al. 2017: top-k of logits + softplus-scaled Gaussian noise in training",
    aux_losses=("balance", "z"),
    defaults={"noisy": True},
)
