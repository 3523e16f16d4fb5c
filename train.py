"""
Train a (Mixture-of-Experts) GPT. Read top to bottom in the order a run happens: config -> data -> the
model and its optimizer -> one step -> balance update -> eval -> setup -> the loop.

    python train.py                                    # the tiny CPU MoE on Shakespeare characters
    python train.py config/shakespeare_char.toml max_iters=500 gate_norm=false out_dir=out-nonorm
    python train.py init_from=resume                   # continue out/ckpt.pt with its own settings
    torchrun --standalone --nproc_per_node=2 train.py config/shakespeare_char_ep2.toml   # 2 ranks, EP 2

The loss is L = L_ce + sum_l alpha^(l) L_aux^(l) (+ z-loss), with the per-layer coefficients alpha^(l)
fixed or adapted after every step from that layer's token drop rate (Skywork-MoE eq. 7-9, router.py).
Every log interval one JSON line goes to out_dir/metrics.jsonl with the router statistics per MoE layer.
Settings: config.py (defaults < config files < command line); checkpoints and files: checkpoint.py.

Under torchrun every rank runs this file, with the experts and attention sharded from outside the
model (expert_parallel.py, tensor_parallel.py); batch_size is the global micro-batch and the run equals
one process routing the same token slices as its groups. Only rank 0 prints, logs and saves. SIGTERM /
SIGINT stop at the next step with a checkpoint (exit 0); a non-finite step is skipped or stops the run;
bad inputs are one line saying what to do (exit 1); a seed writes the same metrics.jsonl, byte for byte.
"""

import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import expert_parallel as ep
import tensor_parallel as tp
from checkpoint import (
    CheckpointError,
    MetricsLog,
    RunDir,
    cuda_rng_states,
    io_error,
    model_view,
    open_checkpoint,
    restore_rng,
    resume_state_problem,
)
from config import ConfigError, check_settings, load_config, merge_saved, print_config, setting
from dataset import DataError, data_root, ensure_data, get_batch, open_splits, read_vocab_size
from model import GPT, ModelConfig, count_params_meta, expert_similarity
from router import STAT_NAMES, AuxCoefficients, aux_free_bias_step, balance_loss


class TrainError(Exception):
    """A run that cannot start or go on; the message says what to do, in one line."""


# the errors that are a one-line message for the user (main prints them; no traceback)
EXPLAINED = (ConfigError, CheckpointError, DataError, TrainError, ep.RankFailure)


# -----------------------------------------------------------------------------
# config


