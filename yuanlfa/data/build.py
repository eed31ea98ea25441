"""From DataConfig to the training and validation datasets, and batches by sample position."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from yuanlfa.config import ConfigError, DataConfig, parse_blend
from yuanlfa.data import (
    DataError,
    MMapIndexedDataset,
    PackedDataset,
    build_tokenizer,
    ensure_default_corpus,
    split_documents,
)
from yuanlfa.data.blended import BlendedDataset, component_samples
from yuanlfa.data.corpus import default_cache_dir
from yuanlfa.data.fim import FIMConfig


@dataclass
class TrainData:
    train: Dataset
    valid: Dataset | None
    # The data as "prefix" or "w1*prefix1 + w2*prefix2", absolute paths: a resumed run checks it.
    prefix: str


def _check_prefix(prefix: str, key: str) -> str:
    for suffix in (".bin", ".idx"):
        if not Path(prefix + suffix).is_file():
            raise ConfigError(
                f"{key}: {prefix + suffix} not found; give the prefix of a .bin/.idx pair "
                "written by yuanlfa-preprocess (without the extension)"
            )
    return prefix


def resolve_data_prefix(cfg: DataConfig, progress: bool = True) -> str:
    """The user's .bin/.idx prefix, or the embedded default corpus (tokenized once, cached)."""
    if cfg.path is None:
        return ensure_default_corpus(
            build_tokenizer(cfg.tokenizer), cache_dir=cfg.cache_dir, progress=progress
        )
    return _check_prefix(cfg.path, "data.path")


def resolve_sources(cfg: DataConfig, progress: bool = True) -> list[tuple[float, str]]:
    """(weight, prefix) of every dataset: data.blend's, or data.path (or the default) alone."""
    if not cfg.blend:
        return [(1.0, resolve_data_prefix(cfg, progress))]
    return [(w, _check_prefix(p, "data.blend")) for w, p in parse_blend(cfg.blend)]


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
    """Open the data, check its tokens fit the vocabulary, split by documents, pack samples.

    With data.blend each dataset is split and packed on its own, and the train and validation
    sets interleave them by weight (Megatron's blending).
    """
    sources = resolve_sources(cfg, progress)
    tokenizer = build_tokenizer(cfg.tokenizer)
    fim = None
    if cfg.fim_rate > 0:
        try:
            fim = FIMConfig.from_tokenizer(tokenizer, rate=cfg.fim_rate, spm_rate=cfg.fim_spm_rate)
        except (AttributeError, DataError) as exc:
            raise ConfigError(f"data.fim_rate: the tokenizer cannot do FIM ({exc})") from None
    sft_sep = None
    if cfg.sft:
        try:
            sft_sep = tokenizer.sep
        except (AttributeError, KeyError):
            raise ConfigError(
                f"data.sft: the tokenizer {cfg.tokenizer} has no <sep> token to split prompts "
                "from responses"
            ) from None
    cache_dir = None
    if cfg.cache_index:
        base = Path(cfg.cache_dir) if cfg.cache_dir is not None else default_cache_dir()
        cache_dir = base / "index"
    common = {
        "seq_length": seq_length,
        "seed": seed,
        "eod_id": tokenizer.eod,
        "eod_mask_loss": cfg.eod_mask_loss,
        "reset_position_ids": cfg.reset_position_ids,
        "sft_sep_id": sft_sep,
        # A tokenizer whose pad is its eod (some HF ones) keeps EOD's loss unless eod_mask_loss.
        "pad_id": tokenizer.pad if tokenizer.pad != tokenizer.eod else None,
        "cache_dir": cache_dir,
    }
    weights = [w for w, _ in sources]
    blended = len(sources) > 1
    train_counts = component_samples(weights, train_samples) if blended else [train_samples]
    valid_counts = component_samples(weights, valid_samples) if blended else [valid_samples]
    trains, valids = [], []
    for (_, prefix), n_train, n_valid in zip(sources, train_counts, valid_counts, strict=True):
        indexed = MMapIndexedDataset(prefix)
        indexed.check_tokens(vocab_size)
        train_docs, valid_docs, _ = split_documents(len(indexed.doc_idx) - 1, cfg.split)
        trains.append(
            PackedDataset(
                indexed,
                num_samples=n_train,
                documents=train_docs,
                fim=fim,
                tokenizer=tokenizer if fim is not None else None,
                name="train",
                **common,
            )
        )
        if valid_samples > 0 and len(valid_docs) > 0:
            try:
                valids.append(
                    PackedDataset(
                        indexed,
                        num_samples=n_valid,
                        documents=valid_docs,
                        name="valid",
                        **common,
                    )
                )
            except DataError as exc:
                # Too little held-out text is no reason to stop training: say so and go on.
                print(
                    f"warning: evaluation disabled, the validation split of {prefix} with "
                    f"data.split={cfg.split!r} is too small ({exc})",
                    flush=True,
                )
    train: Dataset = trains[0]
    valid: Dataset | None = valids[0] if len(valids) == 1 and not blended else None
    if blended:
        train = BlendedDataset(trains, weights, train_samples)
        if len(valids) == len(sources):
            valid = BlendedDataset(valids, weights, valid_samples)
    if len(sources) == 1:
        described = str(Path(sources[0][1]).resolve())
    else:
        described = " + ".join(f"{w:g}*{Path(p).resolve()}" for w, p in sources)
    return TrainData(train, valid, described)


def get_batch(
    dataset: Dataset, start: int, size: int, device: torch.device
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
