"""
Reliability (issues 7 and 12): long runs die in the middle, and every such death must end cleanly, lose
nothing, and say what to do. One test (or a few) per case, on tiny models:

    1. atomic checkpoints     a save SIGKILLed mid-write leaves the previous checkpoint; resuming gives
                              the file the run would have written had it never died; retention; a kill
                              at each step of the final save is repaired by the resume (issue 12.2)
    2. integrity              a flipped bit anywhere in a checkpoint's tensor data is refused (12.4);
                              damaged checkpoint fields and metrics files are one line each (12.6)
    3. SIGTERM / SIGINT       checkpoint at the next step boundary, exit 0, bit-exact resume; under
                              torchrun every rank stops after the same step
    4. non-finite steps       skipped or stopped, naming the step and the MoE layer that went bad;
                              nothing written past the last good checkpoint; a run that skipped every
                              step is an error
    5. bad inputs             one line saying what to do, exit code 1, no traceback (the settings' ranges
                              and malformed configs: tests/test_bad_inputs.py)
    6. distributed faults     a rank raising in the all-to-all ends every rank at once, named; a rank
                              SIGSTOPped ends its peers within dist_timeout_s (12.1), a rank SIGKILLed
                              within seconds (12.7), each naming the rank in one line
    7. determinism            same seed and world size: the same metrics.jsonl, byte for byte

    python -m pytest -q tests/test_reliability.py

Kills and signals run in subprocesses (python -c, or train.py itself) or forked ranks, with every wait
bounded.
"""

import contextlib
import copy
import io
import json
import multiprocessing as mp
import os
import queue
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import traceback
import zipfile

import pytest
import torch

import checkpoint
import expert_parallel as ep
import tensor_parallel as tp
import train
from checkpoint import CheckpointError, RunDir, load_checkpoint, payload_checksum
from conftest import ONE_THREAD, REPO, one_stderr_line
from conftest import load_run_config as load_config
from expert_parallel import free_port
from model import GPT, ModelConfig
from router import AuxCoefficients

PRESET = os.path.join(REPO, "config", "shakespeare_char.toml")
EP2_PRESET = os.path.join(REPO, "config", "shakespeare_char_ep2.toml")
# saves at iterations 2, 4, 6, 8 (keep_last=2 keeps 6 and 8); dropout so that resuming must restore the RNG
TINY = [
    "n_layer=2",
    "n_embd=64",
    "n_head=2",
    "block_size=32",
    "batch_size=8",
    "eval_iters=1",
    "log_interval=1",
    "warmup_iters=2",
    "lr_decay_iters=8",
    "dropout=0.1",
    "eval_interval=2",
    "max_iters=8",
]


# one CPU thread everywhere (this process, subprocesses, forked ranks): the machine's two cores are
# shared, and every run that is compared byte for byte must sum in the same order


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    return load_checkpoint(str(path))["iter_num"]


# What the reference run's final save (iteration 8) was given, and its out_dir just before it: the
# kills during that save replay it (test_kill_at_each_step_of_the_final_save_is_repaired)
FINAL_SAVE = {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, char_data_dir):
    """The uninterrupted run the interrupted ones must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    out = root / "out"
    real_save = RunDir.save

    def save(self, iter_num, val_loss=None, **state):
        if iter_num == 8:
            shutil.copytree(out, root / "before-final-save")
            FINAL_SAVE.update(
                dir=root / "before-final-save",
                iter_num=iter_num,
                val_loss=val_loss,
                best_val=self.best_val,
                last_saved=self.last_saved,
                state=copy.deepcopy(state),
            )
        return real_save(self, iter_num, val_loss, **state)

    RunDir.save = save
    try:
        run_here(argv(char_data_dir, out))
    finally:
        RunDir.save = real_save
    return out


def expect_error(args, *fragments):
    """The run fails with one of the errors main() prints as one line (exit 1); returns the message."""
    with pytest.raises(train.EXPLAINED) as e:
        run_here(args)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    return msg


def main_fails(argv_, capsys, *fragments):
    """train.main as the command line runs it: exit code 1 and exactly one line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main([str(a) for a in argv_])
    err = capsys.readouterr().err
    assert e.value.code == 1, (e.value.code, err)
    assert err.count("\n") == 1 and err.startswith(("error: ", "config error: ")), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err.strip()


# -----------------------------------------------------------------------------
# 7. determinism (first: the other tests compare against the reference byte for byte)


