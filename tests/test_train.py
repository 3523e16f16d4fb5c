"""Training loop tests: config handling, a short run that learns, metrics, stop-and-resume, sampling,
(data preparation: test_prepare.py). All on the quick-start preset (config/shakespeare_char.toml) made smaller."""

import json
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import train as train_module
from config import ConfigError
from conftest import REPO
from conftest import load_run_config as load_config
from model import ModelConfig
from router import STAT_NAMES
from train import TrainConfig, train

PRESET = os.path.join(REPO, "config", "shakespeare_char.toml")
SMALL = [
    "n_layer=2",
    "n_embd=64",
    "n_head=2",
    "block_size=32",
    "batch_size=8",
    "eval_iters=4",
    "log_interval=1",
    "warmup_iters=4",
]


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


@pytest.mark.parametrize(
    "arg,nearest",
    [("--n_layr=3", "n_layer"), ("gate_lamda=2", "gate_lambda"), ("--capacity-factr=1", "capacity_factor")],
)
def test_command_line_typo_names_nearest_key(arg, nearest):
    with pytest.raises(ConfigError, match=f"did you mean '{nearest}'"):
        load_config([arg])


def test_config_file_typo_names_file_and_nearest_key(tmp_path):
    cfg_file = tmp_path / "typo.toml"
    cfg_file.write_text("n_expert = 8\ntop_kk = 2\n")
    with pytest.raises(ConfigError, match=r"top_kk.*typo.toml.*did you mean 'top_k'"):
        load_config([str(cfg_file)])


@pytest.mark.parametrize(
    "args,message",
    [
        (["top_k=4", "n_expert=2"], "top_k=4 must be in \\[1, n_expert=2\\]"),
        (["capacity_factor=-1"], "capacity_factor=-1.0 must be >= 0"),
        (["gate_lambda=0"], "gate_lambda=0.0 must be > 0"),
        (["n_layer=abc"], "n_layer='abc': expected int"),
        (["gate_norm=maybe"], "expected true or false"),
        (["aux_loss=l2"], "aux_loss='l2'"),
        (["aux_beta=1.0"], "aux_beta=1.0 is out of range: it must be in \\[0.0, 0.999999\\]"),
        (["lr_schedule=linear"], "use one of 'cosine', 'constant'"),
        (["learning_rate=inf"], "learning_rate='inf': must be a finite number"),
        (["seed=18446744073709551616"], "seed=18446744073709551616 is out of range"),
        (["n_embd=100", "n_head=3"], "multiple of n_head"),
    ],
)
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
    assert p.returncode == 1
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
        return {
            line["iter"]: (
                line["loss"],
                [layer["alpha"] for layer in line["layers"]],
                [layer["drop_rate"] for layer in line["layers"]],
            )
            for line in lines
            if "loss" in line
        }

    a, b = steps(straight), steps(resumed)
    assert sorted(b) == list(range(1, 17))  # resumed file = first half + continuation
    assert all(a[i] == b[i] for i in range(1, 17))  # == on floats: bit-identical


def test_resume_takes_the_runs_settings_and_a_finished_run_has_nothing_to_do(tmp_path, char_data_dir, capsys):
    out, _, _ = run(tmp_path, char_data_dir, "max_iters=6", "eval_interval=3", "learning_rate=1e-3", name="r")
    resume = [f"out_dir={out}", "init_from=resume", f"data_dir={char_data_dir}"]
    capsys.readouterr()
    assert train(*load_config(resume)) == {}  # max_iters=6 and the rest come from the checkpoint
    printed = capsys.readouterr().out
    assert f"nothing to do: {out} reached max_iters=6; raise max_iters to continue" in printed
    last = train(*load_config([*resume, "max_iters=9"]))
    printed = capsys.readouterr().out
    assert "overridden: max_iters=9 (command line; saved 6)" in printed
    assert f"checkpoint: {out}/ckpt.pt (iter 9, val {last['val']:.4f})" in printed
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f if '"loss"' in line]
    assert [s["iter"] for s in steps] == list(range(1, 10)) and steps[-1]["lr"] <= 1e-3


def test_compile_option_trains_at_smoke_size(tmp_path, char_data_dir):
    _, last, lines = run(tmp_path, char_data_dir, "max_iters=3", "eval_interval=3", "n_layer=1", "compile=true")
    assert [line["iter"] for line in lines if "loss" in line] == [1, 2, 3] and last["val"] < 4.5


def test_sample_prints_text(short_run):
    out, _, _ = short_run
    p = subprocess.run(
        [
            sys.executable,
            "sample.py",
            f"--ckpt={out}/ckpt.pt",
            "--prompt=ROMEO:",
            "--num_samples=1",
            "--max_new_tokens=40",
            "--seed=1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("ROMEO:") and len(p.stdout) > 40
    p2 = subprocess.run(
        [sys.executable, "sample.py", f"--ckpt={out}/missing.pt"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert p2.returncode != 0 and "not found" in p2.stderr


# -----------------------------------------------------------------------------
# the GPU paths, checked on CPU with stand-ins


def test_empty_router_statistics_live_on_the_losss_device():
    stats, loads = train_module.router_stats([], torch.device("meta"))
    assert stats.device.type == loads.device.type == "meta" and stats.shape == (0, len(STAT_NAMES))


def test_resume_restores_this_ranks_own_gpu_generator(monkeypatch):
    """A checkpoint of 8 GPUs resumed on fewer: each rank takes its own state, none fails."""
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: seen.append(int(state[0])))
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    for rank in (0, 3):
        gen = torch.Generator()
        rng = {"torch": torch.get_rng_state(), "data": gen.get_state(), "cuda": states}
        checkpoint.restore_rng(rng, gen, rank)
    assert seen == [0, 3]


def test_float16_is_refused_and_auto_picks_a_supported_dtype(monkeypatch):
    with pytest.raises(ValueError, match="dtype=float16 needs loss scaling"):
        TrainConfig(dtype="float16")
    _, autocast = train_module.resolve_device(TrainConfig(device="cpu"))
    assert not autocast._enabled  # float32 on a CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # a V100 or a T4
    _, autocast = train_module.resolve_device(TrainConfig(device="cuda"))
    assert not autocast._enabled  # float32, not bf16 emulated in software


def test_router_and_similarity_matmuls_ignore_global_tf32(monkeypatch):
    import router
    from model import GPT, expert_similarity

    flags = []
    real_linear, real_matmul = router.F.linear, torch.Tensor.__matmul__

    def linear(x, w, *a, **k):
        if w.shape == (4, 16):  # the gate (E, D); the model's other linears may use TF32
            flags.append(torch.backends.cuda.matmul.fp32_precision)
        return real_linear(x, w, *a, **k)

    def matmul(a, b):
        flags.append(torch.backends.cuda.matmul.fp32_precision)
        return real_matmul(a, b)

    model = GPT(ModelConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16, n_expert=4))
    monkeypatch.setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32")
    monkeypatch.setattr(router.F, "linear", linear)
    model(torch.zeros(1, 8, dtype=torch.long))
    monkeypatch.setattr(torch.Tensor, "__matmul__", matmul)
    expert_similarity(model)
    assert len(flags) >= 2 and set(flags) == {"ieee"}
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # restored outside
