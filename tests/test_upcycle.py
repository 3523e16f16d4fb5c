"""
Tests of upcycle.py (Skywork-MoE section 3): the upcycled MoE computes the dense function at step 0,
Llama-format checkpoints import exactly (against transformers' LlamaForCausalLM), expert similarity
behaves as the paper describes, and bad inputs fail clearly without leaving output files.

    python -m pytest -q tests/test_upcycle.py        # ~1 minute on 2 CPU cores

transformers and safetensors are test-only dependencies (requirements-dev.txt); the Llama models are
tiny, random, built and saved here: no network.
"""

import json
import os
import shutil

import pytest
import torch

import checkpoint
import train
from model import GPT, ModelConfig, expert_similarity
from upcycle import UpcycleError, load_dense, load_llama, main, upcycle_checkpoint, upcycle_state

TINY = dict(n_layer=2, n_head=4, n_embd=64, block_size=32)  # two layers: moe_every=2 leaves layer 0 dense


def full_logits(model, idx):
    return model(idx, idx)[0]  # with targets the model returns the logits of every position


def model_from(state, cfg, dtype=torch.float32):
    model = GPT(cfg).to(dtype)
    model.load_state_dict(state)
    return model.eval()


def tokens(vocab, seed=0, shape=(4, 32)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def tiny_train_config(out_dir, data_dir, **kw):
    base = dict(
        out_dir=str(out_dir),
        data_dir=data_dir,
        batch_size=4,
        eval_iters=1,
        log_interval=2,
        warmup_iters=1,
        learning_rate=2e-3,
        min_lr=2e-4,
    )
    return train.TrainConfig(**{**base, **kw})


# -----------------------------------------------------------------------------
# a dense checkpoint trained a few steps (shared by the tests below)


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory, char_data_dir):
    torch.set_num_threads(1)  # 2 cores shared with other jobs: small matmuls run best on one
    out = tmp_path_factory.mktemp("dense")
    train.train(ModelConfig(n_expert=0, **TINY), tiny_train_config(out, char_data_dir, max_iters=4, eval_interval=4))
    return str(out / "ckpt.pt")


@pytest.fixture(scope="module")
def dense(dense_ckpt):
    state, cfg, _ = load_dense(dense_ckpt)
    return state, cfg


# -----------------------------------------------------------------------------
# acceptance 1: function preservation


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("n_expert", [4, 8])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("moe_every", [1, 2], ids=["all-layers", "every-other"])
@pytest.mark.parametrize("capacity", ["dropless", "ample"])
def test_upcycled_moe_computes_the_dense_function(dense, dtype, tol, n_expert, top_k, moe_every, capacity):
    state, cfg = dense
    # "ample": C = ceil(cf * T * K / E) >= T, so even a router sending every token to one expert drops none
    cf = 0.0 if capacity == "dropless" else n_expert / top_k
    moe_state, moe_cfg = upcycle_state(state, cfg, n_expert, top_k, moe_every, capacity_factor=cf, seed=1)
    assert moe_cfg.moe_layer_ids == ([0, 1] if moe_every == 1 else [1])
    idx = tokens(cfg.vocab_size)
    dense_model, moe_model = model_from(state, cfg, dtype), model_from(moe_state, moe_cfg, dtype)
    with torch.no_grad():
        want = full_logits(dense_model, idx)
        got, _, routers = moe_model(idx, idx)
    assert all(r.drop_rate.item() == 0 for r in routers)
    # the routers really choose different experts for different tokens: the equality is not trivial
    assert all(len(r.ids_TK[:, 0].unique()) > 1 for r in routers)
    err = (got - want).abs().max().item()
    assert err < tol, f"max abs logit error {err:.3g} >= {tol}"


