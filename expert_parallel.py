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
  5. the gradient rule           what is reduced over which group, and scaled by what
  6. checkpoints                 full expert tensors on save (gathered), sliced on load
  7. failing on every rank       a rank-local error becomes the same error on all ranks, and a rank
                                 that dies mid-collective is named by the ranks left waiting

Nothing here runs on its own:
    torchrun --standalone --nproc_per_node=2 train.py config/shakespeare_char_ep2.toml   # train with it
    python -m pytest -q tests/test_expert_parallel.py       # 2 and 4 processes == one process (fp64)
    python bench.py --ep                                    # what dispatch + combine cost under gloo

Shape legend: N kept slots this rank routed, M slots this rank's experts received, D model dim,
E experts of a layer, R = ep_size ranks of the expert-parallel group, El = E / R experts per rank.
Split sizes are Python lists of length R (`send_splits`, `recv_splits`): rows per peer rank.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model import MoE, Experts

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
    ep_rank: int                      # position inside the EP group: which expert slice this rank owns
    ep_group: dist.ProcessGroup       # the ep_size ranks that exchange tokens
    edp_group: dist.ProcessGroup      # the world_size / ep_size ranks holding the same experts
    store: dist.Store | None = None   # the rendezvous key-value store: where a failing rank leaves its
                                      # error for the others (section 7); None: not kept

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
        raise ValueError(f"world size {world_size} is not divisible by ep_size={ep_size}: ranks form "
                         f"data-parallel x expert-parallel groups, so launch a multiple of {ep_size} "
                         f"processes or pick an ep_size that divides {world_size}")
    if n_expert is not None and ep_size > 1 and n_expert == 0:
        raise ValueError(f"ep_size={ep_size} shards experts, but the model is dense (n_expert=0): set ep_size=1")
    if n_expert is not None and ep_size > 1 and n_expert % ep_size:
        raise ValueError(f"n_expert={n_expert} is not divisible by ep_size={ep_size}: every rank of an "
                         f"expert-parallel group holds n_expert / ep_size experts; pick an ep_size "
                         f"that divides {n_expert}")


