"""The router lab's char-level LM: ``python -m smoe.examples.charlm --router NAME``.

A small causal pre-LN Transformer (:class:`smoe.models.charlm.CharLM`) on Tiny Shakespeare with MoE
feed-forward layers, the router chosen by name from the registry. Every ``--eval-every`` steps it
measures validation loss and bits per character, clean and on word-swap-attacked validation text
(specs/momentum_smoe.md §8.1), and per MoE layer the load (CV, MaxVio, dropped, dead experts), the
routing entropy, representation collapse (RC) and the top-1 expert of every held-out token, from
which routing fluctuation (RF) between checkpoints follows. Writes one JSON per seed and figures
(learning curves, RF over training, expert-load heat map).

Examples::

    python -m smoe.examples.charlm                                   # top-k, seed 0 (~6 min)
    python -m smoe.examples.charlm --router vmoe --router-option capacity_factor=None
    python -m smoe.examples.charlm --router switch --seeds 0 1 2
    python -m smoe.examples.charlm --router momentum --layout post_ln --set n_layers=3
    python -m smoe.examples.charlm --quick                           # < 1 minute
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from smoe.allocator import tune_cpu_allocator
from smoe.data.text import (
    CharCorpus,
    eval_windows,
    random_batch,
    stream_batch,
    tiny_shakespeare,
    word_swap,
)
from smoe.examples.charlm_config import CharLMConfig, lr_at, parse_options, quick_config
from smoe.metrics import RoutingRecorder, fluctuation_series
from smoe.models.charlm import LAYOUTS, CharLM

__all__ = [
    "CharLMConfig",
    "build_model",
    "build_optimizer",
    "evaluate",
    "late_mean",
    "lr_at",
    "main",
    "parse_options",
    "quick_config",
    "run",
    "train_step",
]


def build_model(cfg: CharLMConfig, vocab_size: int) -> CharLM:
    return CharLM(
        vocab_size,
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        context=cfg.context,
        num_experts=cfg.num_experts,
        k=cfg.k,
        d_ff=cfg.d_ff,
        moe_every=cfg.moe_every,
        router=cfg.router,
        router_options=cfg.router_options,
        dropout=cfg.dropout,
        causal_training=cfg.causal_training,
        layout=cfg.layout,
        momentum_options=cfg.momentum_options,
        layer_options=cfg.layer_options,
        activation=cfg.activation,
        expert_bias=cfg.expert_bias,
        expert_dropout=cfg.expert_dropout,
        attention=cfg.attention,
        attn_span=cfg.attn_span,
        xl_memory=cfg.xl_memory,
    )


def build_optimizer(model: CharLM, cfg: CharLMConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on the matrices only (not on biases and norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.99),
    )


def train_step(
    model: CharLM,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: CharLMConfig,
    step: int | None = None,
) -> torch.Tensor:
    """One optimiser step on task loss + the routers' weighted aux losses; returns the task loss
    (detached)."""
    logits, auxes = model(x, step=step)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    total = loss + sum((a.loss(cfg.aux_weights) for a in auxes), loss.new_zeros(()))
    opt.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return loss.detach()


@torch.no_grad()
def evaluate(
    model: CharLM, data: torch.Tensor, cfg: CharLMConfig, recorder: RoutingRecorder | None = None
) -> float:
    """Mean next-character cross-entropy (nats) over the fixed validation windows; with a
    recorder, routing is recorded on those same tokens."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        if recorder is not None:
            recorder.attach()
        stream = _streams(cfg)
        if stream:
            model.reset_memory()  # every evaluation starts from an empty memory
        batches = eval_windows(
            data, cfg.batch_size, cfg.context, max_batches=cfg.eval_batches, stream=stream
        )
        for x, y in batches:
            logits, _ = model(x)
            total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
            count += y.numel()
    finally:
        if recorder is not None:
            recorder.detach()
        model.train(was_training)
    return total / max(count, 1)


def _streams(cfg: CharLMConfig) -> bool:
    """Whether batches are streams (a Transformer-XL memory carried across batches)."""
    return cfg.attention == "xl" and cfg.xl_memory


def late_mean(values: list[float], fraction: float = 0.5) -> float:
    """Mean of the last ``fraction`` of a series (the late stage of training)."""
    if not values:
        return float("nan")
    tail = values[-max(1, math.ceil(len(values) * fraction)) :]
    return sum(tail) / len(tail)


