"""
The token files a run trains on: data_dir/<dataset>/{train,val}.bin (uint16 token ids) and meta.json
(its vocab_size), written by data/<dataset>/prepare.py. Prepared on first use for the default character
dataset; checked at start-up (truncated files, too few tokens, ids beyond the vocabulary) so that a
bad file is a one-line DataError saying what to run, not a failure deep inside the first step; and
read as random windows (get_batch), sharded over the ranks of a data-parallel run.
"""

import json
import os

import numpy as np
import torch

from model import padded_vocab_size


class DataError(Exception):
    """A dataset that is missing or unusable; the message says what to run."""


def data_root(tcfg):
    return os.path.join(tcfg.data_dir, tcfg.dataset)


def prepare_advice(tcfg):
    """What to run to write data_dir/dataset/{train,val}.bin and meta.json: the dataset's prepare.py
    beside the data, else this repository's data/<dataset>/prepare.py told where to write."""
    root = data_root(tcfg)
    repo_script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", tcfg.dataset, "prepare.py")
    for script in (os.path.join(root, "prepare.py"), repo_script):
        if os.path.isfile(script):
            same = os.path.abspath(os.path.dirname(script)) == os.path.abspath(root)
            return f"prepare the dataset with `python {script}" + ("`" if same else f" --out_dir {root}`")
    return (
        f"dataset {tcfg.dataset!r} has no prepare.py: write train.bin and val.bin (uint16 token ids) and "
        f'meta.json ({{"vocab_size": N}}) into {root}, or check data_dir and dataset'
    )


def ensure_data(tcfg):
    """Prepare the default character dataset on first use; say which command to run for others."""
    root = data_root(tcfg)
    bins = [os.path.join(root, f"{s}.bin") for s in ("train", "val")]
    if all(os.path.exists(p) for p in bins):
        return
    prepare_py = os.path.join(root, "prepare.py")
    if tcfg.dataset == "shakespeare_char" and os.path.exists(prepare_py):
        print(f"{bins[0]} missing: running {prepare_py}")
        import importlib.util

        spec = importlib.util.spec_from_file_location("prepare_char", prepare_py)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        try:
            mod.prepare(out_dir=root)
        except mod.PrepareError as e:  # offline, no copy of the text: the command that works
            raise DataError(str(e)) from None
        return
    missing = " and ".join(p for p in bins if not os.path.exists(p))
    raise DataError(f"{missing} not found: {prepare_advice(tcfg)}")


SCAN_TOKENS = 1 << 26  # token ids checked at start-up: all of a small dataset, the start of a large one


def load_split(path, block_size, vocab_size, advice="prepare the dataset again", vocab_from="meta.json"):
    """The split's uint16 tokens (a memmap), after the checks that would otherwise fail deep inside the
    first step (or as a device-side assert on a GPU). advice: what to do about a bad file."""
    if not os.path.isfile(path):
        raise DataError(f"{path} not found: {advice}")
    size = os.path.getsize(path)
    if size % 2:  # a file cut short by an interrupted prepare or copy
        raise DataError(f"{path} is truncated ({size} bytes, not a whole number of uint16 tokens): {advice}")
    data = np.memmap(path, dtype=np.uint16, mode="r") if size else np.zeros(0, np.uint16)  # memmap refuses empty
    if len(data) <= block_size + 1:
        raise DataError(
            f"{path} holds {len(data)} tokens, fewer than block_size+2={block_size + 2}: lower block_size or "
            "prepare more data"
        )
    top = max(int(data[i : i + (1 << 22)].max()) for i in range(0, min(len(data), SCAN_TOKENS), 1 << 22))
    if top >= vocab_size:
        raise DataError(
            f"{path} holds token id {top}, but vocab_size={vocab_size} (from {vocab_from}): the data was "
            f"tokenized for another vocabulary; {advice}, or use a checkpoint trained on this dataset"
        )
    return data


def get_batch(data, batch_size, block_size, gen, device, rank=0, world_size=1, vocab_size=None):
    """batch_size random windows of block_size+1 tokens; gen (a torch.Generator) is the data position.

    Sharded by rank: every rank draws the same batch_size window starts from an identically seeded
    generator (so the data position is one state for any world size, and a checkpoint resumes at
    another) and reads only its own contiguous batch_size / world_size windows. vocab_size: reject
    token ids beyond the model's vocabulary (checked on the host, before any device work)."""
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=gen).tolist()
    per_rank = batch_size // world_size
    ix = ix[rank * per_rank : (rank + 1) * per_rank]
    windows = np.stack([data[i : i + block_size + 1].astype(np.int64) for i in ix])
    if vocab_size is not None and windows.max() >= vocab_size:
        raise DataError(
            f"token id {windows.max()} in a training batch is >= vocab_size={vocab_size}: the data was "
            "tokenized for another vocabulary (or is corrupt); prepare it again"
        )
    xy = torch.from_numpy(windows)
    if device.type == "cuda":  # pinned once, then both halves copied asynchronously
        xy = xy.pin_memory().to(device, non_blocking=True)
    return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()


def read_vocab_size(tcfg):
    """The model's vocabulary for the dataset: meta.json's vocab_size, padded for a BPE tokenizer."""
    meta = os.path.join(data_root(tcfg), "meta.json")
    if not os.path.exists(meta):
        raise DataError(f"{meta} not found: {prepare_advice(tcfg)}")
    try:
        with open(meta, encoding="utf-8") as f:
            info = json.load(f)
        vocab, bpe = info["vocab_size"], info.get("tokenizer") == "gpt2"
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        raise DataError(
            f"{meta} is not a dataset description with a vocab_size ({type(e).__name__}): {prepare_advice(tcfg)}"
        ) from None
    if not isinstance(vocab, int) or isinstance(vocab, bool) or not 1 <= vocab <= 1 << 16:
        raise DataError(
            f"{meta}: vocab_size={vocab!r} is not a vocabulary of uint16 tokens (1..65536): {prepare_advice(tcfg)}"
        )
    return padded_vocab_size(vocab) if bpe else vocab  # GPT-2's 50,257 -> 50,304 rows (model.py)


def open_splits(tcfg, block_size, vocab_size, vocab_from):
    """{"train", "val"}: each split checked by load_split against the model's block size and vocabulary."""
    root, advice = data_root(tcfg), prepare_advice(tcfg)
    return {
        s: load_split(os.path.join(root, f"{s}.bin"), block_size, vocab_size, advice, vocab_from)
        for s in ("train", "val")
    }
