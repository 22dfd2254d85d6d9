"""Each tutorial notebook runs top to bottom (each ends in an assert about a real result).

The notebooks are stored without outputs; they are executed with nbclient in a fresh ipykernel
kernel that runs this very interpreter (a kernel spec written for the test, found first on
JUPYTER_PATH, so that no user-level ``python3`` kernel of another environment is picked up), in a
temporary working directory.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
CELL_TIMEOUT_S = 600
KERNEL = "pyrovae-pde-tests"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_there_are_notebooks_and_they_are_stored_without_outputs():
    assert len(NOTEBOOKS) >= 2, NOTEBOOKS
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip its outputs"


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory):
    """A JUPYTER_PATH directory holding a kernel spec that launches ``sys.executable -m ipykernel_launcher``."""
    from ipykernel.kernelspec import write_kernel_spec

    root = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(root / "kernels" / KERNEL)
    return str(root)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch, jupyter_path):
    nb = nbformat.read(path, as_version=4)
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [jupyter_path, os.environ.get("JUPYTER_PATH")])))
    # The kernel inherits this environment: one OpenMP thread (the tests share the CPU), no GUI backend.
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL,
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{path.name}: a cell failed:\n{exc}")
    print(f"{path.name}: executed in {time.perf_counter() - start:.0f} s")


def test_the_notebook_kernel_runs_this_interpreter(tmp_path, monkeypatch, jupyter_path):
    import sys

    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [jupyter_path, os.environ.get("JUPYTER_PATH")])))
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.executable)")])
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name=KERNEL,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    assert nb.cells[0].outputs[0]["text"].strip() == sys.executable  # the venv's python, not its base's
