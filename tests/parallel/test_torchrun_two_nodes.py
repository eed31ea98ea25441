"""A multi-node launch emulated on this machine: two torchrun "nodes" of 4 processes each share a
c10d rendezvous on localhost and train the tiny model in 3D, tp=2 (sequence parallel) x pp=2
(uneven split) x dp=2 with the sharded optimizer; the losses equal one process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.launcher import free_port

ROOT = Path(__file__).resolve().parents[2]
STEPS = 10


def _losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_nodes_tp2_pp2_dp2_equal_one_process(small_corpus: str, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train_args = [
        "-m", "yuanlfa.cli.train", "--config", "configs/tiny.yaml", "--quiet", "--set",
        f"data.path={small_corpus}", f"train.steps={STEPS}", "train.seq_length=64",
        "train.micro_batch_size=2", "train.global_batch_size=8", "train.eval_iters=0",
    ]  # fmt: skip
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node_rank",
                str(node),
                "--nproc_per_node",
                "4",
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                endpoint,
                "--rdzv_id",
                "two-nodes",
                *train_args,
                "parallel.tp=2",
                "parallel.sequence_parallel=true",
                "parallel.pp=2",
                "parallel.pipeline_blocks=[1,3]",
                "optim.distributed=true",
                f"logging.jsonl={tmp_path / 'nodes.jsonl'}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for node in (0, 1)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in nodes]
    for node, (p, out) in enumerate(zip(nodes, outputs)):
        assert p.returncode == 0, f"node {node}:\n{out[-3000:]}"
    single = subprocess.run(
        [sys.executable, *train_args, f"logging.jsonl={tmp_path / 'one.jsonl'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    one, nodes_losses = _losses(tmp_path / "one.jsonl"), _losses(tmp_path / "nodes.jsonl")
    assert len(one) == len(nodes_losses) == STEPS
    assert nodes_losses == pytest.approx(one, rel=1e-5)
    assert "tp 2 x dp 2 x pp 2 (1f1b, blocks [1, 3]" in outputs[0] + outputs[1]
