"""
Expert parallelism (expert_parallel.py, train.py under torchrun) against one process.

The central claim: R ranks, each routing its own batch_size / R sequences as one capacity group, compute
the same function and the same gradients as one process running the whole global batch with
route_groups = R. Checked on 2 and 4 gloo processes (ep_size = world, and world 4 = 2 x ep_size 2),
in float64 (1e-10 relative) and float32 (1e-5), relative meaning ||a - b|| / ||b|| per tensor, including
an expert that receives no tokens, every token sent to one rank, and token drops; then the real entry
points: torchrun vs one process, checkpoints resumed across layouts, state gathered to rank 0 only, a
dense model, and bad launches failing on every rank without hanging.

    python -m pytest -q tests/test_expert_parallel.py

Ranks are forked (torch is already imported: ~1-3 s to start), talk over a free loopback port, and
every wait is bounded: a hang fails the test instead of blocking it.
"""

import contextlib
import copy
import datetime
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import expert_parallel as ep
import tensor_parallel as tp
from conftest import REPO
from conftest import load_run_config as load_config
from model import GPT, ModelConfig, MoE
from ranks import ok_results, spawn, torch_threads
from router import STAT_NAMES, AuxCoefficients
from train import TrainConfig, forward_backward, train


def clip_and_step(model, optimizer, tcfg, groups):
    """The update of train.train_step: clip to the global norm (each expert counted once), AdamW."""
    torch.nn.utils.clip_grads_with_norm_(model.parameters(), tcfg.grad_clip, tp.grad_norm(model, groups))
    optimizer.step()


EP2_PRESET = os.path.join(REPO, "config", "shakespeare_char_ep2.toml")
TOL = {"float64": 1e-10, "float32": 1e-5}

# -----------------------------------------------------------------------------
# acceptance 1: R ranks == one process, every tensor that matters


def rel_err(a, b):
    """||a - b|| / ||b|| (Frobenius; the absolute error when b is all zero)."""
    a, b = a.detach().double(), b.detach().double()
    diff, scale = (a - b).norm().item(), b.norm().item()
    return diff / scale if scale > 0 else diff


# name -> (model overrides, train overrides, selection bias (aux-free: selection only), routing groups per rank)
CASES = {
    # capacity factor 1: a few slots over capacity in every layer and group
    "drops": (dict(capacity_factor=1.0), dict(), None, 1),
    # expert 5 is never selected: its slice gets zero gradient, its owner fewer rows
    "idle_expert": (dict(capacity_factor=1.25), dict(), {5: -2.0}, 1),
    # experts 0-1 win every top-2 choice: every token goes to EP rank 0, the other ranks' experts get
    # nothing at all (their local grads are None before sync) and most slots are dropped
    "one_rank": (dict(capacity_factor=1.0), dict(), {0: 2.0, 1: 2.0}, 1),
    # dropless routing, Qwen's global-batch Switch loss, two micro-batches
    "global_dropless": (
        dict(capacity_factor=0.0, aux_loss="switch"),
        dict(balance_scope="global", grad_accum=2),
        None,
        1,
    ),
    # two capacity groups per rank (route_groups = 2 x world): the received rows' order still matches
    "two_groups_per_rank": (dict(capacity_factor=1.0), dict(), None, 2),
}


def _moe_outputs(model):
    """Collect every MoE layer's output y (B, L, D) per forward, in call order."""
    captured = []
    handles = [
        m.register_forward_hook(lambda mod, inp, out: captured.append(out[0].detach()))
        for m in model.modules()
        if isinstance(m, MoE)
    ]
    return captured, handles


