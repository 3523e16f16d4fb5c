"""The code paths a GPU run takes, checked on CPU with stand-ins (issue 16's items 1, 6, 7): the number
of device -> host syncs per MoE layer, in one process and under expert parallelism; expert parallelism
under bf16 autocast when some ranks' experts receive no token at all; the dtype of the rows that are
exchanged. The capability-based choice of the grouped matmul, the fused [w1; w3] matmul and the dtype
of the rows in one process are in test_model.py; what only a GPU can settle is in
`python bench.py --gpu`, whose CPU dry path runs in test_bench.py.

Ranks are forked gloo processes (tests/ranks.py); every wait is bounded.
"""

import io

import pytest
import torch

import expert_parallel as ep
from model import ModelConfig, MoE
from ranks import ok_results, spawn

D, F_HIDDEN, T_RANK = 32, 48, 16  # model dim, expert hidden, tokens per rank


class SyncCounter:
    """Counts the calls that copy a device tensor's values to the host (.tolist, .item, .cpu, int(),
    float(), bool()), the ones that stall a GPU's queue. On CPU they cost nothing, but the count is
    the same as on CUDA for the code paths that do not branch on the device."""

    NAMES = ("tolist", "item", "cpu", "__int__", "__float__", "__bool__", "__index__")

    def __init__(self, monkeypatch):
        self.calls = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(t, *a, _name=name, _original=original, **kw):
                self.calls.append(_name)
                return _original(t, *a, **kw)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("impl", ["loop", "manual", "grouped"])
@pytest.mark.parametrize("capacity_factor", [0, 1.25])
def test_host_syncs_per_moe_layer_one_process(monkeypatch, impl, capacity_factor):
    # at most 2 per layer: routing's kept count (with capacity) and the loops' split sizes
    torch.manual_seed(8)
    moe = MoE(
        ModelConfig(n_embd=D, n_head=2, n_expert=4, top_k=2, expert_hidden=F_HIDDEN, capacity_factor=capacity_factor)
    )
    moe.experts.impl = impl
    x = torch.randn(2, 16, D, requires_grad=True)
    counter = SyncCounter(monkeypatch)
    y, r = moe(x)
    (y.square().mean() + r.aux_loss).backward()
    routing = 1 if capacity_factor else 0
    assert len(counter.calls) == routing + (impl != "grouped"), counter.calls


def as_bytes(value):
    """A rank's tensors as bytes for the result queue: a tensor put on a torch.multiprocessing queue is
    shared through a file descriptor that dies with its process, which may exit before it is read."""
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def run_ranks(fn, world, *args):
    """fn(rank, world, *args) on `world` forked gloo ranks (tests/ranks.py); its results, rank order."""
    return [
        torch.load(io.BytesIO(b), weights_only=False)
        for b in ok_results(spawn(lambda rank, w: as_bytes(fn(rank, w, *args)), world, gloo=True))
    ]


def one_rank_layer(n_expert, capacity_factor):
    """A MoE layer whose selection bias sends every token's two choices to experts 0 and 1 (EP rank 0's,
    for n_expert = 2 * ep_size): the other ranks' experts receive no row at all."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        n_embd=D,
        n_head=2,
        n_expert=n_expert,
        top_k=2,
        expert_hidden=F_HIDDEN,
        capacity_factor=capacity_factor,
        aux_free_bias=True,
    )
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    moe.router.selection_bias_E[:2] = 10.0
    return moe


def batch(world):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(world, T_RANK, D, generator=gen), torch.randn(world, T_RANK, D, generator=gen)


def fwd_bwd(moe, x_BLD, g_BLD, n_group):
    x = x_BLD.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = moe(x, n_group)
    (y.float() * g_BLD).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in moe.named_parameters()}


def _ep_rank(rank, world, capacity_factor, count_syncs):
    groups = ep.build_groups(world)
    moe = one_rank_layer(2 * world, capacity_factor)
    full = moe.experts
    moe.experts = ep.ParallelExperts(2 * world, D, F_HIDDEN, groups)
    lo, hi = groups.expert_range(2 * world)
    with torch.no_grad():
        for name in ("w1", "w3", "w2"):
            getattr(moe.experts, name).copy_(getattr(full, name)[lo:hi])
    rows = []
    dispatch = ep.dispatch
    ep.dispatch = lambda x_ND, *a: rows.append(x_ND.dtype) or dispatch(x_ND, *a)
    x, g = batch(world)
    syncs = []
    if count_syncs:
        with pytest.MonkeyPatch.context() as mp_:
            counter = SyncCounter(mp_)
            out = fwd_bwd(moe, x[rank : rank + 1], g[rank : rank + 1], 1)
            syncs = counter.calls
    else:
        out = fwd_bwd(moe, x[rank : rank + 1], g[rank : rank + 1], 1)
    return out, rows, syncs


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("capacity_factor", [0, 1.0])
def test_bf16_expert_parallel_with_idle_ranks_equals_one_process(world, capacity_factor):
    # issue 16.1: a rank whose experts receive no rows returned fp32 zeros while its peers returned bf16,
    # so the combine exchange's byte counts disagreed: corrupted rows in forward, an abort in backward
    results = run_ranks(_ep_rank, world, capacity_factor, False)
    moe = one_rank_layer(2 * world, capacity_factor)
    x, g = batch(world)
    y_ref, gx_ref, grads_ref = fwd_bwd(moe, x, g, world)  # one process, one routing group per rank
    tol = dict(rtol=2e-2, atol=2e-2)  # bf16 expert matmuls, summed in different orders
    for rank, ((y, gx, grads), rows, _) in enumerate(results):
        assert y.dtype == torch.bfloat16 and rows == [torch.bfloat16]  # 16.6: bf16 rows are exchanged
        torch.testing.assert_close(y[0].float(), y_ref[rank].float(), **tol)
        torch.testing.assert_close(gx[0], gx_ref[rank], **tol)
        for name in ("w1", "w3", "w2"):
            full = grads_ref[f"experts.{name}"][2 * rank : 2 * rank + 2]
            local = grads[f"experts.{name}"]
            if rank == 0:
                assert full.abs().sum() > 0
                torch.testing.assert_close(local, full, **tol)
            else:  # no row reached these experts: zero gradient (or none), as in the single process
                assert full.abs().sum() == 0 and (local is None or local.abs().sum() == 0)
    router_sum = sum(res[0][2]["router.weight"] for res in results)  # replicated: the ranks' parts add up
    torch.testing.assert_close(router_sum, grads_ref["router.weight"], **tol)


def test_host_syncs_per_moe_layer_under_expert_parallelism():
    # issue 16.7: at most two device -> host syncs per layer: routing's kept count (with capacity) and
    # the split sizes of the exchange, which also carry the loop's per-expert counts
    results = run_ranks(_ep_rank, 2, 1.0, True)
    for _, _, syncs in results:
        assert len(syncs) <= 2, syncs
