"""
Generate text from a checkpoint written by train.py.

    python sample.py                                   # out/ckpt.pt, 3 samples of 500 characters
    python sample.py --ckpt out/ckpt.pt --prompt "ROMEO:" --temperature 0.8 --top_k 40 --seed 7

The tokenizer is the dataset's: characters from meta.json, or the GPT-2 BPE (pass --ranks for an
offline ranks file).
"""

import argparse
import json
import math
import os
import sys

import torch

from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint


class SampleError(Exception):
    pass


def tokenizer_for(train_config, ranks_path=None):
    """(encode, decode, its vocabulary size) for the dataset the checkpoint was trained on."""
    data_dir, dataset = train_config.get("data_dir", "data"), train_config.get("dataset", "shakespeare_char")
    meta_path = os.path.join(data_dir, dataset, "meta.json")
    if not os.path.exists(meta_path):
        raise SampleError(f"{meta_path} not found: the checkpoint's dataset must be prepared to decode its tokens")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("tokenizer") == "char":
        stoi = {c: i for i, c in enumerate(meta["chars"])}

        def encode(s):
            missing = sorted(set(s) - set(stoi))
            if missing:
                raise SampleError(f"the prompt has characters outside the vocabulary: {missing}")
            return [stoi[c] for c in s]

        return encode, lambda ids: "".join(meta["chars"][i] for i in ids), len(meta["chars"])
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "shakespeare"))
    from prepare import gpt2_encoding

    enc = gpt2_encoding(ranks_path)
    return enc.encode_ordinary, enc.decode, enc.n_vocab


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 1, like every other bad input (argparse: usage, 2)
        sys.exit(f"error: {message} (python sample.py --help lists the options)")


def main(argv):
    p = ArgumentParser(description="Generate text from a checkpoint.")
    p.add_argument("--ckpt", default=os.path.join("out", "ckpt.pt"))
    p.add_argument("--prompt", default="\n")
    p.add_argument("--num_samples", type=int, default=3)
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cpu")
    p.add_argument("--ranks", help="local r50k_base.tiktoken for BPE checkpoints, offline")
    args = p.parse_args(argv)
    ok = math.isfinite(args.temperature) and args.temperature > 0
    if not ok or args.max_new_tokens < 0 or args.num_samples < 1 or args.top_k < 1:
        sys.exit("error: need a finite temperature > 0, max_new_tokens >= 0, num_samples >= 1, top_k >= 1")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        sys.exit(f"error: --device {args.device!r} is not a device: use cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        sys.exit(f"error: --device {args.device}: no such device here; use --device cpu")
    try:
        ckpt = load_checkpoint(args.ckpt)
        model = model_from_checkpoint(ckpt, device, where=args.ckpt).eval()
        encode, decode, n_tokens = tokenizer_for(ckpt["train_config"] or {}, args.ranks)
        ids = encode(args.prompt)
    except (CheckpointError, SampleError) as e:
        sys.exit(f"error: {e}")
    if not ids:
        sys.exit("error: the prompt encodes to no tokens")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    for _ in range(args.num_samples):
        y = model.generate(x, args.max_new_tokens, args.temperature, args.top_k, generator=gen, n_tokens=n_tokens)
        print(decode(y[0].tolist()))
        print("---------------")


if __name__ == "__main__":
    main(sys.argv[1:])
