"""
A public web corpus -> GPT-2 BPE token shards for the full-scale experiments (experiments/*.py
--scale full read data/fineweb/{train,val}.bin).

    python data/fineweb/prepare.py                                       # stream FineWeb sample-10BT
    python data/fineweb/prepare.py --max_tokens 2e9 --workers 32         # a first slice of it
    python data/fineweb/prepare.py --hf_dataset Skylion007/openwebtext --hf_name none
    python data/fineweb/prepare.py --input notes.txt --ranks r50k_base.tiktoken --out_dir /tmp/tok  # local, offline

Documents are streamed (the Hugging Face `datasets` library with streaming=True, nothing downloaded
up front; or local .txt files split at blank lines, or .jsonl files with a "text" field), tokenised in
parallel worker processes with GPT-2's BPE (data/shakespeare/prepare.py's gpt2_encoding: tiktoken's
gpt2, or built offline from a local r50k_base.tiktoken), each document preceded by <|endoftext|>,
and written in document order as uint16 shards: val_000000.bin ... (the first --val_tokens tokens),
then train_000000.bin ...; a progress bar shows tokens, documents and speed. At the end the shards of
each split are joined into train.bin / val.bin, which train.py memory-maps (--keep_shards keeps the
shards too, --no_merge keeps only them), and meta.json records the vocabulary size.

Failures raise PrepareError (one line that says what to do); main() prints it and exits 1.
"""

import argparse
import glob
import json
import multiprocessing
import os
import re
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
EOT = 50256  # <|endoftext|>, the document separator of GPT-2 training data
VOCAB_SIZE = 50257  # < 2**16, so uint16 holds every id


OFFLINE_COMMAND = "python data/fineweb/prepare.py --input FILE.txt|FILE.jsonl ... --ranks path/to/r50k_base.tiktoken"


class PrepareError(Exception):
    """A preparation failure, as one line that says what to do."""


# -----------------------------------------------------------------------------
# documents: a streamed Hugging Face dataset, or local files through the same pipeline


def hf_documents(dataset, name, split, text_field="text"):
    try:
        from datasets import load_dataset
    except ImportError:
        raise PrepareError(
            f"streaming a Hugging Face dataset needs `pip install datasets`; offline, run `{OFFLINE_COMMAND}`"
        ) from None
    try:
        ds = load_dataset(dataset, name=None if name in (None, "none") else name, split=split, streaming=True)
        for row in ds:
            yield row[text_field]
    except Exception as e:  # offline or a wrong name: the datasets / huggingface_hub error of the day
        raise PrepareError(
            f"could not stream {dataset}/{name} ({type(e).__name__}: {str(e)[:160]}); offline, run `{OFFLINE_COMMAND}`"
        ) from None


def file_documents(paths):
    """.jsonl: one document per line (its "text"); any other file: documents separated by blank lines."""
    for path in paths:
        if not os.path.isfile(path):
            raise PrepareError(f"input file {path} not found")
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                for line in f:
                    if line.strip():
                        yield json.loads(line)["text"]
            else:
                for doc in re.split(r"\n\s*\n", f.read()):
                    if doc.strip():
                        yield doc


# -----------------------------------------------------------------------------
# tokenisation in worker processes

_worker_encoding = None  # one per worker process, built once by the pool's initializer


