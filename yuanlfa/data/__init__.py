"""Data: Megatron-compatible token files, tokenizers, preprocessing and packed samples."""

from __future__ import annotations

from yuanlfa.data.corpus import default_cache_dir, default_corpus_files, ensure_default_corpus
from yuanlfa.data.dataset import (
    PackedDataset,
    build_sample_index,
    position_ids_from_tokens,
    split_documents,
)
from yuanlfa.data.indexed_dataset import (
    DataError,
    IndexedDatasetBuilder,
    MMapIndexedDataset,
    best_dtype,
)
from yuanlfa.data.preprocess import preprocess_files
from yuanlfa.data.tokenizer import ByteTokenizer, Tokenizer, build_tokenizer, pad_vocab_size

__all__ = [
    "ByteTokenizer",
    "DataError",
    "IndexedDatasetBuilder",
    "MMapIndexedDataset",
    "PackedDataset",
    "Tokenizer",
    "best_dtype",
    "build_sample_index",
    "build_tokenizer",
    "default_cache_dir",
    "default_corpus_files",
    "ensure_default_corpus",
    "pad_vocab_size",
    "position_ids_from_tokens",
    "preprocess_files",
    "split_documents",
]
