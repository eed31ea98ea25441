"""torchft for islands launched one torchrun per island: the optional dependency, its lighthouse
(the quorum service every island's Manager talks to) and the Manager-backed cross-island
exchange.

Per-island launches: every island is its own launch (``yuanlfa-train --island I`` or
``YUANLFA_ISLAND=I``); its world is one island. Each rank creates a torchft ``Manager`` with
``replica_id`` = the island and ``rank``/``world_size`` = its rank and size inside the island, so
rank ``r`` of every island meets rank ``r`` of the others in the Manager's reconfigurable process
group: the cross-island group of :class:`~yuanlfa.parallel.islands.outer.OuterSync`. Each outer
exchange is one quorum (who is alive; a restarted island is healed from a live one through the
registered state callbacks), the all-reduce over the quorum's participants, and ``should_commit``
deciding whether the outer step applies. docs/islands.md says what of torchft fits and what not.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist

from yuanlfa.config import ConfigError, OuterConfig
from yuanlfa.parallel.islands import lighthouse
from yuanlfa.parallel.islands.lighthouse import LIGHTHOUSE_FILE

INSTALL = 'pip install -e ".[ft]"'
ISLAND_ENV = "YUANLFA_ISLAND"
# torchft's own variable for the lighthouse; with outer.lighthouse: auto it takes precedence.
LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"


def require_torchft() -> ModuleType:
    """The ``torchft.coordination`` module, or a one-line error naming the install command."""
    # torchft's Rust side logs every quorum and commit at INFO; keep warnings (RUST_LOG=info
    # shows them again).
    os.environ.setdefault("RUST_LOG", "warn")
    try:
        import torchft.coordination as coordination
    except ImportError as exc:
        raise ConfigError(
            f"outer: islands launched one per torchrun need torchft ({exc}); install it with "
            f"{INSTALL}"
        ) from None
    return coordination


def launched_island() -> int | None:
    """This launch's island when islands are launched one per torchrun (``YUANLFA_ISLAND``, set
    by ``yuanlfa-train --island``), else None (every island in this launch)."""
    value = os.environ.get(ISLAND_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise ConfigError(
            f"{ISLAND_ENV}={value!r}: the island id must be an integer 0 .. parallel.islands - 1 "
            "(yuanlfa-train --island I)"
        )
    return int(value)


def lighthouse_url(spec: str) -> str:
    return spec if spec.startswith(("http://", "https://")) else f"http://{spec}"


def start_lighthouse(min_islands: int = 1, bind: str = "[::]:0") -> Any:
    """A lighthouse in this process (by default on a free port): its ``address()`` is what the
    islands' Managers are given; ``shutdown()`` stops it. A quorum needs ``min_islands``
    islands, 1 so that the survivors keep training when one is lost. ``outer.lighthouse: auto``
    runs it in a process of its own (:mod:`yuanlfa.parallel.islands.lighthouse`)."""
    require_torchft()
    return lighthouse.new_server(min_islands, bind)


def _reachable(coordination: ModuleType, url: str, seconds: float) -> bool:
    try:
        coordination.LighthouseClient(url, timedelta(seconds=seconds))
    except RuntimeError:
        return False
    return True


def check_lighthouse(outer: OuterConfig) -> str:
    """The URL of the lighthouse ``outer.lighthouse`` names, after connecting to it; a one-line
    error within ``outer.timeout_s`` when it cannot be reached."""
    coordination = require_torchft()
    url = lighthouse_url(outer.lighthouse)
    if not _reachable(coordination, url, outer.timeout_s):
        raise ConfigError(
            f"outer.lighthouse: cannot reach the lighthouse at {url} within outer.timeout_s = "
            f"{outer.timeout_s:g} s; start it (torchft_lighthouse --bind [::]:PORT "
            "--min_replicas 1) or fix the address"
        )
    return url


def check_rendezvous(outer: OuterConfig, rendezvous: Path | None) -> None:
    """``auto`` without ``$TORCHFT_LIGHTHOUSE`` needs a directory every island sees."""
    auto = outer.lighthouse == "auto" and not os.environ.get(LIGHTHOUSE_ENV, "").strip()
    if auto and rendezvous is None:
        raise ConfigError(
            "outer.lighthouse: auto with per-island launches needs checkpoint.dir (the lighthouse "
            "publishes its address there); set it, or give HOST:PORT of a running "
            "torchft_lighthouse"
        )


def find_lighthouse(
    outer: OuterConfig, island: int, rendezvous: Path | None, islands: int = 2
) -> tuple[str, Any]:
    """(URL, what :meth:`ManagerExchange.shutdown` shuts down or None) of the run's lighthouse,
    for rank 0 of an island. ``HOST:PORT`` or ``$TORCHFT_LIGHTHOUSE``: checked. ``auto``: the
    address published in ``rendezvous/lighthouse`` while it is reachable; else this island
    starts a lighthouse process (the first of several islands doing so at once serves, the
    others exit) and reads its address when published, within ``outer.timeout_s``. The island
    keeps the lighthouse alive with a heartbeat until shut down (module
    :mod:`yuanlfa.parallel.islands.lighthouse`)."""
    env = os.environ.get(LIGHTHOUSE_ENV, "").strip()
    if outer.lighthouse != "auto" or env:
        spec = outer.lighthouse if outer.lighthouse != "auto" else env
        return check_lighthouse(replace(outer, lighthouse=spec)), None
    coordination = require_torchft()
    check_rendezvous(outer, rendezvous)
    assert rendezvous is not None
    beat = lighthouse.Heartbeat(rendezvous, island)  # before starting one: it must see us
    deadline = time.monotonic() + outer.timeout_s
    started: Any = None
    started_at = -float("inf")
    try:
        while True:
            # A file left by an earlier run (or by a lighthouse killed with SIGKILL) names an
            # unreachable address: start one, which replaces it.
            url = lighthouse.published(rendezvous)
            if url and _reachable(coordination, url, 1.0):
                return url, beat
            # Again only once the one started before has exited without serving (another held
            # the lock, then went away before publishing), and not more often than every 5 s.
            idle = started is None or started.poll() is not None
            if idle and time.monotonic() - started_at > 5.0:
                started = lighthouse.spawn(rendezvous, islands, outer.timeout_s)
                started_at = time.monotonic()
            if time.monotonic() > deadline:
                log = lighthouse.state_dir(rendezvous) / "log"
                raise ConfigError(
                    f"outer.lighthouse: auto: no reachable lighthouse published in "
                    f"{rendezvous / LIGHTHOUSE_FILE} within outer.timeout_s = "
                    f"{outer.timeout_s:g} s (see {log}); check that checkpoint.dir is writable, "
                    "or give HOST:PORT of a running torchft_lighthouse"
                )
            time.sleep(0.2)
    except BaseException:
        beat.shutdown()
        raise


class ManagerExchange:
    """The cross-island all-reduce of a per-island launch, through a torchft ``Manager``.

    Implements :class:`~yuanlfa.parallel.islands.outer.Exchange`: :meth:`begin` runs the quorum
    (a restarted island is healed in it from a live one, through the callbacks given to
    :meth:`register`), :meth:`start_sum` all-reduces over the quorum's participants and
    :meth:`commit` is torchft's ``should_commit``. The Manager's step is set to the training
    step before each quorum, so an island behind the others (restarted) is the one healed.

    With ``outer.fragment_delay`` > 0 a round spans steps: the quorum and the all-reduce start
    after one step, the wait and ``should_commit`` come ``fragment_delay`` steps later (as in
    torchft's Streaming DiLoCo). A Manager holds one round at a time (``should_commit`` closes
    the quorum ``start_quorum`` opened), so rounds must not overlap: ``per_island_config``
    requires ``fragment_delay <= sync_every / fragments``.
    """

    def __init__(
        self,
        outer: OuterConfig,
        islands: int,
        island: int,
        rank: int,
        world: int,
        device: torch.device,
        rendezvous: Path | None,
    ) -> None:
        require_torchft()
        from torchft.manager import Manager
        from torchft.process_group import ProcessGroupGloo, ProcessGroupNCCL

        self.islands, self.timeout_s = islands, outer.timeout_s
        timeout = timedelta(seconds=outer.timeout_s)
        self.lighthouse: Any = None
        url = ""
        if rank == 0:
            url, self.lighthouse = find_lighthouse(outer, island, rendezvous, islands)
        # A store of this attempt for the Manager (a restarted torchrun's own store still holds
        # the dead attempt's Manager address); its address is also where the islands' process
        # group for a quorum meets, so it must be reachable from other hosts.
        host = os.environ.get("YUANLFA_ISLAND_HOST") or socket.gethostname()
        self.store = None
        port = torch.zeros(1, dtype=torch.int64)
        if rank == 0:
            self.store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
            port[0] = self.store.port
        if world > 1:
            from yuanlfa.parallel.collectives import collective_device

            port = port.to(collective_device())
            dist.broadcast(port, src=0)
        pg = ProcessGroupNCCL(timeout) if device.type == "cuda" else ProcessGroupGloo(timeout)
        self.manager = Manager(
            pg=pg,
            load_state_dict=None,
            state_dict=None,
            min_replica_size=1,
            use_async_quorum=False,  # heal before the round's all-reduce, not during it
            timeout=timeout,
            quorum_timeout=timeout,
            connect_timeout=timeout,
            rank=rank,
            world_size=world,
            store_addr=host,
            store_port=int(port.item()),
            lighthouse_addr=url,
            replica_id=f"island{island}",
            init_sync=False,  # every island initializes the same weights from train.seed
            quorum_retries=2,  # a lighthouse hiccup should not end an island
        )
        self.rounds = 0

    def register(self, key: str, load: Callable[[Any], None], save: Callable[[], Any]) -> None:
        self.manager.register_state_dict_fn(key, load, save)

    def size(self) -> int:
        """Islands in the current quorum (before the first: the configured number)."""
        return self.manager.num_participants() if self.rounds else self.islands

    def begin(self, step: int) -> None:
        self.manager.load_state_dict(
            {"step": step, "batches_committed": self.manager.batches_committed()}
        )
        try:
            self.manager.start_quorum(timeout=timedelta(seconds=self.timeout_s))
        except (TimeoutError, RuntimeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(
                f"outer.timeout_s: no quorum of islands at step {step} within {self.timeout_s:g} "
                f"s ({first}); is the lighthouse up? outer.timeout_s must exceed the time of "
                "outer.sync_every steps"
            ) from None
        self.rounds += 1
        # An error inside the quorum (a peer lost while the process group is set up, a failed
        # recovery) is not raised: torchft then skips the round's all-reduce and
        # should_commit says no, so no outer step is applied; the next round starts afresh (and
        # heals again an island still behind).

    def start_sum(self, tensor: torch.Tensor) -> Any:
        return self.manager.allreduce(tensor, reduce_op=dist.ReduceOp.SUM)

    def commit(self) -> bool:
        return self.manager.should_commit()

    def healthy(self) -> bool:
        return self.manager.errored() is None

    def shutdown(self) -> None:
        self.manager.shutdown(wait=False)
        if self.lighthouse is not None:
            self.lighthouse.shutdown()
