"""The routers of transformers' MoE blocks on smoe's ops, for :func:`smoe.convert` with
``router=None``. Each aliases the original router's tensors under the same names (``weight``,
GPT-OSS's ``bias``, DeepSeek-V3's ``e_score_correction_bias``), so the state_dict keys and values
are the original's, and returns a :class:`smoe.Routing`.

- :class:`SoftmaxTopKGate`: softmax → top-k (→ renormalise): Mixtral (renormalised, float32
  weights), Qwen2-MoE, Qwen3-MoE and OLMoE (``norm_topk_prob``, weights in the logits' dtype), and
  GPT-OSS (a biased linear, softmax over the top-k logits: the renormalised softmax).
  ``smoe.ops.topk_softmax``.
- :class:`SigmoidGroupGate`: DeepSeek-V3's sigmoid scores, ``e_score_correction_bias`` for the
  selection only, group-limited top-k, ``norm_topk_prob`` and ``routed_scaling_factor``.
  ``smoe.ops.topk_sigmoid``. Its bias is the aux-loss-free bias :class:`smoe.ExpertBiasUpdater`
  trains (the counts buffer is not persistent: the state_dict keys stay transformers').
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smoe import ops
from smoe.routing.base import Float32Buffers, Routing

__all__ = ["SigmoidGroupGate", "SoftmaxTopKGate"]


class SoftmaxTopKGate(nn.Module):
    """transformers' softmax top-k router (see the module docstring) on ``topk_softmax``.

    Args:
        gate: the original router module (its ``weight`` [E, d], and ``bias`` [E] if it has one,
            are aliased, not copied).
        renormalize: the k weights sum to 1.
        float32_weights: return float32 weights (Mixtral) rather than the logits' dtype.
    """

    def __init__(self, gate: nn.Module, *, renormalize: bool, float32_weights: bool) -> None:
        super().__init__()
        self.weight = gate.weight
        self.bias = getattr(gate, "bias", None)
        self.top_k, self.num_experts = int(gate.top_k), int(gate.num_experts)
        self.renormalize, self.float32_weights = bool(renormalize), bool(float32_weights)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, renormalize={self.renormalize}"

    def forward(self, x: Tensor, context=None) -> Routing:
        logits = F.linear(x, self.weight, self.bias)
        weight, expert = ops.topk_softmax(logits.float(), self.top_k, renormalize=self.renormalize)
        weight = weight if self.float32_weights else weight.to(logits.dtype)
        return Routing(expert, weight, logits, {})


class SigmoidGroupGate(Float32Buffers, nn.Module):
    """DeepSeek-V3's router (``DeepseekV3TopkRouter``) on ``topk_sigmoid``, computed in float32.

    Args:
        gate: the original router: its ``weight`` and ``e_score_correction_bias`` are aliased;
            ``num_group``, ``topk_group``, ``norm_topk_prob`` and ``routed_scaling_factor`` read.
    """

    expert_bias_buffer = "e_score_correction_bias"  # the bias smoe.ExpertBiasUpdater moves
    keep_float32 = ("e_score_correction_bias", "expert_counts")

    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.weight = gate.weight
        self.register_buffer("e_score_correction_bias", gate.e_score_correction_bias)
        self.top_k, self.num_experts = int(gate.top_k), int(gate.num_experts)
        self.n_group, self.topk_group = int(gate.num_group), int(gate.topk_group)
        self.norm_topk_prob = bool(gate.norm_topk_prob)
        self.routed_scaling_factor = float(gate.routed_scaling_factor)
        counts = torch.zeros(self.num_experts, device=gate.weight.device)
        self.register_buffer("expert_counts", counts, persistent=False)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, n_group={self.n_group}, "
            f"topk_group={self.topk_group}, norm_topk_prob={self.norm_topk_prob}, "
            f"routed_scaling_factor={self.routed_scaling_factor}"
        )

    def forward(self, x: Tensor, context=None) -> Routing:
        logits = F.linear(x.float(), self.weight.float())
        weight, expert = ops.topk_sigmoid(
            logits,
            self.top_k,
            selection_bias=self.e_score_correction_bias.float(),
            n_group=self.n_group,
            topk_group=self.topk_group,
            renormalize=self.norm_topk_prob,
            scale=self.routed_scaling_factor,
        )
        if self.training:  # the loads smoe.ExpertBiasUpdater reads (no gradient, no host sync)
            with torch.no_grad():
                ones = torch.ones(expert.numel(), device=x.device, dtype=self.expert_counts.dtype)
                self.expert_counts.scatter_add_(0, expert.reshape(-1).long(), ones)
        return Routing(expert, weight, logits, {})
