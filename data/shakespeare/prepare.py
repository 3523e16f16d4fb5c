"""
Tiny Shakespeare with the GPT-2 BPE (tiktoken's r50k_base / gpt2): text -> train.bin / val.bin + meta.json.

    python data/shakespeare/prepare.py
    python data/shakespeare/prepare.py --input tinyshakespeare.txt --ranks r50k_base.tiktoken   # offline

Offline, the BPE is built from a local ranks file (the very file tiktoken downloads for gpt2:
r50k_base.tiktoken), so no network is needed; its sha256 is checked. Without --ranks, tiktoken
downloads it (or reuses its cache). Failures raise PrepareError, one line naming the command to run.
"""

import argparse
import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "shakespeare_char"))
from prepare import PrepareError, command, read_text, write_bin  # noqa: E402  (the character script's)

R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenisation pattern (the published regex of the gpt2 encoding)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


OFFLINE_ARGS = ("--input", "path/to/tinyshakespeare.txt", "--ranks", "path/to/r50k_base.tiktoken")


def gpt2_encoding(ranks_path=None, sha256=R50K_SHA256, out_dir=HERE, offline_args=OFFLINE_ARGS):
    """tiktoken's gpt2 encoding: from a local ranks file when given, else tiktoken's own download.
    sha256: the ranks file's expected digest (None accepts any ranks file: the tests' toy BPE, which
    exercises the pipeline offline; the command line always checks). out_dir, offline_args: the
    offline command line a failed download names."""
    import tiktoken

    if ranks_path is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # offline: requests' ConnectionError deep inside tiktoken's download
            raise PrepareError(
                f"could not get the GPT-2 BPE ranks (tiktoken downloads them: {type(e).__name__}); "
                f"offline, run `{command(__file__, out_dir, *offline_args)}`"
            ) from None
    if not os.path.isfile(ranks_path):
        raise PrepareError(f"BPE ranks file {ranks_path} not found")
    with open(ranks_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if sha256 is not None and digest != sha256:
        raise PrepareError(
            f"{ranks_path} has sha256 {digest[:12]}..., not r50k_base's {sha256[:12]}...: "
            "pass the r50k_base.tiktoken that tiktoken downloads for gpt2"
        )
    from tiktoken.load import load_tiktoken_bpe

    try:
        ranks = load_tiktoken_bpe(ranks_path)
    except Exception as e:  # only reachable with sha256=None: the real file always parses
        raise PrepareError(f"{ranks_path} is not a tiktoken ranks file ({type(e).__name__}: {e})") from None
    return tiktoken.Encoding(
        name="gpt2-local",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": max(ranks.values()) + 1},
    )


def prepare(input_path=None, out_dir=HERE, ranks_path=None, val_fraction=0.1, sha256=R50K_SHA256):
    offline = (
        "--input",
        input_path or "path/to/tinyshakespeare.txt",
        "--ranks",
        ranks_path or "path/to/r50k_base.tiktoken",
    )
    text = read_text(input_path, out_dir, __file__, offline)
    enc = gpt2_encoding(ranks_path, sha256, out_dir, offline)
    n = int(len(text) * (1 - val_fraction))
    train_ids, val_ids = enc.encode_ordinary(text[:n]), enc.encode_ordinary(text[n:])
    os.makedirs(out_dir, exist_ok=True)
    write_bin(train_ids, os.path.join(out_dir, "train.bin"))
    write_bin(val_ids, os.path.join(out_dir, "val.bin"))
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump({"vocab_size": enc.n_vocab, "tokenizer": "gpt2"}, f)
    print(f"train {len(train_ids):,} tokens, val {len(val_ids):,} tokens (GPT-2 BPE) -> {out_dir}")


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--input", help="local text file instead of downloading")
    p.add_argument("--ranks", help="local r50k_base.tiktoken (GPT-2 BPE ranks) for offline use")
    p.add_argument("--out_dir", default=HERE)
    args = p.parse_args(argv)
    try:
        prepare(args.input, args.out_dir, args.ranks)
    except PrepareError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
