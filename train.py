"""
Train a (Mixture-of-Experts) GPT: config, data, one optimisation step, the loop, checkpoints.

    python train.py                                    # the tiny CPU MoE on Shakespeare characters
    python train.py config/shakespeare_char.toml --max_iters=500 --gate_norm=false
    python train.py --init_from=resume                 # continue out_dir/ckpt.pt
    torchrun --standalone --nproc_per_node=2 train.py config/shakespeare_char_ep2.toml   # 2 ranks, EP 2

Under torchrun every rank runs this file; experts are sharded over ep_size ranks and tokens exchanged
by the hand-written all-to-all of expert_parallel.py. batch_size is the global micro-batch: each of the
W ranks takes batch_size / W of its sequences and routes them as its own capacity group(s), so the run
equals one process with the same batch_size and route_groups=W (tests/test_expert_parallel.py). Only
rank 0 prints, logs and saves; checkpoints hold the full experts, so any world size can resume them.

Configuration: dataclass defaults < each .toml file named on the command line (in order) < `--key=value`
(or `key=value`) overrides. Unknown keys and ill-typed values are errors that name the nearest valid key;
the resolved config is printed at start-up.

The loss is L = L_ce + sum_l alpha^(l) L_aux^(l) (+ z-loss), with the per-layer coefficients alpha^(l)
fixed or adapted after every step from that layer's token drop rate (Skywork-MoE eq. 7-9, router.py).
Every log interval one JSON line goes to out_dir/metrics.jsonl with the router statistics per MoE layer.

Long runs end cleanly whatever stops them (README "Troubleshooting"):
  - checkpoints are written to a temp file, fsynced and renamed: a kill at any moment leaves the previous
    one loadable. out_dir/ckpt.pt is the latest (what init_from=resume reads); ckpt-<iter>.pt keep the
    last keep_last, best.pt the lowest val loss (hard links: no extra disk);
  - SIGTERM / SIGINT (what schedulers send before preemption) stop the run at the next step boundary
    with a checkpoint and exit 0; under torchrun every rank stops after the same step;
  - a step whose loss, router statistics or gradients are not finite is skipped, or stops the run
    (on_nonfinite), naming the step and the MoE layer whose router statistics went bad;
  - bad inputs (data, checkpoints, out_dir, config) are one line saying what to do, exit code 1 (2 for
    the config), no traceback; under torchrun a failing rank is named on every rank (expert_parallel.py);
  - same seed and world size give the same metrics.jsonl, byte for byte (on CPU; timings are printed only).
"""
import contextlib
import dataclasses
import datetime
import difflib
import errno
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import tomllib
import types
import typing
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import expert_parallel as ep
from model import GPT, ModelConfig, expert_similarity
from router import STAT_NAMES, AuxCoefficients, aux_free_bias_step, balance_loss

# -----------------------------------------------------------------------------
# config

@dataclass
class TrainConfig:
    # the defaults are the quick-start CPU job (config/shakespeare_char.toml spells them out)
    # --- I/O
    out_dir: str = "out"
    dataset: str = "shakespeare_char"  # reads data_dir/dataset/{train,val}.bin and meta.json
    data_dir: str = "data"
    init_from: str = "scratch"         # "scratch", "resume" (out_dir/ckpt.pt), or a checkpoint path
                                       # whose weights start a new run (e.g. one written by upcycle.py)
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 25
    save_checkpoint: bool = True       # at every eval, at the end, and when stopped by SIGTERM / SIGINT
    keep_last: int = 2                 # numbered ckpt-<iter>.pt files kept besides ckpt.pt and best.pt
                                       # (0: none); hard links to ckpt.pt's data, so no extra disk
    on_nonfinite: str = "skip"         # a step with a non-finite loss, router statistic or gradient:
                                       # "skip" its update, or "stop" the run (no checkpoint written)
    max_skipped_steps: int = 5         # consecutive skipped steps after which the run stops anyway
    seed: int = 1337
    # --- batch
    batch_size: int = 16               # sequences per micro-batch, summed over ranks under torchrun
    grad_accum: int = 1                # micro-batches per optimizer step
    route_groups: int = 0              # routing groups per micro-batch: tokens sharing one capacity and
                                       # one balance loss (GShard's groups). 0: one per rank (1 in a
                                       # single process); a multiple of the world size under torchrun
    # --- optimizer and schedule
    max_iters: int = 2000
    learning_rate: float = 2e-3        # peak
    min_lr: float = 2e-4               # floor of the cosine
    lr_schedule: str = "cosine"        # "cosine" (linear warmup, cosine to min_lr) or "constant"
    warmup_iters: int = 100
    lr_decay_iters: int = 0            # 0: max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0             # 0: off
    # --- load balancing (router.py)
    aux_coef_mode: str = "adaptive"    # "adaptive" (eq. 7-9) or "fixed"
    aux_alpha: float = 0.01            # the fixed alpha, or adaptive's initial alpha
    aux_xi: float = 0.2                # xi of eq. 8 (Skywork: 1/5)
    aux_alpha_max: float = 0.01        # alpha_max of eq. 8
    aux_beta: float = 0.99             # beta of eq. 9
    z_loss_coef: float = 0.0           # ST-MoE router z-loss (typ. 1e-3)
    bias_update_rate: float = 1e-3     # u of the aux-free bias update (with aux_free_bias=true)
    balance_scope: str = "micro"       # "micro": balance loss per routing group; "global": Qwen's
                                       # global-batch balancing, f of the Switch loss all-reduced over
                                       # ranks and accumulated over the step's micro-batches
    # --- system
    device: str = "auto"               # "auto": cuda if available, else cpu
    dtype: str = "auto"                # "auto": bfloat16 autocast on cuda, float32 on cpu;
                                       # "float64": the whole model in double (CPU equivalence checks)
    # --- parallelism (torchrun; see expert_parallel.py)
    ep_size: int = 1                   # ranks per expert-parallel group, each holding n_expert/ep_size
                                       # experts; the world size must be a multiple of it
    backend: str = "auto"              # torch.distributed backend: "auto" = nccl on cuda, gloo on cpu
    dist_timeout_s: float = 600.0      # a collective waiting longer than this fails instead of hanging

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise ValueError(msg)
        need(self.batch_size > 0 and self.grad_accum > 0, "batch_size and grad_accum must be > 0")
        need(self.max_iters >= 0 and self.warmup_iters >= 0 and self.lr_decay_iters >= 0, "max_iters, warmup_iters and lr_decay_iters must be >= 0")
        need(self.eval_interval > 0 and self.eval_iters > 0 and self.log_interval > 0, "eval_interval, eval_iters and log_interval must be > 0")
        need(self.learning_rate > 0 and 0 <= self.min_lr <= self.learning_rate, f"need 0 <= min_lr={self.min_lr} <= learning_rate={self.learning_rate}, learning_rate > 0")
        need(self.lr_schedule in ("cosine", "constant"), f"lr_schedule={self.lr_schedule!r}: use 'cosine' or 'constant'")
        need(self.aux_coef_mode in ("adaptive", "fixed"), f"aux_coef_mode={self.aux_coef_mode!r}: use 'adaptive' (eq. 7-9) or 'fixed'")
        need(self.aux_alpha >= 0 and self.aux_alpha_max >= 0 and self.aux_xi >= 0, "aux_alpha, aux_alpha_max and aux_xi must be >= 0")
        need(0 <= self.aux_beta < 1, f"aux_beta={self.aux_beta} must be in [0, 1) (Skywork: 0.99)")
        need(self.z_loss_coef >= 0 and self.bias_update_rate >= 0 and self.grad_clip >= 0, "z_loss_coef, bias_update_rate and grad_clip must be >= 0")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), f"device={self.device!r}: use auto, cpu, cuda or cuda:N")
        need(self.dtype in ("auto", "float32", "bfloat16", "float16", "float64"), f"dtype={self.dtype!r}: use auto, float32, bfloat16, float16 or float64")
        need(self.route_groups >= 0, f"route_groups={self.route_groups} must be >= 0 (0 = one routing group per rank)")
        need(self.balance_scope in ("micro", "global"), f"balance_scope={self.balance_scope!r}: use 'micro' (per routing group) or 'global' (Qwen's global-batch f)")
        need(self.ep_size >= 1, f"ep_size={self.ep_size} must be >= 1 (1 = experts replicated on every rank)")
        need(self.backend in ("auto", "nccl", "gloo"), f"backend={self.backend!r}: use auto, nccl (GPUs) or gloo (CPU)")
        need(self.dist_timeout_s > 0, f"dist_timeout_s={self.dist_timeout_s} must be > 0")
        need(self.keep_last >= 0, f"keep_last={self.keep_last} must be >= 0 (0: only ckpt.pt and best.pt)")
        need(self.on_nonfinite in ("skip", "stop"), f"on_nonfinite={self.on_nonfinite!r}: use 'skip' (drop the step's update) or 'stop'")
        need(self.max_skipped_steps >= 1, f"max_skipped_steps={self.max_skipped_steps} must be >= 1 (on_nonfinite=stop stops at the first)")
        need(self.init_from.strip() != "", "init_from is empty: use 'scratch', 'resume' or a checkpoint path")


