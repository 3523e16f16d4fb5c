"""Data preparation, offline: the character and GPT-2 BPE scripts on the committed sample, the FineWeb
pipeline on a local file, and the failures a user without network meets (one line naming the command
to run instead, exit 1, no traceback).

    python -m pytest -q tests/test_prepare.py
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, SAMPLE_TEXT, load_script, one_stderr_line

CHAR = "data/shakespeare_char/prepare.py"
BPE = "data/shakespeare/prepare.py"


def sample_text():
    with open(SAMPLE_TEXT, encoding="utf-8") as f:
        return f.read()


def run_offline(script, *args, cwd=REPO):
    """Run a prepare.py as `python script args` with every network call failing the way it does
    without network (urllib's URLError, requests' ConnectionError inside tiktoken)."""
    code = (
        "import sys, runpy, urllib.request, urllib.error, tiktoken\n"
        "def no_network(*a, **k): raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')\n"
        "def no_tiktoken(*a, **k): raise ConnectionError('HTTPSConnectionPool: Max retries exceeded')\n"
        "urllib.request.urlopen = no_network\n"
        "tiktoken.get_encoding = no_tiktoken\n"
        f"sys.argv = [{script!r}] + sys.argv[1:]\n"
        f"runpy.run_path({script!r}, run_name='__main__')\n"
    )
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def one_line_error(p):
    line = one_stderr_line(p)
    assert line.startswith("error: "), line
    return line


# -----------------------------------------------------------------------------
# character level


def test_char_prepare_from_input(tmp_path):
    p = subprocess.run(
        [sys.executable, CHAR, "--input", SAMPLE_TEXT, "--out_dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    text = sample_text()
    meta = json.loads((tmp_path / "meta.json").read_text())
    chars = meta["chars"]
    assert chars == sorted(set(text)) and meta["vocab_size"] == len(chars) == 59
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    n = int(len(text) * 0.9)
    assert (len(train), len(val)) == (n, len(text) - n)
    assert "".join(chars[i] for i in np.concatenate([train, val])) == text  # lossless, in order


def test_char_download_failure_names_the_offline_command(tmp_path):
    out = tmp_path / "out"
    msg = one_line_error(run_offline(CHAR, "--out_dir", str(out)))
    assert "could not download tiny Shakespeare" in msg
    assert f"`python {CHAR} --input path/to/tinyshakespeare.txt --out_dir {out}`" in msg
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


def test_char_download_failure_in_process_raises_prepare_error(tmp_path, monkeypatch):
    mod = load_script(CHAR, "prepare_char_offline")

    def no_network(*a, **k):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(mod.urllib.request, "urlopen", no_network)
    with pytest.raises(mod.PrepareError, match=r"offline, copy the text to .*input.txt or run `python .*--input"):
        mod.prepare(out_dir=str(tmp_path))


def test_char_missing_input_file(tmp_path):
    msg = one_line_error(run_offline(CHAR, "--input", str(tmp_path / "nope.txt"), "--out_dir", str(tmp_path)))
    assert "nope.txt not found" in msg


# -----------------------------------------------------------------------------
# GPT-2 BPE (tiny Shakespeare), offline


def test_bpe_pipeline_offline_with_a_local_ranks_file(tmp_path, toy_bpe_ranks):
    mod = load_script(BPE, "prepare_bpe_offline")
    mod.prepare(SAMPLE_TEXT, str(tmp_path), toy_bpe_ranks, sha256=None)
    enc = mod.gpt2_encoding(toy_bpe_ranks, sha256=None)
    text = sample_text()
    n = int(len(text) * 0.9)
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    assert train.tolist() == enc.encode_ordinary(text[:n]) and val.tolist() == enc.encode_ordinary(text[n:])
    assert enc.decode(train.tolist()) + enc.decode(val.tolist()) == text
    assert len(train) < 0.8 * n  # the merges did merge
    assert json.loads((tmp_path / "meta.json").read_text())["vocab_size"] == enc.n_vocab == 256 + 64 + 1


def test_bpe_without_network_or_ranks_names_the_ranks_flag(tmp_path):
    msg = one_line_error(run_offline(BPE, "--input", SAMPLE_TEXT, "--out_dir", str(tmp_path)))
    assert "could not get the GPT-2 BPE ranks" in msg
    assert f"`python {BPE} --input {SAMPLE_TEXT} --ranks path/to/r50k_base.tiktoken --out_dir {tmp_path}`" in msg
    # no text either: the first failure (the download of the text) names both flags
    msg = one_line_error(run_offline(BPE, "--out_dir", str(tmp_path / "x")))
    assert "--input path/to/tinyshakespeare.txt --ranks path/to/r50k_base.tiktoken" in msg


def test_bpe_command_line_checks_the_ranks_file(tmp_path, toy_bpe_ranks):
    msg = one_line_error(run_offline(BPE, "--input", SAMPLE_TEXT, "--ranks", toy_bpe_ranks, "--out_dir", str(tmp_path)))
    assert "not r50k_base's" in msg  # a BPE that is not GPT-2's is refused
    msg = one_line_error(run_offline(BPE, "--input", SAMPLE_TEXT, "--ranks", str(tmp_path / "none.tiktoken")))
    assert "none.tiktoken not found" in msg


# -----------------------------------------------------------------------------
# the FineWeb pipeline on a local file (worker processes, shards, merge)


def test_fineweb_pipeline_on_a_local_file(tmp_path, toy_bpe_ranks):
    prep = load_script("data/fineweb/prepare.py", "fineweb_prepare_for_tests")
    docs = [d for d in sample_text().split("\n\n") if d.strip()][:80]
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(docs))
    out = tmp_path / "tok"
    meta = prep.prepare(
        prep.file_documents([str(src)]),
        str(out),
        toy_bpe_ranks,
        workers=2,
        shard_tokens=700,
        val_tokens=500,
        keep_shards=True,
        quiet=True,
        sha256=None,
    )
    enc = prep.gpt2_encoding(toy_bpe_ranks, sha256=None)
    expect = np.concatenate([[prep.EOT] + enc.encode_ordinary(d) for d in docs]).astype(np.uint16)
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    np.testing.assert_array_equal(np.concatenate([val, train]), expect)  # document order kept
    assert val[0] == prep.EOT and train[0] == prep.EOT and len(val) >= 500  # splits at document starts
    assert len(meta["shards"]["train"]) > 1
    shards = np.concatenate([np.fromfile(out / s, dtype=np.uint16) for s in meta["shards"]["train"]])
    np.testing.assert_array_equal(shards, train)
    assert json.loads((out / "meta.json").read_text())["tokens"]["train"] == len(train)


def test_fineweb_errors_are_one_line(tmp_path):
    script = "data/fineweb/prepare.py"
    msg = one_line_error(run_offline(script, "--input", str(tmp_path / "missing.txt"), "--workers", "1"))
    assert "missing.txt not found" in msg
    msg = one_line_error(run_offline(script, "--input", SAMPLE_TEXT, "--workers", "2", "--out_dir", str(tmp_path)))
    assert "could not get the GPT-2 BPE ranks" in msg and "--ranks path/to/r50k_base.tiktoken" in msg
