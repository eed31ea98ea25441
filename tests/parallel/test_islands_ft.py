"""torchft's pieces for islands (yuanlfa.parallel.islands.ft): the install hint, a lighthouse
started in-process, and an unreachable lighthouse failing within its timeout."""

from __future__ import annotations

import sys
import time

import pytest

from yuanlfa.config import ConfigError, OuterConfig
from yuanlfa.parallel.islands import ft

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
