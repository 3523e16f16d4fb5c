"""export.py: our models as Hugging Face transformers checkpoints, checked against transformers itself.

For dense models (Llama) and MoE models (Mixtral, dropless): transformers' logits on the exported files
equal ours to 1e-4 in float32, and importing the export back gives the same tensors. Models that have
no transformers equivalent (gate normalization, dense layers between MoE layers, a selection bias) are
refused with the reason.

    python -m pytest -q tests/test_export.py
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, one_stderr_line
from export import ExportError, export_state, import_hf
from model import GPT, ModelConfig

transformers = pytest.importorskip("transformers")  # in requirements-dev.txt: never skipped after install

VOCAB = 59  # the committed sample's character vocabulary
VARIANTS = {
    "dense": dict(n_expert=0),
    "dense-gqa-tied": dict(n_expert=0, n_kv_head=2, tie_embeddings=True),
    "moe-dropless": dict(n_expert=8, top_k=2, gate_norm=False, capacity_factor=0.0),
    "moe-capacity": dict(n_expert=4, top_k=1, gate_norm=False, capacity_factor=1.0, rope_theta=500.0),
}


def tiny(**kw):
    # init_std 0.1: logits of order 1 and a router that makes real choices, so a wrong mapping shows
    base = dict(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, n_embd=64, init_std=0.1)
    return ModelConfig(**{**base, **kw})


def model_of(cfg, seed=0):
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def our_logits(model, idx):
    with torch.no_grad():
        return model(idx, idx)[0]  # with targets: the logits of every position


def hf_logits(out_dir, idx):
    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return type(hf).__name__, hf(idx).logits


@pytest.mark.parametrize("name", VARIANTS)
def test_transformers_computes_our_logits_and_the_import_gives_our_weights(tmp_path, name):
    cfg = tiny(**VARIANTS[name])
    model = model_of(cfg)
    result = export_state(model.state_dict(), cfg, str(tmp_path))
    idx = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    # the export is dropless: compare with our model at capacity_factor=0
    dropless = GPT(dataclasses.replace(cfg, capacity_factor=0.0)).eval()
    dropless.load_state_dict(model.state_dict())
    arch, theirs = hf_logits(str(tmp_path), idx)
    ours = our_logits(dropless, idx)
    assert arch == result.architecture == ("LlamaForCausalLM" if not cfg.n_expert else "MixtralForCausalLM")
    assert ours.abs().max() > 1.0  # logits big enough for 1e-4 to mean something
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)

    state, back = import_hf(str(tmp_path))
    want = model.state_dict()
    assert set(state) == set(want)
    assert all(torch.equal(state[k], want[k]) for k in want), [k for k in want if not torch.equal(state[k], want[k])]
    assert back == (cfg if not cfg.n_expert else dataclasses.replace(cfg, capacity_factor=0.0))
    if cfg.n_expert and cfg.capacity_factor:
        # the trained model drops slots over capacity; Mixtral does not: the note says so, and the
        # logits do differ (which also shows the comparison above can fail)
        assert any("dropless" in n for n in result.notes)
        assert (our_logits(model, idx) - theirs).abs().max() > 1e-2


def test_exported_files_are_what_transformers_publishes(tmp_path):
    cfg = tiny(**VARIANTS["moe-dropless"])
    export_state(model_of(cfg).state_dict(), cfg, str(tmp_path), dtype=torch.bfloat16)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["model_type"] == "mixtral" and hf["num_local_experts"] == 8 and hf["num_experts_per_tok"] == 2
    assert hf["torch_dtype"] == "bfloat16" and hf["intermediate_size"] == cfg.expert_hidden
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.1.block_sparse_moe.experts.7.w2.weight").dtype == torch.bfloat16
    # the per-expert layout of the published Mixtral checkpoints: 2 layers x 8 experts x 3 matrices
    assert sum(".block_sparse_moe.experts." in n for n in names) == 48
    assert not any("selection_bias" in n for n in names)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no temp files left


@pytest.mark.parametrize(
    "kw,reason",
    [
        (dict(n_expert=8, gate_norm=True), "eq. 6.*no Mixtral equivalent"),
        (dict(n_expert=8, gate_norm=False, moe_every=2), "moe_every=2: Mixtral has an MoE block in every layer"),
    ],
)
def test_models_without_an_equivalent_are_refused(tmp_path, kw, reason):
    cfg = tiny(**kw)
    with pytest.raises(ExportError, match=reason):
        export_state(model_of(cfg).state_dict(), cfg, str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_selection_bias_is_refused_unless_zero(tmp_path):
    cfg = tiny(n_expert=4, gate_norm=False, aux_free_bias=True)
    state = model_of(cfg).state_dict()
    export_state(state, cfg, str(tmp_path / "zero"))  # an unused (zero) bias is fine
    state["blocks.0.ffn.router.selection_bias_E"][1] = 0.01
    with pytest.raises(ExportError, match="selection bias .* is nonzero"):
        export_state(state, cfg, str(tmp_path / "biased"))


# -----------------------------------------------------------------------------
# the command line, on checkpoints written by the project's own writer


def write_checkpoint(path, cfg):
    from checkpoint import save_checkpoint
    from train import TrainConfig

    save_checkpoint(str(path), model_state=model_of(cfg).state_dict(), model_cfg=cfg, train_cfg=TrainConfig())


def export_cli(*args):
    return subprocess.run(
        [sys.executable, "export.py", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_command_line(tmp_path):
    cfg = tiny(n_expert=4, top_k=2, gate_norm=False)  # capacity_factor 1.25, the default
    write_checkpoint(tmp_path / "ckpt.pt", cfg)
    p = export_cli("--from", tmp_path, "--out", tmp_path / "hf")  # a run directory: its ckpt.pt
    assert p.returncode == 0, p.stderr
    assert "MixtralForCausalLM" in p.stdout and "note: capacity_factor=1.25" in p.stdout
    state, _ = import_hf(str(tmp_path / "hf"))
    assert torch.equal(state["blocks.1.ffn.experts.w3"], model_of(cfg).state_dict()["blocks.1.ffn.experts.w3"])

    def one_line_error(p, text):
        assert text in one_stderr_line(p), p.stderr

    one_line_error(export_cli("--from", tmp_path, "--out", tmp_path / "hf"), "exists: choose another --out")
    assert export_cli("--from", tmp_path, "--out", tmp_path / "hf", "--overwrite").returncode == 0
    one_line_error(export_cli("--from", tmp_path / "missing.pt", "--out", tmp_path / "o"), "not found")
    write_checkpoint(tmp_path / "normed.pt", tiny(n_expert=4))  # gate_norm=true, the default
    one_line_error(export_cli("--from", tmp_path / "normed.pt", "--out", tmp_path / "o"), "no Mixtral equivalent")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    one_line_error(export_cli("--from", tmp_path / "junk.pt", "--out", tmp_path / "o"), "not a readable checkpoint")
    assert not (tmp_path / "o").exists()
