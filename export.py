"""
Export a model of this project to the Hugging Face transformers format (config.json + model.safetensors),
the way out of this repository into the ecosystem (generation, evaluation harnesses, serving):

    dense models (n_expert=0)                        -> LlamaForCausalLM
    MoE models without gate normalization            -> MixtralForCausalLM (dropless)

    python export.py --from out/ckpt.pt --out out-hf
    python export.py --from out-dense --out out-dense-hf --dtype bfloat16

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("out-hf")

Why these two: model.py is the Llama architecture (section 2: RMSNorm, rotate-half RoPE, SwiGLU, no
biases), so a dense model is a Llama checkpoint with renamed tensors. Mixtral's sparse block is a
bias-free gate, a softmax over all E logits, the top k, the chosen probabilities renormalised to sum to
1 (our eq. 2) and SwiGLU experts named w1/w3/w2 like ours. It differs in three ways, handled here:

  - Mixtral routes every token to its k experts (dropless). A model trained with capacity_factor > 0
    dropped the (token, expert) slots over capacity; the export is that model at capacity_factor=0, so
    its logits differ where the trained model would have dropped a slot (a note says so).
  - gating logit normalization (section 4.1, eq. 6: z~ = lambda (z - mean z) / std z per token) is
    refused: the std is the token's own, so no gate matrix W gives softmax(W x) = softmax(z~), and
    Mixtral's router has nothing else to put it in.
  - Mixtral has an MoE block in every layer: moe_every > 1 is refused, and so is a nonzero
    auxiliary-loss-free selection bias (Mixtral selects by the probabilities alone).

The tokenizer is not exported: character-level datasets keep theirs in data/<dataset>/meta.json, and the
GPT-2 BPE datasets use GPT-2's (`AutoTokenizer.from_pretrained("gpt2")` where it is available).

import_hf(path) reads such a directory back (Llama through upcycle.load_llama, Mixtral here) into our
state dict and config: a round trip gives the same tensors (tests/test_export.py, which also checks
our logits against transformers' on the exported files).

Failures raise ExportError with a one-line message; main() prints it and exits 1.
"""

import argparse
import dataclasses
import json
import os
import re
import sys

import torch

import upcycle
from model import GPT, ModelConfig


class ExportError(ValueError):
    pass


# -----------------------------------------------------------------------------
# what can leave, and as what

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def exportable(cfg, state):
    """The transformers architecture cfg maps onto, and the notes a user should read; raises
    ExportError for what has no equivalent there."""
    if not cfg.n_expert:
        return "LlamaForCausalLM", []
    if cfg.gate_norm:
        raise ExportError(
            f"gate_norm=true (eq. 6, lambda={cfg.gate_lambda}) has no Mixtral equivalent: it standardises each "
            "token's gate logits by that token's own mean and std, which no gate weight matrix can express, "
            "and Mixtral's router is softmax(W x) alone. Only models trained with gate_norm=false export as Mixtral"
        )
    if cfg.moe_every != 1:
        raise ExportError(
            f"moe_every={cfg.moe_every}: Mixtral has an MoE block in every layer, this model has "
            f"dense FFNs in layers {[i for i in range(cfg.n_layer) if not cfg.is_moe_layer(i)]}"
        )
    biased = [k for k, v in state.items() if k.endswith("selection_bias_E") and v.abs().max() > 0]
    if cfg.aux_free_bias and biased:
        raise ExportError(
            f"aux_free_bias: the selection bias of {biased[0]} is nonzero, and Mixtral selects "
            "experts by the gate probabilities alone"
        )
    notes = []
    if cfg.capacity_factor:
        notes.append(
            f"capacity_factor={cfg.capacity_factor}: this model drops (token, expert) slots over "
            "capacity; Mixtral routes every token (dropless), so the export computes this model at "
            "capacity_factor=0 and its logits differ where a slot would have been dropped"
        )
    return "MixtralForCausalLM", notes


def hf_config(cfg, architecture, dtype):
    """config.json for cfg, in the keys of the published Llama / Mixtral checkpoints."""
    hf = {
        "architectures": [architecture],
        "model_type": "llama" if architecture == "LlamaForCausalLM" else "mixtral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.ffn_hidden if not cfg.n_expert else cfg.expert_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.n_embd // cfg.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "torch_dtype": {v: k for k, v in DTYPES.items()}[dtype],
        # no tokenizer is exported, so no special token ids are claimed
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "use_cache": True,
    }
    if architecture == "LlamaForCausalLM":
        hf["mlp_bias"] = False
    else:
        hf.update(
            num_local_experts=cfg.n_expert,
            num_experts_per_tok=cfg.top_k,
            sliding_window=None,
            router_jitter_noise=0.0,
            output_router_logits=False,
        )
    return hf


# -----------------------------------------------------------------------------
# tensor names: ours <-> the published layouts

