"""Grouped expert MLPs over ``grouped_mm``: one GEMM per expert group, no loop over experts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smoe import ops

ACTIVATIONS = ("gelu", "swiglu", "relu", "gelu_tanh")
_ACT = {
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
}


def check_tokens(owner: str, name: str, x: Tensor, d_model: int, device: torch.device) -> None:
    """Tokens ``[..., d_model]``: a dense floating tensor on the module's device."""
    if not isinstance(x, Tensor) or x.layout != torch.strided:
        what = x.layout if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{owner}: {name} must be a dense (strided) tensor, got {what}")
    if x.dim() == 0 or x.shape[-1] != d_model:
        raise ValueError(
            f"{owner}: {name} must end in d_model={d_model}, got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{owner}: {name} must be a floating-point tensor, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{owner}: {name} must be on the module's device {device}, got {x.device}")


def row_expert(offsets: Tensor, rows: int, num_experts: int) -> Tensor:
    """The expert of each of ``rows`` grouped rows (``offsets [E+1]``); padding rows past
    ``offsets[E]`` map to the last expert (combine ignores them)."""
    r = torch.arange(rows, device=offsets.device)
    return torch.searchsorted(offsets[1:], r, right=True).clamp_max(num_experts - 1)


def needs_grad(x: Tensor, params) -> bool:
    """Whether a call on ``x`` with ``params`` records a gradient: grad mode is on and x or a
    parameter requires one (where it does not, the experts may run the fused, forward-only op)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))


def gathers(x: Tensor, plan: ops.Plan) -> bool:
    """Whether :class:`Experts` runs its first GEMM as :func:`smoe.ops.gather_mm` on the tokens
    ``x [T, d]`` of ``plan`` (when it needs a gradient): on CPU, where the grouped rows
    ``[M, d]`` that permute would write, and the graph would hold for the backward, pass
    ``ops.experts.FUSE_MIN_BYTES``. Below that, permute is cheap and
    grouped_mm's (expert, row block, column block) items keep more threads busy than
    gather_mm's one task per row block. On CUDA gather_mm is the unfused chain, so permute
    runs as itself. The size is in the dtype the op runs in (autocast's under torch.autocast). On
    a symbolic token count: yes, unless under 4 MiB for every count, and gather_mm applies the
    rule when it runs (:func:`gather_min_bytes`)."""
    return x.device.type == "cpu" and ops.experts.may_pass_fuse_bytes(_grouped_bytes(x, plan))


def gather_min_bytes(x: Tensor, plan: ops.Plan) -> int:
    """The ``gather_min_bytes`` of a :func:`smoe.ops.gather_mm` call where :func:`gathers`: 0 on
    a size known to pass the rule, ``FUSE_MIN_BYTES`` on a symbolic one (see
    :func:`smoe.ops.experts.min_bytes_rule`)."""
    return ops.experts.min_bytes_rule(_grouped_bytes(x, plan))


def _grouped_bytes(x: Tensor, plan: ops.Plan):
    return plan.token.shape[0] * x.shape[1] * ops.experts.run_itemsize(x)


def experts_on_tokens(experts: nn.Module, tokens: Tensor, plan: ops.Plan) -> Tensor:
    """``experts`` (an :class:`Experts` or any module called as ``experts(x_sorted, offsets)``) on
    ``tokens [T, d]`` routed by ``plan``: grouped rows ``[M, d]``. A plain :class:`Experts`
    gathers through the plan itself (and fuses its MLP where no gradient is needed)."""
    if type(experts).forward is Experts.forward:
        return experts(tokens, plan.offsets, plan=plan)
    return experts(ops.permute(tokens, plan), plan.offsets)


class Experts(nn.Module):
    """E feed-forward experts applied to rows grouped by expert.

    Weights are stored as ``[E, out, in]`` (nn.Linear's and transformers' ``gate_up_proj`` /
    ``down_proj`` layout) and handed to :func:`smoe.ops.grouped_mm` as transposed views, which it
    uses without a copy.

    Args:
        num_experts: E.
        d_model: input and output width.
        d_ff: hidden width of each expert.
        activation: ``"gelu"`` (``W_out gelu(W_in x)``, exact erf GELU), ``"gelu_tanh"`` (its
            tanh approximation: GPT-2's ``gelu_new``), ``"relu"`` (the fastmoe experts of
            MomentumSMoE's reference code) or ``"swiglu"`` (``W_out (silu(W_gate x) * W_up x)``,
            gate rows first in ``w_in``).
        bias: add per-expert biases (needed to upcycle FFNs that have them, e.g. ViT MLPs).
        dropout: on the hidden activations, inside the expert (``W_out drop(act(W_in x))``, the
            reference MomentumSMoE expert); in [0, 1).
    """

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        activation: str = "gelu",
        *,
        bias: bool = False,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:  # also refuses NaN
            raise ValueError(f"Experts: dropout must be in [0, 1), got {dropout}")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"Experts: activation must be one of {ACTIVATIONS}, got {activation!r}"
            )
        if min(num_experts, d_model, d_ff) < 1:
            raise ValueError(
                f"Experts: num_experts, d_model and d_ff must be >= 1, got "
                f"{num_experts}, {d_model}, {d_ff}"
            )
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation = activation
        inner = 2 * d_ff if activation == "swiglu" else d_ff
        kw = {"device": device, "dtype": dtype}
        self.w_in = nn.Parameter(torch.empty(num_experts, inner, d_model, **kw))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_model, d_ff, **kw))
        self.b_in = nn.Parameter(torch.empty(num_experts, inner, **kw)) if bias else None
        self.b_out = nn.Parameter(torch.empty(num_experts, d_model, **kw)) if bias else None
        self.drop = nn.Dropout(dropout) if dropout > 0 else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init, per expert."""
        for w, b in ((self.w_in, self.b_in), (self.w_out, self.b_out)):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
            f"activation={self.activation!r}, bias={self.b_in is not None}"
            + (f", dropout={self.drop.p}" if getattr(self, "drop", None) is not None else "")
        )

    def forward(self, x_sorted: Tensor, offsets: Tensor, *, plan: ops.Plan | None = None) -> Tensor:
        """``x_sorted [M, d_model]`` grouped by ``offsets [E+1]`` -> ``[M, d_model]``.

        With ``plan``, the first argument is the tokens ``[T, d_model]`` the plan routes (what
        :func:`smoe.ops.permute` would group), and ``offsets`` is ``plan.offsets``. Where no
        gradient is needed (inference: ``torch.no_grad``/``inference_mode``, or frozen experts on
        tokens that need none) and no dropout is active, the experts then run as one
        :func:`smoe.ops.expert_mlp`, which never materialises the grouped rows or the hidden;
        otherwise as permute -> grouped_mm -> activation -> grouped_mm, where on CPU the first
        two are one :func:`smoe.ops.gather_mm` once the grouped rows would pass
        ``ops.experts.FUSE_MIN_BYTES``: the autograd graph then holds the tokens, not their k
        grouped copies. The paths agree to float rounding (gather_mm bitwise).
        """
        # biases fused into the GEMMs (under autocast cast with the weights, as nn.Linear's)
        w_in = self.w_in.transpose(1, 2)
        if plan is not None:
            check_tokens("Experts", "x", x_sorted, self.d_model, self.w_in.device)
            if self._fusable(x_sorted):
                return ops.expert_mlp(
                    x_sorted,
                    offsets,
                    w_in,
                    self.w_out.transpose(1, 2),
                    b_in=self.b_in,
                    b_out=self.b_out,
                    activation=self.activation,
                    plan=plan,
                )
            if gathers(x_sorted, plan):
                limit = gather_min_bytes(x_sorted, plan)
                h = ops.gather_mm(x_sorted, plan, w_in, self.b_in, gather_min_bytes=limit)
                return self._second_half(h, offsets)
            x_sorted = ops.permute(x_sorted, plan)
        check_tokens("Experts", "x_sorted", x_sorted, self.d_model, self.w_in.device)
        return self._second_half(ops.grouped_mm(x_sorted, w_in, offsets, self.b_in), offsets)

    def _second_half(self, h: Tensor, offsets: Tensor) -> Tensor:
        """The activation, dropout and second GEMM on the first GEMM's output ``h``."""
        if self.activation == "swiglu":
            a = ops.swiglu(h)
        else:
            a = _ACT[self.activation](h)
        drop = getattr(self, "drop", None)  # experts pickled before dropout have none
        if drop is not None:
            a = drop(a)
        return ops.grouped_mm(a, self.w_out.transpose(1, 2), offsets, self.b_out)

    def _fusable(self, x: Tensor) -> bool:
        """Whether the forward may run as one expert_mlp: no gradient needed, no active dropout."""
        drop = getattr(self, "drop", None)
        if drop is not None and drop.training:
            return False
        return not needs_grad(x, self.parameters())

    def _row_expert(self, offsets: Tensor, rows: int) -> Tensor:
        return row_expert(offsets, rows, self.num_experts)

    @classmethod
    def from_dense(cls, ffn: nn.Module, num_experts: int) -> Experts:
        """Upcycle a dense FFN: every expert starts as a copy of ``ffn`` (sparse upcycling).

        Understands modules with ``fc1``/``fc2`` (timm's Mlp, GELU), ``gate_proj``/``up_proj``/
        ``down_proj`` (LLaMA / Mistral MLPs, SwiGLU), and ``nn.Sequential(Linear, GELU, Linear)``.
        """
        first, second, gate, activation = _dense_parts(ffn)
        d_model, d_ff = first.in_features, first.out_features
        bias = first.bias is not None
        ref = first.weight
        experts = cls(
            num_experts, d_model, d_ff, activation, bias=bias, device=ref.device, dtype=ref.dtype
        )
        with torch.no_grad():
            w_in = first.weight if gate is None else torch.cat([gate.weight, first.weight], dim=0)
            experts.w_in.copy_(w_in.unsqueeze(0).expand_as(experts.w_in))
            experts.w_out.copy_(second.weight.unsqueeze(0).expand_as(experts.w_out))
            if bias:
                b_in = first.bias if gate is None else torch.cat([gate.bias, first.bias])
                experts.b_in.copy_(b_in.unsqueeze(0).expand_as(experts.b_in))
                experts.b_out.copy_(second.bias.unsqueeze(0).expand_as(experts.b_out))
        return experts


