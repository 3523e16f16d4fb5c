"""
What the three experiment scripts share: scale presets, the command line, running a grid of
(variant, seed) training jobs through train.py's public API, reading their metrics.jsonl, seed
statistics, markdown/JSON tables, plot helpers, the router probes the notebooks use, and the
full-scale plan (torchrun commands, parameter counts, GPU-hours).

Nothing here runs on import. The scripts are

    python experiments/gate_norm.py    --scale smoke|small|full [--seeds N] [--jobs J] [--dry-run]
    python experiments/adaptive_aux.py --scale ...
    python experiments/upcycling.py    --scale ...

Scales: `smoke` is a seconds-long run of every code path (the tests use it); `small` is the CPU
reproduction published in README.md ("Reproducing the paper") (character-level tiny Shakespeare, a 4-layer
128-wide model); `full` is a GPT-2-small-sized MoE on FineWeb under torchrun (printed with
--dry-run, launched without it).
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "experiments", "results")
SCALES = ("smoke", "small", "full")
FIRST_SEED = 1337
GPT2_VOCAB = 50257           # FineWeb's meta.json says so once prepared

# Why the experiments balance with the Switch form E * sum_j f_j P_j rather than eq. 4's
# sum_j (1/E - P_j)^2: at the same alpha, eq. 4's gradient on P_j is 2 (P_j - 1/E), about E times
# smaller than the Switch form's E f_j. A first small-scale gate_norm run with eq. 4 at alpha = 1e-2
# dropped 40-60 % of assignments in layers 2-4 (load CV ~1.8) after 125 steps, far from the paper's
# ~1-2 % regime; the Switch form at 1e-2 is the standard setting the paper's alphas come from.
AUX_LOSS_NOTE = ("Switch form, not eq. 4: at alpha 1e-2 eq. 4 is ~E times weaker and left 40-60 % of "
                 "assignments dropped at this scale")

# -----------------------------------------------------------------------------
# scale presets (train.py keys; each script adds its variants' keys on top)

BASE = {
    # every code path in seconds: 2 layers, 32 wide, 16 steps
    "smoke": dict(dataset="shakespeare_char", n_layer=2, n_head=2, n_embd=32, block_size=32,
                  batch_size=8, max_iters=16, warmup_iters=2, eval_interval=8, eval_iters=2,
                  log_interval=2, learning_rate=2e-3, min_lr=2e-4, device="cpu"),
    # the published CPU runs: the quick-start model shape (config/shakespeare_char.toml)
    "small": dict(dataset="shakespeare_char", n_layer=4, n_head=4, n_embd=128, block_size=64,
                  batch_size=16, max_iters=300, warmup_iters=30, eval_interval=50, eval_iters=10,
                  log_interval=5, learning_rate=2e-3, min_lr=2e-4, device="cpu"),
    # GPT-2-small shape on FineWeb GPT-2 BPE (data/fineweb/prepare.py); batch_size is the global
    # micro-batch (split over ranks by train.py): 128 x 1024 x 4 = 524,288 tokens per step
    "full": dict(dataset="fineweb", n_layer=12, n_head=12, n_embd=768, block_size=1024,
                 batch_size=128, grad_accum=4, warmup_iters=700, eval_interval=1000, eval_iters=40,
                 log_interval=10, learning_rate=6e-4, min_lr=6e-5, dtype="bfloat16"),
}

# the stated throughput behind the GPU-hour estimates of --dry-run
GPU_NAME = "H100 SXM"
GPU_PEAK_FLOPS = 989e12      # dense bf16
GPU_MFU = 0.25               # a modest MFU for a hand-written MoE without fused kernels
GPUS_PER_NODE = 8
FULL_EP_SIZE = 8             # experts sharded over the 8 GPUs of a node (train.py's ep_size)


def preset(scale, **overrides):
    """The base keys of a scale with the script's own keys on top (a new dict)."""
    if scale not in SCALES:
        raise SystemExit(f"error: --scale {scale!r}: use one of {', '.join(SCALES)}")
    out = dict(BASE[scale])
    out.update(overrides)
    return out

# -----------------------------------------------------------------------------
# the command line every script shares

