"""
Gating logit normalization (Skywork-MoE section 4.1, eq. 6; Fig. 2 and 3): does the gate drift toward
flat without normalization, and what does lambda do? The same 16-expert top-2 MoE trained long (5,000
steps at small scale) with:

    no_norm       (a) no normalization, Switch balance loss at alpha 1e-2
    no_norm_eq4   (b) no normalization, eq. 4 at the alpha that matches (a)'s balancing gradient
    no_norm_wd0   (c) no normalization, no weight decay on the gate (router_weight_decay=0)
    lambda_1      (d) eq. 6 with lambda = 1, the control
    lambda_0.5, lambda_2

Logged per MoE layer (router.STAT_NAMES): Max1/Max2 as the mean over tokens, the median, and mean-top-1 /
mean-top-2; Max2/Max3; the gate weight norm; the std of the gate logits before normalization; drop rate;
load CV. Every arm uses the same seeds (the same initial weights where the shapes agree, the same data).

    python -m experiments.gate_norm --scale smoke                     # seconds: every code path
    python -m experiments.gate_norm --scale small --jobs 1 --publish  # the CPU study (results/gate_norm_small.*)
    python -m experiments.gate_norm --scale full --dry-run            # the paper-sized plan for GPUs

Writes under --out (default runs/gate_norm/<scale>/) one directory per (variant, seed), then
gate_norm_<scale>.md / .json, gate_norm_<scale>_curves.png and gate_norm_<scale>_gates.png.
"""

if not __package__:  # run as a script: make the repository importable
    import _repo  # noqa: F401

import os

import numpy as np

from experiments import analysis as an
from experiments import runner

EXPERIMENT = "gate_norm"
DEFAULT_SEEDS = 3

# eq. 4's alpha for arm (b): 1e-2 times the ratio of the Switch loss's gradient on the gate weights to
# eq. 4's, measured on arm (a)'s model (experiments/balance_loss.py, results/balance_loss_small.md:
# geometric mean 31.6 over 3 MoE layers x 4 batches, range 18-73, after 400 steps of arm (a))
EQ4_MATCHED_ALPHA = 0.3

# -----------------------------------------------------------------------------
# the variants (section 4.1: lambda tried 0.5, 1, 2; the final model uses 1)

VARIANTS = {
    "no_norm": dict(gate_norm=False),
    "no_norm_eq4": dict(gate_norm=False, aux_loss="eq4", aux_alpha=EQ4_MATCHED_ALPHA),
    "no_norm_wd0": dict(gate_norm=False, router_weight_decay=0.0),
    "lambda_1": dict(gate_norm=True, gate_lambda=1.0),
    "lambda_0.5": dict(gate_norm=True, gate_lambda=0.5),
    "lambda_2": dict(gate_norm=True, gate_lambda=2.0),
}
DEFAULT_VARIANTS = ("no_norm", "no_norm_eq4", "no_norm_wd0", "lambda_1")  # then --variants lambda_0.5,lambda_2
LABELS = {
    "no_norm": "no norm, Switch 1e-2",
    "no_norm_eq4": f"no norm, eq. 4 at {EQ4_MATCHED_ALPHA}",
    "no_norm_wd0": "no norm, gate WD 0",
    "lambda_1": "λ = 1",
    "lambda_0.5": "λ = 0.5",
    "lambda_2": "λ = 2",
}
COLORS = {
    "no_norm": "tab:gray",
    "no_norm_eq4": "tab:brown",
    "no_norm_wd0": "tab:purple",
    "lambda_1": "tab:green",
    "lambda_0.5": "tab:blue",
    "lambda_2": "tab:red",
}

# PAPER.md section 3 (2.5B params, 16 experts, top-2, ~76B tokens; ~ read off the figures)
PAPER = {
    "no_norm": {"loss": "~2.357", "drop": "~2.2 % and rising", "max1_max2": "~1.0 (peak ~1.58)"},
    "lambda_0.5": {"loss": "~2.344", "drop": "~1.0-1.1 %", "max1_max2": "~1.5"},
    "lambda_1": {"loss": "~2.339", "drop": "~1.0-1.1 %", "max1_max2": "~3.1"},
    "lambda_2": {"loss": "~2.336", "drop": "~1.6 %", "max1_max2": "~5.6"},
}
PAPER_TOKENS = 76e9

