"""
A Llama-style decoder (as in Skywork-13B: pre-norm RMSNorm, RoPE, SwiGLU, no biases, untied
embeddings) whose feed-forward layers can be Mixture-of-Experts layers (Skywork-MoE, section 2).

Read top to bottom: config, the dense pieces (RMSNorm, rotary attention, SwiGLU MLP), the experts and
the MoE layer (router -> dispatch -> experts -> combine), the Block, the GPT, and its accounting.

    python model.py config/skywork_moe.toml     # print total / active parameter counts (meta device)

Shape legend: B batch, L sequence, D model dim, T = B*L tokens, E experts, K top-k, F expert hidden,
N kept (token, expert) slots; see router.py for the routing tensors.
"""

import dataclasses
import difflib
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ConfigError, check_settings, load_config, setting
from router import Router, RouterOutput, full_fp32_matmul

# -----------------------------------------------------------------------------
# config


@dataclass
class ModelConfig:
    # the defaults are the tiny CPU model of the quick start (config/shakespeare_char.toml); each numeric
    # setting's valid range is declared with it, as in TrainConfig: setting(default, lowest, highest)
    vocab_size: int = setting(65, 1, 1 << 24)  # set from the dataset's meta.json by train.py
    block_size: int = setting(64, 1, 1 << 20)  # context length
    n_layer: int = setting(4, 1, 1024)
    n_head: int = setting(4, 1, 1024)
    n_kv_head: int = setting(0, 0, 1024)  # grouped-query attention: 0 means n_head (plain multi-head)
    n_embd: int = setting(128, 2, 1 << 17)
    ffn_hidden: int = setting(0, 0, 1 << 20)  # dense SwiGLU hidden size; 0 means 8/3 * n_embd rounded to 64
    dropout: float = setting(0.0, 0.0, 0.99)
    norm_eps: float = setting(1e-6, 1e-12, 0.1)  # RMSNorm eps (Skywork: 1e-6)
    rope_theta: float = setting(10000.0, 1.0, 1e12)
    tie_embeddings: bool = False  # Skywork and Llama: untied; some small Llama-format models tie
    init_std: float = setting(0.02, 1e-6, 1.0)  # Skywork-MoE uses 0.01 at 146B scale
    # --- Mixture-of-Experts (n_expert = 0: a dense model)
    n_expert: int = setting(8, 0, 4096)
    top_k: int = setting(2, 1, 4096)
    expert_hidden: int = setting(0, 0, 1 << 20)  # per-expert hidden size; 0 means ffn_hidden
    moe_every: int = setting(1, 1, 1024)  # 1: every FFN is MoE (Skywork-MoE); 2: every other layer (1, 3, ...)
    capacity_factor: float = setting(1.25, 0.0, 1e4)  # C = ceil(cf * T * K / E) per expert and group; 0 = dropless
    gate_norm: bool = True  # gating logit normalization, eq. 6
    gate_lambda: float = setting(1.0, 1e-6, 1e3)  # lambda of eq. 6 (paper: 1; tried 0.5, 1, 2)
    # "switch" (n sum f P), "eq4" (Skywork's form, ~30x weaker: router.py), "none"
    aux_loss: str = setting("switch", choices=("switch", "eq4", "none"))
    aux_free_bias: bool = False  # auxiliary-loss-free balancing bias on the selection scores

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise ValueError(msg)

        need(
            self.vocab_size > 0 and self.block_size > 0 and self.n_layer > 0,
            "vocab_size, block_size and n_layer must be > 0",
        )
        need(
            self.n_head > 0 and self.n_embd % self.n_head == 0,
            f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}",
        )
        need(
            (self.n_embd // self.n_head) % 2 == 0,
            f"head dim n_embd/n_head={self.n_embd // self.n_head} must be even for RoPE",
        )
        need(
            self.n_kv_head >= 0 and self.n_head % max(self.n_kv_head, 1) == 0,
            f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head} (0 = n_head)",
        )
        need(0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must be in [0, 1)")
        need(
            self.ffn_hidden >= 0 and self.expert_hidden >= 0,
            "ffn_hidden and expert_hidden must be >= 0 (0 = default size)",
        )
        need(self.n_expert >= 0, f"n_expert={self.n_expert} must be >= 0 (0 = dense model)")
        if self.n_expert:
            need(1 <= self.top_k <= self.n_expert, f"top_k={self.top_k} must be in [1, n_expert={self.n_expert}]")
            need(self.moe_every >= 1, f"moe_every={self.moe_every} must be >= 1 (1 = every layer, 2 = every other)")
            need(
                self.capacity_factor is None or self.capacity_factor >= 0,
                f"capacity_factor={self.capacity_factor} must be >= 0 (0 = dropless)",
            )
            need(self.gate_lambda > 0, f"gate_lambda={self.gate_lambda} must be > 0 (paper: 1; tried 0.5, 1, 2)")
            need(
                not self.gate_norm or self.n_expert >= 2,
                "gate_norm needs n_expert >= 2 (the std over one logit is undefined): set gate_norm=false",
            )
            need(
                self.aux_loss in ("eq4", "switch", "none"), f"aux_loss={self.aux_loss!r}: use 'eq4', 'switch' or 'none'"
            )
            # moe_every > n_layer would leave every layer dense: a dense model trained as if it were MoE
            need(
                self.moe_every <= self.n_layer,
                f"moe_every={self.moe_every} > n_layer={self.n_layer} leaves no MoE layer: "
                "lower moe_every, or set n_expert=0 for a dense model",
            )
        check_settings(self)  # every declared range (non-finite values included), before the sizes below
        if self.ffn_hidden == 0:
            self.ffn_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64)
        if self.expert_hidden == 0:
            self.expert_hidden = self.ffn_hidden

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    def is_moe_layer(self, i):
        # every other layer counts from the second (1, 3, 5, ...), as in GShard / Switch
        return self.n_expert > 0 and (i + 1) % self.moe_every == 0

    @property
    def moe_layer_ids(self):
        return [i for i in range(self.n_layer) if self.is_moe_layer(i)]