def gpt2_encoding(ranks_path, sha256="r50k_base"):
    """data/shakespeare/prepare.py's GPT-2 BPE (tiktoken's gpt2, or offline from a ranks file), loaded
    under its own module name: every dataset's script is called prepare.py. sha256: the ranks file's
    expected digest ("r50k_base": GPT-2's; None: any ranks file, for the tests' toy BPE)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "shakespeare_bpe_prepare", os.path.join(HERE, "..", "shakespeare", "prepare.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        return mod.gpt2_encoding(ranks_path, mod.R50K_SHA256 if sha256 == "r50k_base" else sha256)
    except mod.PrepareError as e:
        if ranks_path is None:  # tiktoken's download failed
            raise PrepareError(
                f"could not get the GPT-2 BPE ranks (tiktoken downloads them); offline, run `{OFFLINE_COMMAND}`"
            ) from None
        raise PrepareError(str(e)) from None


def init_worker(ranks_path, sha256="r50k_base"):
    global _worker_encoding
    _worker_encoding = gpt2_encoding(ranks_path, sha256)


def encode_document(text):
    ids = [EOT] + _worker_encoding.encode_ordinary(text)
    return np.asarray(ids, dtype=np.uint16)


def tokenised(documents, workers, ranks_path, sha256="r50k_base", chunksize=16):
    """Token arrays of the documents, in document order, from `workers` processes (1: this one)."""
    # built here first: a pool whose initializer raises restarts its workers forever instead of failing
    init_worker(ranks_path, sha256)
    if workers <= 1:
        yield from map(encode_document, documents)
        return
    ctx = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
    with ctx.Pool(workers, initializer=init_worker, initargs=(ranks_path, sha256)) as pool:
        yield from pool.imap(encode_document, documents, chunksize=chunksize)


# -----------------------------------------------------------------------------
# shards and the progress bar


class ShardWriter:
    """Fills fixed-size uint16 shards <split>_000000.bin, ... (the last one may be shorter)."""

    def __init__(self, out_dir, split, shard_tokens):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.buf = np.empty(shard_tokens, dtype=np.uint16)
        self.fill, self.paths, self.tokens = 0, [], 0

    def add(self, ids):
        while len(ids):
            n = min(len(ids), self.shard_tokens - self.fill)
            self.buf[self.fill : self.fill + n] = ids[:n]
            self.fill, ids, self.tokens = self.fill + n, ids[n:], self.tokens + n
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self):
        if self.fill:
            path = os.path.join(self.out_dir, f"{self.split}_{len(self.paths):06d}.bin")
            self.buf[: self.fill].tofile(path + ".tmp")
            os.replace(path + ".tmp", path)
            self.paths.append(path)
            self.fill = 0


class Progress:
    """A one-line progress bar on stderr: tokens (of max_tokens), documents, tokens/s."""

    def __init__(self, total=None, every=0.5):
        self.total, self.every, self.t0, self.last = total, every, time.time(), 0.0

    def update(self, tokens, docs, force=False):
        now = time.time()
        if not force and now - self.last < self.every:
            return
        self.last = now
        rate = tokens / max(now - self.t0, 1e-9)
        if self.total:
            frac = min(1.0, tokens / self.total)
            bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
            head = f"[{bar}] {100 * frac:5.1f}% "
        else:
            head = ""
        print(
            f"\r{head}{tokens:,} tokens, {docs:,} documents, {rate:,.0f} tokens/s", end="", file=sys.stderr, flush=True
        )


def merge_shards(paths, out_path, remove):
    """Concatenate shards into the single file train.py memory-maps."""
    with open(out_path + ".tmp", "wb") as out:
        for p in paths:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    out.write(chunk)
    os.replace(out_path + ".tmp", out_path)
    if remove:
        for p in paths:
            os.remove(p)


# -----------------------------------------------------------------------------
# the pipeline


def prepare(
    documents,
    out_dir=HERE,
    ranks_path=None,
    workers=None,
    shard_tokens=100_000_000,
    val_tokens=10_000_000,
    max_tokens=None,
    merge=True,
    keep_shards=False,
    source="",
    quiet=False,
    sha256="r50k_base",
):
    """Tokenise `documents` (an iterable of strings) into out_dir; returns meta.json's contents.
    sha256: the ranks file's expected digest (see gpt2_encoding)."""
    if shard_tokens < 1 or val_tokens < 0:
        raise PrepareError("--shard_tokens must be >= 1 and --val_tokens >= 0")
    os.makedirs(out_dir, exist_ok=True)
    for old in glob.glob(os.path.join(out_dir, "*_[0-9][0-9][0-9][0-9][0-9][0-9].bin")):
        os.remove(old)  # shards of an earlier run would otherwise be mixed into this one
    workers = workers or max(1, (os.cpu_count() or 2) - 1)
    writers = {"val": ShardWriter(out_dir, "val", shard_tokens), "train": ShardWriter(out_dir, "train", shard_tokens)}
    progress = Progress(max_tokens)
    total = docs = 0
    for ids in tokenised(documents, workers, ranks_path, sha256):
        # whole documents go to val until it holds val_tokens, then everything goes to train
        split = "val" if writers["val"].tokens < val_tokens else "train"
        writers[split].add(ids)
        total, docs = total + len(ids), docs + 1
        if not quiet:
            progress.update(total, docs)
        if max_tokens and total >= max_tokens:
            break
    if not quiet:
        progress.update(total, docs, force=True)
        print(file=sys.stderr)
    for w in writers.values():
        w.flush()
    if not writers["train"].paths:
        raise PrepareError(f"only {total:,} tokens, all used for validation: lower --val_tokens or add data")
    meta = {
        "vocab_size": VOCAB_SIZE,
        "tokenizer": "gpt2",
        "source": source,
        "documents": docs,
        "tokens": {s: w.tokens for s, w in writers.items()},
        "shards": {s: [os.path.basename(p) for p in w.paths] for s, w in writers.items()},
    }
    if merge:
        for s, w in writers.items():
            if w.paths:
                merge_shards(w.paths, os.path.join(out_dir, f"{s}.bin"), remove=not keep_shards)
        if not keep_shards:
            meta["shards"] = {}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    if not quiet:
        print(
            f"{docs:,} documents -> train {writers['train'].tokens:,} / val {writers['val'].tokens:,} "
            f"tokens in {out_dir}"
        )
    return meta


