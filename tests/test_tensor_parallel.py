"""
Tensor parallelism and the EDP layout (tensor_parallel.py) against one process.

The claim: a (dp x tp) run whose TP ranks each route a disjoint slice of their replica's tokens computes
the same function, gradients and AdamW step as one process running the global batch with one routing
group per slice (route_groups = dp * tp * groups per slice). Checked on 2 and 4 gloo processes in
float64 to 1e-10 relative (||a - b|| / ||b|| per tensor): TP=2, TP=2 x DP=2, EDP (TP=2=EP=2) with and
without DP=2, plain EP over TP x DP, ETP, with capacity drops and with a skewed router (every token to
experts 0-1, so the EP rank holding 4-7 receives nothing); then checkpoints saved full and loaded
sliced, and bad layouts failing with one line.

    python -m pytest -q tests/test_tensor_parallel.py

Ranks are forked, talk over a free loopback port, and every wait is bounded: a hang fails the test.
"""

import copy
import datetime

import pytest
import torch
import torch.distributed as dist

import tensor_parallel as tp
from model import GPT, ModelConfig
from ranks import ok_results
from ranks import spawn as spawn_ranks
from router import balance_loss

TIMEOUT = datetime.timedelta(seconds=60)
TOL = 1e-10


def spawn(fn, world, *args, timeout=120):
    """fn(rank, world, *args) on `world` forked gloo ranks; each rank's return value, in rank order."""
    return ok_results(spawn_ranks(fn, world, *args, timeout=timeout, gloo=True))


# -----------------------------------------------------------------------------
# acceptance 1: every layout == one process


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    diff, scale = (a - b).norm().item(), b.norm().item()
    return diff / scale if scale > 0 else diff


# name -> (capacity factor, selection bias (aux-free: selection only), routing groups per slice)
CASES = {
    "drops": (1.0, None, 1),  # a few slots over capacity in every group
    "skewed": (1.0, {0: 2.0, 1: 2.0}, 1),  # experts 0-1 win every choice: the rank holding 4-7 gets nothing
    "two_groups": (1.0, None, 2),  # two capacity groups per slice
}
ALPHA, Z_COEF, LR, WD, CLIP = 0.1, 1e-2, 1e-2, 0.1, 0.5
B, L = 2, 16  # sequences per data-parallel replica, tokens per sequence


def make_cfg(capacity_factor, bias):
    # GQA (4 query heads, 2 key/value heads), one dense layer (ffn_hidden 128) and one MoE layer
    return ModelConfig(
        vocab_size=48,
        block_size=L,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=32,
        expert_hidden=48,
        n_expert=8,
        top_k=2,
        moe_every=2,
        capacity_factor=capacity_factor,
        aux_free_bias=bias is not None,
    )


def objective(model, x, y, n_group):
    logits, ce, routs = model(x, y, n_group=n_group)
    return logits, balance_loss(ce, routs, [ALPHA] * len(routs), Z_COEF), routs