def test_same_seed_gives_the_same_metrics_file(tmp_path, char_data_dir, reference):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    printed = run_here(argv(char_data_dir, tmp_path / "again"))
    assert read(tmp_path / "again" / "metrics.jsonl") == read(reference / "metrics.jsonl")
    assert "tok_per_s" not in read(reference / "metrics.jsonl").decode()  # timings only in the printed line
    assert "tok/s" in printed
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # train() restored them


# -----------------------------------------------------------------------------
# 1. atomic checkpoints and retention


def evals_of(out_dir):
    return {r["iter"]: r["val_loss"] for r in records(out_dir) if "val_loss" in r and r["iter"] > 0}


def test_retention_keeps_last_n_and_best(reference):
    names = sorted(os.listdir(reference))
    assert names == ["best.pt", "ckpt-6.pt", "ckpt-8.pt", "ckpt.pt", "metrics.jsonl"]
    assert os.path.samefile(reference / "ckpt.pt", reference / "ckpt-8.pt")  # a hard link: no extra disk
    evals = evals_of(reference)
    best = min(evals, key=evals.get)
    ckpt = load_checkpoint(str(reference / "best.pt"))
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
    p = subprocess.run(
        [sys.executable, "-c", KILL_IN_SECOND_SAVE.format(repo=REPO), *argv(char_data_dir, out)],
        cwd=REPO,
        env=ONE_THREAD,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert os.path.getsize(out / "ckpt.pt.tmp") > 0  # killed mid-write...
    assert ckpt_iter(out / "ckpt.pt") == 2  # ...the previous one is whole
    assert max(r["iter"] for r in records(out)) == 4  # it had logged up to 4
    printed = run_here(argv(char_data_dir, out, "init_from=resume"))
    assert "resumed from" in printed and "at iteration 2" in printed
    # nothing lost, nothing twice: steps 3-4 were trimmed from the log and trained again
    assert read(out / "metrics.jsonl") == read(reference / "metrics.jsonl")
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))  # the stale .tmp is gone


class Killed(BaseException):
    """The process died here: not an Exception, so no handler of the code under test catches it."""


class DyingOS:
    """checkpoint.py's view of the os module, in which the process dies at its n-th change to the file
    system (os.link, os.replace, os.remove): that call and every later one raise Killed, so nothing
    more reaches the disk, as after a SIGKILL (a temp file stays where it was)."""

    def __init__(self, n):
        self.n, self.calls = n, []

    def __getattr__(self, name):
        return getattr(os, name)

    def _change(name):
        def change(self, *args, **kwargs):
            if len(self.calls) >= self.n:
                raise Killed(name)
            self.calls.append((name, *map(os.path.basename, map(str, args))))
            return getattr(os, name)(*args, **kwargs)

        return change

    link, replace, remove = _change("link"), _change("replace"), _change("remove")


def expected_file_set(out_dir, at_iter, keep_last=2):
    """The files of the reference run as of its checkpoint at_iter: ckpt.pt, the last keep_last numbered
    ones, best.pt (the lowest val loss so far) and metrics.jsonl; {name: iteration it holds}."""
    evals = {i: v for i, v in evals_of(out_dir).items() if i <= at_iter}
    files = {"ckpt.pt": at_iter, "best.pt": min(evals, key=evals.get)}
    files.update({f"ckpt-{i}.pt": i for i in sorted(evals)[-keep_last:]})
    return files


