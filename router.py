"""
Routing for Mixture-of-Experts layers: which experts see which tokens, and how hard we push for balance.

Implements from Skywork-MoE (Wei et al. 2024, arXiv 2406.06563):
  - top-k gating with renormalised combine weights (eq. 2)
  - the auxiliary load-balancing loss in its squared-deviation form (eq. 3-5), and the Switch
    Transformer product form n * sum_j f_j P_j beside it
  - gating logit normalization (section 4.1, eq. 6)
  - adaptive per-layer auxiliary loss coefficients driven by token drop rates (section 4.2, eq. 7-9)
and the alternatives the paper is compared with: ST-MoE's router z-loss and the auxiliary-loss-free
balancing bias of Wang et al. 2024 / DeepSeek-V3.

Eq. 4 vs the Switch form, and why the default is Switch. Both push toward balance, but not equally hard
at the same alpha. Eq. 4's gradient on the mean gate probability P_j is 2 (P_j - 1/E): the deviations
are O(1/E) and shrink as balance improves, and only the soft probabilities enter, not which experts the
top-k actually chose. The Switch form's is E f_j, O(1) whatever the balance, and f_j counts the hard
choices that fill (and overflow) the experts' capacity. On the gate weights of a small 16-expert model
the Switch gradient is 10-55x eq. 4's (geometric mean 25; experiments/results/balance_loss_small.md):
at alpha 1e-2 eq. 4 leaves ~24 % of the assignments dropped where Switch leaves ~4 %, and even at the
matched alpha 0.3 it drops more (6.6 %). The paper's alphas were presumably tuned for its own form and
scale; ours were not, so ModelConfig and every config/ preset use aux_loss="switch" (measured there),
and aux_loss="eq4" keeps the paper's formula.

Read top to bottom: pure functions (each unit-tested on hand-computed examples in tests/test_router.py),
then the thin Router module that strings them together, then the per-step controllers the training loop
owns (coefficients) or calls (bias update).

Shape legend used in names (`probs_TE` is a T x E tensor):
    T  tokens in the routing call (batch * sequence, flattened)
    G  routing groups: tokens that share one capacity and one balance loss (one rank's micro-batch
       under expert parallelism; 1 in a single process)
    E  experts
    K  experts chosen per token (top_k)
    S  routed slots = K * T, ordered choice-major: slot s = k * T + t
    N  kept slots after capacity (N <= S)
"""

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# gate logits -> probabilities


def normalize_gate_logits(logits_TE, lam, eps=1e-6):
    """Gating logit normalization, eq. 6: z~ = lambda * (z - mean(z)) / std(z), per token.

    Why: without it the gate drifts toward a flat distribution and the top-k probabilities end up
    only marginally above the rest (section 4.1); fixing the logits' spread to lambda keeps the gate
    decisive. std is the unbiased torch.std over the E logits of a token, as in the released inference
    code; eps (ours) guards a token whose logits are all equal.
    """
    mean_T1 = logits_TE.mean(dim=-1, keepdim=True)
    std_T1 = logits_TE.std(dim=-1, keepdim=True)
    return lam * (logits_TE - mean_T1) / (std_T1 + eps)


def top_k_gating(probs_TE, k, bias_E=None):
    """Choose k experts per token; combine weights are the chosen probabilities renormalised to sum
    to 1 (eq. 2: y = (1/s) sum_{j in top-k} g_j E_j(x), s = sum of the chosen g_j).

    bias_E (auxiliary-loss-free balancing) shifts the *selection* only: the combine weights come from
    the unbiased probabilities, and no gradient flows through the bias.
    """
    scores_TE = probs_TE if bias_E is None else probs_TE.detach() + bias_E
    ids_TK = scores_TE.topk(k, dim=-1).indices
    gates_TK = probs_TE.gather(-1, ids_TK)
    weights_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True)
    return ids_TK, weights_TK


# -----------------------------------------------------------------------------
# capacity and token dropping


