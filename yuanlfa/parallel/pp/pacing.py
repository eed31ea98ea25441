"""Paced pipeline ops: slow devices emulated on shared CPU cores.

A paced rank runs each pipeline op (a microbatch's forward or backward on one of its stages) and
then sleeps until the op's wall time is ``cpu * pace / speed``, where ``cpu`` is the op's own CPU
time on the calling thread (``time.thread_time``). Thread CPU time does not grow when other
processes share the core (waiting for it is not running), so the emulated time does not depend
on contention as long as the op finishes within its target: ``pace`` at least the number of
ranks per free core makes each rank use its core a fraction of the time. ``speed`` is the
rank's relative device speed (0.5: an op lasts twice as long).

This holds only where the op's work runs on the calling thread: torch on CPU with one intra-op
thread (``OMP_NUM_THREADS=1``; CPU autograd runs backward on the thread that calls it) and no
collective inside the op (pipelines without tp). Pacing changes when ops end, never what they
compute, so a paced run's results are bitwise those of an unpaced one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class Pacer:
    """Stretches ops to ``cpu * pace / speed`` wall seconds; counts what it did."""

    def __init__(self, pace: float, speed: float = 1.0) -> None:
        if pace < 1:
            raise ValueError(f"pacing: pace must be >= 1, got {pace}")
        if not 0 < speed <= 1:
            raise ValueError(f"pacing: speed must be in (0, 1], got {speed}")
        self.pace, self.speed = pace, speed
        self.reset()

    def reset(self) -> None:
        self.ops = 0
        self.cpu_s = 0.0  # the ops' own CPU time
        self.wall_s = 0.0  # the ops' wall time, sleeps included
        # Ops that took longer than their target before any sleep (the core was too busy for
        # this pace): their emulated time is too long by the excess, summed here.
        self.overruns = 0
        self.overrun_s = 0.0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def paced(*args: Any, **kwargs: Any) -> Any:
            wall0, cpu0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                cpu = time.thread_time() - cpu0
                target = cpu * self.pace / self.speed
                elapsed = time.perf_counter() - wall0
                if elapsed < target:
                    time.sleep(target - elapsed)
                else:
                    self.overruns += 1
                    self.overrun_s += elapsed - target
                self.ops += 1
                self.cpu_s += cpu
                self.wall_s += time.perf_counter() - wall0

        return paced

    def stats(self) -> dict[str, float]:
        return {
            "ops": self.ops,
            "cpu_s": self.cpu_s,
            "wall_s": self.wall_s,
            "overruns": self.overruns,
            "overrun_s": self.overrun_s,
        }
