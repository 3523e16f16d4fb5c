"""
Tensor parallelism (TP) by hand over torch.distributed, Megatron-LM style, and the expert layouts it
makes possible: Skywork-MoE appendix B's Expert Data Parallelism (EDP), in which the expert-parallel
group *is* the attention tensor-parallel group (Size_EP = Size_TP), beside plain EP (the expert group
spans data-parallel x tensor-parallel ranks) and ETP (every expert's hidden dimension split over TP).

Read top to bottom, in the order things happen in a run:
  1. layout and process groups   world = data-parallel x tensor-parallel; where the expert group sits
  2. the conjugate functions     copy / reduce (Megatron's f and g) and slice / gather of tokens, each
                                 with the derivation of its backward
  3. tensor-parallel layers      column-parallel q/k/v (heads split, GQA included), row-parallel output;
                                 the dense SwiGLU MLP and ETP's experts the same way
  4. the MoE layer under TP      each TP rank routes a disjoint slice of the tokens it shares with its
                                 group, so dispatch does not send every token tp_size times
  5. parallelize                 applied from outside: model.py never learns about process groups
  6. the gradient rule           which group reduces which parameter, and why
  7. checkpoints                 full tensors on save (gathered), sliced on load: layout-free
  8. communication volume        bytes per layer of each layout, computed from the config

Embeddings, norms, the router and the lm_head are replicated on every rank. The experts are sharded by
expert_parallel.py's ParallelExperts (reused, not copied) over whichever expert group the layout says.

    python tensor_parallel.py config/skywork_moe.toml      # layout pictures and bytes per layer (README)
    python -m pytest -q tests/test_tensor_parallel.py      # 2 and 4 processes == one process (fp64)

Shape legend: B batch, L sequence, D model dim, T = B*L tokens of a data-parallel replica (the same on
every rank of its TP group), S = T / tp_size tokens of one TP rank's slice, H heads, Hkv key/value
heads, d head dim, E experts, K top-k, F expert hidden, N kept (token, expert) slots.
"""

import math
import sys
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn

import expert_parallel as ep
from model import MLP, Attention, Experts, MoE

# -----------------------------------------------------------------------------
# 1. layout and process groups
#
# Ranks are numbered rank = dp_index * tp_size + tp_rank: each TP group is a run of tp_size consecutive
# ranks, i.e. one node (or part of one) under torchrun, where the per-layer all-reduces of TP belong.
# The expert group is a run of ep_size consecutive ranks, so ep_size == tp_size puts it exactly on the
# TP group: that is EDP. World 8, tp_size 2, E = 8:
#
#     rank           0    1    2    3    4    5    6    7
#     TP group      [0    1]  [2    3]  [4    5]  [6    7]     attention heads split in halves
#     DP group      [0 2 4 6] and [1 3 5 7]                    same heads: average their gradients
#   (a) plain EP, ep_size 8 (Size_EP = Size_DP x Size_TP): one expert per rank, dispatch over all 8
#   (b) EDP, ep_size = tp_size = 2: EP group = TP group, experts 0-3 on even ranks, 4-7 on odd ones;
#       the ranks holding the same experts are the DP group
#   (c) ETP: every rank holds every expert's half of the hidden dimension; no dispatch at all
#
# `python tensor_parallel.py` draws these pictures for any world size (layout_picture).

EXPERT_GROUPS = ("", "tp", "world", "etp")


@dataclass(frozen=True)
class Layout:
    world_size: int
    tp_size: int
    ep_size: int  # ranks an MoE layer's experts are spread over (1: every rank holds all)
    expert_group: str  # "tp" (EDP), "world" (plain EP), "etp", or "" (ep_size as given)

    @property
    def dp_size(self):
        return self.world_size // self.tp_size

    @property
    def route_slices(self):
        """Disjoint token slices routed at once, one per rank (section 4), or one per replica under ETP
        (every TP rank routes all of its replica's tokens): the single process that equals this layout
        runs route_groups = route_slices x (routing groups per slice)."""
        return self.dp_size if self.expert_group == "etp" else self.world_size

    @property
    def name(self):
        if self.expert_group == "etp":
            return "ETP"
        if self.ep_size > 1 and self.ep_size == self.tp_size:
            return "EDP"
        if self.ep_size > 1:
            return "EP"
        return "TP" if self.tp_size > 1 else "DP"

    def describe(self):
        return (
            f"world {self.world_size} = {self.dp_size} data-parallel x {self.tp_size} tensor-parallel, "
            f"{self.name}: experts over {self.ep_size} rank(s)" + (" (the TP group)" if self.name == "EDP" else "")
        )


