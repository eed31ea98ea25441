"""Losing an island and getting it back (per-island launches through torchft; docs/islands.md).

Two islands of one CPU process each, launched separately (``yuanlfa-train --island I``), DiLoCo
every 4 steps, the lighthouse started by island 0 in a process of its own (``outer.lighthouse:
auto``). After a joint outer step an island is SIGKILLed: island 0 (which started the
lighthouse) or island 1. The other keeps training alone (its records go on, with
``islands_alive`` 1); the killed island is launched again, is healed at the next quorum from the
survivor (its first step is the survivor's, not 1) and trains on; at the end both islands hold
the same parameters, compared in their saved state, and the lighthouse has exited. The test
waits for log records, never for fixed times, so a loaded machine only makes it slower.
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
from yuanlfa.parallel.islands import lighthouse

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
    files = [*sorted(tmp.glob("*.out")), *tmp.glob("ckpt/lighthouse.d/log")]
    return "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in files)


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


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.slow
@pytest.mark.parametrize("killed", [0, 1], ids=["starter_killed", "other_killed"])
def test_island_lost_keeps_training_and_rejoins_with_live_weights(
    small_corpus: str, tmp_path: Path, killed: int
) -> None:
    survivor = 1 - killed
    logs = [tmp_path / f"run.island{i}.jsonl" for i in (0, 1)]
    relog = tmp_path / f"again.island{killed}.jsonl"
    # Island 0 starts the lighthouse: island 1 is held at a gate until it is up.
    gate1, gate = tmp_path / "go1", tmp_path / "go"
    first = [
        _launch(0, small_corpus, tmp_path, "run"),
        _launch(1, small_corpus, tmp_path, "run", gate1),
    ]
    again = _launch(killed, small_corpus, tmp_path, "again", gate)
    procs = [*first, again]
    pid = None
    try:
        pid = _wait_for(
            "the lighthouse",
            lambda: lighthouse.read_pid(tmp_path / "ckpt"),
            procs,
            tmp_path,
        )
        # Its own process, started by island 0 (and outliving it when island 0 is killed).
        assert lighthouse.running(pid) and _parent(pid) == first[0].pid
        gate1.touch()
        # A joint outer step, seen by the island to be killed.
        joint = _wait_for(
            "a joint outer step",
            lambda: [
                r for r in _records(logs[killed]) if r["outer_sync"] and r["islands_alive"] == 2
            ],
            procs,
            tmp_path,
        )
        first[killed].send_signal(signal.SIGKILL)
        first[killed].wait()
        procs.remove(first[killed])
        killed_at = _records(logs[killed])[-1]["step"]
        # The survivor goes on alone: an outer step with one island, then more steps.
        alone = _wait_for(
            f"island {survivor} training alone",
            lambda: [
                r
                for r in _records(logs[survivor])
                if r["islands_alive"] == 1 and r["step"] > joint[0]["step"]
            ],
            procs,
            tmp_path,
        )
        _wait_for(
            f"island {survivor}'s steps to rise",
            lambda: _records(logs[survivor])[-1]["step"] >= alone[0]["step"] + 2,
            procs,
            tmp_path,
        )
        assert first[survivor].poll() is None, "the survivor finished before the relaunch"
        assert lighthouse.running(pid), "the lighthouse went with the killed island"
        gate.touch()  # the killed island relaunched
        for p in procs:
            assert p.wait(timeout=240) == 0, _outputs(tmp_path)
        # Every island finished: the lighthouse is gone, and so is its address.
        _wait_for("the lighthouse to exit", lambda: not lighthouse.running(pid), [], tmp_path, 60)
        assert not (tmp_path / "ckpt" / "lighthouse").exists()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        if pid is not None and lighthouse.running(pid):
            os.kill(pid, signal.SIGKILL)
    alive, back = _records(logs[survivor]), _records(relog)
    # The survivor never restarted: every step once, in order. Its first step may be past 1:
    # whichever island reached the lighthouse's first quorum started at step 1 and the other
    # was healed to its step when it joined (island 1 is let in once the lighthouse is up, and
    # on a loaded machine either island can be the first to finish building its model).
    assert [r["step"] for r in alive] == list(range(alive[0]["step"], STEPS + 1))
    firsts = [_records(log)[0]["step"] for log in logs]
    assert min(firsts) == 1, firsts
    alone_steps = [r["step"] for r in alive if r["islands_alive"] == 1 and r["step"] > killed_at]
    assert len(alone_steps) >= 2, alone_steps
    # The relaunched island took the survivor's step (and weights) at a quorum, not step 1 ...
    assert back[0]["step"] > alone_steps[0], (back[0], alone_steps)
    assert back[-1]["step"] == STEPS
    # ... and exchanged with it again until the end.
    assert alive[-1]["islands_alive"] == 2 and back[-1]["outer_sync"]
    print(
        f"killed island {killed} at step {killed_at}; island {survivor} alone at steps "
        f"{alone_steps[0]}..{alone_steps[-1]}; island {killed} back at step {back[0]['step']}; "
        f"losses at the end: {alive[-1]['loss']:.4f} / {back[-1]['loss']:.4f}"
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
