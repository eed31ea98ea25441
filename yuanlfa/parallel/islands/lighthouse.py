"""The lighthouse of ``outer.lighthouse: auto``: a process of its own, so that the run survives
the loss of any island (island 0 included), started by whichever island needs it first and
gone when the run is.

Why not inside an island's process: SIGKILL (or torchrun killing an island's process group)
would take the quorum service down with that island, and the survivors could no longer form a
quorum. :func:`spawn` starts ``python -m yuanlfa.parallel.islands.lighthouse`` in a session of
its own (``start_new_session``), out of reach of a kill of the island's process group.

Files, in the islands' shared rendezvous directory (``checkpoint.dir``):

- ``lighthouse``: its address (first line) and its pid and host, written atomically (temporary
  file and rename), read by every island's rank 0 (and a restarted island); removed when the
  lighthouse exits.
- ``lighthouse.d/lock``: an exclusive ``flock`` held by the live lighthouse for its whole life.
  Several islands may start one at once; all but the first to lock exit at once. The kernel
  drops the lock when its process dies (even by SIGKILL), so a crashed run leaves no stale claim
  to clean up, and two lighthouses never serve one directory. A stale ``lighthouse`` file (its
  process gone: :func:`published`) makes the reader start a new lighthouse.
- ``lighthouse.d/log``: the lighthouses' output.
- ``lighthouse.d/island<I>``: the heartbeat of island I's rank 0 (:class:`Heartbeat` sets its
  mtime every second); ``lighthouse.d/island<I>.done``: island I's process has ended (written
  when it shuts its exchange down, cleanly or on an error; removed when the island starts again).

Lifetime (:func:`watch`): an island is alive while its heartbeat file exists and its mtime
changed in the last :data:`STALE_S` seconds (measured on the lighthouse's clock, as changes it
saw, so clocks need not agree). The lighthouse exits as soon as no island is alive and every
island has its ``done`` marker (the run finished), and otherwise once no island has been alive
for ``grace`` seconds (``outer.timeout_s``: every island was killed and none came back within
the time a restarted island would wait for a quorum anyway). A lost island restarted by torchrun
comes back while the others keep the lighthouse alive; should it find none, it starts a new one.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

# The lighthouse publishes its address (and pid and host) in this file of checkpoint.dir.
LIGHTHOUSE_FILE = "lighthouse"
# A dead island's Manager stops heartbeating; after this the survivors' quorum goes without it
# (torchft's default is 5 s).
HEARTBEAT_TIMEOUT_MS = 3000
# How long a quorum waits for an island that heartbeats but has not asked to join yet.
JOIN_TIMEOUT_MS = 10000
MODULE = "yuanlfa.parallel.islands.lighthouse"
STATE_DIR = "lighthouse.d"
# An island's rank 0 touches its heartbeat file this often ...
BEAT_S = 1.0
# ... and counts as lost when the lighthouse saw no change for this long (generous: a starved
# heartbeat thread only starts the grace period, it does not end the lighthouse).
STALE_S = 10.0
POLL_S = 0.5


def state_dir(rendezvous: Path) -> Path:
    return rendezvous / STATE_DIR


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _published(rendezvous: Path) -> tuple[str, int | None, str]:
    try:
        lines = (rendezvous / LIGHTHOUSE_FILE).read_text().splitlines()
    except FileNotFoundError:
        return "", None, ""
    pid, _, host = (lines[1] if len(lines) > 1 else "").partition(" ")
    return (lines[0].strip() if lines else ""), int(pid) if pid.isdigit() else None, host.strip()


def read_address(rendezvous: Path) -> str:
    """The published address, or "" when there is none."""
    return _published(rendezvous)[0]


def read_pid(rendezvous: Path) -> int | None:
    """The pid of the lighthouse that published the address (alive or not)."""
    return _published(rendezvous)[1]


def running(pid: int) -> bool:
    """Whether ``pid`` is a lighthouse process of this module (not a zombie, not a process that
    got the pid of a dead one)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and MODULE.encode() in cmdline


def published(rendezvous: Path) -> str:
    """The published address unless it is known stale: its lighthouse ran on this host and is
    gone (a SIGKILLed lighthouse leaves the file, and its port may since serve something else).
    Published from another host (a shared directory), only reaching it tells."""
    address, pid, host = _published(rendezvous)
    if address and pid is not None and host == socket.gethostname() and not running(pid):
        return ""
    return address


class Heartbeat:
    """Island ``island``'s rank 0 telling the lighthouse it is alive, from a daemon thread (so
    it stops with the process, however the process ends); :meth:`shutdown` says the island has
    ended."""

    def __init__(self, rendezvous: Path, island: int) -> None:
        directory = state_dir(rendezvous)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"island{island}"
        self.done = directory / f"island{island}.done"
        self.done.unlink(missing_ok=True)  # an earlier life of this island, or an earlier run
        self.path.touch()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lighthouse-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            with contextlib.suppress(OSError):  # a full or vanished disk must not end training
                self.path.touch()

    def shutdown(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError):
            self.done.touch()
            self.path.unlink(missing_ok=True)


