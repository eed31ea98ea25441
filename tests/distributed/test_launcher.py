"""The multi-process helper: a real data-parallel use, failure reports, many ranks."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.distributed.launcher import run_distributed
from yuanlfa.config import Config, config_from_dict, resolve
from yuanlfa.model import create_model

pytestmark = pytest.mark.slow

BATCH, SEQ, SEED = 4, 8, 1234


def tiny_config() -> Config:
    # The same tiny model as the tiny_cfg fixture (fixtures do not reach spawned ranks).
    cfg = config_from_dict(
        {"model": {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "vocab_size": 128}}
    )
    return resolve(cfg, world_size=1)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(0, 128, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def grads_of(ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    model = create_model(tiny_config().model, seed=SEED)
    model(ids, labels=labels).mean().backward()
    return {n: p.grad for n, p in model.named_parameters()}


def data_parallel_grads(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    ids, labels = batch()
    per_rank = BATCH // world_size
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    grads = grads_of(ids[rows], labels[rows])
    for g in grads.values():
        # Equal token counts per rank: the mean of the ranks' means is the global mean.
        dist.all_reduce(g)
        g /= world_size
    return grads


def test_data_parallel_gradients_equal_single_process() -> None:
    results = run_distributed(data_parallel_grads, 2)
    expected = grads_of(*batch())
    for rank, grads in enumerate(results):
        assert grads.keys() == expected.keys()
        for name, g in grads.items():
            torch.testing.assert_close(
                g,
                expected[name],
                rtol=1e-5,
                atol=1e-7,
                msg=lambda m, r=rank, n=name: f"rank {r} {n}: {m}",
            )
    # The ranks really saw different data: one half's gradient differs from the whole's.
    ids, labels = batch()
    half = grads_of(ids[:2], labels[:2])
    assert not torch.allclose(half["embed.weight"], expected["embed.weight"], rtol=1e-3)


def fail_on_some_ranks(rank: int, world_size: int) -> object:
    if rank == 1:
        raise ValueError("boom-rank-1")
    if rank == 2:
        raise RuntimeError("rank 2 says no")
    if rank == 3:
        return lambda: rank  # unpicklable: must be reported, not lost
    return rank


def test_failing_ranks_tracebacks_are_reported() -> None:
    # One launch covers several failure kinds (each launch costs seconds of imports).
    with pytest.raises(AssertionError) as exc:
        run_distributed(fail_on_some_ranks, 4)
    msg = str(exc.value)
    assert "ValueError: boom-rank-1" in msg
    # The full traceback, down to the raising line of the user's function.
    assert "Traceback (most recent call last)" in msg and "fail_on_some_ranks" in msg
    assert "rank 2 says no" in msg
    for rank in (1, 2, 3):
        assert f"----- rank {rank} -----" in msg
    # Rank 0 succeeded and is not reported; each error sits under its own rank's header.
    assert "----- rank 0 -----" not in msg
    assert msg.index("----- rank 1 -----") < msg.index("boom-rank-1")
    assert msg.index("boom-rank-1") < msg.index("----- rank 2 -----") < msg.index("says no")


def report_rank(rank: int, world_size: int, offset: int, *, scale: int = 1) -> dict:
    total = torch.tensor([rank])
    dist.all_reduce(total)
    return {
        "rank": rank,
        "value": rank * scale + offset,
        "world": dist.get_world_size(),
        "sum": int(total),
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "threads": torch.get_num_threads(),
    }


def test_four_ranks_return_their_ranks() -> None:
    results = run_distributed(report_rank, 4, 100, scale=10)
    assert [r["rank"] for r in results] == [0, 1, 2, 3]
    assert [r["value"] for r in results] == [100, 110, 120, 130]
    for r in results:
        assert r["world"] == 4 and r["sum"] == 0 + 1 + 2 + 3
        assert r["omp"] == "1" and r["threads"] == 1


def hang_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        time.sleep(600)
    return rank


def test_hung_rank_is_killed_and_named() -> None:
    start = time.monotonic()
    with pytest.raises(AssertionError) as exc:
        run_distributed(hang_on_rank_one, 2, timeout=8)
    assert time.monotonic() - start < 20
    msg = str(exc.value)
    assert "----- rank 1 -----" in msg
    hung = msg.split("----- rank 1 -----")[1]
    assert "killed" in hung and "timeout" in hung
    # Rank 0 normally finishes in time; on a loaded machine its start-up alone may exceed the
    # short timeout, and then it is reported as killed too, never with a traceback.
    assert "Traceback" not in msg
