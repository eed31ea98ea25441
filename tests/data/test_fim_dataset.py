"""FIM and EOD loss masking inside the packed dataset and the trainer: samples are rewritten
deterministically by index (any access order), only where FIM applies, and training runs with
them; bad rates are refused."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiny import tiny_overrides
from yuanlfa.config import ConfigError, config_from_dict
from yuanlfa.data import (
    ByteTokenizer,
    IndexedDatasetBuilder,
    MMapIndexedDataset,
    PackedDataset,
    best_dtype,
)
from yuanlfa.data.fim import FIMConfig, fim_layout, undo_fim
from yuanlfa.train import train


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Documents of one to a few lines of Python source: several per 256-token sample."""
    tok = ByteTokenizer()
    prefix = str(tmp_path_factory.mktemp("short") / "docs")
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    with IndexedDatasetBuilder(prefix, best_dtype(tok.vocab_size)) as builder:
        for i in range(0, len(lines), 3):
            builder.add_document(tok.encode("\n".join(lines[i : i + 3])) + [tok.eod])
        builder.finalize()
    return prefix


def _dataset(corpus: str, rate: float, **extra) -> PackedDataset:
    tok = ByteTokenizer()
    indexed = MMapIndexedDataset(corpus)
    fim = FIMConfig.from_tokenizer(tok, rate=rate, spm_rate=0.5) if rate else None
    return PackedDataset(
        indexed, seq_length=256, num_samples=40, seed=3, eod_id=tok.eod,
        documents=np.arange(indexed.num_documents), fim=fim,
        tokenizer=tok if fim else None, **extra,
    )  # fmt: skip


def test_fim_samples_are_deterministic_and_only_reordered(short_docs: str) -> None:
    plain, fim = _dataset(short_docs, 0.0), _dataset(short_docs, 1.0)
    forward = [fim[i] for i in range(len(fim))]
    backward = [fim[i] for i in reversed(range(len(fim)))][::-1]
    for a, b in zip(forward, backward, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    tok = ByteTokenizer()
    cfg = FIMConfig.from_tokenizer(tok, rate=1.0, spm_rate=0.5)
    layouts, checked = set(), 0
    for i, sample in enumerate(forward):
        original = plain[i]
        # The byte tokenizer never shortens a document: the 3 sentinels per rewritten document
        # push the end of the sample out, so no padding and a full loss mask.
        assert sample["loss_mask"].eq(1).all()
        assert not torch.equal(sample["tokens"], original["tokens"])
        tokens = torch.cat([sample["tokens"], sample["labels"][-1:]]).numpy()
        whole = torch.cat([original["tokens"], original["labels"][-1:]]).numpy()
        # EODs stay in place as separators: document k (complete, between two EODs) of the
        # rewritten sample is document k of the original, reordered.
        ends = np.flatnonzero(tokens == tok.eod)
        old_ends = np.flatnonzero(whole == tok.eod)
        starts, old_starts = [0, *(ends + 1)], [0, *(old_ends + 1)]
        for k in range(len(ends)):
            doc = tokens[starts[k] : ends[k]]
            old = whole[old_starts[k] : old_ends[k]]
            layout = fim_layout(doc, cfg) if len(doc) else None
            if layout is None:  # left as it was (e.g. cut inside a UTF-8 character)
                assert np.array_equal(doc, old)
                continue
            layouts.add(layout)
            assert undo_fim(doc, cfg, tok) == tok.decode(old)
            checked += 1
    assert checked > 0 and {"psm", "spm"} <= layouts


def test_eod_mask_loss_masks_exactly_the_eod_inputs(short_docs: str) -> None:
    # Megatron's rule: no loss where the input is <eod> (predicting the next document's first
    # token); the <eod> label is learned, so a model learns to end a document.
    data = _dataset(short_docs, 0.0, eod_mask_loss=True)
    eod = ByteTokenizer().eod
    seen = 0
    for i in range(len(data)):
        sample = data[i]
        is_eod = sample["tokens"] == eod
        seen += int(is_eod.sum())
        assert torch.equal(sample["loss_mask"] == 0, is_eod)
    assert seen > 0


def test_training_with_fim(small_corpus: str) -> None:
    cfg = tiny_overrides(small_corpus, train__steps=6, data__fim_rate=0.5, data__eod_mask_loss=True)
    records = train(config_from_dict(cfg), progress=False).records
    assert all(np.isfinite(r["loss"]) for r in records)
    plain = train(config_from_dict(tiny_overrides(small_corpus, train__steps=6)), progress=False)
    assert records[0]["loss"] != plain.records[0]["loss"]  # the data changed


@pytest.mark.parametrize("field", ["fim_rate", "fim_spm_rate"])
def test_rates_outside_zero_one_are_refused(field: str) -> None:
    with pytest.raises(ConfigError, match=f"data.{field}"):
        config_from_dict({"data": {field: 1.5}})
