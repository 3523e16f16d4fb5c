"""
Gating logit normalization (Skywork-MoE section 4.1, eq. 6; Fig. 2 and 3): train the same MoE with
no normalization and with lambda = 0.5, 1, 2, and compare loss, token drop rate, how decisive the
gate is (Max1/Max2, Max2/Max3 of the gate probabilities; the paper plots the 3rd MoE layer) and one
token's gate distribution.

Every variant: 16 experts, top-2, capacity factor 1.25, a fixed auxiliary coefficient alpha = 1e-2
on the Switch-form balance loss (common.AUX_LOSS_NOTE says why not eq. 4), the same seeds (so the same
initial weights and the same data order).

    python experiments/gate_norm.py --scale smoke                     # seconds: every code path
    python experiments/gate_norm.py --scale small --seeds 2 --jobs 2  # the CPU results of the README
    python experiments/gate_norm.py --scale full --dry-run            # torchrun plan for a GPU node
    python experiments/gate_norm.py --scale full                      # launch it (FineWeb prepared)

Writes under --out (default runs/gate_norm/<scale>/): one directory per (variant, seed) with
train.py's metrics.jsonl and ckpt.pt, then gate_norm_<scale>.md / .json (the summary table) and
gate_norm_<scale>_curves.png (Fig. 2 + 3 left) and gate_norm_<scale>_gates.png (Fig. 3 right).
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as `python experiments/gate_norm.py`
    sys.path.insert(0, REPO)

from experiments import common  # noqa: E402

EXPERIMENT = "gate_norm"
DEFAULT_SEEDS = 2

# -----------------------------------------------------------------------------
# the variants (section 4.1: lambda tried 0.5, 1, 2; the final model uses 1)

VARIANTS = {
    "no_norm": dict(gate_norm=False),
    "lambda_0.5": dict(gate_norm=True, gate_lambda=0.5),
    "lambda_1": dict(gate_norm=True, gate_lambda=1.0),
    "lambda_2": dict(gate_norm=True, gate_lambda=2.0),
}
LABELS = {"no_norm": "no normalization", "lambda_0.5": "λ = 0.5", "lambda_1": "λ = 1", "lambda_2": "λ = 2"}
COLORS = {"no_norm": "tab:gray", "lambda_0.5": "tab:blue", "lambda_1": "tab:green", "lambda_2": "tab:red"}

# PAPER.md section 3 (2.5B params, 16 experts, top-2, ~76B tokens; ~ read off the figures)
PAPER = {
    "no_norm": {"loss": "~2.357", "drop": "~2.2 % and rising", "max1_max2": "~1.0 (from ~1.58)", "max2_max3": "~1.0"},
    "lambda_0.5": {"loss": "~2.344", "drop": "~1.0-1.1 %", "max1_max2": "~1.5", "max2_max3": "~1.12"},
    "lambda_1": {"loss": "~2.339", "drop": "~1.0-1.1 %", "max1_max2": "~3.1", "max2_max3": "~1.45"},
    "lambda_2": {"loss": "~2.336", "drop": "~1.6 % (above no-norm early)", "max1_max2": "~5.6", "max2_max3": "~1.77"},
}

# the MoE of every variant: capacity factor and aux coefficient fixed, as the paper's comparison needs.
# The aux loss is the Switch form n * sum_j f_j P_j at alpha = 1e-2 (see AUX_LOSS_NOTE).
MOE_KEYS = dict(n_expert=16, top_k=2, capacity_factor=1.25, aux_loss="switch", aux_coef_mode="fixed",
                aux_alpha=1e-2, moe_every=1)
SCALE_KEYS = {
    "smoke": dict(expert_hidden=32),
    # 16 experts of half the dense width (192 = 384 / 2): top-2 touches the dense model's FFN compute
    "small": dict(expert_hidden=192, max_iters=300),
    # GPT-2 small with 16 full-width SwiGLU experts per layer; 19,000 steps x 524,288 = ~10B tokens
    "full": dict(ep_size=common.FULL_EP_SIZE, max_iters=19000),
}


def job_keys(scale):
    return common.preset(scale, **MOE_KEYS, **SCALE_KEYS[scale])


def plan(scale, seeds, root, data_dir, max_iters=None):
    """One stage: every (variant, seed) run."""
    keys = job_keys(scale)
    if max_iters:
        keys["max_iters"] = max_iters
    return [common.local_data(common.grid(VARIANTS, seeds, root, keys), scale, data_dir)]

# -----------------------------------------------------------------------------
# analysis: metrics.jsonl of every run -> per-variant numbers (mean and sd over seeds)

def paper_layer(metrics):
    """The paper plots the 3rd MoE layer; a smaller model falls back to its last one."""
    return min(2, common.n_moe_layers(metrics) - 1)


def run_numbers(metrics):
    L = paper_layer(metrics)
    n_layers = common.n_moe_layers(metrics)
    _, loss = common.step_series(metrics, "loss")
    _, drop = common.step_series(metrics, "drop_rate")
    _, m12 = common.step_series(metrics, "max1_max2", L)
    _, m23 = common.step_series(metrics, "max2_max3", L)
    last = metrics["evals"][-1]
    return {
        "val_loss": last["val_loss"], "train_loss_eval": last["train_loss"],
        "train_loss_late": common.tail_mean(loss, 0.1),
        "drop_early": common.head_mean(drop, 0.25), "drop_late": common.tail_mean(drop),
        "drop_late_per_layer": [common.tail_mean(common.step_series(metrics, "drop_rate", i)[1])
                                for i in range(n_layers)],
        "max1_max2_start": common.head_mean(m12), "max1_max2_late": common.tail_mean(m12),
        "max2_max3_start": common.head_mean(m23), "max2_max3_late": common.tail_mean(m23),
        "max1_max2_late_per_layer": [common.tail_mean(common.step_series(metrics, "max1_max2", i)[1])
                                     for i in range(n_layers)],
        "paper_layer": L,
    }


def summarise(runs, data_dir):
    """Numbers per run, grouped by variant, plus the gate snapshot of the first seed's final model."""
    by_variant = {}
    for run in runs:
        m = common.read_metrics(run.out_dir)
        by_variant.setdefault(run.variant, []).append({"seed": run.seed, **run_numbers(m)})
    snapshots = {}
    first_seed = runs[0].seed
    for run in runs:
        if run.seed != first_seed:
            continue
        ckpt = os.path.join(run.out_dir, "ckpt.pt")
        model = common.load_model(ckpt)
        x = common.val_batch(data_dir, run.keys["dataset"], model.cfg.block_size, 8, seed=0)
        layer = by_variant[run.variant][0]["paper_layer"]
        snapshots[run.variant] = common.gate_snapshot(model, x, layer)
    return {"variants": by_variant, "gate_snapshot": snapshots}