def padded_vocab_size(vocab_size, multiple=64):
    """A BPE vocabulary rounded up to a multiple of 64 (GPT-2's 50,257 -> 50,304), the embedding's and
    lm_head's row count. The extra ids never occur in the data, so their logits only learn to stay
    low; what it buys is an embedding and lm_head whose row count GPU matmul kernels tile without a
    ragged edge (nanoGPT's choice). Meant for BPE vocabularies: a 65-symbol character vocabulary gains
    nothing from it."""
    return multiple * math.ceil(vocab_size / multiple)


# -----------------------------------------------------------------------------
# dense pieces


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32: bf16 squares lose the small entries
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim, length, theta, device=None):
    """cos/sin of the rotary angles, (L, head_dim/2), computed in fp32 (not stored in the state dict)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x_BHLd, cos, sin):
    # the Llama "rotate half" layout: pairs (i, i + d/2), so imported Llama weights need no permutation
    d2 = x_BHLd.shape[-1] // 2
    x1, x2 = x_BHLd[..., :d2], x_BHLd[..., d2:]
    cos, sin = cos.to(x_BHLd.dtype), sin.to(x_BHLd.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.kv_heads
        self.head_dim = cfg.n_embd // cfg.n_head
        self.wq = nn.Linear(cfg.n_embd, cfg.n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * self.head_dim, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x_BLD, cos, sin):
        B, L, _ = x_BLD.shape
        q = self.wq(x_BLD).view(B, L, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, L, d)
        k = self.wk(x_BLD).view(B, L, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, L, d)
        v = self.wv(x_BLD).view(B, L, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            enable_gqa=self.n_kv_head != self.n_head,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.wo(y.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), the Llama naming the experts below copy."""

    def __init__(self, n_embd, hidden):
        super().__init__()
        self.w1 = nn.Linear(n_embd, hidden, bias=False)
        self.w3 = nn.Linear(n_embd, hidden, bias=False)
        self.w2 = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# -----------------------------------------------------------------------------
# experts and the MoE layer


