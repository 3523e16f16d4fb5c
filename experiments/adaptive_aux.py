"""
Adaptive auxiliary loss coefficients (Skywork-MoE section 4.2, eq. 7-9; Fig. 4) beside the usual
alternatives: fixed alpha = 1e-2, fixed alpha = 1e-3, no auxiliary loss, the adaptive per-layer alpha
(xi = 1/5, alpha_max = 1e-2, beta = 0.99, starting at 1e-2 as the paper's figure does), and the
auxiliary-loss-free selection bias (Wang et al. 2024, u = 1e-3; PAPER.md section 8).

Every variant: 16 experts, top-2, capacity factor 1.25, gating logit normalization with lambda = 1
(the Skywork-MoE setting), the Switch-form balance loss where there is one (common.AUX_LOSS_NOTE),
the same seeds.
Records per-layer drop rate and alpha over time, load coefficient of variation, final loss; and checks
the claim that the adaptive alpha follows xi * d of its own layer with a lag of about 1/(1-beta) steps.

    python experiments/adaptive_aux.py --scale smoke
    python experiments/adaptive_aux.py --scale small --seeds 2 --jobs 2   # the README's CPU results
    python experiments/adaptive_aux.py --scale full --dry-run

Writes under --out (default runs/adaptive_aux/<scale>/) one directory per (variant, seed), then
adaptive_aux_<scale>.md / .json and adaptive_aux_<scale>_curves.png.
"""
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as `python experiments/adaptive_aux.py`
    sys.path.insert(0, REPO)

from experiments import common  # noqa: E402

EXPERIMENT = "adaptive_aux"
DEFAULT_SEEDS = 2
XI, ALPHA_MAX, BETA = 0.2, 1e-2, 0.99     # eq. 8-9, Skywork-MoE's values

# -----------------------------------------------------------------------------
# the variants

VARIANTS = {
    "fixed_1e-2": dict(aux_loss="switch", aux_coef_mode="fixed", aux_alpha=1e-2),
    "fixed_1e-3": dict(aux_loss="switch", aux_coef_mode="fixed", aux_alpha=1e-3),
    "no_aux": dict(aux_loss="none", aux_coef_mode="fixed", aux_alpha=0.0),
    # eq. 7-9: alpha_hat = min(xi d, alpha_max); alpha <- beta alpha + (1 - beta) alpha_hat
    "adaptive": dict(aux_loss="switch", aux_coef_mode="adaptive", aux_alpha=1e-2, aux_xi=XI,
                     aux_alpha_max=ALPHA_MAX, aux_beta=BETA),
    # b_i += u sign(mean load - load_i), on the selection scores only; no auxiliary loss
    "aux_free": dict(aux_loss="none", aux_coef_mode="fixed", aux_alpha=0.0, aux_free_bias=True,
                     bias_update_rate=1e-3),
}
LABELS = {"fixed_1e-2": "fixed α = 1e-2", "fixed_1e-3": "fixed α = 1e-3", "no_aux": "no aux loss",
          "adaptive": "adaptive α (eq. 7-9)", "aux_free": "aux-loss-free bias"}
COLORS = {"fixed_1e-2": "tab:blue", "fixed_1e-3": "tab:orange", "no_aux": "tab:gray",
          "adaptive": "tab:green", "aux_free": "tab:purple"}
PAPER = {
    "fixed_1e-2": "typical fixed value (no loss reported)",
    "fixed_1e-3": "typical fixed value (no loss reported)",
    "no_aux": "-",
    "adaptive": "most layers drop ~0.2-0.8 % with alpha ~0.0004-0.0016; layer 1 worst (drop up to ~5-6 %, "
                "alpha up to ~0.0086); no loss comparison published",
    "aux_free": "Wang et al.: val PPL 9.50 vs 9.56 with aux loss; max load violation 0.04 vs 0.72",
}

MOE_KEYS = dict(n_expert=16, top_k=2, capacity_factor=1.25, gate_norm=True, gate_lambda=1.0, moe_every=1)
SCALE_KEYS = {
    "smoke": dict(expert_hidden=32, max_iters=24, log_interval=1),
    # the gate_norm.py model; every step logged so alpha can be compared with xi * d step by step
    "small": dict(expert_hidden=192, max_iters=200, log_interval=1),
    "full": dict(ep_size=common.FULL_EP_SIZE, max_iters=19000, log_interval=1),
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
# analysis

def centred_mean(values, half):
    """Centred moving average with a window of 2 * half + 1 (shorter at the ends)."""
    c = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))
    n = len(values)
    lo = np.clip(np.arange(n) - half, 0, n)
    hi = np.clip(np.arange(n) + half + 1, 0, n)
    return (c[hi] - c[lo]) / (hi - lo)