def adamw_step(model, opt, norm):
    torch.nn.utils.clip_grads_with_norm_(model.parameters(), CLIP, norm)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _equivalence(rank, world, layouts):
    report = {}
    for tp_size, ep_size, expert_group in layouts:
        for case, (cf, bias, g) in CASES.items():
            cfg = make_cfg(cf, bias)
            layout = tp.validate_layout(world, tp_size, ep_size, expert_group, cfg, tokens_per_replica=B * L, n_group=g)
            groups = tp.build_groups(layout, TIMEOUT)
            dp, d = layout.dp_size, groups.dp_rank
            route_groups = layout.route_slices * g  # the single process's routing groups
            torch.manual_seed(0)
            ref = GPT(cfg).double()
            for block in ref.blocks:
                if block.is_moe:
                    for e, v in (bias or {}).items():
                        block.ffn.router.selection_bias_E[e] = v
            model = tp.parallelize(copy.deepcopy(ref), groups)

            gen = torch.Generator().manual_seed(1)
            tokens = torch.randint(cfg.vocab_size, (2, B * dp, L + 1), generator=gen)  # two steps' batches
            x, y = tokens[0, :, :-1], tokens[0, :, 1:]
            xl, yl = x[d * B : (d + 1) * B], y[d * B : (d + 1) * B]

            logits_r, loss_r, routs_r = objective(ref, x, y, route_groups)
            logits_p, loss_p, _ = objective(model, xl, yl, g)
            loss_mean = loss_p.detach().clone()
            dist.all_reduce(loss_mean, group=groups.dp_group)
            err = {"logits": rel_err(logits_p, logits_r[d * B : (d + 1) * B]), "loss": rel_err(loss_mean / dp, loss_r)}

            loss_r.backward()
            loss_p.backward()
            tp.sync_gradients(model, groups)
            want = tp.shard_state({n: p.grad for n, p in ref.named_parameters()}, model, groups)
            err["grad"] = {n: rel_err(p.grad, want[n]) for n, p in model.named_parameters()}
            norm_r = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
            norm_p = tp.grad_norm(model, groups)
            err["grad_norm"] = rel_err(norm_p, norm_r)

            opt_r = torch.optim.AdamW(ref.optim_groups(WD), lr=LR)
            opt_p = torch.optim.AdamW(model.optim_groups(WD), lr=LR)
            adamw_step(ref, opt_r, norm_r)
            adamw_step(model, opt_p, norm_p)
            want = tp.shard_state(ref.state_dict(), model, groups)
            err["param"] = max(rel_err(p, want[n]) for n, p in model.named_parameters())

            # checkpoints: saved full (equal to the single process's), resumed sliced at this layout
            full = tp.full_model_state(model, groups)  # rank 0 only (it writes), unless nothing is sharded
            full_opt, ref_opt = tp.full_optimizer_state(opt_p, model, groups), opt_r.state_dict()
            assert (full is None) == (full_opt is None) == (rank > 0 and layout.name != "DP")
            if full is not None:
                err["saved_model"] = max(rel_err(full[k], v) for k, v in ref.state_dict().items())
                err["saved_optim"] = max(
                    rel_err(full_opt["state"][i][k], s[k])
                    for i, s in ref_opt["state"].items()
                    for k in ("exp_avg", "exp_avg_sq")
                )
            torch.manual_seed(123)  # another init: everything must come from the checkpoint
            resumed = GPT(cfg).double()
            resumed.load_state_dict(ref.state_dict())  # saved by the single process
            resumed = tp.parallelize(resumed, groups)
            opt_s = torch.optim.AdamW(resumed.optim_groups(WD), lr=LR)
            full_copy = copy.deepcopy(ref_opt)  # as if read from a file: no tensor shared with opt_r
            opt_s.load_state_dict(tp.shard_optimizer_state(full_copy, opt_s, resumed, groups))
            x2, y2 = tokens[1, :, :-1], tokens[1, :, 1:]
            objective(ref, x2, y2, route_groups)[1].backward()
            objective(resumed, x2[d * B : (d + 1) * B], y2[d * B : (d + 1) * B], g)[1].backward()
            tp.sync_gradients(resumed, groups)
            adamw_step(ref, opt_r, torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]))
            adamw_step(resumed, opt_s, tp.grad_norm(resumed, groups))
            want = tp.shard_state(ref.state_dict(), resumed, groups)
            err["resumed_step"] = max(rel_err(p, want[n]) for n, p in resumed.named_parameters())

            stats = {
                "drop_rate": [r.drop_rate.item() for r in routs_r],
                "load_E": [r.load_E.tolist() for r in routs_r],
                "tp_params": len(tp.tp_sharded_parameters(model)),
                "plan": {k: [n for n, _ in v] for k, v in tp.reduction_plan(model, groups).items()},
            }
            report[(layout.name, tp_size, layout.ep_size, case)] = {"err": err, "stats": stats}
    return report


def check_reports(reports):
    worst = max(
        max(max(v.values()) if isinstance(v, dict) else v for v in r["err"].values())
        for report in reports
        for r in report.values()
    )
    print(f"{len(reports)} processes, {len(reports[0])} layout x case runs: worst relative error {worst:.1e}")
    for rank, report in enumerate(reports):
        for key, r in report.items():
            err, where = r["err"], f"rank {rank} {key}"
            for k, v in err.items():
                if k == "grad":
                    worst = max(v.items(), key=lambda kv: kv[1])
                    assert worst[1] < TOL, f"{where}: grad of {worst[0]} rel err {worst[1]:.2e}"
                    for part in (
                        "router.weight",
                        "experts.w1",
                        "attn.wq.weight",
                        "attn.wk.weight",
                        "ffn.w2.weight",
                        "tok_emb.weight",
                        "lm_head.weight",
                    ):
                        assert any(part in n for n in v), part
                else:
                    assert v < TOL, f"{where}: {k} rel err {v:.2e}"
            stats = r["stats"]
            name, tp_size, _, case = key
            assert stats["tp_params"] == (0 if tp_size == 1 else 8 + 3 + (3 if name == "ETP" else 0))  # 2 attn, 1 MLP
            if case == "skewed":  # the cases are what they say: experts 4-7 (rank 1's under EP 2) get nothing
                assert all(sum(load[2:]) == 0 for load in stats["load_E"])
            else:
                assert all(d > 0 for d in stats["drop_rate"])
            if name in ("EDP", "EP") and tp_size > 1:
                assert any("router" in n for n in stats["plan"]["world"]) and stats["plan"]["edp"]


def test_two_processes_equal_one():
    """TP=2 (experts replicated), EDP with TP=2=EP=2, ETP with TP=2."""
    check_reports(spawn(_equivalence, 2, [(2, 1, ""), (2, 1, "tp"), (2, 1, "etp")]))


