"""torchft's pieces for islands (yuanlfa.parallel.islands.ft): the install hint, a lighthouse
started in-process, an unreachable lighthouse failing within its timeout, and the lighthouse
process of ``outer.lighthouse: auto`` (yuanlfa.parallel.islands.lighthouse): one per
directory, a stale address replaced, gone when the islands are."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from yuanlfa.config import ConfigError, OuterConfig
from yuanlfa.parallel.islands import ft, lighthouse

pytest.importorskip("torchft")


def test_missing_torchft_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchft.coordination", None)  # import raises ImportError
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[ft\]"'):
        ft.require_torchft()


def test_auto_lighthouse_is_reachable() -> None:
    server = ft.start_lighthouse()
    try:
        address = server.address()
        port = address.rsplit(":", 1)[1]
        url = ft.check_lighthouse(OuterConfig(lighthouse=f"127.0.0.1:{port}", timeout_s=5))
        assert url == f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()


def test_unreachable_lighthouse_fails_within_its_timeout() -> None:
    from tests.distributed.launcher import free_port

    start = time.monotonic()
    with pytest.raises(ConfigError, match="outer.lighthouse: cannot reach the lighthouse"):
        ft.check_lighthouse(OuterConfig(lighthouse=f"127.0.0.1:{free_port()}", timeout_s=1.5))
    assert time.monotonic() - start < 10


def _train_cli(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, *args: str) -> str:
    """yuanlfa-train in this process with ``[--island I] overrides...``; returns its one-line
    error."""
    from yuanlfa.cli.train import main

    monkeypatch.setenv(ft.ISLAND_ENV, "")  # restored after the test: --island sets it
    monkeypatch.delenv(ft.LIGHTHOUSE_ENV, raising=False)
    flags = list(args[:2]) if args[0] == "--island" else []
    overrides = args[len(flags) :]
    base = ["--config", "configs/tiny.yaml", "--quiet", *flags]
    assert main([*base, "--set", "train.steps=1", *overrides]) == 2
    return capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("--island", "0", "parallel.islands=1"), "per-island launches need parallel.islands"),
        (("--island", "2", "parallel.islands=2", "outer.algorithm=diloco"), "numbered 0 .. "),
        (("--island", "1", "parallel.islands=2"), "outer.algorithm: none joins the islands"),
        (
            ("--island", "0", "parallel.islands=2", "outer.algorithm=streaming_diloco")
            + ("outer.fragments=2", "outer.sync_every=4", "outer.fragment_delay=3"),
            "outer.fragment_delay: 3 with per-island launches overlaps a fragment's exchange "
            "with the next one (every sync_every / fragments = 2 steps), and a torchft Manager "
            "holds one round at a time; set it to at most 2",
        ),
        (
            ("--island", "0", "parallel.islands=2", "outer.algorithm=diloco")
            + ("outer.warm_start_steps=50",),
            "outer.warm_start_steps: 50 reduces the gradients across the islands in every "
            "warm-up step, which needs them in one launch",
        ),
        (
            ("outer.lighthouse=127.0.0.1:1",),
            "outer.lighthouse: 127.0.0.1:1 is for per-island launches",
        ),
        (
            ("--island", "1", "parallel.islands=2", "outer.algorithm=diloco"),
            "outer.lighthouse: auto with per-island launches needs checkpoint.dir",
        ),
    ],
)
def test_per_island_launch_errors(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, args: tuple, match: str
) -> None:
    err = _train_cli(capsys, monkeypatch, *args)
    assert match in err and "\n" not in err, err


def test_unreachable_lighthouse_stops_yuanlfa_train_before_any_step(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    from tests.distributed.launcher import free_port

    start = time.monotonic()
    err = _train_cli(
        capsys,
        monkeypatch,
        "--island",
        "1",
        "parallel.islands=2",
        "outer.algorithm=diloco",
        f"outer.lighthouse=127.0.0.1:{free_port()}",
        "outer.timeout_s=1.5",
        f"logging.jsonl={tmp_path}/log.jsonl",
    )
    assert "outer.lighthouse: cannot reach the lighthouse" in err, err
    assert time.monotonic() - start < 15
    assert not (tmp_path / "log.island1.jsonl").exists()  # no step was taken


def running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie nobody reaped has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _until(check, limit: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_lighthouse_lives_while_an_island_beats_and_ends_with_the_run(tmp_path: Path) -> None:
    directory = lighthouse.state_dir(tmp_path)
    beat = lighthouse.Heartbeat(tmp_path, 0)  # island 1 never started
    why: list[str] = []
    watcher = threading.Thread(
        target=lambda: why.append(lighthouse.watch(directory, 2, grace=0.5, stale=3, poll=0.05))
    )
    watcher.start()
    # Island 0 alive (its heartbeat changes every second): kept well past grace.
    watcher.join(timeout=2.0)
    assert watcher.is_alive()
    # Island 0 ends cleanly, island 1 never came: the grace period runs out.
    beat.shutdown()
    assert (directory / "island0.done").exists() and not (directory / "island0").exists()
    watcher.join(timeout=30)
    assert why == ["no island alive for 0.5 s"]
    # Every island ended: at once, whatever the grace.
    (directory / "island1.done").touch()
    start = time.monotonic()
    assert lighthouse.watch(directory, 2, grace=60, poll=0.05) == "every island has finished"
    assert time.monotonic() - start < 1
    # A killed island's heartbeat stays, unchanged (and it has no done marker): lost after
    # `stale`, then the grace.
    (directory / "island1.done").unlink()
    (directory / "island1").touch()
    assert lighthouse.watch(directory, 2, grace=0.2, stale=0.3, poll=0.05).startswith("no island")
    # A restarted island takes its done marker back.
    again = lighthouse.Heartbeat(tmp_path, 1)
    assert not (directory / "island1.done").exists()
    again.shutdown()


@pytest.mark.slow
def test_auto_lighthouse_replaces_a_stale_address_serves_once_and_ends_with_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ft.LIGHTHOUSE_ENV, raising=False)
    outer = OuterConfig(timeout_s=60)
    pids: list[int] = []
    with socket.socket() as taken:  # an earlier run's address, its port now someone else's
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        stale = f"http://127.0.0.1:{taken.getsockname()[1]}"
        gone = subprocess.Popen([sys.executable, "-c", ""])  # its lighthouse, exited
        gone.wait()
        who = f"{gone.pid} {socket.gethostname()}"
        (tmp_path / ft.LIGHTHOUSE_FILE).write_text(f"{stale}\n{who}\n")
        try:
            url, beat1 = ft.find_lighthouse(outer, 1, tmp_path, islands=2)
            pids.append(lighthouse.read_pid(tmp_path) or 0)
            assert url != stale and url == lighthouse.read_address(tmp_path)
            assert running(pids[0])
            assert os.getsid(pids[0]) != os.getsid(0)  # out of reach of a kill of our group
            # A second lighthouse for the same directory leaves at once; the first serves on.
            assert lighthouse.spawn(tmp_path, 2, 60).wait(timeout=60) == 0
            log = lighthouse.state_dir(tmp_path) / "log"
            assert "another one serves" in log.read_text()
            url0, beat0 = ft.find_lighthouse(outer, 0, tmp_path, islands=2)
            assert url0 == url and lighthouse.read_pid(tmp_path) == pids[0]
            # The lighthouse killed (its address left behind): the next island to look starts
            # one on the same port, so the Managers holding that address find it again.
            os.kill(pids[0], signal.SIGKILL)
            _until(lambda: not running(pids[0]), what="the lighthouse to die")
            beat0.shutdown()
            url0, beat0 = ft.find_lighthouse(outer, 0, tmp_path, islands=2)
            pids.append(lighthouse.read_pid(tmp_path) or 0)
            assert url0 == url and pids[1] != pids[0] and running(pids[1])
            # Both islands end: the lighthouse goes, and takes its address with it.
            beat1.shutdown()
            assert running(pids[1])
            beat0.shutdown()
            _until(lambda: not running(pids[1]), what="the lighthouse to exit")
            assert not (tmp_path / ft.LIGHTHOUSE_FILE).exists()
            assert "every island has finished" in log.read_text()
        finally:
            for pid in pids:
                if running(pid):
                    os.kill(pid, signal.SIGKILL)
