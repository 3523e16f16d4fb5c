"""
Throughput benchmarks: how close the MoE layer and the training step come to the dense-equivalent
limit (an MoE layer does the arithmetic of K experts per token; routing, sorting, gathering and
scattering are overhead), how it compares with the implementation most users would otherwise pick
(transformers' Mixtral block), what expert parallelism's exchanges cost, and a one-command GPU check.
Each section is a function that returns table rows, and a command-line flag; with no flag, sections
(a)-(e) run in one process. Progress goes to stderr and the tables, markdown, to stdout at the end
(README.md's efficiency section quotes them):

    python bench.py                       # (a)-(e) at full size: ~12 min on 2 idle cores, far more busy
    python bench.py --quick               # the same tables at small sizes: ~20 s idle, ~1-2 min busy
    python bench.py --layer --routing     # only sections (a) and (c)
    python bench.py --peer                # (e): ours / dense and ours / transformers at E = 8, 16, 64
    python bench.py --train --baseline-rev 5c9ea8f   # (b), also timing model.py + router.py of a commit
    python bench.py --train --compile     # (b), also the torch.compile'd model (a first compile: minutes)
    python bench.py --threads 1           # torch threads (default: torch's choice, one per core)
    python bench.py --ep                  # expert parallelism's dispatch + combine (gloo, 2 processes)
    python bench.py --ep --tokens=8192 --n_embd=512 --expert_hidden=1024
    python bench.py --gpu                 # the GPU check (<= 8 min on one H200); on CPU a dry run

(a) --layer    one MoE layer's forward+backward tokens/s against a dense SwiGLU FFN with the same
               active FLOPs (hidden = K x expert hidden), for the default experts (grouped_mm where it
               runs), the per-expert loop (Experts.impl = "loop"), and a naive reference (a boolean mask
               over all tokens per expert, weights indexed per expert)
(b) --train    the full training step of train.py (train.build, train.train_step, the balance update)
               in tokens/s and MFU on active parameters (PaLM formula, model.flops_per_token), for the
               default preset and the experiments' preset. MFU against the datasheet bf16 peak of the
               GPU (DATASHEET_BF16_TFLOPS, by device name) and, beside it, against a large matmul timed
               in the same rounds (the only reference a shared CPU has)
(c) --routing  routing alone (router + sort + gather + scatter, forward+backward: the layer with
               pass-through experts) as a share of the layer's time, and the router's part of it
(d) --memory   peak memory of the MoE layer's forward+backward against the dense equivalent, and the
               activations saved for backward alone (weight gradients are E/K times the dense ones)
(e) --peer     ours against Hugging Face transformers' MixtralSparseMoeBlock, eager and grouped_mm
               experts, and the dense equivalent, with identical weights: first the outputs and input
               gradients must agree (1e-4 relative, dropless, float32), then all are timed round-robin,
               beside the experts' nine matmuls alone (the floor under any implementation)

Method: the variants of one case alternate round-robin (the order rotated every round) and medians
are reported, so load from other processes slows them all alike; every ratio is between numbers of
one run. The layer benchmarks route dropless (capacity_factor = 0), so the MoE layer does exactly
K experts' arithmetic per token, like its dense equivalent. CPU runs float32; CUDA bfloat16 autocast.
A busy machine hurts the MoE layer more than the dense one: with 2 threads on 2 oversubscribed cores
every parallel op waits for a descheduled thread, and the MoE layer runs many more ops (a matmul
per expert and weight, where the dense layer has one); --threads 1 is then fairer, and faster.

--ep times one MoE layer's forward + backward on each of 2 gloo processes (one CPU thread each), on
the same tokens: with every expert local (no communication: the data-parallel layer), with the experts
sharded over the 2 ranks (expert_parallel.shard_experts: count exchange, token all-to-all, local
experts, the reverse all-to-all, and both exchanges again in backward), and dispatch + combine alone
on the layer's routed rows (identity experts). Then it profiles the sharded layer and splits dispatch +
combine into its phases (expert_parallel.py's record_function labels): count exchange, split-size
sync, token exchanges forward and backward, permutations. Both layers do the same expert FLOPs in
expectation, but not in the same shape: the sharded rank runs half the experts on twice the rows
each. The variants alternate every iteration so a busy machine slows all alike; the slower rank's
median is reported (a step waits for it).

--gpu: bf16 experts (grouped_mm on sm90 / sm100, else the loop) against the fp32 loop, relative error
within GPU_CHECK_TOL; then a few hundred train.train_step steps of the full-scale gate-normalization
model (experiments/gate_norm.py, 2.5B parameters, ep_size=1) on random tokens, compile off and on:
tokens/s, MFU on active parameters, peak memory. Without a GPU it runs at toy sizes on the CPU (the
test suite's dry run), and says so.
"""

