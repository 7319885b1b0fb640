"""The tutorial notebooks run top to bottom offline, and are stored small, with their outputs.

Each notebook is executed in a fresh "python3" kernel (the Python running the tests, with
ipykernel installed) from an in-memory copy, so the committed file is never rewritten, and in a
temporary working directory, so a notebook cannot leave files in the repository. The kernel
inherits ``HF_HUB_OFFLINE=1`` from ``conftest.py``: cells that would download a checkpoint take
their offline branch. Run times are printed and recorded (``record_property``), not asserted:
speed is measured in ``benchmarks/``.
"""

import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPOSITORY = Path(__file__).resolve().parent.parent
TUTORIALS = REPOSITORY / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
MAX_BYTES = 1_000_000
CELL_TIMEOUT_S = 600


def _folder_state(folder: Path) -> dict:
    return {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}


def test_the_tutorials_folder_holds_notebooks():
    assert NOTEBOOKS, f"Expected tutorial notebooks in {TUTORIALS}, found none."


@pytest.mark.slow
@pytest.mark.parametrize("notebook_path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_runs_top_to_bottom_offline(
    notebook_path, tmp_path, monkeypatch, record_property
):
    assert os.environ.get("HF_HUB_OFFLINE") == "1", "conftest.py keeps the kernel offline"
    # The kernel imports captum_daam from this checkout, as the tests do, installed or not.
    python_path = [str(REPOSITORY)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(python_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # as conftest.py's torch.set_num_threads(2)
    notebook = nbformat.read(notebook_path, as_version=4)  # in memory: the file stays as it is
    tutorials_before = _folder_state(TUTORIALS)
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    seconds = time.perf_counter() - start
    record_property("seconds", round(seconds, 1))
    print(f"{notebook_path.name}: {seconds:.1f} s")
    assert _folder_state(TUTORIALS) == tutorials_before, "a notebook wrote into tutorials/"


@pytest.mark.parametrize("notebook_path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_is_stored_small_with_outputs_and_listed(notebook_path):
    size = notebook_path.stat().st_size
    assert size < MAX_BYTES, f"{notebook_path.name} is {size} bytes; keep figures small"
    notebook = nbformat.read(notebook_path, as_version=4)
    code_cells = [
        cell for cell in notebook.cells if cell.cell_type == "code" and cell.source.strip()
    ]
    counts = [cell.execution_count for cell in code_cells]
    assert None not in counts, f"{notebook_path.name} has code cells stored without outputs"
    assert counts == list(range(1, len(counts) + 1)), (
        f"{notebook_path.name} was not stored from one top-to-bottom run: execution counts {counts}"
    )
    errors = [o for cell in code_cells for o in cell.outputs if o.output_type == "error"]
    assert not errors, f"{notebook_path.name} has an error stored in its outputs"
    readme = (TUTORIALS / "README.md").read_text(encoding="utf-8")
    assert notebook_path.name in readme, f"tutorials/README.md does not list {notebook_path.name}"
