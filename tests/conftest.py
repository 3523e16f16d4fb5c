"""Shared fixtures. Every test runs offline on a fresh clone: text comes from the committed sample
tests/data/shakespeare_sample.txt (64 KB of tiny Shakespeare), prepared exactly as
`python data/shakespeare_char/prepare.py --input tests/data/shakespeare_sample.txt` does. The only skips
are for missing hardware (a GPU, NCCL).

    REPO, SAMPLE_TEXT          paths
    shakespeare_text_path()    the full tiny Shakespeare if a copy is here, else SAMPLE_TEXT
    char_data_dir              a data_dir holding shakespeare_char/{train,val}.bin + meta.json (the sample)
    toy_bpe_ranks              a tiktoken ranks file learned from the sample (256 bytes + 64 merges),
                               for the BPE pipelines offline (pass sha256=None: it is not GPT-2's)
    gpt2_ranks_path()          GPT-2's r50k_base.tiktoken if one is on this machine, else None
    load_run_config(argv)      (ModelConfig, TrainConfig, sources), as train.py reads its arguments
    ONE_THREAD                 the environment for a script run as a subprocess (one thread, unbuffered)
    one_stderr_line(p)         a finished subprocess failed with exit 1 and one line, no traceback: that line
"""

import base64
import collections
import importlib.util
import os
import re
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SAMPLE_TEXT = os.path.join(REPO, "tests", "data", "shakespeare_sample.txt")


def load_run_config(argv):
    """(ModelConfig, TrainConfig, sources) from config files and key=value arguments, as train.py reads them."""
    from config import load_config
    from model import ModelConfig
    from train import TrainConfig

    (model_cfg, tcfg), sources = load_config(argv, [ModelConfig, TrainConfig])
    return model_cfg, tcfg, sources


def one_stderr_line(p):
    """What every command line promises on a bad input: exit status 1 and one line on stderr, no traceback."""
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    return p.stderr.rstrip("\n")


def load_script(path, name):
    """A data/*/prepare.py as a module under its own name (every dataset's script is prepare.py)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # a worker pool pickles functions by module name
    spec.loader.exec_module(mod)
    return mod


def shakespeare_text_path():
    """The full tiny Shakespeare where a copy is on this machine (data/shakespeare_char/input.txt, or
    $SHARED_DATA as .ci/run sets), else the committed sample. For the few checks against published
    full-text numbers; everything else uses the sample (char_data_dir), the same on every machine."""
    shared = os.environ.get("SHARED_DATA", os.path.join(REPO, "..", "shared", "data"))
    for path in (
        os.path.join(REPO, "data", "shakespeare_char", "input.txt"),
        os.path.join(shared, "tinyshakespeare.txt"),
    ):
        if os.path.isfile(path):
            return path
    return SAMPLE_TEXT


def gpt2_ranks_path():
    """GPT-2's BPE ranks (r50k_base.tiktoken) in $SHARED_DATA (where .ci/run finds them), else None."""
    shared = os.environ.get("SHARED_DATA", os.path.join(REPO, "..", "shared", "data"))
    path = os.path.join(shared, "r50k_base.tiktoken")
    return path if os.path.isfile(path) else None


@pytest.fixture(scope="session")
def char_data_dir(tmp_path_factory):
    """A data_dir holding shakespeare_char/{train,val}.bin + meta.json, prepared from the sample by the
    real script."""
    root = tmp_path_factory.mktemp("data")
    mod = load_script("data/shakespeare_char/prepare.py", "prepare_char_for_tests")
    mod.prepare(input_path=SAMPLE_TEXT, out_dir=str(root / "shakespeare_char"))
    return str(root)


@pytest.fixture(scope="session")
def toy_bpe_ranks(tmp_path_factory):
    """A byte-level BPE learned from the sample, written in tiktoken's ranks format (one
    `base64(token) rank` line each): the 256 bytes, then 64 merges, most frequent pair first, so the
    GPT-2 pipelines can be run offline. Not GPT-2's: give the scripts sha256=None."""
    with open(SAMPLE_TEXT, encoding="utf-8") as f:
        words = collections.Counter(re.findall(r" ?\w+| ?[^\s\w]+|\s+", f.read()))
    pieces = {w: [bytes([b]) for b in w.encode()] for w in words}
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(64):
        pairs = collections.Counter()
        for w, n in words.items():
            for pair in zip(pieces[w], pieces[w][1:]):
                pairs[pair] += n
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for w, p in pieces.items():
            merged, i = [], 0
            while i < len(p):
                if i + 1 < len(p) and p[i] == a and p[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(p[i])
                    i += 1
            pieces[w] = merged
    path = tmp_path_factory.mktemp("bpe") / "toy.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return str(path)