class ConfigError(ValueError):
    pass


def _parse_value(name, typ, raw):
    """A command-line string (or TOML value) as the field's type, or a ConfigError saying why not."""
    base = typ
    if typing.get_origin(typ) in (typing.Union, types.UnionType):  # Optional[X]
        base = next(a for a in typing.get_args(typ) if a is not type(None))
        if isinstance(raw, str) and raw.lower() in ("none", "null"):
            return None
    if isinstance(raw, str) and base is not str:
        low = raw.lower()
        if base is bool:
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ConfigError(f"{name}={raw!r}: expected true or false")
        try:
            return base(raw) if base is float else int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected {base.__name__}") from None
    ok = isinstance(raw, base) and not (base is not bool and isinstance(raw, bool))
    if base is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if not ok:
        raise ConfigError(f"{name}={raw!r}: expected {base.__name__}, got {type(raw).__name__}")
    return raw


def load_config(argv):
    """argv: .toml paths and key=value / --key=value overrides.
    Returns (ModelConfig, TrainConfig, sources): sources maps each key that was set to where."""
    hints = {}
    for cls in (ModelConfig, TrainConfig):
        hints.update({f.name: (cls, typing.get_type_hints(cls)[f.name]) for f in dataclasses.fields(cls)})
    values, sources = {}, {}

    def put(key, raw, source):
        if key not in hints:
            near = difflib.get_close_matches(key, hints, n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else "; see the fields of ModelConfig (model.py) and TrainConfig (train.py)"
            raise ConfigError(f"unknown config key {key!r} in {source}{hint}")
        values[key] = _parse_value(key, hints[key][1], raw)
        sources[key] = source

    for arg in argv:
        if arg.endswith(".toml") and "=" not in arg:
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg} not found (presets live in config/)")
            try:
                with open(arg, "rb") as f:
                    table = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"config file {arg} is not valid TOML: {e}") from None
            for k, v in table.items():
                put(k, v, arg)
        elif "=" in arg:
            k, v = arg.lstrip("-").split("=", 1)
            put(k.replace("-", "_"), v, "command line")
        else:
            raise ConfigError(f"argument {arg!r}: expected a config/*.toml file or key=value")
    try:
        model_cfg = ModelConfig(**{k: v for k, v in values.items() if hints[k][0] is ModelConfig})
        train_cfg = TrainConfig(**{k: v for k, v in values.items() if hints[k][0] is TrainConfig})
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return model_cfg, train_cfg, sources


def print_config(model_cfg, train_cfg, sources):
    print("config (precedence: defaults < config files < command line):")
    for cfg in (model_cfg, train_cfg):
        for f in dataclasses.fields(cfg):
            src = sources.get(f.name)
            print(f"  {f.name:<18} = {getattr(cfg, f.name)!r}" + (f"   [{src}]" if src else ""))

# -----------------------------------------------------------------------------
# data

def data_paths(tcfg):
    root = os.path.join(tcfg.data_dir, tcfg.dataset)
    return root, os.path.join(root, "train.bin"), os.path.join(root, "val.bin")


def prepare_command(tcfg):
    """The command that writes data_dir/dataset/{train,val}.bin and meta.json, for error messages: the
    dataset's prepare.py beside the data, else this repository's data/<dataset>/prepare.py told where
    to write; None for a dataset without one."""
    root = data_paths(tcfg)[0]
    repo_script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", tcfg.dataset, "prepare.py")
    for script in (os.path.join(root, "prepare.py"), repo_script):
        if os.path.isfile(script):
            same = os.path.abspath(os.path.dirname(script)) == os.path.abspath(root)
            return f"python {script}" + ("" if same else f" --out_dir {root}")
    return None


def prepare_advice(tcfg):
    cmd = prepare_command(tcfg)
    if cmd:
        return f"prepare the dataset with `{cmd}`"
    return (f"dataset {tcfg.dataset!r} has no prepare.py: write train.bin and val.bin (uint16 token ids) and "
            f"meta.json ({{\"vocab_size\": N}}) into {data_paths(tcfg)[0]}, or check data_dir and dataset")


def ensure_data(tcfg):
    """Prepare the default character dataset on first use; say which command to run for others."""
    root, train_bin, val_bin = data_paths(tcfg)
    if os.path.exists(train_bin) and os.path.exists(val_bin):
        return
    prepare_py = os.path.join(root, "prepare.py")
    if tcfg.dataset == "shakespeare_char" and os.path.exists(prepare_py):
        print(f"{train_bin} missing: running {prepare_py}")
        import importlib.util
        spec = importlib.util.spec_from_file_location("prepare_char", prepare_py)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.prepare(out_dir=root)
        return
    missing = " and ".join(p for p in (train_bin, val_bin) if not os.path.exists(p))
    raise SystemExit(f"error: {missing} not found: {prepare_advice(tcfg)}")


SCAN_TOKENS = 1 << 26  # token ids checked against the vocabulary at start-up: all of a small dataset,
                       # the start of a large one (get_batch guards every batch of the rest)


