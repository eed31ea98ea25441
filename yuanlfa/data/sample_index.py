"""The packed dataset's sample index in numpy: the reference twin of the C++ helper
(:mod:`yuanlfa.data.index_helpers` picks one, tests check they agree)."""

from __future__ import annotations

import numpy as np

from yuanlfa.data.indexed_dataset import DataError


def build_sample_index(
    doc_lengths: np.ndarray, doc_order: np.ndarray, seq_length: int, num_samples: int
) -> np.ndarray:
    """Sample boundaries as (position in ``doc_order``, token offset in that document).

    Row i is where sample i starts and row i + 1 holds its last token (inclusive), which is also
    the first token of sample i + 1. ``doc_lengths`` is indexed by document id, ``doc_order`` is
    a sequence of ids. Returns int64 [num_samples + 1, 2]; equal to Megatron's build_sample_idx.
    """
    if seq_length < 1 or num_samples < 0:
        raise DataError(
            f"need seq_length >= 1 and num_samples >= 0, got {seq_length}, {num_samples}"
        )
    lengths = np.asarray(doc_lengths)[np.asarray(doc_order)].astype(np.int64)
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    needed = num_samples * seq_length + 1
    if starts[-1] < needed:
        raise DataError(
            f"the document order holds {starts[-1]} tokens, {num_samples} samples of "
            f"{seq_length} need {needed}"
        )
    out = np.zeros((num_samples + 1, 2), dtype=np.int64)
    # Sample i ends on stream token (i + 1) * seq_length. side="right" picks the document that
    # contains it, stepping over empty documents exactly as Megatron's walk does.
    ends = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    doc = np.searchsorted(starts, ends, side="right") - 1
    out[1:, 0] = doc
    out[1:, 1] = ends - starts[doc]
    return out
