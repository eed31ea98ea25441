"""Slow ranks on a CPU: a duty-cycle throttle that lets a process run a fraction of the time.

An emulated heterogeneous cluster needs some pipeline ranks to compute at, say, half the speed
of the others. A watchdog process sends the throttled process SIGSTOP and SIGCONT in turn:
in every ``period_s`` it runs ``speed * period_s`` and is stopped for the rest, so its progress
per wall second is ``speed`` times what it would be, whatever it runs (compute, a collective
waiting on a peer: a stopped rank answers late, as a slow device does). The watchdog is its own
process (a thread could not stop its own process) started from this file as a script, so it
imports nothing of the library (no torch); it sends SIGCONT and exits when told to stop, when
the throttled process ends, or when its parent (the one that started it) dies, so a process is
never left stopped.

A period much shorter than a pipeline op (tens of ms against ops of 100 ms and more) makes the
slowdown even across ops; the scheduler's tick (1-4 ms) bounds how short it can be.

    with Throttle(pid, speed=0.5):     # or Throttle(...).start() / .stop()
        ...

    python yuanlfa/train/throttle.py --pid PID --speed 0.5 [--period-ms 20]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

DEFAULT_PERIOD_S = 0.02


def _check(speed: float, period_s: float) -> None:
    if not 0 < speed <= 1:
        raise ValueError(f"throttle speed: a fraction in (0, 1], got {speed}")
    if not 0.002 <= period_s <= 10:
        raise ValueError(f"throttle period: 2 ms to 10 s, got {period_s * 1e3:g} ms")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def watch(pid: int, speed: float, period_s: float, parent: int) -> None:
    """The watchdog loop (runs in its own process): stop and continue ``pid`` until it or
    ``parent`` ends or SIGTERM arrives; always leaves ``pid`` running."""
    _check(speed, period_s)
    stopping = False

    def on_term(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    run_s, stop_s = speed * period_s, (1 - speed) * period_s
    # Absolute deadlines, so that late wake-ups do not drift the duty cycle.
    deadline = time.monotonic()
    try:
        while not stopping and _alive(pid) and os.getppid() == parent:
            deadline += run_s
            time.sleep(max(0.0, deadline - time.monotonic()))
            if stop_s <= 0 or stopping:
                continue
            os.kill(pid, signal.SIGSTOP)
            deadline += stop_s
            time.sleep(max(0.0, deadline - time.monotonic()))
            os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        return
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGCONT)


class Throttle:
    """Run process ``pid`` at ``speed`` of its pace (see the module doc)."""

    def __init__(self, pid: int, speed: float, period_s: float = DEFAULT_PERIOD_S) -> None:
        _check(speed, period_s)
        self.pid, self.speed, self.period_s = pid, speed, period_s
        self._proc: subprocess.Popen | None = None

    def start(self) -> Throttle:
        if self._proc is not None:
            raise RuntimeError("throttle already started")
        if self.speed < 1:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--pid",
                str(self.pid),
                "--speed",
                repr(self.speed),
                "--period-ms",
                repr(self.period_s * 1e3),
                "--parent",
                str(os.getpid()),
            ]
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        return self

    def stop(self) -> None:
        """End the watchdog; the process is left running (SIGCONT)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if _alive(self.pid):
            os.kill(self.pid, signal.SIGCONT)

    def __enter__(self) -> Throttle:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="duty-cycle throttle watchdog")
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--speed", type=float, required=True, help="fraction of time running")
    parser.add_argument("--period-ms", type=float, default=DEFAULT_PERIOD_S * 1e3)
    parser.add_argument("--parent", type=int, default=None, help="exit when this pid is gone")
    args = parser.parse_args(argv)
    try:
        parent = args.parent if args.parent is not None else os.getppid()
        watch(args.pid, args.speed, args.period_ms / 1e3, parent)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
