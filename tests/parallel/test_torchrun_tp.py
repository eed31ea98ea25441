"""The README's tensor-parallel launch, end to end: torchrun, 2 processes, tp=2 with sequence
parallelism, on the tiny config and the embedded corpus, equals one process for 20 steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def _run(cmd: list[str], tmp: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "YUANLFA_CACHE": str(tmp / "cache")}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_tp2_sequence_parallel_equals_one_process(tmp_path: Path) -> None:
    common = ["--config", "configs/tiny.yaml", "--set", "train.steps=20", "--quiet"]
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "-m", "yuanlfa.cli.train", *common, "--set", "parallel.tp=2",
         "--set", "parallel.sequence_parallel=true", f"logging.jsonl={tmp_path / 'tp2.jsonl'}"],
        tmp_path,
    )  # fmt: skip
    _run(
        [sys.executable, "-m", "yuanlfa.cli.train", *common,
         "--set", f"logging.jsonl={tmp_path / 'tp1.jsonl'}"],
        tmp_path,
    )  # fmt: skip
    tp2, tp1 = _losses(tmp_path / "tp2.jsonl"), _losses(tmp_path / "tp1.jsonl")
    assert len(tp1) == len(tp2) == 20
    assert tp1[-1] < tp1[0] - 1.0
    assert tp2 == pytest.approx(tp1, rel=1e-5)
