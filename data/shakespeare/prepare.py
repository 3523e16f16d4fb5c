"""
Tiny Shakespeare with the GPT-2 BPE (tiktoken's r50k_base / gpt2): text -> train.bin / val.bin + meta.json.

    python data/shakespeare/prepare.py
    python data/shakespeare/prepare.py --input tinyshakespeare.txt --ranks r50k_base.tiktoken   # offline

Offline, the BPE is built from a local ranks file (the very file tiktoken downloads for gpt2:
r50k_base.tiktoken), so no network is needed; its sha256 is checked.
"""
import argparse
import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "shakespeare_char"))
from prepare import read_text, write_bin  # noqa: E402  (the character script's reader and writer)

R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenisation pattern (the published regex of the gpt2 encoding)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def gpt2_encoding(ranks_path=None):
    """tiktoken's gpt2 encoding: from a local ranks file when given, else tiktoken's own download."""
    import tiktoken
    if ranks_path is None:
        return tiktoken.get_encoding("gpt2")
    if not os.path.isfile(ranks_path):
        raise SystemExit(f"error: BPE ranks file {ranks_path} not found")
    with open(ranks_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != R50K_SHA256:
        raise SystemExit(f"error: {ranks_path} has sha256 {digest[:12]}..., not r50k_base's {R50K_SHA256[:12]}...")
    from tiktoken.load import load_tiktoken_bpe
    ranks = load_tiktoken_bpe(ranks_path)
    return tiktoken.Encoding(name="gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def prepare(input_path=None, out_dir=HERE, ranks_path=None, val_fraction=0.1):
    text = read_text(input_path, out_dir)
    enc = gpt2_encoding(ranks_path)
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
    prepare(args.input, args.out_dir, args.ranks)


if __name__ == "__main__":
    main(sys.argv[1:])