@dataclass
class TrainConfig:
    # the defaults are the quick-start CPU job (config/shakespeare_char.toml spells them out); each
    # numeric setting's valid range is declared with it: setting(default, lowest, highest)
    # --- I/O
    out_dir: str = "out"
    dataset: str = "shakespeare_char"  # reads data_dir/dataset/{train,val}.bin and meta.json
    data_dir: str = "data"
    init_from: str = "scratch"  # "scratch", "resume" (out_dir/ckpt.pt, with its settings), or a
    # checkpoint path whose weights start a new run (e.g. one written by upcycle.py)
    eval_interval: int = setting(250, 1, 10**9)
    eval_iters: int = setting(20, 1, 10**6)
    log_interval: int = setting(25, 1, 10**9)
    save_checkpoint: bool = True  # at every eval, at the end, and when stopped by SIGTERM / SIGINT
    keep_last: int = setting(2, 0, 10**4)  # numbered ckpt-<iter>.pt kept besides ckpt.pt and best.pt
    on_nonfinite: str = setting("skip", choices=("skip", "stop"))  # a step with a non-finite loss, router
    # statistic or gradient: "skip" its update, or "stop" the run (no checkpoint written)
    max_skipped_steps: int = setting(5, 1, 10**4)  # consecutive skipped steps that stop the run anyway
    seed: int = setting(1337, 0, 2**63 - 1)
    # --- batch
    batch_size: int = setting(16, 1, 10**7)  # sequences per micro-batch, summed over ranks under torchrun
    grad_accum: int = setting(1, 1, 10**5)  # micro-batches per optimizer step
    route_groups: int = setting(0, 0, 10**7)  # routing groups per micro-batch: tokens sharing one capacity
    # and one balance loss (GShard's groups). 0: one per token slice (rank); a multiple of it otherwise
    # --- optimizer and schedule
    max_iters: int = setting(2000, 0, 10**10)
    learning_rate: float = setting(2e-3, 1e-12, 1.0)  # peak
    min_lr: float = setting(2e-4, 0.0, 1.0)  # floor of the cosine
    lr_schedule: str = setting("cosine", choices=("cosine", "constant"))  # linear warmup, then this
    warmup_iters: int = setting(100, 0, 10**10)
    lr_decay_iters: int = setting(0, 0, 10**10)  # 0: max_iters
    weight_decay: float = setting(0.1, 0.0, 10.0)
    router_weight_decay: float | None = setting(None, 0.0, 10.0)  # the gate's own decay; None: weight_decay
    beta1: float = setting(0.9, 0.0, 0.999999)
    beta2: float = setting(0.99, 0.0, 0.999999)
    grad_clip: float = setting(1.0, 0.0, 1e6)  # 0: off
    # --- load balancing (router.py)
    aux_coef_mode: str = setting("adaptive", choices=("adaptive", "fixed"))  # eq. 7-9, or fixed aux_alpha
    aux_alpha: float = setting(0.01, 0.0, 1.0)  # the fixed alpha, or adaptive's initial alpha
    aux_xi: float = setting(0.2, 0.0, 1e3)  # xi of eq. 8 (Skywork: 1/5)
    aux_alpha_max: float = setting(0.01, 0.0, 1.0)  # alpha_max of eq. 8
    aux_beta: float = setting(0.99, 0.0, 0.999999)  # beta of eq. 9
    z_loss_coef: float = setting(0.0, 0.0, 1.0)  # ST-MoE router z-loss (typ. 1e-3)
    bias_update_rate: float = setting(1e-3, 0.0, 1.0)  # u of the aux-free bias update (aux_free_bias=true)
    balance_scope: str = setting("micro", choices=("micro", "global"))  # "micro": per routing group;
    # "global": Qwen's, f of the Switch loss over all ranks and the step's micro-batches
    # --- system
    device: str = "auto"  # "auto": cuda if available, else cpu; or cpu, cuda, cuda:N
    dtype: str = setting("auto", choices=("auto", "float32", "bfloat16", "float64"))  # "auto": bfloat16
    # autocast on GPUs that compute it natively, else float32; float64: the whole model (CPU checks)
    compile: bool = False  # torch.compile the model for the training step (the checkpoint stays plain)
    # --- parallelism (torchrun; expert_parallel.py, tensor_parallel.py)
    ep_size: int = setting(1, 1, 10**5)  # ranks per expert-parallel group, each with n_expert/ep_size experts
    tp_size: int = setting(1, 1, 10**5)  # ranks per tensor-parallel group (attention heads split)
    expert_group: str = setting("", choices=tp.EXPERT_GROUPS)  # "tp" (EDP), "world" (EP), "etp", "" (ep_size)
    backend: str = setting("auto", choices=("auto", "nccl", "gloo"))  # "auto": nccl on cuda, gloo on cpu
    dist_timeout_s: float = setting(600.0, 1.0, 86400.0)  # a collective waiting longer fails, not hangs

    def __post_init__(self):
        if self.dtype == "float16":
            raise ValueError(
                "dtype=float16 needs loss scaling, which this project does not do (small gradients would "
                "underflow): use bfloat16 on GPUs that have it, else float32"
            )
        check_settings(self)
        if self.min_lr > self.learning_rate:
            raise ValueError(f"min_lr={self.min_lr} must be <= learning_rate={self.learning_rate}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device={self.device!r}: use auto, cpu, cuda or cuda:N")
        if not self.init_from.strip():
            raise ValueError("init_from is empty: use 'scratch', 'resume' or a checkpoint path")


# settings of where and how a run is launched, never taken from the checkpoint a run resumes
LAUNCH_KEYS = ("out_dir", "init_from", "device", "backend", "ep_size", "tp_size", "expert_group", "dist_timeout_s")


# -----------------------------------------------------------------------------
# the model, its optimizer and its coefficients


def build(model_cfg, tcfg, device, groups, state=None):
    """The model (float64 if asked, loaded from state, experts sharded under expert parallelism), its
    AdamW and the per-layer balance coefficients. Every rank builds the same full model first (same
    seed or same state), so each rank's slice of the experts is the single process's."""
    model = GPT(model_cfg).to(device)
    if tcfg.dtype == "float64":
        model.double()  # before loading, so a float64 checkpoint is not rounded through float32
    if state is not None:
        model.load_state_dict(state)  # full experts: every ep_size slices the same file
    tp.parallelize(model, groups)
    params = model.optim_groups(tcfg.weight_decay, tcfg.router_weight_decay)
    betas, fused = (tcfg.beta1, tcfg.beta2), device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=tcfg.learning_rate, betas=betas, fused=fused)
    coef = (tcfg.aux_coef_mode, tcfg.aux_alpha, tcfg.aux_xi, tcfg.aux_alpha_max, tcfg.aux_beta)
    coeffs = AuxCoefficients(len(model_cfg.moe_layer_ids), *coef)
    return model, optimizer, coeffs


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


