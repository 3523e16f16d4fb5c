"""
The 1F1B pipeline bubble of a split of the layers into stages, when the last stage also computes the
final norm, the lm_head and the loss: Skywork-MoE appendix B gives that stage fewer layers, e.g. 24
layers as [5,5,5,5,4] rather than [6,6,6,6], for "up to 10 % less bubble". A calculator, not a pipeline
runtime: stage costs are counted in FLOPs from a ModelConfig, and one 1F1B schedule is played out
operation by operation (communication time is left out).

    python experiments/pipeline_bubble.py                              # config/skywork_moe.toml's shape, 24 layers
    python experiments/pipeline_bubble.py config/skywork_moe.toml n_layer=24 --splits 6,6,6,6 5,5,5,5,4 \
        --microbatches 4 8 16 32 --out experiments/results             # table (.md) and plot (.png)

Read top to bottom: the cost of a layer and of the head, the cost of each stage, the 1F1B schedule and
its simulation, the bubble, main.
"""

if not __package__:  # run as a script: make the repository importable
    import _repo  # noqa: F401

import argparse
import os
import sys

# -----------------------------------------------------------------------------
# stage costs in forward FLOPs per token (the backward is counted as twice the forward: a matmul's
# input gradient and its weight gradient are one forward's worth each)

LOSS_FLOPS_PER_LOGIT = 4  # log-softmax and cross entropy per logit: max, exp, sum, subtract (an estimate)


def layer_flops(cfg, layer_id):
    """Forward FLOPs per token of block layer_id: attention projections, the attention itself (PaLM's
    count, as model.GPT.flops_per_token: 2 matmuls of L x d per head), and the MLP or the router plus
    the top_k active experts. Norms and residual adds are left out (O(D) per token)."""
    D, H, d, L = cfg.n_embd, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
    proj = 2 * D * (2 * H * d + 2 * cfg.kv_heads * d)  # wq, wo and wk, wv
    attn = 2 * 2 * L * H * d
    if cfg.is_moe_layer(layer_id):
        ffn = 2 * D * cfg.n_expert + cfg.top_k * 3 * 2 * D * cfg.expert_hidden
    else:
        ffn = 3 * 2 * D * cfg.ffn_hidden
    return proj + attn + ffn


def head_flops(cfg):
    """Forward FLOPs per token of what only the last stage runs after its layers: the lm_head and the
    loss. (The first stage's embedding is a table lookup: no FLOPs, only memory.)"""
    return 2 * cfg.n_embd * cfg.vocab_size + LOSS_FLOPS_PER_LOGIT * cfg.vocab_size


def stage_flops(cfg, split):
    """Forward FLOPs per token of each stage of split (layers per stage, first to last)."""
    if sum(split) != cfg.n_layer or min(split) < 1:
        raise ValueError(f"split {list(split)} must be positive layer counts summing to n_layer={cfg.n_layer}")
    costs, first = [], 0
    for n in split:
        costs.append(sum(layer_flops(cfg, i) for i in range(first, first + n)))
        first += n
    costs[-1] += head_flops(cfg)
    return costs


# -----------------------------------------------------------------------------
# the 1F1B schedule (PipeDream-Flush / Megatron's non-interleaved schedule) and its simulation
#
# Stage i (0-based, p stages, m micro-batches) runs min(p - 1 - i, m) warm-up forwards, then alternates
# one forward and one backward, then drains the remaining backwards. A forward of micro-batch j on
# stage i waits for its forward on stage i - 1, a backward for its backward on stage i + 1. Each
# operation starts when its stage is free and its input has arrived; with equal stages this gives the
# textbook (m + p - 1)(f + b) and a bubble of (p - 1) / (m + p - 1).


def one_f_one_b(p, m, i):
    """The order of stage i's operations: [("F" | "B", micro-batch)]."""
    warm = min(p - 1 - i, m)
    order = [("F", j) for j in range(warm)]
    for j in range(m - warm):
        order += [("F", warm + j), ("B", j)]
    return order + [("B", j) for j in range(m - warm, m)]


def simulate(fwd, bwd, m):
    """Play 1F1B out for stage times fwd[i], bwd[i]. Returns (makespan, [(stage, kind, j, start, end)])."""
    p = len(fwd)
    orders = [one_f_one_b(p, m, i) for i in range(p)]
    end, free, pos, timeline = {}, [0.0] * p, [0] * p, []
    progressed = True
    while progressed:
        progressed = False
        for i in range(p):
            while pos[i] < len(orders[i]):
                kind, j = orders[i][pos[i]]
                dep = ("F", i - 1, j) if kind == "F" else ("B", i + 1, j)
                if not 0 <= dep[1] < p:
                    dep = None
                if dep is not None and dep not in end:
                    break  # its input has not been computed yet: go on with the other stages
                start = max(free[i], end[dep] if dep else 0.0)
                end[(kind, i, j)] = free[i] = start + (fwd[i] if kind == "F" else bwd[i])
                timeline.append((i, kind, j, start, free[i]))
                pos[i] += 1
                progressed = True
    assert all(pos[i] == len(orders[i]) for i in range(p)), "1F1B deadlocked"  # never: it is deadlock-free
    return max(free), timeline


