"""Expert parallelism (smoe.parallel) on 2 and 4 Gloo ranks against one process running the
unsharded layer on the rank-major concatenation of all ranks' tokens.

Each world size is one spawn (tests/distributed/ep_worker.py runs every case on its ranks, under
a timeout; the exit code is checked), so a hang or a crash on any rank fails here instead of
hanging the suite. Output, input gradient and expert-weight gradients must be bitwise equal;
replicated (router) gradients, summed over the ranks, equal to float32 tolerance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from tests.distributed.ep_cases import build, cases, router_cases
from tests.distributed.ep_stats import GLOBAL_ROUTERS
from tests.distributed.ep_worker import checkpoint_case

pytestmark = [
    pytest.mark.distributed,
    # dcp.save / dcp.load here run without a process group on purpose (the one-process side)
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]

ROOT = Path(__file__).resolve().parents[2]
WORLDS = (2, 4)
TIMEOUT_S = 300  # a quiet 2-core machine needs 20-40 s; a loaded one several times that

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with Gloo is not available", allow_module_level=True)


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world{w}")
def report(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"ep{world}")
    out = tmp / "report.json"
    # a checkpoint saved by one process (seed 5) for the ranks to load into their shards
    layer = build(checkpoint_case(world, seed=5))
    dcp.save(layer.state_dict(), checkpoint_id=str(tmp / "plain_ckpt"), no_dist=True)
    cmd = [sys.executable, str(ROOT / "tests/distributed/ep_worker.py"), "--world", str(world),
           "--tmp", str(tmp), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    data["tmp"] = str(tmp)
    return world, data


@pytest.mark.parametrize("name", [c.name for c in cases(2) + router_cases(2)])
def test_expert_parallel_equals_one_process(report, name):
    """Each dispatch case, and every registered router (a sweep from the registry, eval mode,
    each rank's tokens whole sequences: the routers' groups never span ranks)."""
    world, data = report
    result = data["cases"][name]
    assert "y" in result and "dx" in result and any(k.startswith("experts.") for k in result)
    off = {k: v for k, v in result.items() if not v["equal"]}
    assert not off, f"world {world}, {name}: not equal: {off}"


def test_every_case_ran(report):
    world, data = report
    assert sorted(data["cases"]) == sorted(c.name for c in cases(world) + router_cases(world))


def test_indivisible_experts_are_refused_on_every_rank(report):
    world, data = report
    msgs = [e.get("indivisible") for e in data["errors_by_rank"]]
    assert all(m == msgs[0] for m in msgs) and msgs[0] is not None
    assert f"num_experts = {world + 1}" in msgs[0] and f"size {world}" in msgs[0]


def test_disagreeing_ranks_get_the_same_error(report):
    world, data = report
    msgs = [e.get("disagree") for e in data["errors_by_rank"]]
    assert all(m == msgs[0] for m in msgs) and msgs[0] is not None
    assert "disagree" in msgs[0] and "d_model" in msgs[0]


def test_local_offsets_are_refused(report):
    world, data = report
    for e in data["errors_by_rank"]:
        assert f"offsets must be [E+1] = [{2 * world + 1}]" in e["offsets"]


def test_compiled_layer_equals_eager_and_its_graph_breaks_are_counted(report):
    """torch.compile(backend="aot_eager") of the sharded layer computes eager's output and input
    gradient on every rank. The split sizes are read on the host (the layer's one sync), so
    dynamo breaks the graph there: counted, and at most a few per layer."""
    world, data = report
    for rank, c in enumerate(data["compiled_by_rank"]):
        assert c["y_equal"] and c["dx_equal"], f"rank {rank}: {c}"
        assert 1 <= c["graph_breaks"] <= 4, f"rank {rank}: {c}"


def test_fsdp2_on_a_dp_by_ep_mesh_trains_like_one_process(report):
    """4 ranks as a 2 x 2 (dp x ep) DeviceMesh: experts sharded over ep and FSDP2-sharded over
    dp, everything else FSDP2-sharded over all ranks; 20 SGD steps equal one process training on
    all ranks' tokens, to float32 tolerance (reductions differ in order), every parameter moved."""
    world, data = report
    if world != 4:
        pytest.skip("the 2 x 2 mesh needs 4 ranks")
    assert set(data["fsdp"]) == {
        "inp.weight", "inp.bias", "out.weight", "out.bias", "moe.router.weight",
        "moe.experts.w_in", "moe.experts.w_out",
    }  # fmt: skip
    for name, d in data["fsdp"].items():
        assert d["moved"] > 1e-3, name  # training changed it: the comparison means something
        assert d["max_abs"] <= 1e-5 * max(1.0, d["scale"]), (name, d)


def test_ddp_around_an_expert_parallel_model_trains_like_one_process(report):
    """DDP (experts ignored, the rest all-reduced) on 2 and 4 ranks: 20 SGD steps equal one
    process training on all ranks' tokens, on every rank, every parameter moved. SGD steps, so a
    gradient off by a constant factor (the world size) would show."""
    world, data = report
    for rank, diffs in enumerate(data["ddp_by_rank"]):
        assert set(diffs) == {
            "inp.weight", "inp.bias", "out.weight", "out.bias", "moe.router.weight",
            "moe.experts.w_in", "moe.experts.w_out",
        }  # fmt: skip
        for name, d in diffs.items():
            assert d["moved"] > 1e-3, (rank, name)  # (the router moves least)
            assert d["max_abs"] <= 1e-5 * max(1.0, d["scale"]), (rank, name, d)


def test_sharded_state_dict_has_the_unsharded_keys_and_shapes(report):
    world, data = report
    for rank, c in enumerate(data["checkpoint_by_rank"]):
        assert c["keys"] == c["plain_keys"], rank
        assert all(c["shapes_equal"].values()), (rank, c["shapes_equal"])


def test_checkpoint_of_the_sharded_layer_loads_into_one_process(report):
    """dcp.save on the ranks (DTensor expert shards), dcp.load here without a process group."""
    world, data = report
    want = build(checkpoint_case(world)).state_dict()
    target = build(checkpoint_case(world, seed=3)).state_dict()  # other values, same keys
    dcp.load(target, checkpoint_id=str(Path(data["tmp"]) / "ep_ckpt"), no_dist=True)
    for k, v in want.items():
        assert torch.equal(target[k], v), k


def test_checkpoint_of_one_process_loads_into_the_shards(report):
    world, data = report
    for rank, c in enumerate(data["checkpoint_by_rank"]):
        assert c["loaded"] and all(c["loaded"].values()), (rank, c["loaded"])


@pytest.mark.parametrize("router", sorted(GLOBAL_ROUTERS))  # (load_loss: the test below)
def test_global_stats_losses_are_the_losses_of_all_tokens(report, router):
    """Every batch-statistic loss (Switch, X-MoE, StableMoE balance; V-MoE importance) and the
    z-losses: the mean over ranks equals one process on all tokens, and so does the mean over
    ranks of the router gradient of the weighted aux loss."""
    world, data = report
    g = data["global_stats"][router]
    assert g["stats_group_set"] and g["names"], g
    for name, got, want in zip(g["names"], g["global_mean"], g["want"]):
        assert abs(got - want) <= 1e-6 * max(1.0, abs(want)), (name, g)
    assert g["grad_err"] <= 1e-6 * max(1.0, g["grad_scale"]), g
    if router == "topk":  # the default (each rank's own tokens) is a different number
        i = g["names"].index("balance")
        assert abs(g["local_mean"][i] - g["want"][i]) > 1e-4, g


def test_global_stats_load_loss_is_the_loss_of_all_tokens(report):
    """load_loss(stats_group=...) on every rank's rows: the global value on every rank, and
    the mean over ranks of the gradient is one process's (float64)."""
    world, data = report
    g = data["global_stats"]["load_loss"]
    assert all(abs(v - g["want"]) <= 1e-12 * max(1.0, abs(g["want"])) for v in g["values"]), g
    assert g["grad_err"] <= 1e-12 * max(1.0, g["grad_scale"]), g


def test_global_stats_is_refused_for_routers_without_batch_statistics(report):
    world, data = report
    for e in data["errors_by_rank"]:
        assert "global_stats applies to routers whose auxiliary losses" in e["global_stats"]
        assert "ExpertChoiceRouter" in e["global_stats"]


def _gpu_report(tmp_path, world: int, backend: str) -> dict:
    out = tmp_path / "report.json"
    cmd = [sys.executable, str(ROOT / "tests/distributed/ep_worker.py"), "--world", str(world),
           "--tmp", str(tmp_path), "--out", str(out), "--cuda", backend]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def _assert_all_equal(data: dict, world: int) -> None:
    assert sorted(data["cases"]) == sorted(c.name for c in cases(world) + router_cases(world))
    for name, result in data["cases"].items():
        off = {k: v for k, v in result.items() if not v["equal"]}
        assert not off, f"{data['backend']}, world {world}, {name}: not equal: {off}"


@pytest.mark.cuda
def test_cuda_tensors_over_gloo_equal_one_process(tmp_path):
    """2 ranks on the one GPU, CUDA tensors over Gloo (host-staged): every dispatch case and
    every registered router equal one process on the same GPU, as on CPU."""
    _assert_all_equal(_gpu_report(tmp_path, 2, "gloo"), 2)


@pytest.mark.cuda
def test_nccl_equals_one_process(tmp_path):
    """2 ranks on 2 GPUs over NCCL (skips below 2 GPUs): as over Gloo."""
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL expert parallelism needs 2 GPUs")
    if not dist.is_nccl_available():
        pytest.skip("torch.distributed was built without NCCL")
    _assert_all_equal(_gpu_report(tmp_path, 2, "nccl"), 2)