def router_stats(router_outputs, device):
    """(n_moe_layers, len(STAT_NAMES)) detached stats and (n_moe_layers, E) loads of one forward, on
    device (a dense model's empty tables too, so they concatenate with the loss on a GPU)."""
    if not router_outputs:
        return torch.zeros(0, len(STAT_NAMES), device=device), torch.zeros(0, 0, device=device)
    # fp32, or wider: an fp64 model keeps fp64 statistics (the expert-parallel equivalence tests)
    wide = [[getattr(r, n).detach() for n in STAT_NAMES] for r in router_outputs]
    stats = torch.stack([torch.stack([v.to(torch.promote_types(v.dtype, torch.float32)) for v in row]) for row in wide])
    return stats, torch.stack([r.load_E for r in router_outputs])


def global_balance_losses(router_outputs, running_load_LE, groups):
    """Qwen's global-batch balancing (balance_scope="global"): the Switch loss E * sum_j f_j P_j with
    f_j the share of routed assignments (before capacity) that chose expert j over the global batch,
    i.e. all ranks (all-reduced) and the step's micro-batches so far (running_load_LE, (layers, E),
    zero at the start of the step, updated in place), and P_j this rank's mean gate probability.

    f carries no gradient, so averaging the ranks' losses (the gradient rule of expert_parallel.py)
    averages P over the global batch: with grad_accum=1 this is exactly E * sum_j f_j P_j of the
    global batch. With micro-batches, micro-batch m sees f of micro-batches 1..m: waiting for the
    routing of later micro-batches would take a second forward pass."""
    load_LE = torch.stack([r.load_E for r in router_outputs])
    if groups.world_size > 1:
        dist.all_reduce(load_LE)
    running_load_LE += load_LE
    f_LE = running_load_LE / running_load_LE.sum(dim=-1, keepdim=True)
    out = []
    sliced = groups.tp_size > 1 and groups.layout.expert_group != "etp"
    for r, f_E in zip(router_outputs, f_LE):
        P_E = r.probs_TE.mean(dim=0)
        aux = P_E.shape[0] * (f_E.to(P_E.dtype) * P_E).sum()
        out.append(dataclasses.replace(r, aux_loss=tp.tp_mean(aux, groups.tp_group) if sliced else aux))
    return out


def forward_backward(model, batches, coeffs, tcfg, autocast, groups, n_group=1, sync=None):
    """Forward and backward over the micro-batches, accumulating gradients; under torchrun they are
    synchronised (sync: tensor_parallel.OverlappedSync, overlapped with the last backward; None:
    sync_gradients after it) to the single-process gradient of the global batch. Returns (mean CE,
    stats (n_moe_layers, len(STAT_NAMES)), loads (n_moe_layers, E)): averaged over micro-batches and
    reduced over ranks (loads summed), i.e. the single process's numbers."""
    ces, stats, loads = [], [], []
    running_load_LE = None
    for i, (x, y) in enumerate(batches):
        with autocast:
            _, ce, router_outputs = model(x, y, n_group=n_group)
            if tcfg.balance_scope == "global" and router_outputs:
                if running_load_LE is None:
                    running_load_LE = torch.zeros_like(torch.stack([r.load_E for r in router_outputs]))
                router_outputs = global_balance_losses(router_outputs, running_load_LE, groups)
            loss = balance_loss(ce, router_outputs, coeffs.alpha, tcfg.z_loss_coef)
        if sync is not None and i == len(batches) - 1:
            sync.arm()
        (loss / len(batches)).backward()
        s, l = router_stats(router_outputs, ce.device)
        ces.append(ce.detach())
        stats.append(s)
        loads.append(l)
    if groups.world_size > 1:
        if sync is not None:
            sync.finish()
        else:
            tp.sync_gradients(model, groups)
        ces, stats, loads = ep.reduce_step_statistics(ces, stats, loads, STAT_NAMES.index("load_cv"))
    n = len(batches)
    return sum(ces) / n, sum(stats) / n, sum(loads) / n


# Router statistics a healthy step always has finite (max1_max2 / max2_max3 are ratios of gate
# probabilities: legitimately inf or nan with fewer than 3 experts or a saturated gate)
MUST_BE_FINITE = ("aux_loss", "z_loss", "drop_rate", "load_cv", "entropy")