def test_kill_at_each_step_of_the_final_save_is_repaired(tmp_path, char_data_dir, reference):
    """Issue 12.2: the reference run's final save, replayed from its out_dir as it was just before, with
    the process killed before its 1st, 2nd, ... file-system change until one replay completes; after
    each kill, what every resume runs (RunDir.prepare + repair) must leave the full file set of the
    checkpoint ckpt.pt holds: the numbered files per keep_last, best.pt the lowest-val checkpoint. Once
    the new ckpt.pt is in place, every file is the reference run's, byte for byte."""
    final = FINAL_SAVE
    steps, n = None, 0
    while steps is None:
        out = tmp_path / f"kill{n}"
        shutil.copytree(final["dir"], out)
        run_dir = RunDir(str(out), keep_last=2, best_val=final["best_val"], last_saved=final["last_saved"])
        dying = DyingOS(n)
        with pytest.MonkeyPatch.context() as mp_:
            mp_.setattr(checkpoint, "os", dying)
            try:
                run_dir.save(final["iter_num"], final["val_loss"], **final["state"])
                steps = dying.calls  # no kill: the whole sequence ran
            except Killed:
                pass
        resumed = RunDir(str(out), keep_last=2)  # as train.py's open_run_files does on init_from=resume
        resumed.prepare(resuming=True)
        ckpt = load_checkpoint(str(out / "ckpt.pt"))
        resumed.repair(ckpt)
        at = ckpt["iter_num"]
        want = expected_file_set(reference, at)
        assert sorted(os.listdir(out)) == sorted([*want, "metrics.jsonl"]), (n, dying.calls)
        for name, it in want.items():
            assert ckpt_iter(out / name) == it, (n, name, dying.calls)
            if at == 8:
                assert read(out / name) == read(reference / name), (n, name)
        n += 1
    # the replay covered the whole sequence: ckpt.pt's rename, its numbered link, best.pt, the pruning
    ops = [c[0] + " " + c[-1] for c in steps]
    assert "replace ckpt.pt" in ops and "replace ckpt-8.pt" in ops and "remove ckpt-4.pt" in ops, ops
    assert n == len(steps) + 1 and n >= 6, (n, ops)
    print(f"final save: killed before each of its {len(steps)} file-system changes ({', '.join(ops)}), all repaired")


def test_resume_of_a_finished_run_repairs_a_kill_between_rename_and_links(tmp_path, char_data_dir, reference):
    """The case of issue 12.2 end to end: killed after ckpt.pt's rename, before its hard links; then
    init_from=resume on the finished run has nothing to train, but completes the file set."""
    final, out = FINAL_SAVE, tmp_path / "out"
    shutil.copytree(final["dir"], out)
    run_dir = RunDir(str(out), keep_last=2, best_val=final["best_val"], last_saved=final["last_saved"])
    real_link = os.link
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(checkpoint.os, "link", lambda *a: (_ for _ in ()).throw(Killed("link")))
        with pytest.raises(Killed):
            run_dir.save(final["iter_num"], final["val_loss"], **final["state"])
    assert os.link is real_link
    assert ckpt_iter(out / "ckpt.pt") == 8 and not (out / "ckpt-8.pt").exists()
    assert "ckpt-4.pt" in os.listdir(out)  # beyond keep_last until repaired
    printed = run_here(argv(char_data_dir, out, "init_from=resume"))
    assert "nothing to do" in printed
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))
    for name in os.listdir(reference):
        assert read(out / name) == read(reference / name), name


# -----------------------------------------------------------------------------
# 2. integrity: corrupted checkpoints, damaged fields, broken metrics files


def tensor_data_spans(path):
    """(entry name, file offset, length) of every tensor storage in a torch.save zip file: the records
    under archive/data/, stored uncompressed, located through their local file headers."""
    spans = []
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            if "/data/" not in info.filename or info.file_size == 0:
                continue
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            spans.append((info.filename, info.header_offset + 30 + name_len + extra_len, info.file_size))
    return spans


def test_a_flipped_bit_anywhere_in_tensor_data_is_refused(tmp_path, reference):
    """Issue 12.4: one bit flipped in any storage of the checkpoint (weights, optimizer moments, RNG
    states), at a random place in each, is refused with one line naming the file."""
    good = read(reference / "ckpt-8.pt")
    spans = tensor_data_spans(reference / "ckpt-8.pt")
    assert len(spans) > 30  # the model's tensors, both AdamW moments of each, the RNG states
    rng = random.Random(12)
    bad = tmp_path / "ckpt.pt"
    positions = [(name, off + rng.randrange(size)) for name, off, size in spans]
    positions += [(spans[0][0], spans[0][1]), (spans[-1][0], spans[-1][1] + spans[-1][2] - 1)]  # the edges
    for name, pos in positions:
        data = bytearray(good)
        data[pos] ^= 1 << rng.randrange(8)
        bad.write_bytes(bytes(data))
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(str(bad))
        msg = str(e.value)
        assert "\n" not in msg and str(bad) in msg and "is corrupt" in msg, (name, pos, msg)
        assert "copy it again" in msg
    bad.write_bytes(good)
    assert load_checkpoint(str(bad))["iter_num"] == 8  # the same bytes, unflipped, load


