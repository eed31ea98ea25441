"""Documents packed into fixed-length training samples, as Megatron's GPTDataset does it.

Three index arrays define the samples: the document order (all epochs shuffled together, a
partly used last epoch apart), the sample index (where each sample starts and ends in that order)
and a seeded shuffle of all the samples of those epochs; yuanlfa.data.megatron_index builds them.
A sample holds ``seq_length + 1`` tokens: inputs are the first ``seq_length``, labels the last
``seq_length``; consecutive samples share one token.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from yuanlfa.data.fim import FIMConfig, FIMTokenizer, apply_fim
from yuanlfa.data.index_cache import IndexCache
from yuanlfa.data.indexed_dataset import DataError, MMapIndexedDataset
from yuanlfa.data.megatron_index import (
    build_indices,
    order_signature,
    parse_split,
    split_bounds,
)


def _one_sequence_per_document(indexed: MMapIndexedDataset) -> bool:
    doc_idx = indexed.doc_idx
    return len(doc_idx) == len(indexed) + 1 and bool(np.all(np.diff(doc_idx) == 1))


def _document_lengths(indexed: MMapIndexedDataset, single: bool) -> np.ndarray:
    sizes = indexed.sizes
    if single:
        return sizes
    cumulative = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=cumulative[1:])
    doc_idx = indexed.doc_idx
    return cumulative[doc_idx[1:]] - cumulative[doc_idx[:-1]]


def position_ids_from_tokens(tokens: np.ndarray, eod_id: int) -> np.ndarray:
    """Positions that restart at 0 on the token after each EOD (and at the sample start)."""
    n = len(tokens)
    restart = np.zeros(n, dtype=np.int64)
    after_eod = np.flatnonzero(tokens[:-1] == eod_id) + 1
    restart[after_eod] = after_eod
    np.maximum.accumulate(restart, out=restart)
    return np.arange(n, dtype=np.int64) - restart


class PackedDataset(torch.utils.data.Dataset):
    """Fixed-length samples of ``seq_length`` tokens packed from ``documents`` of ``indexed``.

    ``documents`` are document indices (entries of ``indexed.doc_idx``); a document made of
    several sequences is read as their concatenation. Sample ``i`` is the same for a given
    seed whatever the process, worker or layout that asks for it, and is sample ``i`` of
    Megatron's GPTDataset built with the same seed, documents, sequence length and sample
    count (for data with one sequence per document, as yuanlfa-preprocess writes it).
    """

    def __init__(
        self,
        indexed: MMapIndexedDataset,
        *,
        seq_length: int,
        num_samples: int,
        seed: int,
        eod_id: int,
        documents: np.ndarray,
        shuffle: bool = True,
        fim: FIMConfig | None = None,
        tokenizer: FIMTokenizer | None = None,
        eod_mask_loss: bool = False,
        reset_position_ids: bool = True,
        sft_sep_id: int | None = None,
        pad_id: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        name: str = "train",
    ) -> None:
        """``fim``: rewrite documents fill-in-the-middle (needs ``tokenizer``), deterministically
        per sample index. ``eod_mask_loss``: no loss where the input is EOD (Megatron's rule).
        ``reset_position_ids``: positions restart after each EOD (else 0..seq-1).
        ``sft_sep_id``: supervised fine-tuning, no loss up to and including each document's
        first token of this id; the response keeps its loss through its closing EOD label (so
        the model learns to stop), and the position whose input is that EOD predicts the next
        record's prompt, which carries no loss. ``shuffle=False``: documents and samples in
        order (not Megatron's; for inspection). ``pad_id``: padding in the data (e.g. of
        fixed-length SFT records) never carries loss. ``cache_dir``: keep the three index arrays
        there as .npy files (``name`` tells splits apart in the file names) and memory-map them
        on later runs."""
        if seq_length < 1:
            raise DataError(f"seq_length must be >= 1, got {seq_length}")
        if num_samples < 0:
            raise DataError(f"num_samples must be >= 0, got {num_samples}")
        if not 0 <= seed < 2**32:
            raise DataError(f"seed must be in [0, 2**32), got {seed}")
        documents = np.asarray(documents, dtype=np.int64)
        num_docs = indexed.num_documents
        if documents.ndim != 1 or len(documents) == 0:
            raise DataError(f"{indexed.prefix}: no documents selected for this dataset")
        if documents.min() < 0 or documents.max() >= num_docs:
            raise DataError(
                f"{indexed.prefix}: document indices must be in [0, {num_docs}), got "
                f"{documents.min()}..{documents.max()}"
            )
        if fim is not None and tokenizer is None:
            raise DataError("fill-in-the-middle needs the tokenizer (to cut text by characters)")
        if fim is not None and sft_sep_id is not None:
            raise DataError("fill-in-the-middle and SFT loss masking do not combine")
        self.fim, self.tokenizer, self.eod_mask_loss = fim, tokenizer, eod_mask_loss
        self.reset_position_ids, self.sft_sep_id = reset_position_ids, sft_sep_id
        self.pad_id = pad_id
        self.seed = seed
        self.indexed = indexed
        self.seq_length = seq_length
        self.num_samples = num_samples
        self.eod_id = eod_id
        self._single = _one_sequence_per_document(indexed)
        self.doc_lengths = _document_lengths(indexed, self._single)
        tokens_per_epoch = int(self.doc_lengths[documents].sum())
        if tokens_per_epoch < seq_length + 1:
            raise DataError(
                f"{indexed.prefix}: the {len(documents)} selected documents hold "
                f"{tokens_per_epoch} tokens, fewer than one sample needs (seq_length + 1 = "
                f"{seq_length + 1}); use a shorter train.seq_length or more data"
            )
        # Recorded with checkpoints: a run extended to more samples keeps its order only if equal.
        self.order_signature = order_signature(tokens_per_epoch, seq_length, num_samples)
        key = {
            "version": 2,  # 2: Megatron's construction (all epochs shuffled together)
            "seq_length": seq_length,
            "num_samples": num_samples,
            "seed": seed,
            "shuffle": shuffle,
            "documents": hashlib.sha256(documents.tobytes()).hexdigest(),
        }
        cache = IndexCache(cache_dir, indexed.prefix, key, name) if cache_dir is not None else None
        arrays = cache.load() if cache is not None else None
        if arrays is None:
            arrays = self._build_indices(documents, shuffle)
            if cache is not None:
                cache.save(arrays)
        self.doc_order, self.sample_index, self.shuffle_index = arrays

    def _build_indices(
        self, documents: np.ndarray, shuffle: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Megatron's document order, sample index and shuffle index (see megatron_index)."""
        order_dtype = np.int32 if self.indexed.num_documents < 2**31 else np.int64
        return build_indices(self.doc_lengths, documents, self.seq_length, self.num_samples,
                             self.seed, shuffle, order_dtype)  # fmt: skip

    def __getstate__(self) -> dict:
        # The lengths may be a view of the memory map: recompute them instead of copying.
        state = self.__dict__.copy()
        del state["doc_lengths"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.doc_lengths = _document_lengths(self.indexed, self._single)

    def __len__(self) -> int:
        return self.num_samples

    def _read(self, doc: int, offset: int, length: int) -> list[np.ndarray]:
        if self._single:
            return [self.indexed.get(doc, offset, length)]
        parts = []
        doc_idx = self.indexed.doc_idx
        for seq in range(int(doc_idx[doc]), int(doc_idx[doc + 1])):
            size = int(self.indexed.sizes[seq])
            if offset >= size:
                offset -= size
                continue
            take = min(size - offset, length)
            parts.append(self.indexed.get(seq, offset, take))
            length -= take
            offset = 0
            if length == 0:
                break
        return parts

    def _pieces(self, i: int) -> list[tuple[int, int, int]]:
        """Sample ``i`` (after shuffling) as (document, first token, length) runs."""
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range ({self.num_samples} samples)")
        # Modulo the samples asked for: the shuffle index is longer (every sample of the epochs).
        j = int(self.shuffle_index[i % self.num_samples])
        (first, start), (last, end) = self.sample_index[j], self.sample_index[j + 1]
        first, start, last, end = int(first), int(start), int(last), int(end)
        order = self.doc_order
        if first == last:
            return [(int(order[first]), start, end - start + 1)]
        doc = int(order[first])
        pieces = [(doc, start, int(self.doc_lengths[doc]) - start)]
        for k in range(first + 1, last):
            doc = int(order[k])
            pieces.append((doc, 0, int(self.doc_lengths[doc])))
        pieces.append((int(order[last]), 0, end + 1))
        return pieces

    def sample_tokens(self, i: int) -> np.ndarray:
        """The ``seq_length + 1`` tokens of sample ``i`` (after shuffling), as int64."""
        parts = [p for doc, off, n in self._pieces(i) for p in self._read(doc, off, n)]
        return np.concatenate(parts).astype(np.int64)

    def _sft_mask(self, i: int, tokens: np.ndarray) -> np.ndarray:
        """1.0 on tokens after their document's first <sep>, 0.0 on the prompt and the <sep>.

        A sample can start inside a document, so the part of it before the sample is searched
        too; a document without <sep> is all response.
        """
        mask = np.ones(len(tokens), dtype=np.float32)
        at = 0
        for doc, offset, length in self._pieces(i):
            piece = tokens[at : at + length]
            seen = offset > 0 and any(
                (p == self.sft_sep_id).any() for p in self._read(doc, 0, offset)
            )
            if not seen:
                hits = np.flatnonzero(piece == self.sft_sep_id)
                if len(hits):
                    mask[at : at + hits[0] + 1] = 0.0
                elif offset > 0 or length < self.doc_lengths[doc]:
                    # No <sep> in this part: it is all response only if the document has none.
                    rest = offset + length
                    later = self._read(doc, rest, int(self.doc_lengths[doc]) - rest)
                    if any((p == self.sft_sep_id).any() for p in later):
                        mask[at : at + length] = 0.0
            at += length
        return mask

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = self.sample_tokens(i)
        if self.sft_sep_id is not None:
            mask = self._sft_mask(i, sample)
        else:
            mask = np.ones(len(sample), dtype=np.float32)
        if self.fim is not None:
            # Seeded by the sample's index: the same sample in every process and after resume.
            index = i % self.num_samples
            sample, mask = apply_fim(sample, self.fim, self.tokenizer, seed=self.seed,
                                     sample_index=index)  # fmt: skip
        tokens, labels = sample[:-1], sample[1:]
        loss_mask = mask[1:].copy()  # mask[k] belongs to token k: the label of position k - 1
        if self.pad_id is not None:
            loss_mask[labels == self.pad_id] = 0.0
        if self.eod_mask_loss:
            # Megatron's rule: no loss where the INPUT is <eod>, i.e. on predicting the next
            # document's first token; the <eod> label itself is learned (a model must learn to
            # end a document).
            loss_mask[tokens == self.eod_id] = 0.0
        return {
            "tokens": torch.from_numpy(tokens.copy()),
            "labels": torch.from_numpy(labels.copy()),
            "position_ids": torch.from_numpy(
                position_ids_from_tokens(tokens, self.eod_id)
                if self.reset_position_ids
                else np.arange(len(tokens), dtype=np.int64)
            ),
            "loss_mask": torch.from_numpy(loss_mask),
        }


def split_documents(num_documents: int, split: str = "98,1,1") -> tuple[np.ndarray, ...]:
    """Contiguous train/valid/test ranges of document indices from weights like ``"98,1,1"``.

    Megatron's ranges (:func:`yuanlfa.data.megatron_index.split_bounds`). Where its rounding
    leaves a split with a positive weight empty (a tiny dataset: Megatron could not build that
    split), the largest split hands it one document so that every such split has data.
    """
    weights = parse_split(split)
    if num_documents < 1:
        raise DataError("cannot split a dataset with no documents")
    wanted = [i for i in range(3) if weights[i] > 0]
    if len(wanted) > num_documents:
        raise DataError(
            f"data split {split!r} needs at least {len(wanted)} documents, the dataset has "
            f"{num_documents}; set a split with fewer non-zero parts, e.g. '1,0,0'"
        )
    counts = [end - begin for begin, end in split_bounds(num_documents, weights)]
    for i in wanted:
        if counts[i] == 0:
            donor = max(range(3), key=lambda k: counts[k])
            counts[donor] -= 1
            counts[i] += 1
    edges = np.cumsum([0, *counts])
    return tuple(np.arange(edges[i], edges[i + 1], dtype=np.int64) for i in range(3))
