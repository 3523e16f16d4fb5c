"""
Train a (Mixture-of-Experts) GPT: config, data, one optimisation step, the loop, checkpoints.

    python train.py                                    # the tiny CPU MoE on Shakespeare characters
    python train.py config/shakespeare_char.toml --max_iters=500 --gate_norm=false
    python train.py --init_from=resume                 # continue out_dir/ckpt.pt

Configuration: dataclass defaults < each .toml file named on the command line (in order) < `--key=value`
(or `key=value`) overrides. Unknown keys and ill-typed values are errors that name the nearest valid key;
the resolved config is printed at start-up.

The loss is L = L_ce + sum_l alpha^(l) L_aux^(l) (+ z-loss), with the per-layer coefficients alpha^(l)
fixed or adapted after every step from that layer's token drop rate (Skywork-MoE eq. 7-9, router.py).
Every log interval one JSON line goes to out_dir/metrics.jsonl with the router statistics per MoE layer.
"""
import dataclasses
import difflib
import json
import math
import os
import sys
import time
import tomllib
import types
import typing
from dataclasses import dataclass, field

import numpy as np
import torch

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
    save_checkpoint: bool = True       # at every eval and at the end
    seed: int = 1337
    # --- batch
    batch_size: int = 16               # sequences per micro-batch
    grad_accum: int = 1                # micro-batches per optimizer step
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
    # --- system
    device: str = "auto"               # "auto": cuda if available, else cpu
    dtype: str = "auto"                # "auto": bfloat16 autocast on cuda, float32 on cpu

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
        need(self.dtype in ("auto", "float32", "bfloat16", "float16"), f"dtype={self.dtype!r}: use auto, float32, bfloat16 or float16")


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
    raise SystemExit(f"error: {train_bin} or {val_bin} not found: run `python {prepare_py}` first")


def load_split(path, block_size, vocab_size):
    data = np.memmap(path, dtype=np.uint16, mode="r")
    if len(data) <= block_size + 1:
        raise SystemExit(f"error: {path} holds {len(data)} tokens, fewer than block_size+2={block_size + 2}: "
                         "lower block_size or prepare more data")
    return data


def get_batch(data, batch_size, block_size, gen, device):
    """batch_size random windows of block_size+1 tokens; gen (a torch.Generator) is the data position."""
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=gen).tolist()
    xy = torch.from_numpy(np.stack([data[i:i + block_size + 1].astype(np.int64) for i in ix]))
    x, y = xy[:, :-1], xy[:, 1:]
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous(), y.contiguous()


def read_vocab_size(tcfg):
    meta = os.path.join(data_paths(tcfg)[0], "meta.json")
    if not os.path.exists(meta):
        raise SystemExit(f"error: {meta} not found: run the dataset's prepare.py")
    with open(meta) as f:
        return json.load(f)["vocab_size"]

# -----------------------------------------------------------------------------
# checkpoints: one format, written to a temp file and renamed so a crash never leaves half a file

CHECKPOINT_FORMAT = "skywork-moe-edu/1"


