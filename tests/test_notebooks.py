"""Every notebook in notebooks/ runs top to bottom in a fresh kernel (nbclient + ipykernel)."""

from __future__ import annotations

from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def _outputs(nb) -> str:
    return "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                     for out in cell.get("outputs", []) if out.get("output_type") == "stream")


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["rpg_tour.ipynb"]


@pytest.mark.slow  # about 2 minutes on 2 idle cores, most of it training and compiling
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    from rpg_jax.data import load_fashion_mnist
    try:
        load_fashion_mnist()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), \
        f"{path.name} is committed with outputs: clear them"
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    nbformat.write(nb, tmp_path / path.name)  # the executed copy, for a look after a failure
    text = _outputs(nb)
    # Part 1 (the paper's rule), part 3 (NNX) and part 6 (export) print checkable facts.
    assert "ring DoF 2,359,296 | free 532,008 | trainable 2,891,304" in text
    assert "largest deviation from the Kaiming std" in text
    assert "nnx.update and nnx.merge agree: True" in text
    assert "the export predicts like the checkpoint: True" in text
    images = [out for cell in nb.cells if cell.cell_type == "code"
              for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert len(images) == 3  # the std plot, the loss curve, the predictions
