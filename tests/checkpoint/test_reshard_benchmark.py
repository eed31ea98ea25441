"""benchmarks/reshard.py on the tiny config: every case runs and converts, and the JSON it
writes holds every case with the fields the committed results have (no timing is checked), so
the script cannot break unnoticed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CASES = {
    "cp -r + sync (floor)",
    "ours -> hf",
    "hf -> ours",
    "ours -> megatron tp2 pp2",
    "megatron tp2 pp2 -> ours",
    "megatron tp2 pp2 -> megatron tp1 pp1",
}


@pytest.mark.slow  # about 20 s: seven fresh processes importing torch
def test_tiny_run(tmp_path: Path) -> None:
    out, work = tmp_path / "result.json", tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "reshard.py"),
           "--config", str(ROOT / "configs" / "tiny.yaml"), "--workdir", str(work),
           "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert set(record["cases"]) == CASES
    for name, case in record["cases"].items():
        assert case["wall_s"] > 0 and case["output_bytes"] > 0, name
        if name != "cp -r + sync (floor)":
            assert {"time_vs_copy", "peak_anon_above_baseline_vs_largest_tensor"} <= set(case)
    assert record["weight_bytes"] > record["largest_tensor_bytes"] > 0
    # The converted checkpoint that stays holds what Megatron expects.
    assert (work / "mega1" / "latest_checkpointed_iteration.txt").is_file()
