"""Shared fixtures: the repository on sys.path, and the character dataset prepared once per session
from a local copy of tiny Shakespeare (data/shakespeare_char/input.txt, or $SHARED_DATA, as .ci/run sets)."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def shakespeare_text_path():
    for path in (os.path.join(REPO, "data", "shakespeare_char", "input.txt"),
                 os.path.join(os.environ.get("SHARED_DATA", os.path.join(REPO, "..", "shared", "data")),
                              "tinyshakespeare.txt")):
        if os.path.isfile(path):
            return path
    pytest.skip("tiny Shakespeare text not found: copy it to data/shakespeare_char/input.txt")


@pytest.fixture(scope="session")
def char_data_dir(tmp_path_factory):
    """A data_dir holding shakespeare_char/{train,val}.bin + meta.json, prepared by the real script."""
    import importlib.util
    root = tmp_path_factory.mktemp("data")
    spec = importlib.util.spec_from_file_location(
        "prepare_char_for_tests", os.path.join(REPO, "data", "shakespeare_char", "prepare.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.prepare(input_path=shakespeare_text_path(), out_dir=str(root / "shakespeare_char"))
    return str(root)
