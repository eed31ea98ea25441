"""This data-parallel rank's microbatches, step after step, read ahead by worker processes.

Samples are addressed by position in the (already shuffled) dataset: the global batch of the
step that starts at ``consumed`` samples is ``[consumed, consumed + global_batch)``, and dp rank
r takes the r-th contiguous share of it. So the batches depend only on the consumed-samples
count saved in a checkpoint, never on the worker count, the access order or the layout.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class StepSampler(Sampler[list[int]]):
    """Sample indices of this rank's microbatches, in training order, from ``consumed``."""

    def __init__(
        self,
        num_samples: int,
        *,
        consumed: int,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp: int,
    ) -> None:
        if global_batch % (micro_batch * dp):
            raise ValueError(
                f"global batch {global_batch} is not a multiple of micro batch {micro_batch} "
                f"times dp {dp}"
            )
        if not 0 <= dp_rank < dp:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp})")
        self.num_samples, self.consumed = num_samples, consumed
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.local = dp_rank, global_batch // dp

    def __iter__(self) -> Iterator[list[int]]:
        step_start = self.consumed
        while step_start + self.global_batch <= self.num_samples:
            start = step_start + self.dp_rank * self.local
            for m in range(0, self.local, self.micro_batch):
                yield list(range(start + m, start + m + self.micro_batch))
            step_start += self.global_batch

    def __len__(self) -> int:
        steps = max(0, (self.num_samples - self.consumed) // self.global_batch)
        return steps * (self.local // self.micro_batch)


class StepLoader:
    """``next_step()`` gives the microbatches (dicts of [micro, seq] tensors on ``device``) of
    this rank's share of the next global batch.

    ``num_workers`` processes read ahead (``prefetch`` microbatches each); 0 reads in this
    process. Workers start lazily on the first step and stop with :meth:`close`.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        consumed: int,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp: int,
        device: torch.device,
        num_workers: int = 0,
        prefetch: int = 4,
    ) -> None:
        sampler = StepSampler(
            len(dataset),
            consumed=consumed,
            global_batch=global_batch,
            micro_batch=micro_batch,
            dp_rank=dp_rank,
            dp=dp,
        )
        self.micro_batches = global_batch // dp // micro_batch
        self.device = device
        extra = {}
        if num_workers > 0:
            extra = {"prefetch_factor": prefetch, "persistent_workers": False}
        self._loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            **extra,
        )
        self._it: Iterator[dict[str, torch.Tensor]] | None = None

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        if self._it is None:
            self._it = iter(self._loader)
        try:
            batches = [next(self._it) for _ in range(self.micro_batches)]
        except StopIteration:
            raise RuntimeError(
                "the training data ran out before train.steps; the dataset was built for fewer "
                "samples than the run consumes"
            ) from None
        non_blocking = self.device.type == "cuda"
        return [
            {k: v.to(self.device, non_blocking=non_blocking) for k, v in b.items()} for b in batches
        ]

    def close(self) -> None:
        # Dropping the iterator shuts its worker processes down.
        self._it = None
