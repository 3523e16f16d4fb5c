"""
Throughput benchmarks: how close the MoE layer and the training step come to the dense-equivalent
limit (an MoE layer does the arithmetic of K experts per token; routing, sorting, gathering and
scattering are overhead), and what expert parallelism's exchanges cost. Each section is a function
that returns table rows, and a command-line flag; with no flag, sections (a)-(d) run, measured in one
process run. The tables are markdown (README.md's efficiency section is one such run):

    python bench.py                       # (a)-(d) at full size: ~7 min on 2 idle cores, ~30 min busy
    python bench.py --quick               # the same tables at small sizes: ~10 s idle, ~1-2 min busy
    python bench.py --layer --routing     # only sections (a) and (c)
    python bench.py --train --baseline-rev 5c9ea8f   # (b), also timing model.py + router.py of a commit
    python bench.py --train --compile     # (b), also the torch.compile'd model (a first compile: minutes)
    python bench.py --threads 1           # torch threads (default: torch's choice, one per core)
    python bench.py --ep                  # expert parallelism's dispatch + combine (gloo, 2 processes)
    python bench.py --ep --tokens=8192 --n_embd=512 --expert_hidden=1024

(a) --layer    one MoE layer's forward+backward tokens/s against a dense SwiGLU FFN with the same
               active FLOPs (hidden = K x expert hidden), for the default experts (grouped_mm where it
               runs), the per-expert loop (Experts.impl = "loop"), and a naive reference (a boolean mask
               over all tokens per expert, weights indexed per expert)
(b) --train    the full training step of train.py (forward, balance loss, backward, clip, AdamW,
               balance update) in tokens/s and MFU on active parameters (PaLM formula,
               model.flops_per_token), for the default preset and the experiments' preset. MFU is
               against a large matmul timed in the same rounds: a shared CPU has no honest datasheet peak
(c) --routing  routing alone (router + sort + gather + scatter, forward+backward: the layer with
               pass-through experts) as a share of the layer's time, and the router's part of it
(d) --memory   peak memory of the MoE layer's forward+backward against the dense equivalent, and the
               activations saved for backward alone (weight gradients are E/K times the dense ones)

Method: the variants of one case alternate round-robin (the order rotated every round) and medians
are reported, so load from other processes slows them all alike; every ratio is between numbers of
one run. The layer benchmark routes dropless (capacity_factor = 0), so the MoE layer does exactly
K experts' arithmetic per token, like its dense equivalent. CPU runs float32; CUDA bfloat16 autocast.
A busy machine hurts the MoE layer more than the dense one: with 2 threads on 2 oversubscribed cores
every parallel op waits for a descheduled thread, and the MoE layer runs many more ops (a matmul
per expert and weight, where the dense layer has one); --threads 1 is then fairer, and faster. The CPU profiler may
print "USDT" lines on stderr during (d); `2>/dev/null` hides them.

--ep times one MoE layer's forward + backward on each of 2 gloo processes (one CPU thread each), on
the same tokens: with every expert local (no communication: the data-parallel layer), with the experts
sharded over the 2 ranks (expert_parallel.py: count exchange, token all-to-all, local experts, the
reverse all-to-all, and both exchanges again in backward), and dispatch + combine alone on the
layer's routed rows (identity experts): the overhead itself. Both layers do the same expert FLOPs in
expectation (each rank processes about T * K slots either way), but not in the same shape: the
sharded rank runs half the experts on twice the rows each. The variants alternate every iteration so a
busy machine slows all alike; the slower rank's median is reported (a step waits for it).
"""
import argparse
import copy
import datetime
import importlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import train
from model import GPT, MLP, Experts, ModelConfig, MoE
from router import AuxCoefficients

REPO = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# measuring: interleaved medians and peak memory

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns, repeats, warmup=1, device=torch.device("cpu")):
    """Median seconds per call of each fn in fns (name -> callable). Every round calls each fn once,
    in an order rotated by one per round, so load from other processes hits all of them alike."""
    names = list(fns)
    times = {n: [] for n in names}
    for i in range(warmup + repeats):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            synchronize(device)
            t0 = time.perf_counter()
            fns[n]()
            synchronize(device)
            if i >= warmup:
                times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def peak_memory(fn, device):
    """Bytes allocated at the peak of fn() above what was allocated before. CUDA: the allocator's
    high-water mark. CPU (no allocator statistics): the running sum of the allocations and frees the
    profiler attributes to each op, in order (a buffer an op allocates and frees itself is not seen)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def default_autocast(device):
    """What train.py uses: bfloat16 autocast on CUDA, plain float32 on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

