"""
Reliability (issue 7): long runs die in the middle, and every such death must end cleanly, lose
nothing, and say what to do. One test (or a few) per case, on tiny models:

    1. atomic checkpoints     a save SIGKILLed mid-write leaves the previous checkpoint; resuming gives
                              the file the run would have written had it never died; retention
    2. SIGTERM / SIGINT       checkpoint at the next step boundary, exit 0, bit-exact resume; under
                              torchrun every rank stops after the same step
    3. non-finite steps       skipped or stopped, naming the step and the MoE layer that went bad;
                              nothing written past the last good checkpoint
    4. bad inputs             one line saying what to do, exit code != 0, no traceback
    5. distributed faults     a rank raising in the all-to-all ends every rank at once, named
    6. determinism            same seed and world size: the same metrics.jsonl, byte for byte

    python -m pytest -q tests/test_reliability.py

Kills and signals run in subprocesses (python -c, or train.py itself); ranks are forked as in
tests/test_expert_parallel.py, with every wait bounded.
"""
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import expert_parallel as ep
import train
from conftest import REPO
from model import GPT, ModelConfig
from router import AuxCoefficients
from test_expert_parallel import ok_results, spawn, torch_threads
from train import load_config

PRESET = os.path.join(REPO, "config", "shakespeare_char.toml")
EP2_PRESET = os.path.join(REPO, "config", "shakespeare_char_ep2.toml")
# saves at iterations 2, 4, 6, 8 (keep_last=2 keeps 6 and 8); dropout so that resuming must restore the RNG
TINY = ["n_layer=2", "n_embd=64", "n_head=2", "block_size=32", "batch_size=8", "eval_iters=1",
        "log_interval=1", "warmup_iters=2", "lr_decay_iters=8", "dropout=0.1", "eval_interval=2", "max_iters=8"]


# one CPU thread everywhere (this process, subprocesses, forked ranks): the machine's two cores are
# shared, and every run that is compared byte for byte must sum in the same order
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def argv(data_dir, out_dir, *extra, preset=PRESET):
    return [preset, *TINY, f"data_dir={data_dir}", f"out_dir={out_dir}", *extra]


def run_here(args):
    """train.train in this process; returns what it printed."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        model_cfg, tcfg, sources = load_config(args)
        train.train(model_cfg, tcfg, sources)
    return buf.getvalue()


def read(path):
    with open(path, "rb") as f:
        return f.read()


def records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def ckpt_iter(path):
    return train.load_checkpoint(str(path))["iter_num"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, char_data_dir):
    """The uninterrupted run the interrupted ones must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "out"
    run_here(argv(char_data_dir, out))
    return out

# -----------------------------------------------------------------------------
# 6. determinism (first: the other tests compare against the reference byte for byte)

def test_same_seed_gives_the_same_metrics_file(tmp_path, char_data_dir, reference):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    printed = run_here(argv(char_data_dir, tmp_path / "again"))
    assert read(tmp_path / "again" / "metrics.jsonl") == read(reference / "metrics.jsonl")
    assert "tok_per_s" not in read(reference / "metrics.jsonl").decode()  # timings only in the printed line
    assert "tok/s" in printed
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # train() restored them

# -----------------------------------------------------------------------------
# 1. atomic checkpoints and retention

def test_retention_keeps_last_n_and_best(reference):
    names = sorted(os.listdir(reference))
    assert names == ["best.pt", "ckpt-6.pt", "ckpt-8.pt", "ckpt.pt", "metrics.jsonl"]
    assert os.path.samefile(reference / "ckpt.pt", reference / "ckpt-8.pt")  # a hard link: no extra disk
    evals = {r["iter"]: r["val_loss"] for r in records(reference) if "val_loss" in r and r["iter"] > 0}
    best = min(evals, key=evals.get)
    ckpt = train.load_checkpoint(str(reference / "best.pt"))
    assert ckpt["iter_num"] == best and ckpt["best_val_loss"] == evals[best]