class Experts(nn.Module):
    """E SwiGLU experts as stacked weights named like the dense MLP: w1, w3 (E, F, D) and w2 (E, D, F),
    so upcycling is a broadcast copy of MLP.w1/w3/w2.

    forward takes tokens already sorted by expert (x_ND) and how many belong to each (counts_E), and
    runs each expert on its contiguous slice of rows: the weights are never gathered per token.
    This (x_ND, counts_E) -> y_ND call is the seam expert parallelism replaces with an all-to-all
    around the experts a rank owns.

    Three implementations of the same arithmetic (bench.py compares them):
      forward_loop     one matmul per expert in a Python loop, backward by autograd: the readable
                       reference; any dtype (the float64 tests), autocast and torch.compile. One host
                       sync to read the split sizes (none when the caller holds them: counts_host)
      SwiGLUExperts    (impl "manual") the same loop with its backward written out: outputs written
                       in place, scratch reused from expert to expert, a and b the only activations saved
      forward_grouped  torch's grouped matmul, one call per weight for all experts, no host sync of
                       its own; see grouped_mm_dtype for where it runs
    impl = "auto": on a GPU, grouped where grouped_mm_dtype says it runs well, else the loop (without
    grouped_mm's fast kernels torch runs it as a loop that syncs on every call). On a CPU, grouped for
    small experts and the manual loop for large ones (CPU_GROUPED_MAX_WEIGHT), the loop under autocast
    or torch.compile. "loop" / "manual" / "grouped" force one (bench.py, tests).
    """

    def __init__(self, n_expert, n_embd, hidden):
        super().__init__()
        # zeros, not torch.empty: a layer built outside GPT holds defined values until its weights are
        # drawn (GPT.init_weights), and zeros take nothing from the RNG, so GPT's draws are unchanged
        self.w1 = nn.Parameter(torch.zeros(n_expert, hidden, n_embd))
        self.w3 = nn.Parameter(torch.zeros(n_expert, hidden, n_embd))
        self.w2 = nn.Parameter(torch.zeros(n_expert, n_embd, hidden))
        self.impl = "auto"

    def compute_dtype(self, x_ND):
        """The dtype the experts compute in: autocast's (bf16 under train.py's CUDA autocast) where
        it applies, else x's. model.MoE casts the rows to it before dispatch, so the gathered rows and
        the expert-parallel exchanges carry bf16, not the fp32 residual stream."""
        device = x_ND.device.type
        if x_ND.is_floating_point() and torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return x_ND.dtype

    def choose_impl(self, x_ND):
        """impl="auto" resolved for these rows: ("loop" | "manual" | "grouped", grouped_mm's dtype)."""
        if self.impl == "loop" or x_ND.shape[0] == 0:  # grouped_mm's backward rejects zero rows
            return "loop", None
        dtype = grouped_mm_dtype(x_ND, self.w1, require_fast=self.impl == "auto")
        if self.impl == "grouped" and dtype is None:
            raise ValueError(
                f"grouped_mm does not run on {x_ND.device.type} {x_ND.dtype} with D, F = "
                f"{self.w1.shape[2]}, {self.w1.shape[1]}: use impl='loop'"
            )
        if self.impl == "manual" and x_ND.dtype != self.w1.dtype:
            raise ValueError(f"impl='manual' needs rows in the weights' dtype, not {x_ND.dtype}: use impl='loop'")
        if self.impl != "auto":
            return self.impl, dtype
        if x_ND.device.type != "cpu":
            return ("grouped", dtype) if dtype is not None else ("loop", None)
        if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
            return "loop", None
        if dtype is not None and self.w1[0].numel() < CPU_GROUPED_MAX_WEIGHT:
            return "grouped", dtype
        return "manual", None

    def forward(self, x_ND, counts_E, counts_host=None):
        impl, dtype = self.choose_impl(x_ND)
        if impl == "grouped":
            return self.forward_grouped(x_ND, counts_E, dtype)
        if impl == "manual":  # choose_impl gives zero rows to the loop
            if counts_host is None:
                counts_host = counts_E.tolist()  # host sync: the split sizes
            return SwiGLUExperts.apply(x_ND, self.w1, self.w3, self.w2, counts_host)
        return self.forward_loop(x_ND, counts_E, counts_host)

    def forward_loop(self, x_ND, counts_E, counts_host=None):
        # unbind, not self.w1[e]: each indexing op's backward writes a zero gradient the size of
        # all E experts; unbind's backward stacks the E slices once
        if counts_host is None:
            counts_host = counts_E.tolist()  # host sync: the split sizes
        ys = []
        for x, w1, w3, w2 in zip(x_ND.split(counts_host), self.w1.unbind(0), self.w3.unbind(0), self.w2.unbind(0)):
            if x.shape[0]:
                ys.append((F.silu(x @ w1.t()) * (x @ w3.t())) @ w2.t())
        if ys:
            return torch.cat(ys)
        # no rows at all: zeros in the dtype the experts would have returned (autocast's)
        return x_ND.new_zeros(x_ND.shape, dtype=self.compute_dtype(x_ND))

    def forward_grouped(self, x_ND, counts_E, dtype, fuse_w13=None):
        """fuse_w13: one grouped matmul for w1 and w3 on the stacked [w1; w3] (E, 2F, D) weight instead
        of two. It needs a copy of both weights per call, which the bf16 path makes anyway (the cast),
        so None means: fuse when casting. In float32 on a CPU the extra copy and the strided halves
        cost more than the second call saves (bench.py --fusion measures it)."""
        if fuse_w13 is None:
            fuse_w13 = self.w1.dtype != dtype
        end_E = counts_E.cumsum(0).to(torch.int32)  # where each expert's rows end; stays on the device
        x_ND = x_ND.to(dtype)
        w2_EFD = self.w2.to(dtype).transpose(1, 2)
        if fuse_w13:
            E, hidden, D = self.w1.shape
            # the cast writes straight into the stacked weight: one copy of each weight, as unfused
            w13_EFD = x_ND.new_empty(E, 2 * hidden, D)
            w13_EFD[:, :hidden].copy_(self.w1)
            w13_EFD[:, hidden:].copy_(self.w3)
            a_NF, b_NF = F.grouped_mm(x_ND, w13_EFD.transpose(1, 2), offs=end_E).split(hidden, dim=1)
        else:
            w1_EDF, w3_EDF = self.w1.to(dtype).transpose(1, 2), self.w3.to(dtype).transpose(1, 2)
            a_NF, b_NF = F.grouped_mm(x_ND, w1_EDF, offs=end_E), F.grouped_mm(x_ND, w3_EDF, offs=end_E)
        y_ND = F.grouped_mm(F.silu(a_NF) * b_NF, w2_EFD, offs=end_E)
        if y_ND.requires_grad:
            # grouped_mm's backward needs a dense gradient: y.sum().backward() would hand it an
            # expanded (stride 0) one and fail with "Invalid strides/sizes"
            y_ND.register_hook(torch.Tensor.contiguous)
        return y_ND


