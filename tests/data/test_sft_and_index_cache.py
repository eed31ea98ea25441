"""SFT loss masks, position-id options and the on-disk index cache of the packed dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.data.test_dataset import EOD, stream_of, write
from yuanlfa.data import PackedDataset
from yuanlfa.data.index_cache import PARTS, IndexCache

SEP = 258


def sft_docs(seed: int, n: int = 40) -> list[list[int]]:
    """Prompt <sep> response <eod>; some documents without <sep>, some with two."""
    rng = np.random.default_rng(seed)
    docs = []
    for k in range(n):
        prompt = rng.integers(0, 256, size=int(rng.integers(0, 12))).tolist()
        answer = rng.integers(0, 256, size=int(rng.integers(0, 12))).tolist()
        if k % 7 == 3:
            docs.append([*prompt, *answer, EOD])
        elif k % 5 == 1:
            docs.append([*prompt, SEP, *answer, SEP, *answer, EOD])
        else:
            docs.append([*prompt, SEP, *answer, EOD])
    return docs


def response_flags(docs, order) -> np.ndarray:
    """Per token of the document stream: after its document's first <sep> (or no <sep>)."""
    flags = []
    for d in order:
        doc = np.array(docs[d])
        hits = np.flatnonzero(doc == SEP)
        cut = hits[0] if len(hits) else -1
        flags.append(np.arange(len(doc)) > cut)
    return np.concatenate(flags)


def packed(indexed, num_samples=60, seq=16, **kw) -> PackedDataset:
    return PackedDataset(
        indexed,
        seq_length=seq,
        num_samples=num_samples,
        seed=5,
        eod_id=EOD,
        documents=np.arange(indexed.num_documents),
        **kw,
    )


@pytest.mark.parametrize("pieces", [1, 3])
def test_sft_loss_only_after_first_sep(tmp_path, pieces):
    docs = sft_docs(0)
    indexed = write(tmp_path, docs, pieces=pieces)
    seq = 16
    ds = packed(indexed, seq=seq, sft_sep_id=SEP)
    flags = response_flags(docs, ds.doc_order)
    stream = stream_of(docs, ds.doc_order)
    masked = kept = 0
    for i in range(len(ds)):
        start = int(ds.shuffle_index[i]) * seq
        item = ds[i]
        np.testing.assert_array_equal(item["labels"].numpy(), stream[start + 1 : start + seq + 1])
        expected = flags[start + 1 : start + seq + 1].astype(np.float32)
        np.testing.assert_array_equal(item["loss_mask"].numpy(), expected, err_msg=str(i))
        masked += int((expected == 0).sum())
        kept += int(expected.sum())
    assert masked > 50 and kept > 50  # both kinds occur, including samples starting mid-prompt


def test_sft_with_eod_mask(tmp_path):
    # The response's closing <eod> label keeps its loss (the model learns to stop); the position
    # whose input is <eod> (predicting the next record's first token) has none.
    docs = sft_docs(1)
    plain = packed(write(tmp_path, docs), sft_sep_id=SEP)
    ds = packed(write(tmp_path, docs, name="m"), sft_sep_id=SEP, eod_mask_loss=True)
    learned = 0
    for i in range(len(ds)):
        item, base = ds[i], plain[i]
        at_eod = item["tokens"] == EOD
        assert not item["loss_mask"][at_eod].any()
        assert torch.equal(item["loss_mask"][~at_eod], base["loss_mask"][~at_eod])
        learned += int(item["loss_mask"][item["labels"] == EOD].sum())
    assert learned > 10


def test_padding_carries_no_loss(tmp_path):
    pad = 257
    docs = [[*d[:-1], pad, pad, EOD] for d in sft_docs(8)]
    ds = packed(write(tmp_path, docs), pad_id=pad)
    seen = 0
    for i in range(len(ds)):
        item = ds[i]
        is_pad = item["labels"] == pad
        seen += int(is_pad.sum())
        assert not item["loss_mask"][is_pad].any() and item["loss_mask"][~is_pad].all()
    assert seen > 20


def test_position_ids_without_reset(tmp_path):
    ds = packed(write(tmp_path, sft_docs(2)), reset_position_ids=False)
    item = ds[3]
    assert (item["tokens"] == EOD).any()
    assert item["position_ids"].tolist() == list(range(16))
    reset = packed(write(tmp_path, sft_docs(2), name="e"))[3]["position_ids"]
    assert reset.tolist() != list(range(16))


def test_index_cache_round_trip(tmp_path):
    indexed = write(tmp_path, sft_docs(3))
    cache = tmp_path / "cache"
    built = packed(indexed, cache_dir=cache)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 4 and all(f.split("-", 1)[0] == files[0].split("-", 1)[0] for f in files)
    assert not [f for f in files if ".tmp" in f]
    again = packed(indexed, cache_dir=cache)
    # The second build maps the files instead of building.
    assert isinstance(again.sample_index, np.memmap)
    for a, b in ((built.doc_order, again.doc_order), (built.sample_index, again.sample_index)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(built.shuffle_index, again.shuffle_index)
    plain = packed(indexed)
    for i in range(len(plain)):
        np.testing.assert_array_equal(again.sample_tokens(i), plain.sample_tokens(i))


def test_index_cache_keys(tmp_path):
    indexed = write(tmp_path, sft_docs(3))
    cache = tmp_path / "cache"
    packed(indexed, cache_dir=cache)
    packed(indexed, cache_dir=cache, num_samples=61)
    packed(indexed, cache_dir=cache, name="valid")
    assert len(list(cache.glob("*-description.json"))) == 3
    # Rewriting the data files invalidates their index.
    rewritten = write(tmp_path, sft_docs(4))
    ds = packed(rewritten, cache_dir=cache)
    assert len(list(cache.glob("*-description.json"))) == 4
    np.testing.assert_array_equal(ds.sample_tokens(0), packed(rewritten).sample_tokens(0))


def test_index_cache_ignores_damaged_files(tmp_path):
    indexed = write(tmp_path, sft_docs(5))
    cache = tmp_path / "cache"
    ref = packed(indexed, cache_dir=cache)
    (sample_file,) = cache.glob("*-sample_index.npy")
    sample_file.write_bytes(b"garbage")
    ds = packed(indexed, cache_dir=cache)
    np.testing.assert_array_equal(ds.sample_index, ref.sample_index)
    assert np.load(sample_file).shape == ref.sample_index.shape  # rewritten


def test_index_cache_unwritable_warns(tmp_path):
    indexed = write(tmp_path, sft_docs(6))
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.warns(UserWarning, match="could not cache the dataset index"):
        ds = packed(indexed, cache_dir=blocker / "sub")
    assert len(ds) == 60


def test_index_cache_incomplete_write_is_not_used(tmp_path):
    indexed = write(tmp_path, sft_docs(7))
    cache = tmp_path / "cache"
    key = {"version": 1, "seq_length": 16, "num_samples": 60, "seed": 5, "shuffle": True}
    probe = IndexCache(cache, indexed.prefix, {**key, "documents": "x"}, "train")
    cache.mkdir()
    # Arrays without their description (a crash before the last rename) are never read.
    for part in PARTS:
        np.save(probe.path(part), np.zeros(3, dtype=np.int64))
    assert probe.load() is None