def router_stats(model: CharLM) -> dict[str, dict[str, float]]:
    """Per MoE layer, what its router reports of its training (``routing_stats()``, e.g. the
    realised Sinkhorn rate of SSR); empty for routers that report nothing."""
    out = {}
    for i, layer in enumerate(model.moe_layers()):
        stats = getattr(layer.router, "routing_stats", None)
        if callable(stats):
            out[f"layer{i}"] = {k: float(v) for k, v in stats().items()}
    return out


def _layer_mean(per_layer: dict[str, dict[str, float]], key: str) -> float:
    vals = [m[key] for m in per_layer.values() if key in m and not math.isnan(m[key])]
    return sum(vals) / len(vals) if vals else float("nan")


def run(
    cfg: CharLMConfig,
    seed: int = 0,
    *,
    corpus: CharCorpus | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one char-LM and return its results (also written to ``out_dir`` as JSON).

    Returns a dict with ``config``, ``seed``, ``history`` (one entry per evaluation: step,
    train loss, val loss and bpc clean and attacked, per-layer routing metrics, RF against the
    previous evaluation), ``rf`` (per-evaluation RF against the previous and the final
    checkpoint, mean over layers) and ``final`` (bpc, late RF, MaxVio, entropy, RC, step time).
    """
    if cfg.eval_every < 1 or cfg.steps % cfg.eval_every:
        raise ValueError(
            f"charlm: steps={cfg.steps} must be a multiple of eval_every={cfg.eval_every} (equal "
            "spacing of the checkpoints that routing fluctuation compares)"
        )
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, seed, corpus, out_dir, progress)
    finally:
        torch.set_num_threads(threads)


def _run(
    cfg: CharLMConfig,
    seed: int,
    corpus: CharCorpus | None,
    out_dir: str | Path | None,
    progress: bool,
) -> dict[str, Any]:
    corpus = corpus if corpus is not None else tiny_shakespeare(placeholder=cfg.attack_placeholder)
    attacked = corpus.vocab.encode(
        word_swap(corpus.val_text, cfg.attack_rate, cfg.attack_placeholder, cfg.attack_seed)
    )
    torch.manual_seed(seed)
    model = build_model(cfg, len(corpus.vocab))
    opt = build_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    recorder = RoutingRecorder(model)
    history: list[dict[str, Any]] = []
    top1s: list[dict[str, torch.Tensor]] = []
    step_times: list[float] = []
    train_loss = float("nan")
    bar = tqdm(range(cfg.steps), desc=f"charlm {cfg.router} seed {seed}", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        if _streams(cfg):  # Transformer-XL: consecutive segments of fixed streams
            x, y = stream_batch(corpus.train, cfg.batch_size, cfg.context, step)
        else:
            x, y = random_batch(corpus.train, cfg.batch_size, cfg.context, gen)
        t0 = time.perf_counter()
        loss = train_step(model, opt, x, y, cfg, step)
        step_times.append(time.perf_counter() - t0)
        train_loss = float(loss)
        if not math.isfinite(train_loss):
            raise FloatingPointError(
                f"charlm: the training loss became {train_loss} at step {step}"
            )
        if (step + 1) % cfg.eval_every == 0:
            val = evaluate(model, corpus.val, cfg, recorder)
            val_attacked = evaluate(model, attacked, cfg)
            layers = recorder.summary()
            top1s.append(recorder.top1())
            entry = {
                "step": step + 1,
                "train_loss": train_loss,
                "val_loss": val,
                "val_bpc": val / math.log(2),
                "val_bpc_attacked": val_attacked / math.log(2),
                "layers": layers,
                "load": {n: r.load.tolist() for n, r in recorder.records.items()},
            }
            if len(top1s) > 1:
                entry["rf_prev"] = {
                    n: fluctuation_series([top1s[-2][n], top1s[-1][n]])[0] for n in top1s[-1]
                }
            history.append(entry)
            bar.set_postfix(bpc=f"{entry['val_bpc']:.3f}")
    names = list(top1s[-1]) if top1s else []
    per_layer_prev = {n: fluctuation_series([t[n] for t in top1s]) for n in names}
    per_layer_final = {n: fluctuation_series([t[n] for t in top1s], against="final") for n in names}
    rf_prev = [
        sum(v[i] for v in per_layer_prev.values()) / len(names) for i in range(len(top1s) - 1)
    ]
    rf_final = [
        sum(v[i] for v in per_layer_final.values()) / len(names) for i in range(len(top1s) - 1)
    ]
    warm = step_times[min(5, len(step_times) - 1) :]
    last_layers = history[-1]["layers"]
    result = {
        "config": dataclasses.asdict(cfg),
        "seed": seed,
        "history": history,
        "rf": {
            "steps": [h["step"] for h in history[1:]],
            "previous": rf_prev,
            "final": rf_final,
            "per_layer_previous": per_layer_prev,
            "per_layer_final": per_layer_final,
        },
        "final": {
            "val_bpc": history[-1]["val_bpc"],
            "val_bpc_attacked": history[-1]["val_bpc_attacked"],
            "late_rf": late_mean(rf_prev),
            "max_vio": _layer_mean(last_layers, "max_vio"),
            "cv": _layer_mean(last_layers, "cv"),
            "entropy": _layer_mean(last_layers, "entropy"),
            "rc": _layer_mean(last_layers, "rc"),
            "dropped": _layer_mean(last_layers, "dropped"),
            "dead": _layer_mean(last_layers, "dead"),
            "step_time_s": sum(warm) / len(warm),
            "router_stats": router_stats(model),
        },
        "attack": {
            "rate": cfg.attack_rate,
            "placeholder": cfg.attack_placeholder,
            "seed": cfg.attack_seed,
        },
        "threads": torch.get_num_threads(),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"charlm_{cfg.router}_seed{seed}.json"
        path.write_text(json.dumps(result, indent=1))
        torch.save(model.state_dict(), out / f"charlm_{cfg.router}_seed{seed}.pt")
    return result


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--router", default="topk", help="a name from smoe.routing.available_routers()")
    p.add_argument("--router-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--momentum-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--layer-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="options of a layer-level router's layer (s2moe: noise_form=instnorm, ...)",
    )
    p.add_argument("--layout", choices=LAYOUTS)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any CharLMConfig field, e.g. --set n_layers=3 --set activation=relu",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--moe-every", type=int, choices=(1, 2))
    p.add_argument("--num-experts", type=int)
    p.add_argument("-k", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--quick", action="store_true", help="the tests' size: under a minute")
    p.add_argument("--out", default="runs/charlm")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--list-routers", action="store_true")
    args = p.parse_args(argv)
    if args.list_routers:
        from smoe.routing import available_routers

        for name, desc in available_routers().items():
            print(f"{name:16s} {desc}")
        return []
    overrides = {
        key: getattr(args, attr)
        for key, attr in [
            ("steps", "steps"),
            ("eval_every", "eval_every"),
            ("moe_every", "moe_every"),
            ("num_experts", "num_experts"),
            ("k", "k"),
            ("threads", "threads"),
            ("layout", "layout"),
        ]
        if getattr(args, attr) is not None
    }
    overrides.update(router=args.router, router_options=parse_options(args.router_option))
    if args.momentum_option:
        overrides["momentum_options"] = parse_options(args.momentum_option)
    if args.layer_option:
        overrides["layer_options"] = parse_options(args.layer_option)
    extra = parse_options(args.set)
    unknown = sorted(set(extra) - {f.name for f in fields(CharLMConfig)})
    if unknown:
        raise ValueError(f"--set: unknown CharLMConfig field(s) {unknown}")
    overrides.update(extra)
    cfg = quick_config(**overrides) if args.quick else CharLMConfig(**overrides)
    corpus = tiny_shakespeare(placeholder=cfg.attack_placeholder)
    results = [run(cfg, s, corpus=corpus, out_dir=args.out) for s in args.seeds]
    for r in results:
        f = r["final"]
        print(
            f"{cfg.router} seed {r['seed']}: val bpc {f['val_bpc']:.4f} (attacked "
            f"{f['val_bpc_attacked']:.4f}), late RF {f['late_rf']:.4f}, "
            f"MaxVio {f['max_vio']:.3f}, entropy {f['entropy']:.3f} nats, RC {f['rc']:.3g}, "
            f"{f['step_time_s'] * 1e3:.0f} ms/step"
        )
    if not args.no_figures:
        from smoe.examples.charlm_figures import save_figures

        for path in save_figures(results, Path(args.out) / f"{cfg.router}"):
            print(f"figure: {path}")
    return results


if __name__ == "__main__":
    tune_cpu_allocator()  # large tensors' memory stays mapped between steps (smoe/allocator.py)
    main()