def make_parser(description, default_seeds):
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=SCALES, default="smoke",
                   help="smoke: seconds (tests); small: the CPU reproduction; full: torchrun on GPUs")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"repeats with seeds {FIRST_SEED}, {FIRST_SEED + 1}, ... (default: {default_seeds} "
                        "at small scale, 1 otherwise)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<experiment>/<scale>)")
    p.add_argument("--data_dir", default=os.path.join(REPO, "data"), help="holds <dataset>/train.bin etc.")
    p.add_argument("--jobs", type=int, default=1, help="training runs at a time (CPU scales)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (1 is fastest on a shared 2-core machine)")
    p.add_argument("--force", action="store_true", help="rerun variants that already finished")
    p.add_argument("--analyse-only", action="store_true", help="only rebuild tables and plots from the runs")
    p.add_argument("--dry-run", action="store_true", help="print the plan (and torchrun commands), run nothing")
    p.add_argument("--nproc", type=int, default=GPUS_PER_NODE, help="GPUs per node for --scale full")
    p.add_argument("--max_iters", type=int, default=None,
                   help="override the run length (upcycling: D, the dense run's iterations); results go to "
                        "<experiment>_<scale>_<N>it")
    p.add_argument("--variants", default=None, help="comma-separated subset of the variants to run")
    p.add_argument("--publish", action="store_true",
                   help="copy the tables and plots to experiments/results/ (for the README)")
    return p


def parse_args(parser, argv, default_seeds):
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = default_seeds if args.scale == "small" else 1
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: need at least 1")
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be >= 1")
    if args.max_iters is not None and args.max_iters < 3:
        parser.error(f"--max_iters {args.max_iters}: need at least 3")
    if args.dry_run and args.scale != "full":
        parser.error("--dry-run prints the full-scale plan: use it with --scale full")
    if args.scale == "full" and args.nproc % FULL_EP_SIZE:
        parser.error(f"--nproc {args.nproc}: the full-scale jobs shard experts over ep_size={FULL_EP_SIZE} "
                     f"ranks, so use a multiple of {FULL_EP_SIZE} GPUs")
    return args


def seed_list(n):
    return [FIRST_SEED + i for i in range(n)]


def default_out(experiment, scale):
    return os.path.join(REPO, "runs", experiment, scale)

# -----------------------------------------------------------------------------
# one training job = one train.py invocation with key=value overrides

@dataclasses.dataclass
class Run:
    variant: str                  # short name, used in paths and tables
    seed: int
    out_dir: str
    keys: dict                    # train.py keys (model and train config) for this job
    done_name: str = "done.json"  # marker written when the job finished (two jobs may share out_dir)

    @property
    def name(self):
        return f"{self.variant}_s{self.seed}"

    def argv(self):
        keys = dict(self.keys, seed=self.seed, out_dir=self.out_dir)
        return [f"{k}={format_value(v)}" for k, v in keys.items()]


def format_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, float) else str(v)


def grid(variants, seeds, root, common_keys):
    """Runs for every (variant, seed); variants: {name: keys}. Same seeds (hence the same init where
    the shapes agree, and the same data order) for every variant."""
    return [Run(name, seed, os.path.join(root, f"{name}_s{seed}"), {**common_keys, **keys})
            for seed in seeds for name, keys in variants.items()]


def local_data(runs, scale, data_dir):
    """CPU scales read data_dir (the tests point it at a temporary copy); full-scale commands keep
    train.py's default, relative to the repository root where torchrun starts."""
    if scale != "full":
        for r in runs:
            r.keys["data_dir"] = data_dir
    return runs


def is_done(run):
    path = os.path.join(run.out_dir, run.done_name)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return json.load(f).get("argv") == run.argv()


