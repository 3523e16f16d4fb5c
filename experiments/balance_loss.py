"""
Eq. 4 or the Switch form: which balance loss balances at this scale, and what the presets should ship.

Skywork-MoE writes its auxiliary loss as eq. 4, L = sum_j (1/E - P_j)^2 (P_j the mean gate probability of
expert j), where Switch Transformer uses E * sum_j f_j P_j (f_j the share of routed assignments). At the
same alpha their gradients on the gate differ by one to two orders of magnitude: eq. 4's is
2 (P_j - 1/E), whose deviations are O(1/E) and shrink as balance improves, and it sees only the soft
probabilities; Switch's is E f_j, O(1) whatever the balance. This experiment measures it:

    switch_1e-2   Switch form, alpha 1e-2 (fixed)
    eq4_1e-2      eq. 4 at the same alpha
    eq4_matched   eq. 4 at alpha 0.3: 1e-2 times the measured gradient ratio (gate_norm.EQ4_MATCHED_ALPHA)
    no_aux        no balance loss (the floor)
    ratio_probe   gate_norm.py's arm (a) (no normalization, Switch 1e-2) for 400 steps: the model on which
                  the gradient ratio behind eq4_matched is measured (report: "gradient scale")

and the balance settings each config/ preset ships, trained at a reduced size (one seed each):

    preset_quickstart    config/shakespeare_char.toml as is (its own size), 1,000 steps
    preset_quickstart_eq4    the same with aux_loss=eq4 (the old default)
    preset_ep2           config/shakespeare_char_ep2.toml in one process (ep_size=1, route_groups=2)
    preset_gpu16         config/gpu_node8.toml / gpu_2nodes.toml / skywork_moe.toml's routing (16 experts
                         top-2, eq. 6, adaptive alpha) at 4 x 128 on Shakespeare characters
    preset_gpu16_eq4     the same with aux_loss=eq4

    python -m experiments.balance_loss --scale smoke
    python -m experiments.balance_loss --scale small --publish   # results/balance_loss_small.*
"""

if not __package__:  # run as a script: make the repository importable
    import _repo  # noqa: F401

import os

import numpy as np

from experiments import analysis as an
from experiments import gate_norm, runner

EXPERIMENT = "balance_loss"
DEFAULT_SEEDS = 3
DROP_LIMIT = 0.10  # issue 10: no preset may leave more than 10 % of assignments dropped after warm-up


def preset_keys(name, **overrides):
    """A config/ preset's keys (read by the project's TOML reader) as a CPU job at this scale."""
    from config import read_toml

    keys = read_toml(os.path.join(runner.REPO, "config", name))
    keys.pop("out_dir", None)
    return {**keys, **overrides}


# the reduced size of the 16-expert GPU presets: the quick-start trunk with their routing
# fmt: off
GPU16_REDUCED = dict(
    dataset="shakespeare_char", block_size=64, n_layer=4, n_head=4, n_embd=128, expert_hidden=320,
    batch_size=16, grad_accum=1, learning_rate=2e-3, min_lr=2e-4, warmup_iters=100, eval_interval=250,
    eval_iters=20, device="cpu", dtype="auto", backend="auto", ep_size=1,
)
# fmt: on
PRESET_RUN = dict(max_iters=1000, log_interval=10, keep_last=0)


def variants():
    lam1 = dict(gate_norm=True, gate_lambda=1.0, aux_coef_mode="fixed")
    return {
        "switch_1e-2": dict(lam1, aux_loss="switch", aux_alpha=1e-2),
        "eq4_1e-2": dict(lam1, aux_loss="eq4", aux_alpha=1e-2),
        "eq4_matched": dict(lam1, aux_loss="eq4", aux_alpha=gate_norm.EQ4_MATCHED_ALPHA),
        "no_aux": dict(lam1, aux_loss="none", aux_alpha=0.0),
        "ratio_probe": dict(gate_norm.VARIANTS["no_norm"], aux_loss="switch", aux_coef_mode="fixed", aux_alpha=1e-2),
    }


