"""
Upcycling vs training from scratch (Skywork-MoE section 3, Fig. 1): a dense model is trained for D
tokens (cosine 3e-3 -> 3e-4, checkpoints kept at D/3 and D); then 8-expert top-2 MoEs with budgets
D/3 and D are trained from scratch or upcycled (upcycle.py: every expert a copy of the dense FFN, new
routers), with the paper's learning-rate schedules:

    budget D/3: from scratch (peak 3e-3) | upcycled from ckpt D/3 (peak 1.8e-3) | upcycled from ckpt D,
                constant 3e-4 (the dense run's final LR)
    budget D:   from scratch (peak 3e-3) | upcycled from ckpt D (peak 1.2e-3)   | upcycled from ckpt D,
                constant 3e-4

(PAPER.md section 5: D = 300B tokens there.) The constant-LR run is trained once for D; with a
constant LR its first D/3 is exactly the budget-D/3 run. Cosine runs decay to 3e-4 over their budget.
Expert similarity (model.expert_similarity: mean pairwise cosine of the experts' weights) is tracked at
every eval; the dense model's final loss is the reference line.

    python experiments/upcycling.py --scale smoke
    python experiments/upcycling.py --scale small --jobs 2      # the README's CPU results
    python experiments/upcycling.py --scale full --dry-run      # 0.3B dense -> 8 experts on FineWeb

Writes under --out (default runs/upcycling/<scale>/): dense_s<seed>/ (ckpt_D3.pt, ckpt.pt), the
upcycled initial checkpoints, one directory per MoE run, upcycling_<scale>.md / .json and
upcycling_<scale>_curves.png.
"""

if not __package__:  # run as a script: make the repository importable
    import _repo  # noqa: F401

import os
import shutil

import numpy as np

from experiments import analysis as an
from experiments import runner

EXPERIMENT = "upcycling"
DENSE_SEED_OFFSET = 1000  # the dense run draws other data windows than the MoE runs that follow it

# -----------------------------------------------------------------------------
# sizes and schedules

# D, the dense run's length in iterations (tokens = D x tokens per step); budgets D/3 and D
DENSE_ITERS = {"smoke": 12, "small": 300, "full": 57000}  # full: 57,000 x 524,288 = 30B tokens
PAPER_DENSE_TOKENS = 300e9  # D in the paper; its MoE budgets are D/3 = 100B and D = 300B
SCALE_KEYS = {
    "smoke": dict(eval_interval=4, warmup_iters=1),
    # the quick-start shape of the committed results (results/upcycling_small*.md)
    "small": dict(
        n_layer=4,
        n_head=4,
        n_embd=128,
        block_size=64,
        batch_size=16,
        warmup_iters=30,
        eval_interval=50,
        eval_iters=10,
        log_interval=5,
    ),
    # the paper's 0.3B dense model: 16 layers x 1024 = 0.305B parameters in all with the GPT-2 vocabulary
    # (0.20B without the two embedding matrices)
    "full": dict(n_layer=16, n_head=16, n_embd=1024, eval_interval=1000),
}
LR = dict(learning_rate=3e-3, min_lr=3e-4)  # the dense run and from-scratch MoEs
MOE_ROUTING = dict(capacity_factor=1.25, gate_norm=True, gate_lambda=1.0, aux_loss="switch")
MOE_KEYS = dict(n_expert=8, top_k=2, moe_every=1, expert_hidden=0, **MOE_ROUTING)

# (name, budget "D/3" | "D", source "scratch" | "D/3" | "D", train keys, label)
MOE_RUNS = [
    ("scratch_D3", "D/3", "scratch", dict(learning_rate=3e-3), "from scratch, peak 3e-3"),
    ("up_D3_lr1.8e-3", "D/3", "D/3", dict(learning_rate=1.8e-3), "upcycled from ckpt D/3, peak 1.8e-3"),
    (
        "up_D_const3e-4",
        "D",
        "D",
        dict(learning_rate=3e-4, lr_schedule="constant", warmup_iters=0),
        "upcycled from ckpt D, constant 3e-4",
    ),
    ("scratch_D", "D", "scratch", dict(learning_rate=3e-3), "from scratch, peak 3e-3"),
    ("up_D_lr1.2e-3", "D", "D", dict(learning_rate=1.2e-3), "upcycled from ckpt D, peak 1.2e-3"),
]
COLORS = {
    "scratch_D3": "tab:gray",
    "up_D3_lr1.8e-3": "tab:blue",
    "up_D_const3e-4": "tab:red",
    "scratch_D": "k",
    "up_D_lr1.2e-3": "tab:green",
}
# PAPER.md section 5 (budgets 100B / 300B tokens; ~ read off the figure): final loss, similarity
PAPER = {
    ("D/3", "scratch_D3"): ("~2.265", "~0"),
    ("D/3", "up_D3_lr1.8e-3"): ("~2.258", "~0.27 -> 0.08"),
    ("D/3", "up_D_const3e-4"): ("~2.288 (best until ~80B, then overtaken)", "~0.72 -> 0.23 (over 300B)"),
    ("D", "scratch_D"): ("~2.20 (overtakes all upcycled runs at ~250B)", "~0"),
    ("D", "up_D_lr1.2e-3"): ("~2.232", "~0.42 -> 0.15"),
    ("D", "up_D_const3e-4"): ("~2.25", "~0.72 -> 0.23"),
}
PAPER_DENSE = "~2.44"
VARIANTS = {name: keys for name, _, _, keys, _ in MOE_RUNS}
DEFAULT_SEEDS = 3
COST_UNIT = "dense"  # --dry-run states every budget as a fraction of the dense run's cost
PLAN_NOTES = (
    "Smaller than the paper: D = 30B tokens against 300B (a tenth, to fit ~300 GPU-hours instead of ~3,000); "
    "the budgets keep the paper's token ratios D/3 and D. The paper prices them at ~2/3 C and ~2 C (C = the "
    "dense run's cost); by model.flops_per_token() they cost 0.49 C and 1.47 C here.",
)