def validate_layout(
    world_size, tp_size=1, ep_size=1, expert_group="", model_cfg=None, tokens_per_replica=None, n_group=1
):
    """The Layout of these settings, or ValueError with one actionable line. Pure: every rank computes
    the same answer from the same config, so all fail alike, before any collective. model_cfg=None
    checks the world only; tokens_per_replica (batch_size / dp_size * block_size) checks that each TP
    rank gets an equal slice of n_group routing groups."""
    if tp_size < 1 or ep_size < 1:
        raise ValueError(f"tp_size={tp_size} and ep_size={ep_size} must be >= 1 (1 = not split)")
    if expert_group not in EXPERT_GROUPS:
        raise ValueError(
            f"expert_group={expert_group!r}: use 'tp' (EDP: experts over the tensor-parallel "
            f"group), 'world' (plain EP over every rank), 'etp' (each expert split over TP), "
            f"or '' (ep_size as given)"
        )
    if world_size % tp_size:
        raise ValueError(
            f"world size {world_size} is not divisible by tp_size={tp_size}: ranks form data-parallel "
            f"x tensor-parallel groups, so launch a multiple of {tp_size} processes or pick a "
            f"tp_size that divides {world_size}"
        )
    if expert_group and ep_size != 1:
        implied = {"tp": tp_size, "world": world_size, "etp": 1}[expert_group]
        if ep_size != implied:
            raise ValueError(
                f"expert_group={expert_group!r} sets ep_size={implied}, but ep_size={ep_size} was "
                f"given: drop ep_size, or set it to {implied}"
            )
    ep_size = {"": ep_size, "tp": tp_size, "world": world_size, "etp": 1}[expert_group]
    if expert_group == "etp" and tp_size == 1:
        raise ValueError(
            "expert_group='etp' splits each expert over the tensor-parallel group, but tp_size=1: set tp_size > 1"
        )
    n_expert = model_cfg.n_expert if model_cfg is not None else None
    if expert_group in ("tp", "world") and n_expert and n_expert % ep_size:
        knob = "tp_size" if expert_group == "tp" else "number of processes"
        raise ValueError(
            f"n_expert={n_expert} is not divisible by the expert group of {ep_size} ranks "
            f"(expert_group={expert_group!r}): pick a {knob} that divides {n_expert}, or another "
            f"expert_group"
        )
    ep.validate_layout(ep_size, world_size, n_expert)  # world % ep_size, n_expert % ep_size
    layout = Layout(world_size, tp_size, ep_size, expert_group)
    if model_cfg is None or tp_size == 1:
        return layout
    c = model_cfg
    if c.n_head % tp_size or c.kv_heads % tp_size:
        raise ValueError(
            f"n_head={c.n_head} and n_kv_head={c.kv_heads} must both be divisible by tp_size={tp_size}: "
            f"each tensor-parallel rank holds whole query and key/value heads; pick a tp_size "
            f"that divides {math.gcd(c.n_head, c.kv_heads)}"
        )
    if any(not c.is_moe_layer(i) for i in range(c.n_layer)) and c.ffn_hidden % tp_size:
        raise ValueError(
            f"ffn_hidden={c.ffn_hidden} is not divisible by tp_size={tp_size}: the dense MLP's "
            f"hidden units are split over the tensor-parallel group"
        )
    if expert_group == "etp" and c.expert_hidden % tp_size:
        raise ValueError(
            f"expert_hidden={c.expert_hidden} is not divisible by tp_size={tp_size}: ETP splits "
            f"each expert's hidden units over the tensor-parallel group"
        )
    if c.dropout > 0:
        raise ValueError(
            f"dropout={c.dropout} with tp_size={tp_size}: the ranks of a tensor-parallel group "
            f"must drop the same units of the replicated activations; set dropout=0"
        )
    if (
        tokens_per_replica is not None
        and expert_group != "etp"
        and c.n_expert
        and tokens_per_replica % (tp_size * n_group)
    ):
        raise ValueError(
            f"{tokens_per_replica} tokens per data-parallel replica do not split into {tp_size} "
            f"tensor-parallel slices of {n_group} routing group(s): change batch_size or "
            f"route_groups"
        )
    return layout


