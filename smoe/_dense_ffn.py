"""Reading a dense FFN of timm or transformers as :class:`smoe.Experts` weights (for
:func:`smoe.upcycle.moefy`). Blocks are recognised by their children and attributes, so neither
library is imported; each refusal names the block class and the attribute."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smoe.experts import ACTIVATIONS

_FFN_NAMES = ("mlp", "ffn", "feed_forward", "feedforward")
_FFN_SUFFIXES = ("mlp", "ffn", "feedforward", "intermediate")
SUPPORTED = (
    "timm Mlp/GluMlp/SwiGLU, transformers fc1/fc2 MLPs (ViTMLP, CLIPMLP), Llama-family MLPs "
    "(gate_proj/up_proj/down_proj), GPT2MLP, BERT-style intermediate + output"
)


class DenseParts(NamedTuple):
    """A dense FFN in :class:`smoe.Experts` layout (``w_in [inner, d]``, gate rows first)."""

    w_in: Tensor
    b_in: Tensor | None
    w_out: Tensor
    b_out: Tensor | None
    activation: str
    hidden_dropout: float
    drop: nn.Module | None  # the output dropout module, kept as is
    causal: bool


_GELU = {"GELUActivation", "GELU"}  # transformers' and timm's exact-erf GELU
_GELU_TANH = {"NewGELUActivation", "GELUTanh", "FastGELUActivation", "GELUPytorchTanh"}
_SILU = {"SiLUActivation", "Swish", "SiLU"}


def _act_kind(act: object) -> str | None:
    """``"gelu"``, ``"gelu_tanh"``, ``"silu"``, ``"relu"`` or None (something else)."""
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    if isinstance(act, nn.SiLU):
        return "silu"
    if isinstance(act, nn.ReLU):
        return "relu"
    funcs = {F.gelu: "gelu", F.silu: "silu", F.relu: "relu", torch.relu: "relu"}
    if callable(act) and not isinstance(act, nn.Module):
        return funcs.get(act)  # type: ignore[call-overload]
    name, module = type(act).__name__, type(act).__module__
    if not module.startswith(("transformers.", "timm.")):
        return None
    if name in _GELU:
        return "gelu"
    if name in _GELU_TANH:
        return "gelu_tanh"
    return "silu" if name in _SILU else None


def _need(cls: str, what: str, act: object, gated: bool) -> str:
    """The Experts activation for ``act``, or a ValueError naming the block class."""
    kind = _act_kind(act)
    if gated:
        if kind != "silu":
            raise ValueError(
                f"moefy: {cls}.{what} is {act!r}; a gated FFN needs SiLU (SwiGLU), the only "
                "gated activation smoe.Experts has"
            )
        return "swiglu"
    if kind is None or kind == "silu":
        raise ValueError(
            f"moefy: {cls}.{what} is {act!r}; smoe.Experts has GELU (exact or tanh) and ReLU"
        )
    if kind not in ACTIVATIONS:
        raise ValueError(f"moefy: {cls}.{what} is {act!r}; smoe.Experts has {ACTIVATIONS}")
    return kind


def _linear(cls: str, name: str, m: object) -> nn.Linear:
    if not isinstance(m, nn.Linear):
        raise ValueError(f"moefy: {cls}.{name} must be an nn.Linear, got {type(m).__name__}")
    return m


def _p(drop: object) -> float:
    return float(drop.p) if isinstance(drop, nn.Dropout) else 0.0


def _cat(gate: nn.Linear, up: nn.Linear) -> tuple[Tensor, Tensor | None]:
    """SwiGLU's ``w_in`` (gate rows first) and its bias (a missing one of two is zero)."""
    if gate.bias is None and up.bias is None:
        return torch.cat([gate.weight, up.weight]), None
    bias = [
        x.bias if x.bias is not None else x.weight.new_zeros(x.out_features) for x in (gate, up)
    ]
    return torch.cat([gate.weight, up.weight]), torch.cat(bias)


