"""(Re)generate the checkpoint golden file and this version's fixtures.

    python -m tests.checkpoint.make_fixtures            # schema.json + missing fixtures
    python -m tests.checkpoint.make_fixtures --schema   # only rewrite schema.json
    python -m tests.checkpoint.make_fixtures --fixtures # only add missing fixtures

Fixtures go to ``tests/checkpoint/fixtures/v<smoe.__version__>/``: for each catalogue entry
(``modules.py``) a ``<entry>.pt`` (state_dict, a forward's inputs and its float64 outputs; loads
with ``torch.load(weights_only=True)``) and, for most entries, a ``<entry>.safetensors`` (the same
state_dict, tied tensors stored once). An existing fixture file is never overwritten: fixtures are
what older checkpoints look like. Delete one by hand only if it never left your branch.
"""

from __future__ import annotations

import argparse
import json
import sys

import safetensors.torch
import torch

import smoe
from tests.checkpoint.modules import (
    CATALOGUE,
    FIXTURE_FORMAT,
    FIXTURES,
    SCHEMA,
    Entry,
    cast_state_dict,
    dtype_name,
    reference_outputs,
    schema_of,
)

SEED = 0


def golden_schema() -> dict:
    modules = {}
    for name, entry in CATALOGUE.items():
        torch.manual_seed(SEED)
        modules[name] = schema_of(entry.build())
    return {
        "comment": (
            "state_dict schema of every catalogue entry (tests/checkpoint/modules.py); regenerate "
            "only deliberately: python -m tests.checkpoint.make_fixtures --schema"
        ),
        "modules": modules,
    }


def fixture_payload(entry: Entry) -> dict:
    """The .pt fixture of an entry: its state_dict as saved by this version, a forward's inputs,
    and the float64 outputs of the module that loaded that state_dict."""
    torch.manual_seed(SEED)
    state = cast_state_dict(entry.build().state_dict(), entry.fixture_dtype)
    inputs = entry.inputs(torch.Generator().manual_seed(SEED))
    module = entry.build()
    module.load_state_dict(state)
    return {
        "format": FIXTURE_FORMAT,
        "smoe_version": smoe.__version__,
        "torch_version": str(torch.__version__),  # TorchVersion is no weights_only type
        "entry": entry.name,
        "dtype": dtype_name(entry.fixture_dtype),
        "state_dict": state,
        "inputs": list(inputs),
        "outputs": reference_outputs(entry, module, inputs),
    }


def write_fixtures() -> list[str]:
    folder = FIXTURES / f"v{smoe.__version__}"
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, entry in CATALOGUE.items():
        pt, st = folder / f"{name}.pt", folder / f"{name}.safetensors"
        if pt.exists():
            lines.append(f"kept    {pt.relative_to(FIXTURES)} (fixtures are never overwritten)")
        else:
            payload = fixture_payload(entry)
            torch.save(payload, pt)
            lines.append(f"wrote   {pt.relative_to(FIXTURES)}")
            if entry.safetensors:
                if st.exists():
                    raise SystemExit(f"{st} exists without its .pt; remove it or restore the .pt")
                module = entry.build()
                module.load_state_dict(payload["state_dict"])
                meta = {"smoe_version": smoe.__version__, "entry": name}
                safetensors.torch.save_model(module, str(st), metadata=meta)
                lines.append(f"wrote   {st.relative_to(FIXTURES)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schema", action="store_true", help="only rewrite schema.json")
    parser.add_argument("--fixtures", action="store_true", help="only add missing fixtures")
    args = parser.parse_args(argv)
    if args.schema or not args.fixtures:
        SCHEMA.write_text(json.dumps(golden_schema(), indent=1) + "\n")
        print(f"wrote   {SCHEMA}")
    if args.fixtures or not args.schema:
        print("\n".join(write_fixtures()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
