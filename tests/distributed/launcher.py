"""Run a function on several gloo processes from inside pytest.

``run_distributed(fn, world_size, *args)`` spawns one process per rank, initializes a gloo process
group on 127.0.0.1 in each, calls ``fn(rank, world_size, *args, **kwargs)`` and returns the
ranks' return values in rank order. Any failure (an exception, a crash, a hang) becomes one
AssertionError that shows every failing rank's traceback, so a test failure reads like a
single-process one.

``fn`` must be importable by the children (a module-level function), and its arguments and
return value picklable.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# After one rank fails, the others usually block in a collective waiting for it; give them
# this long to finish or fail on their own before they are killed.
GRACE_AFTER_FAILURE_S = 5.0


def free_port() -> int:
    """A port that was free a moment ago (the OS picks it; a race with others is unlikely)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(
    rank: int,
    world_size: int,
    port: int,
    results: Any,
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
) -> None:
    # More than one thread per process on the 2-core CI machines is many times slower.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
        )
        try:
            value = fn(rank, world_size, *args, **kwargs)
        finally:
            dist.destroy_process_group()
        # Pickle here, not in the queue's feeder thread, so that an unpicklable result is
        # reported as this rank's error instead of vanishing.
        payload = ("ok", pickle.dumps(value))
    except BaseException:
        payload = ("error", traceback.format_exc())
    results.put((rank, *payload))


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120, **kwargs: Any
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks.

    Returns the ranks' return values in rank order. Raises AssertionError naming every rank
    that raised (with its full traceback), died, or did not finish within ``timeout`` seconds.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    # Children inherit the environment at start; OMP_NUM_THREADS must be set before their
    # torch import creates the OpenMP pool.
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    procs = []
    try:
        for rank in range(world_size):
            p = ctx.Process(
                target=_child,
                args=(rank, world_size, port, results, fn, args, kwargs),
                name=f"rank{rank}",
                # Not daemonic, so that a rank may start processes of its own (data loader
                # workers); hung ranks are killed below instead.
                daemon=False,
            )
            p.start()
            procs.append(p)
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved

    values: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    grace_deadline: float | None = None
    try:
        while len(values) + len(errors) < world_size:
            now = time.monotonic()
            limit = deadline if grace_deadline is None else min(deadline, grace_deadline)
            if now >= limit:
                break
            try:
                rank, status, payload = results.get(timeout=min(0.2, limit - now))
            except queue.Empty:
                # A rank that died without reporting (a segfault, os._exit) never will.
                for rank, p in enumerate(procs):
                    if (
                        rank not in values
                        and rank not in errors
                        and p.exitcode is not None
                        and results.empty()
                    ):
                        errors[rank] = f"exited with code {p.exitcode} without reporting a result"
                if errors and grace_deadline is None:
                    grace_deadline = time.monotonic() + GRACE_AFTER_FAILURE_S
                continue
            if status == "ok":
                values[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
                if grace_deadline is None:
                    grace_deadline = time.monotonic() + GRACE_AFTER_FAILURE_S
        for p in procs:
            p.join(timeout=max(0.0, min(deadline, time.monotonic() + 5.0) - time.monotonic()))
    finally:
        for rank, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
                if rank not in values and rank not in errors:
                    why = "after another rank failed" if errors else f"at the {timeout:g} s timeout"
                    errors[rank] = f"killed {why}: it did not finish (hung?)"
        results.close()

    for rank, p in enumerate(procs):
        if rank not in values and rank not in errors:
            errors[rank] = f"exited with code {p.exitcode} without reporting a result"
    if errors:
        parts = [f"{len(errors)} of {world_size} ranks failed ({fn.__qualname__}):"]
        for rank in sorted(errors):
            parts.append(f"----- rank {rank} -----\n{errors[rank].rstrip()}")
        raise AssertionError("\n".join(parts))
    return [values[r] for r in range(world_size)]