# -----------------------------------------------------------------------------
# (a), (c), (d): one MoE layer against its dense equivalent

@dataclass
class LayerCase:
    n_expert: int    # E
    tokens: int      # T
    n_embd: int      # D; the expert hidden F is the default 8/3 D rounded up to 64
    top_k: int = 2   # K


class PassThrough(nn.Module):
    """Experts that return their input: the layer is then routing alone (section c)."""

    def forward(self, x_ND, counts_E):
        return x_ND


def naive_moe(moe, x_TD):
    """The textbook reference: route, then for every expert a boolean mask over all T tokens picks
    the ones that chose it, and its weights are indexed out of the stack (w1[e])."""
    r = moe.router(x_TD)
    ex = moe.experts
    y_TD = torch.zeros_like(x_TD)
    for e in range(ex.w1.shape[0]):
        mask_TK = (r.ids_TK == e) & r.keep_TK
        mask_T = mask_TK.any(dim=1)
        x = x_TD[mask_T]
        h = (F.silu(x @ ex.w1[e].t()) * (x @ ex.w3[e].t())) @ ex.w2[e].t()
        y_TD[mask_T] += ((r.weights_TK * mask_TK).sum(dim=1)[mask_T, None] * h).to(y_TD.dtype)
    return y_TD, r


def layer_variants(case, names, device, seed=0):
    """name -> callable running one forward+backward (the layer's output gradient is a fixed random
    tensor, plus the aux loss), for the variants in names: "dense", "moe" (Experts.impl="auto"),
    "loop" (impl="loop"), "naive", "routing" (pass-through experts), "router" (router alone).
    Also returns the layers and the input, for the memory section."""
    torch.manual_seed(seed)
    T, D, K = case.tokens, case.n_embd, case.top_k
    cfg = ModelConfig(n_embd=D, n_head=1, n_expert=case.n_expert, top_k=K, capacity_factor=0)
    moe = MoE(cfg).to(device)
    dense = MLP(D, K * cfg.expert_hidden).to(device)
    with torch.no_grad():
        for p in list(moe.parameters()) + list(dense.parameters()):
            p.normal_(0.0, 0.02)
    loop, routing = copy.deepcopy(moe), copy.deepcopy(moe)
    loop.experts.impl = "loop"
    routing.experts = PassThrough()
    x_TD = torch.randn(T, D, device=device, requires_grad=True)
    grad_TD = torch.randn(T, D, device=device)
    autocast = default_autocast(device)

    def moe_step(layer, forward):
        def step():
            layer.zero_grad(set_to_none=True)
            x_TD.grad = None
            with autocast:
                y, r = forward(layer)
            torch.autograd.backward((y.view(T, D), r.aux_loss), (grad_TD.to(y.dtype), None))
        return step

    def dense_step():
        dense.zero_grad(set_to_none=True)
        x_TD.grad = None
        with autocast:
            y = dense(x_TD)
        y.backward(grad_TD.to(y.dtype))

    def router_step():
        moe.zero_grad(set_to_none=True)
        x_TD.grad = None
        r = moe.router(x_TD)
        torch.autograd.backward((r.weights_TK, r.aux_loss), (torch.ones_like(r.weights_TK), None))

    layer_call = lambda layer: layer(x_TD.view(1, T, D))  # noqa: E731
    fns = {"dense": dense_step, "moe": moe_step(moe, layer_call), "loop": moe_step(loop, layer_call),
           "naive": moe_step(moe, lambda layer: naive_moe(layer, x_TD)),
           "routing": moe_step(routing, layer_call), "router": router_step}
    return {n: fns[n] for n in names}, {"moe": moe, "dense": dense, "x": x_TD}


def measure_layers(cases, names, repeats, device, log=print):
    """For every case, the median seconds of each variant in names (timed interleaved)."""
    out = []
    for case in cases:
        fns, _ = layer_variants(case, names, device)
        log(f"  timing E={case.n_expert} T={case.tokens} D={case.n_embd}: {', '.join(names)}")
        out.append((case, time_interleaved(fns, repeats, device=device)))
    return out


