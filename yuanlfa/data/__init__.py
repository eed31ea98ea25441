"""Data: Megatron-compatible token files, tokenizers, preprocessing and packed samples.

Names are loaded on first use, so ``yuanlfa.data.tokenizer`` (which the torch-free planner uses
to size a vocabulary) does not bring in the torch datasets.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "default_cache_dir": "yuanlfa.data.corpus",
    "default_corpus_files": "yuanlfa.data.corpus",
    "ensure_default_corpus": "yuanlfa.data.corpus",
    "PackedDataset": "yuanlfa.data.dataset",
    "position_ids_from_tokens": "yuanlfa.data.dataset",
    "split_documents": "yuanlfa.data.dataset",
    "build_sample_index": "yuanlfa.data.sample_index",
    "DataError": "yuanlfa.data.indexed_dataset",
    "IndexedDatasetBuilder": "yuanlfa.data.indexed_dataset",
    "MMapIndexedDataset": "yuanlfa.data.indexed_dataset",
    "best_dtype": "yuanlfa.data.indexed_dataset",
    "preprocess_files": "yuanlfa.data.preprocess",
    "Tokenizer": "yuanlfa.data.special_tokens",
    "ByteTokenizer": "yuanlfa.data.tokenizer",
    "build_tokenizer": "yuanlfa.data.tokenizer",
    "pad_vocab_size": "yuanlfa.data.tokenizer",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'yuanlfa.data' has no attribute {name!r}")
