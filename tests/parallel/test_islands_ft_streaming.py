"""Streaming DiLoCo with overlapped exchanges (``outer.fragment_delay`` > 0), and DiLoCo averaging
the inner AdamW moments (``outer.average_moments``), across per-island launches through torchft
equal the same run with both islands in one launch.

The one-launch run (``GroupExchange`` over gloo) is the reference: tests/parallel/test_islands.py
proves it against a direct computation of the outer steps. Here two islands of one CPU process
each are launched apart (``yuanlfa-train --island I``, a torchft Manager each, rounds opened
by a quorum and an all-reduce after one step and committed ``fragment_delay`` steps later)
while the same config runs in one launch of two ranks; their losses, records and saved states
must agree bit for bit (the cross-island sum of two fp32 numbers is the same in either order).
A second test starts island 1 late: healed at a round's start, it joins that round and both end
with the same anchors.

The lighthouse is started here with ``min_replicas`` 2: with ``auto`` (1) an island that asks
for its first quorum before the other has started would take it alone, and the late island would
be healed at the next round, a correct run but not the one compared with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.distributed.launcher import run_distributed
from yuanlfa.checkpoint.files import step_name
from yuanlfa.config import load_config

pytest.importorskip("torchft")

ROOT = Path(__file__).resolve().parents[2]
STEPS = 10


def _overrides(corpus: str, root: Path, delay: int, mix: float, moments: str = "none") -> list[str]:
    """Streaming DiLoCo with ``delay`` and ``mix``; or with ``moments`` other than none DiLoCo
    averaging the inner AdamW moments at its outer steps (delay and mix unused)."""
    outer = [
        "outer.algorithm=streaming_diloco",
        "outer.fragments=2",
        f"outer.fragment_delay={delay}",
        f"outer.fragment_mix={mix}",
    ]
    if moments != "none":
        outer = ["outer.algorithm=diloco", f"outer.average_moments={moments}"]
    return [
        f"data.path={corpus}",
        "model.num_layers=2",
        "model.hidden_size=64",
        f"train.steps={STEPS}",
        "train.seq_length=32",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "train.eval_iters=0",
        "train.eval_interval=0",
        "parallel.islands=2",
        *outer,
        "outer.sync_every=4",
        "outer.timeout_s=60",
        f"checkpoint.dir={root}/ckpt",
        f"logging.jsonl={root}/log.jsonl",
    ]


def _one_launch(rank: int, world: int, overrides: list[str]) -> list[dict]:
    from yuanlfa.train import train

    return train(load_config("configs/tiny.yaml", overrides), progress=False).records


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


# Fields that do not depend on timing.
FIELDS = ("step", "loss", "grad_norm", "lr", "outer_sync", "link_bytes", "islands_alive")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("delay", "mix", "moments"), [(1, 0.25, "none"), (2, 0.0, "none"), (0, 0.0, "both")]
)
def test_per_island_streaming_with_delay_equals_one_launch(
    small_corpus: str, tmp_path: Path, delay: int, mix: float, moments: str
) -> None:
    from torchft.coordination import LighthouseServer

    lighthouse = LighthouseServer(
        bind="[::]:0", min_replicas=2, join_timeout_ms=60000, heartbeat_timeout_ms=5000
    )
    apart, together = tmp_path / "apart", tmp_path / "together"
    port = lighthouse.address().rsplit(":", 1)[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("YUANLFA_ISLAND", None)
    procs = []
    try:
        for island in (0, 1):
            cmd = [sys.executable, "-m", "yuanlfa.cli.train", "--config", "configs/tiny.yaml"]
            cmd += ["--quiet", "--island", str(island), "--set"]
            cmd += _overrides(small_corpus, apart, delay, mix, moments)
            cmd.append(f"outer.lighthouse=127.0.0.1:{port}")
            out = open(tmp_path / f"island{island}.out", "w")  # noqa: SIM115 - closed by the process
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out))
        # Meanwhile the same config with both islands in one launch of two ranks.
        ranks = run_distributed(
            _one_launch, 2, _overrides(small_corpus, together, delay, mix, moments), timeout=300
        )
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        lighthouse.shutdown()
    outputs = "\n".join(f.read_text()[-3000:] for f in sorted(tmp_path.glob("*.out")))
    assert [p.returncode for p in procs] == [0, 0], outputs
    last = step_name(STEPS)
    for island in (0, 1):
        launched = _records(apart / f"log.island{island}.jsonl")
        # Rank r of the one launch is island r (one rank per island): its own records.
        reference = ranks[island]
        assert [r["step"] for r in launched] == list(range(1, STEPS + 1))
        for a, b in zip(launched, reference):
            assert {k: a[k] for k in FIELDS} == {k: b[k] for k in FIELDS}, (island, a["step"])
        got = _state(apart / "ckpt" / f"island{island}" / "islands" / last / "rank0.pt")
        want = _state(together / "ckpt" / "islands" / last / f"rank{island}.pt")
        for name, value in want["model"].items():
            torch.testing.assert_close(got["model"][name], value, rtol=0, atol=0, msg=name)
        for a, b in zip(got["outer"]["anchors"], want["outer"]["anchors"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for name, value in want["inner"]["state"].items():  # the averaged moments too
            for key, t in value.items():
                torch.testing.assert_close(got["inner"]["state"][name][key], t, rtol=0, atol=0)
    applied = [r["step"] for r in ranks[0] if r["outer_sync"]]
    if moments != "none":  # DiLoCo: every 4 steps
        assert applied == [4, 8], applied
        return
    # Exchanges were overlapped and applied (fragment 1 starts at 2, 6, 10; fragment 0 at 4, 8).
    assert applied == [s + delay for s in (2, 4, 6, 8) if s + delay <= STEPS], applied


# Island 1 is started early and held at a gate after its imports, so that it joins while island
# 0 is still training (the steps of this model take milliseconds).
GATED = """
import pathlib, sys, time
import yuanlfa.train
from yuanlfa.cli.train import main
gate = pathlib.Path(sys.argv[1])
while not gate.exists():
    time.sleep(0.05)
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_late_island_is_healed_at_a_round_start_with_delay(
    small_corpus: str, tmp_path: Path
) -> None:
    """Island 1 starts after island 0 has trained alone: torchft heals it at island 0's next
    round start (a quorum), it joins that round's all-reduce and both commit a step later; from
    then on they exchange every round and end with the same anchors."""
    steps = 400
    overrides = _overrides(small_corpus, tmp_path, delay=1, mix=0.0)
    overrides = [
        o if not o.startswith("train.steps=") else f"train.steps={steps}" for o in overrides
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("YUANLFA_ISLAND", None)
    gate = tmp_path / "go"
    procs = []
    try:
        for island, start in ((1, ["-c", GATED, str(gate)]), (0, ["-m", "yuanlfa.cli.train"])):
            cmd = [sys.executable, *start, "--config", "configs/tiny.yaml", "--quiet"]
            cmd += ["--island", str(island), "--set", *overrides]
            out = open(tmp_path / f"island{island}.out", "w")  # noqa: SIM115 - closed by the process
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out))
        log0 = tmp_path / "log.island0.jsonl"
        deadline = time.monotonic() + 240
        while not (log0.exists() and len(log0.read_text().splitlines()) >= 6):
            assert procs[1].poll() is None and time.monotonic() < deadline, "island 0 ended"
            time.sleep(0.05)
        gate.touch()
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outputs = "\n".join(f.read_text()[-3000:] for f in sorted(tmp_path.glob("*.out")))
    assert [p.returncode for p in procs] == [0, 0], outputs
    records0 = _records(tmp_path / "log.island0.jsonl")
    records1 = _records(tmp_path / "log.island1.jsonl")
    assert [r["step"] for r in records0] == list(range(1, steps + 1))
    first = records1[0]["step"]
    # Healed at a round start s (fragment 1 starts at 2, 6, ..., fragment 0 at 4, 8, ...): its
    # first step is s + 1, where that round (joined by both) commits.
    assert first > 6 and (first - 1) % 2 == 0, first
    joined = records0[first - 1]
    assert joined["outer_sync"] and joined["islands_alive"] == 2, joined
    assert records1[0]["outer_sync"] and records1[-1]["step"] == steps
    assert all(r["islands_alive"] == 2 for r in records0[first - 1 :])
    states = [
        _state(tmp_path / "ckpt" / f"island{i}" / "islands" / step_name(steps) / "rank0.pt")
        for i in (0, 1)
    ]
    for a, b in zip(states[0]["outer"]["anchors"], states[1]["outer"]["anchors"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
