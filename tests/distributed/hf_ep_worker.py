"""Spawns 2 Gloo ranks that load a tiny saved Mixtral with transformers' expert parallelism
(``DistributedConfig(ep_size=2, fsdp_size=2)``) twice, ``ep_implementation="smoe"`` and
``"all_to_all"``, plus the plain model, run each rank's own batch forward and backward, and write
rank 0's comparison as JSON. Run by tests/distributed/test_transformers_ep.py."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.distributed.teardown import end_rank  # noqa: E402


def _grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if ".experts." in name and p.grad is not None:
            g = p.grad
            out[name] = (g.to_local() if hasattr(g, "to_local") else g).detach().clone()
    return out


def worker(rank: int, world: int, rdv: str, model_dir: str, out: str) -> None:
    import transformers
    from transformers.distributed import DistributedConfig

    import smoe.integrations.transformers  # noqa: F401  (registers "smoe")

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
    )  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 64, (world, 9), generator=g)
        cot = torch.randn(world, 9, 64, generator=g)
        results: dict = {}
        grads = {}
        for impl in ("smoe", "all_to_all"):
            cfg = DistributedConfig(ep_size=world, fsdp_size=world, ep_implementation=impl)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                model_dir, distributed_config=cfg
            )
            logits = model(ids[rank : rank + 1]).logits
            (logits * cot[rank : rank + 1]).sum().backward()
            results[impl] = logits.detach()
            grads[impl] = _grads(model)
            del model
        plain = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
        want = plain(ids).logits[rank : rank + 1].detach()
        scale = float(want.abs().max())
        mine = dict(
            vs_plain=float((results["smoe"] - want).abs().max()) / scale,
            vs_all_to_all=float((results["smoe"] - results["all_to_all"]).abs().max()) / scale,
            all_to_all_vs_plain=float((results["all_to_all"] - want).abs().max()) / scale,
            grad_names=sorted(grads["smoe"]),
            grad_vs_all_to_all={
                n: float((grads["smoe"][n] - grads["all_to_all"][n]).abs().max())
                / max(float(grads["all_to_all"][n].abs().max()), 1e-30)
                for n in grads["smoe"]
            },
        )
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            Path(out).write_text(json.dumps(everyone, indent=1))
    except Exception:
        traceback.print_exc()
        dist.destroy_process_group()
        raise
    end_rank()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--world", type=int, default=2)
    a = p.parse_args()
    rdv = str(Path(a.out).parent / "rendezvous")
    mp.spawn(worker, args=(a.world, rdv, a.model, a.out), nprocs=a.world, join=True)


if __name__ == "__main__":
    main()