import argparse
import copy
import datetime
import importlib
import os
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

import expert_parallel as ep
import tensor_parallel as tp
import train
from config import load_config
from model import MLP, Experts, ModelConfig, MoE, grouped_mm_dtype, padded_vocab_size

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
    n_expert: int  # E
    tokens: int  # T
    n_embd: int  # D; the expert hidden F is the default 8/3 D rounded up to 64
    top_k: int = 2  # K


class PassThrough(nn.Module):
    """Experts that return their input: the layer is then routing alone (section c)."""

    def compute_dtype(self, x_ND):
        return x_ND.dtype

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
    fns = {
        "dense": dense_step,
        "moe": moe_step(moe, layer_call),
        "loop": moe_step(loop, layer_call),
        "naive": moe_step(moe, lambda layer: naive_moe(layer, x_TD)),
        "routing": moe_step(routing, layer_call),
        "router": router_step,
    }
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
        row = {
            "E": case.n_expert,
            "T": T,
            "D": case.n_embd,
            "F": ModelConfig(n_embd=case.n_embd).ffn_hidden,
            "dense tok/s": T / t["dense"],
            "MoE tok/s": T / t["moe"],
            "MoE / dense": t["dense"] / t["moe"],
        }
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
        rows.append(
            {
                "E": case.n_expert,
                "T": case.tokens,
                "D": case.n_embd,
                "layer ms": 1e3 * t["moe"],
                "routing ms": 1e3 * t["routing"],
                "routing %": 100 * t["routing"] / t["moe"],
                "of which router ms": 1e3 * t["router"],
                "router %": 100 * t["router"] / t["moe"],
            }
        )
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
    mib = 2.0**20
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
        rows.append(
            {
                "E": case.n_expert,
                "T": case.tokens,
                "D": case.n_embd,
                "MoE peak MiB": peak["moe"] / mib,
                "dense peak MiB": peak["dense"] / mib,
                "peak MoE / dense": peak["moe"] / peak["dense"],
                "MoE saved MiB": saved["moe"] / mib,
                "dense saved MiB": saved["dense"] / mib,
                "saved MoE / dense": saved["moe"] / saved["dense"],
                "MoE weight grads MiB": grads["moe"] / mib,
                "dense weight grads MiB": grads["dense"] / mib,
            }
        )
    return rows


# -----------------------------------------------------------------------------
# (e): against the peer, Hugging Face transformers' Mixtral MoE block, with identical weights

PEER_IMPLS = ("eager", "grouped_mm")  # transformers' per-expert loop and its grouped_mm experts