def load_split(path, block_size, vocab_size, advice="prepare the dataset again", vocab_from="meta.json"):
    """The split's uint16 tokens (a memmap), after the checks that would otherwise fail deep inside the
    first step (or as a device-side assert on a GPU). advice: what to do about a bad file."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found: {advice}")
    size = os.path.getsize(path)
    if size % 2:  # a file cut short by an interrupted prepare or copy
        raise SystemExit(f"error: {path} is truncated ({size} bytes, not a whole number of uint16 tokens): {advice}")
    # np.memmap refuses an empty file: treat it as too short
    data = np.memmap(path, dtype=np.uint16, mode="r") if size else np.zeros(0, np.uint16)
    if len(data) <= block_size + 1:
        raise SystemExit(f"error: {path} holds {len(data)} tokens, fewer than block_size+2={block_size + 2}: "
                         "lower block_size or prepare more data")
    top = max(int(data[i:i + (1 << 22)].max()) for i in range(0, min(len(data), SCAN_TOKENS), 1 << 22))
    if top >= vocab_size:
        raise SystemExit(f"error: {path} holds token id {top}, but vocab_size={vocab_size} (from {vocab_from}): "
                         f"the data was tokenized for another vocabulary; {advice}, or use a checkpoint "
                         "trained on this dataset")
    return data


def get_batch(data, batch_size, block_size, gen, device, rank=0, world_size=1, vocab_size=None):
    """batch_size random windows of block_size+1 tokens; gen (a torch.Generator) is the data position.

    Sharded by rank: every rank draws the same batch_size window starts from an identically seeded
    generator (so the data position is one state for any world size, and a checkpoint resumes at
    another) and reads only its own contiguous batch_size / world_size windows. vocab_size: reject
    token ids beyond the model's vocabulary (checked on the host, before any device work)."""
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=gen).tolist()
    per_rank = batch_size // world_size
    ix = ix[rank * per_rank:(rank + 1) * per_rank]
    windows = np.stack([data[i:i + block_size + 1].astype(np.int64) for i in ix])
    if vocab_size is not None and windows.max() >= vocab_size:
        raise SystemExit(f"error: token id {windows.max()} in a training batch is >= vocab_size={vocab_size}: "
                         "the data was tokenized for another vocabulary (or is corrupt); prepare it again")
    xy = torch.from_numpy(windows)
    x, y = xy[:, :-1], xy[:, 1:]
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous(), y.contiguous()


def read_vocab_size(tcfg):
    meta = os.path.join(data_paths(tcfg)[0], "meta.json")
    if not os.path.exists(meta):
        raise SystemExit(f"error: {meta} not found: {prepare_advice(tcfg)}")
    try:
        with open(meta) as f:
            vocab = json.load(f)["vocab_size"]
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {meta} is not a dataset description with a vocab_size "
                         f"({type(e).__name__}: {e}): {prepare_advice(tcfg)}") from None
    if not isinstance(vocab, int) or vocab < 1:
        raise SystemExit(f"error: {meta}: vocab_size={vocab!r} is not a positive integer: {prepare_advice(tcfg)}")
    return vocab

# -----------------------------------------------------------------------------
# checkpoints: one format. Every file is written under a temp name, fsynced, and renamed over its final
# name (atomic on POSIX), so a process killed at any moment leaves each name holding a complete
# checkpoint, the previous one or the new one. A run's out_dir holds
#     ckpt.pt           the latest: what init_from=resume reads
#     ckpt-<iter>.pt    the last keep_last checkpoints (the newest is ckpt.pt under another name)
#     best.pt           the saved checkpoint with the lowest val loss
# The extra names are hard links to ckpt.pt's data (a copy where the file system has none), so keeping
# them costs no write and no disk beyond the checkpoints themselves.

CHECKPOINT_FORMAT = "skywork-moe-edu/1"
LATEST, BEST = "ckpt.pt", "best.pt"
NUMBERED = re.compile(r"ckpt-(\d+)\.pt")


def io_error(path, e):
    """What went wrong writing path (an OSError), and what to do about it, in one line."""
    where = os.path.dirname(os.path.abspath(path))
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        todo = f"the disk holding {where} is full: free space there, or point out_dir at another disk"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        todo = f"{where} is not writable: fix its permissions, or choose another out_dir"
    else:
        todo = f"check the file system holding {where}"
    return f"could not write {path} ({e.strerror or e}): {todo}"


def write_atomically(path, write):
    """write(tmp) creates the complete file tmp, which then replaces path in one rename. If anything
    fails (an OSError: disk full, permissions) the temp file is removed, path keeps what it held, and
    the error propagates."""
    tmp = path + ".tmp"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)  # left by a write that was killed
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not every platform can)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _save_synced(state, tmp):
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the rename makes them visible


def _link_or_copy(src):
    def write(tmp):
        try:
            os.link(src, tmp)
        except OSError:  # a file system without hard links
            shutil.copyfile(src, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
    return write


def save_checkpoint(path, model, optimizer, model_cfg, train_cfg, iter_num, best_val_loss, coeffs, data_gen,
                    model_state=None, optimizer_state=None):
    """model_state / optimizer_state replace model.state_dict() / optimizer.state_dict(): under expert
    parallelism they are the gathered full states (expert_parallel.full_model_state), so the file
    looks the same whatever ep_size wrote it. Atomic: on an error (OSError) path keeps what it held."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": model_state if model_state is not None else model.state_dict(),
        "optimizer": (optimizer_state if optimizer_state is not None
                      else optimizer.state_dict() if optimizer is not None else None),
        "model_config": dataclasses.asdict(model_cfg),
        "train_config": dataclasses.asdict(train_cfg),
        "iter_num": iter_num,
        "best_val_loss": best_val_loss,
        "coefficients": coeffs.state_dict() if coeffs is not None else None,
        "rng": {"torch": torch.get_rng_state(), "data": data_gen.get_state() if data_gen is not None else None,
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    write_atomically(path, lambda tmp: _save_synced(state, tmp))


def numbered_checkpoints(out_dir):
    """{iteration: path} of the ckpt-<iter>.pt files in out_dir."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    return {int(m.group(1)): os.path.join(out_dir, n) for n in names if (m := NUMBERED.fullmatch(n))}


def save_run_checkpoint(out_dir, keep_last, is_best, stale, **state):
    """A training run's save: ckpt.pt, then its other names, then the pruning. stale: files of an
    earlier run in this out_dir (found at start-up), removed once this run's first checkpoint is
    complete; numbered files past this iteration (a run resumed from an older checkpoint) go too. A
    kill between the steps leaves extra files, never a missing checkpoint. state: save_checkpoint's
    keyword arguments."""
    latest, iter_num = os.path.join(out_dir, LATEST), state["iter_num"]
    save_checkpoint(latest, **state)
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    if keep_last:
        write_atomically(os.path.join(out_dir, f"ckpt-{iter_num}.pt"), _link_or_copy(latest))
    if is_best:
        write_atomically(os.path.join(out_dir, BEST), _link_or_copy(latest))
    numbered = numbered_checkpoints(out_dir)
    keep = sorted(i for i in numbered if i <= iter_num)[-keep_last:] if keep_last else []
    for i, path in numbered.items():
        if i not in keep:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def other_checkpoints(path):
    """The rest of a message about a missing or bad checkpoint: the others beside it, newest first."""
    d = os.path.dirname(path) or "."
    numbered = sorted(numbered_checkpoints(d).items(), reverse=True)
    others = [p for _, p in numbered] + ([os.path.join(d, BEST)] if os.path.isfile(os.path.join(d, BEST)) else [])
    others = [p for p in others if os.path.abspath(p) != os.path.abspath(path)]
    if not others:
        return ""
    how = (f" (`ln -f {others[0]} {path}` makes the newest the one init_from=resume reads)"
           if os.path.basename(path) == LATEST else "")
    return f"; other checkpoints there, newest first: {', '.join(os.path.basename(p) for p in others)}{how}"


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} not found" + other_checkpoints(path))
    try:
        # weights_only: tensors and plain containers only (all a checkpoint of ours holds), so loading
        # a file that is not ours cannot run code
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, corrupt, or another kind of file
        text = str(e).split("WeightsUnpickler error:")[-1]  # past torch's advice to load it unsafely
        detail = next((line.strip() for line in text.splitlines() if line.strip()), "").split(". ")[0][:160]
        raise SystemExit(f"error: {path} is not a readable checkpoint: truncated, corrupt, or not written by "
                         f"this project ({type(e).__name__}: {detail})" + other_checkpoints(path)) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"error: {path} is not a checkpoint of this project (no format {CHECKPOINT_FORMAT!r}): "
                         "pass a file written by train.py or upcycle.py")
    return ckpt