@dataclass
class StepResult:
    ce: torch.Tensor  # mean cross entropy (0-dim, on the device)
    loss: float  # the same, on the host
    stats: torch.Tensor  # (n_moe_layers, len(STAT_NAMES)) on the host
    loads: torch.Tensor  # (n_moe_layers, E) on the device
    grad_norm: float  # before clipping
    problem: str | None  # why the update was skipped (non-finite values); None: it was applied
    stop_signal: int  # a signal some rank received (SIGTERM, SIGINT), the same on every rank; 0: none


def train_step(model, optimizer, batches, coeffs, tcfg, autocast, groups, n_group=1, signal_num=0, sync=None):
    """One optimisation step: forward/backward over the micro-batches, then the step's one host sync,
    which the drop rates of eq. 7-9 needed anyway, carrying the loss, the gradient norm, the router
    statistics and two flags max-reduced over the ranks (one small all-reduce), so every rank makes the
    same two decisions: apply the update (clip, AdamW) only if everything is finite, else drop the
    gradients and say what went bad (StepResult.problem); and stop if any rank received a signal
    (signal_num: this rank's)."""
    ce, stats, loads = forward_backward(model, batches, coeffs, tcfg, autocast, groups, n_group, sync)
    norm = tp.grad_norm(model, groups)
    checked = [STAT_NAMES.index(n) for n in MUST_BE_FINITE]
    finite = torch.isfinite(ce) & torch.isfinite(norm) & torch.isfinite(stats[:, checked].to(ce.device)).all()
    flags = torch.stack([ce.new_full((), float(signal_num), dtype=torch.float64), (~finite).to(torch.float64)])
    if groups.world_size > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    scalars = torch.stack([ce.detach().double(), norm.double()])
    host = torch.cat([flags, scalars, stats.reshape(-1).to(ce.device, torch.float64)]).cpu()
    host_stats = host[4:].view(stats.shape).to(stats.dtype)
    problem = None
    if host[1]:
        problem = describe_nonfinite(float(host[2]), float(host[3]), host_stats, model)
    else:
        if tcfg.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(model.parameters(), tcfg.grad_clip, norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(ce, float(host[2]), host_stats, loads, float(host[3]), problem, int(host[0]))


def describe_nonfinite(ce, norm, stats, model):
    """What went bad in a step: loss, gradient norm, the first MoE layer whose router statistics are not
    finite (where the forward broke), and the parameters with non-finite gradients."""
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
        more = f" and {len(bad_grads) - 1} more parameter(s)" if len(bad_grads) > 1 else ""
        parts.append(f"non-finite gradient in {bad_grads[0]}{more}")
    return "; ".join(parts)


# -----------------------------------------------------------------------------
# balance update: after the optimizer step


def update_balance_state(model, coeffs, stats, loads, tcfg):
    """Adaptive alphas from this step's drop rates (eq. 7-9), and the aux-free selection bias from this
    step's loads. Under torchrun both come reduced over the ranks, so every rank computes the same."""
    coeffs.update(stats[:, STAT_NAMES.index("drop_rate")].tolist())
    moe_layers = [b.ffn for b in model.blocks if b.is_moe]
    for moe, load_E in zip(moe_layers, loads):
        if moe.router.aux_free_bias:
            bias_E = moe.router.selection_bias_E
            aux_free_bias_step(bias_E, load_E.to(bias_E.device), tcfg.bias_update_rate)


# -----------------------------------------------------------------------------
# eval


@torch.no_grad()
def estimate_loss(model, splits, tcfg, block_size, device, autocast, groups, n_group=1):
    """Mean CE over eval_iters batches per split, from a generator seeded afresh at every eval (evals
    comparable across time; the training data position never moves). Means all-reduced over ranks."""
    model.eval()
    out = {}
    for name, data in splits.items():
        gen = torch.Generator().manual_seed(tcfg.seed + 1)
        losses = []
        for _ in range(tcfg.eval_iters):
            x, y = get_batch(data, tcfg.batch_size, block_size, gen, device, groups.dp_rank, groups.dp_size)
            with autocast:
                losses.append(model(x, y, n_group=n_group)[1].item())
        out[name] = sum(losses) / len(losses)
    if groups.world_size > 1:
        means = torch.tensor(list(out.values()), dtype=torch.float64, device=device)
        dist.all_reduce(means)
        out = {k: v / groups.world_size for k, v in zip(out, means.tolist())}
    model.train()
    return out


# -----------------------------------------------------------------------------
# setup: device, launch checks, inputs, the run's state


def resolve_device(tcfg):
    """(device, autocast context, dtype name). Under torchrun on GPUs each rank takes its LOCAL_RANK."""
    name = tcfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError("device=cuda but no GPU is visible: use device=cpu")
    if name == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    device = torch.device(name)
    dtype = tcfg.dtype
    if dtype == "auto":  # bf16 only where the GPU computes it natively (not V100, T4)
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if device.type == "cpu" and dtype == "bfloat16":
        print("note: bfloat16 on CPU is very slow here; float32 is the CPU default")
    # float64 is not an autocast dtype: the model itself is converted (build)
    if dtype in ("float32", "float64"):
        return device, torch.autocast(device.type, enabled=False)
    return device, torch.autocast(device.type, dtype=getattr(torch, dtype))


def check_setup(model_cfg, tcfg, world_size, cuda_available):
    """tensor_parallel.check_launch, its verdict as a TrainError."""
    try:
        return tp.check_launch(tcfg, model_cfg, world_size, cuda_available)
    except ValueError as e:
        raise TrainError(str(e)) from None


def read_inputs(model_cfg, tcfg, sources, say):
    """Everything the run reads from disk, checked before any memory is spent: the checkpoint (whose
    settings a resumed run takes, see resumed_config), the model config, and the data splits.
    Returns (model_cfg, tcfg, ckpt or None, splits)."""
    ckpt, vocab_from = None, None
    if tcfg.init_from != "scratch":
        resuming = tcfg.init_from == "resume"
        path = os.path.join(tcfg.out_dir, "ckpt.pt") if resuming else tcfg.init_from
        if resuming and not os.path.isfile(path):
            raise TrainError(
                f"init_from=resume, but {path} does not exist: nothing to resume in out_dir={tcfg.out_dir!r} "
                "(point out_dir at the run, or use init_from=scratch)"
            )
        ckpt, cfg, notes = open_checkpoint(path, model_cfg, sources, resuming)
        if resuming:
            tcfg, overrides = merge_saved(tcfg, ckpt.get("train_config") or {}, sources, LAUNCH_KEYS)
            say(f"resuming {path} with its settings" + (f"; overridden: {', '.join(overrides)}" if overrides else ""))
        if notes:
            say(f"note: {path} fixes the model, so these settings do not apply: {notes}")
        model_cfg, vocab_from = cfg, f"{path}'s model config"
    else:
        vocab = read_vocab_size(tcfg)
        if "vocab_size" in sources and model_cfg.vocab_size != vocab:
            raise TrainError(f"vocab_size={model_cfg.vocab_size} but the dataset has {vocab} tokens: drop vocab_size")
        model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab)
        vocab_from = os.path.join(data_root(tcfg), "meta.json")
    return model_cfg, tcfg, ckpt, open_splits(tcfg, model_cfg.block_size, model_cfg.vocab_size, vocab_from)


