"""The emulated cluster (tools/emulated_cluster.py): namespaces joined by shaped links run a
two-node torchrun training, and nothing is left behind: not after a run, a failed run, an
exception, SIGTERM, or (with ``cleanup_stale``) a killed process. Skips where the machine does
not allow network namespaces (not root)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tools.emulated_cluster import (
    ClusterError,
    EmulatedCluster,
    cleanup_stale,
    leftovers,
    namespaces_supported,
)

ROOT = Path(__file__).resolve().parents[2]
SUPPORTED, WHY = namespaces_supported()
needs_namespaces = pytest.mark.skipif(not SUPPORTED, reason=WHY or "namespaces available")


def test_bad_arguments() -> None:
    with pytest.raises(ClusterError, match="nodes"):
        EmulatedCluster(1, 100)
    with pytest.raises(ClusterError, match="rate_mbit"):
        EmulatedCluster(2, 0)
    with pytest.raises(ClusterError, match="delay_ms"):
        EmulatedCluster(2, 100, delay_ms=-1)


@needs_namespaces
@pytest.mark.slow
def test_two_node_training_over_a_shaped_link(small_corpus: str, tmp_path: Path) -> None:
    overrides = [
        "model.num_layers=2", "model.hidden_size=64", "train.seq_length=32",
        "train.micro_batch_size=2", "train.global_batch_size=4", "train.steps=3",
        "train.eval_interval=0", "train.eval_iters=0", "train.device=cpu",
        "checkpoint.save_at_end=false", f"data.path={small_corpus}", "parallel.tp=2",
    ]  # fmt: skip
    with EmulatedCluster(2, 200) as net:
        prefix = net.prefix
        names = set(leftovers(prefix))
        assert {net.node_ns(0), net.node_ns(1), net.switch_ns} <= names
        qdiscs = net.qdiscs()
        assert len(qdiscs) == 4 and all("tbf" in q and "200Mbit" in q for q in qdiscs)
        net.set_rate(50)
        assert all("50Mbit" in q for q in net.qdiscs())
        run = net.train(ROOT / "configs/tiny.yaml", overrides, tmp_path, timeout_s=300)
    assert [r["step"] for r in run.records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["step_time_s"] > 0 for r in run.records)
    assert "tp 2 x dp 1" in "".join(run.outputs)
    assert leftovers(prefix) == []


@needs_namespaces
@pytest.mark.slow
def test_failures_leave_nothing_behind(tmp_path: Path) -> None:
    # hidden 128 is not divisible by 3 heads: every node's trainer refuses the config.
    refused = "(?s)node 0 exited with 1:.*not divisible by model.num_heads=3"
    with pytest.raises(ClusterError, match=refused), EmulatedCluster(2, 100) as net:
        prefix = net.prefix
        net.train(ROOT / "configs/tiny.yaml", ["model.num_heads=3"], tmp_path, timeout_s=120)
    assert leftovers(prefix) == []
    with pytest.raises(RuntimeError, match="boom"), EmulatedCluster(3, 100) as net:
        prefix = net.prefix
        raise RuntimeError("boom")
    assert leftovers(prefix) == []


@needs_namespaces
def test_sigterm_and_stale_cleanup() -> None:
    code = (
        "import time; from tools.emulated_cluster import EmulatedCluster; "
        "c = EmulatedCluster(2, 100).__enter__(); print(c.prefix, flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    prefix = proc.stdout.readline().strip()
    assert prefix and leftovers(prefix)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert leftovers(prefix) == []
    # A SIGKILLed run cannot clean up: cleanup_stale removes what a dead process left.
    dead = "yl9999999n0"  # beyond pid_max: no such process
    subprocess.run(["ip", "netns", "add", dead], check=True)
    try:
        assert dead in cleanup_stale()
    finally:
        subprocess.run(["ip", "netns", "del", dead], capture_output=True)
    assert leftovers(dead) == []
    assert not leftovers(f"yl{os.getpid()}")
