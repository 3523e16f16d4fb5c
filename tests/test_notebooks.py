"""Every notebook in notebooks/ executes headless in its fast mode (MOE_NB_FAST=1: tiny sizes, smoke-scale
experiments written to a temporary directory). ~1-2 min on 2 CPU cores for all five.

    python -m pytest -q tests/test_notebooks.py
"""
import glob
import os

import pytest

from conftest import REPO

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))


def test_there_are_five_notebooks():
    assert [os.path.basename(p)[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: os.path.basename(p)[:2])
def test_notebook_runs_in_fast_mode(path, tmp_path_factory, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # one runs directory for the whole session: notebook 04 reuses notebook 02's smoke runs
    runs = str(tmp_path_factory.getbasetemp() / "notebook-runs")
    monkeypatch.setenv("MOE_NB_FAST", "1")
    monkeypatch.setenv("MOE_NB_RUNS", runs)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