class SwiGLUExperts(torch.autograd.Function):
    """Experts' impl "manual": forward_loop's arithmetic with the backward written out. Per expert e,
    on its n rows x (n, D), with s = silu(a):
        forward    a = x w1_e^T,  b = x w3_e^T,  h = s * b,  y = h w2_e^T
        backward   dw2_e = dy^T h,  dh = dy w2_e,  db = dh * s,  da = silu'(a) * dh * b,
                   dw1_e = da^T x,  dw3_e = db^T x,  dx = da w1_e + db w3_e
    What autograd's loop does on top of the same nine matmuls, this one does not: concatenate the E
    outputs and stack the E weight gradients (each result is written into its slice of one tensor),
    allocate fresh (n, F) temporaries per expert (one scratch set is reused; on a CPU fresh memory
    costs page faults), and save s and h besides a and b (they are recomputed). a and b are saved per
    expert, not as slices of one (N, F) tensor: glibc's malloc serves blocks over 32 MB with a fresh
    mmap, page-faulted in on every step (92 MB at E = 8, T = 8192: about 26 ms of faults), while one
    expert's blocks come back from its heap (3-4 % of the layer at T = 8192, E = 8, 16, 64). On a
    CPU, T = 8192, D = 512 (bench.py (a), (d), (e)): as fast as forward_loop at E = 8 and 16, faster at
    E = 64, and the layer saves 0.70x the dense layer's activations, not 1.27x.
    counts_host: the rows per expert, a list."""

    @staticmethod
    def forward(ctx, x_ND, w1, w3, w2, counts_host):
        y_ND = torch.empty_like(x_ND)
        scratch = x_ND.new_empty(max(counts_host) * w1.shape[1])
        ab = []  # a_0, b_0, a_1, b_1, ...: (n_e, F) each
        for e, rows in enumerate(row_slices(counts_host)):
            x = x_ND[rows]
            a, b = x @ w1[e].t(), x @ w3[e].t()
            h = torch.ops.aten.silu.out(a, out=scratch[: a.numel()].view_as(a)).mul_(b)
            torch.mm(h, w2[e].t(), out=y_ND[rows])
            ab += [a, b]
        ctx.save_for_backward(x_ND, w1, w3, w2, *ab)
        ctx.counts_host = counts_host
        return y_ND

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_ND):
        x_ND, w1, w3, w2, *ab = ctx.saved_tensors
        dy_ND = dy_ND.contiguous()
        dx_ND, dw1, dw3, dw2 = (torch.empty_like(t) for t in (x_ND, w1, w3, w2))
        s_buf, h_buf, dh_buf = (x_ND.new_empty(max(ctx.counts_host) * w1.shape[1]) for _ in range(3))
        for e, rows in enumerate(row_slices(ctx.counts_host)):
            x, a, b, dy = x_ND[rows], ab[2 * e], ab[2 * e + 1], dy_ND[rows]
            if x.shape[0] == 0:  # an expert without rows gets exactly zero gradient
                for dw in (dw1, dw3, dw2):
                    dw[e].zero_()
                continue
            s = torch.ops.aten.silu.out(a, out=s_buf[: a.numel()].view_as(a))
            h = torch.mul(s, b, out=h_buf[: a.numel()].view_as(a))
            torch.mm(dy.t(), h, out=dw2[e])
            dh = torch.mm(dy, w2[e], out=dh_buf[: a.numel()].view_as(a))
            db = torch.mul(dh, s, out=h)  # h is spent
            da = torch.ops.aten.silu_backward.grad_input(dh.mul_(b), a, grad_input=s)  # s is spent
            torch.mm(da.t(), x, out=dw1[e])
            torch.mm(db.t(), x, out=dw3[e])
            torch.mm(da, w1[e], out=dx_ND[rows]).addmm_(db, w3[e])
        return dx_ND, dw1, dw3, dw2, None


