"""
Expert parallelism by hand over torch.distributed: every MoE layer's experts are sharded over `ep_size`
ranks, and the layer sends each kept (token, expert) slot to the rank that owns its expert with an
all-to-all, runs the local experts, and sends the results back with the mirror-image all-to-all
(GShard's dispatch/combine; "EP" in Skywork-MoE appendix B, whose EDP is this EP group placed on the
attention tensor-parallel group).

Read top to bottom, in the order things happen in a run:
  1. layout and process groups   world = data-parallel x expert-parallel
  2. the differentiable all-to-all   backward = the reverse exchange
  3. dispatch and combine        exchange counts, then tokens; combine is the mirror image
  4. ParallelExperts             the model.Experts seam, holding E / ep_size experts
  5. the gradient rule           what is reduced over which group, and scaled by what; the step's
                                 statistics reduced to the single process's numbers
  6. checkpoints                 full expert tensors gathered to rank 0 on save, sliced on load
  7. starting and failing        process groups with a timeout; a rank-local error becomes the same
                                 error on all ranks, and a rank that dies or hangs mid-collective is
                                 named by the ranks left waiting (a heartbeat in the rendezvous store)

Nothing here runs on its own:
    torchrun --standalone --nproc_per_node=2 train.py config/shakespeare_char_ep2.toml   # train with it
    python -m pytest -q tests/test_expert_parallel.py       # 2 and 4 processes == one process (fp64)
    python bench.py --ep                                    # what dispatch + combine cost under gloo

Shape legend: N kept slots this rank routed, M slots this rank's experts received, D model dim,
E experts of a layer, R = ep_size ranks of the expert-parallel group, El = E / R experts per rank.
Split sizes are Python lists of length R (`send_splits`, `recv_splits`): rows per peer rank.
"""

import contextlib
import datetime
import os
import socket
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.profiler import record_function

from model import Experts, MoE

# -----------------------------------------------------------------------------
# 1. layout and process groups
#
# Ranks are numbered rank = dp_index * ep_size + ep_rank, so each expert-parallel (EP) group is a run of
# ep_size consecutive ranks. torchrun numbers the ranks of a node consecutively, so an ep_size that
# divides the processes per node keeps the all-to-all traffic inside a node (NVLink), and only the
# expert-data-parallel gradient all-reduce crosses nodes. World 4, ep_size 2:
#
#     rank           0    1    2    3
#     EP group      [0    1]  [2    3]     each EP group holds every expert exactly once
#     experts held  0-3  4-7  0-3  4-7     (E = 8: rank 0 and rank 2 hold the same experts 0-3)
#     EDP group     [0 2] and [1 3]        ranks holding the same experts: reduce their gradients


@dataclass
class ParallelGroups:
    rank: int
    world_size: int
    ep_size: int
    ep_rank: int  # position inside the EP group: which expert slice this rank owns
    ep_group: dist.ProcessGroup  # the ep_size ranks that exchange tokens
    edp_group: dist.ProcessGroup  # the world_size / ep_size ranks holding the same experts
    store: dist.Store | None = None  # the rendezvous key-value store: where a failing rank leaves its
    # error for the others (section 7); None: not kept

    @classmethod
    def local(cls):
        """A single process: world 1, every expert here, no group to talk to. The training code takes
        the same path with it, and each collective below is skipped where there is nobody to reach."""
        return cls(0, 1, 1, 0, None, None)

    @property
    def is_main(self):
        return self.rank == 0

    def expert_range(self, n_expert):
        """[lo, hi): the global ids of the experts this rank owns (contiguous, E / ep_size of them)."""
        per_rank = n_expert // self.ep_size
        return self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank


def validate_layout(ep_size, world_size, n_expert=None):
    """Raise ValueError with an actionable message for a layout that cannot work. Pure: every rank
    computes the same answer from the same config, so all fail alike and none waits for another.
    n_expert=None checks the world only (the model is not known yet)."""
    if ep_size < 1:
        raise ValueError(f"ep_size={ep_size} must be >= 1 (1 = no expert parallelism)")
    if world_size % ep_size:
        raise ValueError(
            f"world size {world_size} is not divisible by ep_size={ep_size}: ranks form "
            f"data-parallel x expert-parallel groups, so launch a multiple of {ep_size} "
            f"processes or pick an ep_size that divides {world_size}"
        )
    if n_expert is not None and ep_size > 1 and n_expert == 0:
        raise ValueError(f"ep_size={ep_size} shards experts, but the model is dense (n_expert=0): set ep_size=1")
    if n_expert is not None and ep_size > 1 and n_expert % ep_size:
        raise ValueError(
            f"n_expert={n_expert} is not divisible by ep_size={ep_size}: every rank of an "
            f"expert-parallel group holds n_expert / ep_size experts; pick an ep_size "
            f"that divides {n_expert}"
        )


