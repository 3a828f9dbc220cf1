"""Run a function on N spawned CPU processes joined by a gloo process group, and collect what each returns.

Why not ``torch.multiprocessing.start_processes``: on this CPU build of torch a gloo process
sometimes aborts in its interpreter teardown ("terminate called without an active exception",
SIGABRT) after its work is done and checked, and ``start_processes`` then reports a failure that
has nothing to do with the code under test. Here each rank

1. joins the group, runs ``fn(rank, *args)``, and meets the other ranks at a barrier,
2. sends its return value (or its traceback) to the parent over a pipe,
3. leaves with ``os._exit(0)``, so the teardown that aborts never runs.

A Python error in a rank fails the run with every rank's traceback. A rank that dies without
reporting (a signal before step 2; the other ranks then fail on a closed connection) makes the
attempt count as a crash: it is retried, ``attempts`` times in all, and the exit codes are reported
if every attempt crashes.
"""

from __future__ import annotations

import datetime
import io
import os
import socket
import sys
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank, world, port, fn, args, queue):
    try:
        import torch.distributed as dist

        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
        result = fn(rank, *args)
        dist.barrier()  # no rank leaves while another may still need it in a collective
        buf = io.BytesIO()
        torch.save(result, buf)  # plain bytes: nothing shared-memory that dies with this process
        queue.put((rank, True, buf.getvalue()))
    except BaseException:
        queue.put((rank, False, f"rank {rank}:\n{traceback.format_exc()}"))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def run_gloo_ranks(fn, *args, world: int = 2, timeout: float = 300.0, attempts: int = 3) -> list:
    """``[fn(0, *args), ..., fn(world - 1, *args)]``, each run in its own gloo rank (see the module doc).

    ``fn`` must be importable by name (a module-level function of a test module).
    """
    ctx = mp.get_context("spawn")
    crashes = []
    for _ in range(attempts):
        queue = ctx.SimpleQueue()
        port = free_port()
        procs = [ctx.Process(target=_rank_entry, args=(r, world, port, fn, args, queue)) for r in range(world)]
        for p in procs:
            p.start()
        results: dict[int, object] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        try:
            # Drain reports until every rank has exited: when one rank fails, the others usually
            # fail next (their peer's sockets close), and a crash must be told from an error.
            while True:
                if not queue.empty():
                    rank, ok, payload = queue.get()
                    if ok:
                        results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
                    else:
                        errors[rank] = payload
                elif all(p.exitcode is not None for p in procs):
                    break
                elif time.monotonic() > deadline:
                    pytest.fail(f"the {world}-process gloo run did not finish within {timeout:.0f} s "
                                f"(ranks that reported: {sorted(results)})\n" + "\n".join(errors.values()),
                                pytrace=False)
                else:
                    time.sleep(0.02)
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
        silent = {r: p.exitcode for r, p in enumerate(procs) if r not in results and r not in errors}
        if silent:  # a rank died before reporting; the others' errors may only be its echo
            crashes.append(silent)
            continue
        if errors:
            pytest.fail("\n".join(errors[r] for r in sorted(errors)), pytrace=False)
        if len(results) == world:
            return [results[r] for r in range(world)]
    pytest.fail(f"every one of {attempts} attempts had a rank die without a Python error; "
                f"exit codes of the ranks that did not report, per attempt: {crashes}")
