"""
Upcycling: turn a dense checkpoint into a Mixture-of-Experts checkpoint (Skywork-MoE section 3,
after sparse upcycling, Komatsuzaki et al. 2022). Every dense FFN is copied into all experts of its
layer; attention, norms and embeddings are copied; each router is new (random, seeded). With identical
experts and top-k weights that are renormalised to sum to 1 (eq. 2), the MoE computes exactly the dense
function at step 0, as long as no token is dropped by capacity. Training then lets the copies drift
apart; their average pairwise cosine similarity (model.expert_similarity) is the paper's health metric.

The dense source is either a checkpoint of this project (train.py with n_expert=0) or a Llama-format
directory (config.json + *.safetensors shards, as published for SmolLM, TinyLlama, Skywork-13B).

    python upcycle.py --from out-dense/ckpt.pt --n_expert 8 --top_k 2 --out out-moe
    python upcycle.py --from out-dense --n_expert 8 --top_k 2 --moe_every 2 --noise_std 0.01 --out out-moe
    python upcycle.py --from ~/models/SmolLM-135M --n_expert 8 --top_k 2 --block_size 256 --out out-smol-moe
    python upcycle.py --from ~/models/SmolLM-135M --n_expert 0 --out out-smol      # import only (dense)
    python train.py --init_from=out-moe/ckpt.pt --out_dir=out-moe-run --learning_rate=1.2e-3 ...

The written out/ckpt.pt starts a new run through train.py's `init_from=<path>`: weights and model
config from the checkpoint, a fresh optimizer, and the run's own LR schedule (the paper's variants:
re-warmed cosine with a chosen peak, `lr_schedule=cosine`, or the dense run's final LR held constant,
`lr_schedule=constant warmup_iters=0`, which was the worst).

API (pure functions; experiments/ and notebooks/ call these):
    upcycle_state(dense_state, dense_cfg, n_expert, top_k, moe_every=1, noise_std=0.0, seed=0,
                  **moe_options) -> (moe_state, moe_cfg)
        moe_options: capacity_factor, gate_norm, gate_lambda, aux_loss, aux_free_bias (routing) and
        block_size, dropout (shape-free); anything else is refused.
    load_llama(path, dtype=torch.float32, block_size=None) -> (dense_state, dense_cfg)
    load_dense(source, dtype=None, block_size=None) -> (dense_state, dense_cfg, train_config or None)
    upcycle_checkpoint(source, out_path, n_expert, top_k, ..., overwrite=False) -> Upcycled
        writes a checkpoint train.py accepts as init_from (n_expert=0: a plain import, no upcycling)
    expert similarity lives in one place, model.expert_similarity(model): one float per MoE layer.

Every failure raises UpcycleError with a message that says what to do, and leaves no output file.
Names follow model.py: the dense MLP's w1/w3 (F, D) and w2 (D, F) become Experts.w1/w3 (E, F, D) and
w2 (E, D, F), so upcycling is a broadcast copy.
"""

import argparse
import dataclasses
import glob
import json
import os
import re
import sys

import torch

from checkpoint import CheckpointError, load_checkpoint, model_view, save_checkpoint, shapes_of, state_mismatches
from model import GPT, ModelConfig, expert_similarity


class UpcycleError(ValueError):
    pass


# -----------------------------------------------------------------------------
# a state dict against the config that claims to describe it


def expected_shapes(cfg):
    """{name: shape} of GPT(cfg)'s state dict, from a meta-device model (no memory, any size)."""
    with torch.device("meta"):
        return shapes_of(GPT(cfg).state_dict())


def check_state(state, cfg, what):
    """Raise UpcycleError unless state has exactly GPT(cfg)'s names and shapes."""
    missing, unexpected, wrong = state_mismatches(expected_shapes(cfg), shapes_of(state))
    wrong = [f"{k}: holds {h}, the config implies {w}" for k, h, w in wrong]
    if missing or unexpected or wrong:
        shown = "; ".join(
            [f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in unexpected[:3]] + wrong[:3]
        )
        dims = (
            f"n_layer={cfg.n_layer} n_embd={cfg.n_embd} n_head={cfg.n_head} n_kv_head={cfg.n_kv_head} "
            f"ffn_hidden={cfg.ffn_hidden} vocab_size={cfg.vocab_size} n_expert={cfg.n_expert}"
        )
        raise UpcycleError(
            f"{what}: the weights do not match the config ({dims}): {shown}. "
            "The config must describe these weights; was it edited, or taken from another run?"
        )