def build_groups(ep_size, store=None, timeout=None):
    """The EP and EDP groups of this rank; call on every rank after dist.init_process_group (store: the
    store it was started with, kept for report_failure / failed_peer).

    dist.new_group is collective over the whole world: every rank creates every group, in the same
    order, including the groups it is not a member of (skipping one is the classic start-up hang).
    timeout: a new group does not inherit the world's timeout but gets torch's default of 30 minutes,
    so without it a hung peer holds the others in an all-to-all for half an hour."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    validate_layout(ep_size, world_size)
    ep_group = edp_group = None
    for dp_index in range(world_size // ep_size):
        ranks = list(range(dp_index * ep_size, (dp_index + 1) * ep_size))
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            ep_group = group
    for ep_rank in range(ep_size):
        ranks = list(range(ep_rank, world_size, ep_size))
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            edp_group = group
    return ParallelGroups(rank, world_size, ep_size, rank % ep_size, ep_group, edp_group, store)


def resolve_backend(backend, device_type):
    if backend != "auto":
        return backend
    return "nccl" if device_type == "cuda" else "gloo"


# -----------------------------------------------------------------------------
# 2. the differentiable all-to-all
#
# all_to_all_single(out, inp, out_splits, in_splits): this rank sends rows inp[sum(in_splits[:j]) :
# ... + in_splits[j]] to rank j, and receives out_splits[i] rows from rank i, stacked in rank order.
# The splits may be uneven and zero. Its adjoint is the same exchange run backwards: the gradient of
# the rows this rank received goes back to the ranks that sent them, so backward swaps the two split
# lists. Every rank of the group must run the backward exchange too, or its peers wait forever: see
# ParallelExperts.forward for the case where that would not happen by itself.


class AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = grad_out.new_empty((sum(ctx.in_splits),) + tuple(grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x, out_splits, in_splits, group):
    return AllToAll.apply(x, out_splits, in_splits, group)


# -----------------------------------------------------------------------------
# 3. dispatch and combine
#
# The router leaves x_ND sorted by global expert id and counts_E slots per expert. Experts are owned in
# contiguous blocks of El, so the rows for EP rank j are one contiguous chunk: send_splits[j] is the
# sum of counts_E over j's experts. But a receiver cannot size its buffer from its own data, and it
# must know how the rows it gets split over its El experts. So dispatch is two exchanges:
#   (a) counts: an even all-to-all of counts_E viewed as (R, El): row j goes to rank j, and this rank
#       receives recv_counts_RE[s, e] = slots rank s sends to my local expert e;
#   (b) tokens: the uneven all-to-all of x_ND with send_splits, recv_splits = recv_counts_RE.sum(1).
# Received rows come grouped by (source rank, expert). The single process runs expert e on its rows
# ordered by routing group, and rank s's tokens are the single process's group s (or its consecutive
# groups s*G..s*G+G-1, each already in order inside rank s's chunk), so (expert, source rank) is that
# order, and each local expert then sees exactly the single process's rows. Going from one order to the
# other moves whole blocks of known sizes (a block transpose of the R x El segments), so the permutation
# is index arithmetic on the counts, no sort, and both directions are plain gathers (_PermuteRows).
# Combine permutes back and runs (b) backwards; the counts need no second exchange.
#
# Host syncs: one per exchange, the .tolist() of the split sizes, which also brings the per-expert row
# counts for Experts.forward (so its loops add none). The phases carry record_function labels
# ("ep.counts", ...) that bench.py --ep and GPU profiler traces read.


@dataclass
class DispatchPlan:
    send_splits: list  # rows this rank sent to each EP rank (and gets back in combine)
    recv_splits: list  # rows this rank received from each EP rank
    order_M: torch.Tensor  # (expert, source) position -> row of the received (source, expert) order
    dest_M: torch.Tensor  # the inverse: received row -> its (expert, source) position
    counts_El: torch.Tensor  # rows per local expert, for Experts.forward
    counts_El_host: list  # the same on the host (Experts.forward's loops need no sync of their own)
    group: dist.ProcessGroup


class _PermuteRows(torch.autograd.Function):
    """x[index] whose backward is the gather by the inverse permutation: cheaper than indexing's
    backward (an accumulating scatter into zeros), and the same numbers, as every row moves once."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def block_transpose_index(counts_RE, total):
    """For rows laid out in R x C blocks in (r, c) order, counts_RE[r, c] rows each (total in all):
    the gather index that lays them out in (c, r) order. Each target block is a run of consecutive
    source rows, shifted by (where the block starts in the source) - (where it starts in the target).
    Applied to counts_RE.t() it gives the inverse permutation."""
    counts = counts_RE.reshape(-1)
    start_RE = (counts.cumsum(0) - counts).view_as(counts_RE)
    counts_CR = counts_RE.t().reshape(-1)
    shift_CR = start_RE.t().reshape(-1) - (counts_CR.cumsum(0) - counts_CR)
    # output_size: the total is known on the host, so repeat_interleave does not sync to learn it
    return torch.repeat_interleave(shift_CR, counts_CR, output_size=total) + torch.arange(
        total, device=counts_RE.device
    )


