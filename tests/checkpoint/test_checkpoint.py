"""Checkpoint compatibility: the state_dict schema of every public module is pinned by
``schema.json``; every committed fixture of every version loads into the current module and
reproduces its forward; a key rename goes through ``_version`` and ``_load_from_state_dict``.

How to evolve a format: benchmarks/results/reliability/checkpoint.md.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from smoe import MoELayer, TopKRouter
from tests.checkpoint.modules import (
    CATALOGUE,
    D_FF,
    FIXTURE_FORMAT,
    FIXTURES,
    LAYER_ROUTERS,
    SCHEMA,
    D,
    E,
    K,
    Outputs,
    fixture_files,
    public_module_classes,
    reference_outputs,
    schema_of,
    smoe_routers,
    versions_of,
)

ENTRIES = list(CATALOGUE)
PT_FIXTURES = fixture_files(".pt")
SAFETENSORS_FIXTURES = fixture_files(".safetensors")
REGENERATE = "python -m tests.checkpoint.make_fixtures"
HOW_TO_EVOLVE = (
    "Checkpoints saved before this change no longer load. Either keep them loading: bump "
    "`_version` of the module class whose keys changed, convert the older versions' keys in its "
    "`_load_from_state_dict`, test that on the committed fixture (as "
    f"test_key_rename_converts_an_older_fixture does), then run `{REGENERATE}` (schema.json and "
    "this version's fixtures). Or, only if breaking them is deliberate, regenerate the golden "
    f"file with `{REGENERATE} --schema`."
)


def _fixture_id(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


def _assert_outputs_equal(actual: Outputs, expected: Outputs, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for key, value in expected.items():
        torch.testing.assert_close(
            actual[key], value, rtol=1e-10, atol=1e-10, msg=lambda m, key=key: f"{what}, {key}: {m}"
        )


# ---------------------------------------------------------------------------------------------
# Gates: the catalogue holds every public module; the golden file every catalogue entry
# ---------------------------------------------------------------------------------------------
def test_catalogue_covers_every_registered_router():
    missing = sorted(set(smoe_routers()) - set(LAYER_ROUTERS))
    assert not missing, (
        f"registered routers {missing} have no MoELayer entry in the checkpoint catalogue: add "
        f"them to LAYER_ROUTERS in tests/checkpoint/modules.py, then run `{REGENERATE}`"
    )


def test_catalogue_covers_every_public_module_class():
    covered = {type(m) for entry in CATALOGUE.values() for m in entry.build().modules()}
    missing = sorted(c.__qualname__ for c in public_module_classes() - covered)
    assert not missing, (
        f"public module classes {missing} appear in no checkpoint catalogue entry: add an entry "
        f"to tests/checkpoint/modules.py, then run `{REGENERATE}`"
    )


def test_public_module_classes_declare_their_state_dict_version():
    undeclared = sorted(
        c.__qualname__ for c in public_module_classes() if "_version" not in vars(c)
    )
    assert not undeclared, (
        f"{undeclared} do not declare `_version` (their state_dict format); add `_version = 1`"
    )


def test_golden_file_lists_exactly_the_catalogue():
    golden = json.loads(SCHEMA.read_text())["modules"]
    assert sorted(golden) == sorted(CATALOGUE), (
        f"schema.json and the catalogue disagree; regenerate it with `{REGENERATE} --schema`"
    )


def _schema_diff(expected: dict, actual: dict) -> list[str]:
    problems = []
    if expected["class"] != actual["class"]:
        problems.append(f"class {expected['class']} is now {actual['class']}")
    for field in ("tensors", "versions"):
        old, new = expected[field], actual[field]
        problems += [f"{field}: lost {k!r} ({old[k]})" for k in old if k not in new]
        problems += [f"{field}: new {k!r} ({new[k]})" for k in new if k not in old]
        problems += [
            f"{field}: {k!r} was {old[k]}, is {new[k]}"
            for k in old
            if k in new and old[k] != new[k]
        ]
    return problems


@pytest.mark.parametrize("name", ENTRIES)
def test_state_dict_schema_matches_golden_file(name):
    golden = json.loads(SCHEMA.read_text())["modules"]
    if name not in golden:
        pytest.fail(f"{name} is not in schema.json; add it with `{REGENERATE} --schema`")
    problems = _schema_diff(golden[name], schema_of(CATALOGUE[name].build()))
    assert not problems, (
        f"the state_dict schema of {name} changed:\n  "
        + "\n  ".join(problems)
        + f"\n{HOW_TO_EVOLVE}"
    )


@pytest.mark.parametrize("name", ENTRIES)
def test_state_dict_metadata_records_every_module_version(name):
    module = CATALOGUE[name].build()
    expected = {prefix: type(m)._version for prefix, m in module.named_modules()}
    assert versions_of(module.state_dict()) == expected


# ---------------------------------------------------------------------------------------------
# Committed fixtures: every version's load into the current modules
# ---------------------------------------------------------------------------------------------
def test_every_catalogue_entry_has_a_fixture():
    orphans = sorted(_fixture_id(p) for p in PT_FIXTURES if p.stem not in CATALOGUE)
    assert not orphans, f"fixtures {orphans} have no catalogue entry: was a module removed?"
    have = {p.stem for p in PT_FIXTURES}
    missing = sorted(set(CATALOGUE) - have)
    assert not missing, f"no committed fixture for {missing}; add them with `{REGENERATE}`"
    pt = {_fixture_id(p) for p in PT_FIXTURES if CATALOGUE[p.stem].safetensors}
    assert pt <= {_fixture_id(p) for p in SAFETENSORS_FIXTURES}


def test_fixtures_of_each_version_stay_small():
    # 1 MiB a version: SMoEVAE's fixed conv stacks alone take 250 KB; every other entry is a
    # few KB (a model with d <= 16), which leaves room for the router families still to come
    for folder in sorted(FIXTURES.glob("v*")):
        size = sum(p.stat().st_size for p in folder.iterdir())
        assert size < 1024 * 1024, f"{folder.name}'s fixtures take {size} bytes; keep them tiny"


@pytest.mark.parametrize("path", PT_FIXTURES, ids=_fixture_id)
def test_fixture_loads_and_reproduces_its_forward(path):
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == FIXTURE_FORMAT
    entry = CATALOGUE[payload["entry"]]
    module = entry.build()
    module.load_state_dict(payload["state_dict"])
    outputs = reference_outputs(entry, module, tuple(payload["inputs"]))
    _assert_outputs_equal(outputs, payload["outputs"], f"{_fixture_id(path)}'s forward")


@pytest.mark.parametrize("path", SAFETENSORS_FIXTURES, ids=_fixture_id)
def test_safetensors_fixture_loads_and_reproduces_its_forward(path):
    payload = torch.load(path.with_suffix(".pt"), weights_only=True)
    entry = CATALOGUE[payload["entry"]]
    module = entry.build()
    safetensors.torch.load_model(module, path)  # strict; restores tied tensors
    outputs = reference_outputs(entry, module, tuple(payload["inputs"]))
    _assert_outputs_equal(outputs, payload["outputs"], f"{_fixture_id(path)}'s forward")


# ---------------------------------------------------------------------------------------------
# The rename mechanism, on a test-local format 2 of TopKRouter
# ---------------------------------------------------------------------------------------------
class _RenamedTopKRouter(TopKRouter):
    """TopKRouter as it would be if its format 2 renamed ``weight`` to ``gate_weight``."""

    _version = 2

    def __init__(self, *args, convert: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.convert = convert
        weight = self._parameters.pop("weight")
        self.gate_weight = weight  # the parameter's new name
        self.__dict__["weight"] = weight  # forward still reads self.weight

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        # A file without versions (safetensors) counts as the oldest format; converting only
        # when the old key is there makes that safe.
        version = local_metadata.get("version")
        old = prefix + "weight"
        if self.convert and (version is None or version < 2) and old in state_dict:
            state_dict[prefix + "gate_weight"] = state_dict.pop(old)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )


def _renamed_layer(convert: bool = True) -> MoELayer:
    return MoELayer(D, D_FF, E, K, router=_RenamedTopKRouter(D, E, K, convert=convert))


V1_LAYER = FIXTURES / "v0.1.0" / "MoELayer-topk.pt"  # saved with TopKRouter._version 1


def test_key_rename_converts_an_older_fixture():
    payload = torch.load(V1_LAYER, weights_only=True)
    assert versions_of(payload["state_dict"])["router"] == 1
    entry = CATALOGUE["MoELayer-topk"]
    for source in ("pt", "safetensors"):
        layer = _renamed_layer()
        if source == "pt":
            layer.load_state_dict(payload["state_dict"])
        else:
            safetensors.torch.load_model(layer, V1_LAYER.with_suffix(".safetensors"))
        outputs = reference_outputs(entry, layer, tuple(payload["inputs"]))
        _assert_outputs_equal(outputs, payload["outputs"], f"{_fixture_id(V1_LAYER)} via {source}")


def test_key_rename_without_a_conversion_fails_to_load():
    payload = torch.load(V1_LAYER, weights_only=True)
    with pytest.raises(RuntimeError, match=r"router\.gate_weight"):
        _renamed_layer(convert=False).load_state_dict(payload["state_dict"])


def test_renamed_format_records_its_version_and_reloads():
    layer = _renamed_layer()
    state = layer.state_dict()
    assert "router.gate_weight" in state and "router.weight" not in state
    assert versions_of(state)["router"] == 2
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert versions_of(loaded)["router"] == 2
    fresh = _renamed_layer()
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh.router.weight, layer.router.weight)