# -----------------------------------------------------------------------------
# dense state -> MoE state (section 3)

ROUTING_OPTIONS = ("capacity_factor", "gate_norm", "gate_lambda", "aux_loss", "aux_free_bias")
RUN_OPTIONS = ("block_size", "dropout")  # shape-free fields a new run may change


def moe_config(dense_cfg, n_expert, top_k, moe_every=1, **moe_options):
    """The MoE config of an upcycled dense config: same shapes, experts as wide as the dense FFN."""
    if dense_cfg.n_expert != 0:
        raise UpcycleError(
            f"the source is already an MoE (n_expert={dense_cfg.n_expert}): upcycling starts "
            "from a dense model (n_expert=0); train a dense run or import a Llama-format one"
        )
    if n_expert < 1:
        raise UpcycleError(f"n_expert={n_expert}: an upcycled MoE needs n_expert >= 1 (the paper uses 8 or 16)")
    if not 1 <= top_k <= n_expert:
        raise UpcycleError(
            f"top_k={top_k} with n_expert={n_expert}: top_k must be in [1, n_expert] "
            "(a token cannot visit more experts than there are)"
        )
    unknown = sorted(set(moe_options) - set(ROUTING_OPTIONS + RUN_OPTIONS))
    if unknown:
        raise UpcycleError(
            f"option(s) {unknown} cannot change when upcycling: allowed are "
            f"{ROUTING_OPTIONS + RUN_OPTIONS}; shapes always come from the dense model"
        )
    fields = {
        **dataclasses.asdict(dense_cfg),
        "n_expert": n_expert,
        "top_k": top_k,
        "moe_every": moe_every,
        "expert_hidden": dense_cfg.ffn_hidden,
        **moe_options,
    }
    if n_expert == 1 and "gate_norm" not in moe_options:
        fields["gate_norm"] = False  # eq. 6 needs >= 2 logits; one expert has nothing to normalise
    try:
        cfg = ModelConfig(**fields)
    except ValueError as e:
        raise UpcycleError(f"invalid MoE config: {e}") from None  # moe_every > n_layer included
    return cfg


def upcycle_state(dense_state, dense_cfg, n_expert, top_k, moe_every=1, noise_std=0.0, seed=0, **moe_options):
    """Dense state dict -> (MoE state dict, MoE config). Pure: the input is not modified.

    - MoE layers: dense ffn.w1/w3/w2 broadcast into experts.w1/w3/w2 (contiguous copies, so the experts
      can diverge in training); optional Gaussian noise per expert copy with std noise_std times the
      std of the dense matrix (relative, so 0.01 means a 1 % perturbation at any model scale; sparse
      upcycling found small noise harmless, large noise harmful). noise_std=0 keeps the model's function.
    - routers: fresh N(0, init_std) weights from a torch.Generator seeded with seed (the paper: "router
      new (random)"); the aux-free selection bias starts at 0.
    - every other tensor (attention, norms, embeddings, dense FFNs of non-MoE layers): the same tensor
      object as in the input, not a copy (load_state_dict copies it into a model).
    Tensors keep the dense state's dtype and device.
    """
    cfg = moe_config(dense_cfg, n_expert, top_k, moe_every, **moe_options)
    check_state(dense_state, dense_cfg, "dense state")
    if noise_std < 0:
        raise UpcycleError(f"noise_std={noise_std} must be >= 0 (0: identical expert copies)")
    gen = torch.Generator().manual_seed(seed)
    ref = dense_state["tok_emb.weight"]
    moe_state = {}
    # walk the MoE model's names in order, so the random draws (router, then noise) follow a fixed order
    for name, shape in expected_shapes(cfg).items():
        m = re.fullmatch(r"blocks\.(\d+)\.ffn\.(experts\.(w[123])|router\.weight|router\.selection_bias_E)", name)
        if m is None:
            moe_state[name] = dense_state[name]
        elif m.group(3):  # an expert weight: E copies of the dense one
            dense_w = dense_state[f"blocks.{m.group(1)}.ffn.{m.group(3)}.weight"]
            w = dense_w.unsqueeze(0).repeat(n_expert, 1, 1)
            if noise_std > 0:
                scale = noise_std * dense_w.double().std().item()
                w += scale * torch.randn(w.shape, generator=gen, dtype=torch.float64).to(w)
            moe_state[name] = w
        elif name.endswith("router.weight"):
            moe_state[name] = (cfg.init_std * torch.randn(shape, generator=gen, dtype=torch.float64)).to(ref)
        else:
            moe_state[name] = torch.zeros(shape, device=ref.device)
    return moe_state, cfg


