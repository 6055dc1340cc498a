"""The seeded inputs every determinism case builds from (never the global RNG state)."""

from __future__ import annotations

import torch
from torch import Tensor

SEED = 1234

Results = dict[str, Tensor]


def gen(salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + salt)


def randn(*shape: int, salt: int, device: str, dtype=torch.float32, scale: float = 1.0) -> Tensor:
    return (torch.randn(*shape, generator=gen(salt)) * scale).to(device=device, dtype=dtype)
