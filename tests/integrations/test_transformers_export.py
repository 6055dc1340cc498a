"""torch.export of the tiny transformers MoE models with experts_implementation="smoe" (issue 26),
the ways a user deploying one would: the whole model without a cache and a dynamic sequence
length; transformers' ExecuTorch recipe (`TorchExportableModuleForDecoderOnlyLM`: a static or
sliding-window cache held in the program, strict export); and `export_with_dynamic_cache`. Each
program must run smoe's ops and give eager's logits, token after token where it holds a cache.

(transformers' own "eager" experts loop over the experts hit, a data-dependent loop, and cannot
be exported either way: the "grouped_mm" and "batched_mm" implementations and smoe's can.)"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import DynamicCache, GenerationConfig  # noqa: E402
from transformers.integrations.executorch import (  # noqa: E402
    TorchExportableModuleForDecoderOnlyLM,
    export_with_dynamic_cache,
)

import smoe.integrations.transformers  # noqa: E402, F401  (registers "smoe")
from tests.helpers import program_targets  # noqa: E402
from tests.integrations.tiny_models import MODELS, build, close, token_ids  # noqa: E402

NAMES = list(MODELS)
# One sequence for the cached programs: a 5-token prompt, then one token per call.
SEQUENCE = torch.tensor([[3, 9, 17, 4, 22, 61, 60, 5, 11, 30, 7, 8]])
PROMPT = 5
MAX_CACHE = 16


def _smoe_and_eager_logits(name: str, ids: torch.Tensor):
    """The model with "smoe" set, and eager's logits of ids without a cache."""
    model = build(name)
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
    model.set_experts_implementation("smoe")
    return model, want


def _runs_smoe(program: torch.export.ExportedProgram, *, fused: bool) -> None:
    """The program routes with smoe's ops, and its experts are one expert_mlp or the chain."""
    targets = program_targets(program)
    assert "smoe.make_plan.default" in targets, sorted(targets)
    assert ("smoe.expert_mlp.default" in targets) == fused, sorted(targets)


@pytest.mark.parametrize("name", NAMES)
def test_export_with_a_dynamic_sequence_length_matches_eager(name):
    """The whole model (no cache; non-strict, as transformers exports; no gradients), the
    sequence length dynamic and unbounded: the program equals eager at another length. Its
    experts are one expert_mlp, which applies the 4 MiB size rule to the real length when it
    runs, except GPT-OSS's (its clamped SwiGLU is the module's own `_apply_gate`, between the
    GEMMs)."""
    ids = torch.randint(3, 64, (2, 23), generator=torch.Generator().manual_seed(1))
    model, want = _smoe_and_eager_logits(name, ids)
    length = torch.export.Dim("S")
    with torch.no_grad():
        program = torch.export.export(
            model,
            (token_ids(),),
            {"use_cache": False},
            dynamic_shapes={"input_ids": {1: length}, "use_cache": None},
            strict=False,
        )
    _runs_smoe(program, fused=name != "gpt_oss")
    with torch.no_grad():
        got = program.module()(ids, use_cache=False).logits
    close(got, want, name)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            n,
            marks=pytest.mark.skip(
                reason="transformers' StaticCache cannot hold DeepSeek-V3's MLA keys "
                "(index_copy_ slice shapes differ): fails for every experts implementation"
            ),
        )
        if n == "deepseek_v3"
        else n
        for n in NAMES
    ],
)
def test_executorch_recipe_prefills_and_decodes_like_eager(name):
    """transformers' ExecuTorch recipe, strict export, the cache in the program (static, or
    sliding-window where the config has layer types: Qwen2-MoE, GPT-OSS), the prompt length
    dynamic: one program prefills 5 tokens and decodes 7 more one at a time, each step's logits
    equal to eager's on the whole sequence. (The length's bound keeps every hidden under the
    fusion's 4 MiB: the experts are the unfused chain, decided when traced.)"""
    model, want = _smoe_and_eager_logits(name, SEQUENCE)
    model.generation_config = GenerationConfig(
        use_cache=True,
        cache_implementation="static",
        max_length=MAX_CACHE,
        cache_config={"batch_size": 1, "max_cache_len": MAX_CACHE},
    )
    recipe = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=MAX_CACHE)
    length = torch.export.Dim("S", max=MAX_CACHE - 1)
    with torch.no_grad():  # as transformers' convert_and_export_with_cache exports
        program = recipe.export(
            SEQUENCE[:, :PROMPT],
            cache_position=torch.arange(PROMPT),
            dynamic_shapes={"input_ids": {1: length}, "cache_position": {0: length}},
        )
    _runs_smoe(program, fused=False)
    run = program.module()
    steps = [run(input_ids=SEQUENCE[:, :PROMPT], cache_position=torch.arange(PROMPT))]
    for i in range(PROMPT, SEQUENCE.shape[1]):
        steps.append(run(input_ids=SEQUENCE[:, i : i + 1], cache_position=torch.tensor([i])))
    close(torch.cat(steps, dim=1), want, name)


@pytest.mark.parametrize("name", NAMES)
def test_export_with_dynamic_cache_matches_eager(name):
    """transformers' `export_with_dynamic_cache`: the cache a pytree input and output."""
    prompt = SEQUENCE[:, :PROMPT]
    model, want = _smoe_and_eager_logits(name, prompt)
    mask = torch.ones_like(prompt)
    program = export_with_dynamic_cache(model, prompt, mask)  # static shapes, no gradients
    _runs_smoe(program, fused=False)
    cache = DynamicCache(config=model.config)
    out = program.module()(input_ids=prompt, attention_mask=mask, cache=cache, use_cache=True)
    close(out.logits, want, name)
    assert out.past_key_values.get_seq_length() == PROMPT
