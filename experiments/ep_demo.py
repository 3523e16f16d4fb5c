"""
Expert parallelism made visible (notebook 05): two gloo processes on this CPU, each routing its own
tokens, exchange them with expert_parallel.dispatch / combine, and we record what crossed: the
per-expert counts, the split sizes of the all-to-all, which tokens each rank's experts received, and
whether the sharded layer's output equals one process holding every expert.

    python experiments/ep_demo.py          # prints the record of a 2-rank exchange

Every token has a global id (rank * T + t), sent along as an extra column through the same dispatch,
so the rows a rank receives say where they came from. The layer is model.MoE with its experts replaced by
expert_parallel.ParallelExperts, exactly as train.py does under torchrun.
"""

if not __package__:  # run as a script: make the repository importable
    import _repo  # noqa: F401

import json
import os
import tempfile

# -----------------------------------------------------------------------------
# one rank


def rank_main(rank, world, port, out_dir, T, D, E, K, capacity_factor):
    import torch
    import torch.distributed as dist

    import expert_parallel as ep
    from model import ModelConfig, MoE

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        groups = ep.build_groups(world)
        cfg = ModelConfig(n_embd=D, n_head=2, n_expert=E, top_k=K, capacity_factor=capacity_factor, expert_hidden=2 * D)
        torch.manual_seed(0)  # every rank builds the same full layer ...
        full = MoE(cfg)
        torch.nn.init.normal_(full.router.weight, std=0.5)
        for w in (full.experts.w1, full.experts.w3, full.experts.w2):
            torch.nn.init.normal_(w, std=0.3)
        x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(100 + rank))  # ... own tokens
        y_full, r = full(x_TD.view(1, T, D))  # the single-process answer for these tokens

        # the same layer with this rank's slice of the experts (what train.py does under torchrun)
        lo, hi = groups.expert_range(E)
        sharded = MoE(cfg)
        sharded.load_state_dict(full.state_dict())
        ep.shard_experts(sharded, groups)
        y_ep, _ = sharded(x_TD.view(1, T, D))

        # the exchange itself, step by step: kept slots in expert order -> all-to-all -> local experts
        token_N = r.slots_N % T
        ids_N1 = (rank * T + token_N).float().unsqueeze(1)
        x_ND = torch.cat([x_TD[token_N], ids_N1], 1)  # the id column travels with the token
        x_MD, plan = ep.dispatch(x_ND, r.counts_E, groups.ep_group)
        record = {
            "rank": rank,
            "experts_held": [lo, hi],
            "ids_TK": r.ids_TK.tolist(),
            "keep_TK": r.keep_TK.tolist(),
            "counts_E": r.counts_E.tolist(),
            "send_splits": plan.send_splits,
            "recv_splits": plan.recv_splits,
            "sent_token_ids": x_ND[:, -1].long().tolist(),
            "received_token_ids": x_MD[:, -1].long().tolist(),
            "received_counts_per_local_expert": plan.counts_El.tolist(),
            "max_abs_diff_vs_one_process": (y_ep - y_full).abs().max().item(),
        }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)
    finally:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# the launcher


def run(world=2, T=12, D=8, E=4, K=2, capacity_factor=1.0):
    """Spawn `world` gloo processes; returns their records (a list of dicts, by rank)."""
    import torch.multiprocessing as mp

    import expert_parallel as ep

    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            rank_main,
            args=(world, ep.free_port(), out_dir, T, D, E, K, capacity_factor),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        records = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                records.append(json.load(f))
    return records


def main():
    for rec in run():
        print(json.dumps(rec))


if __name__ == "__main__":
    main()
