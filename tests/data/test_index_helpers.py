"""The C++ sample-index builder (yuanlfa._index_helpers) equals the numpy one, errors included."""

from __future__ import annotations

import re

import numpy as np
import pytest

from yuanlfa.data import index_helpers
from yuanlfa.data.index_helpers import build_sample_index, have_cpp
from yuanlfa.data.indexed_dataset import DataError

needs_cpp = pytest.mark.skipif(
    not have_cpp(),
    reason="yuanlfa._index_helpers is not built (pip install -e . with a C++ compiler)",
)


def token_walk(lengths, order, seq_length: int, num_samples: int) -> np.ndarray:
    """Reference: list where every token of the stream lies, then read the sample ends off it.

    Independent of both implementations (no cumulative sums, no document walk): row 0 is
    (0, 0) and row i is the location of stream token i * seq_length.
    """
    where = [(pos, off) for pos, doc in enumerate(order) for off in range(int(lengths[doc]))]
    rows = [(0, 0)] + [where[i * seq_length] for i in range(1, num_samples + 1)]
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def random_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Lengths with empty and huge documents, a multi-epoch order, a seq_length, a count."""
    num_docs = int(rng.integers(1, 50))
    kind = rng.integers(0, 4)
    if kind == 0:  # many empty documents
        lengths = rng.integers(0, 3, size=num_docs) * rng.integers(0, 20, size=num_docs)
    elif kind == 1:  # one huge document among small ones
        lengths = rng.integers(0, 10, size=num_docs)
        lengths[rng.integers(0, num_docs)] = int(rng.integers(1000, 5000))
    elif kind == 2:  # corpus-like: log-normal
        lengths = rng.lognormal(4, 1.2, size=num_docs).astype(np.int64)
    else:
        lengths = rng.integers(0, 40, size=num_docs)
    if lengths.sum() == 0:
        lengths[0] = 1
    # Epochs of document ids, so ids repeat (PackedDataset shuffles all epochs together; for the
    # sample index only the order matters, not how it was drawn).
    state = np.random.RandomState(int(rng.integers(0, 2**31)))
    docs = np.arange(num_docs)
    order = np.concatenate([state.permutation(docs) for _ in range(int(rng.integers(1, 4)))])
    total = int(lengths[order].sum())
    seq_length = int(rng.choice([1, 2, 3, 7, 16, 64, 1000, max(1, total - 1)]))
    most = (total - 1) // seq_length
    num_samples = int(rng.choice([0, most, int(rng.integers(0, most + 1))]))
    return lengths, order, seq_length, num_samples


def typed(a: np.ndarray, dtype) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=dtype)


@pytest.mark.parametrize("seed", range(8))
def test_numpy_matches_token_walk(seed):
    rng = np.random.default_rng(seed)
    for _ in range(25):
        lengths, order, seq_length, num_samples = random_case(rng)
        got = build_sample_index(lengths, order, seq_length, num_samples, impl="numpy")
        np.testing.assert_array_equal(got, token_walk(lengths, order, seq_length, num_samples))


@needs_cpp
@pytest.mark.parametrize("seed", range(8))
def test_cpp_matches_token_walk(seed):
    rng = np.random.default_rng(100 + seed)
    for _ in range(25):
        lengths, order, seq_length, num_samples = random_case(rng)
        got = build_sample_index(lengths, order, seq_length, num_samples, impl="cpp")
        assert got.dtype == np.int64 and got.shape == (num_samples + 1, 2)
        np.testing.assert_array_equal(got, token_walk(lengths, order, seq_length, num_samples))


@needs_cpp
@pytest.mark.parametrize("length_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("order_dtype", [np.int32, np.int64])
def test_cpp_equals_numpy_random(length_dtype, order_dtype):
    rng = np.random.default_rng(7)
    for _ in range(150):
        lengths, order, seq_length, num_samples = random_case(rng)
        args = (typed(lengths, length_dtype), typed(order, order_dtype), seq_length, num_samples)
        cpp = build_sample_index(*args, impl="cpp")
        np.testing.assert_array_equal(cpp, build_sample_index(*args, impl="numpy"))
        assert cpp.dtype == np.int64 and cpp.shape == (num_samples + 1, 2)


@needs_cpp
def test_cpp_equals_numpy_edge_cases():
    cases = [
        (np.array([5]), np.array([0]), 1, 4),  # one document, seq_length 1, every token
        (np.array([5]), np.array([0]), 4, 1),  # the last token only as a label
        (np.array([0, 0, 3, 0, 0, 4, 0]), np.arange(7), 2, 3),  # empty documents around
        (np.array([0, 9]), np.array([0, 1, 0, 1, 0]), 4, 2),  # leading and trailing empties
        (np.array([10**7, 1, 2]), np.array([1, 0, 2]), 4096, 2441),  # one huge document
        (np.array([3, 4]), np.array([0, 1]), 3, 0),  # num_samples 0
        (np.array([1]), np.array([0]), 1, 0),  # the smallest valid input
    ]
    for lengths, order, seq_length, num_samples in cases:
        cpp = build_sample_index(lengths, order, seq_length, num_samples, impl="cpp")
        np.testing.assert_array_equal(
            cpp, build_sample_index(lengths, order, seq_length, num_samples, impl="numpy")
        )
        if lengths.sum() < 10**5:
            np.testing.assert_array_equal(cpp, token_walk(lengths, order, seq_length, num_samples))


@needs_cpp
def test_cpp_equals_numpy_on_other_layouts():
    # Strided views (no copy in C++), other integer types and byte order (converted by the
    # wrapper), lists: all give the same rows.
    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 50, size=200)
    order = np.concatenate([rng.permutation(200) for _ in range(3)])
    expected = build_sample_index(lengths, order, 5, 1000, impl="numpy")
    variants = [
        (np.repeat(lengths, 2)[::2], np.repeat(order, 3)[::3]),
        (lengths.astype(np.uint16), order.astype(np.uint32)),
        (lengths.astype(">i8"), order.astype(">i4")),
        (lengths.tolist(), order.tolist()),
    ]
    for ls, os_ in variants:
        np.testing.assert_array_equal(build_sample_index(ls, os_, 5, 1000, impl="cpp"), expected)
        np.testing.assert_array_equal(build_sample_index(ls, os_, 5, 1000, impl="numpy"), expected)


@needs_cpp
def test_cpp_equals_numpy_corpus_scale():
    rng = np.random.default_rng(11)
    lengths = np.clip(rng.lognormal(6.0, 1.3, size=200_000), 1, 200_000).astype(np.int32)
    state = np.random.RandomState(1234)
    order = np.concatenate([state.permutation(len(lengths)) for _ in range(2)]).astype(np.int32)
    num = (int(lengths[order].sum()) - 1) // 4096
    cpp = build_sample_index(lengths, order, 4096, num, impl="cpp")
    np.testing.assert_array_equal(cpp, build_sample_index(lengths, order, 4096, num, impl="numpy"))


def test_numpy_wrapper_equals_dataset_function():
    # The "numpy" implementation is dataset.py's function, unchanged.
    from yuanlfa.data.sample_index import build_sample_index as dataset_version

    rng = np.random.default_rng(5)
    for _ in range(20):
        lengths, order, seq_length, num_samples = random_case(rng)
        np.testing.assert_array_equal(
            build_sample_index(lengths, order, seq_length, num_samples, impl="numpy"),
            dataset_version(lengths, order, seq_length, num_samples),
        )


L = np.array([3, 4])
ERRORS = [
    ((L, [0, 1], 3, 3), "the document order holds 7 tokens, 3 samples of 3 need 10"),
    ((L, [], 3, 0), "the document order holds 0 tokens, 0 samples of 3 need 1"),
    ((L, [0, 1], 0, 1), "need seq_length >= 1 and num_samples >= 0, got 0, 1"),
    ((L, [0, 1], 3, -1), "need seq_length >= 1 and num_samples >= 0, got 3, -1"),
    ((L, [0, 2, 1], 3, 1), "doc_order[1] = 2 is not a document id in [0, 2)"),
    ((L, [0, 1, -1], 3, 1), "doc_order[2] = -1 is not a document id in [0, 2)"),
    ((np.array([3, -4, 5]), [0, 2], 3, 1), "doc_lengths[1] = -4 is negative"),
    (
        (L, [0, 1], 2**32, 2**31),
        "2147483648 samples of 4294967296 tokens need more than 2**63 - 1 tokens (int64 overflow)",
    ),
    (
        (L, [0, 1], 2**70, 1),
        f"1 samples of {2**70} tokens need more than 2**63 - 1 tokens (int64 overflow)",
    ),
    (
        (np.array([2**62, 2**62], dtype=np.int64), [0, 1], 3, 1),
        "the document order holds more than 2**63 - 1 tokens (int64 overflow)",
    ),
    ((L, [[0, 1]], 3, 1), "doc_order must be a 1-D integer array, got int64 [2-D]"),
    ((L, np.array([0.0, 1.0]), 3, 1), "doc_order must be a 1-D integer array, got float64 [1-D]"),
    ((np.array([2**64 - 1], dtype=np.uint64), [0], 3, 1), "doc_lengths holds 18446744073709551615"),
]


@pytest.mark.parametrize(("args", "message"), ERRORS)
def test_numpy_errors(args, message):
    with pytest.raises(DataError) as err:
        build_sample_index(*args, impl="numpy")
    assert message in str(err.value)


@needs_cpp
@pytest.mark.parametrize(("args", "message"), ERRORS)
def test_cpp_errors_match_numpy(args, message):
    with pytest.raises(DataError) as cpp_err:
        build_sample_index(*args, impl="cpp")
    with pytest.raises(DataError) as numpy_err:
        build_sample_index(*args, impl="numpy")
    assert str(cpp_err.value) == str(numpy_err.value)
    assert message in str(cpp_err.value)


@needs_cpp
def test_extension_checks_on_its_own():
    # Called directly, the module raises ValueError with the wrapper's texts (no DataError).
    from yuanlfa import _index_helpers

    cases = [
        ((L, np.array([0, 1]), 3, 3), "the document order holds 7 tokens, 3 samples of 3 need 10"),
        ((L, np.array([0, 1]), 0, 1), "need seq_length >= 1 and num_samples >= 0, got 0, 1"),
        ((L, np.array([0, 5]), 3, 1), "doc_order[1] = 5 is not a document id in [0, 2)"),
        ((np.array([-1]), np.array([0]), 3, 1), "doc_lengths[0] = -1 is negative"),
        ((L, np.array([0, 1]), 2**62, 2), "int64 overflow"),
        ((L, np.array([0, 1], dtype=np.uint8), 3, 1), "must be 1-D int32 or int64 arrays"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            _index_helpers.build_sample_index(*args)


def test_impl_choice(monkeypatch):
    with pytest.raises(ValueError, match="impl must be one of auto, cpp, numpy"):
        build_sample_index(L, [0, 1], 3, 1, impl="fortran")
    monkeypatch.setattr(index_helpers, "_cpp", None)
    assert not have_cpp()
    with pytest.raises(ImportError, match=r"not built .*pip install -e \."):
        build_sample_index(L, [0, 1], 3, 1, impl="cpp")
    # auto falls back to numpy without the extension.
    assert build_sample_index(L, [0, 1], 3, 2).tolist() == [[0, 0], [1, 0], [1, 3]]


@needs_cpp
def test_auto_uses_the_extension(monkeypatch):
    calls = []
    real = index_helpers._cpp.build_sample_index

    class Spy:
        @staticmethod
        def build_sample_index(*args):
            calls.append(args)
            return real(*args)

    monkeypatch.setattr(index_helpers, "_cpp", Spy)
    assert build_sample_index(L, [0, 1], 3, 2).tolist() == [[0, 0], [1, 0], [1, 3]]
    assert len(calls) == 1