def row_slices(counts):
    """The slices of rows sorted by group, from the rows per group (a list)."""
    start = 0
    for n in counts:
        yield slice(start, start + n)
        start += n


# On a CPU, "auto" takes grouped_mm for experts with fewer weights than this (D * F of one matrix) and
# the manual loop for larger ones: with small matrices one expert's matmuls are too small to run near
# the peak alone, and grouped_mm's single call wins; with large ones the loop's elementwise ops run on
# one expert's slice while it is still in cache, where grouped_mm's run over all N x F at once.
# Measured (2 threads, fwd+bwd, grouped / manual time): D = 128 (F = 192, 384): 0.83-0.95 at 128-512
# rows per expert; D = 256 (F = 704): 1.04-1.16 at 128-512 rows; D = 512 (F = 1408): 1.04-1.22.
CPU_GROUPED_MAX_WEIGHT = 1 << 17

# WeightedCombine's chunk: 1,024 slots of D = 512 in float32 are 2 MiB, the L2 of the 2-core CPU measured on.
COMBINE_ROWS = 1024

# grouped_mm's fast CUDA kernels exist for Hopper (sm90: H100, H200) and datacenter Blackwell (sm100:
# B200) only. On other GPUs (A100 sm80, L40S / RTX 4090 sm89, sm120) torch runs it as a loop over
# the groups that reads every offset on the host, one sync per call: slower than forward_loop.
GROUPED_MM_FAST_CAPABILITIES = ((9, 0), (10, 0))