def _equivalence(rank, world, ep_size, dtype_name):
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        groups = tp.build_groups(tp.validate_layout(world, 1, ep_size), datetime.timedelta(seconds=60))
        local = tp.TPGroups.local()
        dtype = getattr(torch, dtype_name)
        b, L = 2, 16  # sequences per rank, tokens per sequence
        report = {}
        for name, (model_kw, train_kw, bias, groups_per_rank) in CASES.items():
            cfg = ModelConfig(
                vocab_size=48,
                block_size=L,
                n_layer=2,
                n_head=2,
                n_embd=32,
                expert_hidden=48,
                n_expert=8,
                top_k=2,
                aux_free_bias=bias is not None,
                **model_kw,
            )
            tcfg = TrainConfig(
                batch_size=b * world,
                z_loss_coef=1e-2,
                grad_clip=0.5,
                learning_rate=1e-2,
                weight_decay=0.1,
                route_groups=groups_per_rank * world,
                **train_kw,
            )
            torch.manual_seed(0)
            ref = GPT(cfg).to(dtype)
            for block in ref.blocks:
                for e, v in (bias or {}).items():
                    block.ffn.router.selection_bias_E[e] = v
            model = tp.parallelize(copy.deepcopy(ref), groups)
            lo, hi = groups.experts.expert_range(cfg.n_expert)

            gen = torch.Generator().manual_seed(1)
            tokens = torch.randint(cfg.vocab_size, (tcfg.grad_accum, b * world, L + 1), generator=gen)
            global_batches = [(t[:, :-1], t[:, 1:]) for t in tokens]
            local_batches = [(x[rank * b : (rank + 1) * b], y[rank * b : (rank + 1) * b]) for x, y in global_batches]
            coeffs = AuxCoefficients(cfg.n_layer, "fixed", alpha_init=0.1)  # strong: the balance gradient counts
            no_autocast = torch.autocast("cpu", enabled=False)

            y_ref, h_ref = _moe_outputs(ref)
            y_ep, h_ep = _moe_outputs(model)
            ce_r, stats_r, loads_r = forward_backward(
                ref, global_batches, coeffs, tcfg, no_autocast, local, n_group=tcfg.route_groups
            )
            sync = tp.OverlappedSync(model, groups, bucket_numel=4096)  # train.py's path: several buckets
            ce_e, stats_e, loads_e = forward_backward(
                model, local_batches, coeffs, tcfg, no_autocast, groups, n_group=groups_per_rank, sync=sync
            )
            for h in h_ref + h_ep:
                h.remove()

            err = {}
            err["moe_out"] = max(rel_err(ye, yr[rank * b : (rank + 1) * b]) for ye, yr in zip(y_ep, y_ref, strict=True))
            err["ce"] = rel_err(ce_e, ce_r)
            alphas = torch.tensor(coeffs.alpha, dtype=torch.float64)
            aux, z = STAT_NAMES.index("aux_loss"), STAT_NAMES.index("z_loss")

            def total(ce, stats):
                return (
                    ce.double()
                    + (alphas * stats[:, aux].double()).sum()
                    + tcfg.z_loss_coef * stats[:, z].double().sum()
                )

            err["loss"] = rel_err(total(ce_e, stats_e), total(ce_r, stats_r))
            err["stats"] = max(rel_err(stats_e[:, i], stats_r[:, i]) for i in range(len(STAT_NAMES)))
            err["loads"] = rel_err(loads_e, loads_r)
            ref_params = dict(ref.named_parameters())
            sharded = {id(p) for p in ep.sharded_parameters(model)}

            def expected(n, p, t):  # the reference tensor this rank should hold
                return t[lo:hi] if id(p) in sharded else t

            err["grad"] = {n: rel_err(p.grad, expected(n, p, ref_params[n].grad)) for n, p in model.named_parameters()}

            ref_opt = torch.optim.AdamW(ref.optim_groups(tcfg.weight_decay), lr=tcfg.learning_rate)
            opt = torch.optim.AdamW(model.optim_groups(tcfg.weight_decay), lr=tcfg.learning_rate)
            clip_and_step(ref, ref_opt, tcfg, local)
            clip_and_step(model, opt, tcfg, groups)
            err["param"] = max(rel_err(p, expected(n, p, ref_params[n])) for n, p in model.named_parameters())
            # the cases are what they say they are
            drop = stats_r[:, STAT_NAMES.index("drop_rate")]
            sanity = {"drop_rate": drop.tolist(), "load_E": loads_r.tolist()}
            report[name] = {"err": err, "sanity": sanity}
        return report
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,ep_size", [(2, 2), (4, 2), (2, 1)])  # (2, 1): data parallel only
def test_ranks_equal_one_process(world, ep_size):
    """Outputs, loss, router stats, every gradient and the AdamW step equal the single process running
    the global batch with one routing group per rank: fp64 to 1e-10, fp32 to 1e-5 (relative)."""
    for dtype_name in ("float64", "float32"):
        reports = ok_results(spawn(_equivalence, world, ep_size, dtype_name, timeout=120))
        tol = TOL[dtype_name]
        for rank, report in enumerate(reports):
            for case, r in report.items():
                err = r["err"]
                worst_grad = max(err["grad"].items(), key=lambda kv: kv[1])
                where = f"{dtype_name} world {world} ep {ep_size} rank {rank} case {case}"
                for key in ("moe_out", "ce", "loss", "stats", "loads", "param"):
                    assert err[key] < tol, f"{where}: {key} rel err {err[key]:.2e}"
                assert worst_grad[1] < tol, f"{where}: grad of {worst_grad[0]} rel err {worst_grad[1]:.2e}"
                # every parameter kind is covered: router, experts, attention, embeddings
                for part in ("router.weight", "experts.w1", "experts.w2", "attn.wq.weight", "tok_emb.weight"):
                    assert any(part in n for n in err["grad"]), part
        sanity = reports[0]
        assert all(d > 0 for d in sanity["drops"]["sanity"]["drop_rate"])
        assert all(load[5] == 0 for load in sanity["idle_expert"]["sanity"]["load_E"])
        per_rank = 8 // ep_size
        assert all(sum(load[per_rank:]) == 0 for load in sanity["one_rank"]["sanity"]["load_E"])
        assert all(d == 0 for d in sanity["global_dropless"]["sanity"]["drop_rate"])


