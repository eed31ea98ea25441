from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from yuanlfa.data import DataError, IndexedDatasetBuilder, MMapIndexedDataset, best_dtype

MAGIC = b"MMIDIDX\x00\x00"
CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.uint16: 8}


def random_docs(rng: np.random.Generator, n: int, high: int) -> list[np.ndarray]:
    docs = [rng.integers(0, high, size=int(rng.integers(0, 50))) for _ in range(n)]
    docs[1] = np.array([], dtype=np.int64)
    return docs


def write_megatron_by_hand(prefix: str, seqs: list[list[int]], doc_idx: list[int], dtype) -> None:
    """The layout Megatron-LM's index writer produces, spelled out field by field."""
    dtype = np.dtype(dtype)
    with open(prefix + ".bin", "wb") as f:
        for s in seqs:
            f.write(np.array(s, dtype=dtype).tobytes())
    sizes = [len(s) for s in seqs]
    pointers, pos = [], 0
    for size in sizes:
        pointers.append(pos)
        pos += size * dtype.itemsize
    with open(prefix + ".idx", "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", CODES[dtype.type]))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(struct.pack(f"<{len(sizes)}i", *sizes))
        f.write(struct.pack(f"<{len(pointers)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_idx)}q", *doc_idx))


@pytest.mark.parametrize("dtype,high", [(np.uint16, 65535), (np.int32, 200_000)])
def test_round_trip(tmp_path, dtype, high):
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 20, high)
    prefix = str(tmp_path / "data")
    with IndexedDatasetBuilder(prefix, dtype) as b:
        for d in docs:
            b.add_document(d)
    ds = MMapIndexedDataset(prefix)
    assert len(ds) == len(docs)
    assert ds.dtype == np.dtype(dtype)
    assert ds.num_tokens == sum(len(d) for d in docs)
    assert ds.sizes.tolist() == [len(d) for d in docs]
    assert ds.doc_idx.tolist() == list(range(len(docs) + 1))
    for i, d in enumerate(docs):
        assert ds[i].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(ds[i], d)
    np.testing.assert_array_equal(ds.get(0, 3, 5), docs[0][3:8])
    np.testing.assert_array_equal(ds.get(0, 4), docs[0][4:])
    np.testing.assert_array_equal(ds[-1], docs[-1])
    assert [x.tolist() for x in ds[2:5]] == [d.tolist() for d in docs[2:5]]


def test_multi_sequence_documents(tmp_path):
    prefix = str(tmp_path / "multi")
    b = IndexedDatasetBuilder(prefix, np.uint16)
    b.add_item([1, 2])
    b.add_item([3])
    b.end_document()
    b.add_item([4, 5, 6])
    b.end_document()
    b.add_item([7])  # an open document is closed by finalize
    b.finalize()
    ds = MMapIndexedDataset(prefix)
    assert ds.doc_idx.tolist() == [0, 2, 3, 4]
    assert ds.num_documents == 3
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2], [3], [4, 5, 6], [7]]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64, np.uint8])
def test_reads_file_laid_out_by_hand(tmp_path, dtype):
    seqs = [[5, 6, 7], [], [1], [9, 9, 9, 9, 2]]
    doc_idx = [0, 2, 4]
    prefix = str(tmp_path / "megatron")
    write_megatron_by_hand(prefix, seqs, doc_idx, dtype)
    ds = MMapIndexedDataset(prefix)
    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == 4
    assert ds.sizes.tolist() == [3, 0, 1, 5]
    assert ds.doc_idx.tolist() == doc_idx
    assert [ds[i].tolist() for i in range(4)] == seqs
    assert ds.get(3, 1, 2).tolist() == [9, 9]


