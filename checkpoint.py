"""
Checkpoints: one format, atomic writes, an integrity checksum, retention, and loading with clear errors.

A checkpoint is one torch.save'd dict (format CHECKPOINT_FORMAT): the model's full state (unwrapped,
uncompiled, full expert tensors whatever ep_size wrote it), the optimizer state, both configs, the
iteration, the val losses, the adaptive coefficients and the RNG states including the data position.
A run's out_dir holds

    ckpt.pt           the latest: what init_from=resume reads
    ckpt-<iter>.pt    the last keep_last checkpoints (the newest is ckpt.pt under another name)
    best.pt           the checkpoint with the lowest val loss
    metrics.jsonl     one JSON line per logged step (train.py), trimmed back to ckpt.pt on resume

Every file is written under a temp name, fsynced and renamed over its final name (atomic on POSIX), so
a process killed at any moment leaves each name holding a complete file, the old one or the new one.
The extra names are hard links to ckpt.pt's data, so keeping them costs no write and no disk. A kill
between the steps of a save leaves the set incomplete, never a checkpoint missing; RunDir.repair,
which every resume runs, completes it.

Integrity: a SHA-256 over every tensor's bytes and every other value is stored in the file and checked
on load, so a flipped bit anywhere in the payload is refused instead of resumed. Files written before
the checksum existed load without the check.

Library code: errors are CheckpointError with a one-line message saying what to do; only the main()
functions print and exit.
"""

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil

import torch
import torch.distributed as dist

from model import GPT, ModelConfig

CHECKPOINT_FORMAT = "skywork-moe-edu/1"
LATEST, BEST, METRICS = "ckpt.pt", "best.pt", "metrics.jsonl"
NUMBERED = re.compile(r"ckpt-(\d+)\.pt")


class CheckpointError(Exception):
    pass


# -----------------------------------------------------------------------------
# writing one file atomically


def io_error(path, e):
    """What went wrong writing path (an OSError), and what to do about it, in one line."""
    where = os.path.dirname(os.path.abspath(path))
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        todo = f"the disk holding {where} is full: free space there, or point out_dir at another disk"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        todo = f"{where} is not writable: fix its permissions, or choose another out_dir"
    else:
        todo = f"check the file system holding {where}"
    return f"could not write {path} ({e.strerror or e}): {todo}"


def write_atomically(path, write):
    """write(tmp) creates the complete file tmp, which then replaces path in one rename. If anything
    fails (an OSError: disk full, permissions) the temp file is removed, path keeps what it held, and
    the error propagates."""
    tmp = path + ".tmp"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)  # left by a write that was killed
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not every platform can)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _save_synced(state, tmp):
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the rename makes them visible


def _link_or_copy(src):
    def write(tmp):
        try:
            os.link(src, tmp)
        except OSError:  # a file system without hard links
            shutil.copyfile(src, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())

    return write


# -----------------------------------------------------------------------------
# integrity: one digest over the whole payload


def payload_checksum(state):
    """SHA-256 over everything in a checkpoint dict but its "checksum" entry: keys, tensor dtypes, shapes
    and bytes, and the repr of every other value, in a fixed order. Same content, same digest."""
    h = hashlib.sha256()

    def feed(key, v):
        h.update(key.encode())
        if torch.is_tensor(v):
            t = v.detach().cpu().contiguous().reshape(-1)
            h.update(f"{t.dtype}{tuple(v.shape)}".encode())
            h.update(memoryview(t.view(torch.uint8).numpy()))
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                feed(f"{key}/{k}", v[k])
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                feed(f"{key}[{i}]", x)
        else:
            h.update(repr(v).encode())

    for k in sorted(state):
        if k != "checksum":
            feed(k, state[k])
    return h.hexdigest()


# -----------------------------------------------------------------------------
# one checkpoint file


