"""
The running half of the experiments: scale presets, the command line every experiment shares, the grid
of (variant, seed) training jobs with one out_dir each, running them (resumable: a finished job is
skipped, an interrupted one resumes from its checkpoint, two drivers never take the same job), the
full-scale plan (parameters, tokens, GPU-hours, torchrun commands), and the flow of every script:

    plan -> (dry-run | run the stages) -> report (analysis.py's tables and plots) -> (publish)

An experiment script is a module with EXPERIMENT, VARIANTS, a `job_keys(scale)` and a `report(...)`
(optionally its own `plan`); its main() is `runner.main(sys.modules[__name__], argv)`. Run them as

    python -m experiments.gate_norm --scale smoke|small|full [--seeds N] [--jobs J] [--dry-run]
    python experiments/gate_norm.py ...        # the same (experiments/_repo.py makes the repo importable)

Scales: `smoke` runs every code path in seconds (the tests use it); `small` is the CPU study published in
experiments/results/ and README.md; `full` is the plan at the paper's sizes for GPUs under torchrun
(printed by --dry-run, launched without it).
"""

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time

from experiments import analysis

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "experiments", "results")
SCALES = ("smoke", "small", "full")
FIRST_SEED = 1337
GPT2_VOCAB = 50257  # FineWeb's meta.json says so once prepared

# the stated throughput behind the GPU-hour estimates of --dry-run
GPU_NAME = "H100 SXM"
GPU_PEAK_FLOPS = 989e12  # dense bf16
GPU_MFU = 0.30  # a modest MFU for a hand-written MoE without fused kernels (Skywork-MoE reports 38 %)
GPUS_PER_NODE = 8
FULL_EP_SIZE = 8  # experts sharded over the 8 GPUs of a node (train.py's ep_size)

# -----------------------------------------------------------------------------
# scale presets (train.py keys; each experiment adds its own on top)

# fmt: off
BASE = {
    # every code path in seconds: 2 layers, 32 wide, 16 steps
    "smoke": dict(
        dataset="shakespeare_char", n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, max_iters=16,
        warmup_iters=2, eval_interval=8, eval_iters=2, log_interval=2, learning_rate=2e-3, min_lr=2e-4,
        device="cpu",
    ),
    # the long CPU studies: a model small enough that 5,000 steps take minutes on one core (measured
    # ~40 steps/s single-threaded), so 3 seeds of every arm fit in a few CPU-hours
    "small": dict(
        dataset="shakespeare_char", n_layer=3, n_head=2, n_embd=64, block_size=32, batch_size=16,
        max_iters=5000, warmup_iters=100, eval_interval=250, eval_iters=10, log_interval=10,
        learning_rate=2e-3, min_lr=2e-4, keep_last=0, device="cpu",
    ),
    # FineWeb GPT-2 BPE (data/fineweb/prepare.py); batch_size is the global micro-batch (split over
    # ranks by train.py): 128 x 1024 x 4 = 524,288 tokens per step
    "full": dict(
        dataset="fineweb", block_size=1024, batch_size=128, grad_accum=4, warmup_iters=700, eval_interval=1000,
        eval_iters=40, log_interval=10, learning_rate=6e-4, min_lr=6e-5, dtype="bfloat16",
    ),
}
# fmt: on


def preset(scale, **overrides):
    """The base keys of a scale with the experiment's own keys on top (a new dict)."""
    return {**BASE[scale], **overrides}


# -----------------------------------------------------------------------------
# the command line every experiment shares