def run_one(run, threads=1):
    """train.train in this process, its prints going to out_dir/train.log; writes done.json last, so a
    crashed job is rerun next time. Returns the wall time in seconds."""
    import torch
    from train import load_config, train
    torch.set_num_threads(threads)
    os.makedirs(run.out_dir, exist_ok=True)
    model_cfg, train_cfg, sources = load_config(run.argv())
    t0 = time.time()
    log_name = run.done_name.replace("done", "train").replace(".json", ".log")  # done.json -> train.log
    with open(os.path.join(run.out_dir, log_name), "w") as log, contextlib.redirect_stdout(log):
        train(model_cfg, train_cfg, sources)
    wall = time.time() - t0
    with open(os.path.join(run.out_dir, run.done_name), "w") as f:
        json.dump({"argv": run.argv(), "wall_s": wall}, f)
    return wall


def run_all(runs, jobs=1, threads=1, force=False, log=print):
    """Run what has not finished yet: in this process (jobs=1) or in `jobs` forked workers. Workers are
    forked after train.py is imported here, so every job of one invocation runs the same code."""
    todo = [r for r in runs if force or not is_done(r)]
    for r in runs:
        if r not in todo:
            log(f"  {r.name}: done already (--force reruns it)")
    if not todo:
        return
    import train  # noqa: F401  (imported once before any fork)
    t0 = time.time()
    if jobs == 1 or len(todo) == 1:
        for r in todo:
            log(f"  {r.name}: running ({r.out_dir})")
            log(f"  {r.name}: {run_one(r, threads):.0f} s")
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = {pool.submit(run_one, r, threads): r for r in todo}
            for fut, r in futures.items():
                log(f"  {r.name}: {fut.result():.0f} s")
    log(f"  {len(todo)} runs in {time.time() - t0:.0f} s")


def ensure_char_data(data_dir, dataset):
    """Prepare the character dataset before any job starts (never two jobs racing to write it)."""
    from train import TrainConfig, ensure_data
    ensure_data(TrainConfig(data_dir=data_dir, dataset=dataset))

# -----------------------------------------------------------------------------
# metrics.jsonl -> arrays

def read_metrics(out_dir):
    """{"steps": [training log records], "evals": [eval records]} of one run."""
    steps, evals = [], []
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "val_loss" in rec:
                evals.append(rec)
            elif "loss" in rec:
                steps.append(rec)
    if not steps or not evals:
        raise SystemExit(f"error: {out_dir}/metrics.jsonl has no training or eval records: rerun with --force")
    return {"steps": steps, "evals": evals}


def n_moe_layers(metrics):
    return len(metrics["steps"][0].get("layers") or [])


def step_series(metrics, key, layer=None):
    """(iters, values) of a per-step key: "loss", "lr", or a router statistic of MoE layer `layer`
    (an index into the MoE layers; None = mean over them)."""
    steps = metrics["steps"]
    it = np.array([s["iter"] for s in steps], dtype=float)
    if key in ("loss", "lr", "tokens"):
        return it, np.array([s[key] for s in steps], dtype=float)

    def val(s):
        vals = [np.nan if r.get(key) is None else r[key] for r in s["layers"]]
        return vals[layer] if layer is not None else float(np.mean(vals))
    return it, np.array([val(s) for s in steps], dtype=float)


def eval_series(metrics, key):
    """(iters, values) of an eval key ("val_loss", "train_loss", or "expert_similarity", averaged over
    layers)."""
    ev = [e for e in metrics["evals"] if e.get(key) is not None]
    it = np.array([e["iter"] for e in ev], dtype=float)
    vals = [np.mean(e[key]) if isinstance(e[key], list) else e[key] for e in ev]
    return it, np.array(vals, dtype=float)


def tail_mean(values, frac=0.2):
    """Mean of the last `frac` of a series: the "late" value of a noisy per-step statistic."""
    values = np.asarray(values, dtype=float)
    n = max(1, int(round(len(values) * frac)))
    return float(np.nanmean(values[-n:]))


def head_mean(values, frac=0.05):
    values = np.asarray(values, dtype=float)
    n = max(1, int(round(len(values) * frac)))
    return float(np.nanmean(values[:n]))


def smooth(values, window):
    """Trailing moving average (window >= 1) for plots."""
    values = np.asarray(values, dtype=float)
    if window <= 1 or len(values) < 2:
        return values
    c = np.cumsum(np.insert(values, 0, 0.0))
    out = np.empty_like(values)
    for i in range(len(values)):
        lo = max(0, i + 1 - window)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out

