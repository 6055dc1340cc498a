"""The leaderboard's table of routers (benchmarks/router_zoo.py): each registered router's options
per task and its paper's claims, as measurable directions against the top-k baseline. A new router
adds its entry here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Claim:
    """What a router's paper claims, as a measurable direction against the top-k baseline.

    ``metric`` is a column of the table; ``direction`` is ``"lower"``, ``"higher"`` or
    ``"same"`` (no worse: the difference stays within noise).
    """

    text: str
    metric: str
    direction: str
    margin: float = 0.0  # for "same": the largest difference that still counts as equal


@dataclass(frozen=True)
class ZooEntry:
    """A leaderboard row: the router's options per task and its paper's claims."""

    charlm: dict[str, Any] = field(default_factory=dict)
    vit: dict[str, Any] = field(default_factory=dict)
    claims: tuple[Claim, ...] = ()
    # CharLMConfig overrides: causal_training=False for routers that couple the batch's tokens
    # in training only (Sinkhorn); evaluation stays causal
    charlm_config: dict[str, Any] = field(default_factory=dict)


def _graph_claims(method: str) -> tuple[Claim, ...]:
    """The graph-of-tokens paper's claims (specs/graph_routing.md §9), the same for both of its
    routers."""
    return (
        Claim(
            f"{method} SMoE (Nguyen et al. 2025): lower routing fluctuation than a softmax-gated "
            "SMoE",
            "late_rf",
            "lower",
        ),
        Claim("... lower PPL", "bpc", "lower"),
        Claim("... better on attacked text", "bpc_attacked", "lower"),
        Claim("... (images) higher top-1", "vit_acc", "higher"),
        Claim("... (images) higher accuracy under corruption", "vit_acc_noisy", "higher"),
    )


ZOO: dict[str, ZooEntry] = {
    "topk": ZooEntry(),  # the baseline: GShard/Mixtral top-2, renormalised weights
    "switch": ZooEntry(
        claims=(
            Claim(
                "Switch (Fedus et al. 2021): the raw router probability as the combine weight "
                "trains as well as renormalised top-k (here at k = 2, equal compute)",
                "bpc",
                "same",
                margin=0.02,
            ),
        )
    ),
    "noisy_topk": ZooEntry(
        claims=(
            Claim(
                "Shazeer et al. 2017: noise in the gate spreads the load (lower MaxVio)",
                "max_vio",
                "lower",
            ),
            Claim("... without hurting quality", "bpc", "same", margin=0.02),
        )
    ),
    "vmoe": ZooEntry(
        # capacity at k = 2 is filled rank-major, which is not causal: none in the decoder
        charlm={"capacity_factor": None},
        vit={"capacity_factor": 1.05},
        claims=(
            Claim(
                "V-MoE (Riquelme et al. 2021): noise 1/E, importance + load losses and capacity "
                "C = 1.05 keep quality at top-k's level",
                "vit_acc",
                "same",
                margin=0.01,
            ),
        ),
    ),
    # Expert choice: in the LM grouped by position (the B tokens at each position of the batch
    # compete, smoe.routing.pairs), which is causal; a sequence group would see later tokens.
    "expert_choice": ZooEntry(
        charlm={"group_size": "position"},
        claims=(
            Claim(
                "Expert choice (Zhou et al. 2022): better quality than token-choice top-k at "
                "equal compute (> 2x faster convergence at 8B scale, decoder LMs)",
                "bpc",
                "lower",
            ),
            Claim("... (images) higher top-1", "vit_acc", "higher"),
        ),
    ),
    # X-MoE at the leaderboard's k = 2 (softmax of s/tau over the two selected, CR Sec 2.2). The
    # paper's own comparison (top-1, X-MoE vs SMoE, several seeds) is the experiment of issue 21.
    "xmoe": ZooEntry(
        claims=(
            Claim(
                "X-MoE (Chi et al. 2022): lower LM loss than SMoE at equal compute (MLM PPL "
                "18.72 vs 19.02, softmax top-1; expect only ~1.5-2.5 % at small scale)",
                "bpc",
                "lower",
            ),
            Claim(
                "... and much lower routing fluctuation late in training (Fig 3a)",
                "late_rf",
                "lower",
            ),
        )
    ),
    # fastmoe's "XMoE" gate, the baseline row of the S2MoE / USMoE papers: no claim of its own
    "xmoe_community": ZooEntry(),
    # fastmoe's "StableMoE" gate, the other S2MoE / USMoE baseline row (k = 2 as the leaderboard;
    # its balance loss off, as in those runs): no claim of its own
    "stablemoe_community": ZooEntry(),
    # SSR at its defaults (p = 0.001 per layer, no aux loss). Its Sinkhorn steps couple the
    # batch's tokens in training, as in the paper's LM; evaluation routes causally.
    "ssr": ZooEntry(
        charlm_config={"causal_training": False},
        claims=(
            Claim(
                "SSR (Nguyen et al. 2025, abstract): higher accuracy than SMoE with auxiliary "
                "losses (lower LM loss)",
                "bpc",
                "lower",
            ),
            Claim("... and more robust to input corruption", "bpc_attacked", "lower"),
            Claim("... (images) higher accuracy under pixel noise", "vit_acc_noisy", "higher"),
        ),
    ),
    # S-BASE (Clark et al. 2022): strongest of S-BASE / hash / RL routing, against no top-k
    # baseline in the numbers at hand (specs/sinkhorn_ssr.md §12.2): no claim of its own here
    "sinkhorn": ZooEntry(charlm_config={"causal_training": False}),
    # The stack-level momentum methods (Teo & Nguyen 2024, specs/momentum_smoe.md §12): the
    # reference gate (bias, no aux loss), the leaderboard's pre-LN blocks with every MoE layer
    # wrapped in smoe.MomentumMoE at the paper's defaults; in the ViT task the gate runs in a
    # momentum stack (smoe.models.momentum_vit, V-MoE's pre-LN layout).
    "momentum": ZooEntry(
        claims=(
            Claim(
                "MomentumSMoE (Teo & Nguyen 2024): lower valid PPL than SMoE on WikiText-103 "
                "(small/medium/large, GLaM) at negligible extra compute",
                "bpc",
                "lower",
            ),
            Claim("... also on word-swap-attacked text", "bpc_attacked", "lower"),
        )
    ),
    "adam": ZooEntry(
        claims=(
            Claim(
                "AdamSMoE (Teo & Nguyen 2024): lower valid PPL than SMoE (medium, GLaM-medium) "
                "and the fastest convergence",
                "bpc",
                "lower",
            ),
            Claim("... also on word-swap-attacked text", "bpc_attacked", "lower"),
        )
    ),
    # the paper claims Robust MomentumSMoE for V-MoE only (ImageNet-1K top-1 and R/A/C)
    "robust_momentum": ZooEntry(
        claims=(
            Claim(
                "Robust MomentumV-MoE (Teo & Nguyen 2024): higher top-1 than V-MoE",
                "vit_acc",
                "higher",
            ),
            Claim("... and under corruption (ImageNet-C)", "vit_acc_noisy", "higher"),
        )
    ),
    # S2MoE (Do, Le & Tran 2025, specs/s2moe.md §8) at the spec's defaults (dsu noise with
    # sequence statistics, the noisy path routed on its own, InfoNCE 0.1 at tau 0.1, Switch
    # balance), at the leaderboard's k = 2 like every row; its top-1 vs top-2 claim is
    # claims.py s2moe's
    "s2moe": ZooEntry(
        claims=(
            Claim(
                "S2MoE (Do et al. 2025, abstract): top-1 S2MoE matches top-2 SMoE, so at equal k "
                "it should beat it (lower LM loss)",
                "bpc",
                "lower",
            ),
            Claim(
                "... robust (the title): higher accuracy under pixel noise",
                "vit_acc_noisy",
                "higher",
            ),
        )
    ),
    # Graph-of-tokens routing (Nguyen et al. 2025, arXiv 2505.00792; specs/graph_routing.md §9):
    # the spec's defaults (poe mixing, lambda 1, dot similarity / head-mean attention, causal in
    # the LM), the same balance and z losses as the top-k baseline
    "similarity_aware": ZooEntry(claims=_graph_claims("Similarity-Aware")),
    "attention_aware": ZooEntry(claims=_graph_claims("Attention-Aware")),
    # USMoE (Do, Le & Tran 2025, specs/usmoe.md §11) at the reference code's defaults (alpha 0.5,
    # sigmoid expert score, budget k, no aux loss). Its joint top-N over a sequence is not causal;
    # in the LM the B tokens at each position compete (group "position"), as in the reference's
    # Transformer-XL scratch code (specs/usmoe.md §5), which is causal. In the ViT each image's
    # tokens (patches and class token) compete: group "sequence" over the [B, N] batch.
    "usmoe": ZooEntry(
        charlm={"group": "position"},
        vit={"group": "sequence"},
        claims=(
            Claim(
                "USMoE (Do et al. 2025): from scratch, better than token choice at equal "
                "compute (the spec's expectation USMoE >= TC >=/~ EC; its scratch LMs: enwik8, "
                "text8, WT103, lm1b)",
                "bpc",
                "lower",
            ),
            Claim(
                "USMoE (Do et al. 2025, abstract): better than both token choice and expert choice "
                "at equal active expert compute (up to 10 % over them training-free on MTEB; the "
                "later versions add vision tasks)",
                "vit_acc",
                "higher",
            ),
            Claim("... also on corrupted inputs (later versions)", "vit_acc_noisy", "higher"),
        ),
    ),
}