VARIANTS = variants()
PRESETS = {
    "preset_quickstart": ("shakespeare_char.toml", {}),
    "preset_quickstart_eq4": ("shakespeare_char.toml", dict(aux_loss="eq4")),
    "preset_ep2": ("shakespeare_char_ep2.toml", dict(ep_size=1, backend="auto")),
    "preset_gpu16": ("gpu_node8.toml", GPU16_REDUCED),
    "preset_gpu16_eq4": ("gpu_node8.toml", dict(GPU16_REDUCED, aux_loss="eq4")),
}
VARIANTS.update({name: {} for name in PRESETS})  # their keys come from the preset files (plan below)
LABELS = {
    "switch_1e-2": "Switch, α 1e-2",
    "eq4_1e-2": "eq. 4, α 1e-2",
    "eq4_matched": f"eq. 4, α {gate_norm.EQ4_MATCHED_ALPHA} (matched)",
    "no_aux": "no balance loss",
    "ratio_probe": "gradient-ratio probe (gate_norm arm a, 400 steps)",
    "preset_quickstart": "config/shakespeare_char.toml",
    "preset_quickstart_eq4": "… with aux_loss=eq4",
    "preset_ep2": "config/shakespeare_char_ep2.toml (1 process)",
    "preset_gpu16": "config/gpu_node8.toml routing at 4x128",
    "preset_gpu16_eq4": "… with aux_loss=eq4",
}
COLORS = {"switch_1e-2": "tab:blue", "eq4_1e-2": "tab:red", "eq4_matched": "tab:orange", "no_aux": "tab:gray"}
SCALE_KEYS = {"smoke": dict(expert_hidden=32, max_iters=16), "small": dict(expert_hidden=64, max_iters=2000)}
MOE_KEYS = dict(n_expert=16, top_k=2, capacity_factor=1.25, moe_every=1)
PROBE_ITERS = {"smoke": 16, "small": 400}


def job_keys(scale):
    if scale == "full":
        raise SystemExit("error: balance_loss has no full-scale plan: it measures CPU-sized models")
    return runner.preset(scale, **MOE_KEYS, **SCALE_KEYS[scale])


def plan(scale, seeds, root, data_dir, max_iters=None):
    """The loss arms for every seed; the preset runs for the first seed only (their files fix their keys)."""
    keys = dict(job_keys(scale), data_dir=data_dir)
    if max_iters:
        keys["max_iters"] = max_iters
    loss_arms = {k: v for k, v in VARIANTS.items() if k not in PRESETS}
    runs = runner.grid(loss_arms, seeds, root, keys)
    for r in runs:
        if r.variant == "ratio_probe":
            r.keys["max_iters"] = PROBE_ITERS[scale]
    short = dict(max_iters=16, eval_interval=8, eval_iters=2, warmup_iters=2) if scale == "smoke" else {}
    for name, (toml, over) in PRESETS.items():
        k = preset_keys(toml, **{**over, **PRESET_RUN, **short, "data_dir": data_dir, "device": "cpu"})
        runs.append(runner.Run(name, seeds[0], os.path.join(root, f"{name}_s{seeds[0]}"), k))
    return [runs]


# -----------------------------------------------------------------------------
# the gradient scale: |d alpha L_switch / dW| over |d alpha L_eq4 / dW| on the gate weights


def gradient_ratio(ckpt_path, data_dir, dataset, n_batches=4, batch_size=16):
    """Per (batch, MoE layer): the norm of the Switch loss's gradient on that layer's gate weights over
    the norm of eq. 4's, on the same forward pass of the saved model."""
    import torch

    from router import aux_loss_eq4, aux_loss_switch

    model = an.load_model(ckpt_path)
    routers = [m for n, m in model.named_modules() if n.endswith("router")]
    ratios = []
    for b in range(n_batches):
        x = an.val_batch(data_dir, dataset, model.cfg.block_size, batch_size, seed=b)
        _, _, outs = model(x)
        row = []
        for router, r in zip(routers, outs, strict=True):
            T, E = r.probs_TE.shape
            probs_1TE, ids_1TK = r.probs_TE.view(1, T, E), r.ids_TK.view(1, T, -1)
            (g_eq4,) = torch.autograd.grad(aux_loss_eq4(probs_1TE), router.weight, retain_graph=True)
            (g_sw,) = torch.autograd.grad(aux_loss_switch(probs_1TE, ids_1TK), router.weight, retain_graph=True)
            row.append(float(g_sw.norm() / g_eq4.norm()))
        ratios.append(row)
    return ratios