@dataclass
class Run:
    """What the loop works with: built by setup(), advanced by loop()."""

    model_cfg: ModelConfig
    tcfg: TrainConfig
    groups: tp.TPGroups
    device: torch.device
    autocast: object
    model: torch.nn.Module  # the plain module: saved, evaluated, and sharded under expert parallelism
    step_model: torch.nn.Module  # what the step calls: the model, or its torch.compile'd wrapper
    grad_sync: tp.OverlappedSync | None  # the gradient all-reduce under torchrun; None in one process
    optimizer: torch.optim.Optimizer
    coeffs: AuxCoefficients
    data_gen: torch.Generator
    splits: dict
    run_dir: RunDir
    metrics: MetricsLog | None  # rank 0 only
    iter_num: int
    n_group: int  # routing groups of this rank's micro-batch

    def say(self, *args, **kwargs):
        if self.groups.is_main:
            print(*args, **kwargs)


def setup(model_cfg, tcfg, sources, groups, device, autocast):
    """Inputs read on every rank (agreeing on failure), the model built, a resumed run restored: a Run."""
    say = print if groups.is_main else (lambda *a, **k: None)
    node_main = int(os.environ.get("LOCAL_RANK", "0")) == 0  # prepares the data once per node
    ep.on_every_rank(groups, lambda: ensure_data(tcfg) if node_main else None, EXPLAINED)
    model_cfg, tcfg, ckpt, splits = ep.on_every_rank(
        groups, lambda: read_inputs(model_cfg, tcfg, sources, say), EXPLAINED
    )
    resuming = tcfg.init_from == "resume"
    check_setup(model_cfg, tcfg, groups.world_size, torch.cuda.is_available())  # the checkpoint's model
    if groups.is_main:
        print_config([model_cfg, tcfg], sources)
    torch.manual_seed(tcfg.seed)  # the same on every rank (identical weights, experts sliced in build); the run's seed
    slices = groups.layout.route_slices
    n_group = (tcfg.route_groups or slices) // slices
    if groups.world_size > 1:
        say(
            f"torchrun: {groups.layout.describe()} ({dist.get_backend()}); {tcfg.batch_size // groups.dp_size} "
            f"sequences per replica and {n_group} routing group(s) per rank"
        )
    model, optimizer, coeffs = build(model_cfg, tcfg, device, groups, ckpt["model"] if ckpt is not None else None)
    counts = count_params_meta(model_cfg)
    say(
        f"parameters: {counts['total'] / 1e6:.2f}M total, {counts['active'] / 1e6:.2f}M active; "
        f"MoE layers {model_cfg.moe_layer_ids}"
    )
    data_gen = torch.Generator().manual_seed(tcfg.seed)
    step_model = torch.compile(model) if tcfg.compile else model
    sync = tp.OverlappedSync(model, groups) if groups.world_size > 1 else None
    run = Run(model_cfg, tcfg, groups, device, autocast, model, step_model, sync, optimizer, coeffs, data_gen, splits,
              RunDir(tcfg.out_dir, tcfg.keep_last), None, 0, n_group)  # fmt: skip
    if resuming:
        resume(run, ckpt)
    elif ckpt is not None:
        say(f"starting from the weights of {tcfg.init_from} (fresh optimizer and schedule)")
    run.metrics = ep.on_every_rank(groups, lambda: open_run_files(run, ckpt) if groups.is_main else None, EXPLAINED)
    return run


