from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from yuanlfa.data import (
    DataError,
    IndexedDatasetBuilder,
    MMapIndexedDataset,
    PackedDataset,
    build_sample_index,
    split_documents,
)

EOD = 256


def slow_sample_index(lengths, order, seq_length, num_samples):
    """Megatron's build_sample_idx walk, one token budget at a time."""
    rows = [(0, 0)]
    pos, offset = 0, 0
    for _ in range(num_samples):
        remaining = seq_length + 1
        while remaining != 0:
            left = int(lengths[order[pos]]) - offset
            remaining -= left
            if remaining <= 0:
                offset += remaining + left - 1
                remaining = 0
            else:
                pos += 1
                offset = 0
        rows.append((pos, offset))
    return np.array(rows, dtype=np.int64)


def make_docs(seed: int, n: int = 40) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        body = rng.integers(0, 256, size=int(rng.integers(0, 30))).tolist()
        docs.append([*body, EOD])
    return docs


def write(tmp_path, docs, name="d", pieces: int = 1) -> MMapIndexedDataset:
    prefix = str(tmp_path / name)
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        for d in docs:
            # Split a document into several sequences to exercise multi-sequence reads.
            for chunk in np.array_split(np.array(d, dtype=np.int64), pieces):
                b.add_item(chunk)
            b.end_document()
    return MMapIndexedDataset(prefix)


def stream_of(docs, order) -> np.ndarray:
    return np.concatenate([np.array(docs[d], dtype=np.int64) for d in order])


@pytest.mark.parametrize("seed", range(6))
def test_build_sample_index_matches_slow_walk(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 12, size=int(rng.integers(1, 60)))
    lengths[rng.integers(0, len(lengths))] = 5
    order = rng.permutation(np.repeat(np.arange(len(lengths)), 3))
    total = int(lengths[order].sum())
    for seq_length in (1, 2, 7, 16):
        num = (total - 1) // seq_length
        expected = slow_sample_index(lengths, order, seq_length, num)
        got = build_sample_index(lengths.astype(np.int32), order.astype(np.int32), seq_length, num)
        assert got.dtype == np.int64 and got.shape == (num + 1, 2)
        np.testing.assert_array_equal(got, expected)


def test_build_sample_index_needs_enough_tokens():
    lengths = np.array([3, 4])
    with pytest.raises(DataError, match="holds 7 tokens.*need 10"):
        build_sample_index(lengths, np.array([0, 1]), 3, 3)
    # 2 samples of 3 need exactly 7 tokens (the last one only as a label).
    assert build_sample_index(lengths, np.array([0, 1]), 3, 2).tolist() == [[0, 0], [1, 0], [1, 3]]


def dataset(indexed, seed=3, shuffle=True, num_samples=25, seq_length=16, documents=None):
    if documents is None:
        documents = np.arange(indexed.num_documents)
    return PackedDataset(
        indexed,
        seq_length=seq_length,
        num_samples=num_samples,
        seed=seed,
        eod_id=EOD,
        documents=documents,
        shuffle=shuffle,
    )