def tracking_lag(it, alpha, drop, xi=XI, alpha_max=ALPHA_MAX, beta=BETA):
    """How far behind its target xi * d the adaptive alpha runs: the shift L (in iterations) that best
    aligns alpha(t) with the centred moving average of min(xi d, alpha_max) at t - L (least squares,
    searched over 0 .. 4/(1-beta)). An exponential average with factor beta lags a trend by
    beta/(1-beta) ~ 1/(1-beta) steps, so eq. 9 predicts ~100 steps for beta = 0.99."""
    step = float(it[1] - it[0]) if len(it) > 1 else 1.0
    horizon = 1.0 / (1.0 - beta)
    target = centred_mean(np.minimum(xi * np.asarray(drop), alpha_max), int(horizon / step / 2))
    alpha = np.asarray(alpha, dtype=float)
    max_shift = min(int(4 * horizon / step), len(alpha) // 2)
    errs = [np.mean((alpha[s:] - target[:len(target) - s]) ** 2) for s in range(max_shift + 1)]
    return float(np.argmin(errs) * step)


def run_numbers(metrics, keys):
    n_layers = common.n_moe_layers(metrics)
    _, loss = common.step_series(metrics, "loss")
    per_layer = []
    for i in range(n_layers):
        it, d = common.step_series(metrics, "drop_rate", i)
        _, a = common.step_series(metrics, "alpha", i)
        _, cv = common.step_series(metrics, "load_cv", i)
        rec = {"drop_late": common.tail_mean(d), "drop_peak": float(np.nanmax(common.smooth(d, 20))),
               "load_cv_late": common.tail_mean(cv), "alpha_final": float(a[-1]), "alpha_late": common.tail_mean(a),
               "xi_d_late": common.tail_mean(np.minimum(XI * d, ALPHA_MAX))}
        if keys.get("aux_coef_mode") == "adaptive":
            rec["lag_steps"] = tracking_lag(it, a, d, keys["aux_xi"], keys["aux_alpha_max"], keys["aux_beta"])
        per_layer.append(rec)
    last = metrics["evals"][-1]
    return {"val_loss": last["val_loss"], "train_loss_late": common.tail_mean(loss, 0.1),
            "drop_late": float(np.mean([r["drop_late"] for r in per_layer])),
            "load_cv_late": float(np.mean([r["load_cv_late"] for r in per_layer])),
            "layers": per_layer}


def summarise(runs):
    by_variant = {}
    for run in runs:
        m = common.read_metrics(run.out_dir)
        by_variant.setdefault(run.variant, []).append({"seed": run.seed, **run_numbers(m, run.keys)})
    return {"variants": by_variant}


def tables(summary):
    rows = []
    for v, rs in summary["variants"].items():
        col = lambda k, **kw: common.fmt_ms([r[k] for r in rs], **kw)  # noqa: E731
        n_layers = len(rs[0]["layers"])
        drops = " / ".join(common.fmt_ms([r["layers"][i]["drop_late"] for r in rs], digits=1, scale=100)
                           for i in range(n_layers))
        alphas = " / ".join(f"{np.mean([r['layers'][i]['alpha_final'] for r in rs]):.4f}" for i in range(n_layers))
        rows.append([LABELS[v], col("val_loss"), col("train_loss_late"),
                     col("drop_late", digits=2, scale=100, suffix=" %"), drops,
                     col("load_cv_late", digits=3), alphas, PAPER[v]])
    main = common.markdown_table(
        ["run", "val loss (final)", "train loss (last 10 %)", "drop rate (last 20 %)",
         "drop % per layer (last 20 %)", "load CV (last 20 %)", "alpha per layer (final)", "paper"], rows)
    track_rows = []
    for r in summary["variants"].get("adaptive", []):
        for i, lay in enumerate(r["layers"]):
            track_rows.append([r["seed"], i + 1, f"{100 * lay['drop_late']:.2f} %",
                               f"{lay['xi_d_late']:.5f}", f"{lay['alpha_late']:.5f}",
                               f"{lay['alpha_late'] / max(lay['xi_d_late'], 1e-12):.2f}", f"{lay['lag_steps']:.0f}"])
    track = common.markdown_table(["seed", "MoE layer", "drop rate (last 20 %)", "min(ξd, α_max) (last 20 %)",
                                   "α (last 20 %)", "α / ξd", "fitted lag (steps)"], track_rows)
    return main, track

def claims(summary):
    """Does alpha track xi * d per layer, with what lag; what the variants do to drops and loss."""
    v = summary["variants"]
    lines = []
    if "adaptive" in v:
        n_layers = len(v["adaptive"][0]["layers"])
        for i in range(n_layers):
            ratio = [r["layers"][i]["alpha_late"] / max(r["layers"][i]["xi_d_late"], 1e-12) for r in v["adaptive"]]
            lag = [r["layers"][i]["lag_steps"] for r in v["adaptive"]]
            lines.append(f"- adaptive, MoE layer {i + 1}: alpha / min(xi d, alpha_max) late = {common.fmt_ms(ratio, 2)}, "
                         f"fitted lag {common.fmt_ms(lag, 0)} steps (eq. 9 predicts {BETA / (1 - BETA):.0f}).")
    base = {r["seed"]: r for r in v.get("fixed_1e-2", [])}
    for k, rs in v.items():
        if k == "fixed_1e-2" or not base:
            continue
        dv = common.mean_sd([r["val_loss"] - base[r["seed"]]["val_loss"] for r in rs if r["seed"] in base])
        dd = common.mean_sd([100 * (r["drop_late"] - base[r["seed"]]["drop_late"]) for r in rs if r["seed"] in base])
        lines.append(f"- {LABELS[k]} minus fixed 1e-2: val loss {dv[0]:+.4f} ± {dv[1]:.4f}, "
                     f"drop rate {dd[0]:+.2f} ± {dd[1]:.2f} points.")
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# plots: Fig. 4 (per-layer drop rate and alpha of the adaptive run) and the variants side by side

def plot_curves(runs, path):
    metrics = {r.name: common.read_metrics(r.out_dir) for r in runs}
    fig, ax = common.new_figure(2, 3)
    w = 20
    base = {r.seed: common.step_series(metrics[r.name], "loss")[1] for r in runs if r.variant == "fixed_1e-2"}
    for v in VARIANTS:
        rs = [r for r in runs if r.variant == v]
        if not rs:
            continue
        ms = [metrics[r.name] for r in rs]
        kw = dict(label=LABELS[v], color=COLORS[v])
        common.plot_band(ax[0, 0], [(it, 100 * y) for it, y in (common.step_series(m, "drop_rate") for m in ms)],
                         window=w, **kw)
        common.plot_band(ax[0, 1], [common.step_series(m, "load_cv") for m in ms], window=w, **kw)
        if base:
            diffs = [(it, y - base[r.seed][:len(y)]) for r, (it, y) in
                     zip(rs, (common.step_series(m, "loss") for m in ms)) if r.seed in base]
            common.plot_band(ax[0, 2], diffs, window=5 * w, **kw)
    adaptive = [r for r in runs if r.variant == "adaptive"]
    if adaptive:
        m = metrics[adaptive[0].name]
        for i in range(common.n_moe_layers(m)):
            it, d = common.step_series(m, "drop_rate", i)
            _, a = common.step_series(m, "alpha", i)
            line, = ax[1, 0].plot(it, 100 * common.smooth(d, w), label=f"layer {i + 1}")
            ax[1, 1].plot(it, a, color=line.get_color(), label=f"α, layer {i + 1}")
            ax[1, 1].plot(it, common.smooth(np.minimum(XI * d, ALPHA_MAX), w), color=line.get_color(),
                          ls=":", lw=0.8)
        ax[1, 1].set_ylim(0, None)
    for v in VARIANTS:
        rs = [r for r in runs if r.variant == v]
        if rs:
            common.plot_band(ax[1, 2], [common.eval_series(metrics[r.name], "val_loss") for r in rs],
                             label=LABELS[v], color=COLORS[v], marker=".")
    titles = ["token drop rate, mean over layers (%)", "load CV, mean over layers",
              "training loss − fixed 1e-2's (same seed)",
              f"adaptive run (seed {adaptive[0].seed if adaptive else '-'}): drop rate per layer (%)",
              "adaptive α per layer (solid) and min(ξ·d, α_max) (dotted)", "validation loss"]
    for a, t in zip(ax.flat, titles):
        a.set_title(t, fontsize=10)
        a.set_xlabel("iteration")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    ax[0, 2].axhline(0, color="k", lw=0.5)
    common.zoom_y(ax[1, 2], 0.25)
    fig.suptitle("Adaptive auxiliary loss coefficients (Skywork-MoE Fig. 4) and alternatives")
    return common.save_figure(fig, path)

# -----------------------------------------------------------------------------
# the command

def analyse(stages, scale, out, data_dir, log=print):
    runs = common.all_runs(stages)
    summary = summarise(runs)
    stem = f"{EXPERIMENT}_{scale}"
    keys = runs[0].keys
    setup = (common.describe_setup(runs) + f" Gate normalization lambda {keys['gate_lambda']}; {keys['aux_loss']} aux loss ({common.AUX_LOSS_NOTE}). Adaptive: "
             f"xi {XI}, alpha_max {ALPHA_MAX}, beta {BETA}, alpha starts at 1e-2. Aux-free: u = 1e-3. "
             "'Late' = last 20 % of steps.")
    main_table, track_table = tables(summary)
    md, _ = common.write_summary(
        out, stem, f"Adaptive auxiliary loss coefficients, scale {scale}",
        [("Setup", setup), ("Results", main_table),
         ("Does the adaptive alpha track xi * d of its layer?", track_table +
          f"\n\nEq. 9 is an exponential average with beta = {BETA}: it should lag a trend by "
          f"beta/(1-beta) = {BETA / (1 - BETA):.0f} steps (the fitted lag), and settle at alpha / (xi d) ~ 1."),
         ("The paper's claims, our numbers", claims(summary))],
        {"setup": setup, "keys": keys, **summary, "paper": PAPER})
    plot_curves(runs, os.path.join(out, stem + "_curves.png"))
    log(open(md).read())
    return summary


def main(argv=None):
    return common.run_experiment(argv, EXPERIMENT, __doc__.strip().splitlines()[0], DEFAULT_SEEDS, plan, analyse,
                                 list(VARIANTS))

if __name__ == "__main__":
    main(sys.argv[1:])
