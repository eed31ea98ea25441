"""The packed dataset's sample index from the C++ extension when it is built, else from numpy.

``yuanlfa._index_helpers`` (csrc/index_helpers.cpp) is optional: setup.py builds it when a C++
compiler and pybind11 are present and installs the package without it otherwise. Both
implementations return the same array and raise the same :class:`DataError` messages for the
same inputs; tests/data/test_index_helpers.py checks that they agree.
"""

from __future__ import annotations

import operator
from types import ModuleType

import numpy as np

from yuanlfa.data.dataset import build_sample_index as _build_numpy
from yuanlfa.data.indexed_dataset import DataError

_INT64_MAX = 2**63 - 1
_IMPLS = ("auto", "cpp", "numpy")
BUILD_HINT = (
    "reinstall yuanlfa with a C++ compiler present (e.g. g++): pip install -e . "
    "(setup.py builds csrc/index_helpers.cpp with pybind11, which pip fetches for the build)"
)

# Imported once: a missing extension is the normal state of an install without a compiler, so
# the reason is kept for impl="cpp" to report rather than raised here.
_cpp: ModuleType | None
try:
    from yuanlfa import _index_helpers as _cpp

    _IMPORT_ERROR: str | None = None
except ImportError as exc:
    _cpp = None
    _IMPORT_ERROR = str(exc)


def have_cpp() -> bool:
    """Whether the compiled extension imported (impl="auto" then uses it)."""
    return _cpp is not None


def _check_sizes(seq_length: int, num_samples: int) -> None:
    # Done in Python for both implementations: a Python int beyond int64 cannot reach C++, and
    # this way it gets the same message as one that can. Same texts as the C++ checks.
    if seq_length < 1 or num_samples < 0:
        raise DataError(
            f"need seq_length >= 1 and num_samples >= 0, got {seq_length}, {num_samples}"
        )
    if num_samples * seq_length + 1 > _INT64_MAX:
        raise DataError(
            f"{num_samples} samples of {seq_length} tokens need more than 2**63 - 1 tokens "
            "(int64 overflow)"
        )


def _as_index_array(a: np.ndarray, name: str) -> np.ndarray:
    """``a`` as a 1-D int32 or int64 array in native byte order (the two types C++ takes)."""
    arr = np.asarray(a)
    if arr.ndim == 1 and arr.size == 0:
        return arr.astype(np.int64)  # np.asarray([]) is float64; an empty array has no bad value
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise DataError(f"{name} must be a 1-D integer array, got {arr.dtype} [{arr.ndim}-D]")
    if arr.dtype.kind == "i" and arr.dtype.itemsize in (4, 8) and arr.dtype.isnative:
        return arr  # no copy: lengths are often a view of the memory-mapped index
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and arr.size and arr.max() > _INT64_MAX:
        raise DataError(f"{name} holds {arr.max()}, more than 2**63 - 1")
    return arr.astype(np.int64)


def _check_arrays(lengths: np.ndarray, order: np.ndarray) -> None:
    """The checks C++ makes that dataset.build_sample_index leaves to numpy's indexing.

    Same order and texts as check_inputs in csrc/index_helpers.cpp. Without them numpy would
    wrap a negative id around and count a negative length.
    """
    n = len(lengths)
    bad = (order < 0) | (order >= n)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"doc_order[{i}] = {order[i]} is not a document id in [0, {n})")
    negative = lengths < 0
    if negative.any():
        d = int(np.argmax(negative))
        raise DataError(f"doc_lengths[{d}] = {lengths[d]} is negative")
    # Only absurd lengths can overflow int64; for them the exact sum in Python ints.
    might_overflow = len(order) and n and int(lengths.max()) * len(order) > _INT64_MAX
    if might_overflow and sum(int(x) for x in lengths[order]) > _INT64_MAX:
        raise DataError("the document order holds more than 2**63 - 1 tokens (int64 overflow)")


def build_sample_index(
    doc_lengths: np.ndarray,
    doc_order: np.ndarray,
    seq_length: int,
    num_samples: int,
    impl: str = "auto",
) -> np.ndarray:
    """Sample boundaries as (position in ``doc_order``, token offset), int64 [num_samples + 1, 2].

    Same contract as :func:`yuanlfa.data.dataset.build_sample_index` (Megatron's
    build_sample_idx), plus checks that every ``doc_order`` entry is a document id and no length
    is negative. ``impl``: "auto" (C++ if built, else numpy), "cpp" (ImportError if not built)
    or "numpy".
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {', '.join(_IMPLS)}, got {impl!r}")
    if impl == "cpp" and _cpp is None:
        raise ImportError(
            f"the C++ sample-index builder yuanlfa._index_helpers is not built "
            f"({_IMPORT_ERROR}); {BUILD_HINT}"
        )
    seq_length, num_samples = operator.index(seq_length), operator.index(num_samples)
    _check_sizes(seq_length, num_samples)
    lengths = _as_index_array(doc_lengths, "doc_lengths")
    order = _as_index_array(doc_order, "doc_order")
    if impl != "numpy" and _cpp is not None:
        try:
            return _cpp.build_sample_index(lengths, order, seq_length, num_samples)
        except ValueError as exc:  # C++ cannot raise DataError; same text, the project's type
            raise DataError(str(exc)) from None
    _check_arrays(lengths, order)
    return _build_numpy(lengths, order, seq_length, num_samples)
