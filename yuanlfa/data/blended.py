"""Several datasets mixed by weight, as Megatron blends them (--data-path 0.3 A 0.7 B).

Each component is packed on its own with :func:`component_samples` samples, and
:class:`BlendedDataset` interleaves them with Megatron's greedy blending indices, so a blend of
the same components and weights yields the same sample order as Megatron's.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from yuanlfa.data.index_helpers import build_blending_indices, positions_in_datasets
from yuanlfa.data.indexed_dataset import DataError

# Megatron's mid_level_dataset_surplus: each component packs 0.5% more samples than its share, so
# the greedy interleaving (within one sample of the share at every prefix) never runs past one.
SURPLUS = 0.005


def normalize_weights(weights: Sequence[float]) -> list[float]:
    """Weights scaled to sum to 1, in float64 as Megatron's ``normalize`` does (same bits, so
    the same blending indices)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0:
        raise DataError(f"need a list of one or more blend weights, got {list(weights)!r}")
    bad = ~(np.isfinite(w) & (w > 0))
    if bad.any():
        d = int(np.argmax(bad))
        raise DataError(f"blend weight {d} is {w[d]:g}; every weight must be finite and > 0")
    return (w / np.sum(w)).tolist()


def component_samples(weights: Sequence[float], num_samples: int) -> list[int]:
    """Samples to pack from each component for a blend of ``num_samples``: megatron-core's
    ``ceil(ceil(num_samples * weight) * (1 + 0.005))`` with the weights normalized. The count
    decides how many epochs the component spans and so its sample order: it must be Megatron's.
    """
    num_samples = operator.index(num_samples)
    if num_samples < 0:
        raise DataError(f"num_samples must be >= 0, got {num_samples}")
    return [
        math.ceil(math.ceil(num_samples * w) * (1 + SURPLUS)) for w in normalize_weights(weights)
    ]


def _describe(dataset: Any, d: int) -> str:
    prefix = getattr(getattr(dataset, "indexed", None), "prefix", None)
    return f"component {d}" + (f" ({prefix})" if prefix is not None else "")


class BlendedDataset(torch.utils.data.Dataset):
    """``num_samples`` samples drawn from ``datasets`` in proportion to ``weights``.

    Sample i is sample ``dataset_sample_index[i]`` of ``datasets[dataset_index[i]]``: each
    component is read in its own order, interleaved by Megatron's greedy blending, so no
    component is ever a whole sample ahead of its share ``weight * n`` of the first n samples
    (nor, with two components, behind it). A component must hold at least the samples it is
    asked for; :func:`component_samples` gives enough.
    """

    def __init__(
        self,
        datasets: Sequence[torch.utils.data.Dataset],
        weights: Sequence[float],
        num_samples: int,
    ) -> None:
        if len(datasets) != len(weights):
            raise DataError(f"{len(datasets)} datasets but {len(weights)} blend weights")
        num_samples = operator.index(num_samples)
        if num_samples < 0:
            raise DataError(f"num_samples must be >= 0, got {num_samples}")
        self.datasets = list(datasets)
        # Normalized twice, as Megatron does (its builder, then its BlendedDataset): the second
        # pass can move the last bit of a weight, and with it a near-tie of the interleaving.
        self.weights = normalize_weights(normalize_weights(weights))
        self.num_samples = num_samples
        self.dataset_index, self.dataset_sample_index = build_blending_indices(
            np.array(self.weights), num_samples
        )
        needed = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, dataset in enumerate(self.datasets):
            have = len(dataset)  # type: ignore[arg-type]
            if have < needed[d]:
                raise DataError(
                    f"{_describe(dataset, d)} of the blend has {have} samples but weight "
                    f"{self.weights[d]:.4g} of {num_samples} needs {needed[d]}; build it with "
                    "component_samples(weights, num_samples)"
                )

    def __getstate__(self) -> dict:
        # The sample positions follow from dataset_index: send two bytes per sample, not ten.
        state = self.__dict__.copy()
        del state["dataset_sample_index"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.dataset_sample_index = positions_in_datasets(self.dataset_index, len(self.datasets))

    def __len__(self) -> int:
        return self.num_samples

    def _locate(self, i: int) -> tuple[Any, int]:
        i = operator.index(i)
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range ({self.num_samples} samples)")
        i %= self.num_samples
        return self.datasets[int(self.dataset_index[i])], int(self.dataset_sample_index[i])

    def __getitem__(self, i: int) -> Any:
        dataset, j = self._locate(i)
        return dataset[j]

    def sample_tokens(self, i: int) -> np.ndarray:
        """The component's ``sample_tokens`` of sample ``i`` (a PackedDataset's token window)."""
        dataset, j = self._locate(i)
        return dataset.sample_tokens(j)