def layer_rows(measured):
    """(a): tokens/s of the MoE layer and its dense equivalent, and their ratios."""
    rows = []
    for case, t in measured:
        T = case.tokens
        row = {"E": case.n_expert, "T": T, "D": case.n_embd, "F": ModelConfig(n_embd=case.n_embd).ffn_hidden,
               "dense tok/s": T / t["dense"], "MoE tok/s": T / t["moe"], "MoE / dense": t["dense"] / t["moe"]}
        if "loop" in t:
            row["loop / dense"] = t["dense"] / t["loop"]
        if "naive" in t:
            row["naive tok/s"] = T / t["naive"]
            row["MoE / naive"] = t["naive"] / t["moe"]
        rows.append(row)
    return rows


def routing_rows(measured):
    """(c): routing alone (router + sort + gather + scatter) as a share of the MoE layer's time."""
    rows = []
    for case, t in measured:
        rows.append({"E": case.n_expert, "T": case.tokens, "D": case.n_embd, "layer ms": 1e3 * t["moe"],
                     "routing ms": 1e3 * t["routing"], "routing %": 100 * t["routing"] / t["moe"],
                     "of which router ms": 1e3 * t["router"], "router %": 100 * t["router"] / t["moe"]})
    return rows


def saved_activation_bytes(fn, params):
    """Bytes of the tensors autograd saves for backward while fn() runs (its activations), each
    storage counted once and the parameters left out."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


def memory_rows(cases, device):
    """(d): peak memory of one forward+backward of the MoE layer and of its dense equivalent (the
    weight gradients included: E/K times more for the MoE, it has that many more weights), and the
    activations saved for backward alone."""
    rows = []
    mib = 2.0 ** 20
    for case in cases:
        fns, parts = layer_variants(case, ["moe", "dense"], device)
        peak, saved, grads = {}, {}, {}
        for name, fn in fns.items():
            layer = parts[name]
            fn()  # warm: first-call allocations out of the way
            saved[name] = saved_activation_bytes(fn, layer.parameters())
            layer.zero_grad(set_to_none=True)  # free before measuring, so the peak counts them anew
            parts["x"].grad = None
            peak[name] = peak_memory(fn, device)
            grads[name] = sum(p.grad.numel() * p.grad.element_size() for p in layer.parameters() if p.grad is not None)
        rows.append({"E": case.n_expert, "T": case.tokens, "D": case.n_embd,
                     "MoE peak MiB": peak["moe"] / mib, "dense peak MiB": peak["dense"] / mib,
                     "peak MoE / dense": peak["moe"] / peak["dense"],
                     "MoE saved MiB": saved["moe"] / mib, "dense saved MiB": saved["dense"] / mib,
                     "saved MoE / dense": saved["moe"] / saved["dense"],
                     "MoE weight grads MiB": grads["moe"] / mib, "dense weight grads MiB": grads["dense"] / mib})
    return rows

# -----------------------------------------------------------------------------
# (b): the full training step

# presets: train.py arguments. The experiments' preset is the gate-norm / adaptive-aux experiments'
# CPU model (experiments/gate_norm.py, scale "small"): the quick-start shape with 16 narrower experts.
QUICK_START = os.path.join(REPO, "config", "shakespeare_char.toml")
TRAIN_PRESETS = {
    "default": [QUICK_START],
    "experiments": [QUICK_START, "n_expert=16", "expert_hidden=192", "aux_loss=switch"],
}


def load_model_module_at(rev):
    """model.py and router.py as of git revision rev, imported as a separate module (its
    `from router import ...` resolved to the old router), so two versions time in one process."""
    sources = {}
    for name in ("router", "model"):
        src = subprocess.run(["git", "show", f"{rev}:{name}.py"], cwd=REPO, capture_output=True, text=True)
        if src.returncode:
            raise SystemExit(f"error: git show {rev}:{name}.py failed: {src.stderr.strip()}")
        sources[name] = src.stdout
    current = {k: sys.modules.pop(k) for k in ("model", "router") if k in sys.modules}
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as folder:
        for name, text in sources.items():
            with open(os.path.join(folder, f"{name}.py"), "w") as f:
                f.write(text)
        sys.path.insert(0, folder)
        try:
            return importlib.import_module("model")
        finally:
            sys.path.remove(folder)
            for k in ("model", "router"):
                sys.modules.pop(k, None)
            sys.modules.update(current)


def train_variants(argv, device, baseline=None, compile_model=False, seed=0):
    """name -> callable running one training step of the preset argv on random tokens: "current"
    (this checkout), "current, loop experts" (Experts.impl = "loop"), "baseline" (a GPT class from
    load_model_module_at) and "compiled" (torch.compile of the current model) if asked, and
    "matmul" (the MFU reference). Returns (fns, tokens per step,
    training FLOPs per token, FLOPs of the matmul)."""
    model_cfg, tcfg, _ = train.load_config([*argv, "vocab_size=65"])
    autocast = default_autocast(device)
    gen = torch.Generator().manual_seed(seed)
    x, y = (torch.randint(0, model_cfg.vocab_size, (tcfg.batch_size, model_cfg.block_size), generator=gen).to(device)
            for _ in range(2))

    def step_fn(model, compiled=False):
        optimizer = torch.optim.AdamW(model.optim_groups(tcfg.weight_decay), lr=tcfg.learning_rate,
                                      betas=(tcfg.beta1, tcfg.beta2), fused=device.type == "cuda")
        coeffs = AuxCoefficients(len(model_cfg.moe_layer_ids), tcfg.aux_coef_mode, tcfg.aux_alpha,
                                 tcfg.aux_xi, tcfg.aux_alpha_max, tcfg.aux_beta)
        net = torch.compile(model) if compiled else model

        def step():
            _, stats, loads = train.train_step(net, optimizer, [(x, y)], coeffs, tcfg, autocast)
            train.update_balance_state(model, coeffs, stats, loads, tcfg)
        return step

    torch.manual_seed(seed)
    model = GPT(model_cfg).to(device)
    fns = {"current": step_fn(model)}
    looped = copy.deepcopy(model)
    for m in looped.modules():
        if isinstance(m, Experts):
            m.impl = "loop"
    fns["current, loop experts"] = step_fn(looped)
    if baseline is not None:
        known = {f.name for f in fields(baseline.ModelConfig)}
        old = baseline.GPT(baseline.ModelConfig(**{k: v for k, v in asdict(model_cfg).items() if k in known}))
        old.to(device)
        old.load_state_dict(model.state_dict())
        fns["baseline"] = step_fn(old)
    if compile_model:
        fns["compiled"] = step_fn(copy.deepcopy(model), compiled=True)
    n = 4096 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
            for _ in range(2))
    fns["matmul"] = lambda: a @ b
    return fns, tcfg.batch_size * model_cfg.block_size, model.flops_per_token(), 2 * n ** 3


def train_rows(presets, repeats, device, baseline=None, compile_model=False, log=print):
    """(b): tokens/s and MFU of a training step, per preset and per code variant."""
    rows = []
    for name, argv in presets.items():
        fns, tokens, flops_per_token, matmul_flops = train_variants(argv, device, baseline, compile_model)
        log(f"  timing preset {name}: {', '.join(fns)}")
        # compiling takes minutes, and recompiles for new token counts per expert: warm up longer
        t = time_interleaved(fns, repeats, warmup=8 if compile_model else 2, device=device)
        peak = matmul_flops / t.pop("matmul")
        for variant, seconds in t.items():
            tok_s = tokens / seconds
            rows.append({"preset": name, "code": variant, "tokens/step": tokens, "step ms": 1e3 * seconds,
                         "tok/s": tok_s, "MFU %": 100 * tok_s * flops_per_token / peak,
                         "matmul GFLOP/s": peak / 1e9})
    return rows

# -----------------------------------------------------------------------------
# printing

def format_cell(v):
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"
    return str(v)


def markdown_table(rows):
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    for r in rows[1:]:
        cols += [c for c in r if c not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(format_cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def layer_cases(quick):
    """The issue's grid: E in {8, 16, 64}, T in {2048, 8192}, D in {256, 512}; quick: T=1024, D=128."""
    if quick:
        return [LayerCase(E, 1024, 128) for E in (8, 16, 64)]
    return [LayerCase(E, T, D) for T in (2048, 8192) for D in (256, 512) for E in (8, 16, 64)]