# -----------------------------------------------------------------------------
# Llama-format import (config.json + *.safetensors, the Hugging Face layout)

LLAMA_MODEL_TYPES = ("llama", "skywork")  # Skywork-13B is a Llama with its own model_type
LLAMA_NAMES = [  # Hugging Face name (regex) -> model.py name; the rotate-half RoPE layout matches
    (r"model\.embed_tokens\.weight", "tok_emb.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "blocks.{}.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "blocks.{}.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", "blocks.{}.attn.wq.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", "blocks.{}.attn.wk.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", "blocks.{}.attn.wv.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "blocks.{}.attn.wo.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "blocks.{}.ffn.w1.weight"),  # silu branch
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "blocks.{}.ffn.w3.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "blocks.{}.ffn.w2.weight"),
]
LLAMA_IGNORED = r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"  # old checkpoints store RoPE tables


def is_llama_dir(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def read_hf_config(path):
    """A Hugging Face directory's config.json as a dict (UpcycleError if it is not one)."""
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UpcycleError(f"{cfg_path} is not a readable JSON file ({e})") from None
    if not isinstance(hf, dict):
        raise UpcycleError(f"{cfg_path} does not hold a JSON object")
    return hf


def hf_trunk(hf, rope, block_size, norm_eps, rope_theta):
    """The ModelConfig fields a Llama-family config.json (Llama, Mixtral) sets: vocabulary, context,
    attention with its key/value heads, FFN width, norms, RoPE, tying, init. norm_eps / rope_theta:
    the family's defaults where the file leaves them out."""
    n_embd, n_head = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    n_kv = int(hf.get("num_key_value_heads") or n_head)
    return dict(
        vocab_size=int(hf["vocab_size"]),
        block_size=int(block_size or hf.get("max_position_embeddings", 2048)),
        n_layer=int(hf["num_hidden_layers"]),
        n_head=n_head,
        n_kv_head=0 if n_kv == n_head else n_kv,
        n_embd=n_embd,
        ffn_hidden=int(hf["intermediate_size"]),
        norm_eps=float(hf.get("rms_norm_eps", norm_eps)),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", rope_theta))),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),  # LlamaConfig's default: untied
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def read_llama_config(path, block_size=None):
    """config.json -> dense ModelConfig; unsupported variants are refused, never silently approximated."""
    hf, cfg_path = read_hf_config(path), os.path.join(path, "config.json")

    def refuse(why):
        raise UpcycleError(
            f"{path}: unsupported Llama variant: {why}. model.py implements the plain Llama "
            "architecture only (SwiGLU, RMSNorm, RoPE without scaling, no biases)"
        )

    if hf.get("model_type") not in LLAMA_MODEL_TYPES:
        refuse(f"model_type={hf.get('model_type')!r}, expected one of {LLAMA_MODEL_TYPES}")
    if hf.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act={hf['hidden_act']!r} (only silu, i.e. SwiGLU)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            refuse(f"{key}=true (model.py's linear layers have no bias)")
    rope = hf.get("rope_parameters") or {}  # transformers >= 5 nests theta and type here
    if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        refuse(f"rope scaling {hf.get('rope_scaling') or rope} (only plain RoPE)")
    if hf.get("quantization_config"):
        refuse("quantized weights (import the unquantized checkpoint)")
    try:
        n_embd, n_head = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim") or n_embd // n_head
        if head_dim * n_head != n_embd:
            refuse(f"head_dim={head_dim} with {n_head} heads != hidden_size={n_embd}")
        cfg = ModelConfig(**hf_trunk(hf, rope, block_size, norm_eps=1e-6, rope_theta=10000.0), n_expert=0)
    except KeyError as e:
        raise UpcycleError(f"{cfg_path} lacks the field {e.args[0]!r} every Llama config has") from None
    except (TypeError, ValueError) as e:
        raise UpcycleError(f"{cfg_path}: values model.py cannot use ({e})") from None
    return cfg


def llama_shards(path):
    """The *.safetensors files to read: those the index names, else every one in the directory."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError) as e:
            raise UpcycleError(f"{index} is not a readable shard index ({type(e).__name__}: {e})") from None
        shards = [os.path.join(path, n) for n in names]
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise UpcycleError(
                f"{path}: shard(s) {[os.path.basename(s) for s in missing]} named in "
                f"{os.path.basename(index)} are missing: download the complete checkpoint"
            )
        return shards
    shards = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not shards:
        raise UpcycleError(
            f"{path}: no *.safetensors files (PyTorch .bin checkpoints are not read: "
            "load and re-save them with safe_serialization=True)"
        )
    return shards


def map_llama_name(hf_name):
    for pattern, ours in LLAMA_NAMES:
        m = re.fullmatch(pattern, hf_name)
        if m:
            return ours.format(*m.groups())
    if re.fullmatch(LLAMA_IGNORED, hf_name):
        return None
    if hf_name.endswith(".bias"):
        raise UpcycleError(f"tensor {hf_name}: biases are not supported (model.py's layers are bias-free)")
    raise UpcycleError(f"tensor {hf_name} has no counterpart in model.py: not a plain Llama checkpoint")


def load_llama(path, dtype=torch.float32, block_size=None):
    """Llama-format directory -> (dense state dict, dense ModelConfig), streamed one shard at a time:
    each tensor is read from the memory-mapped shard and converted once, so the model is never held
    twice. dtype: what the weights become (float32 for training here; None keeps the stored dtype).
    block_size: the context length of the runs that follow (default: max_position_embeddings)."""
    from safetensors import safe_open  # imported here: only this path needs it

    cfg = read_llama_config(path, block_size)
    state, seen = {}, {}
    for shard in llama_shards(path):
        try:
            with safe_open(shard, framework="pt") as f:
                for hf_name in f.keys():
                    ours = map_llama_name(hf_name)
                    if ours is None:
                        continue
                    if ours in state:
                        raise UpcycleError(f"tensor {hf_name} appears in both {seen[ours]} and {shard}")
                    t = f.get_tensor(hf_name)
                    state[ours], seen[ours] = (t if dtype is None else t.to(dtype)), shard
        except UpcycleError:
            raise
        except Exception as e:  # truncated header, bad JSON, wrong magic: safetensors raises its own types
            raise UpcycleError(
                f"{shard} is not a readable safetensors file ({type(e).__name__}: {e}); re-download it"
            ) from None
    if cfg.tie_embeddings:
        # a tied model stores one matrix; some exports also write lm_head: the embedding is the truth
        if "tok_emb.weight" in state:
            state["lm_head.weight"] = state["tok_emb.weight"]
    elif "lm_head.weight" not in state:
        raise UpcycleError(f"{path}: no lm_head.weight but tie_word_embeddings is false in config.json")
    check_state(state, cfg, f"Llama checkpoint {path}")
    return state, cfg


# -----------------------------------------------------------------------------
# either kind of dense source


def load_dense(source, dtype=None, block_size=None):
    """A checkpoint file of this project, a run directory holding ckpt.pt, or a Llama-format directory
    -> (state dict, ModelConfig, the run's train config dict or None)."""
    if is_llama_dir(source):
        state, cfg = load_llama(source, torch.float32 if dtype is None else dtype, block_size)
        return state, cfg, None
    path = os.path.join(source, "ckpt.pt") if os.path.isdir(source) else source
    if os.path.isdir(source) and not os.path.isfile(path):
        raise UpcycleError(
            f"{source} is a directory with neither ckpt.pt nor config.json: pass a checkpoint "
            "file of this project or a Llama-format directory"
        )
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise UpcycleError(str(e)) from None
    try:
        cfg = ModelConfig(**ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise UpcycleError(f"{path}: its model config is not valid for this model.py ({e})") from None
    if block_size:
        cfg = dataclasses.replace(cfg, block_size=block_size)
    state = ckpt["model"]
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    return state, cfg, ckpt.get("train_config")


# -----------------------------------------------------------------------------
# writing a checkpoint train.py's init_from accepts


def model_on_state(state, cfg):
    """GPT(cfg) whose parameters are the tensors of state (train.model_view: meta device, then
    assigned), after checking every name and shape: no second copy of the weights."""
    check_state(state, cfg, "upcycled state")
    return model_view(cfg, state)


def write_checkpoint(out_path, model, cfg, train_cfg):
    """save_checkpoint (temp file + rename), and on any failure remove the temp file and the directory
    this call created, so nothing half-written is left behind."""
    parent = os.path.dirname(os.path.abspath(out_path))
    created = []
    d = parent
    while not os.path.exists(d):
        created.append(d)
        d = os.path.dirname(d)
    try:
        os.makedirs(parent, exist_ok=True)
        save_checkpoint(out_path, model_state=model.state_dict(), model_cfg=cfg, train_cfg=train_cfg)
    except BaseException:
        if os.path.exists(out_path + ".tmp"):
            os.remove(out_path + ".tmp")
        for d in created:  # innermost first
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
        raise


def provenance_train_config(train_config, source):
    """The dense run's train config (so sample.py finds its tokenizer) with init_from naming the source."""
    return {**(train_config or {}), "init_from": os.path.abspath(source)}


@dataclasses.dataclass
class Upcycled:
    """What upcycle_checkpoint wrote."""

    path: str
    config: ModelConfig
    expert_similarity: list  # per MoE layer, right after upcycling (1.0 without noise)
    param_counts: dict  # {"total", "active"}
    dense_train_config: dict  # the dense run's train config (None for a Llama import)


def upcycle_checkpoint(
    source,
    out_path,
    n_expert,
    top_k,
    moe_every=1,
    noise_std=0.0,
    seed=0,
    dtype=None,
    block_size=None,
    overwrite=False,
    **moe_options,
):
    """Load a dense source (see load_dense), upcycle it (upcycle_state) and write out_path: a checkpoint
    at iteration 0 without optimizer state, for train.py's init_from. n_expert=0 writes the dense model
    as is (a Llama import). Returns an Upcycled record."""
    if os.path.exists(out_path) and not overwrite:
        raise UpcycleError(f"{out_path} exists: choose another --out or pass --overwrite")
    if n_expert == 0 and (moe_options or moe_every != 1 or noise_std):
        raise UpcycleError("n_expert=0 imports the dense model as is: MoE options make no sense with it")
    state, cfg, train_config = load_dense(source, dtype, block_size)
    if n_expert == 0 and cfg.n_expert != 0:
        raise UpcycleError(f"{source} is not dense (n_expert={cfg.n_expert}): n_expert=0 imports dense models")
    if n_expert != 0:
        state, cfg = upcycle_state(state, cfg, n_expert, top_k, moe_every, noise_std, seed, **moe_options)
    model = model_on_state(state, cfg)
    write_checkpoint(out_path, model, cfg, provenance_train_config(train_config, source))
    return Upcycled(out_path, cfg, expert_similarity(model), model.param_counts(), train_config)


# -----------------------------------------------------------------------------
# command line


def parse_args(argv):
    p = argparse.ArgumentParser(description="Upcycle a dense checkpoint (ours or Llama-format) into an MoE.")
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        help="dense checkpoint file, run directory with ckpt.pt, or Llama-format directory",
    )
    p.add_argument("--out", required=True, help="output directory (writes OUT/ckpt.pt) or a .pt file path")
    p.add_argument("--n_expert", type=int, required=True, help="experts per MoE layer (0: import only)")
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--moe_every", type=int, default=1, help="1: every layer MoE; 2: every other (1, 3, ...)")
    p.add_argument("--noise_std", type=float, default=0.0, help="noise on expert copies, relative to each matrix's std")
    p.add_argument("--seed", type=int, default=0, help="seeds the routers (and the noise)")
    p.add_argument("--capacity_factor", type=float, help="0 = dropless (default: model.py's)")
    p.add_argument("--gate_norm", choices=("true", "false"), help="gating logit normalization, eq. 6")
    p.add_argument("--gate_lambda", type=float)
    p.add_argument("--aux_loss", choices=("eq4", "switch", "none"))
    p.add_argument("--aux_free_bias", choices=("true", "false"))
    p.add_argument("--block_size", type=int, help="context length of the runs that follow")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float64"),
        help="weights' dtype (default: float32 for Llama imports, as stored for ours)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output checkpoint")
    return p.parse_args(argv)


def main(argv):
    args = parse_args(argv)
    out_path = args.out if args.out.endswith(".pt") else os.path.join(args.out, "ckpt.pt")
    options = {k: getattr(args, k) for k in ROUTING_OPTIONS if getattr(args, k) is not None}
    options = {k: (v == "true") if v in ("true", "false") else v for k, v in options.items()}
    try:
        result = upcycle_checkpoint(
            args.source,
            out_path,
            args.n_expert,
            args.top_k,
            args.moe_every,
            args.noise_std,
            args.seed,
            getattr(torch, args.dtype) if args.dtype else None,
            args.block_size,
            args.overwrite,
            **options,
        )
    except UpcycleError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # disk full, permissions: write_checkpoint has removed what it had started
        print(f"error: {e} (nothing was written to {out_path})", file=sys.stderr)
        sys.exit(1)
    cfg, counts = result.config, result.param_counts
    print(f"wrote {out_path}: {counts['total'] / 1e6:.2f}M parameters, {counts['active'] / 1e6:.2f}M active")
    if not cfg.n_expert:
        print(
            f"dense import: n_layer={cfg.n_layer} n_embd={cfg.n_embd} n_head={cfg.n_head} "
            f"n_kv_head={cfg.kv_heads} vocab_size={cfg.vocab_size}"
        )
        return
    print(
        f"{cfg.n_expert} experts top-{cfg.top_k} on layers {cfg.moe_layer_ids}; expert similarity "
        + " ".join(f"{s:.3f}" for s in result.expert_similarity)
    )
    if cfg.capacity_factor:
        print(
            f"note: capacity_factor={cfg.capacity_factor} drops tokens over capacity, so the MoE equals the "
            "dense model only where nothing is dropped (--capacity_factor 0 is dropless)"
        )
    tc = result.dense_train_config or {}
    peak, floor = tc.get("learning_rate"), tc.get("min_lr")
    rewarm = f"{0.4 * peak:.2g}" if peak else "PEAK"  # the paper re-warmed to 0.4-0.6x the dense peak
    final = f"{floor:.2g}" if floor else "DENSE_FINAL_LR"
    run = f"python train.py --init_from={out_path} --out_dir={os.path.dirname(out_path) or '.'}-run"
    print(
        "continue training (section 3; a fresh optimizer and schedule), e.g.\n"
        f"  re-warmed cosine: {run} --lr_schedule=cosine --learning_rate={rewarm} --min_lr={final}\n"
        f"  constant LR:      {run} --lr_schedule=constant --learning_rate={final} --warmup_iters=0"
        "   (the paper's worst)"
    )
    if not peak:
        print("  PEAK: about 0.4-0.6x the dense run's peak LR; DENSE_FINAL_LR: the LR the dense run ended at")


if __name__ == "__main__":
    main(sys.argv[1:])