def save_checkpoint(
    path,
    *,
    model_state,
    model_cfg,
    train_cfg,
    optimizer_state=None,
    iter_num=0,
    best_val_loss=float("inf"),
    val_loss=None,
    coefficients=None,
    rng=None,
):
    """Write one checkpoint atomically. model_state / optimizer_state are full state dicts (under expert
    parallelism the gathered ones, so the file is the same whatever ep_size wrote it); coefficients:
    AuxCoefficients.state_dict(); rng: {"torch", "data", "cuda"}. None for what a weights-only file
    (upcycle.py) does not have. On an OSError path keeps what it held and the error propagates."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": model_state,
        "optimizer": optimizer_state,
        "model_config": dataclasses.asdict(model_cfg),
        "train_config": train_cfg if isinstance(train_cfg, dict) else dataclasses.asdict(train_cfg),
        "iter_num": iter_num,
        "best_val_loss": best_val_loss,
        "val_loss": val_loss,
        "coefficients": coefficients,
        "rng": rng,
    }
    state["checksum"] = payload_checksum(state)
    write_atomically(path, lambda tmp: _save_synced(state, tmp))


def numbered_checkpoints(out_dir):
    """{iteration: path} of the ckpt-<iter>.pt files in out_dir."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    return {int(m.group(1)): os.path.join(out_dir, n) for n in names if (m := NUMBERED.fullmatch(n))}


def other_checkpoints(path):
    """The rest of a message about a missing or bad checkpoint: the others beside it, newest first."""
    d = os.path.dirname(path) or "."
    numbered = sorted(numbered_checkpoints(d).items(), reverse=True)
    others = [p for _, p in numbered] + ([os.path.join(d, BEST)] if os.path.isfile(os.path.join(d, BEST)) else [])
    others = [p for p in others if os.path.abspath(p) != os.path.abspath(path)]
    if not others:
        return ""
    how = (
        f" (`ln -f {others[0]} {path}` makes the newest the one init_from=resume reads)"
        if os.path.basename(path) == LATEST
        else ""
    )
    return f"; other checkpoints there, newest first: {', '.join(os.path.basename(p) for p in others)}{how}"


