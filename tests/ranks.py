"""Starting ranks for the multi-process tests: forked processes with torchrun's environment variables
(the fork start method starts 2 ranks in about 3 s), each rank's result or error collected in rank
order, and a hang turned into a failing test instead of a stuck run.

    spawn(fn, world, *args)      fn(rank, world, *args) on `world` ranks -> [("ok", value) or
                                 ("error", message, traceback)], rank order
    ok_results(results)          the values, after asserting that every rank succeeded
    torch_threads(n)             this process's CPU threads, for a one-process reference beside them
"""

import contextlib
import datetime
import os
import queue
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from expert_parallel import free_port


def _rank_entry(fn, rank, world, port, results_queue, args, gloo):
    torch.set_num_threads(1)  # two cores shared by all ranks
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))  # fmt: skip
    try:
        if gloo:
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        try:
            results_queue.put((rank, "ok", fn(rank, world, *args)))
        finally:
            if gloo:
                dist.destroy_process_group()
    except BaseException as e:  # SystemExit included: the message is what the tests check
        results_queue.put((rank, "error", f"{type(e).__name__}: {e}", traceback.format_exc()))


def spawn(fn, world, *args, timeout=90, gloo=False):
    """Run fn(rank, world, *args) on `world` forked processes (gloo: inside a started gloo process group).
    Fails if a rank is still running after `timeout` seconds (a hang), killing the processes it started."""
    ctx = mp.get_context("fork")
    results_queue, port = ctx.Queue(), free_port()
    procs = [
        ctx.Process(target=_rank_entry, args=(fn, r, world, port, results_queue, args, gloo)) for r in range(world)
    ]
    for p in procs:
        p.start()
    results, deadline = {}, time.time() + timeout
    try:
        while len(results) < world:
            if time.time() > deadline:
                running = sorted(set(range(world)) - set(results))
                raise AssertionError(f"ranks {running} still running after {timeout} s: a hang")
            try:
                rank, *res = results_queue.get(timeout=0.5)
            except queue.Empty:
                # a rank that exited put its result first (the queue is flushed at exit)
                dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode not in (None, 0)]
                if dead and results_queue.empty():
                    raise AssertionError(f"rank(s) {dead} died without a result") from None
                continue
            results[rank] = tuple(res)
    finally:
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.time()))
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world)]


def ok_results(results):
    for r, res in enumerate(results):
        assert res[0] == "ok", f"rank {r} failed: {res[1]}\n{res[2]}"
    return [res[1] for res in results]


@contextlib.contextmanager
def torch_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
