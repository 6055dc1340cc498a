"""The studies of ``claims.py``: each paper's arms (a registered router with options), the claims
compared between them, the char-LM overrides shared by every arm and the step-time claims."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from router_zoo import Claim  # benchmarks/router_zoo.py


@dataclass(frozen=True)
class Arm:
    """One trained configuration: a registered router with its options."""

    router: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    charlm: dict[str, Any] = field(default_factory=dict)  # this arm's CharLMConfig overrides (k)


@dataclass(frozen=True)
class Comparison:
    """A claim of the paper: ``arm`` against ``baseline`` on ``claim.metric`` (``baseline`` None:
    against zero, e.g. "rises" or "declines")."""

    arm: str
    baseline: str | None
    claim: Claim


@dataclass(frozen=True)
class Study:
    title: str
    spec: str
    arms: dict[str, Arm]
    comparisons: tuple[Comparison, ...]
    charlm: dict[str, Any] = field(default_factory=dict)  # CharLMConfig overrides for every arm
    # step-time claims: (arm, baseline, text, "<=" or ">=", ratio), from an interleaved timing
    # of all arms in one process (expected ratios: p x the Sinkhorn step + (1 - p) x the plain)
    timing: tuple[tuple[str, str, str, str, float], ...] = ()
    flops: bool = False  # add the arms' whole-model inference FLOPs per token (claims_report)


STUDIES: dict[str, Study] = {
    # specs/xmoe.md §10: X-MoE vs SMoE (their Switch), same gate type, top-1.
    "xmoe": Study(
        title="X-MoE vs SMoE (Switch), top-1, softmax and sigmoid gates",
        spec="specs/xmoe.md §10",
        arms={
            "smoe_softmax": Arm("switch", {}, "SMoE (Switch), softmax"),
            "xmoe_softmax": Arm("xmoe", {"gate": "softmax"}, "X-MoE, softmax"),
            "smoe_sigmoid": Arm("switch", {"gate": "sigmoid"}, "SMoE (Switch), sigmoid"),
            "xmoe_sigmoid": Arm("xmoe", {"gate": "sigmoid"}, "X-MoE, sigmoid"),
        },
        comparisons=tuple(
            c
            for gate, ppl in (("softmax", "18.72 vs 19.02"), ("sigmoid", "19.12 vs 19.59"))
            for c in (
                Comparison(
                    f"xmoe_{gate}",
                    f"smoe_{gate}",
                    Claim(
                        f"{gate}: lower validation loss (MLM PPL {ppl}, T2; expect 1.5-2.5 %)",
                        "bpc",
                        "lower",
                    ),
                ),
                Comparison(
                    f"xmoe_{gate}",
                    f"smoe_{gate}",
                    Claim(f"{gate}: much lower RF late in training (Fig 3a)", "late_rf", "lower"),
                ),
                Comparison(
                    f"xmoe_{gate}",
                    f"smoe_{gate}",
                    Claim(f"{gate}: larger RC on h (Fig 2c)", "rc", "higher"),
                ),
                # Fig 2c, "X-MoE's RC rises while SMoE's declines": over the second half of
                # training (after the early rise every router shows), each against zero
                Comparison(
                    f"xmoe_{gate}",
                    None,
                    Claim(
                        f"{gate}: X-MoE's RC rises late in training (Fig 2c)", "rc_late", "higher"
                    ),
                ),
                Comparison(
                    f"smoe_{gate}",
                    None,
                    Claim(f"{gate}: ... while SMoE's declines (Fig 2c)", "rc_late", "lower"),
                ),
            )
        ),
        charlm={"k": 1, "steps": 600, "eval_every": 50},
    ),
    # specs/sinkhorn_ssr.md §11 (abstract-level claims): SSR vs SMoE with the Switch balance
    # loss (and the z-loss, as the top-k router trains everywhere here), vs always-on Sinkhorn,
    # and the gradient-detached ablation; top-2 as the leaderboard.
    "ssr": Study(
        title="Selective Sinkhorn Routing vs SMoE, always-on Sinkhorn and a detached ablation",
        spec="specs/sinkhorn_ssr.md §11",
        arms={
            "smoe": Arm("topk", {}, "SMoE (top-2, balance 0.01 + z 0.001)"),
            "ssr_p0.001": Arm("ssr", {"p": 0.001}, "SSR p = 0.001"),
            "ssr_p0.01": Arm("ssr", {"p": 0.01}, "SSR p = 0.01"),
            "sinkhorn_p1": Arm("ssr", {"p": 1.0}, "always-on Sinkhorn (SSR p = 1)"),
            "ssr_detach": Arm("ssr", {"p": 0.01, "grad_mode": "detach"}, "SSR p = 0.01, detach"),
        },
        comparisons=(
            *(
                Comparison(arm, "smoe", Claim(f"{label}: {text}", metric, "lower"))
                for arm, label in (("ssr_p0.001", "p = 0.001"), ("ssr_p0.01", "p = 0.01"))
                for text, metric in (
                    ("lower validation loss than SMoE + aux losses", "bpc"),
                    ("lower loss on word-swap-attacked text", "bpc_attacked"),
                )
            ),
            *(
                Comparison(
                    arm,
                    "sinkhorn_p1",
                    Claim(
                        f"{label}: lower validation loss than always-on Sinkhorn", "bpc", "lower"
                    ),
                )
                for arm, label in (("ssr_p0.001", "p = 0.001"), ("ssr_p0.01", "p = 0.01"))
            ),
        ),
        timing=(
            ("ssr_p0.001", "smoe", "SSR (p = 0.001) step time within a few % of SMoE", "<=", 1.05),
            ("ssr_p0.01", "smoe", "SSR (p = 0.01) step time within a few % of SMoE", "<=", 1.05),
            ("sinkhorn_p1", "smoe", "always-on Sinkhorn markedly slower than SMoE", ">=", 1.2),
        ),
        charlm={"steps": 600, "eval_every": 50, "causal_training": False},
    ),
    # specs/momentum_smoe.md §12's cheapest direction check, at this machine's scale: SMoE-small's
    # shape (3 post-LN layers with the reference double residual, d = 128, 8 heads, E = 16, k = 2,
    # ReLU experts with biases and hidden width d, dropout inside the experts), the reference
    # gate (Linear with bias, softmax over the top-2 logits) and no balance loss in every arm.
    "momentum": Study(
        title="MomentumSMoE and AdamSMoE vs SMoE (SMoE-small shape, post-LN, no balance loss)",
        spec="specs/momentum_smoe.md §8, §12",
        arms={
            "smoe": Arm("topk", {"bias": True, "aux": False}, "SMoE"),
            "momentum": Arm("momentum", {}, "MomentumSMoE (mu 0.7, gamma 1)"),
            "adam": Arm("adam", {}, "AdamSMoE (beta 0.9/0.999, gamma1 1)"),
        },
        comparisons=tuple(
            Comparison(arm, "smoe", Claim(f"{label}: {text}", metric, "lower"))
            for arm, label in (("momentum", "MomentumSMoE"), ("adam", "AdamSMoE"))
            for text, metric in (
                ("lower clean validation loss than SMoE (WikiText-103 PPL)", "bpc"),
                ("lower loss on word-swap-attacked text (attacked WikiText-103)", "bpc_attacked"),
            )
        )
        + (
            Comparison(
                "adam",
                "smoe",
                Claim("AdamSMoE converges fastest: below SMoE early on", "bpc_early", "lower"),
            ),
            Comparison(
                "adam",
                "momentum",
                Claim("... and below MomentumSMoE early on", "bpc_early", "lower"),
            ),
        ),
        timing=(
            ("momentum", "smoe", "MomentumSMoE: negligible extra compute", "<=", 1.03),
            ("adam", "smoe", "AdamSMoE: negligible extra compute", "<=", 1.03),
        ),
        charlm={
            "steps": 600,
            "eval_every": 50,
            "n_layers": 3,
            "d_model": 128,
            "n_heads": 8,
            "num_experts": 16,
            "k": 2,
            "d_ff": 128,
            "layout": "post_ln",
            "activation": "relu",
            "expert_bias": True,
            "dropout": 0.1,
            "expert_dropout": 0.1,
        },
    ),
    # specs/graph_routing.md §9's direction checks against a softmax-gated SMoE of the same
    # backbone, top-2 (the leaderboard's top-k with its balance and z losses; the graph routers
    # keep the same losses), the spec's §4 defaults (poe mixing, lambda 1, causal)
    "graph": Study(
        title="Similarity-Aware and Attention-Aware routing vs softmax top-2 SMoE",
        spec="specs/graph_routing.md §6, §9",
        arms={
            "smoe": Arm("topk", {}, "SMoE (softmax top-2)"),
            "similarity": Arm("similarity_aware", {}, "Similarity-Aware (poe, dot, lambda 1)"),
            "attention": Arm("attention_aware", {}, "Attention-Aware (poe, head mean, lambda 1)"),
        },
        comparisons=tuple(
            Comparison(arm, "smoe", Claim(f"{label}: {text}", metric, "lower"))
            for arm, label in (("similarity", "Similarity-Aware"), ("attention", "Attention-Aware"))
            for text, metric in (
                ("lower late-stage routing fluctuation", "late_rf"),
                ("lower validation loss (PPL)", "bpc"),
                ("lower loss on word-swap-attacked text", "bpc_attacked"),
                ("lower routing entropy (higher would be a red flag about mix)", "entropy"),
            )
        ),
        timing=(
            ("similarity", "smoe", "Similarity-Aware: step time within 10 % of SMoE", "<=", 1.1),
            ("attention", "smoe", "Attention-Aware: almost no extra cost", "<=", 1.05),
        ),
        charlm={"steps": 600, "eval_every": 50},
    ),
    # specs/s2moe.md §8's direction check, on Tiny Shakespeare in place of enwik8 / text8 (the
    # spec names those; the char-LM stands in). One set of experts for every arm (width 256 =
    # the leaderboard's 4d/k at k = 2), so a k = 1 arm runs half the routed-expert compute of a
    # k = 2 arm; the baselines at k = 2 are the fastmoe community gates of the paper's tables.
    "s2moe": Study(
        title="S2MoE at top-1 vs SMoE top-1 / top-2 and the XMoE and StableMoE gates at top-2",
        spec="specs/s2moe.md §8",
        arms={
            "s2moe_k1": Arm("s2moe", {}, "S2MoE, k = 1", {"k": 1}),
            "smoe_k1": Arm("topk", {}, "SMoE, k = 1", {"k": 1}),
            "smoe_k2": Arm("topk", {}, "SMoE, k = 2", {"k": 2}),
            "xmoe_k2": Arm("xmoe_community", {}, "XMoE (fastmoe gate), k = 2", {"k": 2}),
            "stablemoe_k2": Arm(
                "stablemoe_community", {}, "StableMoE (fastmoe gate), k = 2", {"k": 2}
            ),
        },
        comparisons=(
            Comparison(
                "s2moe_k1",
                "smoe_k1",
                Claim("direction check: clearly better than SMoE at k = 1 (BPC)", "bpc", "lower"),
            ),
            *(
                Comparison(
                    "s2moe_k1",
                    base,
                    Claim(
                        f"top-1 S2MoE matches or beats {label} at top-2 (BPC, within 0.02)",
                        "bpc",
                        "same",
                        0.02,
                    ),
                )
                for base, label in (
                    ("smoe_k2", "SMoE"),
                    ("xmoe_k2", "XMoE"),
                    ("stablemoe_k2", "StableMoE"),
                )
            ),
            Comparison(
                "s2moe_k1",
                "smoe_k1",
                Claim(
                    "robust (the title's word; no number in the spec): lower bpc on attacked text",
                    "bpc_attacked",
                    "lower",
                ),
            ),
        ),
        # 300 steps, half the other studies' 600: what one session's CPU time allowed for 15
        # runs (the same for every arm)
        charlm={"steps": 300, "eval_every": 50, "d_ff": 256},
        flops=True,
    ),
    # specs/usmoe.md §6, §11, from scratch at its scratch LM's shape (4 layers, d 256, d_inner
    # 512, E 16, k 2; 8 heads): token choice vs expert choice vs USMoE at equal expert compute.
    # EC and USMoE group the batch's tokens at each position (the reference's Transformer-XL
    # code does, §5), which keeps the LM causal; no aux loss for either (USMoE's layer adds
    # none, EC needs none); TC keeps the library's balance loss.
    "usmoe": Study(
        title="USMoE vs token choice vs expert choice, from scratch, USMoE's scratch shape",
        spec="specs/usmoe.md §6, §11",
        arms={
            "tc": Arm("topk", {}, "TC (top-k, renormalised)"),
            "ec": Arm("expert_choice", {"group_size": "position"}, "EC by position"),
            "usmoe": Arm("usmoe", {"group": "position"}, "USMoE by position (α 0.5, N = S k)"),
        },
        comparisons=(
            Comparison(
                "usmoe",
                "tc",
                Claim("(i) USMoE beats token choice at equal compute (BPC)", "bpc", "lower"),
            ),
            Comparison(
                "usmoe",
                "ec",
                Claim("(i) USMoE beats expert choice at equal compute (BPC)", "bpc", "lower"),
            ),
            Comparison("tc", "ec", Claim("(i) TC ≥/≈ EC (BPC, within 0.02)", "bpc", "same", 0.02)),
            Comparison(
                "usmoe",
                "tc",
                Claim(
                    "... also on corrupted inputs (later versions; word-swap attack)",
                    "bpc_attacked",
                    "lower",
                ),
            ),
        ),
        # 300 steps, as the S2MoE study: what one session's CPU time allowed for 9 runs at this
        # width (the same for every arm)
        charlm={
            "steps": 300,
            "eval_every": 50,
            "n_layers": 4,
            "d_model": 256,
            "n_heads": 8,
            "d_ff": 512,
            "num_experts": 16,
            "k": 2,
        },
    ),
}
