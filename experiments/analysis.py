"""
The analysis half of the experiments: a run's metrics.jsonl as arrays, statistics over seeds and the
verdict rule, markdown / JSON summaries, plots with seed bands, and router probes of a trained model.
runner.py (the grid of training jobs) knows nothing of this file's contents; the experiment scripts
call both.

The verdict rule of the README's claim table (issue 10): a claim "reproduces" only when the effect
exceeds the seed spread in the claimed direction, "does not reproduce" needs the same evidence the other
way, and anything else is "inconclusive at this scale".

Nothing here runs on import; torch and matplotlib are imported inside the functions that need them.
"""

import json
import math
import os

import numpy as np

# -----------------------------------------------------------------------------
# metrics.jsonl -> arrays


class MetricsError(ValueError):
    pass


def read_metrics(out_dir):
    """{"steps": [training log records], "evals": [eval records]} of one run."""
    steps, evals = [], []
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise MetricsError(f"{path} not found: the run has not started (run the experiment without --analyse-only)")
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if "val_loss" in rec:
                evals.append(rec)
            elif "loss" in rec:
                steps.append(rec)
    if not steps or not evals:
        raise MetricsError(f"{path} has no training or eval records: rerun with --force")
    return {"steps": steps, "evals": evals}


def n_moe_layers(metrics):
    return len(metrics["steps"][0].get("layers") or [])


def layer_value(rec, key):
    """One MoE layer's logged statistic; "max1_max2_of_means" of runs logged before that statistic
    existed is not recomputed (nan)."""
    v = rec.get(key)
    return np.nan if v is None else v


def step_series(metrics, key, layer=None):
    """(iters, values) of a per-step key: "loss", "lr", "tokens", or a router statistic of MoE layer
    `layer` (an index into the MoE layers; None = mean over them)."""
    steps = metrics["steps"]
    it = np.array([s["iter"] for s in steps], dtype=float)
    if key in ("loss", "lr", "tokens"):
        return it, np.array([s[key] for s in steps], dtype=float)
    vals_SL = np.array([[layer_value(r, key) for r in s["layers"]] for s in steps], dtype=float)
    return it, (vals_SL[:, layer] if layer is not None else vals_SL.mean(axis=1))


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
    """Trailing moving average (window >= 1; shorter at the start)."""
    values = np.asarray(values, dtype=float)
    if window <= 1 or len(values) < 2:
        return values
    c = np.cumsum(np.insert(values, 0, 0.0))
    lo = np.maximum(0, np.arange(1, len(values) + 1) - window)
    hi = np.arange(1, len(values) + 1)
    return (c[hi] - c[lo]) / (hi - lo)


def peak_and_fall(values, window, where=None):
    """(peak, final, fall) of a smoothed series: its highest value (among the points `where` is true, a
    boolean mask; all by default), its last value, and the fraction of the peak's excess over 1 that is
    gone by the end ((peak - final) / (peak - 1); a ratio of gate probabilities is >= 1, and 1 is a flat
    gate)."""
    s = smooth(values, window)
    candidates = s if where is None or not np.any(where) else s[np.asarray(where)]
    peak, final = float(np.nanmax(candidates)), float(s[-1])
    return peak, final, (peak - final) / max(peak - 1.0, 1e-12)


# -----------------------------------------------------------------------------
# statistics over seeds, and the verdict rule


def mean_sd(values):
    """(mean, sample standard deviation over seeds; 0 for one seed)."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def fmt_ms(values, digits=3, scale=1.0, suffix=""):
    """ "mean ± sd" of a list over seeds (just the value for one seed)."""
    m, s = mean_sd([None if v is None else v * scale for v in values])
    if math.isnan(m):
        return "n/a"
    if len(values) == 1:
        return f"{m:.{digits}f}{suffix}"
    return f"{m:.{digits}f} ± {s:.{digits}f}{suffix}"


def fmt_seeds(values, digits=3, scale=1.0):
    """Every seed's value, for the tables that show the spread as well as its summary."""
    return ", ".join(f"{scale * v:.{digits}f}" for v in values)


def verdict(effects, claimed_sign=+1):
    """The rule for one claim, from its per-seed effects (each a paired difference, or a per-seed
    test statistic, oriented so that the claim says its sign is `claimed_sign`):
      "reproduces"              mean - sd > 0 in the claimed direction and every seed agrees
      "does not reproduce"      the same evidence the other way (mean + sd < 0, every seed agrees)
      "inconclusive at this scale"   otherwise, or with fewer than 2 seeds"""
    e = np.asarray(effects, dtype=float) * claimed_sign
    if len(e) < 2 or not np.all(np.isfinite(e)):
        return "inconclusive at this scale"
    m, s = float(e.mean()), float(e.std(ddof=1))
    if m - s > 0 and np.all(e > 0):
        return "reproduces"
    if m + s < 0 and np.all(e < 0):
        return "does not reproduce"
    return "inconclusive at this scale"


OUR_WORDS = {"reproduces": "holds", "does not reproduce": "the opposite holds"}


def verdict_words(verdict, ours):
    """The verdict of a claim of the paper as it is; of our own hypothesis (not the paper's) as
    "holds" / "the opposite holds" / "inconclusive at this scale"."""
    return OUR_WORDS.get(verdict, verdict) if ours else verdict


