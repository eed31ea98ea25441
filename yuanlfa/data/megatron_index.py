"""Megatron's GPTDataset index construction: which documents, in which order, in which samples.

A dataset that asks for ``num_samples`` samples of ``seq_length`` tokens covers as many whole
epochs over its documents as those need (each sample reads ``seq_length + 1`` tokens, the last
shared with the next sample). Megatron then builds, from one ``RandomState(seed)`` drawn in this
order:

1. the document order over all epochs, shuffled together. When the last epoch would contribute
   fewer than 80% of an epoch's samples, the first ``epochs - 1`` epochs are shuffled together
   and the last one on its own (so a small overhang does not pull documents of a partly used epoch
   into the early samples);
2. the sample index over every sample those epochs hold (not only the ones asked for);
3. the shuffle index over all those samples: one permutation, or with a separate last epoch, a
   permutation of the samples before it followed by one of the rest.

Sample ``i`` is row ``shuffle_index[i]`` of the sample index. The same seed, documents, sequence
length and sample count give Megatron's samples; tests/data/test_megatron_equivalence.py checks
this against megatron-core itself.
"""

from __future__ import annotations

import re

import numpy as np

from yuanlfa.data.index_helpers import build_sample_index  # C++ when built, else numpy
from yuanlfa.data.indexed_dataset import DataError

# Megatron separates the last epoch when it yields fewer samples than this share of an epoch.
LAST_EPOCH_THRESHOLD = 0.80


def epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Whole epochs that hold ``num_samples * seq_length + 1`` tokens (at least one)."""
    if tokens_per_epoch < 1:
        raise DataError("the selected documents hold no tokens")
    needed = num_samples * seq_length + 1
    return max(1, -(-needed // tokens_per_epoch))


def samples_in(epochs: int, tokens_per_epoch: int, seq_length: int) -> int:
    """How many whole samples ``epochs`` epochs hold (the last partial one is dropped)."""
    return (epochs * tokens_per_epoch - 1) // seq_length


def samples_before_last_epoch(
    tokens_per_epoch: int, seq_length: int, num_samples: int
) -> int | None:
    """Samples of the epochs before the last when the last is shuffled on its own, else None."""
    epochs = epochs_needed(tokens_per_epoch, seq_length, num_samples)
    if epochs == 1:
        return None
    before = samples_in(epochs - 1, tokens_per_epoch, seq_length)
    from_last = num_samples - before
    per_epoch = samples_in(1, tokens_per_epoch, seq_length)
    # int() as Megatron truncates the threshold; a strict comparison, as there.
    return before if from_last < int(LAST_EPOCH_THRESHOLD * per_epoch) else None


def order_signature(tokens_per_epoch: int, seq_length: int, num_samples: int) -> list[int]:
    """What the sample order depends on besides the seed, documents and sequence length: the
    epochs used and where the last one is shuffled apart (0: not apart). Two sample counts with
    the same signature build identical indices (the same draws from the same seed), so the
    first samples agree; with different ones the order changes. A run extends only when it
    keeps this (tests/checkpoint/test_extend_run.py checks both directions)."""
    before = samples_before_last_epoch(tokens_per_epoch, seq_length, num_samples)
    return [epochs_needed(tokens_per_epoch, seq_length, num_samples), before or 0]


def _shuffled_epochs(
    documents: np.ndarray, epochs: int, rng: np.random.RandomState, shuffle: bool
) -> np.ndarray:
    order = np.tile(documents, epochs)
    if shuffle:
        # One shuffle of the whole array: its draws depend only on the length, as Megatron's do.
        rng.shuffle(order)
    return order


def build_document_order(
    documents: np.ndarray,
    epochs: int,
    rng: np.random.RandomState,
    separate_last: bool,
    shuffle: bool = True,
    dtype: type = np.int32,
) -> np.ndarray:
    """``documents`` repeated ``epochs`` times and shuffled, the last epoch apart if asked."""
    documents = np.asarray(documents).astype(dtype)
    if not separate_last or epochs == 1:
        return _shuffled_epochs(documents, epochs, rng, shuffle)
    first = _shuffled_epochs(documents, epochs - 1, rng, shuffle)
    last = _shuffled_epochs(documents, 1, rng, shuffle)
    return np.concatenate((first, last))


def build_shuffle_index(
    first: int, total: int, rng: np.random.RandomState, shuffle: bool = True
) -> np.ndarray:
    """A permutation of [0, first) followed by one of [first, total): uint32 as Megatron's
    (half the memory of int64), int64 for counts beyond it."""
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    parts = [np.arange(0, first, dtype=dtype)]
    if first != total:
        parts.append(np.arange(first, total, dtype=dtype))
    if shuffle:
        for part in parts:
            rng.shuffle(part)
    return np.concatenate(parts)


def build_indices(
    doc_lengths: np.ndarray,
    documents: np.ndarray,
    seq_length: int,
    num_samples: int,
    seed: int,
    shuffle: bool = True,
    order_dtype: type = np.int32,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(document order, sample index, shuffle index) of Megatron's GPTDataset.

    ``doc_lengths`` is indexed by document id; ``documents`` are the ids of this split. The
    sample index has a row per sample of all the epochs used plus one, the shuffle index an
    entry per sample of those epochs; the first ``num_samples`` entries are the samples asked
    for. ``shuffle=False`` keeps documents and samples in order (not Megatron's; for tests
    and inspection).
    """
    documents = np.asarray(documents)
    tokens_per_epoch = int(np.asarray(doc_lengths)[documents].sum())
    epochs = epochs_needed(tokens_per_epoch, seq_length, num_samples)
    before = samples_before_last_epoch(tokens_per_epoch, seq_length, num_samples)
    # RandomState, not Generator: Megatron's choice, and its streams are frozen across numpy
    # versions, so a seed names the same samples forever.
    rng = np.random.RandomState(seed)
    doc_order = build_document_order(
        documents, epochs, rng, before is not None, shuffle, order_dtype
    )
    total = samples_in(epochs, tokens_per_epoch, seq_length)
    sample_index = build_sample_index(doc_lengths, doc_order, seq_length, total)
    # It covers every sample of the epochs, not only those asked for: int32 where the values
    # fit, as Megatron keeps it, halves what a large corpus costs on disk and in memory.
    lengths = np.asarray(doc_lengths)
    if max(len(doc_order), int(lengths.max()) if lengths.size else 0) < 2**31:
        sample_index = sample_index.astype(np.int32)
    first = total if before is None else before
    shuffle_index = build_shuffle_index(first, total, rng, shuffle)
    return doc_order, sample_index, shuffle_index


def parse_split(split: str) -> list[float]:
    """Up to three non-negative weights from ``"98,1,1"`` (also ``/``-separated), padded to 3."""
    parts = [p.strip() for p in re.split(r"[,/]", split)]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or any(w < 0 or w != w for w in weights) or sum(weights) <= 0:
        raise DataError(
            f"invalid data split {split!r}: give up to three non-negative weights with a "
            "positive sum, like '98,1,1' (train, valid, test)"
        )
    return weights + [0.0] * (3 - len(weights))


def split_bounds(num_elements: int, weights: list[float]) -> list[tuple[int, int]]:
    """Megatron's train/valid/test ranges: the weights normalized in float64, their running
    sums, each end ``round(sum * n)`` (Python's round, half to even). A zero weight gives an
    empty range."""
    total = float(np.sum(np.array(weights, dtype=np.float64)))
    normalized = (np.array(weights, dtype=np.float64) / total).tolist()
    edges = [0.0]
    for w in normalized:
        edges.append(edges[-1] + w)  # Python float adds, left to right, as Megatron sums them
    bounds = []
    for i, w in enumerate(normalized):
        if w == 0:
            bounds.append((0, 0))
            continue
        bounds.append((int(round(edges[i] * float(num_elements))),
                       int(round(edges[i + 1] * float(num_elements)))))  # fmt: skip
    return bounds