def resume(run, ckpt):
    """Continue where ckpt stopped: optimizer (this rank's slice of the expert moments), coefficients,
    RNG states and data position, iteration, best val loss. Every field is checked first, so a damaged
    one is a message, not a traceback halfway through."""
    problem = resume_state_problem(ckpt, run.optimizer, run.data_gen)
    if problem:
        raise TrainError(f"{run.run_dir.latest} cannot be resumed: {problem}. Resume from another checkpoint")
    try:
        run.optimizer.load_state_dict(tp.shard_optimizer_state(ckpt["optimizer"], run.optimizer, run.model, run.groups))
        run.coeffs.load_state_dict(ckpt["coefficients"])
        restore_rng(ckpt["rng"], run.data_gen, run.groups.rank)
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise TrainError(f"{run.run_dir.latest} cannot be resumed ({type(e).__name__}: {e})") from None
    run.iter_num = ckpt["iter_num"]
    run.run_dir.best_val, run.run_dir.last_saved = ckpt["best_val_loss"], run.iter_num
    run.say(f"resumed from {run.run_dir.latest} at iteration {run.iter_num}")


def open_run_files(run, ckpt):
    """Rank 0: out_dir ready and writable; a resumed run's file set completed (a kill during its last
    save) and its metrics trimmed back to the checkpoint; the metrics file open."""
    resuming = run.tcfg.init_from == "resume"
    stale = run.run_dir.prepare(resuming)
    if resuming:
        run.run_dir.repair(ckpt)
        run.run_dir.trim_metrics(run.iter_num)
    elif stale:
        print(
            f"note: out_dir={run.tcfg.out_dir!r} holds an earlier run's checkpoints: this run replaces them from "
            "its first save on (init_from=resume would continue that run instead)"
        )
    return MetricsLog(run.run_dir.metrics_path, append=resuming)


# -----------------------------------------------------------------------------
# the loop: checkpoints, evals, logging, signals


def save(run, val_loss=None, full_state=None, gathered=False):
    """Checkpoint the run at its iteration: the full experts and moments are gathered to rank 0 (a
    collective on every rank under expert parallelism; gathered: full_state is already that gather,
    None on the other ranks), rank 0 writes; a write error stops every rank."""
    if not gathered:
        full_state = tp.full_model_state(run.model, run.groups)
    full_optim = tp.full_optimizer_state(run.optimizer, run.model, run.groups)
    cuda_rng = cuda_rng_states(run.groups.world_size)

    def write():
        if not run.groups.is_main:
            return
        try:
            run.run_dir.save(
                run.iter_num, val_loss, model_state=full_state, optimizer_state=full_optim,
                model_cfg=run.model_cfg, train_cfg=run.tcfg, coefficients=run.coeffs.state_dict(),
                rng={"torch": torch.get_rng_state(), "data": run.data_gen.get_state(), "cuda": cuda_rng},
            )  # fmt: skip
        except OSError as e:
            raise TrainError(
                f"{io_error(run.run_dir.latest, e)}. Nothing was lost: {run.run_dir.latest} holds the last "
                "complete checkpoint; once fixed, continue with init_from=resume"
            ) from None

    ep.on_every_rank(run.groups, write, EXPLAINED)
    run.run_dir.last_saved = run.iter_num  # on every rank: loop() decides on it, collectively


