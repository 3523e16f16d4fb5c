"""
Tiny Shakespeare at the character level: text -> train.bin / val.bin (uint16 ids) + meta.json.

    python data/shakespeare_char/prepare.py                       # download (or reuse input.txt)
    python data/shakespeare_char/prepare.py --input path/to/tinyshakespeare.txt

The vocabulary is the sorted set of characters in the text (65 for tiny Shakespeare); the first 90 %
is train, the rest val, as in nanoGPT, so losses compare with its published numbers.
"""
import argparse
import json
import os
import sys
import urllib.request

import numpy as np

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
HERE = os.path.dirname(os.path.abspath(__file__))


def read_text(input_path, out_dir):
    """The text from input_path, else out_dir/input.txt, else downloaded (and kept) from URL."""
    cached = os.path.join(out_dir, "input.txt")
    path = input_path or (cached if os.path.exists(cached) else None)
    if path is None:
        print(f"downloading {URL}")
        try:
            with urllib.request.urlopen(URL, timeout=60) as r:
                text = r.read().decode("utf-8")
        except OSError as e:
            raise SystemExit(f"error: could not download {URL} ({e}); pass --input with a local copy") from None
        with open(cached + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(cached + ".tmp", cached)
        return text
    if not os.path.isfile(path):
        raise SystemExit(f"error: input text {path} not found")
    with open(path, encoding="utf-8") as f:
        return f.read()


def write_bin(ids, path):
    arr = np.asarray(ids, dtype=np.uint16)
    arr.tofile(path + ".tmp")
    os.replace(path + ".tmp", path)


def prepare(input_path=None, out_dir=HERE, val_fraction=0.1):
    text = read_text(input_path, out_dir)
    if len(text) < 100:
        raise SystemExit(f"error: the input text has only {len(text)} characters")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    n = int(len(text) * (1 - val_fraction))
    os.makedirs(out_dir, exist_ok=True)
    write_bin([stoi[c] for c in text[:n]], os.path.join(out_dir, "train.bin"))
    write_bin([stoi[c] for c in text[n:]], os.path.join(out_dir, "val.bin"))
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump({"vocab_size": len(chars), "tokenizer": "char", "chars": chars}, f)
    print(f"{len(text):,} characters, vocab {len(chars)}: train {n:,} tokens, val {len(text) - n:,} -> {out_dir}")


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--input", help="local text file instead of downloading")
    p.add_argument("--out_dir", default=HERE)
    args = p.parse_args(argv)
    prepare(args.input, args.out_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