def test_builder_output_parsed_by_hand(tmp_path):
    docs = [[10, 20, 30], [40], [], [50, 60]]
    prefix = str(tmp_path / "ours")
    with IndexedDatasetBuilder(prefix, np.int32) as b:
        for d in docs:
            b.add_document(d)
    raw = Path(prefix + ".idx").read_bytes()
    assert raw[:9] == MAGIC
    version, code, n, m = struct.unpack_from("<QBQQ", raw, 9)
    assert (version, code, n, m) == (1, 4, 4, 5)
    off = 9 + 8 + 1 + 8 + 8
    sizes = struct.unpack_from(f"<{n}i", raw, off)
    pointers = struct.unpack_from(f"<{n}q", raw, off + 4 * n)
    doc_idx = struct.unpack_from(f"<{m}q", raw, off + 12 * n)
    assert len(raw) == off + 12 * n + 8 * m
    assert list(sizes) == [3, 1, 0, 2]
    assert list(pointers) == [0, 12, 16, 16]
    assert list(doc_idx) == [0, 1, 2, 3, 4]
    data = Path(prefix + ".bin").read_bytes()
    assert list(struct.unpack(f"<{len(data) // 4}i", data)) == [10, 20, 30, 40, 50, 60]


def build(tmp_path, name="d", docs=([1, 2, 3], [4, 5])) -> str:
    prefix = str(tmp_path / name)
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        for d in docs:
            b.add_document(d)
    return prefix


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match=r"nothing\.idx not found.*yuanlfa-preprocess"):
        MMapIndexedDataset(str(tmp_path / "nothing"))
    prefix = build(tmp_path)
    os.unlink(prefix + ".bin")
    with pytest.raises(DataError, match=r"d\.bin not found"):
        MMapIndexedDataset(prefix)
    with pytest.raises(DataError, match="without the .bin/.idx extension"):
        MMapIndexedDataset(prefix + ".idx")


def test_bad_magic(tmp_path):
    prefix = build(tmp_path)
    raw = bytearray(Path(prefix + ".idx").read_bytes())
    raw[:4] = b"TNT\x00"
    Path(prefix + ".idx").write_bytes(raw)
    with pytest.raises(DataError, match="not a Megatron mmap index.*re-run yuanlfa-preprocess"):
        MMapIndexedDataset(prefix)


@pytest.mark.parametrize("keep", [0, 5, 20, 40, 60])
def test_truncated_idx(tmp_path, keep):
    prefix = build(tmp_path)
    raw = Path(prefix + ".idx").read_bytes()
    assert keep < len(raw)
    Path(prefix + ".idx").write_bytes(raw[:keep])
    with pytest.raises(DataError, match=r"d\.idx: index truncated"):
        MMapIndexedDataset(prefix)


def test_truncated_and_overlong_bin(tmp_path):
    prefix = build(tmp_path)
    raw = Path(prefix + ".bin").read_bytes()
    Path(prefix + ".bin").write_bytes(raw[:-2])
    with pytest.raises(DataError, match=r"d\.bin: data file truncated \(8 bytes.*describes 10"):
        MMapIndexedDataset(prefix)
    Path(prefix + ".bin").write_bytes(raw + b"\x00\x00")
    with pytest.raises(DataError, match="longer than its index"):
        MMapIndexedDataset(prefix)


def patch_header(prefix: str, offset: int, fmt: str, value: int) -> None:
    raw = bytearray(Path(prefix + ".idx").read_bytes())
    struct.pack_into(fmt, raw, offset, value)
    Path(prefix + ".idx").write_bytes(raw)


def test_unknown_dtype_code_and_version(tmp_path):
    prefix = build(tmp_path)
    patch_header(prefix, 17, "<B", 99)
    with pytest.raises(DataError, match="unknown dtype code 99"):
        MMapIndexedDataset(prefix)
    prefix = build(tmp_path, "v")
    patch_header(prefix, 9, "<Q", 2)
    with pytest.raises(DataError, match="unsupported index version 2"):
        MMapIndexedDataset(prefix)


def test_bad_doc_idx(tmp_path):
    prefix = build(tmp_path)
    # doc_idx is the last 3 int64s: point its end past the number of sequences.
    raw = bytearray(Path(prefix + ".idx").read_bytes())
    struct.pack_into("<q", raw, len(raw) - 8, 7)
    Path(prefix + ".idx").write_bytes(raw)
    with pytest.raises(DataError, match="expected 0 to 2"):
        MMapIndexedDataset(prefix)