# -----------------------------------------------------------------------------
# statistics over seeds and the summary table

def mean_sd(values):
    """(mean, sample standard deviation over seeds; 0 for one seed)."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def fmt_ms(values, digits=3, scale=1.0, suffix=""):
    """"mean ± sd" of a list over seeds (just the mean for one seed)."""
    m, s = mean_sd([None if v is None else v * scale for v in values])
    if math.isnan(m):
        return "n/a"
    if len(values) == 1:
        return f"{m:.{digits}f}{suffix}"
    return f"{m:.{digits}f} ± {s:.{digits}f}{suffix}"


def describe_setup(runs):
    """One sentence on the model and run length shared by the runs of a table."""
    k = runs[0].keys
    moe = (f"{k['n_expert']} experts (hidden {k.get('expert_hidden') or 'dense FFN'}) top-{k['top_k']}, "
           f"capacity factor {k.get('capacity_factor', 1.25)}" if k.get("n_expert") else "dense")
    return (f"{k['n_layer']} layers x {k['n_embd']} wide, block {k['block_size']}, {moe}; "
            f"{k['max_iters']} iterations of {tokens_per_step(k):,} tokens ({k['dataset']}); "
            f"seeds {sorted({r.seed for r in runs})}, mean ± sd over seeds.")


def markdown_table(columns, rows):
    """columns: header strings; rows: lists of cell strings."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_summary(out_dir, stem, title, sections, data):
    """out_dir/stem.md (a title, then (heading, markdown) sections) and out_dir/stem.json (data)."""
    os.makedirs(out_dir, exist_ok=True)
    md = [f"# {title}", ""]
    for heading, body in sections:
        if heading:
            md += [f"## {heading}", ""]
        md += [body, ""]
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(out_dir, stem + ".json"), "w") as f:
        json.dump(data, f, indent=1, default=float)
    return os.path.join(out_dir, stem + ".md"), os.path.join(out_dir, stem + ".json")