def load_checkpoint(path):
    """The checkpoint dict at path, on the CPU (memory-mapped: ranks of one node share the page cache
    instead of each holding a copy), after checking that it is ours and intact."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found" + other_checkpoints(path))
    try:
        # weights_only: tensors and plain containers only (all a checkpoint of ours holds), so loading
        # a file that is not ours cannot run code
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, corrupt, or another kind of file
        text = str(e).split("WeightsUnpickler error:")[-1]  # past torch's advice to load it unsafely
        detail = next((line.strip() for line in text.splitlines() if line.strip()), "").split(". ")[0][:160]
        raise CheckpointError(
            f"{path} is not a readable checkpoint: truncated, corrupt, or not written by this project "
            f"({type(e).__name__}: {detail})" + other_checkpoints(path)
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a checkpoint of this project (no format {CHECKPOINT_FORMAT!r}): "
            "pass a file written by train.py or upcycle.py"
        )
    if "checksum" in ckpt and ckpt["checksum"] != payload_checksum(ckpt):
        raise CheckpointError(
            f"{path} is corrupt: its contents do not match the checksum written with it (a flipped bit on "
            "disk or in a copy); do not resume from it: copy it again from where it came from, or use "
            "another checkpoint" + other_checkpoints(path)
        )
    return ckpt


def resume_state_problem(ckpt, optimizer, data_gen):
    """Why the run state of a checkpoint cannot be restored into this optimizer and data generator
    (None: it can), checked before anything is changed, so a damaged field is a message and not a
    traceback halfway through restoring."""
    missing = [k for k in ("optimizer", "coefficients", "rng", "iter_num", "best_val_loss") if ckpt.get(k) is None]
    if missing:
        return f"it has no {', '.join(missing)}"
    rng, opt = ckpt["rng"], ckpt["optimizer"]
    if not isinstance(rng, dict) or not all(torch.is_tensor(rng.get(k)) for k in ("torch", "data")):
        return "its rng entry lacks the torch or data generator state"
    for name, want in (("torch", torch.get_rng_state()), ("data", data_gen.get_state())):
        if rng[name].dtype != want.dtype or rng[name].shape != want.shape:
            return f"its {name} RNG state has shape {tuple(rng[name].shape)}, not {tuple(want.shape)}"
    if not isinstance(opt, dict) or len(opt.get("param_groups", ())) != len(optimizer.param_groups):
        have = len(opt.get("param_groups", ())) if isinstance(opt, dict) else "no"
        return f"its optimizer state has {have} parameter groups, this optimizer {len(optimizer.param_groups)}"
    if not isinstance(ckpt["iter_num"], int) or ckpt["iter_num"] < 0:
        return f"its iter_num {ckpt['iter_num']!r} is not an iteration"
    return None


# -----------------------------------------------------------------------------
# the state against the model


def checkpoint_model_config(ckpt, where="the checkpoint"):
    try:
        return ModelConfig(**ckpt["model_config"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"{where}: its model config does not fit this model.py ({e}): it was written by another version of the code"
        ) from None


def shapes_of(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def state_mismatches(want, have):
    """How two {name: shape} tables differ: (names only in want, names only in have,
    [(name, shape in have, shape in want)] for the names whose shapes differ)."""
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    wrong = [(k, have[k], want[k]) for k in want if k in have and have[k] != want[k]]
    return missing, extra, wrong


def check_state_fits(model, state, where="the checkpoint"):
    """Every name and shape of state against the model's, before load_state_dict (whose error is a wall
    of text). A mismatch means the file was written by another version of model.py, or edited."""
    missing, extra, wrong = state_mismatches(shapes_of(model.state_dict()), shapes_of(state))
    problems = [f"{k} is {h} there, {w} in the model" for k, h, w in wrong]
    problems += [f"{k} is missing" for k in missing]
    problems += [f"{k} is not in the model" for k in extra]
    if problems:
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise CheckpointError(
            f"{where} does not fit the model its config describes: {'; '.join(problems[:4])}{more}. "
            "It was written by another version of model.py"
        )


def model_config_conflicts(model_cfg, ckpt_cfg, sources):
    """Model settings given in a config file or on the command line that differ from a checkpoint's,
    and the parameter shapes they would change: a run from a checkpoint keeps its model, so these
    would be silently ignored. Returns the parts of a message (empty: no conflict)."""
    keys = [
        f.name
        for f in dataclasses.fields(ModelConfig)
        if f.name in sources and getattr(model_cfg, f.name) != getattr(ckpt_cfg, f.name)
    ]
    if not keys:
        return []
    parts = [f"{k}={getattr(model_cfg, k)!r} ({sources[k]}), {getattr(ckpt_cfg, k)!r} in the checkpoint" for k in keys]
    mine = model_cfg if "vocab_size" in keys else dataclasses.replace(model_cfg, vocab_size=ckpt_cfg.vocab_size)
    with torch.device("meta"):  # shapes only: no memory, whatever the size
        only_ckpt, only_cfg, wrong = state_mismatches(
            shapes_of(GPT(ckpt_cfg).state_dict()), shapes_of(GPT(mine).state_dict())
        )
    shapes = [f"{k} {w} -> {h}" for k, h, w in wrong]
    shapes += [f"{k} only in the checkpoint" for k in only_ckpt]
    shapes += [f"{k} only in the config" for k in only_cfg]
    if shapes:
        more = f" (and {len(shapes) - 4} more)" if len(shapes) > 4 else ""
        parts.append(f"parameter shapes that differ: {', '.join(shapes[:4])}{more}")
    return parts


def model_from_checkpoint(ckpt, device="cpu", where="the checkpoint"):
    model = GPT(checkpoint_model_config(ckpt, where))
    check_state_fits(model, ckpt["model"], where)
    model.load_state_dict(ckpt["model"])
    return model.to(device)


def model_view(model_cfg, state):
    """A GPT whose parameters are the tensors of a full state dict (no copy: built on the meta device,
    then assigned), for full-model statistics such as expert similarity under expert parallelism."""
    with torch.device("meta"):
        view = GPT(model_cfg)
    view.load_state_dict(state, assign=True)
    return view


def open_checkpoint(path, model_cfg, sources, resuming):
    """The checkpoint a run starts from, checked before any memory is spent on it: a resumed run needs
    its optimizer and coefficients, and keeps its model, so model settings given (sources) that differ
    from the checkpoint's are an error; a run started from weights only notes them. Returns (ckpt,
    its ModelConfig, the note: "" when nothing was overridden)."""
    ckpt = load_checkpoint(path)
    if resuming and any(ckpt.get(k) is None for k in ("optimizer", "coefficients")):
        raise CheckpointError(
            f"{path} holds weights only (as upcycle.py writes them), not a run to resume: start a run from it "
            f"with init_from={path}"
        )
    cfg = checkpoint_model_config(ckpt, path)
    conflicts = model_config_conflicts(model_cfg, cfg, sources)
    if conflicts and resuming:
        raise CheckpointError(
            f"{path} holds a model of another config: {'; '.join(conflicts)}. A resumed run keeps its "
            "checkpoint's model: drop these settings, or start a new run in another out_dir"
        )
    with torch.device("meta"):  # names and shapes, before any memory is spent on them
        check_state_fits(GPT(cfg), ckpt["model"], path)
    return ckpt, cfg, "; ".join(conflicts)


def cuda_rng_states(world_size):
    """Each rank's own GPU generator state, gathered (rank order) for rank 0 to save; None on CPU."""
    if not torch.cuda.is_available():
        return None
    states = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(states, torch.cuda.get_rng_state())
    else:
        states[0] = torch.cuda.get_rng_state()
    return states