def grouped_mm_dtype(x_ND, w_EFD, require_fast=True):
    """The dtype torch.nn.functional.grouped_mm runs these experts in, or None where the loop should:
      - CUDA: bfloat16 (x in bf16, or bf16 autocast on; forward_grouped casts the inputs itself),
        on the capabilities of GROUPED_MM_FAST_CAPABILITIES; elsewhere only if not require_fast
        (impl="grouped" forces it; it needs sm80+);
      - CPU: float32 without autocast (CPU autocast leaves grouped_mm in float32), not float64, so
        the exactness tests take the loop, and not under torch.compile (its grouped_mm takes bf16 only).
    Rows of x, h and the weights must be 16-byte aligned: D and F multiples of 4 in float32, of 8 in
    bfloat16."""
    device = x_ND.device.type
    if device == "cuda":
        capability = torch.cuda.get_device_capability(x_ND.device)
        runs = capability in GROUPED_MM_FAST_CAPABILITIES or (not require_fast and capability >= (8, 0))
        bf16 = x_ND.dtype == torch.bfloat16 or (
            torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
        )
        if not (runs and bf16):
            return None
        dtype = torch.bfloat16
    elif (
        device == "cpu"
        and x_ND.dtype == w_EFD.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    ):
        dtype = torch.float32
    else:
        return None
    aligned = all(n * dtype.itemsize % 16 == 0 for n in w_EFD.shape[1:])  # F and D
    return dtype if aligned else None


class WeightedCombine(torch.autograd.Function):
    """MoE's combine on a CPU: y_TD[t] = sum over t's kept slots n of weight_N[n] * y_ND[n] (eq. 2's
    weighted sum), the same expression as the plain index_add in MoE.forward, done in chunks of
    `chunk` slots so that each chunk's weighted rows are added while still in cache, and with the
    backward in one pass per chunk (gather dy's rows, the weights' gradient dy . y, then scale them).
    Autograd makes three full passes over N x D for it, each into fresh memory."""

    @staticmethod
    def forward(ctx, y_ND, weight_N, token_N, T, chunk=COMBINE_ROWS):
        N = y_ND.shape[0]
        chunks = [chunk] * (N // chunk) + [N % chunk]
        y_TD = y_ND.new_zeros(T, y_ND.shape[1])
        for rows in row_slices(chunks):
            y_TD.index_add_(0, token_N[rows], y_ND[rows] * weight_N[rows, None])
        ctx.save_for_backward(y_ND, weight_N, token_N)
        ctx.chunks = chunks
        return y_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_TD):
        y_ND, weight_N, token_N = ctx.saved_tensors
        dy_ND, dweight_N = torch.empty_like(y_ND), torch.empty_like(weight_N)
        for rows in row_slices(ctx.chunks):
            dy = torch.index_select(dy_TD, 0, token_N[rows], out=dy_ND[rows])
            torch.sum(dy * y_ND[rows], 1, out=dweight_N[rows])
            dy.mul_(weight_N[rows, None])
        return dy_ND, dweight_N, None, None, None