# -----------------------------------------------------------------------------
# acceptance 2: torchrun trains, and its loss curve is the single process's


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def step_records(lines):
    return {r["iter"]: r for r in lines if "loss" in r}


def test_torchrun_loss_curve_matches_one_process(tmp_path, char_data_dir):
    common = [
        f"data_dir={char_data_dir}",
        "max_iters=20",
        "eval_interval=20",
        "eval_iters=2",
        "log_interval=1",
        "save_checkpoint=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "train.py",
        EP2_PRESET,
        "backend=gloo",
        f"out_dir={tmp_path / 'ep2'}",
        *common,
    ]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "world 2 = 2 data-parallel x 1 tensor-parallel, EP: experts over 2 rank(s)" in p.stdout
    # one process, same global batch, one routing group per former rank (in this process: 1 thread)
    with torch_threads(1):
        m, t, s = load_config([EP2_PRESET, "ep_size=1", f"out_dir={tmp_path / 'one'}", *common])
        train(m, t, s)
    ep2, one = step_records(metrics(tmp_path / "ep2")), step_records(metrics(tmp_path / "one"))
    assert sorted(ep2) == sorted(one) == list(range(1, 21))
    worst = max(abs(ep2[i]["loss"] - one[i]["loss"]) / one[i]["loss"] for i in one)
    print(f"torchrun 2 x gloo vs one process, 20 iterations, float32: max relative loss difference {worst:.2e}")
    assert worst < 1e-5
    for i in one:  # router statistics and the adaptive alphas agree too
        for le, lo in zip(ep2[i]["layers"], one[i]["layers"]):
            assert abs(le["alpha"] - lo["alpha"]) <= 1e-6 * lo["alpha"]
            assert abs(le["drop_rate"] - lo["drop_rate"]) < 1e-5


# -----------------------------------------------------------------------------
# acceptance 3: checkpoints resume across ep_size (float64: equal to the uninterrupted run to 1e-10)

