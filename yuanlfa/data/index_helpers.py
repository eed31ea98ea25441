"""The packed dataset's sample index and the blending indices, from C++ when built, else numpy.

``yuanlfa._index_helpers`` (csrc/index_helpers.cpp) is optional: setup.py builds it when a C++
compiler and pybind11 are present and installs the package without it otherwise. Both
implementations return the same arrays and raise the same :class:`DataError` messages for the
same inputs; tests/data/test_index_helpers.py and tests/data/test_blended.py check that they
agree.
"""

from __future__ import annotations

import operator
from types import ModuleType

import numpy as np

from yuanlfa.data.indexed_dataset import DataError
from yuanlfa.data.sample_index import build_sample_index as _build_numpy

_INT64_MAX = 2**63 - 1
# dataset_index is int16 as in Megatron's helpers.cpp while that holds the dataset numbers, and
# int32 beyond (Megatron stops there), so a blend may have any number of datasets.
_INT16_DATASETS = 2**15 - 1
# How far the weights' sum may be from 1: numpy.isclose's defaults, as Megatron asserts it.
_SUM_TOLERANCE = 1e-8 + 1e-5
# Datasets beyond which one numpy argmax per sample beats a Python loop over the datasets.
_VECTOR_FROM = 32
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


def _use_cpp(impl: str, what: str) -> bool:
    """Whether ``impl`` selects the extension; raises for an unknown or unbuilt choice."""
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {', '.join(_IMPLS)}, got {impl!r}")
    if impl == "cpp" and _cpp is None:
        raise ImportError(
            f"the C++ {what} builder yuanlfa._index_helpers is not built "
            f"({_IMPORT_ERROR}); {BUILD_HINT}"
        )
    return impl != "numpy" and _cpp is not None


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

    Same contract as :func:`yuanlfa.data.sample_index.build_sample_index` (Megatron's
    build_sample_idx), plus checks that every ``doc_order`` entry is a document id and no length
    is negative. ``impl``: "auto" (C++ if built, else numpy), "cpp" (ImportError if not built)
    or "numpy".
    """
    use_cpp = _use_cpp(impl, "sample-index")
    seq_length, num_samples = operator.index(seq_length), operator.index(num_samples)
    _check_sizes(seq_length, num_samples)
    lengths = _as_index_array(doc_lengths, "doc_lengths")
    order = _as_index_array(doc_order, "doc_order")
    if use_cpp:
        try:
            return _cpp.build_sample_index(lengths, order, seq_length, num_samples)
        except ValueError as exc:  # C++ cannot raise DataError; same text, the project's type
            raise DataError(str(exc)) from None
    _check_arrays(lengths, order)
    return _build_numpy(lengths, order, seq_length, num_samples)


def _as_weights(weights: np.ndarray) -> np.ndarray:
    """``weights`` as a contiguous 1-D float64 array in native byte order (what C++ takes)."""
    arr = np.asarray(weights)
    if arr.ndim != 1 or arr.dtype.kind not in "iuf":
        raise DataError(f"weights must be a 1-D array of numbers, got {arr.dtype} [{arr.ndim}-D]")
    return np.ascontiguousarray(arr, dtype=np.float64)


def _check_weights(weights: np.ndarray) -> None:
    """Same order and texts as check_weights in csrc/index_helpers.cpp (format "g" is C's %g)."""
    n = len(weights)
    if n < 1:
        raise DataError("need at least 1 dataset, got 0")
    bad = ~(np.isfinite(weights) & (weights > 0))
    if bad.any():
        d = int(np.argmax(bad))
        raise DataError(f"weights[{d}] = {weights[d]:g} is not a finite number > 0")
    total = float(np.cumsum(weights)[-1])  # left to right like the C++ loop (np.sum pairs up)
    if not abs(total - 1.0) <= _SUM_TOLERANCE:
        raise DataError(
            f"the weights sum to {total:g}, not 1; normalize them first (weights / weights.sum())"
        )


def _blend_loop(weights: list[float], size: int) -> list[int]:
    """The datasets of samples 0..size-1, Megatron's greedy in Python floats (C doubles)."""
    current = [0] * len(weights)
    others = range(1, len(weights))
    picks = [0] * size
    for i in range(size):
        x = float(i) if i else 1.0
        best, best_error = 0, weights[0] * x - current[0]
        for d in others:
            error = weights[d] * x - current[d]  # the int count converts exactly, as in C++
            if error > best_error:
                best, best_error = d, error
        picks[i] = best
        current[best] += 1
    return picks


def index_dtype(num_datasets: int) -> type:
    """dataset_index's type: int16 (Megatron's) up to 32767 datasets, int32 beyond."""
    return np.int16 if num_datasets <= _INT16_DATASETS else np.int32


def _blend_vector(weights: np.ndarray, size: int) -> np.ndarray:
    """The same picks with the datasets in one array: product, difference and argmax are the
    rounded operations C++ does, and argmax takes the first of equal maxima."""
    current = np.zeros(len(weights))  # float64 counts: exact below 2**53
    errors = np.empty(len(weights))
    picks = np.empty(size, dtype=index_dtype(len(weights)))
    for i in range(size):
        np.multiply(weights, float(i) if i else 1.0, out=errors)
        np.subtract(errors, current, out=errors)
        best = int(errors.argmax())
        picks[i] = best
        current[best] += 1.0
    return picks


def positions_in_datasets(dataset_index: np.ndarray, num_datasets: int) -> np.ndarray:
    """dataset_sample_index from dataset_index, int64: how many earlier samples of the blend
    come from the same dataset (so a blend can keep or send two bytes per sample)."""
    counts = np.bincount(dataset_index, minlength=num_datasets)
    starts = np.cumsum(counts) - counts  # where each dataset's run begins once grouped
    grouped = np.argsort(dataset_index, kind="stable")  # radix sort for int16: linear
    positions = np.empty(len(dataset_index), dtype=np.int64)
    positions[grouped] = np.arange(len(dataset_index), dtype=np.int64) - np.repeat(starts, counts)
    return positions


def build_blending_indices(
    weights: np.ndarray, size: int, impl: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Interleave datasets by weight: (dataset_index int16 [size] (int32 beyond 32767
    datasets), dataset_sample_index int64 [size]); sample i of the blend is sample
    ``dataset_sample_index[i]`` of dataset ``dataset_index[i]``.

    Megatron's build_blending_indices: sample i goes to the dataset furthest behind its share,
    ``weights[d] * max(i, 1) - (samples it already has)``, the first one on ties. A dataset is
    picked only when it is not ahead of its share, so after any n samples none holds
    ``weights[d] * n + 1`` or more. The shortfalls sum to zero, so none lags by a whole sample
    when there are two datasets; with more, one can (by less than two in practice).

    ``weights``: one or more numbers, each finite and > 0, that the caller has normalized to sum
    to 1 (to within 1e-5). They are used as given: normalizing again could move a near-tie off
    Megatron's choice. ``impl`` as in :func:`build_sample_index`.
    """
    use_cpp = _use_cpp(impl, "blending-index")
    size = operator.index(size)
    # In Python for both: a size beyond int64 cannot reach C++. Same text as the C++ check.
    if not 0 <= size <= _INT64_MAX:
        raise DataError(f"size must be in [0, 2**63 - 1], got {size}")
    w = _as_weights(weights)
    if use_cpp:
        try:
            return _cpp.build_blending_indices(w, size)
        except ValueError as exc:
            raise DataError(str(exc)) from None
    _check_weights(w)
    if len(w) < _VECTOR_FROM:
        dataset_index = np.array(_blend_loop(w.tolist(), size), dtype=index_dtype(len(w)))
    else:
        dataset_index = _blend_vector(w, size)
    return dataset_index, positions_in_datasets(dataset_index, len(w))