def make_parser(exp):
    p = argparse.ArgumentParser(
        prog=f"python -m experiments.{exp.EXPERIMENT}",
        description=exp.__doc__.strip().splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--scale",
        choices=SCALES,
        default="smoke",
        help="smoke: seconds (tests); small: the CPU study; full: torchrun on GPUs",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help=f"repeats with seeds {FIRST_SEED}, {FIRST_SEED + 1}, ... (default: "
        f"{getattr(exp, 'DEFAULT_SEEDS', 3)} at small scale, 1 otherwise)",
    )
    p.add_argument("--out", default=None, help="run directory (default: runs/<experiment>/<scale>)")
    p.add_argument("--data_dir", default=os.path.join(REPO, "data"), help="holds <dataset>/train.bin etc.")
    p.add_argument("--jobs", type=int, default=1, help="training runs at a time (CPU scales)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (1 is fastest on a shared CPU)")
    p.add_argument("--force", action="store_true", help="rerun variants that already finished")
    p.add_argument("--analyse-only", action="store_true", help="only rebuild tables and plots from finished runs")
    p.add_argument("--dry-run", action="store_true", help="print the plan (and torchrun commands), run nothing")
    p.add_argument("--nproc", type=int, default=GPUS_PER_NODE, help="GPUs per node for --scale full")
    p.add_argument(
        "--max_iters", type=int, default=None, help="override the run length; results go to <experiment>_<scale>_<N>it"
    )
    p.add_argument("--variants", default=None, help="comma-separated subset of the variants to run")
    p.add_argument("--publish", action="store_true", help="copy the tables and plots to experiments/results/")
    return p


def parse_args(exp, argv):
    parser = make_parser(exp)
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = getattr(exp, "DEFAULT_SEEDS", 3) if args.scale == "small" else 1
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: need at least 1")
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be >= 1")
    if args.max_iters is not None and args.max_iters < 3:
        parser.error(f"--max_iters {args.max_iters}: need at least 3")
    if args.dry_run and args.scale != "full":
        parser.error("--dry-run prints the full-scale plan: use it with --scale full")
    if args.scale == "full" and args.nproc % FULL_EP_SIZE:
        parser.error(
            f"--nproc {args.nproc}: the full-scale jobs shard experts over ep_size={FULL_EP_SIZE} "
            f"ranks, so use a multiple of {FULL_EP_SIZE} GPUs"
        )
    names = list(exp.VARIANTS)
    args.chosen = args.variants.split(",") if args.variants else list(getattr(exp, "DEFAULT_VARIANTS", names))
    unknown = sorted(set(args.chosen) - set(names))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(names)}")
    return args


def seed_list(n):
    return [FIRST_SEED + i for i in range(n)]


# -----------------------------------------------------------------------------
# one training job = one train.py invocation with key=value overrides


@dataclasses.dataclass
class Run:
    variant: str  # short name, used in paths and tables
    seed: int
    out_dir: str
    keys: dict  # train.py keys (model and train config) for this job
    done_name: str = "done.json"  # marker written when the job finished (two jobs may share out_dir)

    @property
    def name(self):
        return f"{self.variant}_s{self.seed}"

    def argv(self):
        keys = dict(self.keys, seed=self.seed, out_dir=self.out_dir)
        return [f"{k}={format_value(v)}" for k, v in keys.items()]


@dataclasses.dataclass
class Step:
    """A non-training stage between runs (e.g. upcycling a dense checkpoint): fn() does it here;
    command is the same thing as a shell command for the full-scale plan."""

    name: str
    fn: object
    command: str


def format_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, float) else str(v)


def grid(variants, seeds, root, common_keys):
    """Runs for every (seed, variant); variants: {name: keys}. The same seeds (hence the same init where
    the shapes agree, and the same data order) for every variant; seed-major, so an interrupted grid
    has whole seeds of every variant rather than every seed of a few."""
    return [
        Run(name, seed, os.path.join(root, f"{name}_s{seed}"), {**common_keys, **keys})
        for seed in seeds
        for name, keys in variants.items()
    ]


def grid_plan(exp, scale, seeds, root, data_dir, max_iters=None):
    """The plan of most experiments: one stage, every (variant, seed) of exp.VARIANTS."""
    keys = exp.job_keys(scale)
    if max_iters:
        keys["max_iters"] = max_iters
    if scale != "full":  # torchrun jobs keep train.py's data_dir, relative to the repository root
        keys["data_dir"] = data_dir
    return [grid(exp.VARIANTS, seeds, root, keys)]


def all_runs(stages):
    return [r for stage in stages if isinstance(stage, list) for r in stage]


def summarised(stages, summarise, claims, *args):
    """A study's runs, its summary (summarise(runs, *args), with the verdicts under "claims") and the
    claims' text: the start of every report()."""
    runs = all_runs(stages)
    summary = summarise(runs, *args)
    text, summary["claims"] = claims(summary)
    return runs, summary, text


def is_done(run):
    path = os.path.join(run.out_dir, run.done_name)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return json.load(f).get("argv") == run.argv()