def build_groups(ep_size, store=None):
    """The EP and EDP groups of this rank; call on every rank after dist.init_process_group (store: the
    store it was started with, kept for report_failure / failed_peer).

    dist.new_group is collective over the whole world: every rank creates every group, in the same
    order, including the groups it is not a member of (skipping one is the classic start-up hang)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    validate_layout(ep_size, world_size)
    ep_group = edp_group = None
    for dp_index in range(world_size // ep_size):
        ranks = list(range(dp_index * ep_size, (dp_index + 1) * ep_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            ep_group = group
    for ep_rank in range(ep_size):
        ranks = list(range(ep_rank, world_size, ep_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            edp_group = group
    return ParallelGroups(rank, world_size, ep_size, rank % ep_size, ep_group, edp_group, store)

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
# order: one stable sort gives it, and each local expert sees exactly the single process's rows.
# Combine undoes the sort and runs (b) backwards; the counts need no second exchange.

@dataclass
class DispatchPlan:
    send_splits: list           # rows this rank sent to each EP rank (and gets back in combine)
    recv_splits: list           # rows this rank received from each EP rank
    order_M: torch.Tensor       # received (source, expert) order -> (expert, source) order
    counts_El: torch.Tensor     # rows per local expert, for Experts.forward
    group: dist.ProcessGroup


def dispatch(x_ND, counts_E, group):
    R = dist.get_world_size(group)
    El = counts_E.numel() // R
    # (a) counts: even splits, El per peer
    recv_counts = torch.empty_like(counts_E)
    dist.all_to_all_single(recv_counts, counts_E.contiguous(), group=group)
    recv_counts_RE = recv_counts.view(R, El)
    # split sizes must be host integers: one device -> host sync per layer (unavoidable for uneven sizes)
    send_splits, recv_splits = torch.stack([counts_E.view(R, El).sum(1), recv_counts_RE.sum(1)]).tolist()
    # (b) tokens
    x_MD = all_to_all(x_ND, recv_splits, send_splits, group)
    # (source, expert) -> (expert, source): label each received row with its segment, sort stably
    segment_M = torch.repeat_interleave(torch.arange(R * El, device=x_ND.device), recv_counts_RE.reshape(-1),
                                        output_size=sum(recv_splits))  # known size: no second sync
    source_M, expert_M = segment_M // El, segment_M % El
    order_M = torch.argsort(expert_M * R + source_M, stable=True)
    return x_MD[order_M], DispatchPlan(send_splits, recv_splits, order_M, recv_counts_RE.sum(0), group)


def combine(y_MD, plan):
    """Inverse of dispatch: unsort to (source, expert) order and send every row back to its source."""
    y_sorted_MD = torch.empty_like(y_MD).index_copy(0, plan.order_M, y_MD)  # differentiable in y_MD
    return all_to_all(y_sorted_MD, plan.send_splits, plan.recv_splits, plan.group)

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
        return f"experts {lo}..{hi - 1} of {self.n_expert_total} (ep_rank {self.groups.ep_rank} of {self.groups.ep_size})"

    def forward(self, x_ND, counts_E):
        x_MD, plan = dispatch(x_ND, counts_E, self.groups.ep_group)
        if x_MD.shape[0]:
            y_MD = super().forward(x_MD, plan.counts_El)
        else:
            # No token reached this rank's experts. Experts.forward would return fresh zeros with no
            # autograd history, the combine output would then not require grad on this rank, and its
            # backward all-to-all would never run here while its peers wait in theirs (a hang), and
            # this rank's own tokens would get no gradient from the experts that processed them.
            # Deriving the empty result from x_MD keeps both exchanges in this rank's backward.
            y_MD = x_MD * 0
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


def sync_gradients(model, groups):
    """After backward on every rank: make each gradient the single-process gradient of the global batch."""
    shard_ids = {id(p) for p in sharded_parameters(model)}
    dense, sharded = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        (sharded if id(p) in shard_ids else dense).append(p.grad)
    scale = 1.0 / groups.world_size
    _all_reduce_scaled_(dense, dist.group.WORLD, scale)
    _all_reduce_scaled_(sharded, groups.edp_group, scale)  # SUM over EDP, then 1/W: see above


def grad_norm(model, groups):
    """The global gradient norm of a model whose experts are sharded: each replicated gradient counted
    once and each expert once (the shards of one EP group hold every expert once, so their squared
    norms are summed over the EP group). The same value on every rank."""
    shard_ids = {id(p) for p in sharded_parameters(model)}
    params = [p for p in model.parameters() if p.grad is not None]
    dense_sq = params[0].grad.new_zeros(())
    shard_sq = params[0].grad.new_zeros(())
    for p in params:
        sq = torch.linalg.vector_norm(p.grad).pow(2)
        if id(p) in shard_ids:
            shard_sq = shard_sq + sq
        else:
            dense_sq = dense_sq + sq
    if dist.get_world_size(groups.ep_group) > 1:
        dist.all_reduce(shard_sq, group=groups.ep_group)
    return (dense_sq + shard_sq).sqrt()


# -----------------------------------------------------------------------------
# 6. checkpoints: always the full model, so a run saved at one ep_size resumes at any other
#
# Save: all-gather each expert shard (and its AdamW moments) over the EP group into the full (E, ...)
# tensor; rank 0 writes. Load: every rank builds the full model, loads the full state, and
# shard_experts slices it; optimizer moments are sliced by shard_optimizer_state. The gathers are
# collectives: call these on every rank, in the same order.

def _gather_rows(t, group):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def full_model_state(model, groups):
    """model.state_dict() with every expert tensor gathered to its full (E, ...) shape."""
    state = model.state_dict()
    if groups is None or groups.ep_size == 1:
        return state
    for prefix, m in model.named_modules():
        if isinstance(m, ParallelExperts):
            for name, p in m.named_parameters(recurse=False):
                state[f"{prefix}.{name}"] = _gather_rows(p.detach(), groups.ep_group)
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
            per_param[i] = {k: fn(v, p) if torch.is_tensor(v) and v.dim() == p.dim() else v
                            for k, v in per_param[i].items()}
    return {**state, "state": per_param}


def full_optimizer_state(optimizer, model, groups):
    """optimizer.state_dict() with each expert shard's moments (same shape as the shard) gathered to
    the full (E, ...) shape."""
    state = optimizer.state_dict()
    if groups is None or groups.ep_size == 1:
        return state
    return _map_expert_moments(state, optimizer, model, lambda v, p: _gather_rows(v, groups.ep_group))


def shard_optimizer_state(state, optimizer, model, groups):
    """The inverse of full_optimizer_state for this rank: slice full (E, ...) moments to its experts."""
    if groups is None or groups.ep_size == 1:
        return state

    def shard(v, p):
        lo, hi = groups.expert_range(p.shape[0] * groups.ep_size)
        return v[lo:hi].clone()
    return _map_expert_moments(state, optimizer, model, shard)

# -----------------------------------------------------------------------------
# 7. failing on every rank
#
# A config error is seen by every rank alike (same argv), so each raises before any collective. A file
# missing on one node is not: that rank would exit while its peers wait in the next collective until
# the timeout, with an error message only in one rank's log. Exchanging the error first makes every
# rank stop with the same message.

def raise_if_any_rank_failed(error, message_prefix="error"):
    """Collective over the world: error is None or this rank's message. If any rank has one, every
    rank raises SystemExit naming the first failing rank."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        r, e = failed[0]
        more = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
        raise SystemExit(f"{message_prefix} on rank {r}{more}: {e}")


# A rank that fails in the middle of the run (an exception in its expert compute, a bad batch) cannot
# exchange anything: its peers are already waiting in a collective it will never join. So it leaves
# its error in the rendezvous store, the key-value store every rank reached at start-up, and exits;
# its exit breaks their collectives off at once (gloo: the connection closes) or after dist_timeout_s
# (NCCL), and each of them reads the store to say which rank failed and why. Under torchrun the store
# lives in the launcher and outlives every rank; in a bare env:// launch rank 0 hosts it, so when rank 0
# is the one that failed, the others can only say that the store went away with it.

def _failure_key(rank):
    # per restart: torchrun's store outlives an attempt, and a new attempt must not read an old error
    return f"skywork-moe-edu/failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{rank}"


def report_failure(groups, message):
    """Leave this rank's error where failed_peer finds it (best effort: the store may be gone)."""
    if groups.store is None:
        return
    try:
        groups.store.set(_failure_key(groups.rank), message)
    except Exception:  # the store went away with its host: this rank's own log still has the error
        pass


def failed_peer(groups):
    """(rank, message) of the lowest other rank that reported a failure; (None, reason) if none did
    or the store cannot be read. check() asks whether a key exists, without waiting for it to appear."""
    if groups.store is None:
        return None, "no store kept"
    try:
        for r in range(groups.world_size):
            key = _failure_key(r)
            if r != groups.rank and groups.store.check([key]):
                return r, groups.store.get(key).decode()
    except Exception as e:
        return None, (f"the rendezvous store is unreachable ({type(e).__name__}); in a bare env:// launch "
                      "rank 0 hosts it, so rank 0 probably failed: see its log")
    return None, "a rank that was killed or hangs reports nothing: see the other ranks' logs"
