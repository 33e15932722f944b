"""`experiments/colab_tpu.ipynb` runs top to bottom on a CPU at its small sizes, and is committed without outputs.

The notebook runs in a kernel of this interpreter (a kernelspec written under
tmp_path and found through JUPYTER_PATH), with LONGJAX_NOTEBOOK_SMALL=1 and its
workdirs under tmp_path; its working directory is the notebook's own folder,
as when it is opened from a checkout, so it finds the checkout and installs
nothing. A cell that raises fails the test (nbclient's CellExecutionError,
which carries the cell's traceback).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import nbclient
import nbformat

REPO = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "experiments" / "colab_tpu.ipynb"
KERNEL = "longjax-test-venv"


def _text(cell) -> str:
    return "".join(out.get("text", "") for out in cell.outputs if out.get("output_type") == "stream")


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"cell {cell.id} has outputs; strip them"


def test_notebook_runs_on_cpu_at_small_sizes(tmp_path, monkeypatch):
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    env = {
        "LONGJAX_NOTEBOOK_SMALL": "1",
        "LONGJAX_NOTEBOOK_RUNS": str(tmp_path / "runs"),
        "JAX_PLATFORMS": "cpu",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",  # ipykernel's debugger otherwise warns about frozen modules
        # Compiling is most of this test's time; unoptimised CPU code compiles in about half of it.
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip(),
    }
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "longjax test venv",
        "language": "python",
        "env": env,
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.delenv("LONGJAX_REPO", raising=False)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name=KERNEL, timeout=600, resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # CellExecutionError on the first cell that raises

    cells = {cell.id: cell for cell in nb.cells}
    assert f"checkout: {REPO}" in _text(cells["settings"])
    assert "nothing to install" in _text(cells["install"])
    assert "attention impl: 'pallas'" in _text(cells["devices"])
    for run in ("demo", "enwik8_tpu"):
        workdir = tmp_path / "runs" / run
        assert (workdir / "metrics.jsonl").is_file() and (workdir / "curves.png").is_file()
    for curves in ("demo", "tpu_curves"):
        assert any("image/png" in out.get("data", {}) for out in cells[curves].outputs)
    assert "| test BPC " in _text(cells["evaluate"])
    assert "pallas ms" in _text(cells["bench"])
