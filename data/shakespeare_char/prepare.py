"""
Tiny Shakespeare at the character level: text -> train.bin / val.bin (uint16 ids) + meta.json.

    python data/shakespeare_char/prepare.py                       # download (or reuse input.txt)
    python data/shakespeare_char/prepare.py --input path/to/tinyshakespeare.txt      # offline
    python data/shakespeare_char/prepare.py --input tests/data/shakespeare_sample.txt  # 64 KB, committed

The vocabulary is the sorted set of characters in the text (65 for tiny Shakespeare); the first 90 %
is train, the rest val, as in nanoGPT, so losses compare with its published numbers.

Failures raise PrepareError, one line that names the command to run instead; main() prints it.
"""

import argparse
import json
import os
import sys
import urllib.request

import numpy as np

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
HERE = os.path.dirname(os.path.abspath(__file__))


class PrepareError(Exception):
    """A data preparation failure, as one line that says what to run instead."""


def command(script, out_dir, *args):
    """The exact command line that runs script (a prepare.py) with args, writing into out_dir: paths
    relative to the working directory when they are below it, --out_dir only when not the default."""

    def short(path):
        rel = os.path.relpath(os.path.abspath(path))
        return path if rel.startswith("..") else rel

    default = os.path.abspath(os.path.dirname(script)) == os.path.abspath(out_dir)
    return " ".join(["python", short(script), *args] + ([] if default else ["--out_dir", short(out_dir)]))


def read_text(input_path, out_dir, script=__file__, offline_args=("--input", "path/to/tinyshakespeare.txt")):
    """The text from input_path, else out_dir/input.txt, else downloaded (and kept) from URL.
    script, offline_args: the offline command line a failed download names."""
    cached = os.path.join(out_dir, "input.txt")
    path = input_path or (cached if os.path.exists(cached) else None)
    if path is None:
        print(f"downloading {URL}")
        try:
            with urllib.request.urlopen(URL, timeout=60) as r:
                text = r.read().decode("utf-8")
        except (OSError, ValueError) as e:  # no network, DNS, HTTP errors, a proxy's bad answer
            raise PrepareError(
                f"could not download tiny Shakespeare ({getattr(e, 'reason', e)}); offline, copy the text to "
                f"{cached} or run `{command(script, out_dir, *offline_args)}`"
            ) from None
        with open(cached + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(cached + ".tmp", cached)
        return text
    if not os.path.isfile(path):
        raise PrepareError(f"input text {path} not found")
    with open(path, encoding="utf-8") as f:
        return f.read()


def write_bin(ids, path):
    arr = np.asarray(ids, dtype=np.uint16)
    arr.tofile(path + ".tmp")
    os.replace(path + ".tmp", path)


def prepare(input_path=None, out_dir=HERE, val_fraction=0.1):
    text = read_text(input_path, out_dir)
    if len(text) < 100:
        raise PrepareError(f"the input text has only {len(text)} characters")
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
    try:
        prepare(args.input, args.out_dir)
    except PrepareError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
