"""torchft for islands launched one torchrun per island: the optional dependency and its
lighthouse (the quorum service every island's Manager talks to).

Only the pieces with a checked behaviour live here so far: the import with a one-line fix, a
lighthouse started in this process for ``outer.lighthouse: auto``, and a reachability check of a
given ``HOST:PORT`` that fails within ``outer.timeout_s`` instead of hanging. The Manager-driven
exchange (quorum per outer step, live recovery of a restarted island) is described, with what
fits and what does not, in docs/islands.md.
"""

from __future__ import annotations

from datetime import timedelta
from types import ModuleType
from typing import Any

from yuanlfa.config import ConfigError, OuterConfig

INSTALL = 'pip install -e ".[ft]"'


def require_torchft() -> ModuleType:
    """The ``torchft.coordination`` module, or a one-line error naming the install command."""
    try:
        import torchft.coordination as coordination
    except ImportError as exc:
        raise ConfigError(
            f"outer: islands launched one per torchrun need torchft ({exc}); install it with "
            f"{INSTALL}"
        ) from None
    return coordination


def lighthouse_url(spec: str) -> str:
    return spec if spec.startswith(("http://", "https://")) else f"http://{spec}"


def start_lighthouse(min_islands: int = 1) -> Any:
    """A lighthouse in this process on a free port (``outer.lighthouse: auto``): its
    ``address()`` is what the islands' Managers are given; ``shutdown()`` stops it. A quorum
    needs ``min_islands`` islands, 1 so that the survivors keep training when one is lost."""
    coordination = require_torchft()
    return coordination.LighthouseServer(bind="[::]:0", min_replicas=min_islands)


def check_lighthouse(outer: OuterConfig) -> str:
    """The URL of the lighthouse ``outer.lighthouse`` names, after connecting to it; a one-line
    error within ``outer.timeout_s`` when it cannot be reached."""
    coordination = require_torchft()
    url = lighthouse_url(outer.lighthouse)
    try:
        coordination.LighthouseClient(url, timedelta(seconds=outer.timeout_s))
    except RuntimeError:
        raise ConfigError(
            f"outer.lighthouse: cannot reach the lighthouse at {url} within outer.timeout_s = "
            f"{outer.timeout_s:g} s; start it (torchft_lighthouse --bind [::]:PORT "
            "--min_replicas 1) or fix the address"
        ) from None
    return url