LLAMA_LAYER = {  # our per-block name -> the Hugging Face name under model.layers.<i>.
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",  # the silu branch
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
}
TOP = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def hf_state(state, cfg, dtype):
    """Our state dict -> the published names. Experts (E, F, D) are split into the per-expert
    block_sparse_moe.experts.<j>.w1/w3/w2 matrices of the Mixtral checkpoints (transformers 5 fuses
    them on load; older versions read them as they are). A tied lm_head is stored once, as the
    embedding (safetensors refuses shared storage)."""
    out = {}
    for name, t in state.items():
        if name.endswith("selection_bias_E"):
            continue  # checked to be zero (or unused) by exportable
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if name in TOP:
            out[TOP[name]] = t
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        if not m:
            raise ExportError(f"tensor {name} has no place in a Llama / Mixtral checkpoint")
        prefix, rest = f"model.layers.{m.group(1)}.", m.group(2)
        if rest in LLAMA_LAYER:
            out[prefix + LLAMA_LAYER[rest]] = t
        elif rest == "ffn.router.weight":
            out[prefix + "block_sparse_moe.gate.weight"] = t
        elif e := re.fullmatch(r"ffn\.experts\.(w[123])", rest):
            for j, w in enumerate(t.unbind(0)):
                out[f"{prefix}block_sparse_moe.experts.{j}.{e.group(1)}.weight"] = w
        else:
            raise ExportError(f"tensor {name} has no place in a Llama / Mixtral checkpoint")
    return {k: v.detach().to(dtype).contiguous() for k, v in out.items()}


# -----------------------------------------------------------------------------
# export


@dataclasses.dataclass
class Exported:
    out_dir: str
    architecture: str
    notes: list
    n_params: int


def export_state(state, cfg, out_dir, dtype=torch.float32, overwrite=False):
    """Write out_dir/config.json and out_dir/model.safetensors for a model (our state dict and its
    ModelConfig). Each file is written under a temp name and renamed; on a failure none is left."""
    from safetensors.torch import save_file  # only this path needs it

    architecture, notes = exportable(cfg, state)
    tensors = hf_state(state, cfg, dtype)
    paths = {n: os.path.join(out_dir, n) for n in ("config.json", "model.safetensors")}
    existing = [p for p in paths.values() if os.path.exists(p)]
    if existing and not overwrite:
        raise ExportError(f"{existing[0]} exists: choose another --out, or pass --overwrite")
    try:
        os.makedirs(out_dir, exist_ok=True)
        save_file(tensors, paths["model.safetensors"] + ".tmp", metadata={"format": "pt"})
        with open(paths["config.json"] + ".tmp", "w") as f:
            json.dump(hf_config(cfg, architecture, dtype), f, indent=2)
            f.write("\n")
        for p in paths.values():
            os.replace(p + ".tmp", p)
    except OSError as e:
        for p in paths.values():
            if os.path.exists(p + ".tmp"):
                os.remove(p + ".tmp")
        raise ExportError(f"could not write {out_dir} ({e.strerror or e}); nothing was written") from None
    return Exported(out_dir, architecture, notes, sum(t.numel() for t in tensors.values()))


def load_model_state(source):
    """(state dict, ModelConfig) of a checkpoint file of this project, or of a run directory's ckpt.pt,
    through the project's own loader (format, checksum and shapes checked)."""
    from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint

    path = os.path.join(source, "ckpt.pt") if os.path.isdir(source) else source
    try:
        model = model_from_checkpoint(load_checkpoint(path), "cpu", path)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    return model.state_dict(), model.cfg


def export_checkpoint(source, out_dir, dtype=torch.float32, overwrite=False):
    state, cfg = load_model_state(source)
    return export_state(state, cfg, out_dir, dtype, overwrite)


# -----------------------------------------------------------------------------
# import back (the round trip; also any Mixtral-format checkpoint of plain Mixtral shape)

MIXTRAL_EXPERT = r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight"
MIXTRAL_GATE = r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight"


def read_hf_config(path):
    try:
        return upcycle.read_hf_config(path)
    except upcycle.UpcycleError as err:
        raise ExportError(str(err)) from None


