"""notebooks/smoe_vae_quickdraw.ipynb runs headless at its tiny size (STYLE.md §10)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "smoe_vae_quickdraw.ipynb"
PNG = b"\x89PNG\r\n\x1a\n"


def test_notebook_outputs_are_cleared():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None


def test_notebook_runs_and_shows_finite_results(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOE_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("SMOE_NOTEBOOK_OUT", str(tmp_path / "out"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=150, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    figures = summary["figures"]
    assert set(figures) == {
        "reconstructions",
        "samples_unsupervised",
        "samples_supervised",
        "tsne",
        "confusion",
        "curves",
    }
    for path in figures.values():
        assert Path(path).read_bytes()[:8] == PNG

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    shown = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(shown) == len(figures)  # every figure is displayed inline
    assert not [o for o in outputs if o.output_type == "error"]

    # The numbers the notebook prints (its last JSON line) are finite and match the saved ones.
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    numbers = json.loads([line for line in text.splitlines() if line.startswith("{")][-1])
    assert set(numbers) == {"unsupervised", "supervised"}
    for name, values in numbers.items():
        assert all(math.isfinite(v) for v in values.values())
        assert values["test_recon"] == pytest.approx(summary["models"][name]["test_recon"])
        assert 0 < values["purity"] <= 1