def test_a_corrupted_checkpoint_stops_the_resume(tmp_path, char_data_dir, reference, capsys):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    os.remove(out / "ckpt.pt")  # a hard link to ckpt-8.pt: corrupt a copy, not that file
    data = bytearray(read(reference / "ckpt.pt"))
    name, off, size = max(tensor_data_spans(reference / "ckpt.pt"), key=lambda s: s[2])
    data[off + size // 2] ^= 0x40  # an exponent bit of a weight: the kind of flip that made one 1.4e37
    (out / "ckpt.pt").write_bytes(bytes(data))
    main_fails(
        argv(char_data_dir, out, "init_from=resume"),
        capsys,
        f"{out}/ckpt.pt is corrupt",
        "other checkpoints there, newest first: ckpt-8.pt, ckpt-6.pt, best.pt",
    )


def damaged_copy(reference, out, damage):
    """out: a copy of the reference run whose ckpt.pt is damaged by damage(ckpt dict), with a valid
    checksum (a file written that way by a buggy version, not corrupted on disk)."""
    shutil.copytree(reference, out)
    os.remove(out / "ckpt.pt")
    ckpt = torch.load(reference / "ckpt.pt", weights_only=True)
    damage(ckpt)
    ckpt["checksum"] = payload_checksum(ckpt)
    torch.save(ckpt, out / "ckpt.pt")


DAMAGED_FIELDS = {
    "missing rng": (lambda c: c.pop("rng"), "it has no rng"),
    "rng without data": (lambda c: c["rng"].pop("data"), "its rng entry lacks the torch or data generator state"),
    "rng state of the wrong size": (
        lambda c: c["rng"].update(torch=c["rng"]["torch"][:100]),
        "its torch RNG state has shape (100,)",
    ),
    "optimizer group count": (
        lambda c: c["optimizer"].update(param_groups=c["optimizer"]["param_groups"][:1]),
        "its optimizer state has 1 parameter groups",
    ),
    "iter_num not an int": (lambda c: c.update(iter_num=-3), "its iter_num -3 is not an iteration"),
}


@pytest.mark.parametrize("case", DAMAGED_FIELDS)
def test_damaged_checkpoint_field_is_one_line(tmp_path, char_data_dir, reference, capsys, case):
    """Issue 12.6: each a line naming the file and what to do, before anything is restored."""
    damage, fragment = DAMAGED_FIELDS[case]
    out = tmp_path / "out"
    damaged_copy(reference, out, damage)
    main_fails(
        argv(char_data_dir, out, "init_from=resume", "max_iters=10"),
        capsys,
        f"{out}/ckpt.pt cannot be resumed: {fragment}",
        "Resume from another checkpoint",
    )


@pytest.mark.parametrize(
    "case,fragment",
    [
        ("binary", "holds binary data, not JSON lines"),
        ("not json", "line 1 is not JSON"),
        ("not records", "line 1 is not a metrics record"),
        ("directory", "is a directory, not the run's metrics file"),
    ],
)
def test_broken_metrics_file_on_resume_is_one_line(tmp_path, char_data_dir, reference, capsys, case, fragment):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    metrics = out / "metrics.jsonl"
    os.remove(metrics)
    if case == "binary":
        metrics.write_bytes(bytes(random.Random(0).randrange(128, 256) for _ in range(4096)))
    elif case == "not json":
        metrics.write_text("{{{ garbage\n" + read(reference / "metrics.jsonl").decode())
    elif case == "not records":
        metrics.write_text("[1, 2, 3]\n")
    else:
        os.makedirs(metrics)
    main_fails(
        argv(char_data_dir, out, "init_from=resume", "max_iters=10"), capsys, f"{metrics}", fragment, "and resume again"
    )


def test_failed_metrics_write_is_one_line_exit_1(tmp_path, char_data_dir):
    """Issue 12.3: metrics.jsonl on a full disk (/dev/full: every write fails with ENOSPC). One line,
    exit code 1, no traceback: not the OSError raised a second time when the file is closed."""
    out = tmp_path / "out"
    os.makedirs(out)
    os.symlink("/dev/full", out / "metrics.jsonl")
    p = subprocess.run(
        [sys.executable, "train.py", *argv(char_data_dir, out)],
        cwd=REPO,
        env=ONE_THREAD,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert p.returncode == 1, p.stderr[-3000:]
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.startswith(f"error: could not write {out}/metrics.jsonl (No space left on device)")
    assert "is full" in p.stderr and "continue with init_from=resume" in p.stderr


# -----------------------------------------------------------------------------
# 3. SIGTERM / SIGINT


def test_sigterm_checkpoints_at_step_boundary_exits_0_and_resumes_bit_exactly(tmp_path, char_data_dir, reference):
    out = tmp_path / "out"
    log = open(tmp_path / "stdout.txt", "w+")
    proc = subprocess.Popen(
        [sys.executable, "train.py", *argv(char_data_dir, out)],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=ONE_THREAD,
    )
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
    assert f"SIGTERM received: stopped at iteration {stopped}; saved: continue with init_from=resume" in printed
    assert ckpt_iter(out / "ckpt.pt") == stopped
    run_here(argv(char_data_dir, out, "init_from=resume"))
    assert read(out / "metrics.jsonl") == read(reference / "metrics.jsonl")


# forked ranks: torchrun's environment (env://: rank 0 hosts the rendezvous store, as in a bare launch)

EP_TINY = ["route_groups=2", "backend=gloo", "dist_timeout_s=60"]


def _rank_entry(fn, rank, world, port, results, args):
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    try:
        results.put((rank, "ok", fn(rank, world, *args)))
    except BaseException as e:  # SystemExit included: the message is what the tests check
        results.put((rank, "error", f"{type(e).__name__}: {e}", traceback.format_exc()))


def spawn(fn, world, *args, timeout=90, expect=None):
    """fn(rank, world, *args) on `world` forked ranks; returns {rank: ("ok", value) or ("error", message,
    traceback)} of the ranks in expect (default: all), failing if one is still running after timeout
    seconds (a hang). Every process it started is gone when it returns."""
    expect = set(range(world) if expect is None else expect)
    ctx = mp.get_context("fork")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank_entry, args=(fn, r, world, port, results, args)) for r in range(world)]
    for p in procs:
        p.start()
    got, deadline = {}, time.time() + timeout
    try:
        while not expect <= set(got):
            assert time.time() < deadline, f"ranks {sorted(expect - set(got))} still running after {timeout} s"
            try:
                rank, *res = results.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r in expect - set(got) if procs[r].exitcode not in (None, 0)]
                assert not (dead and results.empty()), f"rank(s) {dead} died without a result"
                continue
            got[rank] = tuple(res)
    finally:
        for r, p in enumerate(procs):
            if r in expect:  # the others were killed or stopped by the test: no use waiting for them
                p.join(timeout=max(1.0, deadline - time.time()))
            if p.is_alive():
                p.kill()  # SIGKILL ends a stopped process too
                p.join()
    return got