def mixtral_config(path, hf, block_size=None):
    """A Mixtral config.json -> our ModelConfig: dropless, no gate normalization, Mixtral's routing.
    Variants model.py does not implement are refused, never approximated."""

    def refuse(why):
        raise ExportError(f"{path}: unsupported Mixtral variant: {why}")

    rope = hf.get("rope_parameters") or {}  # transformers >= 5 nests theta and type here
    if hf.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act={hf['hidden_act']!r} (only silu)")
    if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        refuse("RoPE scaling")
    try:
        n_embd, n_head = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        if int(hf.get("head_dim") or n_embd // n_head) * n_head != n_embd:
            refuse(f"head_dim={hf['head_dim']} with {n_head} heads != hidden_size={n_embd}")
        length = int(block_size or hf.get("max_position_embeddings", 2048))
        if hf.get("sliding_window") and int(hf["sliding_window"]) < length:
            refuse(f"sliding_window={hf['sliding_window']} < the context length {length}")
        return ModelConfig(
            **upcycle.hf_trunk(hf, rope, length, norm_eps=1e-5, rope_theta=1e6),
            n_expert=int(hf["num_local_experts"]),
            top_k=int(hf["num_experts_per_tok"]),
            expert_hidden=int(hf["intermediate_size"]),
            moe_every=1,
            capacity_factor=0.0,
            gate_norm=False,
            aux_free_bias=False,
        )
    except ExportError:
        raise
    except KeyError as e:
        raise ExportError(f"{path}/config.json lacks the field {e.args[0]!r} every Mixtral config has") from None
    except (TypeError, ValueError) as e:
        raise ExportError(f"{path}/config.json: values model.py cannot use ({e})") from None


def our_name(hf_name):
    """The published Llama / Mixtral name -> ours (experts and gates are handled by the caller)."""
    top = {v: k for k, v in TOP.items()}
    if hf_name in top:
        return top[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    layer = {v: k for k, v in LLAMA_LAYER.items()}
    if m and m.group(2) in layer:
        return f"blocks.{m.group(1)}.{layer[m.group(2)]}"
    raise ExportError(f"tensor {hf_name} has no counterpart in model.py: not a plain Mixtral checkpoint")


def load_mixtral(path, block_size=None):
    """A Mixtral-format directory (config.json + *.safetensors, per-expert w1/w2/w3 as published) ->
    (our state dict, ModelConfig); each layer's experts stacked into (E, F, D) / (E, D, F)."""
    import glob

    from safetensors import safe_open

    from checkpoint import shapes_of, state_mismatches

    cfg = mixtral_config(path, read_hf_config(path), block_size)
    shards = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not shards:
        raise ExportError(f"{path}: no *.safetensors files")
    state, experts = {}, {}
    for shard in shards:
        try:
            with safe_open(shard, framework="pt") as f:
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:  # truncated header, bad JSON: safetensors raises its own types
            raise ExportError(f"{shard} is not a readable safetensors file ({type(e).__name__}: {e})") from None
        for name, t in tensors.items():
            if m := re.fullmatch(MIXTRAL_EXPERT, name):
                experts[int(m.group(1)), m.group(3), int(m.group(2))] = t
            elif m := re.fullmatch(MIXTRAL_GATE, name):
                state[f"blocks.{m.group(1)}.ffn.router.weight"] = t
            else:
                state[our_name(name)] = t
    for i in range(cfg.n_layer):
        for w in ("w1", "w2", "w3"):
            mats = [experts.pop((i, w, j), None) for j in range(cfg.n_expert)]
            if any(m is None for m in mats):
                raise ExportError(f"{path}: layer {i} lacks some of its {cfg.n_expert} experts' {w}")
            state[f"blocks.{i}.ffn.experts.{w}"] = torch.stack(mats)
        state[f"blocks.{i}.ffn.router.selection_bias_E"] = torch.zeros(cfg.n_expert)
    if experts:
        raise ExportError(f"{path}: expert tensors beyond num_local_experts={cfg.n_expert}: {next(iter(experts))}")
    if cfg.tie_embeddings and "tok_emb.weight" in state:
        state["lm_head.weight"] = state["tok_emb.weight"]
    with torch.device("meta"):
        want = shapes_of(GPT(cfg).state_dict())
    missing, unexpected, wrong = state_mismatches(want, shapes_of(state))
    if missing or unexpected or wrong:
        raise ExportError(
            f"{path}: the tensors do not match config.json: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, other shapes {wrong[:3]}"
        )
    return state, cfg


def import_hf(path, block_size=None):
    """A Llama- or Mixtral-format directory -> (our state dict in its stored dtype, ModelConfig)."""
    hf = read_hf_config(path)
    if hf.get("model_type") == "mixtral":
        return load_mixtral(path, block_size)
    try:
        return upcycle.load_llama(path, dtype=None, block_size=block_size)
    except ValueError as e:  # UpcycleError
        raise ExportError(str(e)) from None


# -----------------------------------------------------------------------------
# command line


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--from", dest="source", required=True, help="checkpoint file, or a run directory with ckpt.pt")
    p.add_argument("--out", required=True, help="output directory (config.json + model.safetensors)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="weights' dtype in the export")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")
    args = p.parse_args(argv)
    try:
        result = export_checkpoint(args.source, args.out, DTYPES[args.dtype], args.overwrite)
    except ExportError as e:
        sys.exit(f"error: {e}")
    print(
        f"wrote {result.out_dir}/config.json and model.safetensors: {result.architecture}, "
        f"{result.n_params / 1e6:.2f}M parameters, {args.dtype}"
    )
    for note in result.notes:
        print(f"note: {note}")
    print(
        f"load it with transformers.AutoModelForCausalLM.from_pretrained({result.out_dir!r}); the tokenizer "
        "is not exported (character datasets: data/<dataset>/meta.json)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