def evaluate(run, tokens_per_step):
    """Eval losses, the expert similarity (upcycling's health metric), one metrics line, a checkpoint."""
    tcfg, model_cfg = run.tcfg, run.model_cfg
    last = estimate_loss(run.model, run.splits, tcfg, model_cfg.block_size, run.device, run.autocast, run.groups,
                         run.n_group)  # fmt: skip
    if not all(math.isfinite(v) for v in last.values()):
        raise TrainError(
            f"the eval at iteration {run.iter_num} gave non-finite losses {last}: nothing saved; "
            f"{run.run_dir.last_good()}. Lower learning_rate and resume"
        )
    want_similarity = bool(model_cfg.moe_layer_ids) and model_cfg.n_expert > 1
    want_save = tcfg.save_checkpoint and run.iter_num > 0
    # a collective under expert parallelism: the full experts, to rank 0, without optimizer moments
    full_state = tp.full_model_state(run.model, run.groups) if want_similarity or want_save else None
    if run.groups.is_main:
        rec = {"iter": run.iter_num, "tokens": run.iter_num * tokens_per_step,
               "train_loss": last["train"], "val_loss": last["val"]}  # fmt: skip
        if want_similarity:
            sharded = run.groups.ep_size > 1 or run.groups.tp_size > 1
            rec["expert_similarity"] = expert_similarity(model_view(model_cfg, full_state) if sharded else run.model)
        run.metrics.write(rec)
        print(f"eval iter {run.iter_num}: train {last['train']:.4f}, val {last['val']:.4f}")
    if want_save:
        save(run, last["val"], full_state, gathered=True)
    return last


def on_bad_step(run, problem, skipped):
    """A skipped step (every rank sees the same problem): warn and log it, or stop the run."""
    tcfg = run.tcfg
    what = f"iteration {run.iter_num}: non-finite values ({problem})"
    steady = (
        "lower learning_rate or raise warmup_iters (z_loss_coef=1e-3 or gate_norm=true steady the router) and "
        "continue with init_from=resume"
    )
    if tcfg.on_nonfinite == "stop":
        raise TrainError(
            f"{what}. Stopped (on_nonfinite=stop) without saving: {run.run_dir.last_good()}. If this is rare, "
            f"continue with init_from=resume on_nonfinite=skip; if it recurs, {steady}"
        )
    if skipped > tcfg.max_skipped_steps:
        raise TrainError(
            f"{what}. Stopped after {skipped} bad steps in a row (max_skipped_steps={tcfg.max_skipped_steps}) "
            f"without saving: {run.run_dir.last_good()}. The run diverges: {steady}"
        )
    run.say(f"warning: {what}: update skipped ({skipped} in a row; on_nonfinite=skip)", flush=True)


def layer_records(stats, alphas, layer_ids):
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


class StopSignal:
    """SIGTERM / SIGINT (a scheduler's preemption, Ctrl-C): stop at the next step with a checkpoint, exit 0.
    The handler only records the signal (anything more could interrupt a save or a collective); train_step
    max-reduces it so every rank stops after the same step. Installed while the loop runs (main thread)."""

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