def check_launch(tcfg, model_cfg, world_size, cuda_available):
    """The Layout of a launch (a train.TrainConfig on world_size processes), or ValueError with one
    actionable line for a launch that cannot work: backend and device, the layout, and how the batch
    splits into replicas, token slices and routing groups. Every rank computes the same verdict, so a
    bad setup stops every rank with the same message before any collective. model_cfg=None skips the
    model checks (a run from a checkpoint repeats them once it is read)."""

    def need(ok, msg):
        if not ok:
            raise ValueError(msg)

    device_type = "cuda" if tcfg.device.startswith("cuda") or (tcfg.device == "auto" and cuda_available) else "cpu"
    backend = ep.resolve_backend(tcfg.backend, device_type) if world_size > 1 else None
    need(
        backend != "nccl" or cuda_available,
        "backend=nccl needs CUDA GPUs, and none is visible: use backend=gloo (CPU), or run on a GPU machine",
    )
    need(backend != "nccl" or device_type == "cuda", "backend=nccl moves GPU tensors: use backend=gloo with device=cpu")
    need(backend != "gloo" or device_type == "cpu", "backend=gloo has no all-to-all for GPU tensors: use backend=nccl")
    need(
        world_size > 1 or tcfg.ep_size == 1,
        f"ep_size={tcfg.ep_size} needs a multiple of {tcfg.ep_size} processes: launch with torchrun "
        f"--nproc_per_node={tcfg.ep_size} train.py ..., or set ep_size=1 for one process",
    )
    layout = validate_layout(world_size, tcfg.tp_size, tcfg.ep_size, tcfg.expert_group, model_cfg)
    slices = layout.route_slices
    need(
        tcfg.batch_size % layout.dp_size == 0,
        f"batch_size={tcfg.batch_size} is the global micro-batch, split evenly over the {layout.dp_size} "
        f"data-parallel replicas: use a multiple of {layout.dp_size}",
    )
    groups_total = tcfg.route_groups or slices
    need(
        groups_total % slices == 0,
        f"route_groups={tcfg.route_groups} must be a multiple of {slices}, the token slices routed at once "
        "(one per rank; per replica under ETP): a routing group cannot span ranks (0 = one group per slice)",
    )
    if model_cfg is not None:
        per_replica = tcfg.batch_size // layout.dp_size * model_cfg.block_size
        tokens_per_rank = per_replica * layout.dp_size // slices  # the tokens of this rank's slice
        need(
            tokens_per_rank % (groups_total // slices) == 0,
            f"{tokens_per_rank} tokens per rank do not split into {groups_total // slices} equal routing "
            f"groups: change route_groups={tcfg.route_groups} or batch_size",
        )
        need(
            tcfg.balance_scope == "micro" or model_cfg.aux_loss == "switch",
            f"balance_scope='global' balances the load fractions f of the Switch loss (Qwen), but "
            f"aux_loss={model_cfg.aux_loss!r}: set aux_loss=switch, or balance_scope=micro",
        )
    return layout


@dataclass
class TPGroups:
    layout: Layout
    rank: int
    tp_rank: int  # which heads (and token slice) this rank owns
    tp_group: dist.ProcessGroup  # the tp_size ranks that share tokens
    dp_group: dist.ProcessGroup  # the dp_size ranks with the same tp_rank (same attention shard)
    experts: ep.ParallelGroups  # expert_parallel's EP / EDP groups (ep_size 1: none to talk to)
    store: dist.Store | None = None

    @classmethod
    def local(cls):
        """A single process: every function below takes it and skips the collectives."""
        return cls(Layout(1, 1, 1, ""), 0, 0, None, None, ep.ParallelGroups.local())

    @property
    def world_size(self):
        return self.layout.world_size

    @property
    def tp_size(self):
        return self.layout.tp_size

    @property
    def dp_size(self):
        return self.layout.dp_size

    @property
    def dp_rank(self):
        """Which data-parallel replica (TP group) this rank belongs to: the shard of the batch it reads."""
        return self.rank // self.layout.tp_size

    @property
    def ep_size(self):
        return self.layout.ep_size

    @property
    def is_main(self):
        return self.rank == 0


def _runs(world_size, size):
    return [list(range(i, i + size)) for i in range(0, world_size, size)]


def _strides(world_size, size):
    return [list(range(i, world_size, size)) for i in range(size)]


def build_groups(layout, timeout, store=None):
    """This rank's TP, DP and expert groups; call on every rank after dist.init_process_group with the
    same timeout (a datetime.timedelta: new_group does not inherit it, it defaults to 30 minutes).

    dist.new_group is collective over the whole world: every rank creates every group, in the same
    order, including the groups it is not a member of."""
    rank = dist.get_rank()
    if dist.get_world_size() != layout.world_size:
        raise ValueError(f"the layout is for {layout.world_size} ranks, the process group has {dist.get_world_size()}")

    def mine(rank_lists):
        found = None
        for ranks in rank_lists:
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                found = group
        return found

    tp, world = layout.tp_size, layout.world_size
    tp_group = mine(_runs(world, tp))
    dp_group = mine(_strides(world, tp))
    ep_group = edp_group = None
    if layout.ep_size > 1:
        if layout.ep_size == tp:  # EDP: the EP group is the TP group, the ranks holding the same experts the DP group
            ep_group, edp_group = tp_group, dp_group
        else:
            ep_group = mine(_runs(world, layout.ep_size))
            edp_group = mine(_strides(world, layout.ep_size))
    experts = ep.ParallelGroups(rank, world, layout.ep_size, rank % layout.ep_size, ep_group, edp_group, store)
    return TPGroups(layout, rank, rank % tp, tp_group, dp_group, experts, store)


# -----------------------------------------------------------------------------
# 2. the conjugate functions
#
# The invariant that makes TP correct: outside the split regions, every rank of a TP group holds the
# same activations AND the same, full, gradient of the loss with respect to them (the replicated
# "residual stream"). Each function below maps between a replicated tensor and per-rank pieces, and
# its backward is the adjoint of its forward under that invariant.


class CopyToTP(torch.autograd.Function):
    """f: forward identity, backward all-reduce (sum) over the TP group.

    Forward: y_r = x on every rank r; each rank feeds its copy into its own shard (its heads). The loss
    depends on x through every copy, so dL/dx = sum_r dL/dy_r, and rank r computed only dL/dy_r:
    backward is a sum over the group, after which every rank holds the full dL/dx (the invariant)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = grad_y.contiguous().clone()
        dist.all_reduce(grad_x, group=ctx.group)
        return grad_x, None


class ReduceFromTP(torch.autograd.Function):
    """g: forward all-reduce (sum), backward identity. The conjugate of f.

    Forward: y = sum_r x_r, replicated on every rank (row-parallel partial products summed). Then
    dL/dx_r = dL/dy for every r, and every rank already holds the same full dL/dy (the invariant: the
    replicated region after y computes it identically everywhere): backward is the identity, no
    communication. Summing the gradients here would count the loss tp_size times."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.contiguous().clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y, None


class SliceTokens(torch.autograd.Function):
    """Forward: rank r keeps rows [r*S, (r+1)*S) of the replicated x_TD (no communication); backward:
    all-gather. Rank r's slice x_r feeds only rank r's computation, and the slices are disjoint, so
    dL/dx is the concatenation of the dL/dx_r, each held by one rank: an all-gather (not a sum) gives
    every rank the full dL/dx, the invariant."""

    @staticmethod
    def forward(ctx, x_TD, group):
        R, r = dist.get_world_size(group), dist.get_rank(group)
        if x_TD.shape[0] % R:
            raise ValueError(f"{x_TD.shape[0]} tokens do not split into {R} equal tensor-parallel slices")
        ctx.group = group
        S = x_TD.shape[0] // R
        return x_TD[r * S : (r + 1) * S].clone()

    @staticmethod
    def backward(ctx, grad_SD):
        return _all_gather_rows(grad_SD, ctx.group), None


class GatherTokens(torch.autograd.Function):
    """The conjugate of SliceTokens. Forward: all-gather the slices y_r into the replicated y_TD;
    backward: rank r keeps its own rows of dL/dy. y = concat_r y_r, so dL/dy_r = (dL/dy)[slice r], and
    every rank holds the full dL/dy (the invariant): a local slice, no communication."""

    @staticmethod
    def forward(ctx, y_SD, group):
        ctx.group = group
        return _all_gather_rows(y_SD, group)

    @staticmethod
    def backward(ctx, grad_TD):
        R, r = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        S = grad_TD.shape[0] // R
        return grad_TD[r * S : (r + 1) * S], None


def _all_gather_rows(t, group):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def _split(group):
    return group is not None and dist.get_world_size(group) > 1


def copy_to_tp(x, group):
    return CopyToTP.apply(x, group) if _split(group) else x


def reduce_from_tp(x, group):
    return ReduceFromTP.apply(x, group) if _split(group) else x


def tp_mean(x, group):
    """The mean over the TP group of a per-slice scalar (a balance loss), with g's backward: rank r's
    own term gets gradient 1/tp_size, so the group together differentiates the mean exactly once."""
    return reduce_from_tp(x / dist.get_world_size(group), group) if _split(group) else x


# -----------------------------------------------------------------------------
# 3. tensor-parallel layers: column-parallel in, row-parallel out
#
# A linear y = W x split by output rows (column-parallel: W_r = rows of W) needs the full x on every
# rank and gives each rank its own slice of y; split by input columns (row-parallel) it takes a slice
# of x and gives a partial sum of y. Attention heads and SwiGLU hidden units are independent of each
# other, so q/k/v (and w1/w3) are column-parallel by whole heads (hidden units), the nonlinearity runs
# on the local slice, and wo (w2) is row-parallel: one f before, one g after, one all-reduce forward
# and one backward per layer. Parameters keep their names; `tp_dims` says along which dimension each
# is split (checkpoints gather and slice along it).


def _tp_slice(t, dim, groups):
    return t.chunk(groups.tp_size, dim)[groups.tp_rank]


def _load_slices(part, full, groups):
    """part (a freshly built local module) <- full's parameters sliced along part.tp_dims."""
    with torch.no_grad():
        for name, p in part.named_parameters():
            src = full.get_parameter(name)
            p.copy_(_tp_slice(src, part.tp_dims[name], groups) if name in part.tp_dims else src)
    return part


class TensorParallelAttention(Attention):
    """Heads [tp_rank * H/tp, (tp_rank + 1) * H/tp) and their key/value heads. With GQA, query head h
    reads key/value head h // (H / Hkv): when Hkv is divisible by tp, a rank's query heads read exactly
    its own key/value heads, in the same local order, so model.Attention.forward runs unchanged."""

    tp_dims = {"wq.weight": 0, "wk.weight": 0, "wv.weight": 0, "wo.weight": 1}

    def __init__(self, cfg, groups):
        nn.Module.__init__(self)  # not Attention.__init__: it would allocate the full model's projections
        tp = groups.tp_size
        self.n_head, self.n_kv_head = cfg.n_head // tp, cfg.kv_heads // tp
        self.head_dim = cfg.n_embd // cfg.n_head
        D, d = cfg.n_embd, self.head_dim
        self.wq = nn.Linear(D, self.n_head * d, bias=False)  # column-parallel
        self.wk = nn.Linear(D, self.n_kv_head * d, bias=False)  # column-parallel
        self.wv = nn.Linear(D, self.n_kv_head * d, bias=False)  # column-parallel
        self.wo = nn.Linear(self.n_head * d, D, bias=False)  # row-parallel
        self.dropout = cfg.dropout
        self.tp_group = groups.tp_group

    def forward(self, x_BLD, cos, sin):
        return reduce_from_tp(super().forward(copy_to_tp(x_BLD, self.tp_group), cos, sin), self.tp_group)


class TensorParallelMLP(MLP):
    """A dense SwiGLU layer (moe_every > 1, or a dense model): hidden units split like heads."""

    tp_dims = {"w1.weight": 0, "w3.weight": 0, "w2.weight": 1}

    def __init__(self, n_embd, hidden, groups):
        super().__init__(n_embd, hidden // groups.tp_size)
        self.tp_group = groups.tp_group

    def forward(self, x):
        return reduce_from_tp(super().forward(copy_to_tp(x, self.tp_group)), self.tp_group)


class TensorParallelExperts(Experts):
    """ETP (layout c): every expert's hidden units split over the TP group, (E, F/tp, D) per rank. The
    router is replicated and sees every token on every rank, so all ranks route alike and run the same
    slots; f and g sit around the slots (x_ND, y_ND), not around the MoE layer: the router's own path
    to x is replicated and must not be summed by f, and the combine weights must multiply full expert
    outputs for the router's gradient to stay full (reducing after the combine would be K times
    cheaper but would leave the router with a partial gradient)."""

    tp_dims = {"w1": 1, "w3": 1, "w2": 2}

    def __init__(self, n_expert, n_embd, hidden, groups):
        super().__init__(n_expert, n_embd, hidden // groups.tp_size)
        self.tp_group = groups.tp_group

    def forward(self, x_ND, counts_E):
        return reduce_from_tp(super().forward(copy_to_tp(x_ND, self.tp_group), counts_E), self.tp_group)


# -----------------------------------------------------------------------------
# 4. the MoE layer under TP: tokens per rank
#
# Every rank of a TP group holds the same T tokens after attention. If each routed all T, a token
# would reach its expert tp_size times (tp_size x the dispatch bytes and the expert FLOPs, and its
# gradient counted tp_size times). Instead TP rank r routes the disjoint slice [r*S, (r+1)*S),
# S = T / tp_size, as its own routing group(s) (SliceTokens), and the MoE outputs are all-gathered
# back into the replicated stream (GatherTokens): one all-gather of T x D per layer buys a tp_size
# times smaller all-to-all. The slices are in rank order, so a TP run equals one process with
# route_groups = dp_size * tp_size * (groups per slice) (the single process's group j is rank j's slice).
#
# The balance losses are per slice; the single process averages them over all groups, so each is
# replaced by its TP mean (tp_mean: all-reduce forward, identity backward), which every rank of the
# group then holds and which train.py averages over the world as before. The statistics without a
# gradient (drop rate, load_E, ...) stay per slice: averaging (loads: summing) them over the world,
# as train.py does, gives the global numbers.


class TokenSlicedMoE(MoE):
    """model.MoE on this TP rank's slice of the tokens; same router and experts attributes (the state
    dict keys do not change), experts sharded over the expert group by expert_parallel.shard_experts."""

    def __init__(self, moe, groups):
        nn.Module.__init__(self)
        self.router, self.experts = moe.router, moe.experts
        self.tp_group = groups.tp_group

    def forward(self, x_BLD, n_group=1):
        B, L, D = x_BLD.shape
        x_1SD = SliceTokens.apply(x_BLD.reshape(B * L, D), self.tp_group).unsqueeze(0)
        y_1SD, r = super().forward(x_1SD, n_group)
        y_TD = GatherTokens.apply(y_1SD[0], self.tp_group)
        r = replace(r, aux_loss=tp_mean(r.aux_loss, self.tp_group), z_loss=tp_mean(r.z_loss, self.tp_group))
        return y_TD.view(B, L, D), r


# -----------------------------------------------------------------------------
# 5. parallelize: from outside the model


def parallelize(model, groups):
    """Turn this rank's full model (every rank built the same one: same seed or same checkpoint) into
    its shard of the layout, in place: attention and dense MLPs tensor-parallel, MoE layers token-sliced
    (EP / EDP) or expert-tensor-parallel (ETP), experts sharded over the expert group. Returns model."""
    layout, cfg = groups.layout, model.cfg
    validate_layout(layout.world_size, layout.tp_size, layout.ep_size, layout.expert_group, cfg)
    dev, dt = model.lm_head.weight.device, model.lm_head.weight.dtype
    for block in model.blocks:
        if layout.tp_size == 1:
            break
        if not isinstance(block.attn, TensorParallelAttention):
            block.attn = _load_slices(TensorParallelAttention(cfg, groups).to(dev, dt), block.attn, groups)
        if not block.is_moe:
            if not isinstance(block.ffn, TensorParallelMLP):
                part = TensorParallelMLP(cfg.n_embd, cfg.ffn_hidden, groups).to(dev, dt)
                block.ffn = _load_slices(part, block.ffn, groups)
        elif layout.expert_group == "etp":
            if not isinstance(block.ffn.experts, TensorParallelExperts):
                full = block.ffn.experts
                part = TensorParallelExperts(cfg.n_expert, cfg.n_embd, cfg.expert_hidden, groups).to(dev, dt)
                part.impl = full.impl
                block.ffn.experts = _load_slices(part, full, groups)
        elif not isinstance(block.ffn, TokenSlicedMoE):
            block.ffn = TokenSlicedMoE(block.ffn, groups)
    ep.shard_experts(model, groups.experts)  # nothing to do when ep_size == 1
    return model


def tp_sharded_parameters(model):
    """[(name, parameter, split dim)] of every tensor-parallel parameter of this rank."""
    out = []
    for prefix, m in model.named_modules():
        for name, dim in getattr(m, "tp_dims", {}).items():
            out.append((f"{prefix}.{name}", m.get_parameter(name), dim))
    return out


# -----------------------------------------------------------------------------
# 6. the gradient rule
#
# Data-parallel replica d (a TP group) computes l_d = CE_d + sum_l alpha_l A_d,l (+ z), A_d the mean of
# its slices' balance losses; the single process with the global batch and one routing group per slice
# computes L = (1/P) sum_d l_d over the P = dp_size replicas (equal batches). Target: dL/dp =
# (1/P) sum_d dl_d/dp. What rank (d, r) holds after backward, and what completes it:
#  - replicated and fully seen (embedding, norms, lm_head; the router under ETP): by the invariant of
#    section 2 its gradient is the full dl_d/dp on every rank of the TP group, so SUM over the DP group
#    (the ranks with the same tp_rank) and divide by P. Summing over the world instead would count it
#    tp_size times (dividing by the world size would undo that, at tp_size times the traffic).
#  - tensor-parallel shard (attention heads, dense MLP and ETP hidden units): rank r computed its
#    heads entirely (f gave them the full input gradient), so it holds dl_d/dp for its shard: SUM over
#    the DP group, divide by P.
#  - token-sliced and replicated (the router of a token-sliced MoE; its experts when ep_size = 1):
#    rank r saw only slice r, so it holds the part of dl_d/dp from its slice: SUM over the world (TP
#    slices and DP replicas at once), divide by P.
#  - expert shard (ParallelExperts): the owner of expert e received the slots of every slice of its
#    EP group through the all-to-all, and their gradients came back through its backward; the ranks
#    holding e (the EDP group) saw disjoint slices that together cover every slice of every replica
#    once: SUM over the EDP group, divide by P. Under EDP that group is the DP group.
# Every rule divides by P = dp_size, never by a group's size. A parameter with no gradient (an expert
# shard that received no token) gets zeros, so every rank joins the same collectives.


def reduction_plan(model, groups):
    """{group name: [(name, parameter)]} with names "dp", "world", "edp": which group sums which
    gradient (then every one is divided by dp_size)."""
    ep_ids = {id(p) for p in ep.sharded_parameters(model)}
    sliced_ids = {id(p) for m in model.modules() if isinstance(m, TokenSlicedMoE) for p in m.parameters()}
    plan = {"dp": [], "world": [], "edp": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = "edp" if id(p) in ep_ids else "world" if id(p) in sliced_ids else "dp"
        plan[key].append((name, p))
    return plan


def sync_gradients(model, groups):
    """After backward on every rank: make each gradient (each shard's) the single-process gradient of
    the global batch. One bucketed all-reduce per group (expert_parallel's helper)."""
    if groups.world_size == 1:
        return
    plan = reduction_plan(model, groups)
    group_of = {"dp": groups.dp_group, "world": dist.group.WORLD, "edp": groups.experts.edp_group}
    for key, named in plan.items():
        if not named:
            continue
        grads = []
        for _, p in named:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        ep._all_reduce_scaled_(grads, group_of[key], 1.0 / groups.dp_size)


class OverlappedSync:
    """sync_gradients, overlapped with the last micro-batch's backward (DDP's bucketing, written out):
    a hook on every parameter counts the gradients of each bucket as backward produces them, and a
    bucket whose gradients are all there is all-reduced asynchronously while backward goes on with the
    earlier layers. Buckets hold parameters in reverse order (backward reaches the last layers first)
    and are launched strictly in bucket order, so every rank issues the collectives of a group in the
    same order, whatever its own backward does; a bucket with a gradient that never comes (an expert
    shard no token reached) waits for finish(), which gives it zeros, as sync_gradients does. Each
    element is the same sum over the same ranks as sync_gradients', so the result is identical."""

    def __init__(self, model, groups, bucket_numel=1 << 22):
        self.groups, self.buckets, self.bucket_of, self.armed = groups, [], {}, False
        group_of = {"dp": groups.dp_group, "world": dist.group.WORLD, "edp": groups.experts.edp_group}
        for key, named in reduction_plan(model, groups).items():
            numel = bucket_numel  # start a new bucket at every group
            for _, p in reversed(named):
                if numel >= bucket_numel:
                    self.buckets.append((group_of[key], []))
                    numel = 0
                self.buckets[-1][1].append(p)
                self.bucket_of[id(p)] = len(self.buckets) - 1
                numel += p.numel()
                p.register_post_accumulate_grad_hook(self._arrived)

    def arm(self):
        """Before the last micro-batch's backward: reduce as the gradients arrive."""
        self.armed, self.launched, self.works = True, 0, []
        self.missing = [len(params) for _, params in self.buckets]

    def _arrived(self, p):
        if self.armed:
            self.missing[self.bucket_of[id(p)]] -= 1
            self._launch(force=False)

    def _launch(self, force):
        while self.launched < len(self.buckets) and (force or self.missing[self.launched] == 0):
            group, params = self.buckets[self.launched]
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            self.works.append((params, flat, dist.all_reduce(flat, group=group, async_op=True)))
            self.launched += 1

    def finish(self):
        """After backward: launch what is left, wait for every bucket, divide by dp_size, unflatten."""
        self.armed = False
        self._launch(force=True)
        for params, flat, work in self.works:
            work.wait()
            flat.mul_(1.0 / self.groups.dp_size)
            for p, f in zip(params, flat.split([p.numel() for p in params])):
                p.grad.copy_(f.view_as(p))


def grad_norm(model, groups):
    """The global gradient norm: every distinct tensor counted once. Replicated gradients are equal on
    every rank (count the local copy); TP shards are summed over the TP group, expert shards over the
    EP group (each holds every piece once). The same value on every rank; in one process exactly what
    torch.nn.utils.get_total_norm measures (the single process's clipping, bit for bit)."""
    tp_ids = {id(p) for _, p, _ in tp_sharded_parameters(model)}
    ep_ids = {id(p) for p in ep.sharded_parameters(model)}
    grads = {"rep": [], "tp": [], "ep": []}
    for p in model.parameters():
        if p.grad is not None:
            grads["ep" if id(p) in ep_ids else "tp" if id(p) in tp_ids else "rep"].append(p.grad)
    norm = torch.nn.utils.get_total_norm(grads["rep"])
    for key, group in (("tp", groups.tp_group), ("ep", groups.experts.ep_group)):
        if grads[key]:  # shards exist only where the group has more than one rank
            sq = torch.nn.utils.get_total_norm(grads[key]).pow(2)
            dist.all_reduce(sq, group=group)
            norm = (norm.pow(2) + sq).sqrt()
    return norm


# -----------------------------------------------------------------------------
# 7. checkpoints: always the full model, so a run saved at one (tp, ep, dp) resumes at any other
#
# Save: rank 0, the only rank that writes, receives the full tensors: the expert shards of EP group 0
# (expert_parallel), the TP shards of TP group 0 (ranks 0 .. tp_size-1, which together hold every head
# once) concatenated along their split dim, and AdamW's moments likewise. No other rank holds a full
# copy. Load: build the full model, load the full state, parallelize (slices), build the optimizer,
# load shard_optimizer_state (slices the moments); or, into a model already parallelized,
# load_state_dict(shard_state(full_state, model, groups)). The gathers are collectives: call these on
# every rank, in the same order.


def _gather_to_main(t, dim, groups):
    """The full tensor on rank 0 from the shards of TP group 0; None on every other rank (the ranks
    outside TP group 0 take no part)."""
    if groups.rank >= groups.tp_size:
        return None
    parts = [torch.empty_like(t) for _ in range(groups.tp_size)] if groups.is_main else None
    dist.gather(t.contiguous(), parts, group=groups.tp_group, group_dst=0)
    return torch.cat(parts, dim) if parts is not None else None


def _sharded(groups):
    return groups.tp_size > 1 or groups.experts.ep_size > 1


def full_model_state(model, groups):
    """model.state_dict() with every shard gathered to its full shape: on rank 0, and None on the other
    ranks when anything is sharded."""
    state = ep.full_model_state(model, groups.experts)
    for name, p, dim in tp_sharded_parameters(model):
        full = _gather_to_main(p.detach(), dim, groups)
        if state is not None and full is not None:
            state[name] = full
    return state if groups.is_main or not _sharded(groups) else None


def shard_state(full_state, model, groups):
    """The inverse of full_model_state for this rank: a full state dict sliced to this rank's shapes."""
    local = dict(full_state)
    for name, _, dim in tp_sharded_parameters(model):
        local[name] = _tp_slice(full_state[name], dim, groups).clone()
    if groups.experts.ep_size > 1:
        for prefix, m in model.named_modules():
            if isinstance(m, ep.ParallelExperts):
                lo, hi = groups.experts.expert_range(m.n_expert_total)
                for name, _ in m.named_parameters(recurse=False):
                    local[f"{prefix}.{name}"] = full_state[f"{prefix}.{name}"][lo:hi].clone()
    return local


def _map_tp_moments(state, optimizer, model, fn):
    """state (an optimizer state_dict) with fn(tensor, dim) applied to the per-parameter tensors
    (exp_avg, exp_avg_sq) of the TP-sharded parameters; Optimizer.state_dict numbers parameters group
    by group, parameter by parameter."""
    dims = {id(p): dim for _, p, dim in tp_sharded_parameters(model)}
    per_param = dict(state["state"])
    for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        if id(p) in dims and i in per_param:
            per_param[i] = {
                k: fn(v, dims[id(p)]) if torch.is_tensor(v) and v.dim() == p.dim() else v
                for k, v in per_param[i].items()
            }
    return {**state, "state": per_param}


def full_optimizer_state(optimizer, model, groups):
    """optimizer.state_dict() with every shard's moments gathered to the full shapes: on rank 0, and
    None on the other ranks when anything is sharded."""
    state = ep.full_optimizer_state(optimizer, model, groups.experts)  # rank 0 (or every rank if ep_size 1)
    if groups.tp_size > 1 and groups.rank < groups.tp_size:
        state = _map_tp_moments(
            state if state is not None else optimizer.state_dict(),
            optimizer,
            model,
            lambda v, dim: _gather_to_main(v, dim, groups),
        )
    return state if groups.is_main or not _sharded(groups) else None


def shard_optimizer_state(state, optimizer, model, groups):
    """The inverse of full_optimizer_state for this rank."""
    state = ep.shard_optimizer_state(state, optimizer, model, groups.experts)
    return _map_tp_moments(state, optimizer, model, lambda v, dim: _tp_slice(v, dim, groups).clone())


# -----------------------------------------------------------------------------
# 8. communication volume per layer, from the config
#
# Bytes one rank sends in the forward pass of one MoE transformer layer (the backward sends the same
# again: every collective's adjoint is one of the same size), for T tokens per data-parallel replica,
# with uniform routing (a slot goes to each of the R ranks of the expert group alike, (R-1)/R of them
# leave the rank) and no drops (K*T slots; capacity caps it at cf*K*T). Ring collectives: an all-reduce
# of X bytes over n ranks sends 2 (n-1)/n X per rank, an all-gather of X bytes in total (n-1)/n X.


def comm_bytes_per_layer(cfg, layout, tokens, bytes_per_elem=2, sliced=True):
    """[(collective, group size, bytes one rank sends)] in the forward of one MoE layer (attention and
    MoE). sliced=False: every TP rank routes all T tokens of its replica (what section 4 avoids)."""
    D, K, tp, R = cfg.n_embd, cfg.top_k, layout.tp_size, layout.ep_size
    act = tokens * D * bytes_per_elem  # one replicated activation, T x D
    rows = []
    if tp > 1:
        rows.append(("attention all-reduce", tp, 2 * (tp - 1) / tp * act))
    if layout.expert_group == "etp":
        rows.append(("expert-output all-reduce", tp, 2 * (tp - 1) / tp * K * act))  # K*T slots x D
        return rows
    slots = K * act / (tp if sliced else 1)  # the slots this rank routes: K per token of its slice
    if R > 1:
        rows.append(("dispatch all-to-all", R, (R - 1) / R * slots))
        rows.append(("combine all-to-all", R, (R - 1) / R * slots))
    if tp > 1 and sliced:
        rows.append(("token all-gather", tp, (tp - 1) / tp * act))
    return rows


def expert_gradient_bytes(n_expert_params, layout, bytes_per_elem=4):
    """(bytes one rank sends per optimizer step to reduce its expert gradients, ranks in that ring
    all-reduce): what EDP pays for keeping its all-to-all inside the TP group. n_expert_params: the
    expert parameters of the full model."""
    if layout.expert_group == "etp":
        held, n = n_expert_params / layout.tp_size, layout.dp_size
    else:
        held, n = n_expert_params / layout.ep_size, layout.world_size // layout.ep_size
    return 2 * (n - 1) / n * held * bytes_per_elem, n


def layout_picture(layout, cfg):
    """The rank / group / holdings table of section 1 for any layout, one column per rank."""
    W, tp, R, E = layout.world_size, layout.tp_size, layout.ep_size, cfg.n_expert

    def row(label, cells):
        return (f"{label:<15}" + "".join(f"{c:<9}" for c in cells)).rstrip()

    def span(lo, hi):
        return f"{lo}-{hi - 1}" if hi - lo > 1 else f"{lo}"

    hq = cfg.n_head // tp
    lines = [row("rank", range(W))]
    if tp > 1:
        lines.append(row("TP group", [f"T{r // tp}" for r in range(W)]))
        lines.append(row("q heads", [span(r % tp * hq, (r % tp + 1) * hq) for r in range(W)]))
    lines.append(row("DP group", [f"D{r % tp}" for r in range(W)]))
    if layout.expert_group == "etp":
        lines.append(row("experts", [f"all, F/{tp}" for _ in range(W)]))
    else:
        if R > 1:
            lines.append(row("EP group", [f"T{r // R}" if R == tp else f"X{r // R}" for r in range(W)]))
        lines.append(row("experts", [span(r % R * (E // R), (r % R + 1) * (E // R)) for r in range(W)]))
        lines.append(row("EDP group", [f"D{r % R}" if R == tp else f"Y{r % R}" for r in range(W)]))
        if tp > 1:
            lines.append(row("routes tokens", [f"{r % tp + 1} of {tp}" for r in range(W)]))
    return "\n".join(lines)


def main(argv):
    from config import ConfigError, load_config
    from model import ModelConfig

    try:
        (cfg,), _ = load_config(argv or ["config/skywork_moe.toml"], [ModelConfig], ignore_unknown=True)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    layouts = []
    for world in (4, 8):
        tp = world // 2
        for tp_size, ep_size, group in ((1, world, ""), (tp, world, "world"), (tp, tp, "tp"), (tp, 1, "etp")):
            try:
                layouts.append(validate_layout(world, tp_size, ep_size, group, cfg))
            except ValueError as e:
                print(f"(world {world}, tp_size {tp_size}, expert_group {group!r}: {e})")
    for layout in layouts:
        print(f"\n{layout.describe()}\n")
        print(layout_picture(layout, cfg))
    n_expert_params = cfg.n_expert * 3 * cfg.n_embd * cfg.expert_hidden  # one MoE layer's experts
    tokens = cfg.block_size  # one sequence per replica and micro-batch
    print(
        f"\nMB one rank sends in the forward of one MoE layer, T = {tokens} tokens per replica, D = {cfg.n_embd}, "
        f"K = {cfg.top_k}, bf16, uniform routing, no drops (the backward sends as much again); the layer's "
        f"expert gradients: GB one rank sends per step, fp32 ring all-reduce over the ranks holding the same "
        f"experts\n"
    )
    print(
        "| world | layout | tp | ep | attention | dispatch + combine | token all-gather | ETP all-reduce | total "
        "| unsliced total | expert grads per step |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for layout in layouts:
        mb = {w: b / 1e6 for w, _, b in comm_bytes_per_layer(cfg, layout, tokens)}
        unsliced = sum(b for _, _, b in comm_bytes_per_layer(cfg, layout, tokens, sliced=False)) / 1e6
        g, n = expert_gradient_bytes(n_expert_params, layout)
        a2a = mb.get("dispatch all-to-all", 0) + mb.get("combine all-to-all", 0)
        print(
            f"| {layout.world_size} | {layout.name} | {layout.tp_size} | {layout.ep_size} "
            f"| {mb.get('attention all-reduce', 0):.1f} | {a2a:.1f} | {mb.get('token all-gather', 0):.1f} "
            f"| {mb.get('expert-output all-reduce', 0):.1f} | {sum(mb.values()):.1f} | {unsliced:.1f} "
            f"| {g / 1e9:.1f} over {n} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
