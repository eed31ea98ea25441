"""A file that is not a SentencePiece model, given as ``sentencepiece:PATH``, is a one-line
error naming the file, never a crash of the process (sentencepiece segfaults on some of them)."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from yuanlfa.cli.train_tokenizer import main as train_tokenizer

pytest.importorskip("sentencepiece")

PROBE = """
import sys
from yuanlfa.data import DataError, build_tokenizer
try:
    tok = build_tokenizer("sentencepiece:" + sys.argv[1])
    tok.encode("hello world"); tok.decode([0, 1, 2])
    print("LOADED")
except DataError as exc:
    print("ERROR", exc)
"""


@pytest.fixture(scope="module")
def good_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "spm"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [str(stdlib / f) for f in ("textwrap.py", "shlex.py", "heapq.py", "bisect.py")]
    assert train_tokenizer(["--input", *files, "--vocab-size", "600", "--output-prefix",
                            str(out)]) == 0  # fmt: skip
    return Path(f"{out}.model")


def _probe(path: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"{path.name}: exit {done.returncode} {done.stderr[-500:]}"
    return done.stdout.strip()


def test_a_real_model_loads(good_model: Path) -> None:
    assert _probe(good_model) == "LOADED"


def test_empty_junk_random_and_truncated_files_are_clear_errors(
    good_model: Path, tmp_path: Path
) -> None:
    data = good_model.read_bytes()
    cases = {
        "empty": b"",
        "text": b"this is not a model\n",
        "zeros": bytes(64),
        "proto-like": b"\x0a\x00\x12\x00",
        "half": data[: len(data) // 2],
        "tail": data[len(data) // 3 :],
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.model"
        path.write_bytes(content)
        out = _probe(path)
        assert out.startswith("ERROR"), (name, out)
        assert str(path) in out and "\n" not in out, (name, out)