def ok_results(results):
    for r, res in sorted(results.items()):
        assert res[0] == "ok", f"rank {r} failed: {res[1]}\n{res[2]}"
    return [res[1] for _, res in sorted(results.items())]


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
# 4. non-finite loss or gradients


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
    ckpt = load_checkpoint(str(out / "ckpt.pt"))  # the run went on, and nothing it holds is nan
    assert ckpt["iter_num"] == 8
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert all(a == a for a in ckpt["coefficients"]["alpha"])  # a nan drop rate never reached eq. 7-9


def test_nonfinite_step_stops_the_run_without_writing(tmp_path, char_data_dir, monkeypatch):
    monkeypatch.setattr(train, "GPT", poisoned_gpt(layer=1, at_step=5))
    out = tmp_path / "out"
    msg = expect_error(
        argv(char_data_dir, out, "on_nonfinite=stop"),
        "MoE layer 1 went bad first",
        f"the last checkpoint, {out}/ckpt.pt (iteration 4), is untouched",
        "init_from=resume",
    )
    assert msg.startswith("iteration 5: non-finite values"), msg
    assert ckpt_iter(out / "ckpt.pt") == 4
    assert sorted(os.listdir(out)) == ["best.pt", "ckpt-2.pt", "ckpt-4.pt", "ckpt.pt", "metrics.jsonl"]
    assert max(r["iter"] for r in records(out)) == 4


def test_nonfinite_steps_in_a_row_stop_the_run(tmp_path, char_data_dir, monkeypatch):
    monkeypatch.setattr(train, "GPT", poisoned_gpt(layer=0, at_step=3, last_step=99))  # diverged for good
    msg = expect_error(
        argv(char_data_dir, tmp_path / "out", "max_skipped_steps=2"),
        "MoE layer 0 went bad first",
        "Stopped after 3 bad steps in a row (max_skipped_steps=2)",
        "(iteration 4), is untouched",
    )
    assert msg.startswith("iteration 5: non-finite values"), msg
    assert [r["iter"] for r in records(tmp_path / "out") if "skipped" in r] == [3, 4]