def publish(out_dir, stems, log=print):
    """Copy the named tables/plots of a run directory to experiments/results/ (the README's figures)."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    for name in sorted(os.listdir(out_dir)):
        if any(name.startswith(s) for s in stems) and name.endswith((".md", ".json", ".png")):
            shutil.copy(os.path.join(out_dir, name), os.path.join(RESULTS_DIR, name))
            log(f"  published experiments/results/{name}")

# -----------------------------------------------------------------------------
# plots (matplotlib's object API: no global backend state, safe inside notebooks and workers)

def new_figure(nrows, ncols, width=4.2, height=3.0):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def plot_band(ax, curves, label, color=None, window=1, xscale=1.0, **kw):
    """Mean over seeds as a line and min..max as a band; curves: [(x, y)] of one variant, same x."""
    n = min(len(y) for _, y in curves)
    x = np.asarray(curves[0][0][:n], dtype=float) * xscale
    ys = np.stack([smooth(np.asarray(y[:n], dtype=float), window) for _, y in curves])
    line, = ax.plot(x, ys.mean(0), label=label, color=color, **kw)
    if len(curves) > 1:
        ax.fill_between(x, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
    return line


def zoom_y(ax, span):
    """Show the lowest `span` of a loss panel (its first points would flatten the differences)."""
    lo = min(float(np.nanmin(line.get_ydata())) for line in ax.get_lines() if len(line.get_ydata()))
    ax.set_ylim(lo - 0.05 * span, lo + span)


def save_figure(fig, path, dpi=80):
    fig.savefig(path, dpi=dpi)
    return path

# -----------------------------------------------------------------------------
# router probes of a trained model (gate snapshots, which tokens each expert takes)

def load_model(ckpt_path):
    from train import load_checkpoint, model_from_checkpoint
    model = model_from_checkpoint(load_checkpoint(ckpt_path))
    model.eval()
    return model


def val_batch(data_dir, dataset, block_size, batch_size, seed=0):
    """A fixed batch of validation windows (the same for every model compared)."""
    import torch
    data = np.memmap(os.path.join(data_dir, dataset, "val.bin"), dtype=np.uint16, mode="r")
    gen = np.random.default_rng(seed)
    ix = gen.integers(0, len(data) - block_size - 1, size=batch_size)
    return torch.from_numpy(np.stack([data[i:i + block_size].astype(np.int64) for i in ix]))


def router_probe(model, x_BL):
    """The RouterOutputs of every MoE layer on one batch (no gradient)."""
    import torch
    with torch.no_grad():
        _, _, outs = model(x_BL)  # the routers see every position even without targets
    return outs


def gate_snapshot(model, x_BL, layer, token=None):
    """Fig. 3 (right): one token's gate distribution in MoE layer `layer` (sorted, descending), and
    the mean over all tokens of the sorted distributions."""
    probs_TE = router_probe(model, x_BL)[layer].probs_TE
    t = probs_TE.shape[0] // 2 if token is None else token
    sorted_TE = probs_TE.sort(dim=-1, descending=True).values
    return {"token_index": int(t), "token_probs": probs_TE[t].tolist(),
            "token_sorted": sorted_TE[t].tolist(), "mean_sorted": sorted_TE.mean(0).tolist()}


def expert_token_counts(model, x_BL, layer, vocab_size):
    """(E, vocab) counts of which input tokens each expert takes as a first choice in MoE layer
    `layer`: the expert specialisation picture of notebook 04."""
    import torch
    r = router_probe(model, x_BL)[layer]
    E = r.probs_TE.shape[-1]
    first_T = r.ids_TK[:, 0]
    counts = torch.zeros(E, vocab_size)
    counts.index_put_((first_T, x_BL.reshape(-1)), torch.ones(first_T.shape[0]), accumulate=True)
    return counts.numpy()

# -----------------------------------------------------------------------------
# full scale: parameter counts, tokens, GPU-hours, torchrun commands

def model_accounting(keys, vocab_size):
    """Total / active parameters and training FLOPs per token of a job's model (meta device: nothing
    is allocated), by model.py's own accounting."""
    import torch
    from model import GPT, ModelConfig, count_params_meta
    from train import load_config
    model_cfg, _, _ = load_config([f"{k}={format_value(v)}" for k, v in keys.items()])
    cfg = dataclasses.replace(model_cfg, vocab_size=vocab_size)
    counts = count_params_meta(cfg)
    with torch.device("meta"):
        flops = GPT(cfg).flops_per_token()
    return {"total": counts["total"], "active": counts["active"], "flops_per_token": flops,
            "config": ModelConfig(**dataclasses.asdict(cfg))}


def tokens_per_step(keys):
    return keys["batch_size"] * keys.get("grad_accum", 1) * keys["block_size"]


def torchrun_command(run, nproc):
    args = " ".join(run.argv())
    return f"torchrun --standalone --nproc_per_node={nproc} train.py {args}"


def gpu_hours(flops_per_token, tokens):
    return flops_per_token * tokens / (GPU_PEAK_FLOPS * GPU_MFU) / 3600


@dataclasses.dataclass
class Step:
    """A non-training stage between runs (e.g. upcycling a dense checkpoint): fn() does it here;
    command is the same thing as a shell command for the full-scale plan."""
    name: str
    fn: object
    command: str


def all_runs(stages):
    return [r for stage in stages if isinstance(stage, list) for r in stage]


