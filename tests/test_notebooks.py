"""The notebooks: stored without outputs, public API only, and they run offline in bounded time."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
NAMES = [p.name for p in NOTEBOOKS]
TIME_LIMIT_S = 90  # per notebook, kernel start included (each takes ~15-20 s on one core)


def code_cells(path: Path) -> list:
    nb = nbformat.read(path, as_version=4)
    return [c for c in nb.cells if c.cell_type == "code"]


def test_both_notebooks_exist():
    assert NAMES == ["01_quickstart.ipynb", "02_circuit_level.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_stored_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for c in code_cells(path):
        assert c.outputs == [] and c.execution_count is None, c.source[:60]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_public_api_only(path: Path):
    """No private modules, names or attributes: the notebooks use what the CLI uses."""
    for c in code_cells(path):
        tree = ast.parse(c.source)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tl_transplant"):
                assert not any(part.startswith("_") for part in node.module.split(".")), node.module
                assert not any(a.name.startswith("_") for a in node.names), ast.unparse(node)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    assert not any(p.startswith("_") for p in a.name.split(".")), a.name
            elif isinstance(node, ast.Attribute):
                assert not node.attr.startswith("_"), ast.unparse(node)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_executes_offline(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from nbclient import NotebookClient

    for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                 "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg",
                 "TL_TRANSPLANT_NOTEBOOK_OUT": str(tmp_path / "out")}.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=TIME_LIMIT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    start = time.monotonic()
    client.execute()  # raises CellExecutionError on the first failing cell
    elapsed = time.monotonic() - start
    assert elapsed < TIME_LIMIT_S, f"{path.name} took {elapsed:.0f}s"

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert pngs, "matplotlib figures should display inline"
    for c in nb.cells:  # ... and once each (no second copy from the inline backend)
        if c.cell_type == "code":
            assert sum("image/png" in o.get("data", {}) for o in c.outputs) <= 1, c.source[:60]
    assert all("unpkg.com" not in h for h in html)
    views = [h for h in html if "data-cv-component" in h]
    if path.name.startswith("01"):
        out = tmp_path / "out" / "quickstart"
        report = out / "run" / "report.html"
        assert report.stat().st_size > 1_000_000
        assert "AttentionHeads" in report.read_text(encoding="utf-8")
        assert (out / "gen2_transplanted" / "model.safetensors").is_file()
        assert len(pngs) >= 3  # two heatmaps and the sweep plot
    else:
        assert len(views) == 3 and all(h.count("var CircuitsVis=") == 1 for h in views)
        comps = " ".join(views)
        for name in ("AttentionHeads", "ColoredTokens", "TextNeuronActivations"):
            assert f'data-cv-component="{name}"' in comps
