"""An emulated multi-node cluster on one Linux machine: network namespaces joined by shaped links.

Each "node" is a network namespace ``yl<pid>n<i>`` with one veth interface (10.99.0.<i+1>/24)
whose peer sits in a switch namespace ``yl<pid>sw`` on a bridge. Every veth end gets a token
bucket (``tc qdisc ... tbf rate R``) so each node sends and receives at most R, as through one
NIC per node, and netem ``delay`` when asked for (and when the kernel has netem). One ``torchrun``
per namespace then trains with gloo over TCP through those links (``GLOO_SOCKET_IFNAME`` is the
node's veth), exactly as separate machines would: static rendezvous at node 0's address.

Nothing is created in the host's own namespace (the veth pairs are created directly inside the
namespaces), and everything is removed on exit: the processes started in the namespaces are
killed, then the namespaces deleted (their veths and qdiscs go with them), from ``__exit__``, an
``atexit`` hook and SIGTERM/SIGHUP handlers installed while a cluster is up. Needs root (or
CAP_NET_ADMIN and CAP_SYS_ADMIN); :func:`namespaces_supported` says whether this machine allows
it, and why not.

As a library (benchmarks/weak_link.py)::

    with EmulatedCluster(nodes=2, rate_mbit=1000) as cluster:
        run = cluster.train("configs/tiny.yaml", ["train.steps=8", "parallel.tp=2"], workdir)
        print(run.median_step_s(warmup=3))
        cluster.set_rate(100)

As a command::

    python tools/emulated_cluster.py --nodes 2 --rate-mbit 100 --config configs/tiny.yaml \
        --set parallel.tp=2 train.steps=6
    python tools/emulated_cluster.py --check           # can this machine make namespaces?
    python tools/emulated_cluster.py --cleanup-stale   # remove leftovers of killed runs
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "yl"
SUBNET = "10.99.0"
MASTER_PORT = 29500
# A real link has no burst allowance: a token bucket holding as much as a message lets that
# message through at memory speed (a 2 ms bucket hid a 1 Gbit/s link from 256 KB all-reduces
# completely). So the bucket holds 0.2 ms of the rate, at least 16 KiB, and segmentation
# offload is held to 8 segments per packet (~12 KB) so that no packet outgrows the bucket.
MIN_BURST_BYTES = 16 * 1024
BURST_SECONDS = 0.0002
GSO_MAX_SEGS = 8
QUEUE_LATENCY_MS = 50


class ClusterError(RuntimeError):
    """The emulated cluster could not be built or a run failed; the message says why."""


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", "netns", "exec", ns, *args] if ns is not None else list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def namespaces_supported() -> tuple[bool, str]:
    """(True, "") when this process can create a network namespace, else (False, the reason)."""
    if sys.platform != "linux":
        return False, "network namespaces need Linux"
    for tool in ("ip", "tc"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            return False, f"the '{tool}' command (iproute2) is not installed"
    probe = f"{PREFIX}probe{os.getpid()}"
    proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if proc.returncode != 0:
        reason = proc.stderr.strip() or "ip netns add failed"
        return False, f"this machine forbids network namespaces ({reason}); run as root"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return True, ""


def netem_supported() -> bool:
    """Whether the kernel has the netem qdisc (needed for an added link delay)."""
    ok, _ = namespaces_supported()
    if not ok:
        return False
    ns = f"{PREFIX}probe{os.getpid()}"
    try:
        _ip("ip", "netns", "add", ns)
        _ip("ip", "link", "set", "lo", "up", ns=ns)
        proc = _ip("tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms", ns=ns,
                   check=False)  # fmt: skip
        return proc.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def leftovers(prefix: str = PREFIX) -> list[str]:
    """Namespaces, and links in the host namespace, whose names start with ``prefix``."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    for line in links.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            names.append(parts[1].strip().split("@")[0])
    return [n for n in names if n.startswith(prefix)]