def print_plan(title, stages, nproc, vocab_size, log=print):
    """The --dry-run plan: per job its model size, tokens, estimated GPU-hours, and the command."""
    log(f"# {title}")
    log(f"# throughput assumption: {GPU_NAME}, {GPU_PEAK_FLOPS / 1e12:.0f} TFLOP/s bf16 peak at "
        f"{GPU_MFU:.0%} MFU; FLOPs/token = model.flops_per_token() (PaLM appendix B)")
    total_h = 0.0
    reached = {}  # out_dir -> iterations already trained there (a resumed job only adds the rest)
    for stage in stages:
        if isinstance(stage, Step):
            log(f"## {stage.name}")
            log(stage.command)
            continue
        for run in stage:
            acc = model_accounting(run.keys, vocab_size)
            start = reached.get(run.out_dir, 0) if run.keys.get("init_from") == "resume" else 0
            steps = run.keys["max_iters"] - start
            reached[run.out_dir] = run.keys["max_iters"]
            tokens = tokens_per_step(run.keys) * steps
            h = gpu_hours(acc["flops_per_token"], tokens)
            total_h += h
            tok_s = GPU_PEAK_FLOPS * GPU_MFU / acc["flops_per_token"]
            log(f"## {run.name}: params {acc['total']:,} total / {acc['active']:,} active; "
                f"{tokens / 1e9:.2f}B tokens ({steps:,} steps x {tokens_per_step(run.keys):,}"
                f"{f', resuming at step {start:,}' if start else ''}); "
                f"~{tok_s:,.0f} tokens/s/GPU -> {h:,.0f} GPU-hours ({h / nproc:,.1f} h on {nproc} GPUs)")
            log(torchrun_command(run, nproc))
    log(f"# total: {total_h:,.0f} GPU-hours ({total_h / nproc:,.1f} h on one {nproc}-GPU node)")
    return total_h


def launch_full(runs, nproc, log=print):
    """Run the torchrun commands one after the other (each job uses the whole node)."""
    import shlex
    import subprocess
    for run in runs:
        if is_done(run):
            log(f"  {run.name}: done already")
            continue
        os.makedirs(run.out_dir, exist_ok=True)
        cmd = torchrun_command(run, nproc)
        log(f"  {cmd}")
        t0 = time.time()
        subprocess.run(shlex.split(cmd), cwd=REPO, check=True)
        with open(os.path.join(run.out_dir, run.done_name), "w") as f:
            json.dump({"argv": run.argv(), "wall_s": time.time() - t0}, f)

# -----------------------------------------------------------------------------
# the flow of every script: plan -> (dry-run | run the stages) -> analyse -> (publish)

def run_experiment(argv, experiment, description, default_seeds, plan, analyse, variants, full_dataset="fineweb"):
    """plan(scale, seeds, out_dir, data_dir, max_iters) -> stages (lists of Runs, and Steps between them);
    analyse(stages, label, out_dir, data_dir) -> summary dict (writes the tables and plots; label is the
    scale, with the run length appended when --max_iters overrides it). variants: what --variants picks from."""
    parser = make_parser(description, default_seeds)
    args = parse_args(parser, argv, default_seeds)
    chosen = args.variants.split(",") if args.variants else list(variants)
    unknown = sorted(set(chosen) - set(variants))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(variants)}")
    label = args.scale if args.max_iters is None else f"{args.scale}_{args.max_iters}it"
    out = os.path.abspath(args.out or default_out(experiment, label))
    data_dir = args.data_dir
    if args.scale == "full":
        # torchrun jobs run in the repository root with paths relative to it (train.py's data_dir default)
        out = os.path.relpath(out, REPO)
        if not args.dry_run:
            os.chdir(REPO)
    stages = plan(args.scale, seed_list(args.seeds), out, data_dir, args.max_iters)
    stages = [[r for r in st if r.variant in chosen or r.variant not in variants] if isinstance(st, list) else st
              for st in stages]
    if args.dry_run:
        vocab = read_vocab_size(args.data_dir, full_dataset, GPT2_VOCAB)
        print_plan(f"{experiment}, full scale: {description}", stages, args.nproc, vocab)
        return None
    if not args.analyse_only:
        print(f"{experiment}: {len(all_runs(stages))} runs at scale {args.scale} -> {out}", flush=True)
        if args.scale != "full":
            ensure_char_data(args.data_dir, all_runs(stages)[0].keys["dataset"])
        for stage in stages:
            if isinstance(stage, Step):
                print(f"  {stage.name}", flush=True)
                stage.fn()
            elif args.scale == "full":
                launch_full(stage, args.nproc)
            else:
                run_all(stage, args.jobs, args.threads, args.force)
    summary = analyse(stages, label, out, args.data_dir)
    if args.publish:
        publish(out, [f"{experiment}_{label}"])
    return summary


def read_vocab_size(data_dir, dataset, default):
    path = os.path.join(data_dir, dataset, "meta.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)["vocab_size"]
    return default
