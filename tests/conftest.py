"""Shared test setup.

The environment defaults are set at import, before any test module imports torch or Triton:
Triton reads TRITON_INTERPRET when a module holding @triton.jit kernels is imported, and the
OpenMP pool reads OMP_NUM_THREADS when torch starts (more threads than the 2 CI cores is much
slower, especially with several spawned processes).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import sysconfig  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from yuanlfa.config import Config, config_from_dict, resolve  # noqa: E402
from yuanlfa.data import ByteTokenizer, IndexedDatasetBuilder, best_dtype  # noqa: E402


@pytest.fixture
def tiny_cfg() -> Config:
    """A resolved single-process config for a tiny model (hidden 64, 2 layers, 4 heads)."""
    cfg = config_from_dict(
        {
            "model": {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "vocab_size": 128},
            "train": {"micro_batch_size": 2, "global_batch_size": 4, "seq_length": 16},
        }
    )
    return resolve(cfg, world_size=1)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A .bin/.idx prefix of a few real Python source files, byte-tokenized, EOD-separated."""
    tok = ByteTokenizer()
    prefix = str(tmp_path_factory.mktemp("corpus") / "stdlib")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [
        "abc.py",
        "bisect.py",
        "colorsys.py",
        "copy.py",
        "fnmatch.py",
        "heapq.py",
        "keyword.py",
        "numbers.py",
        "queue.py",
        "sched.py",
        "shlex.py",
        "textwrap.py",
    ]
    with IndexedDatasetBuilder(prefix, best_dtype(tok.vocab_size)) as builder:
        for name in files:
            text = (stdlib / name).read_text(encoding="utf-8", errors="replace")
            builder.add_document(tok.encode(text) + [tok.eod])
        builder.finalize()
    return prefix