def test_four_processes_equal_one():
    """TP=2 x DP=2, EDP (TP=2=EP=2) x DP=2, plain EP over all four ranks with TP=2, and EP=2 without TP."""
    check_reports(spawn(_equivalence, 4, [(2, 1, ""), (2, 1, "tp"), (2, 1, "world"), (1, 2, "")]))


# -----------------------------------------------------------------------------
# acceptance 2: bad layouts fail with one actionable line, the same on every rank (pure validation)

BAD = [  # (layout, model overrides, what the message says)
    ({"world_size": 8, "tp_size": 8}, {"n_kv_head": 2}, "must both be divisible by tp_size=8"),
    ({"world_size": 4, "tp_size": 4}, {"n_kv_head": 2}, "n_kv_head=2 must both be divisible by tp_size=4"),
    (
        {"world_size": 6, "tp_size": 3, "expert_group": "tp"},
        {"n_head": 6, "n_embd": 48},
        "n_expert=8 is not divisible by the expert group of 3 ranks (expert_group='tp'): pick a tp_size",
    ),
    ({"world_size": 6, "tp_size": 2, "ep_size": 3}, {}, "n_expert=8 is not divisible by ep_size=3"),
    ({"world_size": 6, "tp_size": 4}, {}, "world size 6 is not divisible by tp_size=4"),
    ({"world_size": 6, "tp_size": 2, "ep_size": 4}, {}, "world size 6 is not divisible by ep_size=4"),
    ({"world_size": 4, "tp_size": 2, "ep_size": 4, "expert_group": "tp"}, {}, "expert_group='tp' sets ep_size=2"),
    ({"world_size": 4, "tp_size": 2, "expert_group": "experts"}, {}, "expert_group='experts': use"),
    ({"world_size": 4, "tp_size": 2, "expert_group": "etp"}, {"expert_hidden": 51}, "expert_hidden=51 is not"),
    ({"world_size": 4, "tp_size": 2}, {"dropout": 0.1}, "set dropout=0"),
    ({"world_size": 4, "tp_size": 2, "tokens_per_replica": 30, "n_group": 4}, {}, "30 tokens per data-parallel"),
]


@pytest.mark.parametrize("layout_kw,model_kw,message", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_layout_is_one_line(layout_kw, model_kw, message):
    cfg = ModelConfig(**{"n_head": 4, "n_embd": 32, **model_kw})
    with pytest.raises(ValueError) as e:
        tp.validate_layout(model_cfg=cfg, **layout_kw)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_good_layouts_resolve():
    cfg = ModelConfig(n_head=4, n_embd=32)
    assert tp.validate_layout(8, 2, 1, "tp", cfg).name == "EDP"
    assert tp.validate_layout(8, 2, 2, "", cfg).name == "EDP"  # ep_size == tp_size is EDP by itself
    assert tp.validate_layout(8, 2, 1, "world", cfg).ep_size == 8
    assert tp.validate_layout(8, 2, 1, "etp", cfg).name == "ETP"
    assert tp.validate_layout(8, 1, 1, "", cfg).name == "DP"


# -----------------------------------------------------------------------------
# the communication table of the README: slicing cuts dispatch by tp_size


def test_bytes_per_layer():
    cfg = ModelConfig(n_embd=64, n_head=4, n_expert=8, top_k=2)
    T, s = 128, 2
    act = T * 64 * s  # one T x D activation

    def sent(layout, sliced=True):
        return {w: b for w, _, b in tp.comm_bytes_per_layer(cfg, layout, T, s, sliced)}

    ep4 = sent(tp.validate_layout(4, 1, 4, "", cfg))
    assert ep4 == {"dispatch all-to-all": 3 / 4 * 2 * act, "combine all-to-all": 3 / 4 * 2 * act}
    edp_layout = tp.validate_layout(4, 2, 1, "tp", cfg)
    edp = sent(edp_layout)
    assert edp["dispatch all-to-all"] == 1 / 2 * 2 * act / 2  # T/2 tokens per rank, half of them leave
    assert edp["token all-gather"] == act / 2 and edp["attention all-reduce"] == act
    assert sent(edp_layout, sliced=False)["dispatch all-to-all"] == 2 * edp["dispatch all-to-all"]
    etp = sent(tp.validate_layout(4, 2, 1, "etp", cfg))
    assert etp == {"attention all-reduce": act, "expert-output all-reduce": 2 * act}
    assert tp.expert_gradient_bytes(1000, edp_layout) == (2 * 1 / 2 * 500 * 4, 2)
    picture = tp.layout_picture(edp_layout, cfg).splitlines()
    assert picture[0].split() == ["rank", "0", "1", "2", "3"]
    assert picture[-2].split() == ["EDP", "group", "D0", "D1", "D0", "D1"]  # the DP group holds the same experts