SMALL = [
    "n_layer=2",
    "n_embd=64",
    "n_head=2",
    "block_size=32",
    "batch_size=8",
    "route_groups=2",
    "eval_iters=1",
    "eval_interval=3",
    "log_interval=1",
    "warmup_iters=2",
    "lr_decay_iters=6",
    "capacity_factor=1.0",
    "dtype=float64",
    "dist_timeout_s=60",
]


def _train_rank(rank, world, argv):
    m, t, s = load_config(argv)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        train(m, t, s)


def run_train(world, argv):
    """train.py's train() on `world` ranks (forked, as torchrun would start them), or in this process."""
    if world == 1:
        with torch_threads(1), open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            m, t, s = load_config(argv)
            train(m, t, s)
    else:
        ok_results(spawn(_train_rank, world, argv, timeout=120))


@pytest.mark.parametrize(
    "layouts",
    [
        [(2, "ep_size=2"), (1, "ep_size=1")],
        [(1, "ep_size=1"), (2, "ep_size=2")],
        # EDP: (tp 2, ep 2) on 4 ranks -> one process -> plain EP on 2 ranks (route_groups=4: 4 token slices)
        [
            (4, "tp_size=2", "ep_size=2", "route_groups=4"),
            (1, "ep_size=1", "route_groups=4"),
            (2, "ep_size=2", "route_groups=4"),
        ],
    ],
)
def test_resume_across_layouts(tmp_path, char_data_dir, layouts):
    base = [EP2_PRESET, *SMALL, f"data_dir={char_data_dir}", "backend=gloo"]
    groups = [a for a in layouts[0][1:] if a.startswith("route_groups")]
    run_train(1, [*base, f"out_dir={tmp_path / 'straight'}", "ep_size=1", *groups, "max_iters=6"])
    stops = [6 * (k + 1) // len(layouts) for k in range(len(layouts))]
    for k, (world, *layout) in enumerate(layouts):
        resume = ["init_from=resume"] if k else []
        run_train(world, [*base, f"out_dir={tmp_path / 'split'}", *layout, f"max_iters={stops[k]}", *resume])
        ckpt = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=False)
        assert ckpt["model"]["blocks.0.ffn.experts.w1"].shape[0] == 8  # full experts, whoever saved
        assert ckpt["model"]["blocks.0.attn.wq.weight"].shape[0] == 64  # full heads, whoever saved
    a, b = step_records(metrics(tmp_path / "straight")), step_records(metrics(tmp_path / "split"))
    assert sorted(b) == list(range(1, 7))
    for i in range(1, 7):  # each part ran at its own layout
        assert abs(a[i]["loss"] - b[i]["loss"]) <= 1e-10 * a[i]["loss"], (i, a[i]["loss"], b[i]["loss"])
        for la, lb in zip(a[i]["layers"], b[i]["layers"]):
            assert abs(la["alpha"] - lb["alpha"]) <= 1e-10 * la["alpha"]


# -----------------------------------------------------------------------------
# acceptance 4: bad setups fail fast, with the same message on every rank, and nothing hangs

BAD_LAUNCHES = [
    (["n_expert=8", "ep_size=3"], "n_expert=8 is not divisible by ep_size=3"),
    (["ep_size=2"], "world size 3 is not divisible by ep_size=2"),
    (["backend=nccl"], "backend=nccl needs CUDA GPUs"),
    (["batch_size=2"], "batch_size=2 is the global micro-batch, split evenly over the 3"),
]


def _bad_launches(rank, world, data_dir, out_dir):
    messages = []
    for overrides, _ in BAD_LAUNCHES:
        m, t, s = load_config(
            [EP2_PRESET, f"data_dir={data_dir}", f"out_dir={out_dir}", "ep_size=1", "batch_size=6", *overrides]
        )
        try:
            train(m, t, s)
            messages.append(None)
        except Exception as e:  # TrainError, before any process group exists
            messages.append(str(e))
    return messages


