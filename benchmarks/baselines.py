"""The MoE implementations smoe is measured against, built from the weights of one MoELayer.

Every baseline is a full layer (route + dispatch + experts + combine) with the same signature as
``MoELayer``'s output: ``forward(x [..., d]) -> y [..., d]``. They all route with the same math
(:func:`torch_route`: float32 logits from the smoe router's weight, plus the load-pattern bias,
softmax, top-k, optional renormalisation), so a baseline computes the same function as the smoe
layer it was built from; only the dispatch and expert computation differ:

- ``sort+grouped_mm``: torchtitan's MoE (``torchtitan/models/moe``): stable argsort of the
  flat expert ids, ``histc`` counts, gather, three ``torch._grouped_mm`` (w1 gate, w3 up, w2 down,
  gelu experts: two), scores applied after the experts, ``scatter_add`` back.
- ``gshard-einsum``: GShard / fairseq / Mesh-TensorFlow dispatch: tokens in groups of S, a one-hot
  dispatch mask and combine tensor ``[G, S, E, C]`` padded to capacity ``C = ceil(k S cf / E)``,
  einsum in, batched expert GEMMs on ``[E, G*C, d]``, einsum out. Assignments past an expert's
  capacity are dropped (rank-major, as in GShard's top-2 gating), so under skewed loads it does
  less expert work than a dropless layer.
- ``transformers-<impl>``: transformers' own experts module (``MixtralExperts`` for SwiGLU,
  ``NemotronHExperts`` for plain GELU MLPs) with ``experts_implementation`` eager, grouped_mm or
  batched_mm, called as ``experts(x, top_k_index, top_k_weights)`` after :func:`torch_route`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smoe import MoELayer

HF_IMPLS = ("eager", "grouped_mm", "batched_mm")
BATCHED_MM_MAX_BYTES = 1 << 30  # batched_mm gathers one weight matrix per assignment


def torch_route(
    x: Tensor, gate_weight: Tensor, k: int, bias: Tensor | None, renormalize: bool
) -> tuple[Tensor, Tensor]:
    """Mixtral-style routing in plain torch: ``(top_k_index [T, k] int64, weights [T, k])``.

    Logits in float32 (as smoe's TopKRouter), weights returned in x's dtype (as transformers).
    """
    logits = F.linear(x.float(), gate_weight.float())
    if bias is not None:
        logits = logits + bias
    weight, index = logits.softmax(dim=-1).topk(k, dim=-1)
    if renormalize:
        weight = weight / weight.sum(dim=-1, keepdim=True)
    return index, weight.to(x.dtype)


def _activate(h: Tensor, activation: str) -> Tensor:
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


class RoutedMoE(nn.Module):
    """Router (:func:`torch_route`) + an ``experts(x [T, d], index [T, k], weight [T, k])``."""

    def __init__(
        self,
        experts: nn.Module | Callable[[Tensor, Tensor, Tensor], Tensor],
        gate_weight: Tensor,
        k: int,
        bias: Tensor | None,
        renormalize: bool,
    ) -> None:
        super().__init__()
        self.experts, self.gate_weight, self.k = experts, gate_weight, k
        self.bias, self.renormalize = bias, renormalize

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        index, weight = torch_route(flat, self.gate_weight, self.k, self.bias, self.renormalize)
        return self.experts(flat, index, weight).reshape(x.shape)


class SortGroupedMM(nn.Module):
    """torchtitan's token-choice MoE: argsort + gather + ``torch._grouped_mm`` + scatter_add.

    Uses the smoe layer's weight tensors directly (views, no copy): ``w_in [E, inner, d]`` split
    into torchtitan's w1 (gate) and w3 (up), ``w_out [E, d, d_ff]`` as w2.
    """

    def __init__(self, w_in: Tensor, w_out: Tensor, activation: str) -> None:
        super().__init__()
        self.w_in, self.w_out, self.activation = w_in, w_out, activation
        self.num_experts = w_in.shape[0]

    def forward(self, x: Tensor, index: Tensor, weight: Tensor) -> Tensor:
        E, k, d = self.num_experts, index.shape[1], x.shape[1]
        flat = index.reshape(-1)
        counts = torch.histc(flat.float(), bins=E, min=0, max=E - 1)  # as torchtitan (float)
        order = torch.argsort(flat, stable=True)
        scores = weight.reshape(-1)[order]
        token = order // k
        routed = torch.gather(x, 0, token.reshape(-1, 1).expand(-1, d))
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        if self.activation == "swiglu":
            f = self.w_out.shape[2]
            w1, w3 = self.w_in[:, :f], self.w_in[:, f:]
            h = F.silu(torch._grouped_mm(routed, w1.transpose(-2, -1), offs=offsets))
            h = h * torch._grouped_mm(routed, w3.transpose(-2, -1), offs=offsets)
        else:
            h = F.gelu(torch._grouped_mm(routed, self.w_in.transpose(-2, -1), offs=offsets))
        out = torch._grouped_mm(h, self.w_out.transpose(-2, -1), offs=offsets)
        out = (out.float() * scores.float().reshape(-1, 1)).to(x.dtype)
        y = torch.zeros_like(x)
        return y.scatter_add(0, token.reshape(-1, 1).expand(-1, d), out)


def gshard_capacity(k: int, group: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert and group: ``ceil(k * S * cf / E)``, at least 1 (GShard's formula)."""
    return max(1, math.ceil(k * group * capacity_factor / num_experts))


class GShardEinsum(nn.Module):
    """GShard one-hot einsum dispatch with capacity-padded expert batches.

    Args:
        w_in, w_out: the smoe layer's expert weights (used directly).
        activation: ``"gelu"`` or ``"swiglu"``.
        capacity_factor: cf; ``C = ceil(k * S * cf / E)`` slots per expert and group.
        group_size: S, tokens per group (Mesh-TensorFlow's default 1024); T must be a multiple
            of min(S, T).
    """

    def __init__(
        self,
        w_in: Tensor,
        w_out: Tensor,
        activation: str,
        capacity_factor: float = 1.25,
        group_size: int = 1024,
    ) -> None:
        super().__init__()
        self.w_in, self.w_out, self.activation = w_in, w_out, activation
        self.num_experts, self.capacity_factor, self.group_size = (
            w_in.shape[0],
            capacity_factor,
            group_size,
        )

    def capacity(self, tokens: int, k: int) -> int:
        S = min(self.group_size, tokens)
        return gshard_capacity(k, S, self.num_experts, self.capacity_factor)

    def forward(self, x: Tensor, index: Tensor, weight: Tensor) -> Tensor:
        T, d = x.shape
        k, E = index.shape[1], self.num_experts
        S = min(self.group_size, T)
        if T % S:
            raise ValueError(f"GShardEinsum: T={T} must be a multiple of the group size {S}")
        G, C = T // S, self.capacity(T, k)
        mask = F.one_hot(index.reshape(G, S, k), E)  # [G, S, k, E]
        # Rank-major positions: all first choices of a group queue before any second choice.
        ranked = mask.permute(0, 2, 1, 3).reshape(G, k * S, E)
        pos = (torch.cumsum(ranked, dim=1) - 1).reshape(G, k, S, E).permute(0, 2, 1, 3)
        keep = mask * (pos < C)  # [G, S, k, E]
        loc = (pos * keep).sum(-1)  # [G, S, k] slot within the chosen expert
        slot = F.one_hot(loc, C) * keep.sum(-1, keepdim=True)  # [G, S, k, C]
        dispatch = torch.einsum("gske,gskc->gsec", keep.to(x.dtype), slot.to(x.dtype))
        weighted = keep.to(x.dtype) * weight.reshape(G, S, k, 1)
        combine = torch.einsum("gske,gskc->gsec", weighted, slot.to(x.dtype))
        xe = torch.einsum("gsec,gsd->egcd", dispatch, x.reshape(G, S, d)).reshape(E, G * C, d)
        h = _activate(torch.bmm(xe, self.w_in.transpose(1, 2)), self.activation)
        ye = torch.bmm(h, self.w_out.transpose(1, 2)).reshape(E, G, C, d)
        return torch.einsum("gsec,egcd->gsd", combine, ye).reshape(T, d)


def hf_experts(ours: MoELayer, impl: str) -> nn.Module:
    """transformers' experts module for ``ours``'s shape and activation, with its weights copied.

    SwiGLU: ``MixtralExperts`` (``gate_up_proj [E, 2f, d]``, gate first, as smoe's ``w_in``);
    GELU: ``NemotronHExperts`` (non-gated ``up_proj [E, f, d]``) with ``mlp_hidden_act="gelu"``.
    Raises ImportError when transformers is missing.
    """
    ex = ours.experts
    E, d, f = ex.num_experts, ex.d_model, ex.d_ff
    if ex.activation == "swiglu":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        cfg = MixtralConfig(
            hidden_size=d,
            intermediate_size=f,
            num_local_experts=E,
            hidden_act="silu",
            experts_implementation=impl,
        )
        module = MixtralExperts(cfg)
        w_in_name = "gate_up_proj"
    else:
        from transformers import NemotronHConfig
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

        cfg = NemotronHConfig(
            hidden_size=d,
            moe_intermediate_size=f,
            n_routed_experts=E,
            mlp_hidden_act="gelu",
            experts_implementation=impl,
        )
        module = NemotronHExperts(cfg)
        w_in_name = "up_proj"
    module = module.to(device=ex.w_in.device, dtype=ex.w_in.dtype)
    with torch.no_grad():  # both store experts as [E, out, in]
        getattr(module, w_in_name).copy_(ex.w_in)
        module.down_proj.copy_(ex.w_out)
    return module


class _LongIndex(nn.Module):
    """transformers' experts take int64 indices (they index with them and one_hot them)."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.inner = experts

    def forward(self, x: Tensor, index: Tensor, weight: Tensor) -> Tensor:
        return self.inner(x, index.long(), weight)


def batched_mm_bytes(tokens: int, k: int, ours: MoELayer) -> int:
    """Bytes of the per-assignment weight copies transformers' batched_mm gathers (forward)."""
    ex = ours.experts
    per = ex.w_in[0].numel() + ex.w_out[0].numel()
    return tokens * k * per * ex.w_in.element_size()


def build_baselines(
    ours: MoELayer,
    k: int,
    *,
    tokens: int,
    bias: Tensor | None = None,
    renormalize: bool = True,
    capacity_factor: float | None = None,
    transformers: bool = True,
    batched_mm_max_bytes: int = BATCHED_MM_MAX_BYTES,
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Every baseline for ``ours`` as ``{name: module}``, plus ``{name: reason}`` for those skipped.

    Args:
        ours: the smoe layer whose weights (router weight, w_in, w_out) the baselines use.
        k: experts per token.
        tokens: T the layer will see (decides whether batched_mm fits in memory).
        bias: ``[T, E]`` load-pattern bias added to the router logits, or None.
        renormalize: as the smoe router.
        capacity_factor: the GShard baseline's cf; None means GShard's usual 1.25.
        transformers: include transformers' experts modules (if importable).
        batched_mm_max_bytes: skip batched_mm when its gathered weights would exceed this.
    """
    gate = ours.router.weight
    ex = ours.experts
    act = ex.activation

    def routed(experts) -> RoutedMoE:
        return RoutedMoE(experts, gate, k, bias, renormalize)

    out: dict[str, nn.Module] = {
        "sort+grouped_mm": routed(SortGroupedMM(ex.w_in, ex.w_out, act)),
        "gshard-einsum": routed(
            GShardEinsum(ex.w_in, ex.w_out, act, capacity_factor=capacity_factor or 1.25)
        ),
    }
    skipped: dict[str, str] = {}
    if not transformers:
        return out, skipped
    for impl in HF_IMPLS:
        name = f"transformers-{impl}"
        need = batched_mm_bytes(tokens, k, ours)
        if impl == "batched_mm" and need > batched_mm_max_bytes:
            skipped[name] = f"memory: gathers {need / 2**30:.1f} GiB of weights"
            continue
        try:
            out[name] = routed(_LongIndex(hf_experts(ours, impl)))
        except (ImportError, KeyError, TypeError, ValueError) as e:  # absent, or no such impl
            skipped[name] = f"unavailable: {type(e).__name__}: {e}"[:160]
    return out, skipped
