"""smoe as a transformers experts implementation: ``experts_implementation="smoe"``.

    import smoe.integrations.transformers  # registers "smoe" (idempotent)

    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="smoe")
    model.set_experts_implementation("smoe")       # or switch a loaded model
    model.config._experts_implementation = "smoe"   # or set it on the config

Every experts class of transformers decorated with ``@use_experts_implementation`` (Mixtral,
Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, GPT-OSS, ... about 70 families in transformers 5.x) then runs
its experts through smoe's dispatch: ``make_plan`` → ``permute`` → ``grouped_mm`` → gate →
``grouped_mm`` → ``combine``, on the module's own parameters (transposed views, no weight copies).

Honoured flags (set by the decorator): ``is_transposed``; ``has_gate`` (``gate_up_proj`` and a
gate, else ``up_proj`` and ``act_fn``); ``has_bias`` (per-expert biases, fused into the GEMMs);
``is_concatenated`` and a class's own ``_apply_gate`` (GPT-OSS's clamped, interleaved SwiGLU),
called between the GEMMs, while the default gate with a SiLU activation on concatenated weights
runs in smoe's fused ``swiglu`` kernel; ``has_post_expert_norm``; ``_is_expert_parallel``
(expert ids >= ``num_experts`` are another rank's: no output, no gradient). Routing weights may
be float32 with 16-bit activations; the combine accumulates in float32 and returns
``hidden_states``' dtype. Under ``torch.autocast`` the GEMMs run in the autocast dtype (the
``grouped_mm`` autocast rule). Deterministic; no host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from smoe import ops
from smoe.experts import gather_min_bytes, gathers, needs_grad

__all__ = ["expert_rows", "register", "run_experts", "smoe_experts_forward"]

NAME = "smoe"


def _weight(w: Tensor, transposed: bool) -> Tensor:
    """transformers' ``[E, d_out, d_in]`` (or ``[E, d_in, d_out]`` when ``is_transposed``) as
    grouped_mm's ``[E, d_in, d_out]``: a transposed view, never a copy."""
    return w if transposed else w.transpose(1, 2)


def _fused_swiglu(module: nn.Module) -> bool:
    """Whether the module's gate is transformers' default ``act_fn(gate) * up`` on concatenated
    ``[gate; up]`` columns with a SiLU activation: smoe's swiglu kernel computes exactly that."""
    from transformers.activations import SiLUActivation
    from transformers.integrations.moe import _default_apply_gate

    default_gate = getattr(type(module), "_apply_gate", None) is _default_apply_gate
    silu = isinstance(getattr(module, "act_fn", None), (nn.SiLU, SiLUActivation))
    return default_gate and silu and getattr(module, "is_concatenated", True)


def _check(module: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor):
    who = type(module).__name__
    if hidden_states.dim() != 2:
        raise ValueError(
            f"{who} (experts_implementation='smoe'): hidden_states must be [T, d], got shape "
            f"{tuple(hidden_states.shape)}"
        )
    T = hidden_states.shape[0]
    if top_k_index.dim() != 2 or top_k_index.shape[0] != T:
        raise ValueError(
            f"{who} (experts_implementation='smoe'): top_k_index must be [T, k] with T = {T}, got "
            f"shape {tuple(top_k_index.shape)}"
        )
    if top_k_index.dtype.is_floating_point or top_k_index.dtype == torch.bool:
        raise TypeError(
            f"{who} (experts_implementation='smoe'): top_k_index must be an integer tensor, got "
            f"{top_k_index.dtype}"
        )
    k, E = top_k_index.shape[1], module.num_experts
    if (
        top_k_weights.dim() != 2
        or top_k_weights.shape[0] != T
        or top_k_weights.shape[1]
        not in (
            k,
            E,
        )
    ):
        raise ValueError(
            f"{who} (experts_implementation='smoe'): top_k_weights must be [T, k] = [{T}, {k}] "
            f"(or [T, num_experts]), got shape {tuple(top_k_weights.shape)}"
        )