def table(summary):
    rows = []
    for v, runs in summary["variants"].items():
        col = lambda k, **kw: common.fmt_ms([r[k] for r in runs], **kw)  # noqa: E731
        p = PAPER[v]
        rows.append([LABELS[v], col("val_loss"), col("train_loss_late"),
                     col("drop_early", digits=2, scale=100, suffix=" %"),
                     col("drop_late", digits=2, scale=100, suffix=" %"),
                     f"{col('max1_max2_start', digits=2)} → {col('max1_max2_late', digits=2)}",
                     f"{col('max2_max3_start', digits=2)} → {col('max2_max3_late', digits=2)}",
                     f"{p['loss']} / {p['drop']} / {p['max1_max2']} / {p['max2_max3']}"])
    return common.markdown_table(
        ["run", "val loss (final)", "train loss (last 10 %)", "drop rate (first 25 %)",
         "drop rate (last 20 %)", "Max1/Max2, layer 3 (start → late)", "Max2/Max3, layer 3 (start → late)",
         "paper: loss / drop / Max1/Max2 / Max2/Max3"], rows)

def paired_diff(summary, key, variant, base="no_norm", scale=1.0):
    """variant - base of `key`, paired by seed: (mean, sd) over seeds."""
    b = {r["seed"]: r[key] for r in summary["variants"][base]}
    return common.mean_sd([scale * (r[key] - b[r["seed"]]) for r in summary["variants"][variant] if r["seed"] in b])


def claims(summary):
    """The paper's section 4.1 claims, each with our numbers (differences paired by seed)."""
    v = summary["variants"]
    late = {k: common.mean_sd([r["max1_max2_late"] for r in rs])[0] for k, rs in v.items()}
    start = {k: common.mean_sd([r["max1_max2_start"] for r in rs])[0] for k, rs in v.items()}
    lams = [k for k in ("lambda_0.5", "lambda_1", "lambda_2") if k in v]
    grows = all(late[a] < late[b] for a, b in zip(lams, lams[1:]))
    lines = [f"- Max1/Max2 (layer 3, late) by lambda: {' < '.join(f'{late[k]:.2f}' for k in lams)} "
             f"-> grows with lambda: {'yes' if grows else 'no'}."]
    if "no_norm" not in v:
        return "\n".join(lines)
    lines.append(f"- no normalization: Max1/Max2 {start['no_norm']:.2f} (first 5 %) -> {late['no_norm']:.2f} (last 20 %): "
                 f"{'drifts toward 1' if abs(late['no_norm'] - 1) < abs(start['no_norm'] - 1) else 'does not drift toward 1'}.")
    for k in lams:
        d_drop, s_drop = paired_diff(summary, "drop_late", k, scale=100)
        d_val, s_val = paired_diff(summary, "val_loss", k)
        d_tr, s_tr = paired_diff(summary, "train_loss_late", k)
        lines.append(f"- {LABELS[k]} minus no normalization: drop rate {d_drop:+.2f} ± {s_drop:.2f} points, "
                     f"val loss {d_val:+.4f} ± {s_val:.4f}, train loss {d_tr:+.4f} ± {s_tr:.4f}.")
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# plots: Fig. 2 (loss, drop rate) and Fig. 3 (gate ratios over time, one token's gates)