class MoE(nn.Module):
    """Router -> dispatch (gather kept tokens in expert order) -> experts -> combine (weighted
    index_add back to token positions). A dropped (token, expert) slot adds nothing: the block's
    residual carries the token past the layer (Switch Transformer convention)."""

    def __init__(self, cfg):
        super().__init__()
        self.router = Router(
            cfg.n_embd,
            cfg.n_expert,
            cfg.top_k,
            cfg.capacity_factor,
            cfg.gate_norm,
            cfg.gate_lambda,
            cfg.aux_loss,
            cfg.aux_free_bias,
        )
        self.experts = Experts(cfg.n_expert, cfg.n_embd, cfg.expert_hidden)

    def forward(self, x_BLD, n_group=1):
        B, L, D = x_BLD.shape
        x_TD = x_BLD.reshape(B * L, D)
        r: RouterOutput = self.router(x_TD, n_group)
        T = x_TD.shape[0]
        token_N = r.slots_N % T  # slot s = k*T + t  ->  token t
        weight_N = r.weights_TK.t().reshape(-1)[r.slots_N]  # combine weight of each kept slot (eq. 2)
        # the rows in the experts' compute dtype before they are gathered (bf16 under autocast, where
        # x_TD is the fp32 residual stream): half the bytes to gather and to send under expert parallelism
        x_TD = x_TD.to(self.experts.compute_dtype(x_TD))
        # index_select rather than x_TD[token_N]: same rows, but its backward is an index_add,
        # ~2x faster on CPU than indexing's accumulating index_put
        y_ND = self.experts(x_TD.index_select(0, token_N), r.counts_E)
        # combine in the experts' dtype (bf16 under autocast, like the dense MLP's output)
        weight_N = weight_N.to(y_ND.dtype)
        if y_ND.device.type == "cpu" and not torch.compiler.is_compiling():
            y_TD = WeightedCombine.apply(y_ND, weight_N, token_N, T)
        else:  # one pass: a GPU wants few launches, and inductor fuses the product into the index_add
            y_TD = y_ND.new_zeros(T, D).index_add_(0, token_N, y_ND * weight_N.unsqueeze(1))
        return y_TD.view(B, L, D), r


# -----------------------------------------------------------------------------
# the transformer


