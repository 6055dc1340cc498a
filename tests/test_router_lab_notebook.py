"""notebooks/router_lab.ipynb runs headless at its quick size (STYLE.md §10)."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "router_lab.ipynb"


def test_router_lab_outputs_are_cleared():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None


def test_router_lab_runs_and_shows_two_routers(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for name in ("topk", "switch", "noisy_topk", "vmoe", "expert_choice"):
        assert name in text  # the registry listing
    trained = [line for line in text.splitlines() if " bpc " in line]
    assert [line.split()[0] for line in trained] == ["topk", "vmoe"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) == 2  # curves + RF, then the load maps
    # the leaderboard cell shows the table or says how to make it
    assert any("text/markdown" in o.get("data", {}) for o in outputs) or "no leaderboard" in text
