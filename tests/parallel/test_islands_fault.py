"""Losing an island and getting it back (per-island launches through torchft; docs/islands.md).

Two islands of one CPU process each, launched separately (``yuanlfa-train --island I``), DiLoCo
every 4 steps, the lighthouse started by island 0 (``outer.lighthouse: auto``). After a joint
outer step island 1 is SIGKILLed; island 0 keeps training alone (its records go on, with
``islands_alive`` 1); island 1 is launched again, is healed at the next quorum from island 0
(its first step is island 0's, not 1) and trains on; at the end both islands hold the same
parameters, compared in their saved state. The test waits for log records, never for fixed
times, so a loaded machine only makes it slower.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from yuanlfa.checkpoint.files import step_name

pytest.importorskip("torchft")

STEPS, H = 160, 4
ROOT = Path(__file__).resolve().parents[2]
# The relaunched island is started early and held at a gate after its imports (seconds on a
# loaded machine), so that its start after the gate is short next to island 0's remaining steps.
GATED = """
import pathlib, sys, time
import yuanlfa.train
from yuanlfa.cli.train import main
gate = pathlib.Path(sys.argv[1])
while not gate.exists():
    time.sleep(0.05)
sys.exit(main(sys.argv[2:]))
"""


def _launch(
    island: int, corpus: str, tmp: Path, log: str, gate: Path | None = None
) -> subprocess.Popen:
    start = [sys.executable, "-m", "yuanlfa.cli.train"]
    if gate is not None:
        start = [sys.executable, "-c", GATED, str(gate)]
    cmd = [
        *start,
        "--config",
        "configs/tiny.yaml",
        "--quiet",
        "--island",
        str(island),
        "--set",
        f"data.path={corpus}",
        "model.num_layers=2",
        f"train.steps={STEPS}",
        "train.seq_length=64",
        "train.micro_batch_size=4",
        "train.global_batch_size=8",
        "train.eval_iters=0",
        "train.eval_interval=0",
        "parallel.islands=2",
        "outer.algorithm=diloco",
        f"outer.sync_every={H}",
        "outer.timeout_s=60",
        f"checkpoint.dir={tmp}/ckpt",
        f"logging.jsonl={tmp}/{log}.jsonl",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = open(tmp / f"{log}.island{island}.out", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written
            break
    return out


def _outputs(tmp: Path) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(tmp.glob("*.out")))


def _wait_for(what: str, check, procs: list[subprocess.Popen], tmp: Path, limit: float = 180.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        for p in procs:
            if p.poll() is not None and p.returncode != 0:
                logs = "\n".join(f.read_text()[-3000:] for f in tmp.glob("*.out"))
                pytest.fail(
                    f"an island exited with {p.returncode} while waiting for {what}:\n{logs}"
                )
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}:\n{_outputs(tmp)}")


@pytest.mark.slow
def test_island_lost_keeps_training_and_rejoins_with_live_weights(
    small_corpus: str, tmp_path: Path
) -> None:
    log0, log1 = tmp_path / "run.island0.jsonl", tmp_path / "run.island1.jsonl"
    relog1 = tmp_path / "again.island1.jsonl"
    first = [_launch(0, small_corpus, tmp_path, "run"), _launch(1, small_corpus, tmp_path, "run")]
    gate = tmp_path / "go"
    again = _launch(1, small_corpus, tmp_path, "again", gate)
    procs = [*first, again]
    try:
        # A joint outer step, seen by island 1.
        joint = _wait_for(
            "a joint outer step",
            lambda: [r for r in _records(log1) if r["outer_sync"] and r["islands_alive"] == 2],
            procs,
            tmp_path,
        )
        first[1].send_signal(signal.SIGKILL)
        first[1].wait()
        procs.remove(first[1])
        killed_at = _records(log1)[-1]["step"]
        # Island 0 goes on alone: an outer step with one island, then more steps.
        alone = _wait_for(
            "island 0 training alone",
            lambda: [
                r
                for r in _records(log0)
                if r["islands_alive"] == 1 and r["step"] > joint[0]["step"]
            ],
            procs,
            tmp_path,
        )
        _wait_for(
            "island 0's steps to rise",
            lambda: _records(log0)[-1]["step"] >= alone[0]["step"] + 2,
            procs,
            tmp_path,
        )
        assert first[0].poll() is None, "island 0 finished before island 1 was relaunched"
        gate.touch()  # island 1 relaunched
        for p in procs:
            assert p.wait(timeout=240) == 0, _outputs(tmp_path)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    records0, records1 = _records(log0), _records(relog1)
    # Island 0 never restarted: every step once, in order.
    assert [r["step"] for r in records0] == list(range(1, STEPS + 1))
    alone_steps = [r["step"] for r in records0 if r["islands_alive"] == 1 and r["step"] > killed_at]
    assert len(alone_steps) >= 2, alone_steps
    # The relaunched island took island 0's step (and weights) at a quorum, not step 1 ...
    assert records1[0]["step"] > alone_steps[0], (records1[0], alone_steps)
    assert records1[-1]["step"] == STEPS
    # ... and exchanged with it again until the end.
    assert records0[-1]["islands_alive"] == 2 and records1[-1]["outer_sync"]
    print(
        f"killed island 1 at step {killed_at}; island 0 alone at steps {alone_steps[0]}.."
        f"{alone_steps[-1]}; island 1 back at step {records1[0]['step']}; losses at the end: "
        f"{records0[-1]['loss']:.4f} / {records1[-1]['loss']:.4f}"
    )
    states = [
        torch.load(
            tmp_path / "ckpt" / f"island{i}" / "islands" / step_name(STEPS) / "rank0.pt",
            weights_only=True,
        )
        for i in (0, 1)
    ]
    assert states[0]["model"].keys() == states[1]["model"].keys()
    for name, value in states[0]["model"].items():
        torch.testing.assert_close(value, states[1]["model"][name], rtol=0, atol=0, msg=name)
    for a, b in zip(states[0]["outer"]["anchors"], states[1]["outer"]["anchors"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