def run_sections(args, device):
    says = lambda *a: print(*a, flush=True)  # noqa: E731
    repeats = args.repeats or (3 if args.quick else 5)
    cases = layer_cases(args.quick)
    if args.layer or args.routing:
        names = ["dense", "moe"] + (["loop", "naive"] if args.layer else []) + (["routing", "router"] if args.routing else [])
        says(f"\nmeasuring the MoE layer ({repeats} interleaved rounds after one warm-up) ...")
        measured = measure_layers(cases, names, repeats, device, log=says)
        if args.layer:
            says("\n(a) MoE layer forward+backward vs its dense equivalent (SwiGLU, hidden K*F), top-2, dropless; "
                 "ratios are throughput ratios (higher is better for the MoE)\n")
            says(markdown_table(layer_rows(measured)))
        if args.routing:
            says("\n(c) routing alone (router + sort + gather + scatter, fwd+bwd) as a share of the MoE layer's time\n")
            says(markdown_table(routing_rows(measured)))
    if args.train:
        baseline = load_model_module_at(args.baseline_rev) if args.baseline_rev else None
        train_repeats = repeats if args.quick else 2 * repeats  # steps are short: more rounds, same time
        says(f"\nmeasuring training steps ({train_repeats} interleaved rounds after {8 if args.compile else 2} warm-ups) ...")
        rows = train_rows(TRAIN_PRESETS, train_repeats, device, baseline, args.compile, log=says)
        for r in rows:
            if r["code"] == "baseline":
                r["code"] = f"baseline ({args.baseline_rev})"
        says("\n(b) full training step (train.train_step + balance update), random tokens; MFU on active "
             "parameters against the matmul rate measured in the same rounds\n")
        says(markdown_table(rows))
    if args.memory:
        says("\n(d) memory of one forward+backward: peak (activations and weight gradients), and the "
             "activations saved for backward alone\n")
        says(markdown_table(memory_rows(cases, device)))

