"""From DataConfig to the training and validation datasets, and batches by sample position."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from yuanlfa.config import ConfigError, DataConfig
from yuanlfa.data import (
    DataError,
    MMapIndexedDataset,
    PackedDataset,
    build_tokenizer,
    ensure_default_corpus,
    split_documents,
)
from yuanlfa.data.fim import FIMConfig


@dataclass
class TrainData:
    train: PackedDataset
    valid: PackedDataset | None
    prefix: str


def resolve_data_prefix(cfg: DataConfig, progress: bool = True) -> str:
    """The user's .bin/.idx prefix, or the embedded default corpus (tokenized once, cached)."""
    if cfg.path is None:
        return ensure_default_corpus(
            build_tokenizer(cfg.tokenizer), cache_dir=cfg.cache_dir, progress=progress
        )
    for suffix in (".bin", ".idx"):
        if not Path(cfg.path + suffix).is_file():
            raise ConfigError(
                f"data.path: {cfg.path + suffix} not found; give the prefix of a .bin/.idx pair "
                "written by yuanlfa-preprocess (without the extension)"
            )
    return cfg.path


def build_datasets(
    cfg: DataConfig,
    *,
    vocab_size: int,
    seq_length: int,
    train_samples: int,
    valid_samples: int,
    seed: int,
    progress: bool = True,
) -> TrainData:
    """Open the data, check its tokens fit the vocabulary, split by documents, pack samples."""
    prefix = resolve_data_prefix(cfg, progress)
    indexed = MMapIndexedDataset(prefix)
    indexed.check_tokens(vocab_size)
    tokenizer = build_tokenizer(cfg.tokenizer)
    num_docs = len(indexed.doc_idx) - 1
    train_docs, valid_docs, _ = split_documents(num_docs, cfg.split)
    fim = None
    if cfg.fim_rate > 0:
        try:
            fim = FIMConfig.from_tokenizer(tokenizer, rate=cfg.fim_rate, spm_rate=cfg.fim_spm_rate)
        except (AttributeError, DataError) as exc:
            raise ConfigError(f"data.fim_rate: the tokenizer cannot do FIM ({exc})") from None
    common = {
        "seq_length": seq_length,
        "seed": seed,
        "eod_id": tokenizer.eod,
        "eod_mask_loss": cfg.eod_mask_loss,
    }
    train = PackedDataset(
        indexed,
        num_samples=train_samples,
        documents=train_docs,
        fim=fim,
        tokenizer=tokenizer if fim is not None else None,
        **common,
    )
    valid = None
    if valid_samples > 0 and len(valid_docs) > 0:
        try:
            valid = PackedDataset(
                indexed, num_samples=valid_samples, documents=valid_docs, shuffle=False, **common
            )
        except DataError as exc:
            # Too little held-out text is no reason to stop training: say so and go on.
            print(
                f"warning: evaluation disabled, the validation split of data.split="
                f"{cfg.split!r} is too small ({exc})",
                flush=True,
            )
    return TrainData(train, valid, prefix)


def get_batch(
    dataset: PackedDataset, start: int, size: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Samples [start, start + size) stacked into [size, seq] tensors on ``device``.

    Batches are addressed by sample position, so a resumed or re-laid-out run sees exactly the
    same samples in the same order.
    """
    samples = [dataset[i] for i in range(start, start + size)]
    return {
        key: torch.from_numpy(np.stack([s[key].numpy() for s in samples])).to(device)
        for key in samples[0]
    }