# the readout, stated before the runs (results/gate_norm_small.md repeats it)
DRIFT_FALL = 0.30  # Max1/Max2 must fall >= 30 % of its own peak value ...
SMOOTH = 25  # ... on the curve smoothed over 25 logged points (250 steps at small scale)
READOUT = (
    f"The drift of section 4.1 reproduces if, in MoE layer 3, no normalization's Max1/Max2 (mean over "
    f"tokens, smoothed over {SMOOTH} logged points) falls at least {DRIFT_FALL:.0%} below its own peak "
    "((peak - final) / peak >= 0.30, the peak taken after the warm-up) in every seed while lambda = 1's "
    "does not in any seed. Stated before the runs."
)

MOE_KEYS = dict(
    n_expert=16, top_k=2, capacity_factor=1.25, aux_loss="switch", aux_coef_mode="fixed", aux_alpha=1e-2, moe_every=1
)
SCALE_KEYS = {
    "smoke": dict(expert_hidden=32, max_iters=16),
    "small": dict(expert_hidden=64, max_iters=5000),
    # 2.5B total parameters as the paper's model: 16 layers x 1024, 16 SwiGLU experts of 2944, top-2.
    # 48,000 steps x 524,288 = 25B tokens: a third of the paper's 76B, where its no-normalization curve
    # has finished its decay (~25B); the full 76B would cost 3x the GPU-hours
    "full": dict(n_layer=16, n_head=16, n_embd=1024, expert_hidden=2944, ep_size=runner.FULL_EP_SIZE, max_iters=48000),
}
PLAN_NOTES = (
    "Smaller than the paper: 25B tokens per run against ~76B (the no-normalization decay is complete "
    "at ~25B in the paper's Fig. 3); the same 2.5B / 16-expert / top-2 model.",
)


def job_keys(scale):
    return runner.preset(scale, **MOE_KEYS, **SCALE_KEYS[scale])


def paper_tokens(run):
    return PAPER_TOKENS


# -----------------------------------------------------------------------------
# analysis: metrics.jsonl of every run -> per-run numbers


def paper_layer(metrics):
    """The paper plots the 3rd MoE layer; a smaller model falls back to its last one."""
    return min(2, an.n_moe_layers(metrics) - 1)


