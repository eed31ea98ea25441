"""benchmarks/preprocess.py in its tiny configuration: it runs, writes the documented JSON, and
its token counts are those of tokenizing the same input directly (no timing is checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from yuanlfa.data import build_tokenizer

ROOT = Path(__file__).resolve().parents[2]
ROW_KEYS = {
    "tokenizer",
    "workers",
    "input_mb",
    "documents",
    "tokens",
    "seconds",
    "seconds_all",
    "mb_per_s",
    "mb_per_s_per_worker",
    "tokens_per_s",
    "main_cpu_s",
    "workers_cpu_s",
    "speedup_vs_1_worker",
    "bin_sha256",
}


@pytest.mark.slow  # 12-20 s with sentencepiece installed: training and encoding a model
def test_tiny_run(tmp_path: Path) -> None:
    out, workdir = tmp_path / "result.json", tmp_path / "work"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    tiny = ["--repeat", "1", "--repeats", "1", "--workers", "1"]
    script = str(ROOT / "benchmarks" / "preprocess.py")
    cmd = [sys.executable, script, *tiny, "--workdir", str(workdir), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["benchmark"] == "preprocess"
    assert {"date", "device", "python", "input", "repeats", "rows"} <= result.keys()
    tokenizers = ["byte"] + (["sentencepiece"] if "sentencepiece" not in result["skipped"] else [])
    assert [r["tokenizer"] for r in result["rows"]] == tokenizers

    texts = [json.loads(line)["text"] for line in (workdir / "corpus.jsonl").open()]
    specs = {"byte": "byte", "sentencepiece": f"sentencepiece:{workdir / 'spm.model'}"}
    for row in result["rows"]:
        assert row.keys() == ROW_KEYS
        assert row["workers"] == 1 and row["speedup_vs_1_worker"] == 1.0
        tok = build_tokenizer(specs[row["tokenizer"]])
        # preprocess drops empty documents and ends each other one with <eod>.
        lengths = [len(tok.encode(t)) for t in texts]
        assert row["documents"] == sum(n > 0 for n in lengths)
        assert row["tokens"] == sum(n + 1 for n in lengths if n > 0)