@pytest.mark.parametrize(
    "dtype,bad,pattern",
    [
        (np.uint16, 65536, r"token 65536 does not fit dtype uint16"),
        (np.uint16, -1, r"token -1 is negative"),
        (np.int32, 2**31, r"token 2147483648 does not fit dtype int32"),
        (np.uint8, 256, r"token 256 does not fit dtype uint8"),
    ],
)
def test_token_out_of_range(tmp_path, dtype, bad, pattern):
    prefix = str(tmp_path / "x")
    with pytest.raises(DataError, match=pattern), IndexedDatasetBuilder(prefix, dtype) as b:
        b.add_document([1, 2])
        b.add_document([3, bad, 4])
    assert os.listdir(tmp_path) == []


def test_largest_value_fits(tmp_path):
    prefix = build(tmp_path, docs=([65535, 0],))
    assert MMapIndexedDataset(prefix)[0].tolist() == [65535, 0]


def test_unsupported_builder_dtype(tmp_path):
    with pytest.raises(DataError, match="cannot be stored"):
        IndexedDatasetBuilder(str(tmp_path / "x"), np.uint32)
    assert os.listdir(tmp_path) == []


def test_exception_mid_write_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "atomic")
    with pytest.raises(RuntimeError, match="crash"), IndexedDatasetBuilder(prefix, np.uint16) as b:
        b.add_document(list(range(1000)))
        assert any(name.endswith(".bin.tmp") for name in os.listdir(tmp_path))
        raise RuntimeError("crash")
    assert os.listdir(tmp_path) == []


def test_failed_rewrite_keeps_previous_pair(tmp_path):
    prefix = build(tmp_path, "keep", docs=([1, 2, 3],))
    before = {name: Path(tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    with pytest.raises(RuntimeError), IndexedDatasetBuilder(prefix, np.uint16) as b:
        b.add_document([9, 9])
        raise RuntimeError("crash")
    after = {name: Path(tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    assert after == before
    assert MMapIndexedDataset(prefix)[0].tolist() == [1, 2, 3]


def test_no_final_files_before_finalize(tmp_path):
    prefix = str(tmp_path / "late")
    b = IndexedDatasetBuilder(prefix, np.uint16)
    b.add_document([1, 2])
    assert not os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")
    b.finalize()
    assert sorted(os.listdir(tmp_path)) == ["late.bin", "late.idx"]
    with pytest.raises(DataError, match="already finalized"):
        b.add_document([3])


def test_check_tokens(tmp_path):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 100, size=37) for _ in range(30)]
    docs[17][5] = 300
    prefix = build(tmp_path, docs=docs)
    ds = MMapIndexedDataset(prefix)
    assert ds.check_tokens(301, chunk_tokens=64) == 300
    with pytest.raises(DataError, match=r"max token 300 >= vocab size 262.*sequence 17"):
        ds.check_tokens(262, chunk_tokens=64)
    expected_max = max(int(d.max()) for d in docs)
    assert ds.check_tokens(1000, chunk_tokens=7) == expected_max


def test_get_bounds(tmp_path):
    ds = MMapIndexedDataset(build(tmp_path))
    with pytest.raises(IndexError):
        ds.get(2)
    with pytest.raises(IndexError):
        ds.get(0, 2, 2)
    with pytest.raises(IndexError):
        ds.get(0, -1)


def test_empty_dataset(tmp_path):
    prefix = str(tmp_path / "empty")
    IndexedDatasetBuilder(prefix, np.uint16).finalize()
    ds = MMapIndexedDataset(prefix)
    assert len(ds) == 0 and ds.num_tokens == 0 and ds.doc_idx.tolist() == [0]
    assert ds.check_tokens(10) == -1


def test_pickles_by_prefix(tmp_path):
    ds = MMapIndexedDataset(build(tmp_path))
    blob = pickle.dumps(ds)
    assert len(blob) < 500
    again = pickle.loads(blob)
    assert again[1].tolist() == [4, 5]


def test_best_dtype():
    assert best_dtype(262) == np.uint16
    assert best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32
    assert best_dtype(135040) == np.int32