def smoe_experts_forward(
    self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """The experts forward of transformers' interface: ``hidden_states [T, d]``, ``top_k_index
    [T, k]`` (expert ids), ``top_k_weights [T, k]`` (or ``[T, num_experts]``, read at the chosen
    ids) -> ``[T, d]`` in ``hidden_states``' dtype."""
    _check(self, hidden_states, top_k_index, top_k_weights)
    E, k = self.num_experts, top_k_index.shape[1]
    expert = top_k_index.to(torch.int32)
    if getattr(self, "_is_expert_parallel", False):
        # another rank's experts (sentinel ids >= E): skipped by the plan, no output or gradient
        expert = torch.where(expert < E, expert, torch.full_like(expert, -1))
    weight = top_k_weights
    if weight.shape[1] != k:  # full [T, E] routing weights: the chosen experts' entries
        weight = weight.gather(1, expert.clamp(0, E - 1).long())
    return run_experts(self, hidden_states, ops.make_plan(expert, E), weight)


def run_experts(module: nn.Module, hidden_states: Tensor, plan: ops.Plan, weight: Tensor) -> Tensor:
    """A transformers experts module's experts on a dispatch plan: permute → grouped_mm → gate →
    grouped_mm → combine with ``weight [T, k]``; ``[T, d]`` in ``hidden_states``' dtype. Also the
    experts path of the blocks :func:`smoe.convert` builds (whose routers may make their own
    plans)."""
    if _fusable(module, hidden_states, plan):
        # inference with transformers' default SwiGLU at a size where it pays (or a symbolic
        # size: the op then decides when it runs): each expert's whole MLP in one op, which
        # never materialises the grouped rows or the hidden
        transposed, w_in, b_in, b_out = _parts(module)
        y = ops.expert_mlp(
            hidden_states,
            plan.offsets,
            _weight(w_in, transposed),
            _weight(module.down_proj, transposed),
            b_in=b_in,
            b_out=b_out,
            plan=plan,
        )
        if getattr(module, "has_post_expert_norm", False):
            y = module.post_expert_norm(y)
    elif gathers(hidden_states, plan):
        # grouped rows past 4 MiB (training, or inference the fused op does not take): the first
        # GEMM reads the tokens through the plan (gather_mm), so a graph keeps them instead of
        # their k grouped copies
        y = expert_rows(module, hidden_states, plan.offsets, plan=plan)
    else:
        y = expert_rows(module, ops.permute(hidden_states, plan), plan.offsets)
    out = ops.combine(y, weight.to(y.dtype), plan)
    return out.to(hidden_states.dtype)


def _fusable(module: nn.Module, x: Tensor, plan: ops.Plan) -> bool:
    """No gradient needed (inference, frozen experts), transformers' default SwiGLU gate, and a
    hidden large enough for the fused op to pay, or a symbolic one (smoe.ops.experts.fuses)."""
    if needs_grad(x, module.parameters(recurse=False)):
        return False
    if not (getattr(module, "has_gate", True) and _fused_swiglu(module)):
        return False
    w_in = _weight(module.gate_up_proj, bool(getattr(module, "is_transposed", False)))
    return ops.experts.fuses(x, w_in, plan)


def _parts(module: nn.Module) -> tuple[bool, Tensor, Tensor | None, Tensor | None]:
    """(is_transposed, the first projection, its bias, down_proj's bias) of an experts module."""
    transposed = bool(getattr(module, "is_transposed", False))
    has_gate, has_bias = getattr(module, "has_gate", True), getattr(module, "has_bias", False)
    w_in = module.gate_up_proj if has_gate else module.up_proj
    b_in = b_out = None
    if has_bias:  # fused into the GEMMs (grouped_mm's bias) in the weights' dtype, as it needs
        b_in = (module.gate_up_proj_bias if has_gate else module.up_proj_bias).to(w_in.dtype)
        b_out = module.down_proj_bias.to(module.down_proj.dtype)
    return transposed, w_in, b_in, b_out


def expert_rows(
    module: nn.Module, x: Tensor, offsets: Tensor, *, plan: ops.Plan | None = None
) -> Tensor:
    """A transformers experts module's experts on rows grouped by expert (``offsets [E+1]`` over
    the module's ``num_experts``): grouped_mm → gate → grouped_mm (→ post-expert norm), ``[M,
    d]``; padding rows past ``offsets[E]`` carry no bias. With ``plan``, ``x`` is the tokens
    ``[T, d]`` the plan routes and the first GEMM gathers them (:func:`smoe.ops.gather_mm`)."""
    transposed, w_in, b_in, b_out = _parts(module)
    has_gate = getattr(module, "has_gate", True)
    if plan is None:
        h = ops.grouped_mm(x, _weight(w_in, transposed), offsets, b_in)
    else:
        limit = gather_min_bytes(x, plan)
        h = ops.gather_mm(x, plan, _weight(w_in, transposed), b_in, gather_min_bytes=limit)
    if not has_gate:
        a = module.act_fn(h)
    elif _fused_swiglu(module):
        a = ops.swiglu(h)
    else:
        a = module._apply_gate(h)
    y = ops.grouped_mm(a.to(h.dtype), _weight(module.down_proj, transposed), offsets, b_out)
    if getattr(module, "has_post_expert_norm", False):
        y = module.post_expert_norm(y)
    return y


def register() -> None:
    """Register ``"smoe"`` with transformers' ``ExpertsInterface`` and, where this transformers
    has expert parallelism, its ``EPImplementationInterface`` (idempotent; done on import)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(NAME, smoe_experts_forward)
    try:
        from transformers.distributed.expert_parallel import EPImplementationInterface
    except ImportError:  # a transformers without expert parallelism
        return
    from smoe.integrations.transformers_ep import SmoeEP

    EPImplementationInterface.register(NAME, SmoeEP)


register()
