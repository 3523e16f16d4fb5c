"""Router math on hand-computed examples (DESIGN.md "Tests"): top-k and renormalisation (eq. 2),
capacity and drops, balance losses (eq. 4, Switch), z-loss, gate normalization (eq. 6), the adaptive
coefficient rule (eq. 7-9) and the aux-free bias."""

import math

import pytest
import torch

from router import (
    AuxCoefficients,
    Router,
    adaptive_alpha_step,
    aux_free_bias_step,
    aux_loss_eq4,
    aux_loss_switch,
    dispatch_plan,
    expert_capacity,
    normalize_gate_logits,
    router_z_loss,
    top_k_gating,
)


def test_top_k_and_renormalisation():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    ids, w = top_k_gating(probs, 2)
    assert ids.tolist() == [[0, 1], [1, 2]]
    torch.testing.assert_close(w, torch.tensor([[0.625, 0.375], [0.6 / 0.9, 0.3 / 0.9]]))
    ids1, w1 = top_k_gating(probs, 1)
    assert ids1.tolist() == [[0], [1]] and w1.tolist() == [[1.0], [1.0]]


def test_capacity_formula():
    assert expert_capacity(8, 2, 4, 1.0) == 4  # ceil(1.0 * 8 * 2 / 4)
    assert expert_capacity(10, 2, 4, 1.25) == 7  # ceil(6.25)
    assert expert_capacity(10, 2, 4, 0) is None  # 0 / None: dropless
    assert expert_capacity(10, 2, 4, None) is None


def test_first_choices_have_priority_then_token_order():
    # 4 tokens, top-2 of 2 experts, capacity 2 per expert.
    ids = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    slots, counts, keep = dispatch_plan(ids, n_expert=2, capacity=2)
    # expert 0: first choices of t0, t1 fill it; t3's first choice and t2's second overflow.
    # expert 1: t2's first choice, then second choices in token order: t0 kept, t1 and t3 dropped,
    # although t0 < t2 in token order the first choice of t2 came first.
    assert keep.tolist() == [[True, True], [True, False], [True, False], [False, False]]
    assert counts.tolist() == [2, 2]
    # slot s = k*T + t, in expert order: e0 <- (k0,t0)=0, (k0,t1)=1; e1 <- (k0,t2)=2, (k1,t0)=4
    assert slots.tolist() == [0, 1, 2, 4]
    assert 1 - keep.float().mean().item() == 0.5  # drop rate: 4 of 8 routed assignments


def test_dropless_keeps_everything_sorted_by_expert():
    ids = torch.tensor([[2, 0], [0, 1], [2, 1]])
    slots, counts, keep = dispatch_plan(ids, n_expert=3, capacity=None)
    assert keep.all() and counts.tolist() == [2, 2, 2]
    ids_S = ids.t().reshape(-1)
    assert ids_S[slots].tolist() == [0, 0, 1, 1, 2, 2]


def test_capacity_is_per_routing_group():
    ids = torch.zeros(4, 1, dtype=torch.long)  # every token wants expert 0
    _, counts, keep = dispatch_plan(ids, n_expert=2, capacity=1, n_group=2)
    assert keep[:, 0].tolist() == [True, False, True, False]  # first token of each group kept
    assert counts.tolist() == [2, 0]


def test_eq4_loss_minimum_and_growth():
    uniform = torch.full((1, 6, 4), 0.25)
    assert aux_loss_eq4(uniform).item() == pytest.approx(0.0)
    # balanced on average though no single token is uniform: still the minimum
    assert aux_loss_eq4(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])).item() == pytest.approx(0.0)
    # all mass on expert 0: (1/2 - 1)^2 + (1/2 - 0)^2
    assert aux_loss_eq4(torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])).item() == pytest.approx(0.5)
    values = [aux_loss_eq4(torch.tensor([[[a, 1 - a]] * 3])).item() for a in (0.5, 0.6, 0.8, 1.0)]
    assert values == sorted(values) and values[0] == pytest.approx(0.0)


def test_switch_loss_minimum_and_growth():
    E, T = 4, 8
    probs = torch.full((1, T, E), 1.0 / E)
    balanced_ids = torch.arange(T).remainder(E).view(1, T, 1)
    assert aux_loss_switch(probs, balanced_ids).item() == pytest.approx(1.0)
    # top-2, balanced: still 1 (f sums to 1 over experts)
    ids2 = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], -1).view(1, T, 2)
    assert aux_loss_switch(probs, ids2).item() == pytest.approx(1.0)
    # everything on expert 0 with all probability there: E * 1 * 1
    skew = torch.zeros(1, T, E)
    skew[..., 0] = 1.0
    assert aux_loss_switch(skew, torch.zeros(1, T, 1, dtype=torch.long)).item() == pytest.approx(E)


