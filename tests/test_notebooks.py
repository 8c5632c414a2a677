"""Every notebook runs top to bottom in a Jupyter kernel (nbclient) and draws at least one figure.

The executed notebook (with its outputs) and each figure as ``<name>-<k>.png`` are written to
``$DIFFALIGN_NOTEBOOK_OUT`` when it is set, else to the test's temporary directory; the committed notebooks stay
output-free. The kernel is this interpreter (``sys.executable``), whatever kernel specs are installed, with
matplotlib's inline backend, so ``plt.show()`` and a cell's open figures become ``image/png`` outputs, and
``HF_HUB_OFFLINE=1``: a notebook finds hub weights only in the local cache.
"""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600
KERNEL_ENV = {"MPLBACKEND": "module://matplotlib_inline.backend_inline", "HF_HUB_OFFLINE": "1"}


class ThisInterpreterKernelSpecs(KernelSpecManager):
    """Every kernel name resolves to an IPython kernel on ``sys.executable`` (an installed ``python3`` spec may
    name another interpreter), with :data:`KERNEL_ENV` over the inherited environment."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                          display_name=f"Python 3 ({sys.executable})", language="python", env=KERNEL_ENV)


def out_dir(tmp_path: Path) -> Path:
    """``$DIFFALIGN_NOTEBOOK_OUT`` (created) when set, else ``tmp_path``."""
    target = os.environ.get("DIFFALIGN_NOTEBOOK_OUT")
    if not target:
        return tmp_path
    path = Path(target)
    path.mkdir(parents=True, exist_ok=True)
    return path


def figures(nb) -> list[bytes]:
    """The PNG bytes of every ``image/png`` output, in cell order."""
    return [base64.b64decode(output["data"]["image/png"])
            for cell in nb.cells if cell.cell_type == "code"
            for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]


def test_committed_notebooks_carry_no_outputs():
    for path in NOTEBOOKS:
        cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in cells), f"{path.name}: clear its outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_in_a_kernel_and_draws_figures(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=ThisInterpreterKernelSpecs())
    client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, kernel_name="python3", coalesce_streams=True,
                                     resources={"metadata": {"path": str(workdir)}})
    with client.setup_kernel(cleanup_kc=True):  # our kernel manager: shut the kernel down on the way out
        try:
            client.execute()
        finally:
            out = out_dir(tmp_path)
            nbformat.write(nb, out / path.name)  # also a partly executed notebook, to see where it failed
            pngs = figures(nb)
            for k, png in enumerate(pngs):
                (out / f"{path.stem}-{k}.png").write_bytes(png)
        probe = nbformat.v4.new_code_cell("import os, sys\nprint(sys.executable)\nprint(os.getcwd())")
        nb.cells.append(probe)  # executed after the notebook was written, so not part of it
        client.execute_cell(probe, len(nb.cells) - 1, store_history=False)
    kernel_python, kernel_cwd = probe.outputs[0]["text"].splitlines()
    assert Path(kernel_python) == Path(sys.executable)
    assert Path(kernel_cwd).resolve() == workdir.resolve()
    assert pngs, f"{path.name} drew no figure"