KILL_IN_SECOND_SAVE = """
import io, os, signal, sys, torch
sys.path.insert(0, {repo!r})
import train
real_save, calls = torch.save, []

def save_then_die(obj, f, *args, **kwargs):
    calls.append(1)
    if len(calls) < 2:
        return real_save(obj, f, *args, **kwargs)
    buf = io.BytesIO()
    real_save(obj, buf)
    f.write(buf.getvalue()[:len(buf.getvalue()) // 2])  # half the checkpoint on disk, then SIGKILL:
    f.flush()                                          # what a scheduler or the OOM killer does
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = save_then_die
train.main(sys.argv[1:])
"""


def test_sigkill_while_saving_keeps_the_previous_checkpoint(tmp_path, char_data_dir, reference):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", KILL_IN_SECOND_SAVE.format(repo=REPO), *argv(char_data_dir, out)],
                       cwd=REPO, env=ONE_THREAD, capture_output=True, text=True, timeout=180)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert os.path.getsize(out / "ckpt.pt.tmp") > 0                     # killed mid-write...
    assert ckpt_iter(out / "ckpt.pt") == 2                              # ...the previous one is whole
    assert max(r["iter"] for r in records(out)) == 4                    # it had logged up to 4
    printed = run_here(argv(char_data_dir, out, "init_from=resume"))
    assert "resumed from" in printed and "at iteration 2" in printed
    # nothing lost, nothing twice: steps 3-4 were trimmed from the log and trained again
    assert read(out / "metrics.jsonl") == read(reference / "metrics.jsonl")
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))     # the stale .tmp is gone

# -----------------------------------------------------------------------------
# 2. SIGTERM / SIGINT