def expert_capacity(tokens_per_group, k, n_expert, capacity_factor):
    """C = ceil(capacity_factor * T * K / E) slots per expert and group; None means dropless."""
    if not capacity_factor:  # 0 or None
        return None
    return math.ceil(capacity_factor * tokens_per_group * k / n_expert)


def dispatch_plan(ids_TK, n_expert, capacity, n_group=1):
    """Decide which routed slots are kept, and the order in which kept slots visit the experts.

    Priority inside one expert and group: every first choice before any second choice, then token
    order (GShard / Switch convention). Implemented with one stable sort, no per-token Python:
    slots are laid out choice-major (s = k*T + t), so a stable sort by (expert, group) leaves each
    bucket in priority order, and a slot's rank in its bucket is its position minus the bucket start.

    Returns
        slots_N    kept slot indices, sorted by expert (then group, then priority): the dispatch order
        counts_E   kept slots per expert (how slots_N splits into contiguous per-expert chunks)
        keep_TK    bool, which (token, choice) pairs survived capacity
    """
    T, K = ids_TK.shape
    S = T * K
    ids_S = ids_TK.t().reshape(-1)  # choice-major, (S,)
    if n_group == 1:
        bucket_S = ids_S  # one group: a bucket is an expert
    else:
        group_S = (torch.arange(S, device=ids_TK.device) % T) // (T // n_group)
        bucket_S = ids_S * n_group + group_S  # expert-major buckets, (S,)
    order_S = torch.argsort(bucket_S, stable=True)
    # routed slots per bucket; scatter_add_ into a buffer of known size, not bincount, which on CUDA
    # reads the largest id back to the host (a sync) even with minlength
    routed_B = torch.zeros(n_expert * n_group, dtype=torch.long, device=ids_TK.device).scatter_add_(
        0, bucket_S, torch.ones_like(bucket_S)
    )
    if capacity is None:  # dropless: every slot kept, no host sync at all
        slots_N, kept_B = order_S, routed_B
        keep_S = torch.ones(S, dtype=torch.bool, device=ids_TK.device)
    else:
        start_B = torch.cumsum(routed_B, 0) - routed_B
        rank_S = torch.arange(S, device=ids_TK.device) - start_B[bucket_S[order_S]]  # in sorted order
        keep_sorted_S = rank_S < capacity
        kept_B = routed_B.clamp(max=capacity)
        # the kept count is data-dependent and sizes slots_N: the one host sync of routing, made
        # explicit here (a boolean mask would hide the same sync inside nonzero)
        N = int(kept_B.sum())
        slots_N = order_S[torch.nonzero_static(keep_sorted_S, size=N).view(-1)]
        keep_S = torch.zeros(S, dtype=torch.bool, device=ids_TK.device)
        keep_S[order_S] = keep_sorted_S
    counts_E = kept_B.view(n_expert, n_group).sum(dim=1)
    keep_TK = keep_S.view(K, T).t()
    return slots_N, counts_E, keep_TK


# -----------------------------------------------------------------------------
# balance losses (each averaged over routing groups: one loss per capacity group, as under EP)


def aux_loss_eq4(probs_GTE):
    """Skywork-MoE eq. 4: L_aux = sum_j (1/E - mean_i g_ij)^2. Minimum 0 at perfectly balanced
    mean gate probabilities; it pushes the *probabilities* (not the hard counts) toward uniform."""
    E = probs_GTE.shape[-1]
    mean_prob_GE = probs_GTE.mean(dim=1)
    return ((1.0 / E - mean_prob_GE) ** 2).sum(dim=-1).mean()


def aux_loss_switch(probs_GTE, ids_GTK):
    """Switch Transformer: L = E * sum_j f_j P_j, f_j = share of routed assignments (before capacity)
    that go to expert j (no gradient), P_j = mean gate probability of j. f is normalised to sum to 1
    over experts, so the minimum is 1 at perfect balance for any k."""
    G, T, E = probs_GTE.shape
    K = ids_GTK.shape[-1]
    one_hot_GE = torch.zeros(G, E, device=probs_GTE.device).scatter_add_(
        1, ids_GTK.reshape(G, T * K), torch.ones(G, T * K, device=probs_GTE.device)
    )
    f_GE = one_hot_GE / (T * K)
    P_GE = probs_GTE.mean(dim=1)
    return (E * (f_GE * P_GE).sum(dim=-1)).mean()