def claim_line(records, text, effects, sign=+1, digits=3, unit="", ours=False):
    """One claim scored by the rule (verdict) from its per-seed effects: appends its record to records
    (for the results .json) and returns its markdown line: mean ± sd, every seed, the verdict."""
    word = verdict_words(verdict(effects, sign), ours)
    m, s = mean_sd(effects)
    records.append({"claim": text, "effects": effects, "mean": m, "sd": s, "verdict": word, "ours": ours})
    return (
        f"- {'(ours) ' if ours else ''}{text}: {m:+.{digits}f} ± {s:.{digits}f}{unit} "
        f"(seeds: {fmt_seeds(effects, digits)}) -> **{word}**"
    )


def paired(by_variant, key, variant, base, scale=1.0):
    """variant - base of `key`, paired by seed: the list of per-seed differences."""
    b = {r["seed"]: r[key] for r in by_variant.get(base, [])}
    return [scale * (r[key] - b[r["seed"]]) for r in by_variant.get(variant, []) if r["seed"] in b]


# -----------------------------------------------------------------------------
# tables and files


def describe_setup(runs):
    """One sentence on the model and run length shared by the runs of a table."""
    k = runs[0].keys
    moe = (
        f"{k['n_expert']} experts (hidden {k.get('expert_hidden') or 'dense FFN'}) top-{k['top_k']}, "
        f"capacity factor {k.get('capacity_factor', 1.25)}"
        if k.get("n_expert")
        else "dense"
    )
    tokens = k["batch_size"] * k.get("grad_accum", 1) * k["block_size"]
    return (
        f"{k['n_layer']} layers x {k['n_embd']} wide, block {k['block_size']}, {moe}; "
        f"{k['max_iters']} iterations of {tokens:,} tokens ({k['dataset']}); "
        f"seeds {sorted({r.seed for r in runs})}, mean ± sd over seeds."
    )


def wall_times(runs):
    """ "mean s (min-max), total" of the runs' wall times from their done markers, single-threaded."""
    walls = []
    for r in runs:
        with open(os.path.join(r.out_dir, r.done_name)) as f:
            walls.append(json.load(f).get("wall_s", float("nan")))
    return (
        f"{np.mean(walls):.0f} s on average ({np.min(walls):.0f}-{np.max(walls):.0f} s), "
        f"{np.sum(walls) / 3600:.2f} CPU-hours in all"
    )


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
    md_path, json_path = os.path.join(out_dir, stem + ".md"), os.path.join(out_dir, stem + ".json")
    with open(md_path, "w") as f:
        f.write("\n".join(md))
    with open(json_path, "w") as f:
        json.dump(data, f, indent=1, default=float)
    return md_path, json_path


# -----------------------------------------------------------------------------
# plots (matplotlib's object API: no global backend state, safe inside notebooks and workers)


def new_figure(nrows, ncols, width=4.2, height=3.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def plot_band(ax, curves, label, color=None, window=1, xscale=1.0, seeds_too=False, **kw):
    """Mean over seeds as a line and min..max over seeds as a band (curves: [(x, y)] of one variant,
    cut to the shortest); seeds_too also draws every seed thinly."""
    n = min(len(y) for _, y in curves)
    x = np.asarray(curves[0][0][:n], dtype=float) * xscale
    ys = np.stack([smooth(np.asarray(y[:n], dtype=float), window) for _, y in curves])
    if label and len(curves) > 1:
        label = f"{label} (n={len(curves)})"
    (line,) = ax.plot(x, ys.mean(0), label=label or None, color=color, **kw)
    if len(curves) > 1:
        ax.fill_between(x, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
        if seeds_too:
            for y in ys:
                ax.plot(x, y, color=line.get_color(), lw=0.4, alpha=0.6)
    return line


def zoom_y(ax, span):
    """Show the lowest `span` of a loss panel (its first points would flatten the differences)."""
    ys = [np.nanmin(line.get_ydata()) for line in ax.get_lines() if len(line.get_ydata())]
    if ys:
        lo = float(min(ys))
        ax.set_ylim(lo - 0.05 * span, lo + span)


def finish_axes(axes, titles, xlabel="iteration", legend_size=7):
    for a, t in zip(axes.flat, titles):
        a.set_title(t, fontsize=9)
        a.set_xlabel(xlabel)
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=legend_size)


def save_figure(fig, path, dpi=72):
    fig.savefig(path, dpi=dpi)
    return path


# -----------------------------------------------------------------------------
# router probes of a trained model, through the project's own checkpoint and data functions


def load_model(ckpt_path):
    from checkpoint import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(ckpt_path))
    model.eval()
    return model


def val_batch(data_dir, dataset, block_size, batch_size, seed=0):
    """A fixed batch of validation windows (the same for every model compared), by train.py's own
    reader and sampler."""
    import torch

    from dataset import data_root, get_batch, load_split, read_vocab_size
    from train import TrainConfig

    tcfg = TrainConfig(data_dir=data_dir, dataset=dataset)
    data = load_split(os.path.join(data_root(tcfg), "val.bin"), block_size, read_vocab_size(tcfg))
    x, _ = get_batch(data, batch_size, block_size, torch.Generator().manual_seed(seed), torch.device("cpu"))
    return x


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
    return {
        "token_index": int(t),
        "token_probs": probs_TE[t].tolist(),
        "token_sorted": sorted_TE[t].tolist(),
        "mean_sorted": sorted_TE.mean(0).tolist(),
    }


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