def peer_blocks(moe):
    """transformers' MixtralSparseMoeBlock (eager and grouped_mm experts) holding moe's weights: the
    gate is our router's weight, gate_up_proj is [w1; w3] stacked per expert, down_proj is w2. It
    renormalises the top-k softmax probabilities (eq. 2) and has no gating logit normalization, so
    moe must be built with gate_norm=False; it has no capacity, so moe must be dropless."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    E, F_, D = moe.experts.w1.shape
    blocks = {}
    for impl in PEER_IMPLS:
        cfg = MixtralConfig(
            hidden_size=D, intermediate_size=F_, num_local_experts=E, num_experts_per_tok=moe.router.top_k
        )
        cfg._experts_implementation = impl
        block = MixtralSparseMoeBlock(cfg).to(moe.experts.w1.device)
        with torch.no_grad():
            block.gate.weight.copy_(moe.router.weight)
            block.experts.gate_up_proj.copy_(torch.cat([moe.experts.w1, moe.experts.w3], dim=1))
            block.experts.down_proj.copy_(moe.experts.w2)
        blocks[impl] = block
    return blocks


def peer_variants(case, device, seed=0):
    """name -> one forward+backward of: "dense" (the equal-FLOPs SwiGLU), "ours" (model.MoE, default
    experts), "ours, loop" and transformers' two implementations, on the same input and output
    gradient, in float32, dropless and without gate normalization (the function the peer computes).
    Raises if the outputs or input gradients differ by more than 1e-4 relative: a race between
    different functions would mean nothing."""
    torch.manual_seed(seed)
    T, D, K = case.tokens, case.n_embd, case.top_k
    cfg = ModelConfig(n_embd=D, n_head=1, n_expert=case.n_expert, top_k=K, capacity_factor=0, gate_norm=False)
    moe = MoE(cfg).to(device)
    dense = MLP(D, K * cfg.expert_hidden).to(device)
    with torch.no_grad():
        for p in list(moe.parameters()) + list(dense.parameters()):
            p.normal_(0.0, 0.02)
    loop = copy.deepcopy(moe)
    loop.experts.impl = "loop"
    layers = {"dense": dense, "ours": moe, "ours, loop": loop}
    layers.update({f"transformers {k}": b for k, b in peer_blocks(moe).items()})
    x = torch.randn(1, T, D, device=device, requires_grad=True)
    grad = torch.randn(1, T, D, device=device)

    def step(layer):
        def run():
            layer.zero_grad(set_to_none=True)
            x.grad = None
            y = layer(x)
            y = y[0] if isinstance(y, tuple) else y  # ours returns (y, router output)
            y.backward(grad)
            return y.detach(), x.grad

        return run

    fns = {name: step(layer) for name, layer in layers.items()}
    fns["expert matmuls"] = expert_matmuls(moe, x.view(T, D))
    y_ref, g_ref = fns["ours"]()
    for name in layers:
        if name != "dense":
            for what, a, b in zip(("output", "input gradient"), fns[name](), (y_ref, g_ref)):
                err = ((a - b).norm() / b.norm()).item()
                if not err <= 1e-4:
                    raise RuntimeError(
                        f"{name} disagrees with ours at E={case.n_expert}: {what} relative error {err:.1e}"
                    )
    return fns


def expert_matmuls(moe, x_TD):
    """The nine matmuls of the experts' forward and backward alone, per expert on its routed rows,
    with no routing, gathers, elementwise ops or autograd: the floor under any implementation of the
    layer, and a reading of how much of each one's time is overhead."""
    with torch.no_grad():
        counts = moe.router(x_TD).counts_E.tolist()
    ex = moe.experts
    F_ = ex.w1.shape[1]
    D, dev = x_TD.shape[1], x_TD.device
    rows = [[torch.randn(n, width, device=dev) for width in (D, F_, D)] for n in counts]

    @torch.no_grad()
    def run():
        for (x, h, dy), w1, w3, w2 in zip(rows, ex.w1, ex.w3, ex.w2):
            x @ w1.t(), x @ w3.t(), h @ w2.t()  # forward: a, b, y
            dy.t() @ h, dy @ w2  # backward: w2's gradient, dh
            h.t() @ x, h.t() @ x, torch.addmm(h @ w1, h, w3)  # w1's and w3's gradients, dx

    return run


def peer_rows(cases, repeats, device, log=print):
    """(e): ours against the dense equivalent and against transformers' two implementations."""
    rows = []
    for case in cases:
        fns = peer_variants(case, device)
        log(f"  outputs agree (1e-4); timing E={case.n_expert} T={case.tokens} D={case.n_embd}: {', '.join(fns)}")
        t = time_interleaved(fns, repeats, device=device)
        faster_peer = min(t[f"transformers {k}"] for k in PEER_IMPLS)
        row = {"E": case.n_expert, "T": case.tokens, "D": case.n_embd, "F": ModelConfig(n_embd=case.n_embd).ffn_hidden}
        row.update({f"{name} ms": 1e3 * s for name, s in t.items()})
        row.update({"ours / dense": t["dense"] / t["ours"], "loop / dense": t["dense"] / t["ours, loop"]})
        row.update({f"ours / transformers {k}": t[f"transformers {k}"] / t["ours"] for k in PEER_IMPLS})
        row["ours / faster transformers"] = faster_peer / t["ours"]
        row["matmuls / ours"] = t["expert matmuls"] / t["ours"]
        row["matmuls / faster transformers"] = t["expert matmuls"] / faster_peer
        rows.append(row)
    return rows


def peer_cases(quick):
    """The issue's comparison: E in {8, 16, 64}, T = 8192, D = 512 (F = 1408), top-2; quick: T=512, D=64."""
    return [LayerCase(E, 512 if quick else 8192, 64 if quick else 512) for E in (8, 16, 64)]


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


def train_setup(argv, device):
    """(model_cfg, tcfg, model, optimizer, coeffs) of train.py's preset argv, built by train.build as a
    single-process run builds them."""
    (model_cfg, tcfg), _ = load_config(list(argv), [ModelConfig, train.TrainConfig])
    torch.manual_seed(tcfg.seed)
    model, optimizer, coeffs = train.build(model_cfg, tcfg, device, tp.TPGroups.local())
    return model_cfg, tcfg, model, optimizer, coeffs