def _kill_namespace_processes(ns: str) -> None:
    """Kill what still runs inside ``ns`` (only processes this module started live there)."""
    proc = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    for pid in proc.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def delete_namespaces(names: list[str]) -> None:
    """Kill each namespace's processes, then delete it (its veths and qdiscs go with it)."""
    for ns in names:
        _kill_namespace_processes(ns)
    for ns in names:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Remove namespaces ``<prefix><pid>...`` whose creating process no longer runs."""
    removed = []
    for name in leftovers(prefix):
        digits = ""
        for ch in name[len(prefix) :]:
            if not ch.isdigit():
                break
            digits += ch
        if digits and not Path(f"/proc/{digits}").exists():
            removed.append(name)
    delete_namespaces([n for n in removed if n in _netns_names()])
    for name in removed:  # a veth left in the host namespace by an interrupted setup
        subprocess.run(["ip", "link", "del", name], capture_output=True)
    return removed


def _netns_names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@dataclass
class TrainRun:
    """One torchrun launch over the cluster: its step records and each node's output."""

    records: list[dict]
    outputs: list[str]
    returncodes: list[int]
    wall_s: float

    @property
    def ok(self) -> bool:
        return all(rc == 0 for rc in self.returncodes)

    def step_times(self) -> list[float]:
        return [float(r["step_time_s"]) for r in self.records]

    def median_step_s(self, warmup: int) -> float:
        """Median ``step_time_s`` over the steps after the first ``warmup``."""
        times = self.step_times()[warmup:]
        if not times:
            raise ClusterError(f"no step after {warmup} warm-up steps ({len(self.records)} run)")
        return statistics.median(times)


