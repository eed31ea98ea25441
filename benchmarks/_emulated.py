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


def cluster(rate_mbit: float, latency_s: float) -> Cluster:
    """Two nodes of one device; the inter-node link is the shaped veth path."""
    inter = Link(rate_mbit * 1e6 / 8 / 1e9 * TCP_PAYLOAD_EFFICIENCY, latency_s)
    return Cluster(2, 1, dataclasses.replace(LOOPBACK, latency_s=latency_s), inter)


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