def test_z_loss_value():
    assert router_z_loss(torch.zeros(3, 4)).item() == pytest.approx(math.log(4) ** 2)
    logits = torch.tensor([[1.0, 2.0]])
    assert router_z_loss(logits).item() == pytest.approx(math.log(math.e + math.e**2) ** 2)


@pytest.mark.parametrize("lam", [0.5, 1.0, 2.0])
def test_gate_norm_zero_mean_std_lambda_and_same_routing(lam):
    torch.manual_seed(0)
    logits = torch.randn(50, 16, dtype=torch.float64) * 3 + 5
    z = normalize_gate_logits(logits, lam)
    torch.testing.assert_close(z.mean(-1), torch.zeros(50, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(z.std(-1), torch.full((50,), lam, dtype=torch.float64), atol=1e-5, rtol=0)
    # without the mean subtraction: identical probabilities (softmax is shift invariant), same top-k
    no_mean = lam * logits / (logits.std(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(z.softmax(-1), no_mean.softmax(-1))
    assert torch.equal(z.topk(2).indices, no_mean.topk(2).indices)


def test_adaptive_coefficients_follow_eq7_to_9_step_by_step():
    xi, amax, beta = 0.2, 0.01, 0.99
    c = AuxCoefficients(2, "adaptive", alpha_init=0.01, xi=xi, alpha_max=amax, beta=beta)
    expected = [0.01, 0.01]
    for drops in ([0.02, 0.0], [0.1, 0.5], [0.0, 0.04]):
        c.update(drops)
        # eq. 8: alpha_hat = min(xi d, alpha_max); eq. 9: alpha = beta alpha + (1 - beta) alpha_hat
        expected = [beta * a + (1 - beta) * min(xi * d, amax) for a, d in zip(expected, drops)]
        assert c.alpha == pytest.approx(expected, abs=1e-15)
    # the three steps by hand for layer 0: 0.00994, then clamped alpha_hat 0.01, then 0
    assert c.alpha[0] == pytest.approx(0.99 * (0.99 * 0.00994 + 0.01 * 0.01), abs=1e-15)
    assert adaptive_alpha_step(0.0, 1.0, xi, amax, beta) == pytest.approx(0.01 * amax)  # clamp at alpha_max
    fixed = AuxCoefficients(3, "fixed", alpha_init=1e-3)
    fixed.update([0.5, 0.5, 0.5])
    assert fixed.alpha == [1e-3] * 3
    restored = AuxCoefficients(2)
    restored.load_state_dict(c.state_dict())
    assert restored.alpha == c.alpha
    with pytest.raises(ValueError, match="MoE layers"):
        AuxCoefficients(3).load_state_dict(c.state_dict())


def test_aux_free_bias_moves_toward_balance_and_never_touches_combine_weights():
    bias = torch.zeros(4)
    aux_free_bias_step(bias, torch.tensor([6.0, 2.0, 0.0, 0.0]), rate=1e-3)
    assert bias.tolist() == pytest.approx([-1e-3, 0.0, 1e-3, 1e-3])
    # the bias flips the choice of expert 1 -> 2, but weights are the unbiased renormalised probs
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    ids, w = top_k_gating(probs, 2, bias_E=torch.tensor([0.0, 0.0, 0.2]))
    assert ids.tolist() == [[0, 2]]
    torch.testing.assert_close(w, torch.tensor([[0.5 / 0.7, 0.2 / 0.7]]))
    # repeated updates on a skewed router balance the load
    torch.manual_seed(0)
    router = Router(8, 4, 1, capacity_factor=0, gate_norm=False, aux_free_bias=True)
    with torch.no_grad():
        router.weight.copy_(0.3 * torch.randn(4, 8))
        router.weight[0] += 0.3  # expert 0 is everyone's favourite
    x = torch.randn(512, 8).abs()
    cv_before = router(x).load_cv.item()
    for _ in range(300):
        aux_free_bias_step(router.selection_bias_E, router(x).load_E, rate=1e-2)
    out = router(x)
    assert out.load_cv.item() < 0.5 * cv_before
    assert not router.selection_bias_E.requires_grad


def test_router_reports_drop_rate_and_load():
    torch.manual_seed(0)
    router = Router(8, 4, 2, capacity_factor=0.5, gate_norm=True)
    torch.nn.init.normal_(router.weight)
    out = router(torch.randn(64, 8))
    assert out.drop_rate.item() == pytest.approx(1 - out.keep_TK.float().mean().item())
    assert out.drop_rate.item() >= 0.5 - 1e-6  # capacity 0.5: at most half the slots fit
    assert out.load_E.sum().item() == 64 * 2
    assert out.counts_E.sum().item() == out.keep_TK.sum().item()
    assert out.max1_max2.item() >= 1.0 and out.max2_max3.item() >= 1.0
    assert 0 < out.entropy.item() <= math.log(4) + 1e-6
