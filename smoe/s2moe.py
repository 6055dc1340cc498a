"""S2MoE (Do, Le, Tran 2025, arXiv 2503.23007): a sparse MoE layer that also runs its experts on
a Gaussian-perturbed copy of its input and mixes the two outputs with a learned per-token gate
(specs/s2moe.md). The paper body was not read: every formula here is the spec's reconstruction.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smoe import ops
from smoe.experts import check_tokens, experts_on_tokens
from smoe.layer import MoEAux, MoELayer
from smoe.routing.base import Routing
from smoe.routing.context import RoutingContext
from smoe.routing.registry import registered_info

__all__ = ["S2MoELayer", "info_nce", "kl_uniform_loss"]

_CHOICES: dict[str, tuple[str, ...]] = {
    "noise_form": ("dsu", "instnorm"),
    "noise_stats": ("sequence", "token", "batch"),
    "route_noisy": ("own", "shared"),
    "eval_output": ("clean", "gated"),
    "balance": ("switch", "kl_uniform"),
    "unc_pair": ("inputs", "outputs"),
}


def info_nce(queries: Tensor, keys: Tensor, temperature: float) -> Tensor:
    """One-directional InfoNCE between matching rows (specs/s2moe.md §2.4):
    ``−(1/T) Σ_i log softmax_j(q_i·k_j / τ)_i`` with ``q``, ``k`` the rows scaled to unit norm
    (``F.normalize``, eps 1e-12), in float32 (float64 for float64 inputs).

    Args:
        queries, keys: ``[T, d]``, row i of each a positive pair.
        temperature: τ > 0.

    Returns:
        A scalar: log T when all keys are equal, → 0 as τ → 0 when keys = queries are distinct
        directions, 0 for T = 0.
    """
    dt = torch.float64 if queries.dtype == torch.float64 else torch.float32
    if queries.shape[0] == 0:
        return queries.new_zeros((), dtype=dt)
    with torch.autocast(device_type=queries.device.type, enabled=False):
        q = F.normalize(queries.to(dt), dim=-1, eps=1e-12)
        k = F.normalize(keys.to(dt), dim=-1, eps=1e-12)
        logits = (q * (1.0 / temperature)) @ k.T  # scale [T, d], not the [T, T] product
        target = torch.arange(q.shape[0], device=q.device)
        return F.cross_entropy(logits, target)


def kl_uniform_loss(logits: Tensor) -> Tensor:
    """``KL(mean_t softmax(z_t) ‖ U(E))`` (the balance loss of the ``s2moe_implement``
    re-implementation, specs/s2moe.md §2.4): 0 for a uniform mean routing distribution, log E
    with all of it on one expert. ``logits [T, E]``; float32 (float64 stays float64); 0 for T = 0.
    """
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=dt)
    p = ops.router_stats(logits).prob_sum / logits.shape[0]  # the mean softmax, in one pass
    return torch.xlogy(p, p).sum() + math.log(logits.shape[1])


def _choice(name: str, value: object) -> str:
    if value not in _CHOICES[name]:
        raise ValueError(f"S2MoELayer: {name} must be one of {_CHOICES[name]}, got {value!r}")
    return value  # type: ignore[return-value]


class S2MoELayer(MoELayer):
    """S2MoE: a token-choice MoE layer with a second, noisy path through the same experts.

    Training (specs/s2moe.md §2.2–§2.4, §5): ``x̂ = (1 + s ⊙ n1) ⊙ x + (μ + s ⊙ n2)`` (the fused
    :func:`smoe.ops.s2moe_perturb`, n1, n2 ~ N(0, I) from torch's RNG), ``y = SMoE(x)``,
    ``ŷ = SMoE(x̂)`` in ONE dispatch over the 2T tokens ``[x; x̂]``, ``g = sigmoid(s2moe_gate(x))``
    per token, output ``g ⊙ y + (1 − g) ⊙ ŷ`` (+ the shared experts on x). Eval draws no noise
    and outputs ``y`` (bit-equal to :meth:`MoELayer.forward`) or ``g ⊙ y``.

    Args (besides :class:`smoe.MoELayer`'s, passed on as keywords; ``k`` defaults to 1 here):
        noise_form: ``"dsu"`` (``s = σ``, the s2moe_implement re-implementation) or
            ``"instnorm"`` (``x ← InstanceNorm1d(x)`` over the sequence, μ = 0, ``s`` = learnable
            scalars ``s2moe_alpha`` (n1) and ``s2moe_beta`` (n2), init 1: s2moe-gptoss).
        noise_stats: "dsu" only; μ, σ per (sample, feature) over the sequence axis
            (``"sequence"``, needs x of rank >= 3), per token over the features (``"token"``), or
            per feature over all tokens (``"batch"``).
        seq_dim: the sequence axis of x (-2: batch-first ``[B, S, d]``; 0 for time-major
            ``[S, B, d]``, as the fastmoe Transformer-XL code). The noise is drawn in the
            batch-first layout, so ``seq_dim=0`` on x equals ``seq_dim=1`` on ``x.transpose(0, 1)``.
        detach_stats: μ and σ get no gradient ("dsu").
        eps: σ = sqrt(unbiased variance + eps) (§6: eps inside the std, finite gradient for a
            constant feature with ``detach_stats=False``; a 1-token sequence gets σ = sqrt(eps)).
        route_noisy: ``"own"`` (x̂ is routed by the router, its aux losses discarded) or
            ``"shared"`` (x̂ reuses x's experts and weights).
        eval_output: ``"clean"`` (y) or ``"gated"`` (g ⊙ y, s2moe_implement's eval).
        balance: ``"switch"`` keeps the router's aux losses of the clean routing (top-k: "balance"
            and "z"); ``"kl_uniform"`` replaces "balance" by ``"kl_uniform"``
            (:func:`kl_uniform_loss` of the clean logits).
        unc_pair: the InfoNCE pair of the ``"s2moe_unc"`` loss, ``"inputs"`` (x, x̂: before the
            InstanceNorm for "instnorm") or ``"outputs"`` (y, ŷ: the routed outputs).
        unc_temperature: τ of :func:`info_nce`. 0.1 is the authors' SimSMoE default and is
            UNVERIFIED for S2MoE: the only re-implementation with the loss uses τ = 1 (§2.4, §4).
        unc_max_tokens: InfoNCE over at most this many tokens: every ``ceil(T / max)``-th token
            (0, s, 2s, ...: a deterministic strided subset spread over the batch).

    The router must be token choice without its own plan (top-k, Switch, X-MoE, ...): V-MoE,
    expert choice and USMoE are refused. A capacity applies to each path separately (the clean
    path drops exactly as :class:`MoELayer`). ``MoEAux.tokens_per_expert`` and
    ``dropped_fraction`` count the clean path; losses: the clean routing's (see ``balance``) and,
    in training only, ``"s2moe_unc"``. A router with an ``expert_bias`` counts both paths' loads.
    No host-device sync in forward.

    Raises:
        ValueError (naming the argument): an unknown option string, eps or unc_temperature not
            finite and > 0, unc_max_tokens < 2, a router that is not token choice (at
            construction) or that builds its own plan (at forward); in a training forward, where
            noise is drawn: x of rank < 3 with ``noise_stats="sequence"`` or
            ``noise_form="instnorm"``, ``seq_dim`` out of range or the feature axis.
    """

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        k: int = 1,
        *,
        noise_form: str = "dsu",
        noise_stats: str = "sequence",
        seq_dim: int = -2,
        detach_stats: bool = True,
        eps: float = 1e-5,
        route_noisy: str = "own",
        eval_output: str = "clean",
        balance: str = "switch",
        unc_pair: str = "inputs",
        unc_temperature: float = 0.1,
        unc_max_tokens: int = 4096,
        **moe_layer_kwargs: Any,
    ) -> None:
        self.noise_form = _choice("noise_form", noise_form)
        self.noise_stats = _choice("noise_stats", noise_stats)
        self.route_noisy = _choice("route_noisy", route_noisy)
        self.eval_output = _choice("eval_output", eval_output)
        self.balance = _choice("balance", balance)
        self.unc_pair = _choice("unc_pair", unc_pair)
        if isinstance(seq_dim, bool) or not isinstance(seq_dim, int):
            raise ValueError(f"S2MoELayer: seq_dim must be an int, got {seq_dim!r}")
        if not isinstance(detach_stats, bool):
            raise ValueError(f"S2MoELayer: detach_stats must be a bool, got {detach_stats!r}")
        if not eps > 0 or not math.isfinite(eps):  # also refuses NaN
            raise ValueError(f"S2MoELayer: eps must be > 0, got {eps}")
        if not unc_temperature > 0 or not math.isfinite(unc_temperature):
            raise ValueError(f"S2MoELayer: unc_temperature must be > 0, got {unc_temperature}")
        if isinstance(unc_max_tokens, bool) or not isinstance(unc_max_tokens, int):
            raise ValueError(f"S2MoELayer: unc_max_tokens must be an int, got {unc_max_tokens!r}")
        if unc_max_tokens < 2:
            raise ValueError(f"S2MoELayer: unc_max_tokens must be >= 2, got {unc_max_tokens}")
        self.seq_dim, self.detach_stats, self.eps = seq_dim, detach_stats, float(eps)
        self.unc_temperature, self.unc_max_tokens = float(unc_temperature), unc_max_tokens
        super().__init__(d_model, d_ff, num_experts, k, **moe_layer_kwargs)
        info = registered_info(self.router)
        if info is not None and info.selection != "token_choice":
            raise ValueError(
                f"S2MoELayer: router {info.name!r} is {info.selection} routing; S2MoE needs a "
                "token-choice router (top-k, switch, ...)"
            )
        self._build_s2moe()

    def _build_s2moe(self, device: Any = None, dtype: torch.dtype | None = None) -> None:
        """The S2MoE parameters: the gate, and InstanceNorm with α, β for "instnorm"."""
        kw = {"device": device, "dtype": dtype}
        self.s2moe_gate = nn.Linear(self.d_model, 1, **kw)
        if self.noise_form == "instnorm":
            self.s2moe_norm = nn.InstanceNorm1d(self.d_model, affine=True, **kw)
            self.s2moe_alpha = nn.Parameter(torch.ones((), **kw))
            self.s2moe_beta = nn.Parameter(torch.ones((), **kw))

    @classmethod
    def from_moe_layer(cls, layer: MoELayer, **s2moe_options: Any) -> S2MoELayer:
        """An S2MoELayer around ``layer``'s router, experts and shared experts (the same modules:
        shared tensors, no copy) with a fresh gate on their device and dtype; keeps its capacity
        factor, layer index and training mode (``smoe.convert(model, layer="s2moe")``)."""
        if not isinstance(layer, MoELayer):
            raise TypeError(f"S2MoELayer.from_moe_layer: layer must be a MoELayer, got {layer!r}")
        new = cls(
            layer.d_model,
            1,  # placeholder experts, replaced below
            layer.num_experts,
            router=layer.router,
            capacity_factor=layer.capacity_factor,
            layer_index=layer.layer_index,
            **s2moe_options,
        )
        new.experts = layer.experts
        for name in ("shared", "shared_gate"):
            if getattr(layer, name, None) is not None:
                setattr(new, name, getattr(layer, name))
        p = next(layer.experts.parameters())
        new._build_s2moe(p.device, p.dtype)
        return new.train(layer.training)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, noise_form={self.noise_form!r}, "
            f"noise_stats={self.noise_stats!r}, seq_dim={self.seq_dim}, "
            f"route_noisy={self.route_noisy!r}, eval_output={self.eval_output!r}, "
            f"balance={self.balance!r}, unc_pair={self.unc_pair!r}, "
            f"unc_temperature={self.unc_temperature}"
        )

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.s2moe_gate.reset_parameters()
        if self.noise_form == "instnorm":
            self.s2moe_norm.reset_parameters()
            with torch.no_grad():
                self.s2moe_alpha.fill_(1.0)
                self.s2moe_beta.fill_(1.0)

    # ---- noise (§2.2) ----------------------------------------------------------------------
    def _draw(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """n1, n2 ~ N(0, I) of ``like``'s shape, dtype and device (torch's global RNG)."""
        n1 = torch.randn(like.shape, device=like.device, dtype=like.dtype)
        n2 = torch.randn(like.shape, device=like.device, dtype=like.dtype)
        return n1, n2

    def _seq_axis(self, x: Tensor) -> int:
        what = "noise_stats='sequence'" if self.noise_form == "dsu" else "noise_form='instnorm'"
        n = x.dim()
        if n < 3:
            raise ValueError(
                f"S2MoELayer: {what} takes statistics over the sequence axis and needs x of rank "
                f">= 3 ([B, S, d] or [S, B, d]), got shape {tuple(x.shape)}"
            )
        axis = self.seq_dim % n if -n <= self.seq_dim < n else None
        if axis is None or axis == n - 1:
            raise ValueError(
                f"S2MoELayer: seq_dim={self.seq_dim} must name the sequence axis of x of rank {n}: "
                f"in [{-n}, {n - 2}] and not the feature axis (-1), got shape {tuple(x.shape)}"
            )
        return axis

    def perturb(self, x: Tensor) -> Tensor:
        """x̂ of ``x [..., d_model]`` (§2.2): fresh noise from torch's RNG on every call (n1 then
        n2), math in float32 (float64 for float64 x, autocast off), returned in x's dtype."""
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.noise_form == "dsu" and self.noise_stats != "sequence":
                flat = x.reshape(-1, self.d_model).to(dt)
                dim = -1 if self.noise_stats == "token" else 0
                n1, n2 = self._draw(flat)
                mu, sigma = self._stats(flat, dim)
                out = ops.s2moe_perturb(flat, n1, n2, mu, sigma, sigma)
                return out.reshape(x.shape).to(x.dtype)
            axis = self._seq_axis(x)
            xc = x.to(dt).movedim(axis, -2)  # batch-first [..., S, d]
            n1, n2 = self._draw(xc)
            if self.noise_form == "dsu":
                mu, sigma = self._stats(xc, -2)
                out = ops.s2moe_perturb(xc, n1, n2, mu, sigma, sigma)
            else:
                out = ops.s2moe_perturb(self._instance_norm(xc), n1, n2, *self._affine(dt))
            return out.movedim(-2, axis).to(x.dtype)

    def _stats(self, x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        """μ and σ = sqrt(unbiased var + eps) over ``dim`` (kept), detached if asked."""
        correction = 1 if x.shape[dim] > 1 else 0
        var, mu = torch.var_mean(x, dim=dim, keepdim=True, correction=correction)
        sigma = (var + self.eps).sqrt()
        if self.detach_stats:
            return mu.detach(), sigma.detach()
        return mu, sigma

    def _instance_norm(self, xc: Tensor) -> Tensor:
        norm = self.s2moe_norm
        seq = xc.reshape(-1, xc.shape[-2], self.d_model).transpose(1, 2)  # [N, d, S]
        w, b = (p.to(xc.dtype) for p in (norm.weight, norm.bias))
        out = F.instance_norm(seq, weight=w, bias=b, eps=norm.eps)
        return out.transpose(1, 2).reshape(xc.shape)

    def _affine(self, dt: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        alpha, beta = self.s2moe_alpha.to(dt), self.s2moe_beta.to(dt)
        return alpha.new_zeros(()), alpha, beta

    # ---- the two paths (§2.3, §5) --------------------------------------------------------------
    def _route(self, flat: Tensor, context: RoutingContext) -> Routing:
        if self._router_takes_context:
            routing = self.router(flat, context=context)
        else:
            routing = self.router(flat)
        if routing.plan is not None:
            raise ValueError(
                f"S2MoELayer: router {type(self.router).__name__} builds its own plan (V-MoE, "
                "expert choice, USMoE); S2MoE needs a token-choice router without one"
            )
        return routing

    def _capacity(self, k: int, tokens: int, context: RoutingContext) -> int | None:
        """MoELayer's capacity for one path of ``tokens`` tokens."""
        if self.capacity_factor is None:
            return None
        if context.causal and k > 1:
            raise ValueError(
                "S2MoELayer: capacity_factor with k > 1 is not causal (capacity is filled "
                "rank-major) and context.causal is True; set capacity_factor=None"
            )
        return max(1, math.ceil(k * tokens * self.capacity_factor / self.num_experts))

    def _dispatch(self, tokens: Tensor, routing: Routing, capacity, group_size):
        """MoELayer's plan / permute / experts / combine (and interpolation) on ``tokens``."""
        plan = ops.make_plan(
            routing.expert, self.num_experts, capacity=capacity, group_size=group_size
        )
        y_sorted = experts_on_tokens(self.experts, tokens, plan)
        y = ops.combine(y_sorted, routing.weight.to(y_sorted.dtype), plan)
        if routing.interpolate:
            kept_weight = (routing.weight * plan.kept).sum(dim=-1, keepdim=True)
            y = y + (1.0 - kept_weight).to(tokens.dtype) * tokens
        return y, plan

    def _gate(self, flat: Tensor, like: Tensor) -> Tensor:
        return torch.sigmoid(self.s2moe_gate(flat)).to(like.dtype)

    def _unc_loss(self, flat: Tensor, x_hat: Tensor, y: Tensor, y_hat: Tensor) -> Tensor:
        """InfoNCE of the ``unc_pair`` over at most ``unc_max_tokens`` tokens (every
        ``ceil(T / max)``-th one)."""
        q, k = (flat, x_hat) if self.unc_pair == "inputs" else (y, y_hat)
        T = q.shape[0]
        stride = -(-T // self.unc_max_tokens) if T > self.unc_max_tokens else 1
        return info_nce(q[::stride], k[::stride], self.unc_temperature)

    def _losses(self, routing: Routing) -> dict[str, Tensor]:
        losses = dict(routing.aux)
        if self.balance == "kl_uniform":
            losses.pop("balance", None)
            losses["kl_uniform"] = kl_uniform_loss(routing.logits)
        return losses

    def forward(self, x: Tensor, context: RoutingContext | None = None) -> tuple[Tensor, MoEAux]:
        """``x [..., d_model]`` → ``(out, MoEAux)`` shaped like x (MoELayer's contract)."""
        check_tokens("S2MoELayer", "x", x, self.d_model, next(self.experts.parameters()).device)
        flat = x.reshape(-1, self.d_model)
        T = flat.shape[0]
        context = self._context(x, context)
        routing = self._route(flat, context)
        capacity = self._capacity(routing.expert.shape[1], T, context)
        losses = self._losses(routing)
        shared = getattr(self, "shared", None)
        if not self.training:
            y, plan = self._dispatch(flat, routing, capacity, None)
            if self.eval_output == "gated":
                y = self._gate(flat, y) * y
            if shared is not None:
                y = y + self._shared(shared, flat).to(y.dtype)
            load = plan.tokens_per_expert()
            return y.reshape(x.shape), MoEAux(losses, load, self._dropped(routing.expert, load))
        x_hat = self.perturb(x).reshape(-1, self.d_model)
        noisy = self._route(x_hat, context) if self.route_noisy == "own" else routing
        both = Routing(
            torch.cat([routing.expert, noisy.expert]),
            torch.cat([routing.weight, noisy.weight]),
            routing.logits,
            {},
            interpolate=routing.interpolate,
        )
        group = T if capacity is not None and T > 0 else None  # a capacity per path
        y2, plan = self._dispatch(torch.cat([flat, x_hat]), both, capacity, group)
        y, y_hat = y2[:T], y2[T:]
        g = self._gate(flat, y)
        out = g * y + (1.0 - g) * y_hat
        if shared is not None:
            out = out + self._shared(shared, flat).to(out.dtype)
        losses["s2moe_unc"] = self._unc_loss(flat, x_hat, y, y_hat)
        kept = plan.kept[:T].long().reshape(-1)
        index = routing.expert.clamp_min(0).long().reshape(-1)
        load = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device)
        load = load.scatter_add(0, index, kept)
        return out.reshape(x.shape), MoEAux(losses, load, self._dropped(routing.expert, load))

    @staticmethod
    def _dropped(expert: Tensor, load: Tensor) -> Tensor:
        assigned = (expert >= 0).sum()
        return (assigned - load.sum()).float() / assigned.clamp_min(1).float()