def _timm_parts(m: nn.Module) -> DenseParts:
    cls = type(m).__name__
    norm = getattr(m, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        raise ValueError(f"moefy: {cls} has a norm between its linears ({norm}); not supported")
    fc2 = _linear(cls, "fc2", m.fc2)
    if hasattr(m, "fc1_g"):  # SwiGLU: act(fc1_g x) * fc1_x x
        act = _need(cls, "act", m.act, True)
        w_in, b_in = _cat(_linear(cls, "fc1_g", m.fc1_g), _linear(cls, "fc1_x", m.fc1_x))
    elif hasattr(m, "gate_last"):  # GluMlp: x1 * act(x2) (gate_last) or act(x1) * x2
        fc1, act = _linear(cls, "fc1", m.fc1), _need(cls, "act", m.act, True)
        half = fc1.out_features // 2
        order = [slice(half, None), slice(0, half)] if m.gate_last else [slice(None)]
        w_in = torch.cat([fc1.weight[s] for s in order])
        b_in = None if fc1.bias is None else torch.cat([fc1.bias[s] for s in order])
    else:  # Mlp
        fc1, act = _linear(cls, "fc1", m.fc1), _need(cls, "act", m.act, False)
        w_in, b_in = fc1.weight, fc1.bias
    hidden = _p(getattr(m, "drop1", None))
    return DenseParts(
        w_in, b_in, fc2.weight, fc2.bias, act, hidden, getattr(m, "drop2", None), False
    )


def _fc_parts(m: nn.Module, act_name: str) -> DenseParts:
    """A transformers ``fc2(act(fc1 x))`` MLP (ViTMLP, CLIPMLP, ...)."""
    cls = type(m).__name__
    for extra in ("dropout", "activation_dropout", "hidden_dropout"):
        if getattr(m, extra, 0):  # functional dropout in forward: its place is unknown
            raise ValueError(f"moefy: {cls} has {extra}; not supported")
    act = _need(cls, act_name, getattr(m, act_name), False)
    fc1, fc2 = _linear(cls, "fc1", m.fc1), _linear(cls, "fc2", m.fc2)
    return DenseParts(fc1.weight, fc1.bias, fc2.weight, fc2.bias, act, 0.0, None, False)


def _llama_parts(m: nn.Module) -> DenseParts:
    cls = type(m).__name__
    act = _need(cls, "act_fn", m.act_fn, True)
    w_in, b_in = _cat(_linear(cls, "gate_proj", m.gate_proj), _linear(cls, "up_proj", m.up_proj))
    down = _linear(cls, "down_proj", m.down_proj)
    return DenseParts(w_in, b_in, down.weight, down.bias, act, 0.0, None, True)


def _gpt2_parts(m: nn.Module) -> DenseParts:
    cls = type(m).__name__
    for name in ("c_fc", "c_proj"):
        if type(getattr(m, name)).__name__ != "Conv1D":
            raise ValueError(f"moefy: {cls}.{name} must be a transformers Conv1D")
    act = _need(cls, "act", m.act, False)
    fc, proj = m.c_fc, m.c_proj  # Conv1D: y = x @ W + b, W [in, out] (nn.Linear's transpose)
    return DenseParts(fc.weight.t(), fc.bias, proj.weight.t(), proj.bias, act, 0.0, m.dropout, True)


def pair_parts(inter: nn.Module, out: nn.Module) -> DenseParts:
    cls = type(inter).__name__
    act = _need(cls, "intermediate_act_fn", inter.intermediate_act_fn, False)
    d1, d2 = _linear(cls, "dense", inter.dense), _linear(type(out).__name__, "dense", out.dense)
    if d2.in_features != d1.out_features or d2.out_features != d1.in_features:
        raise ValueError(f"moefy: {type(out).__name__}.dense does not invert {cls}.dense's shape")
    return DenseParts(d1.weight, d1.bias, d2.weight, d2.bias, act, 0.0, None, False)


def is_pair(parent: nn.Module) -> bool:
    inter, out = getattr(parent, "intermediate", None), getattr(parent, "output", None)
    return (
        isinstance(inter, nn.Module)
        and hasattr(inter, "dense")
        and hasattr(inter, "intermediate_act_fn")
        and isinstance(getattr(out, "dense", None), nn.Linear)
    )


_TIMM_OPTIONAL = {"act", "drop1", "norm", "drop2"}


def classify(m: nn.Module) -> Callable[[], DenseParts] | None:
    """How to read ``m`` as a dense FFN (by its children and attributes), or None."""
    names = {n for n, _ in m.named_children()}

    def only(required: set[str], optional: set[str]) -> bool:
        return required <= names <= required | optional

    if hasattr(m, "act") and (
        only({"fc1_g", "fc1_x", "fc2"}, _TIMM_OPTIONAL) or only({"fc1", "fc2"}, _TIMM_OPTIONAL)
    ):
        return partial(_timm_parts, m)
    for act in ("activation_fn", "activation"):
        if hasattr(m, act) and only({"fc1", "fc2"}, {act}):
            return partial(_fc_parts, m, act)
    if hasattr(m, "act_fn") and only({"gate_proj", "up_proj", "down_proj"}, {"act_fn"}):
        return partial(_llama_parts, m)
    if hasattr(m, "act") and only({"c_fc", "c_proj"}, {"act", "dropout"}):
        return partial(_gpt2_parts, m)
    return None


def looks_like_ffn(name: str, m: nn.Module) -> bool:
    """Whether an unrecognised child looks like a feed-forward block (refused by name)."""
    return name.lower() in _FFN_NAMES or type(m).__name__.lower().endswith(_FFN_SUFFIXES)
