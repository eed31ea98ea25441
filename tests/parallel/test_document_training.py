"""Packed short documents with document-aware attention and SFT loss masks train the same at
tp=2 + sequence parallelism and at pp=2 as on one process (fp32), with loader workers."""

from __future__ import annotations

import numpy as np
import pytest

from tests.distributed.launcher import run_distributed
from tests.tiny import tiny_overrides
from yuanlfa.config import config_from_dict
from yuanlfa.data import ByteTokenizer, IndexedDatasetBuilder, best_dtype
from yuanlfa.train import train

STEPS = 12


@pytest.fixture(scope="module")
def sft_corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Many short "question <sep> answer <eod>" documents: several per 64-token sample."""
    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    words = [
        "the",
        "of",
        "a",
        "list",
        "sort",
        "key",
        "value",
        "return",
        "def",
        "class",
        "for",
        "in",
        "if",
        "else",
        "while",
    ]
    prefix = str(tmp_path_factory.mktemp("sft") / "qa")
    with IndexedDatasetBuilder(prefix, best_dtype(tok.vocab_size)) as builder:
        for _ in range(400):
            q = " ".join(rng.choice(words, size=int(rng.integers(1, 6))))
            a = " ".join(rng.choice(words, size=int(rng.integers(1, 8))))
            builder.add_document(tok.encode(q) + [tok.sep] + tok.encode(a) + [tok.eod])
        builder.finalize()
    return prefix


def _train(corpus: str, **extra: object) -> list[tuple[float, float]]:
    settings = {
        "model__document_attention": True,
        "model__lfa_reset_at_doc_start": True,
        "data__sft": True,
        "data__num_workers": 1,
        "train__steps": STEPS,
        "model__loss_block_size": 100,
        **extra,
    }
    cfg = tiny_overrides(corpus, **settings)
    records = train(config_from_dict(cfg), progress=False).records
    return [(r["loss"], r["grad_norm"]) for r in records]


def _runs(rank: int, world: int, corpus: str) -> dict[str, list[tuple[float, float]]]:
    return {
        "tp2 + sp": _train(corpus, parallel__tp=2, parallel__sequence_parallel=True),
        "pp2": _train(corpus, parallel__pp=2, train__micro_batch_size=2),
    }


@pytest.mark.slow
def test_document_training_equals_one_process(sft_corpus: str) -> None:
    single = _train(sft_corpus, data__num_workers=0)
    assert single[-1][0] < single[0][0] - 0.5
    for rank_result in run_distributed(_runs, 2, sft_corpus, timeout=600):
        for name, run in rank_result.items():
            assert len(run) == STEPS
            for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(run, single)):
                assert loss == pytest.approx(ref_loss, rel=1e-5), (name, step)
                assert norm == pytest.approx(ref_norm, rel=1e-4), (name, step)