# Started lighthouses, kept so that one still running when this process exits is not reported
# (ResourceWarning) and one that exited is reaped.
_spawned: list[subprocess.Popen] = []


def spawn(rendezvous: Path, islands: int, grace: float) -> subprocess.Popen:
    """Start a lighthouse process for ``rendezvous`` (it exits at once when one already holds
    the lock), detached from this process's session and process group."""
    rendezvous = rendezvous.resolve()
    directory = state_dir(rendezvous)
    directory.mkdir(parents=True, exist_ok=True)
    root = str(Path(__file__).resolve().parents[3])  # this checkout, wherever we were started
    path = os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else root}
    cmd = [sys.executable, "-m", MODULE, str(rendezvous)]
    cmd += ["--islands", str(islands), "--grace", f"{grace:g}"]
    with open(directory / "log", "ab") as log:
        child = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    _spawned[:] = [p for p in _spawned if p.poll() is None]
    _spawned.append(child)
    return child


def watch(
    directory: Path,
    islands: int,
    grace: float,
    stale: float = STALE_S,
    poll: float = POLL_S,
) -> str:
    """Wait until the run is over (module docstring, "Lifetime"); returns why."""
    seen: dict[int, tuple[float, float]] = {}  # island -> (heartbeat mtime, when it changed)
    last_alive = time.monotonic()  # we were started by a live island
    while True:
        now = time.monotonic()
        alive = False
        for island in range(islands):
            try:
                mtime = (directory / f"island{island}").stat().st_mtime
            except FileNotFoundError:
                seen.pop(island, None)
                continue
            if island not in seen or seen[island][0] != mtime:
                seen[island] = (mtime, now)
            alive = alive or now - seen[island][1] < stale
        if alive:
            last_alive = now
        elif all((directory / f"island{i}.done").exists() for i in range(islands)):
            return "every island has finished"
        elif now - last_alive > grace:
            return f"no island alive for {grace:g} s"
        time.sleep(poll)


def new_server(min_islands: int = 1, bind: str = "[::]:0") -> Any:
    """torchft's lighthouse server in this process (``ft.start_lighthouse`` checks that torchft
    is installed first)."""
    os.environ.setdefault("RUST_LOG", "warn")  # not a line per quorum
    from torchft.coordination import LighthouseServer

    return LighthouseServer(
        bind=bind,
        min_replicas=min_islands,
        join_timeout_ms=JOIN_TIMEOUT_MS,
        heartbeat_timeout_ms=HEARTBEAT_TIMEOUT_MS,
    )


def _start_server(previous: str) -> Any:
    """A server on the port of the address published before, when free: a live island whose
    Manager was given that address (a lighthouse that ended while it was away) finds it again."""
    port = previous.rsplit(":", 1)[-1] if previous else ""
    if port.isdigit():
        try:
            return new_server(bind=f"[::]:{port}")
        except RuntimeError:  # taken
            pass
    return new_server()


def serve(rendezvous: Path, islands: int, grace: float) -> int:
    directory = state_dir(rendezvous)
    directory.mkdir(parents=True, exist_ok=True)
    lock = open(directory / "lock", "a")  # noqa: SIM115 - held (locked) for the process's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"lighthouse {os.getpid()}: another one serves {rendezvous}; exiting", flush=True)
        return 0
    server = _start_server(read_address(rendezvous))
    address = server.address()
    who = f"{os.getpid()} {socket.gethostname()}"
    _write_atomic(rendezvous / LIGHTHOUSE_FILE, f"{address}\n{who}\n")
    print(f"lighthouse {os.getpid()}: serving {rendezvous} at {address}", flush=True)
    why = "stopped"
    try:
        why = watch(directory, islands, grace)
    finally:
        # Nobody may read the address of a lighthouse that is gone; one started meanwhile
        # cannot have replaced it (we still hold the lock).
        if read_address(rendezvous) == address:
            (rendezvous / LIGHTHOUSE_FILE).unlink(missing_ok=True)
        server.shutdown()
        print(f"lighthouse {os.getpid()}: exiting ({why})", flush=True)
    return 0


def _stop(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rendezvous", type=Path, help="the islands' checkpoint.dir")
    parser.add_argument("--islands", type=int, required=True, help="parallel.islands")
    parser.add_argument("--grace", type=float, required=True, help="outer.timeout_s")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)  # clean up the address file on kill/terminate
    signal.signal(signal.SIGHUP, _stop)
    return serve(args.rendezvous, args.islands, args.grace)


if __name__ == "__main__":
    sys.exit(main())