def checkpoint_model_config(ckpt, where="the checkpoint"):
    try:
        return ModelConfig(**ckpt["model_config"])
    except (TypeError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {where}: its model config does not fit this model.py ({e}): it was written "
                         "by another version of the code") from None


def shapes_of(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def state_mismatches(want, have):
    """How two {name: shape} tables differ: (names only in want, names only in have,
    [(name, shape in have, shape in want)] for the names whose shapes differ)."""
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    wrong = [(k, have[k], want[k]) for k in want if k in have and have[k] != want[k]]
    return missing, extra, wrong


def check_state_fits(model, state, where="the checkpoint"):
    """Every name and shape of state against the model's, before load_state_dict (whose error is a wall
    of text). A mismatch means the file was written by another version of model.py, or edited."""
    missing, extra, wrong = state_mismatches(shapes_of(model.state_dict()), shapes_of(state))
    problems = [f"{k} is {h} there, {w} in the model" for k, h, w in wrong]
    problems += [f"{k} is missing" for k in missing]
    problems += [f"{k} is not in the model" for k in extra]
    if problems:
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise SystemExit(f"error: {where} does not fit the model its config describes: "
                         f"{'; '.join(problems[:4])}{more}. It was written by another version of model.py")


def model_config_conflicts(model_cfg, ckpt_cfg, sources):
    """Model settings given in a config file or on the command line that differ from a checkpoint's,
    and the parameter shapes they would change: a resumed run keeps its checkpoint's model, so these
    would be silently ignored. Returns the parts of an error message (empty: no conflict)."""
    keys = [f.name for f in dataclasses.fields(ModelConfig)
            if f.name in sources and getattr(model_cfg, f.name) != getattr(ckpt_cfg, f.name)]
    if not keys:
        return []
    parts = [f"{k}={getattr(model_cfg, k)!r} ({sources[k]}), {getattr(ckpt_cfg, k)!r} in the checkpoint" for k in keys]
    mine = model_cfg if "vocab_size" in keys else dataclasses.replace(model_cfg, vocab_size=ckpt_cfg.vocab_size)
    with torch.device("meta"):  # shapes only: no memory, whatever the size
        only_ckpt, only_cfg, wrong = state_mismatches(shapes_of(GPT(ckpt_cfg).state_dict()),
                                                      shapes_of(GPT(mine).state_dict()))
    shapes = [f"{k} {w} -> {h}" for k, h, w in wrong]
    shapes += [f"{k} only in the checkpoint" for k in only_ckpt]
    shapes += [f"{k} only in the config" for k in only_cfg]
    if shapes:
        more = f" (and {len(shapes) - 4} more)" if len(shapes) > 4 else ""
        parts.append(f"parameter shapes that differ: {', '.join(shapes[:4])}{more}")
    return parts


def model_from_checkpoint(ckpt, device="cpu", where="the checkpoint"):
    model = GPT(checkpoint_model_config(ckpt, where))
    check_state_fits(model, ckpt["model"], where)
    model.load_state_dict(ckpt["model"])
    return model.to(device)

# -----------------------------------------------------------------------------
# one optimisation step

def lr_at(it, tcfg):
    if it < tcfg.warmup_iters:
        return tcfg.learning_rate * (it + 1) / (tcfg.warmup_iters + 1)
    if tcfg.lr_schedule == "constant":
        return tcfg.learning_rate
    decay_iters = tcfg.lr_decay_iters or tcfg.max_iters
    if it >= decay_iters:
        return tcfg.min_lr
    ratio = (it - tcfg.warmup_iters) / max(1, decay_iters - tcfg.warmup_iters)
    return tcfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (tcfg.learning_rate - tcfg.min_lr)


def router_stats(router_outputs):
    """(n_moe_layers, len(STAT_NAMES)) detached stats and (n_moe_layers, E) loads of one forward."""
    if not router_outputs:
        return torch.zeros(0, len(STAT_NAMES)), torch.zeros(0, 0)
    # fp32, or wider: an fp64 model keeps fp64 statistics (the expert-parallel equivalence tests)
    stats = torch.stack([torch.stack([getattr(r, n).detach().to(torch.promote_types(getattr(r, n).dtype, torch.float32))
                                      for n in STAT_NAMES]) for r in router_outputs])
    loads = torch.stack([r.load_E for r in router_outputs])
    return stats, loads


def global_balance_losses(router_outputs, running_load_LE, groups=None):
    """Qwen's global-batch balancing (balance_scope="global"): the Switch loss E * sum_j f_j P_j with
    f_j the share of routed assignments (before capacity) that chose expert j over the global batch,
    i.e. all ranks (all-reduced) and the step's micro-batches so far (running_load_LE, (layers, E),
    zero at the start of the step, updated in place), and P_j this rank's mean gate probability.

    f carries no gradient, so averaging the ranks' losses (the gradient rule of expert_parallel.py)
    averages P over the global batch: with grad_accum=1 this is exactly E * sum_j f_j P_j of the
    global batch. With micro-batches, micro-batch m sees f of micro-batches 1..m: waiting for the
    routing of later micro-batches would take a second forward pass."""
    load_LE = torch.stack([r.load_E for r in router_outputs])
    if groups is not None:
        dist.all_reduce(load_LE)
    running_load_LE += load_LE
    f_LE = running_load_LE / running_load_LE.sum(dim=-1, keepdim=True)
    out = []
    for r, f_E in zip(router_outputs, f_LE):
        P_E = r.probs_TE.mean(dim=0)
        out.append(dataclasses.replace(r, aux_loss=P_E.shape[0] * (f_E.to(P_E.dtype) * P_E).sum()))
    return out


def reduce_step_statistics(ces, stats, loads):
    """All-reduce one step's per-micro-batch CE (M,), router stats (M, layers, stats) and loads
    (M, layers, E) so that every rank holds the numbers the single process would compute on the
    global batch: means over equal shards are averaged, loads (counts) summed, and load_cv, a ratio,
    recomputed from the summed loads. One collective; float64 so the sums add no rounding."""
    ce_M, stats_MLS, loads_MLE = torch.stack(ces), torch.stack(stats), torch.stack(loads)
    parts = [ce_M, stats_MLS, loads_MLE]
    flat = torch.cat([t.double().reshape(-1) for t in parts])
    dist.all_reduce(flat)
    ce_M, stats_MLS, loads_MLE = (f.view_as(t).to(t.dtype) for f, t in zip(flat.split([t.numel() for t in parts]), parts))
    world = dist.get_world_size()
    ce_M, stats_MLS = ce_M / world, stats_MLS / world
    if loads_MLE.numel():
        cv = STAT_NAMES.index("load_cv")
        stats_MLS[:, :, cv] = loads_MLE.std(dim=-1, correction=0) / loads_MLE.mean(dim=-1)
    return list(ce_M), list(stats_MLS), list(loads_MLE)


def forward_backward(model, batches, coeffs, tcfg, autocast, groups=None, n_group=1):
    """Forward and backward over the micro-batches, accumulating gradients; under torchrun the
    gradients are then synchronised (expert_parallel.sync_gradients) so every rank holds the
    single-process gradient of the global batch. Returns (mean CE, stats, loads): stats
    (n_moe_layers, len(STAT_NAMES)) and loads (n_moe_layers, E) averaged over micro-batches, and
    under torchrun reduced over ranks (loads summed), i.e. the single process's numbers."""
    ces, stats, loads = [], [], []
    running_load_LE = None
    for x, y in batches:
        with autocast:
            _, ce, router_outputs = model(x, y, n_group=n_group)
            if tcfg.balance_scope == "global" and router_outputs:
                if running_load_LE is None:
                    running_load_LE = torch.zeros_like(torch.stack([r.load_E for r in router_outputs]))
                router_outputs = global_balance_losses(router_outputs, running_load_LE, groups)
            loss = balance_loss(ce, router_outputs, coeffs.alpha, tcfg.z_loss_coef)
        (loss / len(batches)).backward()
        s, l = router_stats(router_outputs)
        ces.append(ce.detach())
        stats.append(s)
        loads.append(l)
    if groups is not None:
        ep.sync_gradients(model, groups)
        ces, stats, loads = reduce_step_statistics(ces, stats, loads)
    n = len(batches)
    return sum(ces) / n, sum(stats) / n, sum(loads) / n


def optimizer_step(model, optimizer, tcfg, groups=None, norm=None):
    """Clip to the global gradient norm (experts counted once under expert parallelism; norm: already
    measured, else measured here), step, zero the grads."""
    if tcfg.grad_clip > 0:
        norm = grad_norm(model, groups) if norm is None else norm
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), tcfg.grad_clip, norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def grad_norm(model, groups=None):
    """The global gradient norm, as clipping measures it (experts counted once under expert parallelism)."""
    if groups is None:
        return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    return ep.grad_norm(model, groups)


