from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from yuanlfa.data import ByteTokenizer, IndexedDatasetBuilder, best_dtype


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


def tiny_overrides(data_path: str, **extra: object) -> dict:
    cfg: dict = {
        "model": {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "vocab_size": None},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5},
        "data": {"path": data_path, "split": "90,10,0"},
        "train": {
            "steps": 30,
            "micro_batch_size": 4,
            "global_batch_size": 8,
            "seq_length": 64,
            "seed": 7,
            "eval_iters": 1,
        },
        "logging": {"log_interval": 10},
    }
    for dotted, value in extra.items():
        section, key = dotted.split("__")
        cfg.setdefault(section, {})[key] = value
    return cfg