def test_capacity_drops_break_function_preservation_exactly_where_slots_drop(dense):
    """With capacity_factor 0.5 about half the (token, expert) slots are dropped. A dropped slot adds
    nothing (the residual carries the token), so each token's MoE output is the dense FFN output scaled
    by the sum of its *kept* combine weights: 1 when nothing dropped, 0 when everything did."""
    state, cfg = dense
    moe_state, moe_cfg = upcycle_state(state, cfg, 4, 2, capacity_factor=0.5, seed=1)
    dense_model = model_from(state, cfg, torch.float64)
    moe_model = model_from(moe_state, moe_cfg, torch.float64)
    h = torch.randn(1, 64, cfg.n_embd, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want_TD = dense_model.blocks[0].ffn(h)[0]
        y, r = moe_model.blocks[0].ffn(h)
    kept_weight_T = (r.weights_TK * r.keep_TK).sum(-1).to(torch.float64)
    assert 0.2 < r.drop_rate.item() < 0.8
    assert (
        (kept_weight_T == 0).any()
        and (kept_weight_T > 0.999).any()
        and ((kept_weight_T > 0) & (kept_weight_T < 0.999)).any()
    )
    assert torch.allclose(y[0], kept_weight_T[:, None] * want_TD, rtol=0, atol=1e-12)

    idx = tokens(cfg.vocab_size)
    with torch.no_grad():
        err = (full_logits(moe_model, idx) - full_logits(dense_model, idx)).abs().max().item()
    assert err > 1e-3  # the whole model no longer equals the dense one


def test_upcycle_state_is_pure_and_seeded(dense):
    state, cfg = dense
    before = {k: v.clone() for k, v in state.items()}
    a, moe_cfg = upcycle_state(state, cfg, 4, 2, seed=3)
    b, _ = upcycle_state(state, cfg, 4, 2, seed=3)
    c, _ = upcycle_state(state, cfg, 4, 2, seed=4)
    assert all(torch.equal(state[k], before[k]) for k in state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.ffn.router.weight"], c["blocks.0.ffn.router.weight"])
    assert a["blocks.0.attn.wq.weight"] is state["blocks.0.attn.wq.weight"]  # shared, not copied
    w1 = a["blocks.1.ffn.experts.w1"]
    assert w1.shape == (4, cfg.ffn_hidden, cfg.n_embd) and w1.is_contiguous()
    assert all(torch.equal(w1[e], state["blocks.1.ffn.w1.weight"]) for e in range(4))
    assert moe_cfg.expert_hidden == cfg.ffn_hidden and moe_cfg.n_expert == 4 and moe_cfg.top_k == 2


def test_noise_perturbs_expert_copies_relative_to_their_scale(dense):
    state, cfg = dense
    noisy, moe_cfg = upcycle_state(state, cfg, 4, 2, noise_std=0.01, capacity_factor=0.0, seed=0)
    dense_w = state["blocks.0.ffn.w1.weight"]
    diff = noisy["blocks.0.ffn.experts.w1"] - dense_w
    assert abs(diff.std().item() / dense_w.std().item() - 0.01) < 0.001
    sims = expert_similarity(model_from(noisy, moe_cfg))
    assert all(0.99 < s < 0.99995 for s in sims)


# -----------------------------------------------------------------------------
# acceptance 2: Llama-format import against transformers


def save_tiny_llama(path, n_kv_head, tied, shard=True):
    """A tiny random LlamaForCausalLM saved as safetensors (several shards with an index, or one file).
    Norm weights are randomised too, so a swapped norm would show in the logits."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=n_kv_head,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        tie_word_embeddings=tied,
        hidden_act="silu",
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(path, safe_serialization=True, max_shard_size="40KB" if shard else "100MB")
    return hf


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama") / "tiny-llama")
    save_tiny_llama(path, n_kv_head=2, tied=False)
    return path


@pytest.mark.parametrize("n_kv_head", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_llama_import_matches_transformers_then_upcycles(tmp_path, n_kv_head, tied):
    path = str(tmp_path / "llama")
    hf = save_tiny_llama(path, n_kv_head, tied, shard=not tied)  # tied ones as a single file, no index
    assert (len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1) == (not tied)
    state, cfg = load_llama(path)
    assert (cfg.kv_heads, cfg.tie_embeddings, cfg.norm_eps, cfg.rope_theta) == (n_kv_head, tied, 1e-5, 50000.0)
    idx = tokens(97, shape=(2, 24))
    with torch.no_grad():
        want = hf(idx).logits
        ours = model_from(state, cfg)
        err_dense = (full_logits(ours, idx) - want).abs().max().item()
        if tied:
            assert ours.lm_head.weight is ours.tok_emb.weight
        moe_state, moe_cfg = upcycle_state(state, cfg, 4, 2, capacity_factor=0.0)
        err_moe = (full_logits(model_from(moe_state, moe_cfg), idx) - want).abs().max().item()
    assert err_dense < 1e-4, f"dense import: max abs logit error {err_dense:.3g}"
    assert err_moe < 1e-4, f"upcycled import: max abs logit error {err_moe:.3g}"


def test_llama_cli_writes_a_checkpoint_train_py_loads(llama_dir, tmp_path, capsys):
    out = tmp_path / "moe"
    main(
        [
            "--from",
            llama_dir,
            "--n_expert",
            "4",
            "--top_k",
            "2",
            "--capacity_factor",
            "0",
            "--block_size",
            "32",
            "--out",
            str(out),
        ]
    )
    assert "expert similarity 1.000 1.000" in capsys.readouterr().out
    ckpt = checkpoint.load_checkpoint(str(out / "ckpt.pt"))
    model = checkpoint.model_from_checkpoint(ckpt).eval()
    assert model.cfg.block_size == 32 and model.cfg.n_expert == 4 and model.cfg.kv_heads == 2
    state, cfg = load_llama(llama_dir)
    idx = tokens(97, shape=(2, 24))
    with torch.no_grad():
        assert (full_logits(model, idx) - full_logits(model_from(state, cfg), idx)).abs().max() < 1e-5


def edited_llama(llama_dir, tmp_path, **changes):
    path = str(tmp_path / "edited")
    shutil.copytree(llama_dir, path)
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    hf.update(changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)
    return path


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"mlp_bias": True}, "mlp_bias=true"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope scaling"),
        ({"model_type": "mistral"}, "model_type='mistral'"),
        ({"head_dim": 32}, "head_dim=32"),
        ({"intermediate_size": 128}, "do not match the config"),
        ({"num_key_value_heads": 4}, "do not match the config"),
    ],
    ids=["gelu", "attn-bias", "mlp-bias", "rope-linear", "rope-llama3", "mistral", "head-dim", "ffn-shape", "kv-shape"],
)
def test_llama_unsupported_variants_and_mismatched_configs_are_refused(llama_dir, tmp_path, changes, message):
    path = edited_llama(llama_dir, tmp_path, **changes)
    out = tmp_path / "out"
    with pytest.raises(UpcycleError, match=message):
        upcycle_checkpoint(path, str(out / "ckpt.pt"), 4, 2)
    assert not out.exists()


def test_llama_broken_files_are_refused(llama_dir, tmp_path):
    from safetensors.torch import save_file

    out = str(tmp_path / "out" / "ckpt.pt")
    shards = sorted(f for f in os.listdir(llama_dir) if f.endswith(".safetensors"))

    missing = edited_llama(llama_dir, tmp_path / "a")
    os.remove(os.path.join(missing, shards[-1]))
    with pytest.raises(UpcycleError, match="are missing"):
        upcycle_checkpoint(missing, out, 4, 2)

    corrupt = edited_llama(llama_dir, tmp_path / "b")
    with open(os.path.join(corrupt, shards[0]), "r+b") as f:
        f.truncate(100)
    with pytest.raises(UpcycleError, match="not a readable safetensors file"):
        upcycle_checkpoint(corrupt, out, 4, 2)

    biased = edited_llama(llama_dir, tmp_path / "c")
    save_file({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, os.path.join(biased, "extra.safetensors"))
    os.remove(os.path.join(biased, "model.safetensors.index.json"))  # read every *.safetensors, extra included
    with pytest.raises(UpcycleError, match="biases are not supported"):
        upcycle_checkpoint(biased, out, 4, 2)

    with open(os.path.join(biased, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(UpcycleError, match="not a readable JSON file"):
        upcycle_checkpoint(biased, out, 4, 2)
    assert not os.path.exists(os.path.dirname(out))


# -----------------------------------------------------------------------------
# acceptance 3: expert similarity


def test_expert_similarity_is_one_after_upcycling_and_near_zero_from_scratch(dense):
    state, cfg = dense
    moe_state, moe_cfg = upcycle_state(state, cfg, 8, 2)
    assert all(abs(s - 1.0) < 1e-6 for s in expert_similarity(model_from(moe_state, moe_cfg)))
    torch.manual_seed(0)
    scratch = expert_similarity(GPT(moe_cfg))
    assert all(abs(s) < 0.02 for s in scratch)


def test_expert_similarity_decreases_while_training_the_upcycled_model(dense_ckpt, tmp_path, char_data_dir):
    """A short CPU run from the upcycled checkpoint through train.py's init_from; train.py logs the
    similarity in each eval line of metrics.jsonl. The copies see different tokens, so they drift apart."""
    up = upcycle_checkpoint(dense_ckpt, str(tmp_path / "moe" / "ckpt.pt"), 4, 2)
    assert up.expert_similarity == pytest.approx([1.0, 1.0], abs=1e-6)
    run = tmp_path / "run"
    tcfg = tiny_train_config(run, char_data_dir, init_from=up.path, max_iters=6, eval_interval=2)
    train.train(ModelConfig(), tcfg)
    with open(run / "metrics.jsonl") as f:
        sims = [rec["expert_similarity"] for rec in map(json.loads, f) if "expert_similarity" in rec]
    assert len(sims) == 4  # iterations 0, 2, 4, 6
    assert sims[0] == pytest.approx([1.0, 1.0], abs=1e-6)
    for layer in range(2):
        series = [s[layer] for s in sims]
        assert all(b < a for a, b in zip(series, series[1:])), series
        assert series[-1] < 0.99


# -----------------------------------------------------------------------------
# acceptance 4: bad inputs fail clearly and leave nothing behind


def test_an_moe_checkpoint_is_refused(tmp_path):
    cfg = ModelConfig(n_expert=4, top_k=2, **TINY)
    src = str(tmp_path / "moe.pt")
    checkpoint.save_checkpoint(src, model_state=GPT(cfg).state_dict(), model_cfg=cfg, train_cfg=train.TrainConfig())
    out = tmp_path / "out"
    with pytest.raises(UpcycleError, match="already an MoE"):
        upcycle_checkpoint(src, str(out / "ckpt.pt"), 8, 2)
    with pytest.raises(UpcycleError, match="is not dense"):
        upcycle_checkpoint(src, str(out / "ckpt.pt"), 0, 2)
    assert not out.exists()


def test_missing_and_corrupt_checkpoints_are_refused(dense_ckpt, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UpcycleError, match="not found"):
        upcycle_checkpoint(str(tmp_path / "nope.pt"), str(out / "ckpt.pt"), 4, 2)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(dense_ckpt, "rb").read()[:5000])
    for bad in (garbage, truncated):
        with pytest.raises(UpcycleError, match="not a readable checkpoint"):
            upcycle_checkpoint(str(bad), str(out / "ckpt.pt"), 4, 2)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(UpcycleError, match="not a checkpoint of this project"):
        upcycle_checkpoint(str(foreign), str(out / "ckpt.pt"), 4, 2)
    with pytest.raises(UpcycleError, match="neither ckpt.pt nor config.json"):
        upcycle_checkpoint(str(tmp_path), str(out / "ckpt.pt"), 4, 2)
    assert not out.exists()


def test_a_config_that_does_not_describe_the_weights_is_refused(dense_ckpt, tmp_path):
    ckpt = torch.load(dense_ckpt, weights_only=False)
    ckpt["model_config"]["ffn_hidden"] = 128  # the weights are 192 wide
    ckpt["checksum"] = checkpoint.payload_checksum(ckpt)  # an intact file, as another version would write it
    src = str(tmp_path / "edited.pt")
    torch.save(ckpt, src)
    out = tmp_path / "out"
    with pytest.raises(UpcycleError, match=r"ffn\.w1\.weight: holds \(192, 64\), the config implies \(128, 64\)"):
        upcycle_checkpoint(src, str(out / "ckpt.pt"), 4, 2)
    assert not out.exists()


@pytest.mark.parametrize(
    "n_expert,top_k,kw,message",
    [
        (2, 4, {}, "top_k=4 with n_expert=2"),
        (0, 2, {"capacity_factor": 0.0}, "n_expert=0 imports"),
        (-1, 1, {}, "n_expert=-1"),
        (4, 2, {"moe_every": 3}, "moe_every=3 > n_layer=2 leaves no MoE layer"),
        (4, 2, {"n_embd": 32}, "cannot change when upcycling"),
        (4, 2, {"noise_std": -0.1}, "noise_std=-0.1"),
        (4, 2, {"gate_lambda": 0.0}, "gate_lambda=0.0"),
    ],
)
def test_bad_upcycling_arguments_are_refused(dense_ckpt, tmp_path, n_expert, top_k, kw, message):
    out = tmp_path / "out"
    with pytest.raises(UpcycleError, match=message):
        upcycle_checkpoint(dense_ckpt, str(out / "ckpt.pt"), n_expert, top_k, **kw)
    assert not out.exists()


def test_a_failed_write_leaves_no_file_and_no_directory(dense_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "new" / "dir"

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        upcycle_checkpoint(dense_ckpt, str(out / "ckpt.pt"), 4, 2)
    assert not (tmp_path / "new").exists()


def test_cli_errors_exit_nonzero_and_never_overwrite(dense_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["--from", dense_ckpt, "--n_expert", "1", "--top_k", "2", "--out", str(out)])
    assert e.value.code == 1 and "error: top_k=2 with n_expert=1" in capsys.readouterr().err
    assert not out.exists()
    main(["--from", os.path.dirname(dense_ckpt), "--n_expert", "4", "--top_k", "2", "--out", str(out)])
    first = (out / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit):
        main(["--from", dense_ckpt, "--n_expert", "8", "--top_k", "2", "--out", str(out)])
    assert "exists" in capsys.readouterr().err and (out / "ckpt.pt").read_bytes() == first
    main(["--from", dense_ckpt, "--n_expert", "8", "--top_k", "2", "--out", str(out), "--overwrite"])
    assert checkpoint.load_checkpoint(str(out / "ckpt.pt"))["model_config"]["n_expert"] == 8
    assert sorted(os.listdir(out)) == ["ckpt.pt"]