# Router statistics a healthy step always has finite (max1_max2 / max2_max3 are ratios of gate
# probabilities: legitimately inf or nan with fewer than 3 experts or a saturated gate)
MUST_BE_FINITE = ("aux_loss", "z_loss", "drop_rate", "load_cv", "entropy")


@dataclass
class StepResult:
    ce: torch.Tensor          # mean cross entropy (0-dim, on the device)
    loss: float               # the same, on the host
    stats: torch.Tensor       # (n_moe_layers, len(STAT_NAMES)) on the host
    loads: torch.Tensor       # (n_moe_layers, E) on the device
    grad_norm: float          # before clipping
    problem: str | None       # why the update was skipped (non-finite values); None: it was applied
    stop_signal: int          # a signal number some rank received (SIGTERM, SIGINT), the same on every rank; 0: none


def guarded_step(model, optimizer, batches, coeffs, tcfg, autocast, groups=None, n_group=1, signal_num=0):
    """train_step with its guards: forward/backward, then the step's one host sync, which the drop rates
    of eq. 7-9 needed anyway, now carrying more: the loss, the gradient norm, the router statistics, and
    two flags max-reduced over the ranks under torchrun (one small all-reduce), so every rank makes the
    same two decisions. The update is applied only if everything is finite (else the grads are dropped
    and StepResult.problem says what went bad); stop_signal is signal_num (this rank's received signal)
    from whichever rank had one."""
    ce, stats, loads = forward_backward(model, batches, coeffs, tcfg, autocast, groups, n_group)
    norm = grad_norm(model, groups)
    checked = [STAT_NAMES.index(n) for n in MUST_BE_FINITE]
    finite = torch.isfinite(ce) & torch.isfinite(norm) & torch.isfinite(stats[:, checked].to(ce.device)).all()
    flags = torch.stack([ce.new_full((), float(signal_num), dtype=torch.float64), (~finite).to(torch.float64)])
    if groups is not None:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    host = torch.cat([flags, ce.detach().reshape(1).double(), norm.reshape(1).double(),
                      stats.reshape(-1).to(ce.device, torch.float64)]).cpu()
    host_stats = host[4:].view(stats.shape).to(stats.dtype)
    problem = None
    if host[1]:
        problem = describe_nonfinite(float(host[2]), float(host[3]), host_stats, model)
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer_step(model, optimizer, tcfg, groups, norm)
    return StepResult(ce, float(host[2]), host_stats, loads, float(host[3]), problem, int(host[0]))


def describe_nonfinite(ce, norm, stats, model):
    """What went bad in a step, for the message: the loss, the gradient norm, the first MoE layer whose
    router statistics are not finite (layers run in order, so that is where the forward broke), and the
    parameters with non-finite gradients. Runs only on a bad step, so its host syncs cost a healthy
    run nothing."""
    parts = [f"loss {ce:.4g}, grad norm {norm:.4g}"]
    moe_ids = [i for i, b in enumerate(model.blocks) if b.is_moe]
    for layer, row in zip(moe_ids, stats.tolist()):
        bad = [f"{n}={row[STAT_NAMES.index(n)]}" for n in MUST_BE_FINITE if not math.isfinite(row[STAT_NAMES.index(n)])]
        if bad:
            parts.append(f"router statistics of MoE layer {layer} went bad first ({', '.join(bad)})")
            break
    else:
        if moe_ids:
            parts.append("router statistics finite in every MoE layer")
    bad_grads = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if bad_grads:
        parts.append(f"non-finite gradient in {bad_grads[0]}"
                     + (f" and {len(bad_grads) - 1} more parameter(s)" if len(bad_grads) > 1 else ""))
    return "; ".join(parts)


def train_step(model, optimizer, batches, coeffs, tcfg, autocast, groups=None, n_group=1):
    """Forward/backward over the micro-batches, clip, step. Returns (mean CE, stats, loads) averaged
    over micro-batches (and ranks); the caller updates the coefficients from them after the step.
    groups: expert_parallel.ParallelGroups under torchrun; n_group: this rank's routing groups.
    Raises FloatingPointError, without updating anything, if the loss, a router statistic or a
    gradient is not finite (the training loop uses guarded_step, which can skip instead)."""
    r = guarded_step(model, optimizer, batches, coeffs, tcfg, autocast, groups, n_group)
    if r.problem is not None:
        raise FloatingPointError(r.problem)
    return r.ce, r.stats, r.loads


def update_balance_state(model, coeffs, stats, loads, tcfg):
    """After the optimizer step: adaptive alphas from this step's drop rates (eq. 7-9), and the
    aux-free selection bias from this step's loads. Under torchrun both come reduced over the ranks,
    so every rank computes the same alphas and biases."""
    drop = stats[:, STAT_NAMES.index("drop_rate")].tolist()
    coeffs.update(drop)
    moe_layers = [b.ffn for b in model.blocks if b.is_moe]
    for moe, load_E in zip(moe_layers, loads):
        if moe.router.aux_free_bias:
            aux_free_bias_step(moe.router.selection_bias_E, load_E.to(moe.router.selection_bias_E.device),
                               tcfg.bias_update_rate)


@torch.no_grad()
def estimate_loss(model, splits, tcfg, block_size, device, autocast, groups=None, n_group=1):
    """Mean CE over eval_iters batches per split. The batches come from a generator seeded afresh at
    every eval, so evals are comparable across time and never move the training data position.
    Under torchrun each rank evaluates its shard of every batch and the means are all-reduced."""
    model.eval()
    rank, world = (groups.rank, groups.world_size) if groups is not None else (0, 1)
    out = {}
    for name, data in splits.items():
        gen = torch.Generator().manual_seed(tcfg.seed + 1)
        losses = []
        for _ in range(tcfg.eval_iters):
            x, y = get_batch(data, tcfg.batch_size, block_size, gen, device, rank, world)
            with autocast:
                losses.append(model(x, y, n_group=n_group)[1].item())
        out[name] = sum(losses) / len(losses)
    if groups is not None:
        means = torch.tensor(list(out.values()), dtype=torch.float64, device=device)
        dist.all_reduce(means)
        out = {k: v / world for k, v in zip(out, means.tolist())}
    model.train()
    return out

# -----------------------------------------------------------------------------
# torchrun: launch checks and process groups (the expert-parallel machinery is expert_parallel.py)

def resolve_backend(tcfg, device_type):
    if tcfg.backend != "auto":
        return tcfg.backend
    return "nccl" if device_type == "cuda" else "gloo"


