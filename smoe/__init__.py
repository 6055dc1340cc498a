"""smoe: sparse mixture-of-experts routers and expert dispatch as PyTorch custom ops."""

__version__ = "0.1.0"

from smoe._info import info
from smoe.experts import Experts
from smoe.layer import MoEAux, MoELayer
from smoe.losses import router_z_loss, switch_balance_loss
from smoe.models import SMoEVAE
from smoe.ops import Plan, TopK, combine, grouped_mm, make_plan, permute, swiglu, topk_softmax
from smoe.routing import Routing, TopKRouter

__all__ = [
    "Experts",
    "MoEAux",
    "MoELayer",
    "Plan",
    "Routing",
    "SMoEVAE",
    "TopK",
    "TopKRouter",
    "combine",
    "grouped_mm",
    "info",
    "make_plan",
    "permute",
    "router_z_loss",
    "swiglu",
    "switch_balance_loss",
    "topk_softmax",
]