@pytest.mark.parametrize("num_samples", [10, 60, 75])
def test_doc_order_spans_whole_epochs(tmp_path, num_samples):
    docs = make_docs(0)
    indexed = write(tmp_path, docs)
    documents = np.arange(5, 35)
    n = len(documents)
    tokens = int(indexed.sizes[documents].sum())
    epochs = -(-(num_samples * 16 + 1) // tokens)
    ds = dataset(indexed, documents=documents, num_samples=num_samples)
    # Every epoch's documents, shuffled together; a last epoch used < 80% is shuffled apart.
    assert len(ds.doc_order) == epochs * n
    assert sorted(ds.doc_order.tolist()) == sorted(documents.tolist() * epochs)
    total = (epochs * tokens - 1) // 16
    assert ds.sample_index.shape == (total + 1, 2)
    assert sorted(ds.shuffle_index.tolist()) == list(range(total))
    before = (((epochs - 1) * tokens - 1) // 16) if epochs > 1 else None
    separate = before is not None and num_samples - before < int(0.8 * ((tokens - 1) // 16))
    if separate:
        assert sorted(ds.doc_order[-n:].tolist()) == documents.tolist()
        assert sorted(ds.shuffle_index[:before].tolist()) == list(range(before))
    plain = dataset(indexed, documents=documents, num_samples=num_samples, shuffle=False)
    assert plain.doc_order.tolist() == documents.tolist() * epochs
    assert plain.shuffle_index.tolist() == list(range(total))


def test_the_cases_above_cover_a_separate_last_epoch(tmp_path):
    from yuanlfa.data.megatron_index import samples_before_last_epoch

    indexed = write(tmp_path, make_docs(0))
    tokens = int(indexed.sizes[5:35].sum())
    kinds = {samples_before_last_epoch(tokens, 16, n) is None for n in (10, 60, 75)}
    assert kinds == {True, False}


@pytest.mark.parametrize("shuffle", [False, True])
def test_samples_tile_the_document_stream(tmp_path, shuffle):
    docs = make_docs(1)
    indexed = write(tmp_path, docs)
    seq = 16
    ds = dataset(indexed, shuffle=shuffle, num_samples=70, seq_length=seq)
    stream = stream_of(docs, ds.doc_order)
    total = len(ds.shuffle_index)
    assert total >= 70 and sorted(ds.shuffle_index.tolist()) == list(range(total))
    for i in range(len(ds)):
        sample = ds.sample_tokens(i)
        assert sample.shape == (seq + 1,)
        start = int(ds.shuffle_index[i]) * seq
        np.testing.assert_array_equal(sample, stream[start : start + seq + 1])
    # The samples cover the stream of all epochs but for the last partial sample.
    assert total * seq + 1 <= len(stream) < (total + 1) * seq + 1


def slow_positions(tokens, eod):
    out, pos = [], 0
    for t in tokens:
        out.append(pos)
        pos = 0 if t == eod else pos + 1
    return out


def test_item_fields(tmp_path):
    docs = make_docs(2)
    indexed = write(tmp_path, docs)
    seq = 16
    ds = dataset(indexed, num_samples=50, seq_length=seq)
    stream = stream_of(docs, ds.doc_order)
    saw_restart = False
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"tokens", "labels", "position_ids", "loss_mask"}
        for key in ("tokens", "labels", "position_ids"):
            assert item[key].dtype == torch.int64 and item[key].shape == (seq,)
        assert item["loss_mask"].dtype == torch.float32
        assert torch.equal(item["loss_mask"], torch.ones(seq))
        start = int(ds.shuffle_index[i]) * seq
        assert item["tokens"].tolist() == stream[start : start + seq].tolist()
        assert item["labels"].tolist() == stream[start + 1 : start + seq + 1].tolist()
        tokens = item["tokens"].tolist()
        assert item["position_ids"].tolist() == slow_positions(tokens, EOD)
        saw_restart |= EOD in tokens[:-1]
    assert saw_restart


def test_multi_sequence_documents_read_as_one(tmp_path):
    docs = make_docs(3)
    whole = dataset(write(tmp_path, docs, "whole"), num_samples=40)
    split = dataset(write(tmp_path, docs, "split", pieces=3), num_samples=40)
    np.testing.assert_array_equal(whole.doc_order, split.doc_order)
    stream = stream_of(docs, split.doc_order)
    for i in range(len(split)):
        start = int(split.shuffle_index[i]) * 16
        np.testing.assert_array_equal(split.sample_tokens(i), stream[start : start + 17])


def test_seed_determinism(tmp_path):
    indexed = write(tmp_path, make_docs(4))
    a, b, c = (dataset(indexed, seed=s) for s in (7, 7, 8))
    for i in range(len(a)):
        for key in ("tokens", "labels", "position_ids"):
            assert torch.equal(a[i][key], b[i][key])
    assert not np.array_equal(a.doc_order, c.doc_order)
    assert any(not torch.equal(a[i]["tokens"], c[i]["tokens"]) for i in range(len(a)))


def test_too_few_tokens(tmp_path):
    indexed = write(tmp_path, [[1, 2, EOD], [3, EOD]], name="tiny")
    with pytest.raises(
        DataError, match=r"tiny: the 2 selected documents hold 5 tokens.*seq_length"
    ):
        dataset(indexed, seq_length=16)
    with pytest.raises(DataError, match="document indices"):
        dataset(indexed, seq_length=2, documents=np.array([0, 2]))


def test_index_errors_and_pickle(tmp_path):
    ds = dataset(write(tmp_path, make_docs(5)), num_samples=10)
    with pytest.raises(IndexError):
        ds[10]
    assert torch.equal(ds[-1]["tokens"], ds[9]["tokens"])
    again = pickle.loads(pickle.dumps(ds))
    assert torch.equal(again[4]["tokens"], ds[4]["tokens"])
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    batch = next(iter(loader))
    assert batch["tokens"].shape == (4, 16)


@pytest.mark.parametrize(
    "n,split", [(1000, "98,1,1"), (100, "90,5,5"), (7, "1,1,1"), (3, "98,1,1"), (50, "1")]
)
def test_split_documents_disjoint_and_covering(n, split):
    parts = split_documents(n, split)
    assert len(parts) == 3
    joined = np.concatenate(parts)
    assert joined.tolist() == list(range(n))
    weights = [float(w) for w in split.split(",")] + [0.0] * (3 - len(split.split(",")))
    for part, w in zip(parts, weights, strict=True):
        assert part.dtype == np.int64
        if w > 0:
            assert len(part) >= 1
            if n >= 100:
                assert abs(len(part) - w / sum(weights) * n) <= 1.5
        else:
            assert len(part) == 0


def test_split_documents_errors():
    for bad in ("", "a,b", "1,2,3,4", "-1,2", "0,0,0"):
        with pytest.raises(DataError, match="invalid data split"):
            split_documents(10, bad)
    with pytest.raises(DataError, match="needs at least 3 documents"):
        split_documents(2, "98,1,1")
    assert [len(p) for p in split_documents(2, "1,1,0")] == [1, 1, 0]
    assert [len(p) for p in split_documents(9, "0,1,0")] == [0, 9, 0]