def claim(run):
    """Take the job for this driver: out_dir/<done_name>.lock holds the pid of the driver running it,
    so a second driver started on the same grid (more --jobs later) skips it. False if a live process
    holds it; a lock left by a dead one is taken over."""
    os.makedirs(run.out_dir, exist_ok=True)
    lock = os.path.join(run.out_dir, run.done_name + ".lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(lock) as f:
                    pid = int(f.read().strip() or 0)
                if pid <= 0:
                    raise ValueError("empty lock")  # its writer died before writing its pid
                os.kill(pid, 0)
                return pid == os.getpid()
            except (ValueError, ProcessLookupError):
                os.remove(lock)  # stale: its driver is gone
                continue
            except PermissionError:
                return False
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def release(run):
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(run.out_dir, run.done_name + ".lock"))


def job_argv(run):
    """The job's train.py arguments; an interrupted job (a checkpoint, no done marker) resumes."""
    argv = run.argv()
    if os.path.isfile(os.path.join(run.out_dir, "ckpt.pt")) and run.keys.get("init_from") in (None, "scratch"):
        argv.append("init_from=resume")
    return argv


def run_one(run, threads=1, isolate=False):
    """Train one job, its prints appended to out_dir/train.log; writes the done marker last, so a
    crashed job resumes next time. isolate: in a child `python train.py` (the long runs: each job
    reads train.py afresh and a crash stays in its log) instead of this process (the tests).
    Returns the wall time in seconds."""
    log_path = os.path.join(run.out_dir, run.done_name.replace("done", "train").replace(".json", ".log"))
    argv = job_argv(run)
    t0 = time.time()
    if isolate:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        with open(log_path, "a") as log:
            rc = subprocess.call(
                [sys.executable, os.path.join(REPO, "train.py"), *argv],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if rc != 0:
            raise RuntimeError(f"{run.name}: train.py exited with {rc}; see {log_path}")
    else:
        import torch

        from config import load_config
        from model import ModelConfig
        from train import TrainConfig, train

        torch.set_num_threads(threads)
        (model_cfg, train_cfg), sources = load_config(argv, [ModelConfig, TrainConfig])
        with open(log_path, "a") as log, contextlib.redirect_stdout(log):
            train(model_cfg, train_cfg, sources)
    wall = time.time() - t0
    with open(os.path.join(run.out_dir, run.done_name), "w") as f:
        json.dump({"argv": run.argv(), "wall_s": wall}, f)
    return wall


def run_all(runs, jobs=1, threads=1, force=False, isolate=False, log=print):
    """Run what has not finished yet, `jobs` at a time (jobs > 1: child processes). A job another
    driver holds is left to it. Returns the names of the jobs that failed."""
    todo = [r for r in runs if force or not is_done(r)]
    for r in runs:
        if r not in todo:
            log(f"  {r.name}: done already (--force reruns it)")
    failed = []

    def one(r):
        if not claim(r):
            log(f"  {r.name}: another driver is running it", flush=True)
            return
        try:
            log(
                f"  {r.name}: {'resuming' if 'init_from=resume' in job_argv(r) else 'running'} ({r.out_dir})",
                flush=True,
            )
            log(f"  {r.name}: {run_one(r, threads, isolate or jobs > 1):.0f} s", flush=True)
        except Exception as e:  # one job's failure (its log has the details) must not stop the others
            failed.append(r.name)
            log(f"  {r.name}: FAILED ({e})", flush=True)
        finally:
            release(r)

    t0 = time.time()
    if jobs == 1:
        for r in todo:
            one(r)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(one, todo))
    if todo:
        log(f"  {len(todo)} jobs in {time.time() - t0:.0f} s", flush=True)
    return failed


def ensure_char_data(data_dir, dataset):
    """Prepare the character dataset before any job starts (never two jobs racing to write it)."""
    from dataset import ensure_data
    from train import TrainConfig

    ensure_data(TrainConfig(data_dir=data_dir, dataset=dataset))


# -----------------------------------------------------------------------------
# full scale: parameter counts, tokens, GPU-hours, torchrun commands


