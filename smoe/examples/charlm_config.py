"""The char-LM run's configuration (:class:`CharLMConfig`, recorded in every run's JSON), the
tests' quick size, the CLI's ``key=value`` options and the learning-rate schedule."""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CharLMConfig", "lr_at", "parse_options", "quick_config"]


@dataclass
class CharLMConfig:
    """Everything a char-LM run depends on (recorded in its JSON)."""

    router: str = "topk"
    router_options: dict[str, Any] = field(default_factory=dict)
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    context: int = 128
    num_experts: int = 8
    k: int = 2
    d_ff: int | None = None  # 4 d / k: equal active expert compute for every k
    moe_every: int = 1
    dropout: float = 0.0
    batch_size: int = 32
    steps: int = 1000
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 4  # of batch_size x context characters, the same tokens every time
    attack_rate: float = 0.04
    attack_placeholder: str = "AAA"
    attack_seed: int = 0
    threads: int | None = None
    # False: routers may couple the batch's tokens in training (SSR's Sinkhorn steps); evaluation
    # is causal either way (smoe.models.CharLM)
    causal_training: bool = True
    # "pre_ln" (the leaderboard) or "post_ln" (MomentumSMoE's WikiText-103 block; see CharLM)
    layout: str = "pre_ln"
    # options of the MomentumMoE wrapper of a stack-level router ("momentum", "adam", ...)
    momentum_options: dict[str, Any] = field(default_factory=dict)
    # options of the layer of a layer-level router ("s2moe": smoe.S2MoELayer's; see CharLM)
    layer_options: dict[str, Any] = field(default_factory=dict)
    # the experts: activation ("gelu", "relu", "swiglu"), biases, dropout inside each expert
    activation: str = "gelu"
    expert_bias: bool = False
    expert_dropout: float = 0.0
    # "causal" (the leaderboard) or "xl": Transformer-XL attention over the previous attn_span
    # tokens (None: context) with a memory carried across batches when xl_memory (see CharLM)
    attention: str = "causal"
    attn_span: int | None = None
    xl_memory: bool = True
    # coefficients of the routers' auxiliary losses by name (MoEAux.loss; unnamed ones take
    # smoe.losses.DEFAULT_LOSS_WEIGHTS), e.g. {"balance": 0.01, "z": 0.0}
    aux_weights: dict[str, float] = field(default_factory=dict)


def quick_config(**overrides: Any) -> CharLMConfig:
    """A run of a few seconds (the tests' and notebook's size)."""
    base = dict(
        d_model=32,
        n_layers=2,
        n_heads=2,
        context=32,
        num_experts=4,
        batch_size=8,
        steps=40,
        warmup=5,
        eval_every=10,
        eval_batches=2,
    )
    return CharLMConfig(**{**base, **overrides})


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["capacity_factor=1.25", "noisy=True"]`` -> ``{"capacity_factor": 1.25, "noisy": True}``
    (values are Python literals; anything else stays a string)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--router-option must be key=value, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def lr_at(cfg: CharLMConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