def paper_tokens(run):
    """The paper's tokens for the same job: the dense run's first D/3 (100B) and the rest (200B), and each MoE
    run's budget (D/3 = 100B or D = 300B)."""
    if run.variant == "dense":
        return PAPER_DENSE_TOKENS * (2 / 3 if run.keys.get("init_from") == "resume" else 1 / 3)
    return PAPER_DENSE_TOKENS * (1 / 3 if run.variant in ("scratch_D3", "up_D3_lr1.8e-3") else 1)


def budget_iters(D, budget):
    return D // 3 if budget == "D/3" else D


# -----------------------------------------------------------------------------
# the plan: dense to D/3, keep it, dense on to D, upcycle both, then the MoE runs


def plan(scale, seeds, root, data_dir, max_iters=None):
    D = max_iters or DENSE_ITERS[scale]
    base = runner.preset(scale, **SCALE_KEYS[scale], **LR)
    if scale != "full":
        base["data_dir"] = data_dir
    dense_keys = dict(base, n_expert=0, lr_decay_iters=D)
    phase1, phase2, upcycle_steps, moe = [], [], [], []
    for seed in seeds:
        dense_dir = os.path.join(root, f"dense_s{seed}")
        # phase 1 stops at D/3 on the D-long cosine (lr_decay_iters=D), phase 2 resumes it to D:
        # one uninterrupted schedule, with the D/3 checkpoint kept on the way
        phase1.append(
            runner.Run(
                "dense",
                seed + DENSE_SEED_OFFSET,
                dense_dir,
                dict(dense_keys, max_iters=D // 3),
                done_name="done_D3.json",
            )
        )
        phase2.append(
            runner.Run("dense", seed + DENSE_SEED_OFFSET, dense_dir, dict(dense_keys, max_iters=D, init_from="resume"))
        )
        inits = {
            "D/3": os.path.join(root, f"init_from_D3_s{seed}.pt"),
            "D": os.path.join(root, f"init_from_D_s{seed}.pt"),
        }
        d3_ckpt = os.path.join(dense_dir, "ckpt_D3.pt")
        upcycle_steps.append(keep_checkpoint_step(os.path.join(dense_dir, "ckpt.pt"), d3_ckpt))
        upcycle_steps.append(upcycle_step(d3_ckpt, inits["D/3"], seed))
        upcycle_steps.append(upcycle_step(os.path.join(dense_dir, "ckpt.pt"), inits["D"], seed))
        for name, budget, source, keys, _ in MOE_RUNS:
            k = dict(base, **MOE_KEYS, max_iters=budget_iters(D, budget), save_checkpoint=False, **keys)
            if source != "scratch":
                k["init_from"] = inits[source]  # train.py then takes the model config from the checkpoint
            if scale == "full":
                k["ep_size"] = runner.FULL_EP_SIZE
            moe.append(runner.Run(name, seed, os.path.join(root, f"{name}_s{seed}"), k))
    # ckpt.pt after phase 1 is the D/3 checkpoint: keep it before phase 2 overwrites it
    return [phase1, *upcycle_steps[0::3], phase2, *upcycle_steps[1::3], *upcycle_steps[2::3], moe]


def keep_checkpoint_step(src, dst):
    def fn():
        if not os.path.exists(dst):
            shutil.copy(src, dst)

    return runner.Step(f"keep the D/3 checkpoint: {dst}", fn, f"cp {src} {dst}")


def upcycle_step(src, dst, seed):
    opts = {k: v for k, v in MOE_ROUTING.items()}

    def fn():
        from upcycle import upcycle_checkpoint

        if not os.path.exists(dst) or os.path.getmtime(dst) < os.path.getmtime(src):
            upcycle_checkpoint(src, dst, MOE_KEYS["n_expert"], MOE_KEYS["top_k"], seed=seed, overwrite=True, **opts)

    cli = " ".join(f"--{k} {runner.format_value(v)}" for k, v in opts.items())
    return runner.Step(
        f"upcycle {src} -> {dst}",
        fn,
        f"python upcycle.py --from {src} --n_expert {MOE_KEYS['n_expert']} --top_k {MOE_KEYS['top_k']} "
        f"--seed {seed} {cli} --out {dst} --overwrite",
    )


# -----------------------------------------------------------------------------
# analysis


def val_at(metrics, it):
    """Validation loss at iteration `it` (the nearest eval at or before it)."""
    ev = [e for e in metrics["evals"] if e["iter"] <= it]
    return ev[-1]["val_loss"]


def similarity(metrics, upto=None):
    it, s = an.eval_series(metrics, "expert_similarity")
    keep = it <= (upto if upto is not None else it.max())
    return float(s[keep][0]), float(s[keep][-1])


def summarise(stages):
    runs = runner.all_runs(stages)
    dense = {r.seed: r for r in runs if r.variant == "dense"}  # the phase-2 run (same out_dir) wins
    D = max(r.keys["max_iters"] for r in runs if r.variant == "dense")
    moe = [r for r in runs if r.variant != "dense"]
    dense_loss = {
        seed - DENSE_SEED_OFFSET: an.read_metrics(r.out_dir)["evals"][-1]["val_loss"] for seed, r in dense.items()
    }
    rows = {}
    for name, budget, source, _, label in MOE_RUNS:
        for b in ["D/3", "D"] if name == "up_D_const3e-4" else [budget]:
            recs = []
            for r in (r for r in moe if r.variant == name):
                m = an.read_metrics(r.out_dir)
                upto = D // 3 if b == "D/3" else D
                s0, s1 = similarity(m, upto)
                recs.append(
                    {
                        "seed": r.seed,
                        "val_loss": val_at(m, upto),
                        "similarity_start": s0,
                        "similarity_end": s1,
                        "iters": upto,
                    }
                )
            rows[f"{b}|{name}"] = {"budget": b, "name": name, "label": label, "source": source, "runs": recs}
    return {"dense_val_loss": dense_loss, "rows": rows}


def table(summary):
    out = []
    for key, row in summary["rows"].items():
        rs = row["runs"]
        paper_loss, paper_sim = PAPER[(row["budget"], row["name"])]
        sim = (
            f"{an.fmt_ms([r['similarity_start'] for r in rs], digits=2)} → "
            f"{an.fmt_ms([r['similarity_end'] for r in rs], digits=2)}"
        )
        losses = [r["val_loss"] for r in rs]
        out.append([row["budget"], row["label"], an.fmt_ms(losses), an.fmt_seeds(losses), sim, paper_loss, paper_sim])
    dense = list(summary["dense_val_loss"].values())
    out.append(["-", "dense reference (D tokens)", an.fmt_ms(dense), an.fmt_seeds(dense), "-", PAPER_DENSE, "-"])
    return an.markdown_table(
        [
            "MoE budget",
            "run",
            "val loss (end of budget)",
            "per seed",
            "expert similarity (start → end)",
            "paper: final loss",
            "paper: similarity",
        ],
        out,
    )


def paper_loss(budget, name):
    return float(PAPER[(budget, name)][0].split()[0].lstrip("~"))


def claims(summary):
    """Per seed (paired by the MoE seed) and scored by the rule: each upcycled run against from scratch at
    its budget, in the order the paper found them, and the decay of expert similarity; then, on the means,
    whether the most similar upcycled run is the worst and whether every MoE run beats the dense model."""
    rows, out, lines = summary["rows"], [], []
    runs = {k: row["runs"] for k, row in rows.items()}
    loss = {k: an.mean_sd([r["val_loss"] for r in row["runs"]])[0] for k, row in rows.items()}
    sim_end = {k: an.mean_sd([r["similarity_end"] for r in row["runs"]])[0] for k, row in rows.items()}
    for b in ("D/3", "D"):
        keys = [k for k in rows if rows[k]["budget"] == b]
        scratch = next(k for k in keys if rows[k]["source"] == "scratch")
        ups = [k for k in keys if k != scratch]
        for k in ups:
            up, ref = paper_loss(b, rows[k]["name"]), paper_loss(b, rows[scratch]["name"])
            sign = 1 if up < ref else -1
            text = (
                f"budget {b}: {rows[k]['label']} ends {'below' if sign > 0 else 'above'} from scratch "
                f"(paper {up:.3f} vs {ref:.3f}); from scratch minus it"
            )
            lines.append(an.claim_line(out, text, an.paired(runs, "val_loss", scratch, k), sign, digits=4))
        most_similar, worst = max(ups, key=sim_end.get), max(ups, key=loss.get)
        lines.append(
            f"- budget {b} (means): most similar upcycled run at the end is {rows[most_similar]['label']} "
            f"({sim_end[most_similar]:.3f}); worst upcycled run is {rows[worst]['label']} "
            f"({loss[worst]:.4f}) -> {'same run' if most_similar == worst else 'different runs'}."
        )
    for k, row in rows.items():
        if row["source"] != "scratch":
            decay = [r["similarity_start"] - r["similarity_end"] for r in row["runs"]]
            text = f"budget {row['budget']}: expert similarity decays, {row['label']}; start minus end"
            lines.append(an.claim_line(out, text, decay))
    dense = an.mean_sd(list(summary["dense_val_loss"].values()))[0]
    lines.append(
        f"- dense reference after D tokens (mean): {dense:.4f}; every MoE run below it: "
        f"{'yes' if all(v < dense for v in loss.values()) else 'no'}."
    )
    return "\n".join(lines), out


# -----------------------------------------------------------------------------
# plot: Fig. 1 (loss curves of both budgets, dense reference, expert similarity)


def plot_curves(stages, summary):
    runs = runner.all_runs(stages)
    fig, ax = an.new_figure(1, 3)
    dense_ref = float(np.mean(list(summary["dense_val_loss"].values())))
    for name, budget, _, _, label in MOE_RUNS:
        rs = [r for r in runs if r.variant == name]
        ms = [an.read_metrics(r.out_dir) for r in rs]
        tok = runner.tokens_per_step(rs[0].keys) / 1e6
        curves = [an.eval_series(m, "val_loss") for m in ms]
        panels = [0, 1] if name == "up_D_const3e-4" else [0 if budget == "D/3" else 1]
        for p in panels:
            if p == 0 and name == "up_D_const3e-4":
                cut = rs[0].keys["max_iters"] // 3
                cs = [(it[it <= cut], y[it <= cut]) for it, y in curves]
            else:
                cs = curves
            an.plot_band(ax[0, p], cs, label=label, color=COLORS[name], xscale=tok, marker=".")
        sims = [an.eval_series(m, "expert_similarity") for m in ms]
        an.plot_band(ax[0, 2], sims, label=f"{label} ({budget})", color=COLORS[name], xscale=tok, marker=".")
    for p, budget in ((0, "D/3"), (1, "D")):
        ax[0, p].axhline(dense_ref, color="tab:brown", ls="--", lw=1, label="dense model after D tokens")
        ax[0, p].set_title(f"validation loss, MoE budget {budget}", fontsize=10)
        an.zoom_y(ax[0, p], 0.6)
    ax[0, 2].set_title("expert similarity (mean pairwise cosine)", fontsize=10)
    for a in ax.flat:
        a.set_xlabel("MoE training tokens (M)")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle("Upcycling vs training from scratch (Skywork-MoE Fig. 1)")
    return fig


# -----------------------------------------------------------------------------
# the command


def report(stages, scale, out, data_dir):
    summary = summarise(stages)
    runs = runner.all_runs(stages)
    moe_runs = [r for r in runs if r.variant != "dense"]
    D = max(r.keys["max_iters"] for r in runs if r.variant == "dense")
    dense_final = [r for r in runs if r.variant == "dense" and r.keys["max_iters"] == D]  # phase 2, every seed
    setup = (
        f"Dense: {an.describe_setup(dense_final)} Cosine 3e-3 -> 3e-4 over D = {D} "
        f"iterations; checkpoints at D/3 = {D // 3} and D. MoE: {MOE_KEYS['n_expert']} experts top-"
        f"{MOE_KEYS['top_k']} (each as wide as the dense FFN), routing {MOE_ROUTING}, adaptive aux coefficients; "
        f"budgets D/3 = {D // 3} and D = {D} iterations, cosine runs decay to 3e-4; the same data order "
        f"(seeds {sorted({r.seed for r in moe_runs})}) in every MoE run."
    )
    text, summary["claims"] = claims(summary)
    sections = [("Setup", setup), ("Results", table(summary)), ("The paper's claims, our numbers", text)]
    data = {"setup": setup, **summary, "paper": {f"{b}|{n}": v for (b, n), v in PAPER.items()}}
    return (
        summary,
        (f"Upcycling vs from scratch, scale {scale}", sections, data),
        {"curves": lambda: plot_curves(stages, summary)},
    )


def main(argv=None):
    import sys

    return runner.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
