"""Documents packed into fixed-length training samples, as Megatron's GPTDataset does it.

Three index arrays define the samples: the document order (one seeded permutation per epoch), the
sample index (where each sample starts and ends in that order) and a seeded shuffle of the
samples. A sample holds ``seq_length + 1`` tokens: inputs are the first ``seq_length``, labels
the last ``seq_length``; consecutive samples share one token.
"""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np
import torch

from yuanlfa.data.fim import FIMConfig, FIMTokenizer, apply_fim
from yuanlfa.data.index_cache import IndexCache
from yuanlfa.data.index_helpers import build_sample_index
from yuanlfa.data.indexed_dataset import DataError, MMapIndexedDataset


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
    seed whatever the process, worker or layout that asks for it.
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
        per sample index. ``eod_mask_loss``: no loss where the label is EOD.
        ``reset_position_ids``: positions restart after each EOD (else 0..seq-1).
        ``sft_sep_id``: supervised fine-tuning, no loss up to and including each document's
        first token of this id. ``pad_id``: padding in the data (e.g. of fixed-length SFT
        records) never carries loss. ``cache_dir``: keep the three index arrays there as .npy files
        (``name`` tells splits apart in the file names) and memory-map them on later runs."""
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
        key = {
            "version": 1,
            "seq_length": seq_length,
            "num_samples": num_samples,
            "seed": seed,
            "shuffle": shuffle,
            "documents": hashlib.sha256(documents.tobytes()).hexdigest(),
        }
        cache = IndexCache(cache_dir, indexed.prefix, key, name) if cache_dir is not None else None
        arrays = cache.load() if cache is not None else None
        if arrays is None:
            arrays = self._build_indices(documents, tokens_per_epoch, shuffle)
            if cache is not None:
                cache.save(arrays)
        self.doc_order, self.sample_index, self.shuffle_index = arrays

    def _build_indices(
        self, documents: np.ndarray, tokens_per_epoch: int, shuffle: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Document order (a seeded permutation per epoch), sample index and sample shuffle."""
        seq_length, num_samples = self.seq_length, self.num_samples
        needed = num_samples * seq_length + 1
        epochs = -(-needed // tokens_per_epoch)
        # RandomState, not Generator: its streams are frozen across numpy versions, so a seed
        # names the same samples forever.
        rng = np.random.RandomState(self.seed)
        order_dtype = np.int32 if self.indexed.num_documents < 2**31 else np.int64
        orders = [rng.permutation(documents) if shuffle else documents for _ in range(epochs)]
        doc_order = np.concatenate(orders).astype(order_dtype)
        # The C++ helper when built, else numpy (the same result).
        sample_index = build_sample_index(self.doc_lengths, doc_order, seq_length, num_samples)
        shuffle_index = (
            rng.permutation(num_samples) if shuffle else np.arange(num_samples)
        ).astype(np.int64)
        return doc_order, sample_index, shuffle_index

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
        j = int(self.shuffle_index[i])
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
            loss_mask[labels == self.eod_id] = 0.0
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

    Every split with a positive weight gets at least one document when there are enough.
    """
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
    weights += [0.0] * (3 - len(weights))
    if num_documents < 1:
        raise DataError("cannot split a dataset with no documents")
    total = sum(weights)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + round(w / total * num_documents))
    # Rounding can overshoot or undershoot; the last boundary must be the document count.
    shift = bounds[-1] - num_documents
    bounds = [max(0, b - shift) if i else 0 for i, b in enumerate(bounds)]
    counts = [bounds[i + 1] - bounds[i] for i in range(3)]
    wanted = [i for i in range(3) if weights[i] > 0]
    if len(wanted) > num_documents:
        raise DataError(
            f"data split {split!r} needs at least {len(wanted)} documents, the dataset has "
            f"{num_documents}; set a split with fewer non-zero parts, e.g. '1,0,0'"
        )
    # The shift above can hand documents to a zero-weight split; they belong to the others.
    for i in range(3):
        if weights[i] == 0 and counts[i]:
            counts[max(wanted, key=lambda k: counts[k])] += counts[i]
            counts[i] = 0
    for i in wanted:
        if counts[i] == 0:
            donor = max(range(3), key=lambda k: counts[k])
            counts[donor] -= 1
            counts[i] += 1
    edges = np.cumsum([0, *counts])
    return tuple(np.arange(edges[i], edges[i + 1], dtype=np.int64) for i in range(3))