def router_z_loss(logits_TE):
    """ST-MoE router z-loss: mean_i (logsumexp_j z_ij)^2; keeps the logits entering softmax small."""
    return torch.logsumexp(logits_TE, dim=-1).pow(2).mean()


# -----------------------------------------------------------------------------
# statistics (no gradient; the numbers the paper plots)


@torch.no_grad()
def gate_statistics(probs_TE):
    """(Max1/Max2, Max2/Max3, entropy) of one group of tokens: the short form of gate_decisiveness
    (the notebooks use it)."""
    out = gate_decisiveness(probs_TE.unsqueeze(0))
    return out["max1_max2"], out["max2_max3"], out["entropy"]


@torch.no_grad()
def gate_decisiveness(probs_GTE):
    """How decisive the gate is (section 4.1; Fig. 3 plots Max1/Max2 and Max2/Max3), as a dict of
    scalars. "MaxK" is the K-th largest gate probability of a token. The paper does not say how it
    averages the ratio over tokens, and the choice matters (a few near-one-hot tokens dominate a mean
    of ratios), so three readings are kept:
        max1_max2           mean over tokens of Max1/Max2
        max1_max2_median    median over tokens of Max1/Max2
        max1_max2_of_means  mean Max1 / mean Max2 (the ratio of the mean sorted distribution's top two)
    plus Max2/Max3 (mean of ratios) and the mean entropy. Each is computed per routing group and
    averaged over groups, so expert-parallel ranks (one group each) average to the single-process
    number exactly. nan where E is too small for the ratio."""
    G, T, E = probs_GTE.shape
    nan = torch.tensor(float("nan"), device=probs_GTE.device, dtype=probs_GTE.dtype)
    top_GT3 = probs_GTE.topk(min(3, E), dim=-1).values
    out = dict.fromkeys(("max1_max2", "max1_max2_median", "max1_max2_of_means", "max2_max3"), nan)
    if E >= 2:
        ratio_GT = top_GT3[..., 0] / top_GT3[..., 1]
        out["max1_max2"] = ratio_GT.mean()
        out["max1_max2_median"] = ratio_GT.quantile(0.5, dim=1).mean()  # interpolated: the middle of an even T
        mean_top_G3 = top_GT3.mean(dim=1)
        out["max1_max2_of_means"] = (mean_top_G3[:, 0] / mean_top_G3[:, 1]).mean()
    if E >= 3:
        out["max2_max3"] = (top_GT3[..., 1] / top_GT3[..., 2]).mean()
    out["entropy"] = -(probs_GTE * probs_GTE.clamp_min(1e-20).log()).sum(-1).mean()
    return out


@dataclass
class RouterOutput:
    """What one MoE layer's router reports for one forward call. Tensors, not Python floats, so the
    hot path never waits on the device; the training loop averages and logs them."""

    aux_loss: torch.Tensor  # scalar, with gradient: eq. 4 or Switch, averaged over groups
    z_loss: torch.Tensor  # scalar, with gradient
    drop_rate: torch.Tensor  # dropped / routed assignments (K*T)
    load_E: torch.Tensor  # routed assignments per expert, before capacity (float)
    load_cv: torch.Tensor  # std / mean of load_E: 0 is perfectly balanced
    max1_max2: torch.Tensor  # gate_statistics: three readings of Max1/Max2, Max2/Max3, entropy
    max1_max2_median: torch.Tensor
    max1_max2_of_means: torch.Tensor
    max2_max3: torch.Tensor
    entropy: torch.Tensor
    logit_std: torch.Tensor  # mean over tokens of the std of the gate logits *before* eq. 6
    router_weight_norm: torch.Tensor  # Frobenius norm of the gate weight (weight decay shrinks it)
    # the routing decision itself, for the MoE layer and for tests / notebooks
    ids_TK: torch.Tensor
    weights_TK: torch.Tensor
    keep_TK: torch.Tensor
    slots_N: torch.Tensor
    counts_E: torch.Tensor
    probs_TE: torch.Tensor