def dispatch(x_ND, counts_E, group):
    R = dist.get_world_size(group)
    El = counts_E.numel() // R
    with record_function("ep.counts"):  # (a) counts: even splits, El per peer
        recv_counts = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts, counts_E.contiguous(), group=group)
        recv_counts_RE = recv_counts.view(R, El)
    with record_function("ep.split_sizes"):
        # split sizes must be host integers: the exchange's one device -> host sync (unavoidable for
        # uneven sizes; routing's kept count, with capacity, is the layer's other one); the per-expert
        # counts of the received rows come along in the same copy
        host = torch.cat([counts_E.view(R, El).sum(1), recv_counts_RE.reshape(-1)]).tolist()
        send_splits, recv_host_RE = host[:R], [host[R + s * El : R + (s + 1) * El] for s in range(R)]
        recv_splits = [sum(row) for row in recv_host_RE]
        counts_El_host = [sum(row[e] for row in recv_host_RE) for e in range(El)]
    with record_function("ep.tokens"):  # (b) tokens
        x_MD = all_to_all(x_ND, recv_splits, send_splits, group)
    with record_function("ep.permute"):  # (source, expert) -> (expert, source), both directions
        M = sum(recv_splits)
        order_M, dest_M = block_transpose_index(recv_counts_RE, M), block_transpose_index(recv_counts_RE.t(), M)
        x_MD = _PermuteRows.apply(x_MD, order_M, dest_M)
    return x_MD, DispatchPlan(send_splits, recv_splits, order_M, dest_M, recv_counts_RE.sum(0), counts_El_host, group)


def combine(y_MD, plan):
    """Inverse of dispatch: permute back to (source, expert) order and send every row back to its source."""
    with record_function("ep.permute"):
        y_MD = _PermuteRows.apply(y_MD, plan.dest_M, plan.order_M)
    with record_function("ep.tokens"):
        return all_to_all(y_MD, plan.send_splits, plan.recv_splits, plan.group)


# -----------------------------------------------------------------------------
# 4. the experts of one rank