def bubble(fwd, bwd, m):
    """The idle share of the p devices' time: 1 - busy / (p x makespan). Equal to the throughput per
    device lost to the pipeline, so splits over different numbers of stages compare directly."""
    makespan, _ = simulate(fwd, bwd, m)
    busy = m * sum(f + b for f, b in zip(fwd, bwd, strict=True))
    return 1.0 - busy / (len(fwd) * makespan), makespan


def split_bubble(cfg, split, m):
    """(bubble, makespan, stage costs in units of one layer's forward + backward) of a layer split."""
    fwd = stage_flops(cfg, split)
    b, makespan = bubble(fwd, [2 * f for f in fwd], m)
    unit = 3 * layer_flops(cfg, 0)
    return b, makespan / unit, [3 * f / unit for f in fwd]


# -----------------------------------------------------------------------------
# main: the table and the plot


def parse_split(text):
    try:
        return [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"split {text!r}: write layer counts like 5,5,5,5,4") from None


def main(argv=None):
    from config import ConfigError, load_config
    from model import ModelConfig

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "config",
        nargs="*",
        default=["config/skywork_moe.toml", "n_layer=24"],
        help="model config (.toml and key=value; default: config/skywork_moe.toml n_layer=24)",
    )
    parser.add_argument(
        "--splits", nargs="+", type=parse_split, default=[[4, 5, 5, 5, 5], [5, 5, 5, 5, 4], [6, 6, 6, 6]]
    )
    parser.add_argument("--microbatches", nargs="+", type=int, default=[4, 8, 16, 32, 64])
    parser.add_argument("--out", default=None, help="write pipeline_bubble.md and pipeline_bubble.png here")
    args = parser.parse_args(argv)
    try:
        (cfg,), _ = load_config(args.config, [ModelConfig], ignore_unknown=True)
        rows = {(tuple(s), m): split_bubble(cfg, s, m) for s in args.splits for m in args.microbatches}
    except (ConfigError, ValueError) as e:
        sys.exit(f"error: {e}")
    ratio = head_flops(cfg) / layer_flops(cfg, 0)
    title = (
        f"1F1B bubble, {cfg.n_layer} layers of D={cfg.n_embd}, E={cfg.n_expert} top-{cfg.top_k}, "
        f"V={cfg.vocab_size}, L={cfg.block_size}: lm_head + loss = {ratio:.2f} layers of FLOPs"
    )
    header = "| split | stages | stage cost (layers) | " + " | ".join(f"bubble m={m}" for m in args.microbatches)
    lines = [title, "", header + " |", "|---|---|---|" + "---|" * len(args.microbatches)]
    for s in args.splits:
        costs = rows[(tuple(s), args.microbatches[0])][2]
        lines.append(
            f"| {s} | {len(s)} | {', '.join(f'{c:.2f}' for c in costs)} | "
            + " | ".join(f"{100 * rows[(tuple(s), m)][0]:.1f} %" for m in args.microbatches)
            + " |"
        )
    base = args.splits[0]
    lines += [
        "",
        f"Throughput per device relative to {base} (= (1 - bubble) / (1 - its bubble)):",
        "",
        "| split | " + " | ".join(f"m={m}" for m in args.microbatches) + " |",
        "|---|" + "---|" * len(args.microbatches),
    ]
    for s in args.splits[1:]:
        lines.append(
            f"| {s} | "
            + " | ".join(
                f"{(1 - rows[(tuple(s), m)][0]) / (1 - rows[(tuple(base), m)][0]):.3f}" for m in args.microbatches
            )
            + " |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "pipeline_bubble.md"), "w") as f:
            f.write(table + "\n")
        from matplotlib.figure import Figure  # the object API: no global backend state

        fig = Figure(figsize=(5.0, 3.4), layout="constrained")
        ax = fig.subplots()
        for s in args.splits:
            ax.plot(
                args.microbatches, [100 * rows[(tuple(s), m)][0] for m in args.microbatches], marker="o", label=str(s)
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.microbatches, [str(m) for m in args.microbatches])
        ax.set_xlabel("micro-batches per step (m)")
        ax.set_ylabel("bubble (% of device time)")
        ax.set_title(f"1F1B, {cfg.n_layer} layers, last stage + lm_head + loss", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.savefig(os.path.join(args.out, "pipeline_bubble.png"), dpi=100)
        print(f"wrote {args.out}/pipeline_bubble.md and pipeline_bubble.png")
    return rows


if __name__ == "__main__":
    main()