def random_batch(model_cfg, tcfg, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (tcfg.batch_size, model_cfg.block_size)
    return [tuple(torch.randint(0, model_cfg.vocab_size, shape, generator=gen).to(device) for _ in range(2))]


def step_fn(model, optimizer, coeffs, tcfg, batches, autocast, compiled=False):
    """One training step exactly as train.py's loop takes it: train.train_step (forward, balance loss,
    backward, clip, AdamW), then the balance update."""
    net = torch.compile(model) if compiled else model
    groups = tp.TPGroups.local()

    def step():
        res = train.train_step(net, optimizer, batches, coeffs, tcfg, autocast, groups)
        train.update_balance_state(model, coeffs, res.stats, res.loads, tcfg)

    return step


def matmul_fn(device):
    """A large matmul in the compute dtype (the measured-peak reference) and its FLOPs."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = (
        torch.randn(n, n, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        for _ in range(2)
    )
    return lambda: a @ b, 2 * n**3


def train_variants(argv, device, baseline=None, compile_model=False):
    """name -> callable running one training step of the preset argv on random tokens: "current"
    (this checkout), "current, loop experts" (Experts.impl = "loop"), "baseline" (a GPT class from
    load_model_module_at) and "compiled" (torch.compile of the current model) if asked, and
    "matmul" (the MFU reference). Returns (fns, tokens per step, training FLOPs per token, FLOPs of
    the matmul)."""
    argv = [*argv, "vocab_size=65"]
    autocast = default_autocast(device)
    model_cfg, tcfg, model, optimizer, coeffs = train_setup(argv, device)
    batches = random_batch(model_cfg, tcfg, device)
    fns = {"current": step_fn(model, optimizer, coeffs, tcfg, batches, autocast)}
    _, _, looped, optimizer, coeffs = train_setup(argv, device)
    for m in looped.modules():
        if isinstance(m, Experts):
            m.impl = "loop"
    fns["current, loop experts"] = step_fn(looped, optimizer, coeffs, tcfg, batches, autocast)
    if baseline is not None:
        known = {f.name for f in fields(baseline.ModelConfig)}
        old = baseline.GPT(baseline.ModelConfig(**{k: v for k, v in asdict(model_cfg).items() if k in known}))
        old.to(device).load_state_dict(model.state_dict())
        optimizer = torch.optim.AdamW(old.optim_groups(tcfg.weight_decay), lr=tcfg.learning_rate)
        fns["baseline"] = step_fn(old, optimizer, coeffs, tcfg, batches, autocast)
    if compile_model:
        _, _, plain, optimizer, coeffs = train_setup(argv, device)
        fns["compiled"] = step_fn(plain, optimizer, coeffs, tcfg, batches, autocast, compiled=True)
    fns["matmul"], matmul_flops = matmul_fn(device)
    return fns, tcfg.batch_size * model_cfg.block_size, model.flops_per_token(), matmul_flops


def train_rows(presets, repeats, device, baseline=None, compile_model=False, log=print):
    """(b): tokens/s and MFU of a training step, per preset and per code variant."""
    rows = []
    for name, argv in presets.items():
        fns, tokens, flops_per_token, matmul_flops = train_variants(argv, device, baseline, compile_model)
        log(f"  timing preset {name}: {', '.join(fns)}")
        # compiling takes minutes, and recompiles for new token counts per expert: warm up longer
        t = time_interleaved(fns, repeats, warmup=8 if compile_model else 2, device=device)
        measured = matmul_flops / t.pop("matmul")
        datasheet = datasheet_peak_flops(device)
        for variant, seconds in t.items():
            tok_s = tokens / seconds
            row = {"preset": name, "code": variant, "tokens/step": tokens, "step ms": 1e3 * seconds, "tok/s": tok_s}
            if datasheet:
                row["MFU %"] = 100 * tok_s * flops_per_token / datasheet
            row["MFU vs matmul %"] = 100 * tok_s * flops_per_token / measured
            row["matmul GFLOP/s"] = measured / 1e9
            rows.append(row)
    return rows


# Dense (not 2:4 sparse) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s, matched against
# torch.cuda.get_device_name in this order (the first substring that occurs wins). MFU is quoted against
# these, as papers do; the measured matmul rate beside it reads 1.3-1.6x higher on these GPUs.
DATASHEET_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("GH200", 989.4),
    ("H100", 989.4),
    ("H200", 989.4),
    ("H800", 989.4),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
    ("RTX A6000", 154.8),
)


def datasheet_peak_flops(device, name=None):
    """The datasheet bf16 peak of a CUDA device in FLOP/s, or None (a CPU, or a GPU not in the table)."""
    if name is None:
        if device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(device)
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


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
    """Measure the chosen sections, logging progress to stderr; returns [(title, rows)], printed together
    at the end, so no progress line or profiler message lands inside a table."""
    says = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    repeats = args.repeats or (3 if args.quick else 5)
    cases = layer_cases(args.quick)
    tables = []
    if args.layer or args.routing:
        names = ["dense", "moe"] + (["loop", "naive"] if args.layer else [])
        names += ["routing", "router"] if args.routing else []
        says(f"measuring the MoE layer ({repeats} interleaved rounds after one warm-up) ...")
        measured = measure_layers(cases, names, repeats, device, log=says)
        if args.layer:
            tables.append(
                (
                    "(a) MoE layer forward+backward vs its dense equivalent (SwiGLU, hidden K*F), top-2, "
                    "dropless; ratios are throughput ratios (higher is better for the MoE)",
                    layer_rows(measured),
                )
            )
        if args.routing:
            tables.append(
                (
                    "(c) routing alone (router + sort + gather + scatter, fwd+bwd) as a share of the MoE layer's time",
                    routing_rows(measured),
                )
            )
    if args.train:
        baseline = load_model_module_at(args.baseline_rev) if args.baseline_rev else None
        train_repeats = repeats if args.quick else 2 * repeats  # steps are short: more rounds, same time
        says(
            f"measuring training steps ({train_repeats} interleaved rounds after "
            f"{8 if args.compile else 2} warm-ups) ..."
        )
        rows = train_rows(TRAIN_PRESETS, train_repeats, device, baseline, args.compile, log=says)
        for r in rows:
            if r["code"] == "baseline":
                r["code"] = f"baseline ({args.baseline_rev})"
        tables.append(
            (
                "(b) full training step (train.train_step + balance update), random tokens; MFU on active "
                "parameters against the datasheet bf16 peak (GPUs) and against the matmul rate measured in "
                "the same rounds",
                rows,
            )
        )
    if args.memory:
        says("measuring memory ...")
        tables.append(
            (
                "(d) memory of one forward+backward: peak (activations and weight gradients), and the "
                "activations saved for backward alone",
                memory_rows(cases, device),
            )
        )
    if args.peer:
        says(f"measuring against transformers' MixtralSparseMoeBlock ({repeats} interleaved rounds) ...")
        tables.append(
            (
                "(e) ours against transformers' MixtralSparseMoeBlock (eager and grouped_mm experts) with "
                "identical weights, and the dense equivalent: forward+backward, dropless, no gate "
                "normalization; ratios are throughput ratios (> 1: ours is faster)",
                peer_rows(peer_cases(args.quick), repeats, device, log=says),
            )
        )
    return tables


def print_tables(tables):
    for title, rows in tables:
        print(f"\n{title}\n\n{markdown_table(rows)}", flush=True)


# -----------------------------------------------------------------------------
# expert parallelism: dispatch + combine overhead under gloo


@dataclass
class EPBenchConfig:
    tokens: int = 4096  # tokens per rank (one routing group)
    n_embd: int = 256
    expert_hidden: int = 512
    n_expert: int = 8
    top_k: int = 2
    capacity_factor: float = 1.25
    iters: int = 10  # timed iterations per variant (after warmup)
    warmup: int = 3
    world: int = 2


# where dispatch + combine spend their time: expert_parallel.py's record_function labels (forward) and
# the autograd nodes of its exchange and permutation (backward), as the profiler names them
EP_PHASES = {
    "count exchange": ("ep.counts",),
    "split sizes (host sync)": ("ep.split_sizes",),
    "token exchange, forward": ("ep.tokens",),
    "token exchange, backward": ("autograd::engine::evaluate_function: AllToAllBackward",),
    "permutation, fwd+bwd": ("ep.permute", "autograd::engine::evaluate_function: _PermuteRowsBackward"),
}


def ep_phase_seconds(fn, iters):
    """Seconds per call of fn() spent in each phase of EP_PHASES (the profiler's CPU totals, waiting for
    the peer included: that is what the step pays)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
    total = {e.key: e.cpu_time_total for e in prof.key_averages()}
    return {phase: sum(total.get(k, 0.0) for k in keys) / 1e6 / iters for phase, keys in EP_PHASES.items()}


def _ep_bench_rank(rank, cfg, port, queue):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=cfg.world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        groups = ep.build_groups(cfg.world)
        torch.manual_seed(0)
        mcfg = ModelConfig(
            n_embd=cfg.n_embd,
            n_head=4,
            expert_hidden=cfg.expert_hidden,
            n_expert=cfg.n_expert,
            top_k=cfg.top_k,
            capacity_factor=cfg.capacity_factor,
        )
        local = MoE(mcfg)
        for p in local.parameters():
            torch.nn.init.normal_(p, std=0.02)
        sharded = ep.shard_experts(copy.deepcopy(local), groups)
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

        def exchange_fwd_bwd(x_ND, counts_E, grad_ND):
            # dispatch + combine alone, identity experts, a fixed output gradient (a loss would add its
            # own passes over the rows): the count exchange, the token all-to-all and its reverse, the
            # permutations, and both exchanges again in backward
            xi = x_ND.detach().requires_grad_()
            x_MD, plan = ep.dispatch(xi, counts_E, groups.ep_group)
            ep.combine(x_MD, plan).backward(grad_ND)
            return x_MD.shape[0]

        with torch.no_grad():  # the slots this rank routes, as MoE.forward gathers them
            r = local.router(x.view(-1, cfg.n_embd))
            x_ND = x.view(-1, cfg.n_embd)[r.slots_N % cfg.tokens]
        grad_ND = torch.randn_like(x_ND)
        variants = {
            "local": lambda: layer_fwd_bwd(local),
            "ep": lambda: layer_fwd_bwd(sharded),
            "exchange": lambda: exchange_fwd_bwd(x_ND, r.counts_E, grad_ND),
        }
        times, received = {k: [] for k in variants}, 0
        for i in range(cfg.warmup + cfg.iters):
            for name, fn in variants.items():  # interleaved: machine load hits every variant alike
                dt, out = timed(fn)
                if i >= cfg.warmup:
                    times[name].append(dt)
                if name == "exchange":
                    received = out
        dist.barrier()
        phases = ep_phase_seconds(lambda: layer_fwd_bwd(sharded), max(1, cfg.iters // 2))
        kept = int(r.counts_E.sum())
        sent = int(r.counts_E.sum() - r.counts_E.view(cfg.world, -1)[rank].sum())  # slots for the other ranks
        queue.put((rank, {k: statistics.median(v) for k, v in times.items()}, kept, sent, received, phases))
    finally:
        dist.destroy_process_group()


def bench_ep(cfg: EPBenchConfig):
    """Spawn cfg.world gloo processes; returns the slowest rank's median seconds per fwd+bwd of the
    layer with local experts ("local_s"), with sharded experts ("ep_s"), and of dispatch + combine
    alone ("exchange_s"), and the slot counts."""
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), ep.free_port()
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
    return {
        "local_s": slowest["local"],
        "ep_s": slowest["ep"],
        "exchange_s": slowest["exchange"],
        # a collective's last arrival waits for nobody: the smaller of the ranks' times is about
        # the exchange itself, the larger one adds waiting for the slower rank
        "phases_min_s": {k: min(r[5][k] for r in results) for k in EP_PHASES},
        "phases_max_s": {k: max(r[5][k] for r in results) for k in EP_PHASES},
        "kept_slots_per_rank": [r[2] for r in sorted(results)],
        "slots_sent_to_other_ranks": [r[3] for r in sorted(results)],
        "rows_for_local_experts_ep": [r[4] for r in sorted(results)],
    }


def print_ep(cfg, res):
    sent = max(res["slots_sent_to_other_ranks"])
    mib = 4 * sent * cfg.n_embd * 4 / 2**20  # 4 exchanges of float32 rows: dispatch, combine, and their backward
    print(
        f"MoE layer fwd+bwd on {cfg.world} gloo processes x 1 CPU thread, float32: {cfg.tokens} tokens per rank, "
        f"D={cfg.n_embd}, F={cfg.expert_hidden}, E={cfg.n_expert}, top-{cfg.top_k}, capacity factor "
        f"{cfg.capacity_factor}; median of {cfg.iters}, slowest rank"
    )
    print(f"  {'layer, all experts local (no communication)':<46}: {1e3 * res['local_s']:8.1f} ms")
    print(f"  {f'layer, experts sharded (ep_size={cfg.world})':<46}: {1e3 * res['ep_s']:8.1f} ms")
    print(
        f"  {'dispatch + combine alone (fwd+bwd)':<46}: {1e3 * res['exchange_s']:8.1f} ms "
        f"= {100 * res['exchange_s'] / res['ep_s']:.0f} % of the sharded layer "
        f"({100 * res['exchange_s'] / res['local_s']:.0f} % of the local one)"
    )
    low, high = res["phases_min_s"], res["phases_max_s"]
    print(
        f"  inside the sharded layer (profiled): dispatch + combine {1e3 * sum(low.values()):.1f} ms on the rank "
        f"that waits least ({100 * sum(low.values()) / res['ep_s']:.0f} %), {1e3 * sum(high.values()):.1f} ms on "
        f"the one that waits most ({100 * sum(high.values()) / res['ep_s']:.0f} %: waiting for the slower rank)"
    )
    for phase in EP_PHASES:
        print(f"    {phase:<44}: {1e3 * low[phase]:8.2f} - {1e3 * high[phase]:8.2f} ms")
    print(
        f"  rows sent to other ranks: {sent} of {max(res['kept_slots_per_rank'])} kept slots, "
        f"{mib:.1f} MiB per rank per fwd+bwd"
    )
    print(
        f"  rows each rank's experts process: {res['kept_slots_per_rank']} local, "
        f"{res['rows_for_local_experts_ep']} sharded (the busier rank sets the pace)"
    )


# -----------------------------------------------------------------------------
# --gpu: the one-command GPU check (<= 8 minutes on one H200-class GPU; a dry run of seconds on CPU)

# bf16 experts against the fp32 loop: bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 2e-3 per
# element); through three matmuls with fp32 accumulation the relative (Frobenius) error of the output and
# of every gradient stays near 1e-2, so 2e-2 passes healthy kernels and fails a wrong one (errors ~1)
GPU_CHECK_TOL = 2e-2


def rel_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def expert_precision_rows(device, E, D, F_, tokens, seed=0):
    """The experts as a bf16 run computes them (impl="auto" under bf16 autocast: grouped_mm on sm90 /
    sm100, else the loop) against the fp32 loop, on the same rows, weights and output gradient."""
    torch.manual_seed(seed)
    ref = Experts(E, D, F_).to(device)
    for w in ref.parameters():
        torch.nn.init.normal_(w, std=0.02)
    ref.impl = "loop"
    fast = copy.deepcopy(ref)
    fast.impl = "auto"
    counts_E = torch.distributions.Multinomial(tokens, torch.ones(E)).sample().long().to(device)
    x = torch.randn(tokens, D, device=device)
    grad = torch.randn(tokens, D, device=device)
    out = {}
    for name, ex, autocast in (
        ("fp32 loop", ref, torch.autocast(device.type, enabled=False)),
        ("bf16", fast, torch.autocast(device.type, dtype=torch.bfloat16)),
    ):
        xi = x.clone().requires_grad_()
        with autocast:
            y = ex(xi, counts_E)
        y.backward(grad.to(y.dtype))
        out[name] = (y, xi.grad, ex.w1.grad, ex.w3.grad, ex.w2.grad)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        impl = "grouped_mm" if grouped_mm_dtype(x, fast.w1) else "loop"
    errors = [rel_error(a, b) for a, b in zip(out["bf16"], out["fp32 loop"])]
    return [
        {
            "check": f"bf16 experts ({impl}) vs fp32 loop",
            "E": E,
            "D": D,
            "F": F_,
            "rows": tokens,
            "max rel. error": max(errors),
            "tolerance": GPU_CHECK_TOL,
            "ok": max(errors) <= GPU_CHECK_TOL,
        }
    ]


def gpu_check_argv(dry):
    """train.py settings of the full-scale gate-normalization model (experiments/gate_norm.py) on one
    GPU (ep_size=1), one micro-batch per step; dry: its smoke scale, the same code path in seconds."""
    from experiments import gate_norm

    keys = {
        **gate_norm.job_keys("smoke" if dry else "full"),
        "ep_size": 1,
        "grad_accum": 1,
        "vocab_size": 65 if dry else padded_vocab_size(50257),
    }
    if not dry:
        keys["batch_size"] = 16  # 16 x 1024 tokens per step
    known = {f.name for cls in (ModelConfig, train.TrainConfig) for f in fields(cls)}
    return [f"{k}={v}" for k, v in keys.items() if k in known and k not in ("device", "dataset")]


def training_rows(device, steps, warmup, dry, compile_modes=(False, True), log=print):
    """Tokens/s, MFU on active parameters and peak memory of train.train_step on the gate-norm model,
    with torch.compile off and on: one model and optimizer (building a 2.5B model twice would cost a
    minute and a second copy of its 40 GB of weights, gradients and moments), compiled for the second."""
    rows = []
    measure, matmul_flops = matmul_fn(device)
    peak_measured = matmul_flops / min(time_interleaved({"m": measure}, 5, device=device).values())
    model_cfg, tcfg, model, optimizer, coeffs = train_setup(gpu_check_argv(dry), device)
    batches = random_batch(model_cfg, tcfg, device)
    tokens, counts = tcfg.batch_size * model_cfg.block_size, model.param_counts()
    datasheet = datasheet_peak_flops(device)
    for compiled in compile_modes:
        step = step_fn(model, optimizer, coeffs, tcfg, batches, default_autocast(device), compiled)
        log(f"  training, compile {'on' if compiled else 'off'}: {warmup} warm-up + {steps} timed steps")
        t_warm = time.perf_counter()
        for _ in range(warmup):  # the compiled model compiles here
            step()
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        seconds = (time.perf_counter() - t0) / steps
        flops = tokens / seconds * model.flops_per_token()
        row = {
            "check": f"train_step, compile {'on' if compiled else 'off'}",
            "params": counts["total"],
            "active": counts["active"],
            "tokens/step": tokens,
            "warm-up s": t0 - t_warm,
            "step ms": 1e3 * seconds,
            "tok/s": tokens / seconds,
        }
        if datasheet:
            row["MFU %"] = 100 * flops / datasheet
        row["MFU vs matmul %"] = 100 * flops / peak_measured
        if device.type == "cuda":
            row["peak GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        rows.append(row)
    return rows


def gpu_check(device, steps=None, compile_modes=(False, True), log=print):
    """The GPU check's tables: expert precision, then training. On a CPU (no GPU here) a dry run at toy
    sizes, which the test suite runs: every line of the check executes, the numbers mean nothing."""
    dry = device.type != "cuda"
    sizes = dict(E=4, D=32, F_=48, tokens=64) if dry else dict(E=16, D=1024, F_=2944, tokens=16384)
    precision = expert_precision_rows(device, **sizes)
    training = training_rows(device, steps or (2 if dry else 200), 1 if dry else 20, dry, compile_modes, log)
    return precision, training


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layer", action="store_true", help="(a) MoE layer vs dense equivalent and naive reference")
    parser.add_argument("--train", action="store_true", help="(b) training step tokens/s and MFU")
    parser.add_argument("--routing", action="store_true", help="(c) routing overhead share of the layer")
    parser.add_argument("--memory", action="store_true", help="(d) peak memory, MoE layer vs dense")
    parser.add_argument("--quick", action="store_true", help="small sizes: (a)-(d) in under a minute")
    parser.add_argument(
        "--repeats", type=int, default=0, help="timed rounds per case (default 5, quick 3; (b) twice that)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument(
        "--baseline-rev",
        default=None,
        help="(b): also time model.py and router.py of this git revision, in the same rounds",
    )
    parser.add_argument("--compile", action="store_true", help="(b): also time the torch.compile'd model")
    parser.add_argument("--peer", action="store_true", help="(e) against transformers' Mixtral MoE block")
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="the GPU check: bf16 experts vs fp32 loop, training tok/s, MFU, memory (CPU: a dry run)",
    )
    parser.add_argument("--gpu_steps", type=int, default=0, help="--gpu: timed training steps (default 200)")
    parser.add_argument("--ep", action="store_true", help="expert-parallel dispatch + combine overhead (gloo)")
    defaults = asdict(EPBenchConfig())
    for name, value in defaults.items():
        parser.add_argument(f"--{name}", type=type(value), default=value, help="--ep setting")
    args = parser.parse_args(argv)
    sections = args.layer or args.train or args.routing or args.memory or args.peer
    if not sections and not args.ep and not args.gpu:
        args.layer = args.train = args.routing = args.memory = args.peer = sections = True
    if args.threads < 0 or args.repeats < 0 or args.gpu_steps < 0:
        parser.error("--threads, --repeats and --gpu_steps must be >= 0")
    if args.device not in ("auto", "cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device {args.device}: use auto, cpu or cuda (cuda only where torch sees a GPU)")
    if args.threads:
        torch.set_num_threads(args.threads)
    auto_cuda = args.device == "auto" and torch.cuda.is_available()
    device = torch.device("cuda" if auto_cuda else args.device.replace("auto", "cpu"))
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    precision = "bfloat16 autocast" if device.type == "cuda" else "float32"
    header = (
        f"bench.py: torch {torch.__version__}, {what}, {precision}; "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
        f"load average {os.getloadavg()[0]:.1f} at start"
    )
    if sections or args.gpu:
        print(header, flush=True)
        t0 = time.time()
        tables = run_sections(args, device) if sections else []
        if args.gpu:
            precision, training = gpu_check(
                device, args.gpu_steps or None, log=lambda *a: print(*a, file=sys.stderr, flush=True)
            )
            dry = " (a CPU dry run: no GPU here, the numbers mean nothing)" if device.type != "cuda" else ""
            tables += [
                (f"GPU check: expert precision{dry}", precision),
                (f"GPU check: training the full-scale gate-norm model, ep_size=1{dry}", training),
            ]
        print_tables(tables)
        print(f"\n({time.time() - t0:.0f} s; load average {os.getloadavg()[0]:.1f} at the end)", flush=True)
        if args.gpu and not all(r["ok"] for r in tables[-2][1]):
            sys.exit("GPU check failed: bf16 experts differ from the fp32 loop beyond the tolerance")
    if args.ep:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        cfg = EPBenchConfig(**{k: getattr(args, k) for k in defaults})
        print_ep(cfg, bench_ep(cfg))


if __name__ == "__main__":
    main()