def test_a_run_that_skipped_every_step_is_an_error(tmp_path, char_data_dir, monkeypatch):
    """Issue 12.5: a setting that makes every step non-finite must not end a run with exit code 0."""
    monkeypatch.setattr(train, "GPT", poisoned_gpt(layer=0, at_step=1, last_step=99))
    expect_error(
        argv(char_data_dir, tmp_path / "out", "max_iters=3", "max_skipped_steps=10"),
        "every one of the 3 steps of this run was skipped",
    )


def test_nonfinite_gradient_names_the_parameter_and_changes_nothing():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16, n_expert=4, top_k=2)
    model = GPT(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tcfg = train.TrainConfig(grad_clip=1.0)
    x = torch.randint(32, (2, 9))
    model.blocks[0].attn.wv.weight.register_hook(lambda g: g * float("inf"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = train.train_step(
        model,
        optimizer,
        [(x[:, :-1], x[:, 1:])],
        AuxCoefficients(2),
        tcfg,
        torch.autocast("cpu", enabled=False),
        tp.TPGroups.local(),
    )
    assert "router statistics finite in every MoE layer" in step.problem
    assert "non-finite gradient in blocks.0.attn.wv.weight" in step.problem
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no update
    assert all(p.grad is None for p in model.parameters())  # grads dropped


# -----------------------------------------------------------------------------
# 5. bad inputs: one line that says what to do (in-process: the exception main() prints as one line;
#    the command line: test_cli_errors_are_one_line_without_traceback)


def copy_dataset(src_data_dir, dst, train_bin=None, vocab_size=None):
    root = dst / "shakespeare_char"
    shutil.copytree(os.path.join(src_data_dir, "shakespeare_char"), root)
    if train_bin is not None:
        (root / "train.bin").write_bytes(train_bin(read(root / "train.bin")))
    if vocab_size is not None:
        meta = json.loads((root / "meta.json").read_text())
        (root / "meta.json").write_text(json.dumps({**meta, "vocab_size": vocab_size}))
    return str(dst)


def test_missing_data_names_the_prepare_command(tmp_path):
    expect_error(
        argv(tmp_path / "nodata", tmp_path / "out"),
        "train.bin and",
        "not found",
        f"python {REPO}/data/shakespeare_char/prepare.py --out_dir {tmp_path}/nodata/shakespeare_char",
    )
    expect_error(argv(tmp_path / "nodata", tmp_path / "out", "dataset=mydata"), "has no prepare.py")


def test_truncated_data_file(tmp_path, char_data_dir):
    data_dir = copy_dataset(char_data_dir, tmp_path / "d", train_bin=lambda b: b[:-1])
    expect_error(argv(data_dir, tmp_path / "out"), "train.bin is truncated", "prepare.py")


def test_token_ids_beyond_the_vocabulary(tmp_path, char_data_dir):
    data_dir = copy_dataset(char_data_dir, tmp_path / "d", vocab_size=40)
    expect_error(
        argv(data_dir, tmp_path / "out"),
        "train.bin holds token id",
        "but vocab_size=40",
        "meta.json",
        "tokenized for another vocabulary",
    )


def test_block_size_longer_than_the_data(tmp_path, char_data_dir):
    expect_error(
        argv(char_data_dir, tmp_path / "out", "block_size=200000"),
        ".bin holds",
        "tokens, fewer than block_size+2=200002",
        "lower block_size",
    )


def test_checkpoint_of_another_model_config(tmp_path, char_data_dir, reference):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    vocab = load_checkpoint(str(reference / "ckpt.pt"))["model_config"]["vocab_size"]
    expect_error(
        argv(char_data_dir, out, "init_from=resume", "n_embd=32"),
        "n_embd=32 (command line), 64 in the checkpoint",
        f"tok_emb.weight ({vocab}, 64) -> ({vocab}, 32)",
        "drop these settings",
    )
    # a checkpoint whose tensors do not fit its own config (another version of model.py)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["model"]["blocks.0.attn.wq.weight"] = ckpt["model"]["blocks.0.attn.wq.weight"][:32]
    ckpt["checksum"] = payload_checksum(ckpt)
    torch.save(ckpt, out / "edited.pt")
    expect_error(
        argv(char_data_dir, tmp_path / "out2", f"init_from={out}/edited.pt"),
        "does not fit the model its config describes",
        "blocks.0.attn.wq.weight is (32, 64) there, (64, 64)",
    )


def test_checkpoints_that_are_not_ours_or_broken(tmp_path, char_data_dir, reference):
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    expect_error(
        argv(char_data_dir, tmp_path / "o1", f"init_from={tmp_path}/random.pt"), "is not a readable checkpoint"
    )
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    expect_error(
        argv(char_data_dir, tmp_path / "o2", f"init_from={tmp_path}/foreign.pt"), "is not a checkpoint of this project"
    )
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    os.remove(out / "ckpt.pt")  # a hard link to ckpt-8.pt: write a truncated copy, not into that file
    (out / "ckpt.pt").write_bytes(read(reference / "ckpt.pt")[:100_000])
    expect_error(
        argv(char_data_dir, out, "init_from=resume"),
        "is not a readable checkpoint",
        "other checkpoints there, newest first: ckpt-8.pt, ckpt-6.pt, best.pt",
        f"ln -f {out}/ckpt-8.pt",
    )
    expect_error(argv(char_data_dir, tmp_path / "empty", "init_from=resume"), "nothing to resume")
    weights_only = load_checkpoint(str(reference / "ckpt.pt"))
    os.makedirs(tmp_path / "w")
    weights_only = {**weights_only, "optimizer": None, "coefficients": None}
    torch.save({**weights_only, "checksum": payload_checksum(weights_only)}, tmp_path / "w" / "ckpt.pt")
    expect_error(
        argv(char_data_dir, tmp_path / "w", "init_from=resume"), "holds weights only", f"init_from={tmp_path}/w/ckpt.pt"
    )


def test_out_dir_not_writable(tmp_path, char_data_dir):
    (tmp_path / "a_file").write_text("")
    expect_error(argv(char_data_dir, tmp_path / "a_file" / "out"), "is not writable", "choose another out_dir")


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
    expect_error(
        argv(char_data_dir, out),
        f"could not write {out}/ckpt.pt (No space left on device)",
        "is full: free space there",
        f"{out}/ckpt.pt holds the last complete checkpoint",
        "init_from=resume",
    )
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt_iter(out / "ckpt.pt") == 2 and not (out / "ckpt.pt.tmp").exists()


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    """The real command line (config errors: tests/test_bad_inputs.py)."""
    p = subprocess.run(
        [sys.executable, "train.py", f"data_dir={tmp_path}/nodata", f"out_dir={tmp_path}/out"],
        cwd=REPO,
        env=ONE_THREAD,
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = one_stderr_line(p)
    assert line.startswith("error: ") and "prepare.py --out_dir" in line


# -----------------------------------------------------------------------------
# 6. distributed faults


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
    assert [results[r][0] for r in (0, 1)] == ["error", "error"], results
    assert results[1][1] == "RuntimeError: injected fault in the all-to-all"
    assert results[0][1].startswith("RankFailure: rank 1 failed: RuntimeError: injected fault in the all-to-all")
    assert "\n" not in results[0][1]
    assert elapsed < 30, f"{elapsed:.0f} s: the ranks waited for the timeout instead of stopping at once"


# A run long enough to be mid-step when a rank is stopped or killed, and nothing saved meanwhile
LONG = ["max_iters=100000", "eval_interval=100000", "save_checkpoint=false", "log_interval=1"]


def _killed_at(rank, world, args, victim, at_iter, stamp, sig=signal.SIGKILL):
    """train.main on a forked rank, as the command line runs it; rank victim sends itself sig in iteration
    at_iter (SIGKILL: the OOM killer, a node going away; SIGSTOP: a hang), after writing the time to
    stamp. Returns (exit code, stderr, time of exit)."""
    if rank == victim:
        real_lr_at = train.lr_at

        def lr_at(it, tcfg):
            if it == at_iter:
                with open(stamp, "w") as f:
                    f.write(repr(time.time()))
                os.kill(os.getpid(), sig)
            return real_lr_at(it, tcfg)

        train.lr_at = lr_at
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            train.main(args)
            code = 0
        except SystemExit as e:
            code = e.code
    return code, err.getvalue(), time.time()


@pytest.mark.parametrize("world,victim", [(2, 1), (4, 2)])
def test_sigkilled_rank_is_named_by_every_survivor_within_seconds(tmp_path, char_data_dir, world, victim):
    """Issue 12.7: gloo breaks the survivors' collectives off at once (the connection closes); each then
    finds the rank whose heartbeat stood still and prints one line naming it, not its own rank."""
    # world 4: 2 EP groups of 2, rank 2 in the second; 2 data-parallel replicas (EDP groups {0, 2}, {1, 3})
    args = argv(char_data_dir, tmp_path / "out", *EP_TINY, *LONG, "route_groups=0", preset=EP2_PRESET)
    stamp = tmp_path / "killed_at"
    survivors = [r for r in range(world) if r != victim]
    results = spawn(_killed_at, world, args, victim, 3, str(stamp), timeout=120, expect=survivors)
    for r in survivors:
        assert results[r][0] == "ok", results[r]
        assert stamp.exists(), (r, results[r][1][1])  # the victim reached its iteration 3
    killed_at = float(stamp.read_text())
    for r in survivors:
        code, err, ended = results[r][1]
        assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, (r, err)
        assert err.startswith(f"error: rank {victim} failed: it stopped responding"), (r, err)
        assert f"(rank {r} stopped with it" in err, (r, err)
        assert ended - killed_at < 15, f"rank {r} took {ended - killed_at:.1f} s"  # dist_timeout_s is 60
        print(f"world {world}: rank {r} exited {ended - killed_at:.1f} s after rank {victim} was killed")


def _only_rank_0(rank, world, args):
    if rank == 0:  # rank 1 was never started (a typo in the launch script, a node that did not come up)
        return _killed_at(rank, world, args, None, None, None)


def test_a_rank_that_never_starts_is_one_line(tmp_path, char_data_dir):
    args = argv(char_data_dir, tmp_path / "out", *EP_TINY, "dist_timeout_s=2", preset=EP2_PRESET)
    code, err, _ = ok_results(spawn(_only_rank_0, 2, args, timeout=30, expect=[0]))[0]
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("error: the 2 ranks did not all meet at 127.0.0.1:") and "start every rank" in err, err


# In a bare env:// launch rank 0 hosts the rendezvous store, where find_culprit reads the heartbeats:
# with it gone the survivor must not re-raise its own RuntimeError (a traceback), and with it stopped
# every store call blocks for ever (a TCPStore call to a host that hangs has no timeout), so the
# store is read from a thread bounded in time
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["SIGKILL", "SIGSTOP"])
def test_rank_0_hosting_the_store_is_named_when_it_dies_or_hangs(tmp_path, char_data_dir, sig):
    timeout_s = 3
    args = argv(char_data_dir, tmp_path / "out", *EP_TINY, *LONG, f"dist_timeout_s={timeout_s}", preset=EP2_PRESET)
    stamp = tmp_path / "killed_at"
    results = spawn(_killed_at, 2, args, 0, 3, str(stamp), sig, timeout=25, expect=[1])
    assert results[1][0] == "ok", results[1]
    code, err, ended = results[1][1]
    line = err.strip().splitlines()[-1] if err.strip() else ""
    assert code == 1 and "Traceback" not in err and line.startswith("error: rank 0 failed: the rendezvous store"), err
    assert ended - float(stamp.read_text()) < timeout_s + 10


def test_stopped_rank_ends_its_peer_within_dist_timeout_s(tmp_path, char_data_dir):
    """Issue 12.1: a bare env:// launch of train.py on 2 ranks, rank 1 SIGSTOPped mid-run (a wedged GPU,
    a paused VM): it keeps its connections open, so only the timeout can end rank 0's collective. Rank
    0 must exit within dist_timeout_s plus the heartbeat check, with one line naming rank 1."""
    timeout_s, port, out = 8, free_port(), tmp_path / "out"
    args = argv(char_data_dir, out, *EP_TINY, *LONG, f"dist_timeout_s={timeout_s}", preset=EP2_PRESET)
    procs = []
    for rank in range(2):
        env = {
            **ONE_THREAD,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "train.py", *args],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() or (out / "metrics.jsonl").read_text().count('"loss"') < 2:
            assert all(p.poll() is None for p in procs) and time.time() < deadline, "the run did not start"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGSTOP)
        t0 = time.time()
        _, err = procs[0].communicate(timeout=timeout_s + 60)
        elapsed = time.time() - t0
    finally:
        for p in procs:
            p.kill()  # SIGKILL ends a stopped process too
            p.wait()
    assert procs[0].returncode == 1 and err.count("\n") == 1 and "Traceback" not in err, err[-3000:]
    assert err.startswith("error: rank 1 failed: it stopped responding"), err
    assert elapsed < timeout_s + 10, f"rank 0 took {elapsed:.1f} s with dist_timeout_s={timeout_s}"
    print(f"rank 0 exited {elapsed:.1f} s after rank 1 was stopped (dist_timeout_s={timeout_s})")