def _dense_parts(ffn: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear | None, str]:
    """(first linear, second linear, gate linear or None, activation) of a dense FFN."""
    if all(hasattr(ffn, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return ffn.up_proj, ffn.down_proj, ffn.gate_proj, "swiglu"
    if hasattr(ffn, "fc1") and hasattr(ffn, "fc2"):
        act = getattr(ffn, "act", nn.GELU())
        if not isinstance(act, nn.GELU):
            raise ValueError(f"Experts.from_dense: only GELU MLPs are supported, got {act}")
        return ffn.fc1, ffn.fc2, None, "gelu"
    if isinstance(ffn, nn.Sequential):
        mods = [m for m in ffn if not isinstance(m, nn.Dropout)]
        if (
            len(mods) == 3
            and isinstance(mods[0], nn.Linear)
            and isinstance(mods[1], nn.GELU)
            and isinstance(mods[2], nn.Linear)
        ):
            return mods[0], mods[2], None, "gelu"
    raise ValueError(
        "Experts.from_dense: ffn must have fc1/fc2 (GELU), gate_proj/up_proj/down_proj (SwiGLU), "
        f"or be nn.Sequential(Linear, GELU, Linear); got {type(ffn).__name__}"
    )


class StackedExperts(nn.Module):
    """E experts, each a stack of ``depth`` BASE-layer sub-layers ``x + FFN(LayerNorm(x))``
    (each sub-layer with its own per-expert LayerNorm and FFN): the expert of the X-MoE paper's
    parity runs (specs/xmoe.md §3.1, depth 3). ``MoELayer(..., experts="base_stack")`` builds it.

    Args:
        num_experts: E.
        d_model: input and output width.
        d_ff: hidden width of each sub-layer's FFN.
        activation: as in :class:`Experts`.
        depth: sub-layers per expert (>= 1).
        bias: per-expert FFN biases.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        activation: str = "gelu",
        *,
        depth: int = 3,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"StackedExperts: depth must be >= 1, got {depth}")
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation, self.depth = activation, depth
        self.ffns = nn.ModuleList(
            Experts(num_experts, d_model, d_ff, activation, bias=bias) for _ in range(depth)
        )
        self.norm_weight = nn.Parameter(torch.empty(depth, num_experts, d_model))
        self.norm_bias = nn.Parameter(torch.empty(depth, num_experts, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's init for the FFNs, LayerNorm's (1, 0) for the norms."""
        for ffn in self.ffns:
            ffn.reset_parameters()
        nn.init.ones_(self.norm_weight)
        nn.init.zeros_(self.norm_bias)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
            f"activation={self.activation!r}, depth={self.depth}"
        )

    def forward(self, x_sorted: Tensor, offsets: Tensor) -> Tensor:
        """``x_sorted [M, d_model]`` grouped by ``offsets [E+1]`` -> ``[M, d_model]``."""
        row_expert = self.ffns[0]._row_expert(offsets, x_sorted.shape[0])
        x = x_sorted
        for i, ffn in enumerate(self.ffns):
            y = F.layer_norm(x, (self.d_model,))
            y = y * self.norm_weight[i][row_expert] + self.norm_bias[i][row_expert]
            x = x + ffn(y, offsets)
        return x
