"""The notebooks: every one executes headless in its fast mode (MOE_NB_FAST=1: tiny sizes, smoke-scale
experiments on the committed text sample, written to a temporary directory; nothing downloaded, the
notebook files are not rewritten), and every one is committed with its outputs, so it renders where the
repository is browsed. ~1-2 min on 2 CPU cores for all five.

    python -m pytest -q tests/test_notebooks.py
"""

import glob
import os

import pytest

from conftest import REPO

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
nbformat = pytest.importorskip("nbformat")  # in requirements-dev.txt: never skipped after install


def test_there_are_five_notebooks():
    assert [os.path.basename(p)[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: os.path.basename(p)[:2])
def test_notebook_is_committed_with_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert all(c.get("execution_count") for c in code), "every code cell has run: execute the notebook and save it"
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "at least one plot is stored"
    assert any(o.output_type == "stream" or "text/markdown" in o.get("data", {}) for o in outputs)
    text = "".join(c.source for c in nb.cells if c.cell_type == "markdown")
    # each notebook says what the paper claims, what the project measured, and what that means
    assert "paper" in text and "measured" in text and "What it means" in text


def test_notebooks_stay_small():
    total = sum(os.path.getsize(p) for p in NOTEBOOKS)
    assert total < 4 * 2**20, f"{total / 2**20:.1f} MiB of notebooks: store fewer or smaller images"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: os.path.basename(p)[:2])
def test_notebook_runs_in_fast_mode(path, tmp_path_factory, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    # one runs directory for the whole session: notebook 04 reuses notebook 02's smoke runs
    runs = str(tmp_path_factory.getbasetemp() / "notebook-runs")
    monkeypatch.setenv("MOE_NB_FAST", "1")
    monkeypatch.setenv("MOE_NB_RUNS", runs)
    before = os.path.getmtime(path)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": os.path.dirname(path)}}
    )
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert os.path.getmtime(path) == before  # executed in memory: the committed outputs stay as they are
    if any("DATA_DIR" in c.source for c in nb.cells):
        # the data came from the committed sample, prepared under the runs directory, not from the network
        assert os.path.exists(os.path.join(runs, "sample-data", "shakespeare_char", "meta.json"))
