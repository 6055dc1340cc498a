"""Test oracle of ``smoe.ops.s2moe_perturb`` (S2MoE's Gaussian perturbation): plain torch."""

from __future__ import annotations

from torch import Tensor


def s2moe_perturb(
    x: Tensor, n1: Tensor, n2: Tensor, mu: Tensor, s_mul: Tensor, s_add: Tensor
) -> Tensor:
    """(1 + s_mul n1) x + (mu + s_add n2) with torch broadcasting, in float64."""
    d = [t.double() for t in (x, n1, n2, mu, s_mul, s_add)]
    x64, n1, n2, mu, s_mul, s_add = d
    return ((1 + s_mul * n1) * x64 + (mu + s_add * n2)).to(x.dtype)