@dataclass
class EmulatedCluster:
    """``nodes`` namespaces on a shaped switch; use it as a context manager."""

    nodes: int
    rate_mbit: float
    delay_ms: float = 0.0
    prefix: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")
    _namespaces: list[str] = field(default_factory=list, init=False, repr=False)
    _procs: list[subprocess.Popen] = field(default_factory=list, init=False, repr=False)
    _launches: int = field(default=0, init=False, repr=False)
    _shaped_delay: float | None = field(default=None, init=False, repr=False)  # qdiscs in place
    _old_handlers: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 2 <= self.nodes <= 200:
            raise ClusterError(f"nodes: need 2 to 200, got {self.nodes}")
        if self.rate_mbit <= 0:
            raise ClusterError(f"rate_mbit: must be > 0, got {self.rate_mbit}")
        if self.delay_ms < 0:
            raise ClusterError(f"delay_ms: must be >= 0, got {self.delay_ms}")
        if len(self.prefix) > 10:
            raise ClusterError(f"prefix {self.prefix!r}: at most 10 characters (interface names)")

    # Names

    def node_ns(self, i: int) -> str:
        return f"{self.prefix}n{i}"

    @property
    def switch_ns(self) -> str:
        return f"{self.prefix}sw"

    def node_if(self, i: int) -> str:
        return f"{self.prefix}v{i}"

    def port_if(self, i: int) -> str:
        return f"{self.prefix}p{i}"

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    # Life cycle

    def __enter__(self) -> EmulatedCluster:
        ok, reason = namespaces_supported()
        if not ok:
            raise ClusterError(reason)
        self._install_handlers()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _install_handlers(self) -> None:
        atexit.register(self.close)

        def handler(signum: int, frame: object) -> None:
            self.close()
            raise SystemExit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(ValueError):  # not the main thread: atexit still holds
                self._old_handlers[sig] = signal.signal(sig, handler)

    def close(self) -> None:
        """Kill the runs, delete the namespaces; safe to call more than once."""
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self._procs.clear()
        delete_namespaces(list(reversed(self._namespaces)))
        self._namespaces.clear()
        self._shaped_delay = None
        for sig, old in self._old_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, old)
        self._old_handlers.clear()
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)

    def _add_ns(self, name: str) -> None:
        _ip("ip", "netns", "add", name)
        self._namespaces.append(name)
        _ip("ip", "link", "set", "lo", "up", ns=name)

    def _create(self) -> None:
        if self.delay_ms > 0 and not netem_supported():
            raise ClusterError(
                f"delay_ms={self.delay_ms}: this kernel has no netem qdisc "
                "(CONFIG_NET_SCH_NETEM); use a delay of 0"
            )
        sw = self.switch_ns
        self._add_ns(sw)
        _ip("ip", "link", "add", "br0", "type", "bridge", ns=sw)
        _ip("ip", "link", "set", "br0", "up", ns=sw)
        for i in range(self.nodes):
            ns = self.node_ns(i)
            self._add_ns(ns)
            # Created inside the namespaces: never a device in the host's namespace.
            _ip("ip", "link", "add", self.node_if(i), "netns", ns, "type", "veth", "peer",
                "name", self.port_if(i), "netns", sw)  # fmt: skip
            _ip("ip", "link", "set", self.port_if(i), "master", "br0", ns=sw)
            _ip("ip", "link", "set", self.port_if(i), "up", ns=sw)
            for ns_, dev in ((ns, self.node_if(i)), (sw, self.port_if(i))):
                _ip("ip", "link", "set", "dev", dev, "gso_max_segs", str(GSO_MAX_SEGS), ns=ns_)
            _ip("ip", "addr", "add", f"{self.address(i)}/24", "dev", self.node_if(i), ns=ns)
            _ip("ip", "link", "set", self.node_if(i), "up", ns=ns)
        self.set_rate(self.rate_mbit, self.delay_ms)

    def set_rate(self, rate_mbit: float, delay_ms: float | None = None) -> None:
        """Shape every veth end (node egress and switch egress toward the node) to ``rate``."""
        if rate_mbit <= 0:
            raise ClusterError(f"rate_mbit: must be > 0, got {rate_mbit}")
        delay = self.delay_ms if delay_ms is None else delay_ms
        burst = max(MIN_BURST_BYTES, int(rate_mbit * 1e6 / 8 * BURST_SECONDS))
        ends = [(self.node_ns(i), self.node_if(i)) for i in range(self.nodes)]
        ends += [(self.switch_ns, self.port_if(i)) for i in range(self.nodes)]
        for ns, dev in ends:
            tbf = ["tbf", "rate", f"{rate_mbit:g}mbit", "burst", str(burst), "latency",
                   f"{QUEUE_LATENCY_MS}ms"]  # fmt: skip
            if self._shaped_delay == delay:
                # In place, while a run may be sending: replacing the qdisc would drop its queue.
                _ip("tc", "qdisc", "change", "dev", dev, "root", "handle", "1:", *tbf, ns=ns)
                continue
            _ip("tc", "qdisc", "del", "dev", dev, "root", ns=ns, check=False)
            _ip("tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", *tbf, ns=ns)
            if delay > 0:
                # Half the delay on each end: one-way node-to-node delay = delay_ms.
                _ip("tc", "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:",
                    "netem", "delay", f"{delay / 2:g}ms", ns=ns)  # fmt: skip
        self.rate_mbit, self.delay_ms = rate_mbit, delay
        self._shaped_delay = delay

    def qdiscs(self) -> list[str]:
        """``tc qdisc show`` of every veth end (for checks and logs)."""
        out = []
        for i in range(self.nodes):
            out.append(
                _ip("tc", "qdisc", "show", "dev", self.node_if(i), ns=self.node_ns(i)).stdout
            )
            out.append(_ip("tc", "qdisc", "show", "dev", self.port_if(i), ns=self.switch_ns).stdout)
        return out

    def tx_bytes(self, i: int) -> int:
        """Bytes node ``i`` has sent through its link so far (its veth's counter: payload and
        TCP/IP/Ethernet headers, ACKs included)."""
        path = f"/sys/class/net/{self.node_if(i)}/statistics/tx_bytes"
        return int(_ip("cat", path, ns=self.node_ns(i)).stdout.strip())

    # Runs

    def exec_argv(self, i: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.node_ns(i), *argv]

    def launch(
        self,
        config: str | Path,
        overrides: list[str],
        workdir: str | Path,
        *,
        nproc_per_node: int = 1,
        env: dict[str, str] | None = None,
        nice: int = 0,
    ) -> Launch:
        """Start ``yuanlfa.cli.train`` on every node (one torchrun each, static rendezvous at
        node 0); the JSONL step log and each node's output go to ``workdir``. ``nice`` < 0
        (root) favours the run over the machine's other work, for timings on a shared
        machine."""
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        log = workdir / f"steps-{uuid.uuid4().hex[:8]}.jsonl"
        # A fresh port per launch: the previous rendezvous' sockets may linger in TIME_WAIT.
        port = MASTER_PORT + self._launches
        self._launches += 1
        base_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        procs, outs = [], []
        for i in range(self.nodes):
            argv = [
                "nice", "-n", str(nice), sys.executable, "-m", "torch.distributed.run",
                "--nnodes", str(self.nodes), "--node_rank", str(i),
                "--nproc_per_node", str(nproc_per_node),
                "--master_addr", self.address(0), "--master_port", str(port),
                "-m", "yuanlfa.cli.train", "--config", str(config), "--quiet",
                "--set", *overrides, f"logging.jsonl={log}", "logging.log_interval=1",
            ]  # fmt: skip
            out = open(workdir / f"node{i}-{log.stem}.log", "w+")  # noqa: SIM115
            outs.append(out)
            node_env = {**base_env, "GLOO_SOCKET_IFNAME": self.node_if(i)}
            proc = subprocess.Popen(
                self.exec_argv(i, argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=node_env,
                start_new_session=True,  # one process group per node: killpg ends all of it
            )
            procs.append(proc)
            self._procs.append(proc)
        return Launch(self, procs, outs, log)

    def train(
        self,
        config: str | Path,
        overrides: list[str],
        workdir: str | Path,
        *,
        timeout_s: float = 600.0,
        **options,
    ) -> TrainRun:
        """:meth:`launch` and wait: the finished run. Raises ClusterError when a node fails or
        the run exceeds ``timeout_s``."""
        return self.launch(config, overrides, workdir, **options).wait(timeout_s)


@dataclass
class Launch:
    """A training run under way on the cluster."""

    cluster: EmulatedCluster
    procs: list[subprocess.Popen]
    outs: list
    log: Path
    started: float = field(default_factory=time.perf_counter)

    def records(self) -> list[dict]:
        """The step records written so far (the trainer flushes each one)."""
        if not self.log.exists():
            return []
        lines = self.log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def failed(self) -> bool:
        return any(p.poll() not in (None, 0) for p in self.procs)

    def wait_for_records(self, count: int, timeout_s: float, poll_s: float = 0.05) -> list[dict]:
        """Block until ``count`` step records exist; ClusterError (the run stopped) when the
        run fails, ends short or exceeds ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            records = self.records()
            if len(records) >= count:
                return records
            if self.failed() or all(p.poll() is not None for p in self.procs):
                self.wait(30.0)  # raises with the failing node's output
                raise ClusterError(f"the run ended after {len(records)} of {count} steps")
            if time.monotonic() > deadline:
                self.stop()
                raise ClusterError(f"{count} steps did not finish within {timeout_s:.0f} s")
            time.sleep(poll_s)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if proc in self.cluster._procs:
                self.cluster._procs.remove(proc)

    def wait(self, timeout_s: float = 600.0) -> TrainRun:
        """The finished run; ClusterError when a node fails or ``timeout_s`` passes."""
        try:
            deadline = time.monotonic() + timeout_s
            while any(p.poll() is None for p in self.procs):
                if time.monotonic() > deadline:
                    raise ClusterError(f"the run did not finish within {timeout_s:.0f} s")
                if self.failed():
                    time.sleep(5.0)  # let the other nodes fail and print on their own
                    break
                time.sleep(0.2)
        finally:
            self.stop()
        texts = []
        for out in self.outs:
            out.seek(0)
            texts.append(out.read())
            out.close()
        run = TrainRun(
            self.records(), texts, [p.returncode for p in self.procs],
            time.perf_counter() - self.started,
        )  # fmt: skip
        if not run.ok:
            failed = next(i for i, p in enumerate(self.procs) if p.returncode != 0)
            raise ClusterError(
                f"node {failed} exited with {self.procs[failed].returncode}:\n"
                + texts[failed][-3000:]
            )
        return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="say whether namespaces work here")
    parser.add_argument("--cleanup-stale", action="store_true", help="remove dead runs' leftovers")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--rate-mbit", type=float, default=1000.0)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    parser.add_argument("--workdir", default=None, help="logs (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.check:
        ok, reason = namespaces_supported()
        print("network namespaces: " + ("available" if ok else f"not available: {reason}"))
        if ok:
            print("netem (link delay): " + ("available" if netem_supported() else "not in kernel"))
        return 0 if ok else 1
    if args.cleanup_stale:
        removed = cleanup_stale()
        print(f"removed {len(removed)}: {' '.join(removed)}" if removed else "nothing to remove")
        return 0
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        try:
            with EmulatedCluster(args.nodes, args.rate_mbit, args.delay_ms) as cluster:
                run = cluster.train(
                    args.config, args.overrides, workdir, nproc_per_node=args.nproc_per_node
                )
        except ClusterError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    times = run.step_times()
    print(f"{len(times)} steps, step_time_s: " + " ".join(f"{t:.3f}" for t in times))
    print(f"median after {args.warmup} warm-up steps: {run.median_step_s(args.warmup):.4f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
