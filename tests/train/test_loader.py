"""The step loader: each dp rank's share of each global batch, whatever the worker count, and
resumable from a consumed-samples count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.data.test_dataset import EOD, make_docs, write
from yuanlfa.data import PackedDataset
from yuanlfa.data.build import get_batch
from yuanlfa.train.loader import StepLoader, StepSampler


@pytest.mark.parametrize(("dp", "micro", "consumed"), [(1, 2, 0), (2, 1, 8), (4, 2, 16)])
def test_sampler_partitions_each_global_batch(dp, micro, consumed):
    glob, n = 16, 100
    per_rank = [
        list(
            StepSampler(
                n, consumed=consumed, global_batch=glob, micro_batch=micro, dp_rank=r, dp=dp
            )
        )  # fmt: skip
        for r in range(dp)
    ]
    steps = (n - consumed) // glob
    for batches in per_rank:
        assert len(batches) == steps * glob // dp // micro
        assert all(len(b) == micro for b in batches)
    for k in range(steps):
        step = [
            i
            for r in range(dp)
            for b in per_rank[r][k * glob // dp // micro : (k + 1) * glob // dp // micro]
            for i in b
        ]
        # Rank r holds the r-th contiguous share of the global batch, in order.
        assert step == list(range(consumed + k * glob, consumed + (k + 1) * glob))


def test_sampler_errors():
    with pytest.raises(ValueError, match="not a multiple"):
        StepSampler(10, consumed=0, global_batch=6, micro_batch=4, dp_rank=0, dp=1)
    with pytest.raises(ValueError, match="dp_rank 2"):
        StepSampler(10, consumed=0, global_batch=4, micro_batch=1, dp_rank=2, dp=2)


@pytest.fixture
def packed(tmp_path) -> PackedDataset:
    indexed = write(tmp_path, make_docs(0, n=60))
    return PackedDataset(
        indexed, seq_length=12, num_samples=48, seed=1, eod_id=EOD,
        documents=np.arange(indexed.num_documents),
    )  # fmt: skip


def steps_of(loader: StepLoader, n: int) -> list[list[dict[str, torch.Tensor]]]:
    try:
        return [loader.next_step() for _ in range(n)]
    finally:
        loader.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_equal_direct_reads_and_resume(packed, workers):
    cpu = torch.device("cpu")
    args = {"global_batch": 8, "micro_batch": 2, "dp": 2, "device": cpu}
    loader = StepLoader(packed, consumed=0, dp_rank=1, num_workers=workers, **args)
    steps = steps_of(loader, 6)
    for k, step in enumerate(steps):
        assert len(step) == 2
        for m, batch in enumerate(step):
            ref = get_batch(packed, k * 8 + 4 + m * 2, 2, cpu)
            assert batch.keys() == ref.keys()
            for key in ref:
                torch.testing.assert_close(batch[key], ref[key], rtol=0, atol=0)
    resumed = steps_of(StepLoader(packed, consumed=24, dp_rank=1, num_workers=workers, **args), 3)
    for a, b in zip(resumed, steps[3:], strict=True):
        for x, y in zip(a, b, strict=True):
            assert all(torch.equal(x[key], y[key]) for key in x)


def test_running_out_is_an_error(packed):
    loader = StepLoader(packed, consumed=40, global_batch=8, micro_batch=4, dp_rank=0, dp=1,
                        device=torch.device("cpu"))  # fmt: skip
    loader.next_step()
    with pytest.raises(RuntimeError, match="ran out"):
        loader.next_step()
