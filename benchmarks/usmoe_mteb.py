"""USMoE's own setting (specs/usmoe.md §6, §11): a pretrained OLMoE (or another transformers MoE)
used as a sentence embedder on MTEB tasks, its routers swapped without training. Runs where the
weights are on disk and ``mteb`` is installed; not in CI (its code path is tested on a tiny random
``OlmoeConfig``: tests/test_usmoe_study.py).

    python benchmarks/usmoe_mteb.py --model /path/to/OLMoE-1B-7B-0924 \\
        [--tasks STSBenchmark Banking77Classification] [--methods tc ec usmoe_1.0 usmoe_0.86] \\
        [--emb HS|RW|MoEE] [--prompt none|prompteol] [--dtype float32|bfloat16] [--device cpu]

Methods (§6): ``tc`` the model as it is (its own softmax top-k); ``ec`` expert choice per
sequence (each expert its ``max(1, round(S k / E))`` best tokens by the softmax over experts,
weights that softmax: ``USMoERouter(alpha=0, selection="per_expert")``); ``usmoe_<b>`` USMoE (α
0.5, the scaled-sigmoid expert score, joint top-N per sequence, N = round(b · k · S)), all through
``smoe.convert(model, router="usmoe", causal=False, ...)`` on the model's own router weights.
Embeddings (§6, ``--emb``): ``HS`` the last hidden state mean-pooled over the tokens, ``RW`` the
router logits of every layer mean-pooled and concatenated, ``MoEE`` both. Sentences are batched
by exact token length, so no padding token ever enters a joint selection. No quantisation (the
released code's behaviour, §6); every result records its dtype. One JSON per method and task in
``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

import smoe

PROMPTEOL = 'This sentence : "{}" means in one word:"'


def swap(model: torch.nn.Module, method: str) -> torch.nn.Module:
    """``model`` with its routers replaced per ``method`` (in place; ``tc`` leaves it as is)."""
    if method == "tc":
        return model
    k = int(model.config.num_experts_per_tok)
    if method == "ec":
        return smoe.convert(model, router="usmoe", causal=False, alpha=0.0, selection="per_expert")
    if method.startswith("usmoe_"):
        b = float(method.split("_", 1)[1])
        if not b > 0:
            raise ValueError(f"usmoe_mteb: the budget of {method!r} must be > 0")
        return smoe.convert(model, router="usmoe", causal=False, budget=b * k)
    raise ValueError(f"usmoe_mteb: method must be tc, ec or usmoe_<budget>, got {method!r}")


@torch.no_grad()
def embed(model: torch.nn.Module, input_ids: torch.Tensor, emb: str = "HS") -> torch.Tensor:
    """Embeddings ``[B, D]`` of equal-length sequences ``input_ids [B, S]`` (no padding)."""
    if emb not in ("HS", "RW", "MoEE"):
        raise ValueError(f"usmoe_mteb: emb must be HS, RW or MoEE, got {emb!r}")
    out = model(input_ids=input_ids, output_hidden_states=True, output_router_logits=emb != "HS")
    parts = []
    if emb in ("HS", "MoEE"):
        parts.append(out.hidden_states[-1].float().mean(dim=1))
    if emb in ("RW", "MoEE"):
        B, S = input_ids.shape
        rw = [r.float().reshape(B, S, -1).mean(dim=1) for r in out.router_logits]
        parts.append(torch.cat(rw, dim=-1))
    return torch.cat(parts, dim=-1)


class Encoder:
    """What ``mteb`` calls: ``encode(sentences, batch_size=...) -> [N, D]`` (numpy), sentences
    grouped by token length so that a batch needs no padding."""

    def __init__(self, model, tokenizer, emb: str, prompt: str, device: str) -> None:
        self.model, self.tokenizer, self.emb, self.prompt = model, tokenizer, emb, prompt
        self.device = device

    def encode(self, sentences, batch_size: int = 32, **_: Any):
        texts = [PROMPTEOL.format(s) if self.prompt == "prompteol" else s for s in sentences]
        ids = [self.tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
        out: list[torch.Tensor | None] = [None] * len(ids)
        by_len: dict[int, list[int]] = {}
        for i, seq in enumerate(ids):
            by_len.setdefault(len(seq), []).append(i)
        for members in by_len.values():
            for j in range(0, len(members), batch_size):
                chunk = members[j : j + batch_size]
                batch = torch.tensor([ids[i] for i in chunk], device=self.device)
                for i, e in zip(chunk, embed(self.model, batch, self.emb).cpu()):
                    out[i] = e
        return torch.stack(out).numpy()


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="a local transformers MoE checkpoint")
    p.add_argument("--tasks", nargs="+", default=["STSBenchmark", "Banking77Classification"])
    p.add_argument("--methods", nargs="+", default=["tc", "ec", "usmoe_1.0", "usmoe_0.86"])
    p.add_argument("--emb", default="HS", choices=("HS", "RW", "MoEE"))
    p.add_argument("--prompt", default="none", choices=("none", "prompteol"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/usmoe_mteb"))
    args = p.parse_args(argv)
    try:
        import mteb
    except ImportError:
        raise SystemExit("usmoe_mteb: needs the mteb package (pip install mteb)") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for method in args.methods:
        model = AutoModelForCausalLM.from_pretrained(
            args.model, torch_dtype=getattr(torch, args.dtype)
        ).to(args.device)
        model = swap(model.eval(), method)
        tok = AutoTokenizer.from_pretrained(args.model)
        encoder = Encoder(model, tok, args.emb, args.prompt, args.device)
        for task in args.tasks:
            res = mteb.MTEB(tasks=mteb.get_tasks(tasks=[task])).run(
                encoder, output_folder=None, encode_kwargs={"batch_size": args.batch_size}
            )
            scores = [r.to_dict() for r in res]
            rec = {"method": method, "task": task, "emb": args.emb, "prompt": args.prompt,
                   "dtype": args.dtype, "quantize": None, "scores": scores}  # fmt: skip
            (args.out / f"{method}_{task}.json").write_text(json.dumps(rec, indent=1))
            results.append(rec)
            print(f"usmoe_mteb: {method} {task}: {rec['scores']}", flush=True)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