# -----------------------------------------------------------------------------
# analysis


def run_numbers(metrics, keys):
    warm = keys.get("warmup_iters", 100)
    it, drop = an.step_series(metrics, "drop_rate")
    n_layers = an.n_moe_layers(metrics)
    after = it > warm
    per_layer = [float(np.mean(an.step_series(metrics, "drop_rate", i)[1][after])) for i in range(n_layers)]
    return {
        "val_loss": metrics["evals"][-1]["val_loss"],
        "drop_after_warmup": float(np.mean(drop[after])),
        "drop_after_warmup_worst_layer": max(per_layer),
        "drop_late": an.tail_mean(drop),
        "load_cv_late": an.tail_mean(an.step_series(metrics, "load_cv")[1]),
        "drop_per_layer": per_layer,
        "aux_loss": keys.get("aux_loss", "default"),
        "aux_coef_mode": keys.get("aux_coef_mode", "default"),
    }


def summarise(runs, data_dir):
    by_variant = {}
    for run in runs:
        rec = {"seed": run.seed, **run_numbers(an.read_metrics(run.out_dir), run.keys)}
        by_variant.setdefault(run.variant, []).append(rec)
    ratios = {}
    for run in runs:
        if run.variant == "ratio_probe" and os.path.isfile(os.path.join(run.out_dir, "ckpt.pt")):
            ratios[run.seed] = gradient_ratio(os.path.join(run.out_dir, "ckpt.pt"), data_dir, run.keys["dataset"])
    flat = [v for rows in ratios.values() for row in rows for v in row]
    geo = float(np.exp(np.mean(np.log(flat)))) if flat else float("nan")
    return {
        "variants": by_variant,
        "gradient_ratio": {
            "per_seed": ratios,
            "geometric_mean": geo,
            "min": min(flat, default=np.nan),
            "max": max(flat, default=np.nan),
            "matched_alpha_used": gate_norm.EQ4_MATCHED_ALPHA,
        },
    }


def tables(summary):
    v = summary["variants"]
    rows = []
    for k, rs in v.items():
        if k in PRESETS or k == "ratio_probe":
            continue
        rows.append(
            [
                LABELS[k],
                len(rs),
                an.fmt_ms([r["drop_after_warmup"] for r in rs], 2, 100, " %"),
                an.fmt_ms([r["drop_after_warmup_worst_layer"] for r in rs], 2, 100, " %"),
                an.fmt_ms([r["load_cv_late"] for r in rs], 3),
                an.fmt_ms([r["val_loss"] for r in rs], 4),
                an.fmt_seeds([r["drop_after_warmup"] for r in rs], 1, 100),
            ]
        )
    arms = an.markdown_table(
        [
            "balance loss (λ = 1, fixed α)",
            "seeds",
            "drop after warm-up",
            "worst layer's drop after warm-up",
            "load CV (last 20 %)",
            "val loss (final)",
            "drop % per seed",
        ],
        rows,
    )
    prow = []
    for k in PRESETS:
        for r in v.get(k, []):
            ok = r["drop_after_warmup_worst_layer"] <= DROP_LIMIT
            prow.append(
                [
                    LABELS[k],
                    f"{r['aux_loss']} / {r['aux_coef_mode']}",
                    f"{100 * r['drop_after_warmup']:.2f} %",
                    f"{100 * r['drop_after_warmup_worst_layer']:.2f} %",
                    f"{r['load_cv_late']:.3f}",
                    f"{r['val_loss']:.4f}",
                    "yes" if ok else "**no**",
                ]
            )
    presets = an.markdown_table(
        [
            "preset (reduced run)",
            "aux loss / coefficients",
            "drop after warm-up",
            "worst layer",
            "load CV (late)",
            "val loss",
            f"worst layer <= {DROP_LIMIT:.0%}",
        ],
        prow,
    )
    g = summary["gradient_ratio"]
    grad = (
        f"Switch-to-eq. 4 gradient-norm ratio on the gate weights, per (batch, MoE layer), on the "
        f"ratio_probe models: geometric mean {g['geometric_mean']:.1f} (range {g['min']:.1f}-{g['max']:.1f}; "
        f"{sum(len(rows) * len(rows[0]) for rows in g['per_seed'].values()) if g['per_seed'] else 0} "
        f"values). Matched alpha for eq. 4 = 1e-2 x ratio ~ {1e-2 * g['geometric_mean']:.2f}; the runs use "
        f"{g['matched_alpha_used']} (measured the same way on one seed before the runs)."
    )
    return arms, presets, grad