def test_bad_launches_fail_on_every_rank_before_any_collective(tmp_path, char_data_dir):
    t0 = time.time()
    per_rank = ok_results(spawn(_bad_launches, 3, char_data_dir, str(tmp_path), timeout=60))
    assert time.time() - t0 < 60
    for i, (_, expected) in enumerate(BAD_LAUNCHES):
        msgs = [m[i] for m in per_rank]
        assert all(msg is not None and expected in msg for msg in msgs), (expected, msgs)
        assert len(set(msgs)) == 1  # one message, the same on every rank


def _empty_shard(rank, world, data_dir, empty_dir, out_dir):
    # rank 1's node has no data for this run: an empty train.bin
    m, t, s = load_config(
        [EP2_PRESET, f"data_dir={empty_dir if rank == 1 else data_dir}", f"out_dir={out_dir}", "dist_timeout_s=30"]
    )
    train(m, t, s)


def test_rank_with_empty_data_fails_every_rank(tmp_path, char_data_dir):
    empty = tmp_path / "empty" / "shakespeare_char"
    empty.mkdir(parents=True)
    shutil.copy(os.path.join(char_data_dir, "shakespeare_char", "meta.json"), empty)
    shutil.copy(os.path.join(char_data_dir, "shakespeare_char", "val.bin"), empty)
    (empty / "train.bin").write_bytes(b"")
    results = spawn(_empty_shard, 2, char_data_dir, str(tmp_path / "empty"), str(tmp_path / "out"), timeout=60)
    msgs = [r[1] for r in results]
    assert all(r[0] == "error" for r in results), results
    assert all("RankFailure: on rank 1:" in m and "holds 0 tokens" in m for m in msgs), msgs
    assert len(set(msgs)) == 1


# -----------------------------------------------------------------------------
# checkpoints gather to rank 0 only; dense models under torchrun


def _gathered_state(rank, world, ep_size):
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        groups = tp.build_groups(tp.validate_layout(world, 1, ep_size), datetime.timedelta(seconds=60))
        cfg = ModelConfig(vocab_size=48, block_size=16, n_layer=2, n_head=2, n_embd=32, expert_hidden=48, n_expert=8)
        torch.manual_seed(0)
        model = tp.parallelize(GPT(cfg), groups)
        opt = torch.optim.AdamW(model.optim_groups(0.1), lr=1e-3)
        x = torch.randint(48, (2, 17), generator=torch.Generator().manual_seed(rank))
        model(x[:, :-1], x[:, 1:])[1].backward()
        tp.sync_gradients(model, groups)
        opt.step()
        state, optim = tp.full_model_state(model, groups), tp.full_optimizer_state(opt, model, groups)
        if state is None:
            return None, None
        moments = {
            i: {k: tuple(v.shape) for k, v in s.items() if torch.is_tensor(v)} for i, s in optim["state"].items()
        }
        return {k: (tuple(v.shape), str(v.dtype)) for k, v in state.items()}, moments
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,ep_size", [(2, 2), (4, 2)])
def test_checkpoint_state_is_gathered_to_rank_0_only_in_the_one_process_format(world, ep_size):
    """Rank 0 gets the full experts and moments (the same names, shapes and dtypes as one process);
    no other rank holds a full copy (about 11 GB per rank at the 1B preset before)."""
    results = ok_results(spawn(_gathered_state, world, ep_size, timeout=90))
    one = ok_results(spawn(_gathered_state, 1, 1, timeout=60))[0]
    assert results[0] == one
    assert all(r == (None, None) for r in results[1:])


def test_dense_model_under_torchrun(tmp_path, char_data_dir):
    """No MoE layer: the step statistics are empty tables, on the loss's device, through the same
    all-reduce as an MoE model's (a dense 8-GPU run crashed here under NCCL)."""
    argv = [
        EP2_PRESET,
        *SMALL,
        "n_expert=0",
        "ep_size=1",
        f"data_dir={char_data_dir}",
        "max_iters=2",
        f"out_dir={tmp_path / 'dense'}",
    ]
    run_train(2, argv)
    steps = step_records(metrics(tmp_path / "dense"))
    assert sorted(steps) == [1, 2] and all(s["layers"] == [] for s in steps.values())