def run_numbers(metrics, warmup_iters):
    L, n_layers = paper_layer(metrics), an.n_moe_layers(metrics)
    _, loss = an.step_series(metrics, "loss")
    _, drop = an.step_series(metrics, "drop_rate")
    rec = {
        "val_loss": metrics["evals"][-1]["val_loss"],
        "train_loss_late": an.tail_mean(loss, 0.1),
        "drop_early": an.head_mean(drop, 0.25),
        "drop_late": an.tail_mean(drop),
        "drop_late_per_layer": [an.tail_mean(an.step_series(metrics, "drop_rate", i)[1]) for i in range(n_layers)],
        "load_cv_late": an.tail_mean(an.step_series(metrics, "load_cv")[1]),
        "paper_layer": L,
    }
    window = min(SMOOTH, max(1, len(loss) // 4))
    it, _ = an.step_series(metrics, "loss")
    after_warmup = it > warmup_iters  # the peak of a ratio is read after the warm-up (the readout)
    for key in ("max1_max2", "max1_max2_median", "max1_max2_of_means", "max2_max3"):
        _, v = an.step_series(metrics, key, L)
        peak, final, fall_excess = an.peak_and_fall(v, window, after_warmup)
        rec[key] = {
            "start": an.head_mean(v),
            "peak": peak,
            "final": final,
            "late": an.tail_mean(v),
            "fall": (peak - final) / peak,
            "fall_excess": fall_excess,
        }
    for key in ("logit_std", "router_weight_norm"):
        _, v = an.step_series(metrics, key, L)
        rec[key] = {"start": an.head_mean(v), "peak": float(np.nanmax(an.smooth(v, window))), "late": an.tail_mean(v)}
    return rec


def summarise(runs, data_dir):
    """Numbers per run grouped by variant, plus the gate snapshot of the first seed's final models."""
    by_variant = {}
    for run in runs:
        numbers = run_numbers(an.read_metrics(run.out_dir), run.keys["warmup_iters"])
        by_variant.setdefault(run.variant, []).append({"seed": run.seed, **numbers})
    snapshots = {}
    first_seed = min(r.seed for r in runs)
    for run in runs:
        ckpt = os.path.join(run.out_dir, "ckpt.pt")
        if run.seed == first_seed and os.path.isfile(ckpt):
            model = an.load_model(ckpt)
            x = an.val_batch(data_dir, run.keys["dataset"], model.cfg.block_size, 8, seed=0)
            snapshots[run.variant] = an.gate_snapshot(model, x, by_variant[run.variant][0]["paper_layer"])
    return {"variants": by_variant, "gate_snapshot": snapshots}


def table(summary):
    rows = []
    for v, rs in summary["variants"].items():

        def col(key, sub=None, **kw):
            return an.fmt_ms([r[key][sub] if sub else r[key] for r in rs], **kw)

        rows.append(
            [
                LABELS[v],
                len(rs),
                col("val_loss"),
                col("drop_late", digits=2, scale=100, suffix=" %"),
                col("load_cv_late", digits=2),
                f"{col('max1_max2', 'start', digits=2)} / {col('max1_max2', 'peak', digits=2)} / "
                f"{col('max1_max2', 'final', digits=2)}",
                col("max1_max2", "fall", digits=2),
                col("max1_max2_median", "late", digits=2),
                col("max1_max2_of_means", "late", digits=2),
                col("max2_max3", "late", digits=2),
                f"{col('router_weight_norm', 'start', digits=2)} → {col('router_weight_norm', 'late', digits=2)}",
                f"{col('logit_std', 'start', digits=2)} → {col('logit_std', 'late', digits=2)}",
                " / ".join(PAPER[v].values()) if v in PAPER else "-",
            ]
        )
    return an.markdown_table(
        [
            "run",
            "seeds",
            "val loss (final)",
            "drop (last 20 %)",
            "load CV (last 20 %)",
            "Max1/Max2 mean: start / peak / final",
            "fall from peak",
            "Max1/Max2 median (late)",
            "mean top-1 / mean top-2 (late)",
            "Max2/Max3 (late)",
            "gate weight norm",
            "gate logit std (raw)",
            "paper: loss / drop / Max1/Max2",
        ],
        rows,
    )


def per_seed_table(summary):
    rows = []
    for v, rs in summary["variants"].items():
        for r in rs:
            m = r["max1_max2"]
            rows.append(
                [
                    LABELS[v],
                    r["seed"],
                    f"{r['val_loss']:.4f}",
                    f"{100 * r['drop_late']:.2f} %",
                    f"{m['start']:.2f}",
                    f"{m['peak']:.2f}",
                    f"{m['final']:.2f}",
                    f"{m['fall']:.2f}",
                    f"{r['max1_max2_of_means']['late']:.2f}",
                    f"{r['router_weight_norm']['late']:.2f}",
                ]
            )
    return an.markdown_table(
        [
            "run",
            "seed",
            "val loss",
            "drop (late)",
            "Max1/Max2 start",
            "peak",
            "final",
            "fall",
            "top-1/top-2 of means (late)",
            "gate norm (late)",
        ],
        rows,
    )


def paired_fall(by_variant, variant, base, which="fall"):
    """variant - base of Max1/Max2's `which` ("fall" from peak, or "late" level), paired by seed."""
    flat = {k: [{"seed": r["seed"], which: r["max1_max2"][which]} for r in rs] for k, rs in by_variant.items()}
    return an.paired(flat, which, variant, base)


def claims(summary):
    """One line per claim of section 4.1: the per-seed effect, mean ± sd, and the verdict by the rule."""
    v = summary["variants"]
    out = []

    def line(*args, **kw):
        return an.claim_line(out, *args, **kw)

    lines = []
    if "no_norm" in v:
        falls = [r["max1_max2"]["fall"] for r in v["no_norm"]]
        ctrl = [r["max1_max2"]["fall"] for r in v.get("lambda_1", [])]
        hit = all(f >= DRIFT_FALL for f in falls) and ctrl and all(f < DRIFT_FALL for f in ctrl)
        lines.append(
            f"- Readout: no normalization's fall from peak {an.fmt_seeds(falls, 2)}, lambda = 1's "
            f"{an.fmt_seeds(ctrl, 2) or 'n/a'} (threshold {DRIFT_FALL}) -> the drift "
            f"{'reproduces' if hit else 'does not reproduce by the stated readout'}."
        )
        lines.append(
            line(
                f"without normalization the gate drifts toward flat: no norm's fall from peak minus the "
                f"readout's {DRIFT_FALL}",
                [f - DRIFT_FALL for f in falls],
                digits=3,
            )
        )
        if ctrl:
            lines.append(
                line(
                    "the same, relative to the control: no norm's fall from peak minus lambda 1's",
                    paired_fall(v, "no_norm", "lambda_1"),
                    digits=3,
                )
            )
            lines.append(
                line(
                    "normalization keeps the gate more decisive: late Max1/Max2 (mean of ratios), "
                    "lambda 1 minus no norm",
                    paired_fall(v, "lambda_1", "no_norm", "late"),
                    digits=2,
                )
            )
    for k in ("lambda_1", "lambda_0.5", "lambda_2"):
        if k in v and "no_norm" in v:
            lines.append(
                line(
                    f"{LABELS[k]} has a lower late drop rate than no norm (points)",
                    an.paired(v, "drop_late", "no_norm", k, scale=100),
                    digits=2,
                )
            )
            lines.append(
                line(
                    f"{LABELS[k]} has a lower final val loss than no norm",
                    an.paired(v, "val_loss", "no_norm", k),
                    digits=4,
                )
            )
    lams = [k for k in ("lambda_0.5", "lambda_1", "lambda_2") if k in v]
    for a, b in zip(lams, lams[1:]):
        lines.append(
            line(
                f"Max1/Max2 (late) grows with lambda: {LABELS[b]} minus {LABELS[a]}",
                paired_fall(v, b, a, "late"),
                digits=2,
            )
        )
    if "no_norm_wd0" in v and "no_norm" in v:
        norms = {
            k: [{"seed": r["seed"], "norm": r["router_weight_norm"]["late"]} for r in v[k]]
            for k in ("no_norm_wd0", "no_norm")
        }
        lines.append(
            line(
                "weight decay keeps the gate smaller: late gate weight norm, gate WD 0 minus no norm",
                an.paired(norms, "norm", "no_norm_wd0", "no_norm"),
                digits=2,
                ours=True,
            )
        )
    for k, what in (("no_norm_wd0", "no weight decay on the gate"), ("no_norm_eq4", "eq. 4 at matched alpha")):
        if k in v and "no_norm" in v:
            lines.append(
                line(
                    f"{what} shrinks the fall from peak: no norm's fall minus this arm's",
                    paired_fall(v, "no_norm", k),
                    digits=3,
                    ours=True,
                )
            )
            lines.append(
                line(
                    f"{what} drops more: late drop rate minus no norm's (points)",
                    an.paired(v, "drop_late", k, "no_norm", scale=100),
                    digits=2,
                    ours=True,
                )
            )
    return "\n".join(lines), out


# -----------------------------------------------------------------------------
# plots: Fig. 2 (loss, drop rate) and Fig. 3 (gate ratios over time, one token's gates)


def plot_curves(runs):
    metrics = {r.name: an.read_metrics(r.out_dir) for r in runs}
    fig, ax = an.new_figure(3, 3, width=4.4, height=2.9)
    w = 10
    n = paper_layer(metrics[runs[0].name]) + 1  # the MoE layer plotted: the paper's 3rd, or the model's last
    base = {r.seed: an.step_series(metrics[r.name], "loss")[1] for r in runs if r.variant == "lambda_1"}
    for v in VARIANTS:
        ms = [(r, metrics[r.name]) for r in runs if r.variant == v]
        if not ms:
            continue
        L = paper_layer(ms[0][1])
        kw = dict(label=LABELS[v], color=COLORS[v])
        for a, key in (
            (ax[0, 0], "max1_max2"),
            (ax[0, 1], "max1_max2_median"),
            (ax[0, 2], "max1_max2_of_means"),
            (ax[1, 0], "router_weight_norm"),
            (ax[1, 1], "logit_std"),
        ):
            an.plot_band(a, [an.step_series(m, key, L) for _, m in ms], window=w, **kw)
        an.plot_band(
            ax[1, 2], [(it, 100 * y) for it, y in (an.step_series(m, "drop_rate") for _, m in ms)], window=w, **kw
        )
        an.plot_band(ax[2, 0], [an.step_series(m, "load_cv") for _, m in ms], window=w, **kw)
        an.plot_band(ax[2, 1], [an.eval_series(m, "val_loss") for _, m in ms], marker=".", ms=2, **kw)
        if base:
            diffs = [
                (it, y - base[r.seed][: len(y)])
                for r, (it, y) in ((r, an.step_series(m, "loss")) for r, m in ms)
                if r.seed in base
            ]
            if diffs:
                an.plot_band(ax[2, 2], diffs, window=10 * w, **kw)
    an.finish_axes(
        ax,
        [
            f"Max1/Max2, MoE layer {n}: mean over tokens",
            f"Max1/Max2, layer {n}: median over tokens",
            f"mean top-1 / mean top-2 prob, layer {n}",
            f"gate weight norm, layer {n}",
            f"std of raw gate logits (before eq. 6), layer {n}",
            "drop rate, mean over layers (%)",
            "load CV, mean over layers",
            "validation loss",
            "training loss − λ=1's (same seed)",
        ],
    )
    for a in ax[0]:
        a.axhline(1, color="k", lw=0.5, ls=":")
    ax[2, 2].axhline(0, color="k", lw=0.5)
    an.zoom_y(ax[2, 1], 0.4)
    fig.suptitle(
        "Gating logit normalization (Skywork-MoE Fig. 2-3): mean over seeds, band = min..max over seeds; "
        f"trailing moving average over {w} logged steps ({10 * w} for the loss difference)"
    )
    return fig


def plot_gates(summary):
    snaps = summary["gate_snapshot"]
    fig, ax = an.new_figure(1, 2, width=5.0)
    if snaps:
        E = len(next(iter(snaps.values()))["token_sorted"])
        width = 0.8 / len(snaps)
        for i, (v, s) in enumerate(snaps.items()):
            ax[0, 0].bar(np.arange(E) + i * width, s["token_probs"], width, label=LABELS[v], color=COLORS[v])
            ax[0, 1].plot(np.arange(1, E + 1), s["mean_sorted"], marker=".", label=LABELS[v], color=COLORS[v])
        ax[0, 0].axhline(1 / E, color="k", lw=0.5, ls=":")
        ax[0, 1].set_yscale("log")
    an.finish_axes(
        ax,
        ["one token's gate probabilities (MoE layer 3), final model", "sorted gate probabilities, mean over tokens"],
        xlabel="expert / rank",
    )
    return fig


# -----------------------------------------------------------------------------
# the command


def report(stages, scale, out, data_dir):
    runs, summary, text = runner.summarised(stages, summarise, claims, data_dir)
    keys = runs[0].keys
    walls = an.wall_times(runs)
    setup = (
        an.describe_setup(runs) + f" Balance loss: {keys['aux_loss']} at fixed alpha {keys['aux_alpha']} "
        f"(arm (b): eq. 4 at {EQ4_MATCHED_ALPHA}, the matched gradient scale); weight decay "
        f"{keys.get('weight_decay', 0.1)} on every matrix including the gate (arm (c): 0 on the gate). "
        f"Max ratios are MoE layer 3's; start = first 5 % of logged steps, late = last 20 %, peak and final "
        f"on the curve smoothed over {SMOOTH} logged points. Wall time per run: {walls}."
    )
    sections = [
        ("Setup", setup),
        ("Readout (stated before the runs)", READOUT),
        ("Results", table(summary)),
        ("Every seed", per_seed_table(summary)),
        ("The paper's claims, our numbers (verdict: the effect must exceed the seed spread)", text),
    ]
    data = {"setup": setup, "readout": READOUT, "keys": keys, **summary, "paper": PAPER}
    figures = {"curves": lambda: plot_curves(runs), "gates": lambda: plot_gates(summary)}
    return summary, (f"Gating logit normalization, scale {scale}", sections, data), figures


def main(argv=None):
    import sys

    return runner.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
