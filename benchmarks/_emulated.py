"""What the emulated-cluster benchmarks share (weak_link.py, islands_weak_link.py): the planner's
cluster of two one-device nodes behind a shaped link, waiting for a quiet machine, the source
commit of a result."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from yuanlfa.planner.calibrate import TCP_PAYLOAD_EFFICIENCY  # noqa: E402
from yuanlfa.planner.links import Link  # noqa: E402
from yuanlfa.planner.topology import Cluster  # noqa: E402

# The host namespace's loopback between processes of one node (unused with one per node).
LOOPBACK = Link(5.0)


def cluster(rate_mbit: float, latency_s: float, cpu_gbps: float | None = None) -> Cluster:
    """Two nodes of one device; the inter-node link is the shaped veth path (``cpu_gbps``: the
    host-side throughput of the collective library, :class:`~yuanlfa.planner.links.Link`)."""
    inter = Link(rate_mbit * 1e6 / 8 / 1e9 * TCP_PAYLOAD_EFFICIENCY, latency_s, cpu_gbps)
    loopback = dataclasses.replace(LOOPBACK, latency_s=latency_s, cpu_gbps=cpu_gbps)
    return Cluster(2, 1, loopback, inter)


def source_commit() -> str | None:
    """The repository's commit (with "+dirty" when files differ from it), if it is one."""
    import subprocess

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def busy_cores(seconds: float = 2.0) -> float:
    """Cores kept busy by the machine's other work over ``seconds`` (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return (busy1 - busy0) / max(total1 - total0, 1) * (os.cpu_count() or 1)


def wait_for_quiet(max_wait_s: float, threshold: float = 0.15) -> float:
    """Wait (up to ``max_wait_s``) until other work keeps less than ``threshold`` cores busy:
    with 2 cores and 2 training processes, any other load shows in the step time. Returns the
    busy cores seen last."""
    deadline = time.monotonic() + max_wait_s
    busy = busy_cores()
    while busy > threshold and time.monotonic() < deadline:
        busy = busy_cores()
    return busy


# The link probe: the per-message latency of the emulated link as gloo sees it, measured
# directly (not fitted on a training step, where a collective's CPU-side work would pass for
# latency), and a large all-reduce's time for comparison with the link model.
PROBE_PORT = 29900
PROBE_TINY_ROUNDS = 200
PROBE_LARGE_BYTES = 4 * 2**20


def _probe_rank(rank: int, master: str, port: int, rounds: int, large_bytes: int) -> None:
    """One side of the probe (run in node ``rank``'s namespace); rank 0 prints a JSON line."""
    import json

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://{master}:{port}", rank=rank, world_size=2)
    tiny = torch.zeros(1)
    for _ in range(10):  # connections up, buffers registered
        dist.all_reduce(tiny)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(rounds):  # ping-pong: rank 0 sends, rank 1 answers
        if rank == 0:
            dist.send(tiny, 1)
            dist.recv(tiny, 1)
        else:
            dist.recv(tiny, 0)
            dist.send(tiny, 0)
    one_way = (time.perf_counter() - t0) / rounds / 2
    t0 = time.perf_counter()
    for _ in range(rounds):
        dist.all_reduce(tiny)
    tiny_all_reduce = (time.perf_counter() - t0) / rounds
    large = torch.ones(large_bytes // 4)
    dist.all_reduce(large)
    t0 = time.perf_counter()
    for _ in range(3):
        dist.all_reduce(large)
    large_all_reduce = (time.perf_counter() - t0) / 3
    if rank == 0:
        print(json.dumps({
            "one_way_s": one_way, "tiny_all_reduce_s": tiny_all_reduce,
            "large_all_reduce_s": large_all_reduce, "large_bytes": large.numel() * 4,
        }), flush=True)  # fmt: skip
    dist.destroy_process_group()


def probe_link(net, nice: int = 0, timeout_s: float = 300.0) -> dict:
    """Run the probe across ``net``'s (an EmulatedCluster's) link at its current rate:
    {"one_way_s": a tiny message's one-way time (half a gloo send/recv round trip),
    "tiny_all_reduce_s", "large_all_reduce_s", "large_bytes"}."""
    import json
    import subprocess

    global PROBE_PORT
    PROBE_PORT += 1  # a fresh port per probe: the last one's sockets may be in TIME_WAIT
    procs = []
    for i in range(2):
        argv = [
            "nice", "-n", str(nice), sys.executable, str(Path(__file__).resolve()), "--probe",
            str(i), net.address(0), str(PROBE_PORT),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": net.node_if(i)}
        procs.append(
            subprocess.Popen(
                net.exec_argv(i, argv),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )  # fmt: skip
        )
    outs = [p.communicate(timeout=timeout_s) for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("link probe failed:\n" + "\n".join(o[1][-2000:] for o in outs))
    return json.loads(outs[0][0].strip().splitlines()[-1])


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--probe":
    _probe_rank(
        int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), PROBE_TINY_ROUNDS, PROBE_LARGE_BYTES
    )