def load_job_config(keys, vocab_size=None):
    """(ModelConfig, TrainConfig) of a job's keys, by the project's own config parser."""
    from config import load_config
    from model import ModelConfig
    from train import TrainConfig

    (model_cfg, train_cfg), _ = load_config(
        [f"{k}={format_value(v)}" for k, v in keys.items()], [ModelConfig, TrainConfig]
    )
    if vocab_size is not None:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab_size)
    return model_cfg, train_cfg


def model_accounting(keys, vocab_size):
    """Total / active parameters and training FLOPs per token of a job's model (meta device: nothing
    is allocated), by model.py's own accounting."""
    import torch

    from model import GPT, count_params_meta

    cfg, _ = load_job_config(keys, vocab_size)
    counts = count_params_meta(cfg)
    with torch.device("meta"):
        flops = GPT(cfg).flops_per_token()
    return {"total": counts["total"], "active": counts["active"], "flops_per_token": flops, "config": cfg}


def tokens_per_step(keys):
    return keys["batch_size"] * keys.get("grad_accum", 1) * keys["block_size"]


def torchrun_command(run, nproc):
    return f"torchrun --standalone --nproc_per_node={nproc} train.py {' '.join(run.argv())}"


def gpu_hours(flops_per_token, tokens):
    return flops_per_token * tokens / (GPU_PEAK_FLOPS * GPU_MFU) / 3600


def read_vocab_size(data_dir, dataset):
    """The dataset's vocabulary by train.py's reader, or GPT-2's before FineWeb is prepared."""
    from dataset import read_vocab_size as read
    from model import padded_vocab_size
    from train import TrainConfig

    tcfg = TrainConfig(data_dir=data_dir, dataset=dataset)
    if not os.path.isfile(os.path.join(data_dir, dataset, "meta.json")):
        return padded_vocab_size(GPT2_VOCAB)  # the rows train.py builds for it, as read() would say
    return read(tcfg)


def print_plan(exp, stages, nproc, vocab_size, log=print):
    """The --dry-run plan: per job its model size, tokens (and their fraction of the paper's), the
    estimated GPU-hours, and the command; exp.PAPER_TOKENS (optional) is the paper's run length."""
    title = exp.__doc__.strip().splitlines()[0]
    log(f"# {exp.EXPERIMENT}, full scale: {title}")
    log(
        f"# throughput assumption: {GPU_NAME}, {GPU_PEAK_FLOPS / 1e12:.0f} TFLOP/s bf16 peak at {GPU_MFU:.0%} MFU; "
        "FLOPs/token = model.flops_per_token() (PaLM appendix B)"
    )
    for line in getattr(exp, "PLAN_NOTES", ()):
        log(f"# {line}")
    rows, reached = [], {}  # reached: out_dir -> iterations trained there (a resumed job only adds the rest)
    for stage in stages:
        if isinstance(stage, Step):
            rows.append(stage)
            continue
        for run in stage:
            acc = model_accounting(run.keys, vocab_size)
            start = reached.get(run.out_dir, 0) if run.keys.get("init_from") == "resume" else 0
            reached[run.out_dir] = run.keys["max_iters"]
            tokens = tokens_per_step(run.keys) * (run.keys["max_iters"] - start)
            rows.append((run, acc, start, tokens, acc["flops_per_token"] * tokens))
    # the cost unit C: the total FLOPs of the runs of variant exp.COST_UNIT (the dense run of upcycling)
    unit = getattr(exp, "COST_UNIT", None)
    cost_c = sum(r[4] for r in rows if not isinstance(r, Step) and r[0].variant == unit) if unit else 0
    total_h = 0.0
    for row in rows:
        if isinstance(row, Step):
            log(f"## {row.name}")
            log(row.command)
            continue
        run, acc, start, tokens, flops = row
        h = gpu_hours(acc["flops_per_token"], tokens)
        total_h += h
        tok_s = GPU_PEAK_FLOPS * GPU_MFU / acc["flops_per_token"]
        paper = exp.paper_tokens(run) if hasattr(exp, "paper_tokens") else None
        frac = f" = {tokens / paper:.1%} of the paper's {paper / 1e9:.0f}B" if paper else ""
        cost = f"; cost {flops / cost_c:.2f} C (C = the {unit} run's FLOPs)" if cost_c else ""
        log(
            f"## {run.name}: params {acc['total']:,} total / {acc['active']:,} active; "
            f"{tokens / 1e9:.2f}B tokens{frac} ({run.keys['max_iters'] - start:,} steps x "
            f"{tokens_per_step(run.keys):,}{f', resuming at step {start:,}' if start else ''}){cost}; "
            f"~{tok_s:,.0f} tokens/s/GPU -> {h:,.0f} GPU-hours ({h / nproc:,.1f} h on {nproc} GPUs)"
        )
        log(torchrun_command(run, nproc))
    log(f"# total: {total_h:,.0f} GPU-hours ({total_h / nproc:,.1f} h on one {nproc}-GPU node)")
    return total_h