def plot_curves(runs, path, xscale_label="iteration"):
    metrics = {r.name: common.read_metrics(r.out_dir) for r in runs}
    fig, ax = common.new_figure(2, 3)
    window = 10
    base = {r.seed: common.step_series(metrics[r.name], "loss") for r in runs if r.variant == "no_norm"}
    for v in VARIANTS:
        rs = [r for r in runs if r.variant == v]
        if not rs:
            continue
        ms = [metrics[r.name] for r in rs]
        L = paper_layer(ms[0])
        kw = dict(label=LABELS[v], color=COLORS[v])
        common.plot_band(ax[0, 0], [common.step_series(m, "loss") for m in ms], window=window, **kw)
        if base:
            diffs = [(it, y - base[r.seed][1][:len(y)]) for r, (it, y) in
                     zip(rs, [common.step_series(m, "loss") for m in ms]) if r.seed in base]
            common.plot_band(ax[0, 1], diffs, window=4 * window, **kw)
        common.plot_band(ax[0, 2], [common.eval_series(m, "val_loss") for m in ms], marker=".", **kw)
        drops = [(it, 100 * y) for it, y in (common.step_series(m, "drop_rate") for m in ms)]
        common.plot_band(ax[1, 0], drops, window=window, **kw)
        common.plot_band(ax[1, 1], [common.step_series(m, "max1_max2", L) for m in ms], window=window, **kw)
        common.plot_band(ax[1, 2], [common.step_series(m, "max2_max3", L) for m in ms], window=window, **kw)
    titles = ["training loss (smoothed)", "training loss − no-norm's (same seed)", "validation loss",
              "token drop rate, mean over layers (%)", "Max1/Max2, MoE layer 3", "Max2/Max3, MoE layer 3"]
    for a, t in zip(ax.flat, titles):
        a.set_title(t, fontsize=10)
        a.set_xlabel(xscale_label)
        a.grid(alpha=0.3)
    ax[0, 1].axhline(0, color="k", lw=0.5)
    ax[1, 1].axhline(1, color="k", lw=0.5, ls=":")
    ax[1, 2].axhline(1, color="k", lw=0.5, ls=":")
    common.zoom_y(ax[0, 0], 1.0)
    common.zoom_y(ax[0, 2], 0.25)
    ax[0, 0].legend(fontsize=8)
    fig.suptitle("Gating logit normalization (Skywork-MoE Fig. 2-3): mean over seeds, band = min..max")
    return common.save_figure(fig, path)


def plot_gates(summary, path):
    import numpy as np
    snaps = summary["gate_snapshot"]
    fig, ax = common.new_figure(1, 2, width=5.0)
    E = len(next(iter(snaps.values()))["token_sorted"])
    width = 0.8 / max(1, len(snaps))
    for i, (v, s) in enumerate(snaps.items()):
        ax[0, 0].bar(np.arange(E) + i * width, s["token_probs"], width, label=LABELS[v], color=COLORS[v])
        ax[0, 1].plot(np.arange(1, E + 1), s["mean_sorted"], marker=".", label=LABELS[v], color=COLORS[v])
    ax[0, 0].axhline(1 / E, color="k", lw=0.5, ls=":")
    ax[0, 0].set_title("one token's gate probabilities (MoE layer 3)", fontsize=10)
    ax[0, 0].set_xlabel("expert")
    ax[0, 1].set_yscale("log")
    ax[0, 1].set_title("sorted gate probabilities, mean over tokens", fontsize=10)
    ax[0, 1].set_xlabel("rank")
    for a in ax.flat:
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    return common.save_figure(fig, path)

# -----------------------------------------------------------------------------
# the command

def analyse(stages, scale, out, data_dir, log=print):
    runs = common.all_runs(stages)
    summary = summarise(runs, data_dir)
    stem = f"{EXPERIMENT}_{scale}"
    keys = runs[0].keys
    setup = (common.describe_setup(runs) + f" {keys['aux_loss']} aux loss with fixed alpha {keys['aux_alpha']} ({common.AUX_LOSS_NOTE}). Max ratios "
             "are the 3rd MoE layer's, means over the first 5 % (start) and last 20 % (late) of logged steps.")
    md, js = common.write_summary(out, stem, f"Gating logit normalization, scale {scale}",
                                  [("Setup", setup), ("Results", table(summary)),
                                   ("The paper's claims, our numbers", claims(summary))],
                                  {"setup": setup, "keys": keys, **summary, "paper": PAPER})
    plot_curves(runs, os.path.join(out, stem + "_curves.png"))
    plot_gates(summary, os.path.join(out, stem + "_gates.png"))
    log(open(md).read())
    return summary


def main(argv=None):
    return common.run_experiment(argv, EXPERIMENT, __doc__.strip().splitlines()[0], DEFAULT_SEEDS, plan, analyse,
                                 list(VARIANTS))

if __name__ == "__main__":
    main(sys.argv[1:])
