"""Load paths of every catalogue module's checkpoint: ``torch.load(weights_only=True)`` with a
``map_location``, saved on CUDA and loaded on the CPU, fp32 <-> bf16 casting on load, and a
safetensors round trip (tied tensors stored once and tied again on load)."""

from __future__ import annotations

import io

import pytest
import safetensors.torch
import torch
from torch import Tensor, nn

from tests.checkpoint.modules import CATALOGUE, Outputs, cast_state_dict, versions_of

ENTRIES = list(CATALOGUE)
BF16_ROUNDING = 2.0**-8  # relative error of rounding to bfloat16 (8 significant bits)


def _build(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return CATALOGUE[name].build()


def _forward(name: str, module: nn.Module, dtype: torch.dtype | None = None) -> Outputs:
    """The entry's forward in eval mode on fixed inputs (floating inputs cast to ``dtype``)."""
    device = next(module.parameters()).device
    inputs = CATALOGUE[name].inputs(torch.Generator().manual_seed(1))
    args = [x.to(device, dtype if dtype and x.is_floating_point() else x.dtype) for x in inputs]
    module.eval()
    with torch.no_grad():
        return CATALOGUE[name].run(module, *args)


def _save_and_load(state: dict[str, Tensor], **load_kwargs) -> dict[str, Tensor]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True, **load_kwargs)


def _assert_same(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(
            actual[key], value, rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}"
        )


def _shared_groups(state: dict[str, Tensor]) -> list[list[str]]:
    """The keys that share one storage (tied tensors), groups of two or more."""
    groups: dict[int, list[str]] = {}
    for key, value in state.items():
        groups.setdefault(value.untyped_storage().data_ptr(), []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]


@pytest.mark.parametrize("name", ENTRIES)
def test_checkpoint_loads_with_weights_only_and_map_location(name):
    src = _build(name, seed=0)
    loaded = _save_and_load(src.state_dict(), map_location="cpu")
    assert versions_of(loaded) == versions_of(src.state_dict())
    dst = _build(name, seed=1)
    dst.load_state_dict(loaded)
    _assert_same(dst.state_dict(), src.state_dict())
    _assert_same(_forward(name, dst), _forward(name, src))


def test_map_location_may_be_a_device_or_a_function():
    state = _build("MoELayer-topk", seed=0).state_dict()
    for where in (torch.device("cpu"), lambda storage, location: storage, {"cuda:0": "cpu"}):
        _assert_same(_save_and_load(state, map_location=where), state)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ENTRIES)
def test_checkpoint_saved_on_cuda_loads_on_cpu(name, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convolutions
    src = _build(name, seed=0).cuda()
    loaded = _save_and_load(src.state_dict(), map_location="cpu")
    assert all(v.device.type == "cpu" for v in loaded.values())
    dst = _build(name, seed=1)
    dst.load_state_dict(loaded)
    _assert_same(dst.state_dict(), {k: v.cpu() for k, v in src.state_dict().items()})
    on_cpu, on_cuda = _forward(name, dst), _forward(name, src)
    for key, value in on_cuda.items():
        torch.testing.assert_close(on_cpu[key], value.cpu(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ENTRIES)
def test_bf16_state_dict_loads_into_fp32_module(name):
    src = _build(name, seed=0)
    expected = src.state_dict()
    dst = _build(name, seed=1)
    dst.load_state_dict(cast_state_dict(expected, torch.bfloat16))
    for key, value in dst.state_dict().items():
        assert value.dtype == expected[key].dtype, key  # the module keeps its dtype
        if value.is_floating_point():
            assert torch.equal(value, expected[key].bfloat16().float()), key
            torch.testing.assert_close(value, expected[key], rtol=BF16_ROUNDING, atol=0)
        else:
            assert torch.equal(value, expected[key]), key
    outputs, reference = _forward(name, dst), _forward(name, src)
    for key, value in outputs.items():
        assert value.shape == reference[key].shape and value.dtype == reference[key].dtype
        assert not value.is_floating_point() or bool(value.isfinite().all()), key


@pytest.mark.parametrize("name", ENTRIES)
def test_fp32_state_dict_loads_into_bf16_module_and_back(name):
    src = _build(name, seed=0)
    expected = src.state_dict()
    half = _build(name, seed=1).to(torch.bfloat16)
    half.load_state_dict(expected)
    # state a module declares float32 whatever its dtype (TopKRouter's expert_bias)
    kept = {
        f"{prefix}.{key}" if prefix else key
        for prefix, m in half.named_modules()
        for key in getattr(m, "keep_float32", ())
    }
    for key, value in half.state_dict().items():
        if key in kept:
            assert value.dtype == torch.float32 and torch.equal(value, expected[key]), key
        elif value.is_floating_point():
            assert value.dtype == torch.bfloat16, key
            assert torch.equal(value, expected[key].bfloat16()), key
            torch.testing.assert_close(value.float(), expected[key], rtol=BF16_ROUNDING, atol=0)
    back = _build(name, seed=2)
    back.load_state_dict(half.state_dict())
    _assert_same(back.state_dict(), cast_state_dict(half.state_dict(), torch.float32))
    for key, value in _forward(name, half, torch.bfloat16).items():
        assert not value.is_floating_point() or bool(value.isfinite().all()), key


def test_charlm_has_tied_tensors():
    # The safetensors round trip below covers tied tensors through this entry.
    assert _shared_groups(_build("CharLM", seed=0).state_dict()) == [["tok.weight", "head.weight"]]


@pytest.mark.parametrize("name", ENTRIES)
def test_safetensors_round_trip(name, tmp_path):
    src, dst = _build(name, seed=0), _build(name, seed=1)
    path = tmp_path / f"{name}.safetensors"
    tied = _shared_groups(src.state_dict())
    if tied:  # safetensors stores a tensor once: save_model drops the aliases, load_model ties
        safetensors.torch.save_model(src, str(path))
        safetensors.torch.load_model(dst, path)
        assert _shared_groups(dst.state_dict()) == tied  # still tied after the load
    else:
        safetensors.torch.save_file(src.state_dict(), str(path))
        dst.load_state_dict(safetensors.torch.load_file(path))
    _assert_same(dst.state_dict(), src.state_dict())
    _assert_same(_forward(name, dst), _forward(name, src))
