"""benchmarks/gpu_check.sh --dry-run: every stage's CPU stand-in runs and the JSON is written, so
the one-shot GPU check works the first time a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_writes_every_stage(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (path,) = tmp_path.glob("gpu_cpu-dry-run_*.json")
    result = json.loads(path.read_text())
    assert result["dry_run"] and result["ok"]
    stages = result["stages"]
    assert set(stages) == {"tests", "lfa_kernel", "train_triton", "train_reference"}
    assert stages["tests"]["counts"].get("passed", 0) > 0
    assert stages["tests"]["counts"].get("failed", 0) == 0
    (row,) = stages["lfa_kernel"]["results"]["rows"]
    assert row["fwd_bwd"]["ours_ms"] > 0 and row["max_abs_diff_vs_yuan"] < 1e-4
    for impl in ("triton", "reference"):
        summary = stages[f"train_{impl}"]["summary"]
        assert summary["steps_logged"] == 2 and summary["tokens_per_s"] > 0
    # The same model, data and seed: the two filters train alike.
    tri, ref = (stages[f"train_{i}"]["summary"]["final_loss"] for i in ("triton", "reference"))
    assert abs(tri - ref) < 1e-3
