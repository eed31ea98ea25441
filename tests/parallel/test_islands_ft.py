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