def check_setup(model_cfg, tcfg, world_size, cuda_available):
    """Reject a launch that cannot work, from the config and the world size alone. Every rank computes
    the same verdict, so a bad setup stops every rank with the same message before any collective
    (no rank is left waiting for one that has exited). model_cfg=None skips the model checks: a resumed
    run repeats them with its checkpoint's config once read. Raises SystemExit."""
    def need(ok, msg):
        if not ok:
            raise SystemExit(f"error: {msg}")
    device_type = "cuda" if tcfg.device.startswith("cuda") or (tcfg.device == "auto" and cuda_available) else "cpu"
    backend = resolve_backend(tcfg, device_type) if world_size > 1 else None  # one process: no backend
    need(backend != "nccl" or cuda_available,
         "backend=nccl needs CUDA GPUs, and none is visible: use backend=gloo (CPU), or run on a GPU machine")
    need(backend != "nccl" or device_type == "cuda",
         "backend=nccl moves GPU tensors, but device=cpu: use backend=gloo with device=cpu")
    need(backend != "gloo" or device_type == "cpu",
         "backend=gloo has no all-to-all for GPU tensors: use backend=nccl (or device=cpu)")
    if world_size == 1 and tcfg.ep_size > 1:
        need(False, f"ep_size={tcfg.ep_size} needs a multiple of {tcfg.ep_size} processes: launch with "
                    f"torchrun --nproc_per_node={tcfg.ep_size} train.py ..., or set ep_size=1 for one process")
    try:
        ep.validate_layout(tcfg.ep_size, world_size, model_cfg.n_expert if model_cfg is not None else None)
    except ValueError as e:
        need(False, str(e))
    need(tcfg.batch_size % world_size == 0,
         f"batch_size={tcfg.batch_size} is the global micro-batch, split evenly over the {world_size} ranks: "
         + (f"rank {tcfg.batch_size} would get no data; " if tcfg.batch_size < world_size else "")
         + f"use a multiple of {world_size}")
    groups_total = tcfg.route_groups or world_size
    need(groups_total % world_size == 0,
         f"route_groups={tcfg.route_groups} must be a multiple of the world size {world_size}: each rank "
         "routes its own tokens, so a routing group cannot span ranks (0 = one group per rank)")
    if model_cfg is not None:
        tokens_per_rank = tcfg.batch_size // world_size * model_cfg.block_size
        need(tokens_per_rank % (groups_total // world_size) == 0,
             f"{tokens_per_rank} tokens per rank do not split into {groups_total // world_size} equal routing "
             f"groups: change route_groups={tcfg.route_groups} or batch_size")
        need(tcfg.balance_scope == "micro" or model_cfg.aux_loss == "switch",
             f"balance_scope='global' balances the load fractions f of the Switch loss (Qwen), but "
             f"aux_loss={model_cfg.aux_loss!r}: set aux_loss=switch, or balance_scope=micro")


def init_distributed(tcfg, device, world_size):
    """Start the process group from torchrun's environment (env://) and build the expert-parallel
    groups; None for a single process. The timeout bounds every collective: a rank that never arrives
    makes the others fail after dist_timeout_s instead of hanging."""
    if world_size == 1:
        return None
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # the rendezvous init_process_group("env://") would do, done here to keep its store: a rank that
    # fails mid-run leaves its error there for the others (expert_parallel.report_failure)
    timeout = datetime.timedelta(seconds=tcfg.dist_timeout_s)
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    dist.init_process_group(resolve_backend(tcfg, device.type), store=store, rank=rank, world_size=world,
                            timeout=timeout)
    try:
        return ep.build_groups(tcfg.ep_size, store)
    except BaseException:
        dist.destroy_process_group()
        raise


def on_every_rank(groups, fn):
    """fn() on this rank. Under torchrun, a failure on any rank (a file missing on one node) makes
    every rank raise the same SystemExit, instead of one rank exiting while the others wait in the
    next collective. Also a barrier: no rank returns before every rank has run fn."""
    if groups is None:
        return fn()
    try:
        result, error = fn(), None
    except (SystemExit, Exception) as e:
        result = None
        error = str(e).removeprefix("error: ") if isinstance(e, SystemExit) else f"{type(e).__name__}: {e}"
    ep.raise_if_any_rank_failed(error)
    return result

# -----------------------------------------------------------------------------
# the loop: logging and devices

def layer_records(stats, loads, alphas, layer_ids):
    recs = []
    for i, lid in enumerate(layer_ids):
        rec = {"layer": lid, "alpha": alphas[i]}
        for j, name in enumerate(STAT_NAMES):
            v = float(stats[i, j])
            rec[name] = None if math.isnan(v) else v
        recs.append(rec)
    return recs


def format_eta(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def resolve_device(tcfg):
    name = tcfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: device=cuda but no GPU is visible: use device=cpu")
    device = torch.device(name)
    dtype = tcfg.dtype if tcfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    if device.type == "cpu" and dtype not in ("float32", "float64"):
        print(f"note: {dtype} on CPU is very slow here; float32 is the CPU default")
    # float64 is not an autocast dtype: the model itself is converted (train below)
    autocast = (torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype not in ("float32", "float64")
                else torch.autocast(device.type, enabled=False))
    return device, autocast


# -----------------------------------------------------------------------------
# stopping on a signal

class StopSignal:
    """SIGTERM / SIGINT (what cluster schedulers send before preempting or cancelling a job; Ctrl-C):
    stop at the next step boundary with a checkpoint, and exit 0. The handler only records the signal:
    anything more could run in the middle of a checkpoint write or a collective. guarded_step reads it
    once per step and, under torchrun, max-reduces it, so every rank stops after the same step. The
    training loop installs the handlers while it runs (in the main thread only: Python's rule) and
    restores the previous ones after; the one piece of state a handler needs lives in this object, not
    in a global."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = 0  # the first signal's number; 0: none

    def _handler(self, signum, frame):
        self.received = self.received or signum

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self  # a run in a worker thread leaves the process's handlers alone
            return
        previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)

# -----------------------------------------------------------------------------
# the loop

def train(model_cfg, tcfg, sources=None):
    """Run the configured job; returns the last eval losses (on every rank under torchrun).

    A plain call runs in this process, with no process group. Under torchrun (WORLD_SIZE > 1 in the
    environment) every rank calls this: the launch is checked, the process group started and the
    expert-parallel groups built, and the group is torn down however the run ends. Once training has
    started, SIGTERM / SIGINT end it at the next step boundary with a checkpoint (StopSignal); before,
    there is nothing to save, and they act as usual."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_setup(model_cfg if tcfg.init_from == "scratch" else None, tcfg, world_size, torch.cuda.is_available())
    device, autocast = resolve_device(tcfg)
    groups = init_distributed(tcfg, device, world_size)
    if groups is not None and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        return run(model_cfg, tcfg, sources, device, autocast, groups)
    except BaseException as e:
        if groups is not None:
            name_failed_rank(groups, e)
        raise
    finally:
        if groups is not None:
            dist.destroy_process_group()


def name_failed_rank(groups, e):
    """Under torchrun, on the way out of a failed run. A SystemExit is a clean, explained stop (most are
    agreed by every rank): leave it for the others. Anything else may be this rank's collective broken
    off by a peer that failed first: if a peer reported, raise SystemExit naming it; if not, this rank
    is the first to fail, so report its own error (expert_parallel section 7)."""
    if isinstance(e, SystemExit):
        if isinstance(e.code, str):
            ep.report_failure(groups, e.code.removeprefix("error: "))
        return
    if not isinstance(e, Exception):  # KeyboardInterrupt and the like
        return
    peer, why = ep.failed_peer(groups)
    if peer is not None:
        raise SystemExit(f"error: rank {peer} failed: {why} (rank {groups.rank} stopped with it; its own "
                         f"error, {type(e).__name__} in a collective, is a consequence)") from None
    ep.report_failure(groups, f"{type(e).__name__}: {e}")
    print(f"rank {groups.rank} failed with {type(e).__name__}, and no other rank had reported an error "
          f"({why})", file=sys.stderr)


def prepare_out_dir(out_dir):
    """Create out_dir and prove it writable now, not at the first save minutes or hours in; remove the
    temp files of a save that was killed."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir):
            pass
        for name in os.listdir(out_dir):
            final = name.removesuffix(".tmp")
            if final != name and (NUMBERED.fullmatch(final) or final in (LATEST, BEST, "metrics.jsonl")):
                os.remove(os.path.join(out_dir, name))
    except OSError as e:
        raise SystemExit(f"error: out_dir={out_dir!r} is not writable ({e.strerror or e}): choose another "
                         "out_dir, or fix its permissions (or free space on its disk)") from None


def trim_metrics(path, iter_num):
    """A resumed run's metrics.jsonl: drop the records past its checkpoint (written after the last save
    by a run that was then killed) and a torn last line, so the file reads as if the run had never
    stopped: no step twice."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("iter", 0) <= iter_num:
                kept.append(line if line.endswith("\n") else line + "\n")

    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(kept)
    try:
        write_atomically(path, write)
    except OSError as e:
        raise SystemExit(f"error: {io_error(path, e)}; {path} and the checkpoints are unchanged") from None


def log_record(metrics, rec):
    try:
        metrics.write(json.dumps(rec) + "\n")
        metrics.flush()
    except OSError as e:
        raise SystemExit(f"error: {io_error(metrics.name, e)}; the checkpoints are intact: once fixed, "
                         "continue with --init_from=resume") from None


def run(model_cfg, tcfg, sources, device, autocast, groups):
    """The training loop of one process (one rank under torchrun). Only rank 0 prints, logs, saves."""
    is_main = groups is None or groups.is_main
    rank, world = (groups.rank, groups.world_size) if groups is not None else (0, 1)
    say = print if is_main else (lambda *args, **kwargs: None)
    torch.manual_seed(tcfg.seed)  # the same on every rank: identical weights, experts sliced below
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # files: prepared once per node, then read by every rank; an error on one rank stops all of them
    resuming = tcfg.init_from == "resume"
    ckpt_path = os.path.join(tcfg.out_dir, LATEST)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_every_rank(groups, lambda: ensure_data(tcfg) if local_rank == 0 else None)

    def read_inputs():
        cfg, ckpt, vocab_from = model_cfg, None, None
        if tcfg.init_from != "scratch":
            path = ckpt_path if resuming else tcfg.init_from
            if resuming and not os.path.isfile(path):
                raise SystemExit(f"error: init_from=resume, but {path} does not exist: nothing to resume in "
                                 f"out_dir={tcfg.out_dir!r} (point out_dir at the run, or use init_from=scratch)"
                                 + other_checkpoints(path))
            ckpt = load_checkpoint(path)
            cfg, vocab_from = checkpoint_model_config(ckpt, path), f"{path}'s model config"
            conflicts = model_config_conflicts(model_cfg, cfg, sources or {})
            if conflicts and resuming:
                raise SystemExit(f"error: {path} holds a model of another config: {'; '.join(conflicts)}. A "
                                 "resumed run keeps its checkpoint's model: drop these settings, or start a new "
                                 "run in another out_dir")
            if conflicts:
                say(f"note: {path} fixes the model, so these settings do not apply: {'; '.join(conflicts)}")
            with torch.device("meta"):  # names and shapes, before any memory is spent on them
                check_state_fits(GPT(cfg), ckpt["model"], path)
            if resuming and any(ckpt.get(k) is None for k in ("optimizer", "coefficients")):
                raise SystemExit(f"error: {path} holds weights only (as upcycle.py writes them), not a run to "
                                 f"resume: start a run from it with init_from={path}")
        if ckpt is None:
            vocab = read_vocab_size(tcfg)
            if "vocab_size" in (sources or {}) and cfg.vocab_size != vocab:
                raise SystemExit(f"error: vocab_size={cfg.vocab_size} but the dataset has {vocab} tokens")
            cfg, vocab_from = dataclasses.replace(cfg, vocab_size=vocab), os.path.join(data_paths(tcfg)[0], "meta.json")
        _, train_bin, val_bin = data_paths(tcfg)
        advice = prepare_advice(tcfg)
        splits = {"train": load_split(train_bin, cfg.block_size, cfg.vocab_size, advice, vocab_from),
                  "val": load_split(val_bin, cfg.block_size, cfg.vocab_size, advice, vocab_from)}
        if is_main:
            prepare_out_dir(tcfg.out_dir)
        return cfg, ckpt, splits

    model_cfg, ckpt, splits = on_every_rank(groups, read_inputs)
    check_setup(model_cfg, tcfg, world, torch.cuda.is_available())  # the checkpoint's model, if resumed
    if ckpt is not None and not resuming:
        say(f"starting from the weights of {tcfg.init_from} (fresh optimizer and schedule)")
    if is_main:
        print_config(model_cfg, tcfg, sources or {})
    n_group = (tcfg.route_groups or world) // world  # routing groups of this rank's micro-batch
    if groups is not None:
        say(f"torchrun: world {world} = {world // tcfg.ep_size} data-parallel x {tcfg.ep_size} expert-parallel "
            f"({dist.get_backend()}); {tcfg.batch_size // world} sequences and {n_group} routing group(s) per rank")

    model = GPT(model_cfg).to(device)
    if tcfg.dtype == "float64":
        model.double()  # before loading, so a float64 checkpoint is not rounded through float32
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])  # full experts: every ep_size slices the same file
    counts = model.param_counts()
    say(f"parameters: {counts['total'] / 1e6:.2f}M total, {counts['active'] / 1e6:.2f}M active; "
        f"MoE layers {model_cfg.moe_layer_ids}")
    sharded = groups is not None and groups.ep_size > 1
    if sharded:
        ep.shard_experts(model, groups)
    optimizer = torch.optim.AdamW(model.optim_groups(tcfg.weight_decay), lr=tcfg.learning_rate,
                                  betas=(tcfg.beta1, tcfg.beta2), fused=device.type == "cuda")
    coeffs = AuxCoefficients(len(model_cfg.moe_layer_ids), tcfg.aux_coef_mode, tcfg.aux_alpha,
                             tcfg.aux_xi, tcfg.aux_alpha_max, tcfg.aux_beta)
    data_gen = torch.Generator().manual_seed(tcfg.seed)
    iter_num, best_val = 0, float("inf")  # best_val: the lowest val loss of a saved checkpoint
    if resuming:
        optimizer.load_state_dict(ep.shard_optimizer_state(ckpt["optimizer"], optimizer, model, groups))
        coeffs.load_state_dict(ckpt["coefficients"])
        iter_num, best_val = ckpt["iter_num"], ckpt["best_val_loss"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        data_gen.set_state(ckpt["rng"]["data"])
        if ckpt["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        say(f"resumed from {ckpt_path} at iteration {iter_num}")
    del ckpt

    # out_dir (rank 0): a resumed run's metrics continue from its checkpoint; a new run replaces an
    # earlier run's checkpoints, but only once its own first one is safely written
    metrics, stale = None, []
    if is_main:
        metrics_path = os.path.join(tcfg.out_dir, "metrics.jsonl")
        if resuming:
            trim_metrics(metrics_path, iter_num)
        else:
            stale = list(numbered_checkpoints(tcfg.out_dir).values())
            stale += [p for p in [os.path.join(tcfg.out_dir, BEST)] if os.path.exists(p)]
            if stale or os.path.exists(ckpt_path):
                print(f"note: out_dir={tcfg.out_dir!r} holds an earlier run's checkpoints: this run replaces them "
                      "from its first save on (init_from=resume would continue that run instead)")
        metrics = open(metrics_path, "a" if resuming else "w")
    last_saved = iter_num if resuming else None

    def last_good():
        if last_saved is None:
            return "this run saved no checkpoint"
        return f"the last checkpoint, {ckpt_path} (iteration {last_saved}), is untouched"

    def checkpoint(it, val=None, full_state=None):
        """Save iteration `it`: collectives on every rank under expert parallelism (the full experts),
        rank 0 writes; a write error stops every rank with its message. val: the val loss, if this
        iteration was evaluated (best.pt follows the lowest)."""
        nonlocal best_val, stale, last_saved
        is_best = val is not None and val < best_val
        best_val = val if is_best else best_val
        if sharded and full_state is None:
            full_state = ep.full_model_state(model, groups)
        full_optim = ep.full_optimizer_state(optimizer, model, groups) if sharded else None

        def write():
            if not is_main:
                return
            try:
                save_run_checkpoint(tcfg.out_dir, tcfg.keep_last, is_best, stale, model=model, optimizer=optimizer,
                                    model_cfg=model_cfg, train_cfg=tcfg, iter_num=it, best_val_loss=best_val,
                                    coeffs=coeffs, data_gen=data_gen, model_state=full_state,
                                    optimizer_state=full_optim)
            except OSError as e:
                raise SystemExit(f"error: {io_error(ckpt_path, e)}. Nothing was lost: {ckpt_path} holds the last "
                                 "complete checkpoint; once fixed, continue with --init_from=resume") from None
        on_every_rank(groups, write)
        stale, last_saved = [], it

    tokens_per_step = tcfg.batch_size * tcfg.grad_accum * model_cfg.block_size  # global: all ranks
    layer_ids = model_cfg.moe_layer_ids
    start_iter, last, skipped, stop_signal = iter_num, {}, 0, 0
    t_window, it_window = time.time(), iter_num
    stop = StopSignal()  # SIGTERM / SIGINT handlers for the loop only, restored when it ends
    with stop.installed(), (metrics if metrics is not None else contextlib.nullcontext()):
        while True:
            if (iter_num % tcfg.eval_interval == 0 or iter_num == tcfg.max_iters) and not (
                    iter_num == start_iter and resuming):
                last = estimate_loss(model, splits, tcfg, model_cfg.block_size, device, autocast, groups, n_group)
                if not all(math.isfinite(v) for v in last.values()):
                    raise SystemExit(f"error: the eval at iteration {iter_num} gave non-finite losses {last}: "
                                     f"nothing saved; {last_good()}")
                want_similarity = bool(layer_ids) and model_cfg.n_expert > 1
                want_save = tcfg.save_checkpoint and iter_num > 0
                # collectives (every rank): the full experts, for the similarity and the checkpoint
                full_state = ep.full_model_state(model, groups) if sharded and (want_similarity or want_save) else None
                if is_main:
                    rec = {"iter": iter_num, "tokens": iter_num * tokens_per_step,
                           "train_loss": last["train"], "val_loss": last["val"]}
                    if want_similarity:
                        rec["expert_similarity"] = expert_similarity(
                            model if full_state is None else model_view(model_cfg, full_state))
                    log_record(metrics, rec)
                    print(f"eval iter {iter_num}: train {last['train']:.4f}, val {last['val']:.4f}")
                if want_save:
                    checkpoint(iter_num, last["val"], full_state)
                t_window = time.time()  # keep eval time out of tokens/s
            if iter_num >= tcfg.max_iters:
                break
            if stop_signal:  # agreed by every rank in the step that just ended
                if tcfg.save_checkpoint and last_saved != iter_num:
                    checkpoint(iter_num)
                saved = (f"saved {ckpt_path}: continue with --init_from=resume" if tcfg.save_checkpoint
                         else "no checkpoint saved (save_checkpoint=false)")
                name = signal.Signals(stop_signal).name
                say(f"{name} received: stopped at iteration {iter_num}; {saved}", flush=True)
                break

            lr = lr_at(iter_num, tcfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            batches = [get_batch(splits["train"], tcfg.batch_size, model_cfg.block_size, data_gen, device, rank,
                                 world, vocab_size=model_cfg.vocab_size) for _ in range(tcfg.grad_accum)]
            alphas_used = list(coeffs.alpha)
            step = guarded_step(model, optimizer, batches, coeffs, tcfg, autocast, groups, n_group, stop.received)
            iter_num += 1
            stop_signal = step.stop_signal

            if step.problem is not None:  # every rank sees the same problem (guarded_step)
                skipped += 1
                what = f"iteration {iter_num}: non-finite values ({step.problem})"
                steady = ("lower learning_rate or raise warmup_iters (z_loss_coef=1e-3 or gate_norm=true steady "
                          "the router) and continue with --init_from=resume")
                if tcfg.on_nonfinite == "stop":
                    raise SystemExit(f"error: {what}. Stopped (on_nonfinite=stop) without saving: {last_good()}. "
                                     "If this is rare, continue with --init_from=resume --on_nonfinite=skip; if "
                                     f"it recurs, {steady}")
                if skipped > tcfg.max_skipped_steps:
                    raise SystemExit(f"error: {what}. Stopped after {skipped} bad steps in a row (max_skipped_steps="
                                     f"{tcfg.max_skipped_steps}) without saving: {last_good()}. The run diverges: "
                                     f"{steady}")
                say(f"warning: {what}: update skipped ({skipped} in a row; on_nonfinite=skip)", flush=True)
                if is_main:
                    log_record(metrics, {"iter": iter_num, "tokens": iter_num * tokens_per_step,
                                         "skipped": step.problem})
                continue
            skipped = 0
            update_balance_state(model, coeffs, step.stats, step.loads, tcfg)

            if is_main and (iter_num % tcfg.log_interval == 0 or iter_num == tcfg.max_iters):
                ce = step.loss
                dt = time.time() - t_window
                tok_s = (iter_num - it_window) * tokens_per_step / max(dt, 1e-9)
                t_window, it_window = time.time(), iter_num
                # timings are printed, never logged: the same seed and world size give the same file
                rec = {"iter": iter_num, "tokens": iter_num * tokens_per_step, "lr": lr, "loss": ce,
                       "layers": layer_records(step.stats, step.loads, alphas_used, layer_ids)}
                log_record(metrics, rec)
                eta = (tcfg.max_iters - iter_num) * tokens_per_step / max(tok_s, 1e-9)
                line = (f"iter {iter_num}/{tcfg.max_iters} | loss {ce:.4f} | lr {lr:.2e} | "
                        f"{tok_s:,.0f} tok/s | eta {format_eta(eta)}")
                if layer_ids:
                    drops = " ".join(f"{100 * r['drop_rate']:.1f}" for r in rec["layers"])
                    alphas = " ".join(f"{a:.4f}" for a in coeffs.alpha)
                    line += f" | drop% {drops} | alpha {alphas}"
                print(line, flush=True)
    return last


def model_view(model_cfg, state):
    """A GPT whose parameters are the tensors of a full state dict (no copy: built on the meta device,
    then assigned), for full-model statistics such as expert similarity under expert parallelism."""
    with torch.device("meta"):
        view = GPT(model_cfg)
    view.load_state_dict(state, assign=True)
    return view


def main(argv):
    try:
        model_cfg, tcfg, sources = load_config(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    train(model_cfg, tcfg, sources)


if __name__ == "__main__":
    main(sys.argv[1:])