def test_sigterm_checkpoints_at_step_boundary_exits_0_and_resumes_bit_exactly(tmp_path, char_data_dir, reference):
    out = tmp_path / "out"
    log = open(tmp_path / "stdout.txt", "w+")
    proc = subprocess.Popen([sys.executable, "train.py", *argv(char_data_dir, out)], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, env=ONE_THREAD)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() or '"loss"' not in (out / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first step"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)  # mid-run, as a scheduler would before preempting
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    log.seek(0)
    printed = log.read()
    assert rc == 0, printed[-3000:]
    stopped = max(r["iter"] for r in records(out) if "loss" in r)
    assert stopped < 8, "SIGTERM arrived after the last step: nothing was tested"
    assert f"SIGTERM received: stopped at iteration {stopped}; saved" in printed and "--init_from=resume" in printed
    assert ckpt_iter(out / "ckpt.pt") == stopped
    run_here(argv(char_data_dir, out, "init_from=resume"))
    assert read(out / "metrics.jsonl") == read(reference / "metrics.jsonl")


EP_TINY = ["route_groups=2", "backend=gloo", "dist_timeout_s=60"]


def _ep_run(rank, world, args, signal_rank=None, signal_at=None):
    """train() on one of `world` forked ranks; rank signal_rank sends itself SIGINT in iteration signal_at."""
    if rank == signal_rank:
        real_lr_at = train.lr_at

        def lr_at(it, tcfg):
            if it == signal_at:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C reaching one rank only
            return real_lr_at(it, tcfg)
        train.lr_at = lr_at
    return run_here(args)


def test_torchrun_ranks_agree_on_the_stop_step_and_resume_bit_exactly(tmp_path, char_data_dir):
    def args(out, *extra):
        return argv(char_data_dir, tmp_path / out, *EP_TINY, *extra, preset=EP2_PRESET)
    printed = ok_results(spawn(_ep_run, 2, args("split"), 1, 3, timeout=150))  # both ranks returned
    assert "SIGINT received: stopped at iteration 4" in printed[0]
    assert ckpt_iter(tmp_path / "split" / "ckpt.pt") == 4
    ok_results(spawn(_ep_run, 2, args("split", "init_from=resume"), timeout=150))
    ok_results(spawn(_ep_run, 2, args("straight"), timeout=150))
    # determinism at world size 2, and the stop + resume reproduces it
    assert read(tmp_path / "split" / "metrics.jsonl") == read(tmp_path / "straight" / "metrics.jsonl")

# -----------------------------------------------------------------------------
# 3. non-finite loss or gradients

def poisoned_gpt(layer, at_step, last_step=None):
    """A GPT whose MoE layer `layer` gets a NaN router input in training forwards at_step..last_step."""
    class Poisoned(GPT):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.forwards = 0
            self.blocks[layer].ffn.router.register_forward_pre_hook(self.poison)

        def forward(self, *args, **kwargs):
            self.forwards += self.training
            return super().forward(*args, **kwargs)

        def poison(self, module, args):
            if self.training and at_step <= self.forwards <= (last_step or at_step):
                return (args[0] * float("nan"),) + tuple(args[1:])
    return Poisoned


def test_nonfinite_step_is_skipped_and_named(tmp_path, char_data_dir, monkeypatch):
    monkeypatch.setattr(train, "GPT", poisoned_gpt(layer=1, at_step=5))
    out = tmp_path / "out"
    printed = run_here(argv(char_data_dir, out))
    assert "warning: iteration 5: non-finite values (loss nan" in printed
    assert "router statistics of MoE layer 1 went bad first" in printed and "update skipped" in printed
    recs = records(out)
    assert [r["iter"] for r in recs if "skipped" in r] == [5]
    assert sorted(r["iter"] for r in recs if "loss" in r) == [1, 2, 3, 4, 6, 7, 8]
    assert "MoE layer 1" in next(r["skipped"] for r in recs if "skipped" in r)
    ckpt = train.load_checkpoint(str(out / "ckpt.pt"))  # the run went on, and nothing it holds is nan
    assert ckpt["iter_num"] == 8
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert all(a == a for a in ckpt["coefficients"]["alpha"])  # a nan drop rate never reached eq. 7-9


def test_nonfinite_step_stops_the_run_without_writing(tmp_path, char_data_dir, monkeypatch):
    monkeypatch.setattr(train, "GPT", poisoned_gpt(layer=1, at_step=5))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        run_here(argv(char_data_dir, out, "on_nonfinite=stop"))
    msg = str(e.value)
    assert msg.startswith("error: iteration 5: non-finite values") and "MoE layer 1 went bad first" in msg
    assert f"the last checkpoint, {out}/ckpt.pt (iteration 4), is untouched" in msg and "--init_from=resume" in msg
    assert ckpt_iter(out / "ckpt.pt") == 4
    assert sorted(os.listdir(out)) == ["best.pt", "ckpt-2.pt", "ckpt-4.pt", "ckpt.pt", "metrics.jsonl"]
    assert max(r["iter"] for r in records(out)) == 4


def test_nonfinite_steps_in_a_row_stop_the_run(tmp_path, char_data_dir, monkeypatch):
    monkeypatch.setattr(train, "GPT", poisoned_gpt(layer=0, at_step=3, last_step=99))  # diverged for good
    with pytest.raises(SystemExit) as e:
        run_here(argv(char_data_dir, tmp_path / "out", "max_skipped_steps=2"))
    msg = str(e.value)
    assert msg.startswith("error: iteration 5: non-finite values") and "MoE layer 0 went bad first" in msg
    assert "Stopped after 3 bad steps in a row (max_skipped_steps=2)" in msg and "(iteration 4), is untouched" in msg
    assert [r["iter"] for r in records(tmp_path / "out") if "skipped" in r] == [3, 4]


def test_nonfinite_gradient_names_the_parameter_and_changes_nothing():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16, n_expert=4, top_k=2)
    model = GPT(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tcfg = train.TrainConfig(grad_clip=1.0)
    x = torch.randint(32, (2, 9))
    model.blocks[0].attn.wv.weight.register_hook(lambda g: g * float("inf"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = train.guarded_step(model, optimizer, [(x[:, :-1], x[:, 1:])], AuxCoefficients(2), tcfg,
                              torch.autocast("cpu", enabled=False))
    assert "router statistics finite in every MoE layer" in step.problem
    assert "non-finite gradient in blocks.0.attn.wv.weight" in step.problem
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no update
    assert all(p.grad is None for p in model.parameters())                         # grads dropped
    with pytest.raises(FloatingPointError, match="blocks.0.attn.wv.weight"):
        train.train_step(model, optimizer, [(x[:, :-1], x[:, 1:])], AuxCoefficients(2), tcfg,
                         torch.autocast("cpu", enabled=False))

# -----------------------------------------------------------------------------
# 4. bad inputs: one line that says what to do (in-process: the SystemExit message; the command line
#    prints it to stderr with exit code 1, see test_cli_errors_are_one_line_without_traceback)

def copy_dataset(src_data_dir, dst, train_bin=None, vocab_size=None):
    root = dst / "shakespeare_char"
    shutil.copytree(os.path.join(src_data_dir, "shakespeare_char"), root)
    if train_bin is not None:
        (root / "train.bin").write_bytes(train_bin(read(root / "train.bin")))
    if vocab_size is not None:
        meta = json.loads((root / "meta.json").read_text())
        (root / "meta.json").write_text(json.dumps({**meta, "vocab_size": vocab_size}))
    return str(dst)


def expect_exit(args, *fragments):
    with pytest.raises(SystemExit) as e:
        run_here(args)
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    return msg


def test_missing_data_names_the_prepare_command(tmp_path):
    expect_exit(argv(tmp_path / "nodata", tmp_path / "out"), "train.bin and", "not found",
                f"python {REPO}/data/shakespeare_char/prepare.py --out_dir {tmp_path}/nodata/shakespeare_char")
    expect_exit(argv(tmp_path / "nodata", tmp_path / "out", "dataset=mydata"), "has no prepare.py")


def test_truncated_data_file(tmp_path, char_data_dir):
    data_dir = copy_dataset(char_data_dir, tmp_path / "d", train_bin=lambda b: b[:-1])
    expect_exit(argv(data_dir, tmp_path / "out"), "train.bin is truncated", "prepare.py")


def test_token_ids_beyond_the_vocabulary(tmp_path, char_data_dir):
    data_dir = copy_dataset(char_data_dir, tmp_path / "d", vocab_size=40)
    expect_exit(argv(data_dir, tmp_path / "out"), "holds token id 64, but vocab_size=40", "meta.json",
                "tokenized for another vocabulary")


def test_block_size_longer_than_the_data(tmp_path, char_data_dir):
    expect_exit(argv(char_data_dir, tmp_path / "out", "block_size=200000"), "val.bin holds 111540 tokens",
                "fewer than block_size+2", "lower block_size")


def test_checkpoint_of_another_model_config(tmp_path, char_data_dir, reference):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    expect_exit(argv(char_data_dir, out, "init_from=resume", "n_embd=32"),
                "n_embd=32 (command line), 64 in the checkpoint", "tok_emb.weight (65, 64) -> (65, 32)",
                "drop these settings")
    # a checkpoint whose tensors do not fit its own config (another version of model.py)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["model"]["blocks.0.attn.wq.weight"] = ckpt["model"]["blocks.0.attn.wq.weight"][:32]
    torch.save(ckpt, out / "edited.pt")
    expect_exit(argv(char_data_dir, tmp_path / "out2", f"init_from={out}/edited.pt"),
                "does not fit the model its config describes", "blocks.0.attn.wq.weight is (32, 64) there, (64, 64)")


def test_checkpoints_that_are_not_ours_or_broken(tmp_path, char_data_dir, reference):
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    expect_exit(argv(char_data_dir, tmp_path / "o1", f"init_from={tmp_path}/random.pt"), "is not a readable checkpoint")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    expect_exit(argv(char_data_dir, tmp_path / "o2", f"init_from={tmp_path}/foreign.pt"),
                "is not a checkpoint of this project")
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    os.remove(out / "ckpt.pt")  # a hard link to ckpt-8.pt: write a truncated copy, not into that file
    (out / "ckpt.pt").write_bytes(read(reference / "ckpt.pt")[:100_000])
    expect_exit(argv(char_data_dir, out, "init_from=resume"), "is not a readable checkpoint",
                "other checkpoints there, newest first: ckpt-8.pt, ckpt-6.pt, best.pt", f"ln -f {out}/ckpt-8.pt")
    expect_exit(argv(char_data_dir, tmp_path / "empty", "init_from=resume"), "nothing to resume")
    weights_only = train.load_checkpoint(str(reference / "ckpt.pt"))
    os.makedirs(tmp_path / "w")
    torch.save({**weights_only, "optimizer": None, "coefficients": None}, tmp_path / "w" / "ckpt.pt")
    expect_exit(argv(char_data_dir, tmp_path / "w", "init_from=resume"), "holds weights only",
                f"init_from={tmp_path}/w/ckpt.pt")


def test_out_dir_not_writable(tmp_path, char_data_dir):
    (tmp_path / "a_file").write_text("")
    expect_exit(argv(char_data_dir, tmp_path / "a_file" / "out"), "is not writable", "choose another out_dir")


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, char_data_dir, monkeypatch):
    real_save, calls = torch.save, []

    def save_until_disk_full(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < 2:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"\0" * 1000)
        raise OSError(28, os.strerror(28))  # ENOSPC, part-way through the write
    monkeypatch.setattr(torch, "save", save_until_disk_full)
    out = tmp_path / "out"
    expect_exit(argv(char_data_dir, out), f"could not write {out}/ckpt.pt (No space left on device)",
                "is full: free space there", f"{out}/ckpt.pt holds the last complete checkpoint",
                "--init_from=resume")
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt_iter(out / "ckpt.pt") == 2 and not (out / "ckpt.pt.tmp").exists()


@pytest.mark.parametrize("args,message", [
    (["keep_last=-1"], "keep_last=-1 must be >= 0"),
    (["on_nonfinite=ignore"], "on_nonfinite='ignore': use 'skip'"),
    (["max_skipped_steps=0"], "max_skipped_steps=0 must be >= 1"),
    (["dist_timeout_s=0"], "dist_timeout_s=0.0 must be > 0"),
])
def test_config_values_out_of_range(args, message):
    with pytest.raises(train.ConfigError, match=message.replace("(", "\\(").replace(")", "\\)")):
        load_config(args)


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    p = subprocess.run([sys.executable, "train.py", "keep_last=-1"], cwd=REPO, env=ONE_THREAD, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "keep_last=-1 must be >= 0" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "train.py", f"data_dir={tmp_path}/nodata", f"out_dir={tmp_path}/out"],
                       cwd=REPO, env=ONE_THREAD, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().startswith("error: ") and "prepare.py --out_dir" in p.stderr

# -----------------------------------------------------------------------------
# 5. distributed faults

def _fault_in_all_to_all(rank, world, args):
    if rank == 1:
        real, calls = ep.all_to_all, []

        def failing_all_to_all(*a, **k):
            calls.append(1)
            if len(calls) == 3:  # layer 1's dispatch of the first step: rank 0 is already waiting in it
                raise RuntimeError("injected fault in the all-to-all")
            return real(*a, **k)
        ep.all_to_all = failing_all_to_all
    with contextlib.redirect_stderr(io.StringIO()):
        return run_here(args)


def test_rank_failing_in_all_to_all_stops_every_rank_naming_it(tmp_path, char_data_dir):
    args = argv(char_data_dir, tmp_path / "out", *EP_TINY, "dist_timeout_s=30", preset=EP2_PRESET)
    t0 = time.time()
    results = spawn(_fault_in_all_to_all, 2, args, timeout=90)
    elapsed = time.time() - t0
    assert [r[0] for r in results] == ["error", "error"], results
    assert results[1][1] == "RuntimeError: injected fault in the all-to-all"
    assert results[0][1].startswith("SystemExit: error: rank 1 failed: RuntimeError: injected fault in the all-to-all")
    assert elapsed < 30, f"{elapsed:.0f} s: the ranks waited for the timeout instead of stopping at once"