def restore_rng(rng, data_gen, rank):
    """The CPU and data generators, and this rank's own GPU generator: a run saved by more ranks (or
    with more visible GPUs) than this one has states to spare, and one saved by fewer repeats them."""
    torch.set_rng_state(rng["torch"])
    data_gen.set_state(rng["data"])
    cuda = rng.get("cuda")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda[rank % len(cuda)])


# -----------------------------------------------------------------------------
# a run's directory: its checkpoints, their retention, and its metrics file


class RunDir:
    """The files of one training run in out_dir, and the policy for keeping them. A new run replaces an
    earlier run's checkpoints in the same out_dir only once its own first one is complete (`stale`)."""

    def __init__(self, out_dir, keep_last=2, best_val=float("inf"), last_saved=None):
        self.out_dir, self.keep_last = out_dir, keep_last
        self.best_val = best_val  # the lowest val loss of a saved checkpoint
        self.last_saved = last_saved  # the iteration of the newest complete checkpoint; None: none
        self.latest = os.path.join(out_dir, LATEST)
        self.metrics_path = os.path.join(out_dir, METRICS)
        self.stale = []

    def prepare(self, resuming):
        """Create out_dir and prove it writable now, not at the first save hours in; remove the temp
        files of a save that was killed; for a new run, note the earlier run's files it will replace."""
        try:
            os.makedirs(self.out_dir, exist_ok=True)
            probe = os.path.join(self.out_dir, ".write-probe.tmp")
            with open(probe, "w"):
                pass
            os.remove(probe)
            for name in os.listdir(self.out_dir):
                final = name.removesuffix(".tmp")
                if final != name and (NUMBERED.fullmatch(final) or final in (LATEST, BEST, METRICS)):
                    os.remove(os.path.join(self.out_dir, name))
        except OSError as e:
            raise CheckpointError(
                f"out_dir={self.out_dir!r} is not writable ({e.strerror or e}): choose another out_dir, or fix "
                "its permissions (or free space on its disk)"
            ) from None
        if not resuming:
            self.stale = list(numbered_checkpoints(self.out_dir).values())
            self.stale += [p for p in [os.path.join(self.out_dir, BEST), self.latest] if os.path.exists(p)]
        return self.stale

    def save(self, iter_num, val_loss=None, **state):
        """A training run's save: ckpt.pt, then the earlier run's files go, then the other names, then
        the pruning. val_loss: this iteration's, if it was evaluated (best.pt follows the lowest).
        state: save_checkpoint's other keyword arguments."""
        is_best = val_loss is not None and val_loss < self.best_val
        best_val = val_loss if is_best else self.best_val
        save_checkpoint(self.latest, iter_num=iter_num, best_val_loss=best_val, val_loss=val_loss, **state)
        self.best_val, self.last_saved = best_val, iter_num
        for path in self.stale:
            if path != self.latest:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
        self.stale = []
        self._complete(iter_num, is_best)

    def repair(self, ckpt):
        """Complete the file set around ckpt.pt (ckpt: its loaded dict) after a kill mid-save: its
        numbered name, best.pt if it is the best, the pruning. Run by every resume; idempotent."""
        val, best = ckpt.get("val_loss"), ckpt["best_val_loss"]
        self._complete(ckpt["iter_num"], val is not None and val <= best)

    def _complete(self, iter_num, is_best):
        if self.keep_last:
            self._link(os.path.join(self.out_dir, f"ckpt-{iter_num}.pt"))
        if is_best:
            self._link(os.path.join(self.out_dir, BEST))
        numbered = numbered_checkpoints(self.out_dir)
        # numbered files past this iteration belong to a run resumed from an older checkpoint: they go too
        keep = sorted(i for i in numbered if i <= iter_num)[-self.keep_last :] if self.keep_last else []
        for i, path in numbered.items():
            if i not in keep:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)

    def _link(self, path):
        with contextlib.suppress(OSError):
            if os.path.samefile(path, self.latest):
                return  # already there: a repair that has nothing to do writes nothing
        write_atomically(path, _link_or_copy(self.latest))

    def last_good(self):
        if self.last_saved is None:
            return "this run saved no checkpoint"
        return f"the last checkpoint, {self.latest} (iteration {self.last_saved}), is untouched"

    def trim_metrics(self, iter_num):
        """A resumed run's metrics.jsonl: drop the records past its checkpoint (written after the last
        save by a run that was then killed) and a torn last line, so the file reads as if the run had
        never stopped: no step twice."""
        path = self.metrics_path
        if not os.path.exists(path):
            return
        what = f"move {path} away (or delete it) and resume again; the checkpoints are unaffected"
        kept = []
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
        except IsADirectoryError:
            raise CheckpointError(f"{path} is a directory, not the run's metrics file: {what}") from None
        except UnicodeDecodeError:
            raise CheckpointError(f"{path} holds binary data, not JSON lines: {what}") from None
        except OSError as e:
            raise CheckpointError(f"{path} cannot be read ({e.strerror or e}): {what}") from None
        for i, line in enumerate(lines):
            try:
                rec = json.loads(line)
            except ValueError:
                if i == len(lines) - 1:
                    continue  # a torn last line: the run was killed while writing it
                raise CheckpointError(f"{path} line {i + 1} is not JSON: {what}") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("iter", 0), int):
                raise CheckpointError(f"{path} line {i + 1} is not a metrics record: {what}")
            if rec.get("iter", 0) <= iter_num:
                kept.append(line if line.endswith("\n") else line + "\n")

        def write(tmp):
            with open(tmp, "w") as f:
                f.writelines(kept)

        try:
            write_atomically(path, write)
        except OSError as e:
            raise CheckpointError(f"{io_error(path, e)}; {path} and the checkpoints are unchanged") from None


class MetricsLog:
    """out_dir/metrics.jsonl, one JSON line per record, flushed as written. A failed write (a full disk)
    is one CheckpointError, raised once: the file is closed quietly afterwards, so the error is not
    raised a second time, chained, when the run unwinds."""

    def __init__(self, path, append):
        try:
            self.f = open(path, "a" if append else "w")
        except OSError as e:
            raise CheckpointError(io_error(path, e)) from None
        self.path = path

    def write(self, rec):
        try:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()
        except OSError as e:
            self.close()
            raise CheckpointError(
                f"{io_error(self.path, e)}; the checkpoints are intact: once fixed, continue with init_from=resume"
            ) from None

    def close(self):
        with contextlib.suppress(OSError):
            self.f.close()
