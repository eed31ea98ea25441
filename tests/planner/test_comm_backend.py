"""The planner's byte rule per backend against what gloo really sends, and the host-side
collective throughput of a link.

gloo's bytes are counted on the loopback of a fresh network namespace (nothing else sends
there): two processes run each collective, and the interface's counter, less the TCP/IP
headers' share, is compared with :func:`yuanlfa.planner.comm.reduce_scatter_bytes` and the ring
counts of :mod:`yuanlfa.layout.traffic`. Needs root (skipped otherwise)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from yuanlfa.layout.traffic import ring_all_reduce_bytes, ring_reduce_scatter_bytes
from yuanlfa.planner.comm import dp_step_s, reduce_scatter_bytes
from yuanlfa.planner.links import Link, ring_all_gather_s, ring_all_reduce_s
from yuanlfa.planner.memory import StateBytes

ROOT = Path(__file__).resolve().parents[2]
ELEMENTS = 1_000_000  # 4 MB of fp32: headers and the rendezvous are a small share

# Run inside the namespace: two gloo ranks, each collective three times; prints per op the
# bytes the loopback carried (both ranks' sends) per call.
_SCRIPT = r"""
import json, sys, torch, torch.distributed as dist, torch.multiprocessing as mp

def lo_bytes():
    with open("/sys/class/net/lo/statistics/tx_bytes") as f:
        return int(f.read())

def worker(rank, n, q):
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29655", rank=rank, world_size=2)
    x, part, whole = torch.ones(n), torch.empty(n // 2), torch.empty(n)
    ops = {
        "all_reduce": lambda: dist.all_reduce(x),
        "reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(part, x),
        "reduce_scatter_list": lambda: dist.reduce_scatter(part, list(x.chunk(2))),
        "all_gather_into_tensor": lambda: dist.all_gather_into_tensor(whole, part),
    }
    out = {}
    for name, op in ops.items():
        dist.barrier()
        b0 = lo_bytes()
        for _ in range(3):
            op()
        dist.barrier()
        out[name] = (lo_bytes() - b0) / 3
    if rank == 0:
        q.put(out)
    dist.destroy_process_group()

if __name__ == "__main__":
    n = int(sys.argv[1])
    q = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(worker, args=(n, q), nprocs=2, start_method="spawn")
    print(json.dumps(q.get()))
"""


def _gloo_bytes(tmp_path: Path) -> dict[str, float]:
    if os.geteuid() != 0:
        pytest.skip("needs root (a network namespace)")
    ns = f"ylcb{uuid.uuid4().hex[:6]}"
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode:
        pytest.skip("network namespaces not available")
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        script = tmp_path / "gloo_bytes.py"
        script.write_text(_SCRIPT)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, str(script), str(ELEMENTS)],
            capture_output=True, text=True, env=env, timeout=120, cwd=ROOT,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_gloo_sends_what_the_planner_counts(tmp_path: Path) -> None:
    measured = _gloo_bytes(tmp_path)
    nbytes = 4 * ELEMENTS
    # Both ranks' sends; loopback frames are up to 64 KB, so headers are well under 1%.
    predicted = {
        "all_reduce": 2 * ring_all_reduce_bytes(nbytes, 2),
        "reduce_scatter_tensor": 2 * reduce_scatter_bytes(nbytes, 2, "gloo"),
        "reduce_scatter_list": 2 * reduce_scatter_bytes(nbytes, 2, "gloo"),
        "all_gather_into_tensor": 2 * ring_reduce_scatter_bytes(nbytes, 2),
    }
    for op, expected in predicted.items():
        assert measured[op] == pytest.approx(expected, rel=0.03), (op, measured)
    # And the ring's figure would be wrong for gloo's reduce-scatter: it sends twice that.
    assert measured["reduce_scatter_tensor"] > 1.5 * 2 * ring_reduce_scatter_bytes(nbytes, 2)


def test_reduce_scatter_rule_by_backend() -> None:
    for n in (2, 3, 8):
        assert reduce_scatter_bytes(1e6, n, "nccl") == ring_reduce_scatter_bytes(1e6, n)
        assert reduce_scatter_bytes(1e6, n, "gloo") == ring_all_reduce_bytes(1e6, n)


def test_dp_step_on_gloo_costs_an_all_reduce_and_an_all_gather() -> None:
    """ZeRO-1 on gloo: the gradients' reduce-scatter is an all-reduce; the all-gather a ring."""
    link = Link(0.1, 1e-3, cpu_gbps=0.05)
    state = StateBytes(weights=4, grads=4, optimizer=8, optimizer_shards=2)
    params, buckets = 3_000_000, 2
    per_bucket = ring_all_reduce_s(4 * params / buckets, 2, link)
    per_bucket += ring_all_gather_s(4 * params / buckets, 2, link)
    got = dp_step_s(params, 2, state, True, params // buckets, link, "gloo")
    assert got == pytest.approx(buckets * per_bucket)
    assert dp_step_s(params, 2, state, True, params // buckets, link, "nccl") < got


def test_cpu_throughput_adds_to_each_byte() -> None:
    """A 2-rank all-reduce of B bytes: 2 latencies, B over the wire and B through the host."""
    B, wire, cpu, alpha = 8e6, 0.0125, 0.07, 4e-4
    expected = 2 * alpha + B / (wire * 1e9) + B / (cpu * 1e9)
    assert ring_all_reduce_s(B, 2, Link(wire, alpha, cpu_gbps=cpu)) == pytest.approx(expected)
    assert Link(wire, alpha, cpu).scaled(0.5).cpu_gbps == cpu


def test_fit_cpu_gbps_recovers_the_throughput() -> None:
    """A dp step's time at a known host throughput, fitted back from that time alone."""
    from yuanlfa.planner.calibrate import fit_cpu_gbps

    state = StateBytes(weights=4, grads=4, optimizer=8, optimizer_shards=2)

    def step(cpu: float) -> float:
        return 0.5 + dp_step_s(9_000_000, 2, state, True, 40_000_000, Link(1.2, 5e-4, cpu), "gloo")

    measured = step(0.075)
    assert fit_cpu_gbps(step, measured) == pytest.approx(0.075, rel=1e-6)
    # Faster than even a free host: the fit says "practically free" (its upper end).
    assert fit_cpu_gbps(step, 0.5) == 1e4