def loop(run):
    """Eval, step, balance update, log, until max_iters or a signal. Returns the last eval losses."""
    tcfg, model_cfg = run.tcfg, run.model_cfg
    tokens_per_step = tcfg.batch_size * tcfg.grad_accum * model_cfg.block_size  # global: all ranks
    start_iter, last, skipped, stop_signal = run.iter_num, {}, 0, 0
    t_window, it_window = time.time(), run.iter_num
    stop = StopSignal()  # SIGTERM / SIGINT handlers for the loop only, restored when it ends
    with stop.installed():
        while True:
            due = run.iter_num % tcfg.eval_interval == 0 or run.iter_num == tcfg.max_iters
            if due and not (run.iter_num == start_iter and tcfg.init_from == "resume"):
                last = evaluate(run, tokens_per_step)
                t_window = time.time()  # keep eval time out of tokens/s
            if run.iter_num >= tcfg.max_iters:
                break
            if stop_signal:  # agreed by every rank in the step that just ended
                if tcfg.save_checkpoint and run.run_dir.last_saved != run.iter_num:
                    save(run)
                saved = "saved: continue with init_from=resume" if tcfg.save_checkpoint else "save_checkpoint=false"
                run.say(f"{signal.Signals(stop_signal).name} received: stopped at iteration {run.iter_num}; {saved}")
                break

            lr = lr_at(run.iter_num, tcfg)
            for g in run.optimizer.param_groups:
                g["lr"] = lr
            batches = [
                get_batch(run.splits["train"], tcfg.batch_size, model_cfg.block_size, run.data_gen, run.device,
                          run.groups.dp_rank, run.groups.dp_size, vocab_size=model_cfg.vocab_size)
                for _ in range(tcfg.grad_accum)
            ]  # fmt: skip
            alphas_used = list(run.coeffs.alpha)
            step = train_step(run.step_model, run.optimizer, batches, run.coeffs, tcfg, run.autocast, run.groups,
                              run.n_group, stop.received, run.grad_sync)  # fmt: skip
            run.iter_num += 1
            stop_signal = step.stop_signal
            tokens = run.iter_num * tokens_per_step
            if step.problem is not None:
                skipped += 1
                on_bad_step(run, step.problem, skipped)
                if run.metrics is not None:
                    run.metrics.write({"iter": run.iter_num, "tokens": tokens, "skipped": step.problem})
                continue
            skipped = 0
            update_balance_state(run.model, run.coeffs, step.stats, step.loads, tcfg)

            if run.groups.is_main and (run.iter_num % tcfg.log_interval == 0 or run.iter_num == tcfg.max_iters):
                tok_s = (run.iter_num - it_window) * tokens_per_step / max(time.time() - t_window, 1e-9)
                t_window, it_window = time.time(), run.iter_num
                # timings are printed, never logged: the same seed and world size give the same file
                layers = layer_records(step.stats, alphas_used, model_cfg.moe_layer_ids)
                run.metrics.write(
                    {"iter": run.iter_num, "tokens": tokens, "lr": lr, "loss": step.loss, "layers": layers}
                )
                eta = (tcfg.max_iters - run.iter_num) * tokens_per_step / max(tok_s, 1e-9)
                line = (f"iter {run.iter_num}/{tcfg.max_iters} | loss {step.loss:.4f} | lr {lr:.2e} | "
                        f"{tok_s:,.0f} tok/s | eta {format_eta(eta)}")  # fmt: skip
                if layers:
                    drops = " ".join(f"{100 * r['drop_rate']:.1f}" for r in layers)
                    line += f" | drop% {drops} | alpha {' '.join(f'{a:.4f}' for a in run.coeffs.alpha)}"
                print(line, flush=True)
    if skipped and skipped == run.iter_num - start_iter:
        raise TrainError(
            f"every one of the {skipped} steps of this run was skipped (non-finite values): {run.run_dir.last_good()}"
        )
    return last


def train(model_cfg, tcfg, sources=None):
    """Run the configured job; returns the last eval losses (on every rank under torchrun).

    A plain call runs in this process, with no process group. Under torchrun (WORLD_SIZE > 1 in the
    environment) every rank calls this: the launch is checked, the process group started, and it is
    torn down however the run ends, with a failing rank named on every rank (expert_parallel.py)."""
    sources = sources or {}
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_setup(model_cfg if tcfg.init_from == "scratch" else None, tcfg, world_size, torch.cuda.is_available())
    device, autocast = resolve_device(tcfg)
    timeout = tcfg.dist_timeout_s

    def build_groups(store, timeout):
        if store is None:
            return tp.TPGroups.local()
        layout = tp.validate_layout(world_size, tcfg.tp_size, tcfg.ep_size, tcfg.expert_group)
        return tp.build_groups(layout, timeout, store)

    with ep.process_groups(tcfg.ep_size, tcfg.backend, device, world_size, timeout, EXPLAINED, build_groups) as groups:
        run = setup(model_cfg, tcfg, sources, groups, device, autocast)
        try:
            if run.iter_num >= run.tcfg.max_iters and run.tcfg.init_from == "resume":
                done = f"{run.tcfg.out_dir} reached max_iters={run.tcfg.max_iters}"
                run.say(f"nothing to do: {done}; raise max_iters to continue")
                return {}
            last = loop(run)
        finally:
            if run.metrics is not None:
                run.metrics.close()
        if run.run_dir.last_saved is not None:
            val = f", val {last['val']:.4f}" if last and run.run_dir.last_saved == run.iter_num else ""
            run.say(f"checkpoint: {run.run_dir.latest} (iter {run.run_dir.last_saved}{val})")
        return last


def main(argv):
    try:
        (model_cfg, tcfg), sources = load_config(argv, [ModelConfig, TrainConfig])
        train(model_cfg, tcfg, sources)
    except EXPLAINED as e:
        kind = "config error" if isinstance(e, ConfigError) else "error"
        print(f"{kind}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