# -----------------------------------------------------------------------------
# expert parallelism: dispatch + combine overhead under gloo

@dataclass
class EPBenchConfig:
    tokens: int = 4096            # tokens per rank (one routing group)
    n_embd: int = 256
    expert_hidden: int = 512
    n_expert: int = 8
    top_k: int = 2
    capacity_factor: float = 1.25
    iters: int = 10               # timed iterations per variant (after warmup)
    warmup: int = 3
    world: int = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ep_bench_rank(rank, cfg, port, queue):
    import expert_parallel as ep
    from model import MoE, ModelConfig
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=cfg.world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        groups = ep.build_groups(cfg.world)
        torch.manual_seed(0)
        mcfg = ModelConfig(n_embd=cfg.n_embd, n_head=4, expert_hidden=cfg.expert_hidden, n_expert=cfg.n_expert,
                           top_k=cfg.top_k, capacity_factor=cfg.capacity_factor)
        local = MoE(mcfg)
        for p in local.parameters():
            torch.nn.init.normal_(p, std=0.02)
        sharded = copy.deepcopy(local)
        sharded.experts = ep.ParallelExperts(cfg.n_expert, cfg.n_embd, cfg.expert_hidden, groups)
        lo, hi = groups.expert_range(cfg.n_expert)
        with torch.no_grad():
            for name in ("w1", "w3", "w2"):
                getattr(sharded.experts, name).copy_(getattr(local.experts, name)[lo:hi])
        x = torch.randn(1, cfg.tokens, cfg.n_embd, generator=torch.Generator().manual_seed(rank))

        def timed(fn):
            dist.barrier()  # both ranks start together: the exchanges then time transfers, not skew
            t0 = time.perf_counter()
            out = fn()
            return time.perf_counter() - t0, out

        def layer_fwd_bwd(layer):
            xi = x.clone().requires_grad_()
            y, r = layer(xi)
            (y.square().mean() + r.aux_loss).backward()
            layer.zero_grad(set_to_none=True)
            return r

        def exchange_fwd_bwd(x_ND, counts_E):
            # dispatch + combine alone, identity experts: the count exchange, the token all-to-all and
            # its reverse, the (source, expert) sort and unsort, and both exchanges again in backward
            xi = x_ND.clone().requires_grad_()
            x_MD, plan = ep.dispatch(xi, counts_E, groups.ep_group)
            ep.combine(x_MD, plan).square().mean().backward()
            return x_MD.shape[0]

        with torch.no_grad():  # the slots this rank routes, as MoE.forward gathers them
            r = local.router(x.view(-1, cfg.n_embd))
            x_ND = x.view(-1, cfg.n_embd)[r.slots_N % cfg.tokens]
        variants = {"local": lambda: layer_fwd_bwd(local), "ep": lambda: layer_fwd_bwd(sharded),
                    "exchange": lambda: exchange_fwd_bwd(x_ND, r.counts_E)}
        times, received = {k: [] for k in variants}, 0
        for i in range(cfg.warmup + cfg.iters):
            for name, fn in variants.items():  # interleaved: machine load hits every variant alike
                dt, out = timed(fn)
                if i >= cfg.warmup:
                    times[name].append(dt)
                if name == "exchange":
                    received = out
        kept = int(r.counts_E.sum())
        sent = int(r.counts_E.sum() - r.counts_E.view(cfg.world, -1)[rank].sum())  # slots for the other ranks
        queue.put((rank, {k: statistics.median(v) for k, v in times.items()}, kept, sent, received))
    finally:
        dist.destroy_process_group()