class Block(nn.Module):
    def __init__(self, cfg, layer_id):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_id)
        self.ffn = MoE(cfg) if self.is_moe else MLP(cfg.n_embd, cfg.ffn_hidden)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, n_group=1):
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin))
        if self.is_moe:
            h, r = self.ffn(self.ffn_norm(x), n_group)
        else:
            h, r = self.ffn(self.ffn_norm(x)), None
        return x + self.dropout(h), r


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                nn.init.normal_(p, mean=0.0, std=std)
            # GPT-2 style: the projections that add into the residual stream get std / sqrt(2 n_layer)
            if name.endswith(("attn.wo.weight", "ffn.w2.weight", "experts.w2")):
                p.mul_(1.0 / math.sqrt(2 * self.cfg.n_layer))
        for b in self.buffers():
            b.zero_()

    def forward(self, idx_BL, targets_BL=None, n_group=1):
        """Returns (logits, loss, router_outputs): loss is the plain cross entropy (None without
        targets); the balance losses are in router_outputs (one RouterOutput per MoE layer) and are
        weighted by the training loop's coefficients (router.balance_loss). n_group splits the batch
        into routing groups with their own capacity and balance loss (see expert_parallel.py)."""
        B, L = idx_BL.shape
        if L > self.cfg.block_size:
            raise ValueError(f"sequence length {L} > block_size {self.cfg.block_size}")
        cos, sin = rope_tables(self.cfg.n_embd // self.cfg.n_head, L, self.cfg.rope_theta, idx_BL.device)
        x = self.tok_emb(idx_BL)
        router_outputs = []
        for block in self.blocks:
            x, r = block(x, cos, sin, n_group)
            if r is not None:
                router_outputs.append(r)
        x = self.norm(x)
        if targets_BL is None:
            return self.lm_head(x[:, [-1], :]), None, router_outputs
        logits = self.lm_head(x)
        # the loss in fp32, or wider: an fp64 model stays fp64 end to end (the expert-parallel tests)
        ce_dtype = torch.promote_types(logits.dtype, torch.float32)
        loss = F.cross_entropy(logits.to(ce_dtype).view(-1, logits.size(-1)), targets_BL.reshape(-1), ignore_index=-1)
        return logits, loss, router_outputs

    @torch.no_grad()
    def generate(self, idx_BL, max_new_tokens, temperature=1.0, top_k=None, generator=None, n_tokens=None):
        """Autoregressive sampling (no KV cache: this is a teaching model). Dropless routing at
        inference would differ from training's capacity; we keep the trained config as is. n_tokens:
        the tokenizer's vocabulary, when the model's is padded (padded_vocab_size): ids beyond it are
        never sampled."""
        for _ in range(max_new_tokens):
            ctx = idx_BL[:, -self.cfg.block_size :]
            logits, _, _ = self(ctx)
            logits = logits[:, -1, :n_tokens] / max(temperature, 1e-8)
            if top_k is not None:
                v = logits.topk(min(top_k, logits.size(-1))).values
                logits[logits < v[:, [-1]]] = -float("inf")
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            idx_BL = torch.cat([idx_BL, nxt], dim=1)
        return idx_BL

    # -------------------------------------------------------------------------
    # accounting: the model knows its own sizes

    def param_counts(self):
        """Total parameters, and active ones (what one token touches: k of E experts per MoE layer).
        A tied lm_head/embedding is counted once."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for block in self.blocks:
            if block.is_moe:
                per_expert = sum(p[0].numel() for p in block.ffn.experts.parameters())
                inactive += per_expert * (self.cfg.n_expert - self.cfg.top_k)
        return {"total": total, "active": total - inactive}

    def flops_per_token(self):
        """Training FLOPs per token, PaLM appendix B: 6 N + 12 n_layer n_head head_dim L, N = active
        parameters that do matmuls (the input embedding is a lookup, so it is left out unless tied)."""
        n = self.param_counts()["active"]
        if not self.cfg.tie_embeddings:
            n -= self.tok_emb.weight.numel()
        c = self.cfg
        return 6 * n + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.block_size

    def optim_groups(self, weight_decay, router_weight_decay=None):
        """AdamW groups: decay matrices (attention, experts, router, embeddings); not norms.
        router_weight_decay: the gate weights' own decay (None: weight_decay). Decay shrinks the gate's
        logits, which is one suspect for the drift toward a flat gate of section 4.1."""
        decay, no_decay, router = [], [], []
        for name, p in self.named_parameters():
            if router_weight_decay is not None and name.endswith("router.weight"):
                router.append(p)
            else:
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if router:
            groups.append({"params": router, "weight_decay": router_weight_decay})
        return groups


@torch.no_grad()
def expert_similarity(model, chunk=1 << 20):
    """Average pairwise cosine similarity of the experts' flattened weights (w1, w3, w2), one number
    per MoE layer: 1.0 right after upcycling (identical copies), ~0 for independently initialised
    experts. Skywork-MoE section 3 reads its decay as a health metric of an upcycled run.

    train.py calls it at every eval, so it never copies a layer's experts: the (E, E) Gram matrix of
    dot products is accumulated in fp32 over slices of chunk columns (E * chunk floats of scratch)."""
    sims = []
    for block in model.blocks:
        if not block.is_moe:
            continue
        ex = block.ffn.experts
        E = ex.w1.shape[0]
        gram_EE = torch.zeros(E, E, device=ex.w1.device)
        with full_fp32_matmul():
            for w in (ex.w1, ex.w3, ex.w2):
                for part_EC in w.detach().flatten(1).split(chunk, dim=1):
                    part_EC = part_EC.float()
                    gram_EE += part_EC @ part_EC.t()
        norm_E = gram_EE.diagonal().sqrt().clamp_min(1e-12)
        sim_EE = gram_EE / (norm_E[:, None] * norm_E[None, :])
        sims.append(((sim_EE.sum() - sim_EE.diagonal().sum()) / (E * (E - 1))).item())
    return sims


def count_params_meta(cfg: ModelConfig):
    """Parameter counts of a config without allocating its weights (146B fit in no memory here)."""
    with torch.device("meta"):
        return GPT(cfg).param_counts()


def main(argv):
    try:
        (model_cfg,), sources = load_config(argv, [ModelConfig], ignore_unknown=True)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    for key in sources.get(None, []):  # train.py's settings pass; a near miss of a model setting does not
        near = difflib.get_close_matches(key, fields, n=1, cutoff=0.8)
        if near:
            sys.exit(f"config error: unknown config key {key!r}; did you mean {near[0]!r}?")
    if sources.get(None):
        print(f"(not model settings, ignored here: {', '.join(sources[None])})")
    counts = count_params_meta(model_cfg)
    print(f"total parameters:  {counts['total'] / 1e9:.3f} B ({counts['total']:,})")
    print(f"active parameters: {counts['active'] / 1e9:.3f} B ({counts['active']:,})")


if __name__ == "__main__":
    main(sys.argv[1:])