# the per-layer scalars train.py logs to metrics.jsonl (every one exactly averageable over ranks)
STAT_NAMES = (
    "aux_loss",
    "z_loss",
    "drop_rate",
    "load_cv",
    "max1_max2",
    "max1_max2_median",
    "max1_max2_of_means",
    "max2_max3",
    "entropy",
    "logit_std",
    "router_weight_norm",
)

# -----------------------------------------------------------------------------
# the module


@contextlib.contextmanager
def full_fp32_matmul():
    """fp32 matmuls at full IEEE precision inside, whatever the global TF32 setting: the gate's logits
    decide the top-k choices (TF32 keeps 10 mantissa bits, enough to flip near-ties), and the expert
    similarity is a health metric read to three decimals."""
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


class Router(nn.Module):
    """Gate (bias-free linear D -> E, computed in fp32) + the routing decision above.

    The only state besides the gate weight is the aux-free selection bias: it changes which experts a
    token visits, so it is part of the model (saved with it, used by sample.py), updated outside the
    forward by `update_selection_bias` after each optimizer step.
    """

    def __init__(
        self,
        n_embd,
        n_expert,
        top_k,
        capacity_factor=1.25,
        gate_norm=True,
        gate_lambda=1.0,
        aux_loss="eq4",
        aux_free_bias=False,
    ):
        super().__init__()
        self.n_expert, self.top_k = n_expert, top_k
        self.capacity_factor = capacity_factor
        self.gate_norm, self.gate_lambda = gate_norm, gate_lambda
        self.aux_loss_type = aux_loss
        self.aux_free_bias = aux_free_bias
        self.weight = nn.Parameter(torch.zeros(n_expert, n_embd))  # defined until drawn; see model.Experts
        self.register_buffer("selection_bias_E", torch.zeros(n_expert))

    def forward(self, x_TD, n_group=1):
        T, E, K = x_TD.shape[0], self.n_expert, self.top_k
        if T % n_group:
            raise ValueError(f"{T} tokens do not split into {n_group} equal routing groups")
        # router math in fp32 (or wider) whatever the model's dtype: small logit errors flip top-k
        # choices; fp64 stays fp64 so an fp64 model is exact end to end (upcycling's function test)
        rdt = torch.promote_types(x_TD.dtype, torch.float32)
        with torch.autocast(device_type=x_TD.device.type, enabled=False), full_fp32_matmul():
            raw_logits_TE = F.linear(x_TD.to(rdt), self.weight.to(rdt))
            logits_TE = raw_logits_TE
            if self.gate_norm:
                logits_TE = normalize_gate_logits(raw_logits_TE, self.gate_lambda)
            probs_TE = logits_TE.softmax(dim=-1)
            bias_E = self.selection_bias_E if self.aux_free_bias else None
            ids_TK, weights_TK = top_k_gating(probs_TE, K, bias_E)
            capacity = expert_capacity(T // n_group, K, E, self.capacity_factor)
            slots_N, counts_E, keep_TK = dispatch_plan(ids_TK, E, capacity, n_group)

            probs_GTE = probs_TE.view(n_group, T // n_group, E)
            if self.aux_loss_type == "eq4":
                aux = aux_loss_eq4(probs_GTE)
            elif self.aux_loss_type == "switch":
                aux = aux_loss_switch(probs_GTE, ids_TK.view(n_group, T // n_group, K))
            else:  # "none": still a tensor so the loss code has one shape
                aux = probs_TE.new_zeros(())
            z = router_z_loss(logits_TE)

        with torch.no_grad():  # statistics: a few reductions over (T, E) tensors already at hand
            # routed assignments per expert: scatter_add_ into a known-size buffer (bincount syncs on CUDA)
            ids_N = ids_TK.reshape(-1)
            load_E = torch.zeros(E, device=ids_N.device).scatter_add_(
                0, ids_N, torch.ones(ids_N.shape, device=ids_N.device)
            )
            load_cv = load_E.std(correction=0) / load_E.mean()
            drop_rate = 1.0 - keep_TK.float().mean()
            gate = gate_decisiveness(probs_GTE.detach())
            # the spread eq. 6 replaces by lambda: how decisive the raw gate is, and what weight decay
            # on the gate (its norm) does to it without normalization (section 4.1's drift)
            logit_std = raw_logits_TE.detach().std(dim=-1).mean() if E >= 2 else raw_logits_TE.new_zeros(())
            weight_norm = self.weight.detach().to(rdt).norm()
        return RouterOutput(aux, z, drop_rate, load_E, load_cv, logit_std=logit_std, router_weight_norm=weight_norm,
                            ids_TK=ids_TK, weights_TK=weights_TK, keep_TK=keep_TK, slots_N=slots_N,
                            counts_E=counts_E, probs_TE=probs_TE, **gate)  # fmt: skip


# -----------------------------------------------------------------------------
# per-step balance controllers (owned by the training loop, updated after each optimizer step)


def adaptive_alpha_step(alpha, drop_rate, xi, alpha_max, beta):
    """Eq. 7-9 for one layer: alpha_hat = f(d) = min(xi * d, alpha_max);
    alpha_next = beta * alpha + (1 - beta) * alpha_hat. A layer that drops tokens gets a larger
    balance coefficient; a balanced layer lets it decay, leaving more room for the LM loss."""
    alpha_hat = min(xi * drop_rate, alpha_max)
    return beta * alpha + (1.0 - beta) * alpha_hat


class AuxCoefficients:
    """The per-MoE-layer auxiliary loss coefficients alpha^(l): fixed, or adaptive (eq. 7-9).

    Plain Python floats: they multiply the loss but are not trained and not model state; the
    checkpoint stores them through state_dict(). Under torchrun the drop rates fed to update() are
    all-reduced first, so every rank holds the same alphas.
    """

    def __init__(self, n_layer, mode="adaptive", alpha_init=0.01, xi=0.2, alpha_max=0.01, beta=0.99):
        if mode not in ("adaptive", "fixed"):
            raise ValueError(f"aux coefficient mode {mode!r}: use 'adaptive' or 'fixed'")
        self.mode, self.xi, self.alpha_max, self.beta = mode, xi, alpha_max, beta
        self.alpha = [float(alpha_init)] * n_layer

    def update(self, drop_rates):
        if self.mode == "adaptive":
            self.alpha = [
                adaptive_alpha_step(a, float(d), self.xi, self.alpha_max, self.beta)
                for a, d in zip(self.alpha, drop_rates, strict=True)
            ]
        return self.alpha

    def state_dict(self):
        return {"alpha": list(self.alpha)}

    def load_state_dict(self, state):
        if len(state["alpha"]) != len(self.alpha):
            raise ValueError(
                f"checkpoint has {len(state['alpha'])} aux coefficients, the model has {len(self.alpha)} MoE layers"
            )
        self.alpha = [float(a) for a in state["alpha"]]


def aux_free_bias_step(bias_E, load_E, rate):
    """Auxiliary-loss-free balancing (Wang et al. 2024): b_i += u * sign(mean_load - load_i).
    Overloaded experts become less attractive to select, underloaded ones more; in place."""
    bias_E.add_(rate * torch.sign(load_E.mean() - load_E))
    return bias_E


def balance_loss(ce_loss, router_outputs, alphas, z_loss_coef=0.0):
    """Total loss: L = L_ce + sum_l alpha^(l) * L_aux^(l) (+ z_coef * sum_l L_z^(l))."""
    loss = ce_loss
    for out, alpha in zip(router_outputs, alphas, strict=True):
        loss = loss + alpha * out.aux_loss
        if z_loss_coef:
            loss = loss + z_loss_coef * out.z_loss
    return loss