def bench_ep(cfg: EPBenchConfig):
    """Spawn cfg.world gloo processes; returns the slowest rank's median seconds per fwd+bwd of the
    layer with local experts ("local_s"), with sharded experts ("ep_s"), and of dispatch + combine
    alone ("exchange_s"), and the slot counts."""
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_ep_bench_rank, args=(r, cfg, port, queue)) for r in range(cfg.world)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=600) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    slowest = {k: max(r[1][k] for r in results) for k in results[0][1]}
    return {"local_s": slowest["local"], "ep_s": slowest["ep"], "exchange_s": slowest["exchange"],
            "kept_slots_per_rank": [r[2] for r in sorted(results)],
            "slots_sent_to_other_ranks": [r[3] for r in sorted(results)],
            "rows_for_local_experts_ep": [r[4] for r in sorted(results)]}


def print_ep(cfg, res):
    sent = max(res["slots_sent_to_other_ranks"])
    mib = 4 * sent * cfg.n_embd * 4 / 2**20  # 4 exchanges of float32 rows: dispatch, combine, and their backward
    print(f"MoE layer fwd+bwd on {cfg.world} gloo processes x 1 CPU thread, float32: {cfg.tokens} tokens per rank, "
          f"D={cfg.n_embd}, F={cfg.expert_hidden}, E={cfg.n_expert}, top-{cfg.top_k}, capacity factor "
          f"{cfg.capacity_factor}; median of {cfg.iters}, slowest rank")
    print(f"  {'layer, all experts local (no communication)':<46}: {1e3 * res['local_s']:8.1f} ms")
    print(f"  {f'layer, experts sharded (ep_size={cfg.world})':<46}: {1e3 * res['ep_s']:8.1f} ms")
    print(f"  {'dispatch + combine alone (fwd+bwd)':<46}: {1e3 * res['exchange_s']:8.1f} ms "
          f"= {100 * res['exchange_s'] / res['local_s']:.0f} % of the local layer")
    print(f"  rows sent to other ranks: {sent} of {max(res['kept_slots_per_rank'])} kept slots, "
          f"{mib:.1f} MiB per rank per fwd+bwd")
    print(f"  rows each rank's experts process: {res['kept_slots_per_rank']} local, "
          f"{res['rows_for_local_experts_ep']} sharded (the busier rank sets the pace)")


# -----------------------------------------------------------------------------
# command line

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", action="store_true", help="(a) MoE layer vs dense equivalent and naive reference")
    parser.add_argument("--train", action="store_true", help="(b) training step tokens/s and MFU")
    parser.add_argument("--routing", action="store_true", help="(c) routing overhead share of the layer")
    parser.add_argument("--memory", action="store_true", help="(d) peak memory, MoE layer vs dense")
    parser.add_argument("--quick", action="store_true", help="small sizes: (a)-(d) in under a minute")
    parser.add_argument("--repeats", type=int, default=0, help="timed rounds per case (default 5, quick 3; (b) twice that)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--baseline-rev", default=None,
                        help="(b): also time model.py and router.py of this git revision, in the same rounds")
    parser.add_argument("--compile", action="store_true", help="(b): also time the torch.compile'd model")
    parser.add_argument("--ep", action="store_true", help="expert-parallel dispatch + combine overhead (gloo)")
    defaults = asdict(EPBenchConfig())
    for name, value in defaults.items():
        parser.add_argument(f"--{name}", type=type(value), default=value, help="--ep setting")
    args = parser.parse_args(argv)
    sections = args.layer or args.train or args.routing or args.memory
    if not sections and not args.ep:
        args.layer = args.train = args.routing = args.memory = sections = True
    if args.threads < 0 or args.repeats < 0:
        parser.error("--threads and --repeats must be >= 0")

    if sections:
        if args.threads:
            torch.set_num_threads(args.threads)
        name = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
        device = torch.device(name)
        what = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        print(f"bench.py: torch {torch.__version__}, {what}, "
              f"{'bfloat16 autocast' if device.type == 'cuda' else 'float32'}; "
              f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
        t0 = time.time()
        run_sections(args, device)
        print(f"\n({time.time() - t0:.0f} s; load average {os.getloadavg()[0]:.1f} at the end)", flush=True)
    if args.ep:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        cfg = EPBenchConfig(**{k: getattr(args, k) for k in defaults})
        print_ep(cfg, bench_ep(cfg))


if __name__ == "__main__":
    main()