class ParallelExperts(Experts):
    """The E / ep_size experts this rank owns, behind the same (x_ND, counts_E) -> y_ND call as
    model.Experts, so model.MoE does not know it is distributed. Parameters keep the names w1, w3, w2
    (state-dict keys do not change); only their first dimension is the local El."""

    def __init__(self, n_expert, n_embd, hidden, groups):
        super().__init__(n_expert // groups.ep_size, n_embd, hidden)
        self.n_expert_total = n_expert
        self.groups = groups

    def extra_repr(self):
        lo, hi = self.groups.expert_range(self.n_expert_total)
        g = self.groups
        return f"experts {lo}..{hi - 1} of {self.n_expert_total} (ep_rank {g.ep_rank} of {g.ep_size})"

    def forward(self, x_ND, counts_E, counts_host=None):
        # counts_host (the loop's split sizes) is of no use here: the local experts' counts come with
        # dispatch's own host copy of the split sizes
        x_MD, plan = dispatch(x_ND, counts_E, self.groups.ep_group)
        if x_MD.shape[0]:
            y_MD = super().forward(x_MD, plan.counts_El, plan.counts_El_host)
        else:
            # No token reached this rank's experts. Experts.forward would return fresh zeros with no
            # autograd history, the combine output would then not require grad on this rank, and its
            # backward all-to-all would never run here while its peers wait in theirs (a hang), and
            # this rank's own tokens would get no gradient from the experts that processed them.
            # Deriving the empty result from x_MD keeps both exchanges in this rank's backward. Its
            # dtype must be the one the peers' experts return (bf16 under autocast, not x's): the
            # combine exchange sizes its buffers from it, and a mismatch corrupts rows or aborts.
            y_MD = (x_MD * 0).to(self.compute_dtype(x_MD))
        return combine(y_MD, plan)


def shard_experts(model, groups):
    """Replace every MoE layer's Experts by the ParallelExperts of this rank, holding a copy of its
    slice of the full (E, ...) weights. Applied from outside the model; every rank must have built
    the same full model (same seed or same checkpoint) so the slices match the single-process ones."""
    if groups.ep_size == 1:
        return model
    for module in model.modules():
        if isinstance(module, MoE) and not isinstance(module.experts, ParallelExperts):
            full = module.experts
            E, F, D = full.w1.shape
            part = ParallelExperts(E, D, F, groups).to(device=full.w1.device, dtype=full.w1.dtype)
            part.impl = full.impl  # the same expert kernel choice (loop / grouped matmul) as the full layer
            lo, hi = groups.expert_range(E)
            with torch.no_grad():
                for name in ("w1", "w3", "w2"):
                    getattr(part, name).copy_(getattr(full, name)[lo:hi])
            module.experts = part
    return model


def sharded_parameters(model):
    """The parameters that differ between the ranks of an EP group: the local expert weights."""
    return [p for m in model.modules() if isinstance(m, ParallelExperts) for p in m.parameters(recurse=False)]


# -----------------------------------------------------------------------------
# 5. the gradient rule
#
# Each rank r computes its local loss l_r (mean over its local tokens, plus its own balance losses);
# the single process with the same global batch computes L = (1/W) sum_r l_r over the W ranks (equal
# local batches, one routing group per rank). So the target gradient is dL/dp = (1/W) sum_r dl_r/dp.
#  - Non-expert parameter p (attention, norms, embeddings, router, lm_head): rank r's backward gives
#    dl_r/dp, so all-reduce SUM over the world and divide by W (what DDP's averaging does).
#  - Expert parameter of expert e, held by one rank per EP group: the tokens of every rank s of that
#    EP group reached e through the all-to-all, and their gradients came back through its backward,
#    so the owner already holds sum_{s in EP group} dl_s/dp. The other EP groups' ranks hold their
#    own copies of e (the EDP group); SUM over the EDP group covers every rank once, then divide by W.
#    Averaging over the EDP group instead (divide by W / ep_size) is the classic bug: expert gradients
#    ep_size times too large, which nothing crashes on and Adam mostly hides.
# Reduced once per optimizer step, after the last micro-batch (what DDP + no_sync() does, without
# DDP: excluding the experts from DDP would need one of its private methods). A parameter with no
# gradient (an expert shard that received no token) gets zeros, so every rank takes part in the
# same collectives and AdamW still applies weight decay to it, as the single process does.
# tensor_parallel.sync_gradients applies this rule (and its tensor-parallel generalisation, where the
# divisor is the number of data-parallel replicas) with the bucketed all-reduce below; grad_norm there
# counts each expert once by summing the squared norms of the shards over the EP group.


def _all_reduce_scaled_(grads, group, scale, bucket_numel=1 << 24):
    """grads <- scale * SUM over group, coalesced into flat buckets (one collective per bucket)."""
    reduce = dist.get_world_size(group) > 1
    bucket, numel = [], 0
    for i, g in enumerate(grads):
        bucket.append(g)
        numel += g.numel()
        if numel >= bucket_numel or i == len(grads) - 1:
            flat = torch.cat([b.reshape(-1) for b in bucket])
            if reduce:
                dist.all_reduce(flat, group=group)
            flat.mul_(scale)
            for b, f in zip(bucket, flat.split([b.numel() for b in bucket])):
                b.copy_(f.view_as(b))
            bucket, numel = [], 0


def reduce_step_statistics(ces, stats, loads, cv):
    """All-reduce one step's per-micro-batch CE (M,), router stats (M, layers, stats) and loads
    (M, layers, E) so that every rank holds the numbers the single process would compute on the
    global batch: means over equal shards are averaged, loads (counts) summed, and load_cv, a ratio,
    recomputed from the summed loads (cv: its column). One collective; float64 so the sums add no
    rounding."""
    parts = [torch.stack(ces), torch.stack(stats), torch.stack(loads)]
    flat = torch.cat([t.double().reshape(-1) for t in parts])
    dist.all_reduce(flat)
    ce_M, stats_MLS, loads_MLE = (
        f.view_as(t).to(t.dtype) for f, t in zip(flat.split([t.numel() for t in parts]), parts)
    )
    world = dist.get_world_size()
    ce_M, stats_MLS = ce_M / world, stats_MLS / world
    if loads_MLE.numel():
        stats_MLS[:, :, cv] = loads_MLE.std(dim=-1, correction=0) / loads_MLE.mean(dim=-1)
    return list(ce_M), list(stats_MLS), list(loads_MLE)


# -----------------------------------------------------------------------------
# 6. checkpoints: always the full model, so a run saved at one ep_size resumes at any other
#
# Save: gather each expert shard (and its AdamW moments) over EP group 0 (ranks 0 .. ep_size-1, which
# together hold every expert once) to rank 0, the only rank that writes. No other rank holds a full
# copy: at the 1B preset the full experts and both moments are about 11 GB per rank. Load: every rank
# builds the full model, loads the full state, and shard_experts slices it; optimizer moments are
# sliced by shard_optimizer_state. The gathers are collectives: call these on every rank, in the same
# order.


def _gather_rows_to_main(t, groups):
    """The full (E, ...) tensor on rank 0 from the shards of EP group 0; None on every other rank (the
    ranks outside EP group 0 take no part)."""
    if groups.rank >= groups.ep_size:
        return None
    parts = [torch.empty_like(t) for _ in range(groups.ep_size)] if groups.is_main else None
    dist.gather(t.contiguous(), parts, group=groups.ep_group, group_dst=0)
    return torch.cat(parts) if parts is not None else None


def full_model_state(model, groups):
    """model.state_dict() with every expert tensor gathered to its full (E, ...) shape: on rank 0, and
    None on the other ranks when the experts are sharded."""
    if groups.ep_size == 1:
        return model.state_dict()
    state = model.state_dict() if groups.is_main else None
    for prefix, m in model.named_modules():
        if isinstance(m, ParallelExperts):
            for name, p in m.named_parameters(recurse=False):
                full = _gather_rows_to_main(p.detach(), groups)
                if state is not None:
                    state[f"{prefix}.{name}"] = full
    return state


def _optimizer_params(optimizer):
    # Optimizer.state_dict numbers parameters in this order: group by group, parameter by parameter
    return [p for g in optimizer.param_groups for p in g["params"]]


def _map_expert_moments(state, optimizer, model, fn):
    """state (an optimizer state_dict) with fn(tensor, param) applied to every per-parameter tensor of
    the sharded expert parameters (AdamW's exp_avg, exp_avg_sq); scalars such as step stay as they are."""
    shard_ids = {id(p) for p in sharded_parameters(model)}
    per_param = dict(state["state"])
    for i, p in enumerate(_optimizer_params(optimizer)):
        if id(p) in shard_ids and i in per_param:
            per_param[i] = {
                k: fn(v, p) if torch.is_tensor(v) and v.dim() == p.dim() else v for k, v in per_param[i].items()
            }
    return {**state, "state": per_param}


def full_optimizer_state(optimizer, model, groups):
    """optimizer.state_dict() with each expert shard's moments (same shape as the shard) gathered to
    the full (E, ...) shape: on rank 0, and None on the other ranks when the experts are sharded."""
    if groups.ep_size == 1:
        return optimizer.state_dict()
    if groups.rank >= groups.ep_size:
        return None
    state = _map_expert_moments(optimizer.state_dict(), optimizer, model, lambda v, p: _gather_rows_to_main(v, groups))
    return state if groups.is_main else None


def shard_optimizer_state(state, optimizer, model, groups):
    """The inverse of full_optimizer_state for this rank: slice full (E, ...) moments to its experts."""
    if groups.ep_size == 1:
        return state

    def shard(v, p):
        lo, hi = groups.expert_range(p.shape[0] * groups.ep_size)
        return v[lo:hi].clone()

    return _map_expert_moments(state, optimizer, model, shard)


# -----------------------------------------------------------------------------
# 7. starting, and failing on every rank
#
# process_groups starts the process group from torchrun's environment and tears it down however the run
# ends. A config error is seen by every rank alike (same argv), so each raises before any collective. A
# file missing on one node is not: that rank would exit while its peers wait in the next collective
# until the timeout, with the error only in one rank's log. on_every_rank exchanges the error first, so
# every rank stops with the same message.


class RankFailure(Exception):
    """The same one-line failure on every rank: one rank's error, or a peer that died or hangs."""


def raise_if_any_rank_failed(error):
    """Collective over the world: error is None or this rank's message. If any rank has one, every
    rank raises RankFailure naming the first failing rank."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        r, e = failed[0]
        more = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
        raise RankFailure(f"on rank {r}{more}: {e}")


def on_every_rank(groups, fn, explained=(Exception,)):
    """fn() on this rank; under torchrun also a barrier, and a failure on any rank makes every rank
    raise the same RankFailure. explained: the exception types whose message says it all (the
    project's own errors); anything else is reported with its type."""
    if groups.world_size == 1:
        return fn()
    try:
        result, error = fn(), None
    except Exception as e:
        result, error = None, (str(e) if isinstance(e, explained) else f"{type(e).__name__}: {e}")
    raise_if_any_rank_failed(error)
    return result


# A rank that fails in the middle of the run (an exception in its expert compute, a bad batch) cannot
# exchange anything: its peers are already waiting in a collective it will never join. So it leaves
# its error in the rendezvous store, the key-value store every rank reached at start-up, and exits. Its
# exit breaks their collectives off at once (gloo: the connection closes) or after dist_timeout_s
# (NCCL), and each of them reads the store to say which rank failed and why. A rank that is killed
# (SIGKILL, the OOM killer) or stops (SIGSTOP, a wedged GPU, a paused VM) leaves nothing, so every rank
# also keeps a heartbeat there: a counter a thread bumps every second. A peer whose counter stands
# still, and which has not said it is leaving, is the one that died or hangs. Under torchrun the store
# lives in the launcher and outlives every rank; in a bare env:// launch rank 0 hosts it, so when rank 0
# is the one that died, the others can only say that the store went away with it.

HEARTBEAT_S = 1.0
STORE_WAIT_S = 2.0  # how long a rank waits for the store to answer before blaming its host


def _key(kind, rank):
    # per restart: torchrun's store outlives an attempt, and a new attempt must not read an old key
    return f"skywork-moe-edu/{kind}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{rank}"


class Heartbeat:
    """A daemon thread bumping this rank's counter in the store every HEARTBEAT_S seconds."""

    def __init__(self, store, rank):
        self.store, self.key, self.done = store, _key("beat", rank), threading.Event()
        self.store.set(self.key, "0")  # exists from the start, so a reader never waits for it
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()

    def _beat(self):
        n = 0
        while not self.done.wait(HEARTBEAT_S):
            n += 1
            try:
                self.store.set(self.key, str(n))
            except Exception:  # the store went away with its host: nothing left to tell
                return

    def stop(self):
        self.done.set()


def report_failure(groups, message):
    """Leave this rank's error where find_culprit finds it (best effort: the store may be gone)."""
    if groups.store is None:
        return
    try:
        groups.store.set(_key("failed", groups.rank), message)
    except Exception:  # the store went away with its host: this rank's own log still has the error
        pass


def find_culprit(groups, wait_s=3 * HEARTBEAT_S):
    """(rank, why) of the peer that broke this rank's collective: the lowest one that reported a
    failure, else one whose heartbeat stood still for wait_s without it saying it was leaving;
    (None, reason) if there is none. Takes at most wait_s + STORE_WAIT_S: the store is read from a
    daemon thread, since a call to a store whose host hangs (SIGSTOP) never returns, whatever its
    timeout, and a store that does not answer names its host."""
    if groups.store is None:
        return None, "no store kept"
    found = []
    reader = threading.Thread(target=lambda: found.append(_read_culprit(groups, wait_s)), daemon=True)
    reader.start()
    reader.join(wait_s + STORE_WAIT_S)
    return found[0] if found else _store_host_failed(groups, f"did not answer for {wait_s + STORE_WAIT_S:.0f} s")


def _store_host_failed(groups, what):
    """The store's host as the culprit: in a bare env:// launch rank 0 hosts it; under torchrun the
    launcher does (TORCHELASTIC_RUN_ID), and no rank is to blame."""
    if "TORCHELASTIC_RUN_ID" in os.environ or groups.rank == 0:
        return None, f"the rendezvous store {what}"
    return 0, f"the rendezvous store it hosts {what}: it was killed, or it hangs"


def _read_culprit(groups, wait_s):
    store = groups.store
    peers = [r for r in range(groups.world_size) if r != groups.rank]
    try:
        store.set(_key("leaving", groups.rank), "1")
        beats = {r: store.get(_key("beat", r)) if store.check([_key("beat", r)]) else None for r in peers}
        deadline = time.monotonic() + wait_s
        while True:
            for r in peers:
                if store.check([_key("failed", r)]):
                    return r, store.get(_key("failed", r)).decode()
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        for r in peers:
            still = store.get(_key("beat", r)) == beats[r] if beats[r] is not None else False
            if still and not store.check([_key("leaving", r)]):
                return r, f"it stopped responding (no heartbeat for {wait_s:.0f} s): it was killed, or it hangs"
    except Exception as e:  # the connection to the store broke: its host died
        return _store_host_failed(groups, f"is unreachable ({type(e).__name__})")
    return None, "no other rank reported an error or stopped responding"


def name_failed_rank(groups, e, explained):
    """On the way out of a failed run under torchrun. An explained error (the project's own, most of
    them agreed by every rank) is left as it is, and reported for peers that may still be waiting.
    Anything else may be this rank's collective broken off by a peer: raise RankFailure naming it. If
    no peer is to blame, this rank failed first: report its error and let it propagate."""
    if isinstance(e, explained):
        report_failure(groups, str(e))
        return
    if not isinstance(e, Exception):  # KeyboardInterrupt and the like
        return
    peer, why = find_culprit(groups)
    if peer is not None:
        raise RankFailure(
            f"rank {peer} failed: {why} (rank {groups.rank} stopped with it: its own {type(e).__name__} in a "
            "collective is a consequence)"
        ) from None
    report_failure(groups, f"{type(e).__name__}: {e}")


def free_port():
    """A free TCP port on this machine, for a rendezvous of ranks started here (tests, bench.py,
    notebooks; torchrun --standalone picks its own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process_groups(ep_size, backend, device, world_size, timeout_s, explained=(), build=None):
    """The ParallelGroups of this process for the duration of a run: ParallelGroups.local() for one
    process; under torchrun, the process group started from the environment (env://) with the EP and
    EDP groups, and destroyed however the run ends. The timeout bounds every collective of every group:
    a rank that never arrives makes the others fail after timeout_s instead of hanging."""
    if world_size == 1:
        yield ParallelGroups.local() if build is None else build(None, None)
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    # the rendezvous init_process_group("env://") would do, done here to keep its store: where a rank
    # leaves its error and its heartbeat for the others
    try:
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        dist.init_process_group(
            resolve_backend(backend, device.type), store=store, rank=rank, world_size=world, timeout=timeout,
            device_id=device if device.type == "cuda" else None,  # NCCL: connect now, not at the first collective
        )  # fmt: skip
    except (RuntimeError, ValueError) as e:  # DistNetworkError, DistStoreError: a rank missing, a wrong address
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise RankFailure(
            f"the {world_size} ranks did not all meet at {where} within dist_timeout_s={timeout_s:g} ({detail}): "
            "start every rank, with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE"
        ) from None
    heartbeat = None
    try:
        groups = build_groups(ep_size, store, timeout) if build is None else build(store, timeout)
        heartbeat = Heartbeat(store, rank)
        try:
            yield groups
        except BaseException as e:
            name_failed_rank(groups, e, explained)
            raise
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        dist.destroy_process_group()
