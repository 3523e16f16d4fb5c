"""Model tests: causality, the grouped expert computation against a naive per-token reference,
dense == single-expert MoE, gradients, and the parameter accounting of the Skywork presets."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from config import load_config
from model import GPT, ModelConfig, MoE, count_params_meta


def tiny(**kw):
    base = dict(
        vocab_size=50,
        block_size=16,
        n_layer=2,
        n_head=2,
        n_embd=32,
        n_expert=4,
        top_k=2,
        expert_hidden=48,
        capacity_factor=0,
    )
    base.update(kw)
    return ModelConfig(**base)


def test_causality_dropless():
    # With capacity, which slots drop depends on every token in the batch (future ones included):
    # token-choice capacity routing is not causal. Dropless routing is, and so is the rest of the model.
    torch.manual_seed(0)
    model = GPT(tiny()).double().eval()
    idx = torch.randint(0, 50, (2, 16))
    logits_a = model(idx, idx)[0]
    idx2 = idx.clone()
    idx2[:, 9] = (idx2[:, 9] + 1) % 50
    logits_b = model(idx2, idx2)[0]
    torch.testing.assert_close(logits_a[:, :9], logits_b[:, :9], rtol=0, atol=1e-12)
    assert (logits_a[:, 9:] - logits_b[:, 9:]).abs().max() > 1e-6


def naive_moe(moe, x_TD, r):
    """Reference: for each kept (token, choice), run that expert on that one token."""
    ex = moe.experts
    y = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(r.ids_TK.shape[1]):
            if r.keep_TK[t, k]:
                e = r.ids_TK[t, k]
                h = F.silu(ex.w1[e] @ x_TD[t]) * (ex.w3[e] @ x_TD[t])
                y[t] += r.weights_TK[t, k] * (ex.w2[e] @ h)
    return y


@pytest.mark.parametrize("capacity_factor", [0, 1.0, 0.5])
def test_grouped_experts_equal_naive_reference(capacity_factor):
    torch.manual_seed(1)
    model = GPT(tiny(capacity_factor=capacity_factor)).double()
    moe = model.blocks[0].ffn
    x = torch.randn(3, 16, 32, dtype=torch.float64)
    y, r = moe(x)
    if capacity_factor == 0.5:
        assert r.drop_rate > 0.4
    torch.testing.assert_close(y.view(-1, 32), naive_moe(moe, x.view(-1, 32), r), rtol=1e-12, atol=1e-12)


def test_expert_that_receives_no_tokens():
    torch.manual_seed(2)
    model = GPT(tiny(gate_norm=False)).double()
    moe = model.blocks[0].ffn
    with torch.no_grad():
        moe.router.weight[3] = -10.0  # positive inputs give expert 3 a very negative logit
    x = torch.randn(1, 8, 32, dtype=torch.float64).abs()
    y, r = moe(x)
    assert r.counts_E[3] == 0 and r.counts_E.sum() == 16
    torch.testing.assert_close(y.view(-1, 32), naive_moe(moe, x.view(-1, 32), r), rtol=1e-12, atol=1e-12)
    y.sum().backward()
    assert moe.experts.w1.grad[3].abs().max() == 0 and moe.experts.w1.grad[:3].abs().max() > 0


def test_dense_equals_single_expert_moe():
    torch.manual_seed(3)
    dense_cfg = tiny(n_expert=0, ffn_hidden=48)
    moe_cfg = dataclasses.replace(dense_cfg, n_expert=1, top_k=1, expert_hidden=48, gate_norm=False)
    dense, moe = GPT(dense_cfg).double(), GPT(moe_cfg).double()
    state = dense.state_dict()
    moe_state = moe.state_dict()
    for name in moe_state:
        if name in state:
            moe_state[name] = state[name]
        elif ".experts.w" in name:
            mlp_name = name.replace("experts.", "") + ".weight"
            moe_state[name] = state[mlp_name].unsqueeze(0)
    moe.load_state_dict(moe_state)
    idx = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(moe(idx)[0], dense(idx)[0], rtol=0, atol=1e-13)
    torch.testing.assert_close(moe(idx, idx)[1], dense(idx, idx)[1], rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(moe_every=2, capacity_factor=1.0, aux_loss="switch"),
        dict(n_kv_head=1, gate_norm=False),
        dict(tie_embeddings=True),
    ],
)
def test_backward_gives_finite_gradients_everywhere(kw):
    torch.manual_seed(4)
    model = GPT(tiny(**kw))
    idx = torch.randint(0, 50, (4, 16))
    _, ce, routers = model(idx, idx)
    loss = ce + sum(0.01 * r.aux_loss + 1e-3 * r.z_loss for r in routers)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
    routers_params = [n for n, _ in model.named_parameters() if n.endswith("router.weight")]
    assert routers_params and all(model.get_parameter(n).grad.abs().sum() > 0 for n in routers_params)


def test_moe_layer_placement():
    cfg = tiny(n_layer=4, moe_every=2)
    assert cfg.moe_layer_ids == [1, 3]
    model = GPT(cfg)
    assert [b.is_moe for b in model.blocks] == [False, True, False, True]


def test_moe_layer_built_alone_is_defined_and_draws_nothing():
    # Experts and Router start from zeros (torch.empty left whatever memory held: NaNs at times), and
    # building them takes nothing from the RNG, so GPT.init_weights draws the same weights as before
    state = torch.random.get_rng_state()
    moe = MoE(tiny())
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all((p == 0).all() for p in moe.parameters())
    y, _ = moe(torch.randn(1, 8, 32))
    assert torch.equal(y, torch.zeros_like(y))


def test_active_parameter_accounting():
    cfg = tiny(n_expert=8, top_k=2)
    counts = GPT(cfg).param_counts()
    per_expert = 3 * 32 * 48
    assert counts["total"] - counts["active"] == 2 * 6 * per_expert  # 2 MoE layers, 6 idle experts each


@pytest.mark.parametrize(
    "preset,total,active", [("config/skywork_moe.toml", 146.4e9, 22.7e9), ("config/skywork_13b.toml", 13.9e9, 13.9e9)]
)
def test_skywork_presets_parameter_counts(preset, total, active):
    import os

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (model_cfg,), _ = load_config([os.path.join(repo, preset)], [ModelConfig], ignore_unknown=True)
    counts = count_params_meta(model_cfg)
    assert abs(counts["total"] - total) < 0.1e9
    assert abs(counts["active"] - active) < 0.1e9


# -----------------------------------------------------------------------------
# the three expert implementations (model.Experts.impl): grouped_mm == manual == the per-expert loop


def experts_pair(E=4, D=32, Fh=48, impl="grouped"):
    from model import Experts

    torch.manual_seed(5)
    loop = Experts(E, D, Fh)
    for w in loop.parameters():
        torch.nn.init.normal_(w, std=0.1)
    other = copy.deepcopy(loop)
    loop.impl, other.impl = "loop", impl
    return loop, other


@pytest.mark.parametrize("impl,dtype", [("grouped", torch.float), ("manual", torch.float), ("manual", torch.double)])
@pytest.mark.parametrize("counts", [[5, 0, 7, 4], [0, 0, 16, 0], [1, 1, 1, 1]])
def test_experts_equal_the_loop(counts, impl, dtype):
    loop, other = experts_pair(impl=impl)
    loop.to(dtype), other.to(dtype)
    counts_E = torch.tensor(counts)
    x = torch.randn(sum(counts), 32, dtype=dtype)
    outs = []
    for ex in (loop, other):
        xi = x.clone().requires_grad_()
        y = ex(xi, counts_E)
        y.sum().backward()  # an expanded (stride 0) gradient: grouped_mm's backward needs it made dense
        outs.append((y, xi.grad, ex.w1.grad, ex.w3.grad, ex.w2.grad))
    tol = 1e-5 if dtype == torch.float32 else 1e-13
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    for e, c in enumerate(counts):  # an expert without tokens gets exactly zero gradient
        if c == 0:
            assert other.w1.grad[e].abs().max() == 0 and other.w2.grad[e].abs().max() == 0


def test_manual_experts_and_cpu_combine_pass_gradcheck():
    # the two hand-written backwards against finite differences, in float64: every input, experts
    # with no rows, and the combine in chunks smaller than N (a token's two slots in different chunks)
    from model import SwiGLUExperts, WeightedCombine

    torch.manual_seed(0)
    E, D, Fh, counts = 3, 4, 6, [2, 0, 3]
    w1, w3 = torch.randn(E, Fh, D, dtype=torch.float64), torch.randn(E, Fh, D, dtype=torch.float64)
    w2, x = torch.randn(E, D, Fh, dtype=torch.float64), torch.randn(5, D, dtype=torch.float64)
    args = [t.requires_grad_() for t in (x, w1, w3, w2)]
    assert torch.autograd.gradcheck(lambda *a: SwiGLUExperts.apply(*a, counts), args)
    y = torch.randn(7, D, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(7, dtype=torch.float64, requires_grad=True)
    token = torch.tensor([0, 2, 3, 1, 0, 2, 3])
    assert torch.autograd.gradcheck(lambda y, w: WeightedCombine.apply(y, w, token, 5, 3), [y, weight])
    reference = torch.zeros(5, D, dtype=torch.float64).index_add_(0, token, y * weight[:, None])
    assert torch.equal(WeightedCombine.apply(y, weight, token, 5, 3), reference)


def test_expert_impl_choice():
    from model import grouped_mm_dtype

    loop, grouped = experts_pair()
    assert grouped_mm_dtype(torch.randn(3, 32), grouped.w1) == torch.float32
    # grouped_mm has no float64
    assert grouped_mm_dtype(torch.randn(3, 32, dtype=torch.float64), grouped.w1.double()) is None
    assert grouped_mm_dtype(torch.randn(3, 30), torch.randn(4, 48, 30)) is None  # rows not 16-byte aligned
    with pytest.raises(ValueError, match="use impl='loop'"):
        grouped.double()(torch.randn(3, 32, dtype=torch.float64), torch.tensor([3, 0, 0, 0]))
    loop.impl = "manual"
    with pytest.raises(ValueError, match="use impl='loop'"):  # rows cast by autocast, weights not
        loop(torch.randn(3, 32, dtype=torch.bfloat16), torch.tensor([3, 0, 0, 0]))
    loop.impl = "loop"
    # no rows at all is fine whatever auto picks
    auto = copy.deepcopy(loop)
    auto.impl = "auto"
    assert auto(torch.zeros(0, 32), torch.zeros(4, dtype=torch.long)).shape == (0, 32)


@pytest.mark.parametrize(
    "D,Fh,dtype,autocast,expected",
    [
        (32, 48, torch.float32, False, "grouped"),  # small experts: grouped_mm
        (512, 256, torch.float32, False, "manual"),  # D * F = CPU_GROUPED_MAX_WEIGHT: the manual loop
        (32, 48, torch.float64, False, "manual"),  # grouped_mm has no float64
        (512, 256, torch.float32, True, "loop"),  # CPU autocast: autograd's loop
    ],
)
def test_auto_picks_the_cpu_implementation(D, Fh, dtype, autocast, expected):
    from model import CPU_GROUPED_MAX_WEIGHT, Experts

    assert 512 * 256 == CPU_GROUPED_MAX_WEIGHT
    ex = Experts(2, D, Fh).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert ex.choose_impl(torch.zeros(4, D, dtype=dtype))[0] == expected


class FakeCudaRows:
    """Stands in for a CUDA tensor where grouped_mm_dtype only reads the device, dtype and shape."""

    device = torch.device("cuda", 0)

    def __init__(self, dtype):
        self.dtype = dtype


@pytest.mark.parametrize(
    "capability,fast", [((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True), ((12, 0), False)]
)
def test_grouped_mm_chosen_by_cuda_capability(monkeypatch, capability, fast):
    # grouped_mm's fast kernels exist on sm90 / sm100 only; elsewhere torch loops and syncs per call
    from model import grouped_mm_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    w = torch.empty(4, 48, 32)
    expected = torch.bfloat16 if fast else None
    assert grouped_mm_dtype(FakeCudaRows(torch.bfloat16), w) == expected  # what impl="auto" asks
    # impl="grouped" forces it on any sm80+ GPU (require_fast=False)
    assert grouped_mm_dtype(FakeCudaRows(torch.bfloat16), w, require_fast=False) == torch.bfloat16
    # fp32 rows without bf16 autocast: the loop, whatever the GPU
    assert grouped_mm_dtype(FakeCudaRows(torch.float32), w, require_fast=False) is None


@pytest.mark.parametrize("counts", [[5, 0, 7, 4], [0, 0, 16, 0]])
def test_fused_w13_grouped_mm_equals_loop(counts):
    # the bf16 path multiplies by the stacked [w1; w3] in one grouped matmul; the same arithmetic on CPU fp32
    loop, grouped = experts_pair()
    counts_E = torch.tensor(counts)
    x = torch.randn(sum(counts), 32)
    outs = []
    for fn in (
        lambda xi: loop(xi, counts_E),
        lambda xi: grouped.forward_grouped(xi, counts_E, torch.float32, fuse_w13=True),
    ):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.backward(torch.randn_like(y, generator=torch.Generator().manual_seed(1)))
        outs.append((y, xi.grad))
    for ex in (loop, grouped):
        outs[ex is grouped] += (ex.w1.grad, ex.w3.grad, ex.w2.grad)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert [p.shape for p in grouped.parameters()] == [p.shape for p in loop.parameters()]  # keys and shapes kept


def test_dispatched_rows_in_the_experts_compute_dtype():
    # under bf16 autocast the fp32 residual stream is cast before the gather, so the rows the experts
    # (and an expert-parallel exchange) receive are bf16; without autocast they keep the model's dtype
    torch.manual_seed(7)
    moe = GPT(tiny(capacity_factor=1.25)).blocks[0].ffn
    seen = []
    forward = moe.experts.forward
    moe.experts.forward = lambda x_ND, counts_E, counts_host=None: seen.append(x_ND.dtype) or forward(x_ND, counts_E)
    x = torch.randn(2, 16, 32)
    moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = moe(x)
    moe.double()(x.double())
    assert seen == [torch.float32, torch.bfloat16, torch.float64]
    assert y.dtype == torch.bfloat16
    # an experts call with no rows at all returns the dtype the experts compute in, too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moe.float()
        assert moe.experts(torch.zeros(0, 32), torch.zeros(4, dtype=torch.long)).dtype == torch.bfloat16


def test_moe_layer_fp32_grouped_equals_loop_and_runs_under_autocast():
    torch.manual_seed(6)
    model = GPT(tiny(capacity_factor=1.0))
    moe = model.blocks[0].ffn
    x = torch.randn(2, 16, 32)
    y_auto, _ = moe(x)
    moe.experts.impl = "loop"
    y_loop, _ = moe(x)
    torch.testing.assert_close(y_auto, y_loop, rtol=1e-5, atol=1e-5)
    # bf16 autocast (what train.py uses on GPUs): the combine runs in the experts' output dtype
    moe.experts.impl = "auto"
    idx = torch.randint(0, 50, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss, _ = model(idx, idx)
    loss.backward()
    assert torch.isfinite(moe.experts.w1.grad).all() and moe.experts.w1.grad.abs().sum() > 0


def test_padded_vocab_size():
    from model import padded_vocab_size

    assert padded_vocab_size(50257) == 50304 and padded_vocab_size(50304) == 50304 and padded_vocab_size(1) == 64