def save_checkpoint(path, model, optimizer, model_cfg, train_cfg, iter_num, best_val_loss, coeffs, data_gen):
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "model_config": dataclasses.asdict(model_cfg),
        "train_config": dataclasses.asdict(train_cfg),
        "iter_num": iter_num,
        "best_val_loss": best_val_loss,
        "coefficients": coeffs.state_dict() if coeffs is not None else None,
        "rng": {"torch": torch.get_rng_state(), "data": data_gen.get_state() if data_gen is not None else None,
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated / not a torch file
        raise SystemExit(f"error: {path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"error: {path} is not a checkpoint of this project (no format {CHECKPOINT_FORMAT!r})")
    return ckpt


def model_from_checkpoint(ckpt, device="cpu"):
    model = GPT(ModelConfig(**ckpt["model_config"]))
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
    stats = torch.stack([torch.stack([getattr(r, n).detach().float() for n in STAT_NAMES]) for r in router_outputs])
    loads = torch.stack([r.load_E for r in router_outputs])
    return stats, loads


def train_step(model, optimizer, batches, coeffs, tcfg, autocast):
    """Forward/backward over the micro-batches, clip, step. Returns (mean CE, stats, loads) averaged
    over micro-batches; the caller updates the coefficients from them after the step."""
    ce_sum, stats_sum, loads_sum = 0.0, 0.0, 0.0
    for x, y in batches:
        with autocast:
            _, ce, router_outputs = model(x, y)
            loss = balance_loss(ce, router_outputs, coeffs.alpha, tcfg.z_loss_coef)
        (loss / len(batches)).backward()
        stats, loads = router_stats(router_outputs)
        ce_sum, stats_sum, loads_sum = ce_sum + ce.detach(), stats_sum + stats, loads_sum + loads
    if tcfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    n = len(batches)
    return ce_sum / n, stats_sum / n, loads_sum / n


def update_balance_state(model, coeffs, stats, loads, tcfg):
    """After the optimizer step: adaptive alphas from this step's drop rates (eq. 7-9), and the
    aux-free selection bias from this step's loads."""
    drop = stats[:, STAT_NAMES.index("drop_rate")].tolist()
    coeffs.update(drop)
    moe_layers = [b.ffn for b in model.blocks if b.is_moe]
    for moe, load_E in zip(moe_layers, loads):
        if moe.router.aux_free_bias:
            aux_free_bias_step(moe.router.selection_bias_E, load_E.to(moe.router.selection_bias_E.device),
                               tcfg.bias_update_rate)


@torch.no_grad()
def estimate_loss(model, splits, tcfg, block_size, device, autocast):
    """Mean CE over eval_iters batches per split. The batches come from a generator seeded afresh at
    every eval, so evals are comparable across time and never move the training data position."""
    model.eval()
    out = {}
    for name, data in splits.items():
        gen = torch.Generator().manual_seed(tcfg.seed + 1)
        losses = []
        for _ in range(tcfg.eval_iters):
            x, y = get_batch(data, tcfg.batch_size, block_size, gen, device)
            with autocast:
                losses.append(model(x, y)[1].item())
        out[name] = sum(losses) / len(losses)
    model.train()
    return out

# -----------------------------------------------------------------------------
# the loop

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
    if device.type == "cpu" and dtype != "float32":
        print(f"note: {dtype} on CPU is very slow here; float32 is the CPU default")
    autocast = (torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype != "float32"
                else torch.autocast(device.type, enabled=False))
    return device, autocast


def train(model_cfg, tcfg, sources=None):
    """Run the configured job; returns the final eval losses."""
    device, autocast = resolve_device(tcfg)
    torch.manual_seed(tcfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    ckpt = None
    ckpt_path = os.path.join(tcfg.out_dir, "ckpt.pt")
    if tcfg.init_from == "resume":
        ckpt = load_checkpoint(ckpt_path)
        model_cfg = ModelConfig(**ckpt["model_config"])
    elif tcfg.init_from != "scratch":
        ckpt = load_checkpoint(tcfg.init_from)
        model_cfg = ModelConfig(**ckpt["model_config"])
        print(f"starting from the weights of {tcfg.init_from} (fresh optimizer and schedule)")
    ensure_data(tcfg)
    if ckpt is None:
        vocab = read_vocab_size(tcfg)
        if "vocab_size" in (sources or {}) and model_cfg.vocab_size != vocab:
            raise SystemExit(f"error: vocab_size={model_cfg.vocab_size} but the dataset has {vocab} tokens")
        model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab)
    _, train_bin, val_bin = data_paths(tcfg)
    splits = {"train": load_split(train_bin, model_cfg.block_size, model_cfg.vocab_size),
              "val": load_split(val_bin, model_cfg.block_size, model_cfg.vocab_size)}
    print_config(model_cfg, tcfg, sources or {})

    model = GPT(model_cfg)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    model.to(device)
    counts = model.param_counts()
    print(f"parameters: {counts['total'] / 1e6:.2f}M total, {counts['active'] / 1e6:.2f}M active; "
          f"MoE layers {model_cfg.moe_layer_ids}")
    optimizer = torch.optim.AdamW(model.optim_groups(tcfg.weight_decay), lr=tcfg.learning_rate,
                                  betas=(tcfg.beta1, tcfg.beta2), fused=device.type == "cuda")
    coeffs = AuxCoefficients(len(model_cfg.moe_layer_ids), tcfg.aux_coef_mode, tcfg.aux_alpha,
                             tcfg.aux_xi, tcfg.aux_alpha_max, tcfg.aux_beta)
    data_gen = torch.Generator().manual_seed(tcfg.seed)
    iter_num, best_val = 0, float("inf")
    if tcfg.init_from == "resume":
        optimizer.load_state_dict(ckpt["optimizer"])
        coeffs.load_state_dict(ckpt["coefficients"])
        iter_num, best_val = ckpt["iter_num"], ckpt["best_val_loss"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        data_gen.set_state(ckpt["rng"]["data"])
        if ckpt["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        print(f"resumed from {ckpt_path} at iteration {iter_num}")
    del ckpt

    os.makedirs(tcfg.out_dir, exist_ok=True)
    metrics = open(os.path.join(tcfg.out_dir, "metrics.jsonl"), "a" if tcfg.init_from == "resume" else "w")
    tokens_per_step = tcfg.batch_size * tcfg.grad_accum * model_cfg.block_size
    layer_ids = model_cfg.moe_layer_ids
    start_iter, last = iter_num, {}
    t_window, it_window = time.time(), iter_num
    while True:
        if (iter_num % tcfg.eval_interval == 0 or iter_num == tcfg.max_iters) and not (
                iter_num == start_iter and tcfg.init_from == "resume"):
            last = estimate_loss(model, splits, tcfg, model_cfg.block_size, device, autocast)
            rec = {"iter": iter_num, "tokens": iter_num * tokens_per_step,
                   "train_loss": last["train"], "val_loss": last["val"]}
            if layer_ids and model_cfg.n_expert > 1:
                rec["expert_similarity"] = expert_similarity(model)
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            print(f"eval iter {iter_num}: train {last['train']:.4f}, val {last['val']:.4f}")
            best_val = min(best_val, last["val"])
            if tcfg.save_checkpoint and iter_num > 0:
                save_checkpoint(ckpt_path, model, optimizer, model_cfg, tcfg, iter_num, best_val, coeffs, data_gen)
            t_window = time.time()  # keep eval time out of tokens/s
        if iter_num >= tcfg.max_iters:
            break

        lr = lr_at(iter_num, tcfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        batches = [get_batch(splits["train"], tcfg.batch_size, model_cfg.block_size, data_gen, device)
                   for _ in range(tcfg.grad_accum)]
        alphas_used = list(coeffs.alpha)
        ce, stats, loads = train_step(model, optimizer, batches, coeffs, tcfg, autocast)
        update_balance_state(model, coeffs, stats, loads, tcfg)
        iter_num += 1

        if iter_num % tcfg.log_interval == 0 or iter_num == tcfg.max_iters:
            ce = ce.item()
            dt = time.time() - t_window
            tok_s = (iter_num - it_window) * tokens_per_step / max(dt, 1e-9)
            t_window, it_window = time.time(), iter_num
            rec = {"iter": iter_num, "tokens": iter_num * tokens_per_step, "lr": lr, "loss": ce,
                   "tok_per_s": tok_s, "layers": layer_records(stats, loads, alphas_used, layer_ids)}
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            eta = (tcfg.max_iters - iter_num) * tokens_per_step / max(tok_s, 1e-9)
            line = (f"iter {iter_num}/{tcfg.max_iters} | loss {ce:.4f} | lr {lr:.2e} | "
                    f"{tok_s:,.0f} tok/s | eta {format_eta(eta)}")
            if layer_ids:
                drops = " ".join(f"{100 * r['drop_rate']:.1f}" for r in rec["layers"])
                alphas = " ".join(f"{a:.4f}" for a in coeffs.alpha)
                line += f" | drop% {drops} | alpha {alphas}"
            print(line, flush=True)
    metrics.close()
    return last


def main(argv):
    try:
        model_cfg, tcfg, sources = load_config(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    train(model_cfg, tcfg, sources)


if __name__ == "__main__":
    main(sys.argv[1:])
