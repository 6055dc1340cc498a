"""S2MoE in converted transformers blocks: ``smoe.convert(model, layer="s2moe")`` (issue 27,
specs/s2moe.md).

A :class:`ConvertedS2MoE` is a :class:`smoe.integrations.convert.ConvertedMoE` (the original
block's children and router, run by smoe's ops) with S2MoE around its router and experts: in
training a Gaussian-perturbed copy of the block input goes through the same router (or reuses the
clean routing) and experts in one dispatch over both copies, and a per-token gate mixes the two
outputs; the shared experts run on the clean input. Only the clean routing's logits go to
transformers' ``output_router_logits``, so the model's own load-balancing loss stays on the
deterministic path (§2.4). The InfoNCE loss of each block's last training forward is read with
:func:`s2moe_loss`. In eval mode, no noise: the block returns what the converted block returns
(``eval_output="clean"``) or gates its routed output (``"gated"``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from smoe import ops
from smoe.integrations.convert import ConvertedMoE, _record_router_logits
from smoe.integrations.transformers import run_experts
from smoe.losses import DEFAULT_LOSS_WEIGHTS
from smoe.routing.base import Routing
from smoe.routing.context import RoutingContext
from smoe.s2moe import S2MoELayer

__all__ = ["ConvertedS2MoE", "s2moe_loss"]

# the S2MoE option attributes a ConvertedS2MoE copies from a checked S2MoELayer
_OPTIONS = (
    "noise_form",
    "noise_stats",
    "seq_dim",
    "detach_stats",
    "eps",
    "route_noisy",
    "eval_output",
    "unc_pair",
    "unc_temperature",
    "unc_max_tokens",
)


def check_s2moe_options(options: dict[str, Any]) -> dict[str, Any]:
    """S2MoELayer's option checks (each error names its option), before any block is converted.
    ``balance`` is refused: a converted block's balance loss is the model's own."""
    if "balance" in options:
        raise ValueError(
            "smoe.convert: layer_options must not set balance: a converted model's load-balancing "
            "loss is transformers' own, computed on the clean routing's logits"
        )
    probe = S2MoELayer(4, 1, 2, 1, **options)
    return {name: getattr(probe, name) for name in _OPTIONS}


class ConvertedS2MoE(ConvertedMoE, S2MoELayer):
    """A transformers MoE block run by smoe with S2MoE around it (built by :func:`smoe.convert`
    with ``layer="s2moe"``, not by hand). Its S2MoE parameters sit beside the block's children
    as ``s2moe_gate`` (and ``s2moe_norm``, ``s2moe_alpha``, ``s2moe_beta`` for
    ``noise_form="instnorm"``); :func:`smoe.unconvert` drops them.

    Attributes:
        last_s2moe_loss: the unweighted InfoNCE loss of the latest training forward (None
            before one, and after an eval forward).
    """

    def _setup_s2moe(self, options: dict[str, Any]) -> None:
        for name, value in options.items():
            setattr(self, name, value)
        ref = next(self.experts.parameters())
        self._build_s2moe(ref.device, ref.dtype)
        self.last_s2moe_loss: Tensor | None = None

    def extra_repr(self) -> str:
        return f"{ConvertedMoE.extra_repr(self)}, s2moe: route_noisy={self.route_noisy!r}"

    def _route_block(self, flat: Tensor, hidden_states: Tensor) -> Routing:
        if self.native:
            return self.router(flat)
        context = self._context(hidden_states, RoutingContext(causal=self.causal))
        return self.router(flat, context=context)

    def _run(self, tokens: Tensor, expert: Tensor, weight: Tensor, interpolate: bool) -> Tensor:
        plan = ops.make_plan(expert, self.num_experts)
        out = run_experts(self.experts, tokens, plan, weight)
        if interpolate:
            kept = (weight * plan.kept).sum(dim=-1, keepdim=True)
            out = out + (1.0 - kept).to(tokens.dtype) * tokens
        return out

    def _moe_forward(self, hidden_states: Tensor):
        shape = hidden_states.shape
        hidden_states = self._jitter(hidden_states)  # Mixtral's router jitter, as converted
        flat = hidden_states.reshape(-1, shape[-1])
        routing = self._route_block(flat, hidden_states)
        _record_router_logits(routing.logits)  # the clean path's only (§2.4)
        if self.training:
            T = flat.shape[0]
            x_hat = self.perturb(hidden_states).reshape(-1, shape[-1])
            noisy = (
                self._route_block(x_hat, hidden_states) if self.route_noisy == "own" else routing
            )
            weight = torch.cat([routing.weight, noisy.weight.to(routing.weight.dtype)])
            both = self._run(
                torch.cat([flat, x_hat]),
                torch.cat([routing.expert, noisy.expert]),
                weight,
                routing.interpolate,
            )
            y, y_hat = both[:T], both[T:]
            g = self._gate(flat, y)
            out = g * y + (1.0 - g) * y_hat
            self.last_s2moe_loss = self._unc_loss(flat, x_hat, y, y_hat)
        else:
            out = self._run(flat, routing.expert, routing.weight, routing.interpolate)
            if self.eval_output == "gated":
                out = self._gate(flat, out) * out
            self.last_s2moe_loss = None
        shared = self._shared_output(flat, hidden_states)
        if shared is not None:
            out = out + shared.to(out.dtype)
        out = out.reshape(shape)
        return (out, routing.weight) if self._spec.returns_scores else out


def s2moe_loss(model: nn.Module, weight: float | None = None) -> Tensor:
    """The weighted sum of the InfoNCE losses (``last_s2moe_loss``) of ``model``'s S2MoE blocks
    from its latest training forward, to add to the model's loss; ``weight`` defaults to
    ``DEFAULT_LOSS_WEIGHTS["s2moe_unc"]`` (0.1, specs/s2moe.md §4).

    Raises:
        ValueError: ``model`` has no :class:`ConvertedS2MoE` block, or none has run a training
            forward since its last eval forward.
    """
    blocks = [m for m in model.modules() if isinstance(m, ConvertedS2MoE)]
    if not blocks:
        raise ValueError("s2moe_loss: model has no block converted with layer='s2moe'")
    losses = [b.last_s2moe_loss for b in blocks if b.last_s2moe_loss is not None]
    if not losses:
        raise ValueError("s2moe_loss: no S2MoE block has run a training forward yet")
    w = DEFAULT_LOSS_WEIGHTS["s2moe_unc"] if weight is None else weight
    return w * torch.stack(losses).sum()