def claims(summary):
    v = summary["variants"]
    lines, out = [], []
    for a, b, what in (
        ("eq4_1e-2", "switch_1e-2", "at equal alpha 1e-2"),
        ("eq4_matched", "switch_1e-2", "at matched gradient scale"),
    ):
        if a in v and b in v:
            for key, scale, digits, unit in (
                ("drop_after_warmup", 100, 2, " points"),
                ("load_cv_late", 1, 3, ""),
                ("val_loss", 1, 4, ""),
            ):
                eff = an.paired(v, key, a, b, scale)
                m, s = an.mean_sd(eff)
                verdict = an.verdict(eff, +1)
                out.append(
                    {
                        "claim": f"eq. 4 minus Switch {what}: {key}",
                        "effects": eff,
                        "mean": m,
                        "sd": s,
                        "verdict": verdict,
                    }
                )
                word = {
                    "reproduces": "higher than Switch's beyond the seed spread",
                    "does not reproduce": "lower than Switch's beyond the seed spread",
                }
                word = word.get(verdict, "within the spread")
                lines.append(
                    f"- eq. 4 minus Switch {what}, {key}: {m:+.{digits}f} ± {s:.{digits}f}{unit} "
                    f"(seeds: {an.fmt_seeds(eff, digits)}): eq. 4's is {word}."
                )
    return "\n".join(lines), out


def plot_curves(runs):
    metrics = {r.name: an.read_metrics(r.out_dir) for r in runs}
    fig, ax = an.new_figure(1, 3, width=4.4)
    for k in COLORS:
        ms = [metrics[r.name] for r in runs if r.variant == k]
        if not ms:
            continue
        kw = dict(label=LABELS[k], color=COLORS[k])
        an.plot_band(
            ax[0, 0], [(it, 100 * y) for it, y in (an.step_series(m, "drop_rate") for m in ms)], window=10, **kw
        )
        an.plot_band(ax[0, 1], [an.step_series(m, "load_cv") for m in ms], window=10, **kw)
        an.plot_band(ax[0, 2], [an.eval_series(m, "val_loss") for m in ms], marker=".", ms=2, **kw)
    an.finish_axes(ax, ["drop rate, mean over layers (%)", "load CV, mean over layers", "validation loss"])
    ax[0, 0].axhline(100 * DROP_LIMIT, color="k", lw=0.5, ls=":")
    an.zoom_y(ax[0, 2], 0.4)
    fig.suptitle(
        "Eq. 4 vs the Switch form (λ = 1, fixed α): mean over seeds, band = min..max; load CV: moving average of 10"
    )
    return fig


def report(stages, scale, out, data_dir):
    runs, summary, text = runner.summarised(stages, summarise, claims, data_dir)
    arms, presets, grad = tables(summary)
    loss_runs = [r for r in runs if r.variant not in PRESETS and r.variant != "ratio_probe"]
    setup = (
        an.describe_setup(loss_runs or runs) + " Gate normalization lambda 1, fixed alpha. 'After warm-up' = "
        f"every logged step past warmup_iters. Presets: {PRESET_RUN['max_iters']} steps, one seed, keys from "
        f"the config/ files (reduced as listed in the module docstring). Wall time per run: "
        f"{an.wall_times(runs)}."
    )
    sections = [
        ("Setup", setup),
        ("Gradient scale", grad),
        ("Equal alpha and matched gradient scale", arms),
        ("Differences, paired by seed", text),
        (f"The presets' balance settings (issue 10: no preset may leave > {DROP_LIMIT:.0%} dropped)", presets),
    ]
    data = {"setup": setup, **summary}
    figures = {"curves": lambda: plot_curves(runs)}
    return summary, (f"Eq. 4 vs Switch balance loss, scale {scale}", sections, data), figures


def main(argv=None):
    import sys

    return runner.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
