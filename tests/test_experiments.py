"""The experiment scripts (experiments/*.py) at --scale smoke, their full-scale plans, and the FineWeb
preparation on a local text file. ~30 s on 2 CPU cores.

    python -m pytest -q tests/test_experiments.py
"""
import contextlib
import importlib.util
import io
import json
import math
import os
import re
import shlex
import sys

import numpy as np
import pytest

from conftest import REPO

from experiments import adaptive_aux, common, gate_norm, upcycling


def run_smoke(module, out, data_dir):
    with contextlib.redirect_stdout(io.StringIO()):
        return module.main(["--scale", "smoke", "--out", str(out), "--data_dir", data_dir])

# -----------------------------------------------------------------------------
# acceptance 1: every script runs at smoke scale and writes its table and plots

def test_gate_norm_smoke(tmp_path, char_data_dir):
    summary = run_smoke(gate_norm, tmp_path, char_data_dir)
    for name in ("gate_norm_smoke.md", "gate_norm_smoke.json", "gate_norm_smoke_curves.png",
                 "gate_norm_smoke_gates.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert set(summary["variants"]) == set(gate_norm.VARIANTS)
    table = (tmp_path / "gate_norm_smoke.md").read_text()
    assert all(gate_norm.LABELS[v] in table for v in gate_norm.VARIANTS)
    for v, runs in summary["variants"].items():
        assert all(math.isfinite(r["val_loss"]) and 0 <= r["drop_late"] <= 1 and r["max1_max2_late"] >= 1 for r in runs)
        snap = summary["gate_snapshot"][v]
        assert len(snap["token_probs"]) == 16 and abs(sum(snap["token_probs"]) - 1) < 1e-5
    # eq. 6 fixes the logits' spread to lambda, so a larger lambda is a more decisive gate from step 0
    start = {v: rs[0]["max1_max2_start"] for v, rs in summary["variants"].items()}
    assert start["lambda_0.5"] < start["lambda_1"] < start["lambda_2"]
    # a finished run is not rerun: the second call only rebuilds the tables
    before = os.path.getmtime(tmp_path / "no_norm_s1337" / "metrics.jsonl")
    run_smoke(gate_norm, tmp_path, char_data_dir)
    assert os.path.getmtime(tmp_path / "no_norm_s1337" / "metrics.jsonl") == before


def test_adaptive_aux_smoke_follows_eq_7_to_9(tmp_path, char_data_dir):
    summary = run_smoke(adaptive_aux, tmp_path, char_data_dir)
    for name in ("adaptive_aux_smoke.md", "adaptive_aux_smoke.json", "adaptive_aux_smoke_curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert set(summary["variants"]) == set(adaptive_aux.VARIANTS)
    # the logged alpha of every step is eq. 9 applied to the previous step's logged drop rate (eq. 8)
    m = common.read_metrics(tmp_path / "adaptive_s1337")
    for layer in range(common.n_moe_layers(m)):
        _, d = common.step_series(m, "drop_rate", layer)
        _, a = common.step_series(m, "alpha", layer)
        assert a[0] == pytest.approx(1e-2)
        expect = 0.99 * a[:-1] + 0.01 * np.minimum(0.2 * d[:-1], 1e-2)
        np.testing.assert_allclose(a[1:], expect, rtol=1e-6)
    fixed = common.read_metrics(tmp_path / "fixed_1e-3_s1337")
    assert all(r["alpha"] == pytest.approx(1e-3) for s in fixed["steps"] for r in s["layers"])


def test_upcycling_smoke(tmp_path, char_data_dir):
    summary = run_smoke(upcycling, tmp_path, char_data_dir)
    for name in ("upcycling_smoke.md", "upcycling_smoke.json", "upcycling_smoke_curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert os.path.exists(tmp_path / "dense_s1337" / "ckpt_D3.pt")
    rows = summary["rows"]
    assert {r["budget"] for r in rows.values()} == {"D/3", "D"} and len(rows) == 6
    for row in rows.values():
        r = row["runs"][0]
        if row["source"] == "scratch":
            assert abs(r["similarity_start"]) < 0.1        # independent random experts
        else:
            assert r["similarity_start"] == pytest.approx(1.0, abs=1e-5)  # identical copies at step 0
    # the D/3 checkpoint is the dense run's state at D/3 (phase 1 stopped there on the D-long cosine)
    dense = common.read_metrics(tmp_path / "dense_s1337")
    assert [e["iter"] for e in dense["evals"]][-1] == upcycling.DENSE_ITERS["smoke"]


def test_variant_subset_and_run_length(tmp_path, char_data_dir):
    with contextlib.redirect_stdout(io.StringIO()):
        summary = gate_norm.main(["--scale", "smoke", "--variants", "no_norm,lambda_1", "--max_iters", "6",
                                  "--out", str(tmp_path), "--data_dir", char_data_dir])
    assert set(summary["variants"]) == {"no_norm", "lambda_1"}
    assert (tmp_path / "gate_norm_smoke_6it.md").exists()
    assert common.read_metrics(tmp_path / "lambda_1_s1337")["evals"][-1]["iter"] == 6


def test_tracking_lag_of_an_exponential_average():
    """On a slow ramp of drop rates, eq. 9's alpha lags xi * d by ~beta/(1-beta) steps."""
    from router import AuxCoefficients
    steps = 1500
    drop = np.linspace(0.0, 0.04, steps) + 0.002 * np.sin(np.arange(steps))
    coeffs = AuxCoefficients(1, "adaptive", alpha_init=0.0, xi=0.2, alpha_max=0.01, beta=0.99)
    alpha = []
    for d in drop:
        alpha.append(coeffs.alpha[0])
        coeffs.update([d])
    lag = adaptive_aux.tracking_lag(np.arange(steps), np.array(alpha), drop)
    assert 90 <= lag <= 110

# -----------------------------------------------------------------------------
# acceptance 4: --scale full --dry-run prints correct parameter counts and runnable commands

PLAN_LINE = re.compile(r"^## (\S+): params ([\d,]+) total / ([\d,]+) active; ([\d.]+)B tokens")


@pytest.mark.parametrize("module", [gate_norm, adaptive_aux, upcycling], ids=lambda m: m.EXPERIMENT)
def test_full_dry_run_plan(module):
    from model import count_params_meta
    from train import load_config
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        module.main(["--scale", "full", "--dry-run", "--data_dir", "/nonexistent"])
    lines = buf.getvalue().splitlines()
    plans = [(m, lines[i + 1]) for i, line in enumerate(lines) if (m := PLAN_LINE.match(line))]
    assert len(plans) >= 4
    reached = {}
    for m, command in plans:
        argv = shlex.split(command)
        assert argv[:4] == ["torchrun", "--standalone", "--nproc_per_node=8", "train.py"]
        model_cfg, train_cfg, _ = load_config(argv[4:])          # train.py accepts every key
        assert train_cfg.dataset == "fineweb" and train_cfg.batch_size % 8 == 0
        model_cfg.vocab_size = common.GPT2_VOCAB
        counts = count_params_meta(model_cfg)                     # model.py's own accounting
        assert int(m.group(2).replace(",", "")) == counts["total"]
        assert int(m.group(3).replace(",", "")) == counts["active"]
        start = reached.get(train_cfg.out_dir, 0) if train_cfg.init_from == "resume" else 0
        reached[train_cfg.out_dir] = train_cfg.max_iters
        tokens = (train_cfg.max_iters - start) * train_cfg.batch_size * train_cfg.grad_accum * model_cfg.block_size
        assert float(m.group(4)) == pytest.approx(tokens / 1e9, abs=0.01)
        assert not os.path.isabs(train_cfg.out_dir)              # commands run from the repository root
        if model_cfg.n_expert:
            assert train_cfg.ep_size == 8 and model_cfg.n_expert % train_cfg.ep_size == 0
    assert "GPU-hours" in lines[-1]
    if module is gate_norm:  # the GPT-2-small-sized MoE: 12 x 768, 16 experts, ~1B total
        cfg = load_config(shlex.split(plans[0][1])[4:])[0]
        assert (cfg.n_layer, cfg.n_embd, cfg.n_expert, cfg.top_k) == (12, 768, 16, 2)
    if module is upcycling:  # the paper's 0.3B dense model (non-embedding), then 8 experts top-2
        dense = [(m, c) for m, c in plans if m.group(1).startswith("dense")]
        cfg = load_config(shlex.split(dense[0][1])[4:])[0]
        cfg.vocab_size = common.GPT2_VOCAB
        non_embedding = count_params_meta(cfg)["total"] - 2 * cfg.vocab_size * cfg.n_embd
        assert 0.25e9 < non_embedding < 0.35e9
        assert "python upcycle.py --from" in buf.getvalue()


def test_cli_errors():
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(io.StringIO()):
        gate_norm.main(["--scale", "small", "--dry-run"])
    assert e.value.code == 2
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        gate_norm.main(["--scale", "full", "--dry-run", "--nproc", "4"])

# -----------------------------------------------------------------------------
# data/fineweb/prepare.py through its real pipeline, on a local text file

def test_fineweb_prepare_local_text(tmp_path):
    ranks = os.path.join(os.environ.get("SHARED_DATA", os.path.join(REPO, "..", "shared", "data")),
                         "r50k_base.tiktoken")
    if not os.path.isfile(ranks):
        pytest.skip("r50k_base.tiktoken not found (set SHARED_DATA)")
    spec = importlib.util.spec_from_file_location("fineweb_prepare", os.path.join(REPO, "data", "fineweb", "prepare.py"))
    prep = importlib.util.module_from_spec(spec)
    sys.modules["fineweb_prepare"] = prep  # the worker pool pickles encode_document by module name
    spec.loader.exec_module(prep)
    docs = [f"Document {i}: the quick brown fox jumps over {i} lazy dogs.\nSecond line {i * 7}." for i in range(60)]
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(docs))
    out = tmp_path / "tok"
    meta = prep.prepare(prep.file_documents([str(src)]), str(out), ranks, workers=2, shard_tokens=300,
                        val_tokens=200, keep_shards=True, quiet=True)
    enc = prep.gpt2_encoding(ranks)
    expect = np.concatenate([[prep.EOT] + enc.encode_ordinary(d) for d in docs]).astype(np.uint16)
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    np.testing.assert_array_equal(np.concatenate([val, train]), expect)   # document order kept
    assert val[0] == prep.EOT and train[0] == prep.EOT                      # splits at document starts
    assert len(meta["shards"]["train"]) > 1 and meta["vocab_size"] == 50257
    shards = np.concatenate([np.fromfile(out / s, dtype=np.uint16) for s in meta["shards"]["train"]])
    np.testing.assert_array_equal(shards, train)
    assert json.loads((out / "meta.json").read_text())["tokens"]["train"] == len(train)