def launch_full(runs, nproc, log=print):
    """Run the torchrun commands one after the other (each job uses the whole node)."""
    import shlex

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
# the flow of every experiment


def publish(out_dir, stem, log=print):
    """Copy a run directory's tables and plots named stem* to experiments/results/ (the README's)."""
    import shutil

    os.makedirs(RESULTS_DIR, exist_ok=True)
    for name in sorted(os.listdir(out_dir)):
        if name.startswith(stem) and name.endswith((".md", ".json", ".png")):
            shutil.copy(os.path.join(out_dir, name), os.path.join(RESULTS_DIR, name))
            log(f"  published experiments/results/{name}")


def finished(stages):
    """The stages cut to the runs that have finished (the analysis works on whatever is complete)."""
    return [[r for r in st if is_done(r)] if isinstance(st, list) else st for st in stages]


def main(exp, argv=None):
    """exp: an experiment module. Returns the summary dict of exp.report (None for --dry-run).
    Exit status 1 with one line on stderr for a job that failed or metrics that cannot be read."""
    args = parse_args(exp, sys.argv[1:] if argv is None else argv)
    label = args.scale if args.max_iters is None else f"{args.scale}_{args.max_iters}it"
    out = os.path.abspath(args.out or os.path.join(REPO, "runs", exp.EXPERIMENT, label))
    if args.scale == "full":
        out = os.path.relpath(out, REPO)  # torchrun jobs run in the repository root
        if not args.dry_run:
            os.chdir(REPO)
    plan = getattr(exp, "plan", None) or (lambda *a: grid_plan(exp, *a))
    every = plan(args.scale, seed_list(args.seeds), out, args.data_dir, args.max_iters)
    stages = [
        [r for r in st if r.variant in args.chosen or r.variant not in exp.VARIANTS] if isinstance(st, list) else st
        for st in every
    ]
    if args.dry_run:
        dataset = all_runs(stages)[0].keys["dataset"]
        print_plan(exp, stages, args.nproc, read_vocab_size(args.data_dir, dataset))
        return None
    if not args.analyse_only:
        print(f"{exp.EXPERIMENT}: {len(all_runs(stages))} runs at scale {args.scale} -> {out}", flush=True)
        if args.scale != "full":
            ensure_char_data(args.data_dir, all_runs(stages)[0].keys["dataset"])
        for stage in stages:
            if isinstance(stage, Step):
                print(f"  {stage.name}", flush=True)
                stage.fn()
            elif args.scale == "full":
                launch_full(stage, args.nproc)
            else:
                failed = run_all(stage, args.jobs, args.threads, args.force, isolate=args.scale == "small")
                if failed:
                    sys.exit(
                        f"error: {len(failed)} jobs failed ({', '.join(failed)}): see their train.log; "
                        "the same command resumes them"
                    )
    # the report covers every finished run of the plan, also those of variants not chosen this time
    done = finished(every if args.variants is None and not args.force else stages)
    if not all_runs(done):
        sys.exit(f"error: no finished runs under {out}: run the experiment first")
    try:
        summary, (title, sections, data), figures = exp.report(done, args.scale, out, args.data_dir)
    except analysis.MetricsError as e:
        sys.exit(f"error: {e}")
    stem = f"{exp.EXPERIMENT}_{label}"
    md, _ = analysis.write_summary(out, stem, title, sections, data)
    for suffix, draw in figures.items():
        analysis.save_figure(draw(), os.path.join(out, f"{stem}_{suffix}.png"))
    with open(md) as f:
        print(f.read())
    if args.publish:
        publish(out, stem)
    return summary
