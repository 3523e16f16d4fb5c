"""Training loop tests: config handling, a short run that learns, metrics, stop-and-resume, sampling,
data preparation. All on the quick-start preset (config/shakespeare_char.toml) made smaller."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, shakespeare_text_path
from train import ConfigError, load_config, train

PRESET = os.path.join(REPO, "config", "shakespeare_char.toml")
SMALL = ["n_layer=2", "n_embd=64", "n_head=2", "block_size=32", "batch_size=8", "eval_iters=4",
         "log_interval=1", "warmup_iters=4"]


def run(tmp_path, data_dir, *overrides, name="out"):
    out = str(tmp_path / name)
    model_cfg, tcfg, sources = load_config([PRESET, *SMALL, f"data_dir={data_dir}", f"out_dir={out}", *overrides])
    last = train(model_cfg, tcfg, sources)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return out, last, [json.loads(line) for line in f]

# -----------------------------------------------------------------------------
# config

def test_quick_start_preset_is_the_default():
    assert load_config([])[:2] == load_config([PRESET])[:2]


def test_precedence_defaults_file_command_line(tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("n_layer = 3\nlearning_rate = 1e-4\n")
    model_cfg, tcfg, sources = load_config([str(cfg_file), "--learning_rate=5e-4"])
    assert model_cfg.n_layer == 3 and tcfg.learning_rate == 5e-4 and tcfg.max_iters == 2000
    assert sources == {"n_layer": str(cfg_file), "learning_rate": "command line"}


@pytest.mark.parametrize("arg,nearest", [("--n_layr=3", "n_layer"), ("gate_lamda=2", "gate_lambda"),
                                         ("--capacity-factr=1", "capacity_factor")])
def test_command_line_typo_names_nearest_key(arg, nearest):
    with pytest.raises(ConfigError, match=f"did you mean '{nearest}'"):
        load_config([arg])


def test_config_file_typo_names_file_and_nearest_key(tmp_path):
    cfg_file = tmp_path / "typo.toml"
    cfg_file.write_text("n_expert = 8\ntop_kk = 2\n")
    with pytest.raises(ConfigError, match=r"top_kk.*typo.toml.*did you mean 'top_k'"):
        load_config([str(cfg_file)])


@pytest.mark.parametrize("args,message", [
    (["top_k=4", "n_expert=2"], "top_k=4 must be in \\[1, n_expert=2\\]"),
    (["capacity_factor=-1"], "capacity_factor=-1.0 must be >= 0"),
    (["gate_lambda=0"], "gate_lambda=0.0 must be > 0"),
    (["n_layer=abc"], "n_layer='abc': expected int"),
    (["gate_norm=maybe"], "expected true or false"),
    (["aux_loss=l2"], "aux_loss='l2'"),
    (["aux_beta=1.0"], "aux_beta=1.0 must be in \\[0, 1\\)"),
    (["lr_schedule=linear"], "use 'cosine' or 'constant'"),
    (["n_embd=100", "n_head=3"], "multiple of n_head"),
])
def test_invalid_values_fail_with_actionable_message(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(args)


def test_toml_value_of_wrong_type(tmp_path):
    cfg_file = tmp_path / "bad.toml"
    cfg_file.write_text('n_layer = "four"\n')
    with pytest.raises(ConfigError, match="n_layer='four': expected int"):
        load_config([str(cfg_file)])


def test_cli_reports_config_error_without_traceback():
    p = subprocess.run([sys.executable, "train.py", "--n_layr=3"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2
    assert "did you mean 'n_layer'" in p.stderr and "Traceback" not in p.stderr

# -----------------------------------------------------------------------------
# training

@pytest.fixture(scope="module")
def short_run(tmp_path_factory, char_data_dir):
    return run(tmp_path_factory.mktemp("short"), char_data_dir, "max_iters=60", "eval_interval=30")


def test_short_run_lowers_the_loss(short_run):
    _, last, lines = short_run
    evals = [line for line in lines if "val_loss" in line]
    assert [e["iter"] for e in evals] == [0, 30, 60]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.8  # ln(65) = 4.17 -> well below 3.4
    assert last["val"] == evals[-1]["val_loss"]


def test_metrics_have_router_statistics_for_every_moe_layer(short_run):
    _, _, lines = short_run
    steps = [line for line in lines if "loss" in line]
    assert len(steps) == 60
    for line in steps:
        assert [layer["layer"] for layer in line["layers"]] == [0, 1]
        for layer in line["layers"]:
            for key in ("drop_rate", "alpha", "aux_loss", "load_cv", "max1_max2", "max2_max3", "entropy"):
                assert isinstance(layer[key], float), key
    # adaptive coefficients moved away from their start
    assert steps[-1]["layers"][0]["alpha"] != 0.01


def test_stop_and_resume_reproduces_losses_bit_exactly(tmp_path, char_data_dir):
    common = ["eval_interval=8", "lr_decay_iters=16", "dropout=0.1"]
    _, _, straight = run(tmp_path, char_data_dir, "max_iters=16", *common, name="straight")
    out, _, _ = run(tmp_path, char_data_dir, "max_iters=8", *common, name="split")
    _, _, resumed = run(tmp_path, char_data_dir, "max_iters=16", "init_from=resume", *common, name="split")

    def steps(lines):
        return {line["iter"]: (line["loss"], [layer["alpha"] for layer in line["layers"]],
                               [layer["drop_rate"] for layer in line["layers"]])
                for line in lines if "loss" in line}
    a, b = steps(straight), steps(resumed)
    assert sorted(b) == list(range(1, 17))          # resumed file = first half + continuation
    assert all(a[i] == b[i] for i in range(1, 17))  # == on floats: bit-identical


def test_sample_prints_text(short_run):
    out, _, _ = short_run
    p = subprocess.run([sys.executable, "sample.py", f"--ckpt={out}/ckpt.pt", "--prompt=ROMEO:",
                        "--num_samples=1", "--max_new_tokens=40", "--seed=1"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("ROMEO:") and len(p.stdout) > 40
    p2 = subprocess.run([sys.executable, "sample.py", f"--ckpt={out}/missing.pt"], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
    assert p2.returncode != 0 and "not found" in p2.stderr

# -----------------------------------------------------------------------------
# data

def test_char_prepare_writes_vocab_and_splits(char_data_dir):
    import numpy as np
    root = os.path.join(char_data_dir, "shakespeare_char")
    meta = json.load(open(os.path.join(root, "meta.json")))
    train_ids = np.fromfile(os.path.join(root, "train.bin"), dtype=np.uint16)
    val_ids = np.fromfile(os.path.join(root, "val.bin"), dtype=np.uint16)
    assert meta["vocab_size"] == 65 and len(train_ids) == 1003854 and len(val_ids) == 111540
    assert train_ids.max() < 65


def test_bpe_prepare_offline_from_ranks_file(tmp_path):
    ranks = os.path.join(os.environ.get("SHARED_DATA", os.path.join(REPO, "..", "shared", "data")), "r50k_base.tiktoken")
    if not os.path.isfile(ranks):
        pytest.skip("r50k_base.tiktoken not available (set SHARED_DATA)")
    p = subprocess.run([sys.executable, "data/shakespeare/prepare.py", f"--input={shakespeare_text_path()}",
                        f"--ranks={ranks}", f"--out_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    import numpy as np
    # the counts nanoGPT publishes for tiny Shakespeare under the GPT-2 BPE
    assert len(np.fromfile(tmp_path / "train.bin", dtype=np.uint16)) == 301966
    assert len(np.fromfile(tmp_path / "val.bin", dtype=np.uint16)) == 36059
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("not ranks\n")
    p = subprocess.run([sys.executable, "data/shakespeare/prepare.py", f"--input={shakespeare_text_path()}",
                        f"--ranks={bad}", f"--out_dir={tmp_path}/x"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode != 0 and "sha256" in p.stderr