def main(argv):
    p = argparse.ArgumentParser(
        description=__doc__.strip().splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input", nargs="+", help="local .txt / .jsonl files instead of streaming")
    p.add_argument("--hf_dataset", default="HuggingFaceFW/fineweb", help="Hugging Face dataset to stream")
    p.add_argument("--hf_name", default="sample-10BT", help="its configuration ('none' for the default)")
    p.add_argument("--hf_split", default="train")
    p.add_argument("--ranks", help="local r50k_base.tiktoken (GPT-2 BPE ranks) for offline use")
    p.add_argument("--out_dir", default=HERE)
    p.add_argument("--workers", type=int, default=None, help="tokeniser processes (default: cores - 1)")
    p.add_argument("--shard_tokens", type=float, default=1e8, help="tokens per shard")
    p.add_argument("--val_tokens", type=float, default=1e7, help="tokens (whole documents) for validation")
    p.add_argument("--max_tokens", type=float, default=None, help="stop after this many tokens")
    p.add_argument("--keep_shards", action="store_true", help="keep the shards after joining them")
    p.add_argument("--no_merge", action="store_true", help="write only the shards (no train.bin / val.bin)")
    a = p.parse_args(argv)
    if a.input:
        docs, source = file_documents(a.input), " ".join(a.input)
    else:
        docs, source = hf_documents(a.hf_dataset, a.hf_name, a.hf_split), f"{a.hf_dataset}/{a.hf_name}"
    try:
        missing = [path for path in a.input or [] if not os.path.isfile(path)]
        if missing:  # now, not after the BPE is loaded and the pool started
            raise PrepareError(f"input file {missing[0]} not found")
        prepare(
            docs,
            a.out_dir,
            a.ranks,
            a.workers,
            int(a.shard_tokens),
            int(a.val_tokens),
            int(a.max_tokens) if a.max_tokens else None,
            not a.no_merge,
            a.keep_shards,
            source,
        )
    except PrepareError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
