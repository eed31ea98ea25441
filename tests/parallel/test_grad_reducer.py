"""The bucketed gradient reduction: buckets start reducing from autograd hooks while backward
is still running, and the result equals summing every rank's gradient, in both modes
(all-reduce, and reduce-scatter onto each rank's slice)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.distributed.launcher import run_distributed
from yuanlfa.parallel.dp.reducer import GradReducer

MICROBATCHES = 3


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(12, 12) for _ in range(4)), nn.Linear(12, 3))


def _inputs(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(5, 12, generator=gen) for _ in range(MICROBATCHES)]


def _reference(world: int) -> list[torch.Tensor]:
    """The sum over ranks and microbatches of each parameter's gradient, by plain autograd."""
    model = _model()
    for rank in range(world):
        for x in _inputs(rank):
            model(x).square().sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def _reduce(rank: int, world: int, scatter: bool, overlap: bool) -> dict:
    model = _model()
    params = list(model.parameters())
    # 12*12+12 = 156 elements per layer: about two layers per bucket.
    reducer = GradReducer(
        [params], dist.group.WORLD, scatter=scatter, bucket_elements=320, overlap=overlap
    )
    launched_during = []
    for _step in range(2):  # the buffers are reused: the second step must not see the first
        reducer.start(MICROBATCHES)
        for i, x in enumerate(_inputs(rank)):
            model(x).square().sum().backward()
            if i < MICROBATCHES - 1:
                # Nothing may start before the last microbatch's gradients are in.
                assert not any(b.launched for b in reducer.buckets)
        launched_during.append(reducer.launched_in_backward)
        buckets = reducer.finish()
    expected = dict(zip(map(id, params), _reference(world)))
    out = []
    for b in buckets:
        full = torch.cat([expected[id(p)].reshape(-1) for p in b.params])
        full = nn.functional.pad(full, (0, b.grad.numel() - full.numel()))
        if scatter:
            part = full.numel() // world
            full = full[rank * part : (rank + 1) * part]
        out.append(torch.allclose(b.reduced, full, rtol=1e-6, atol=1e-6))
    return {"equal": out, "buckets": len(buckets), "launched_during": launched_during}


@pytest.mark.parametrize("scatter", [False, True])
@pytest.mark.parametrize("overlap", [True, False])
def test_bucketed_reduction_equals_the_sum_and_overlaps_backward(
    scatter: bool, overlap: bool
) -> None:
    for result in run_distributed(_reduce, 2, scatter, overlap):
        assert result["buckets"] >= 3
        assert all(result["equal"])
        expected = result["buckets"] if overlap else 0
        assert result["launched_during"] == [expected, expected]


def _bypass(rank: int, world: int) -> bool:
    """A gradient written to .grad directly (torch's zero-bubble weight pass does this) is
    folded in by finish(), and its bucket is reduced there."""
    model = _model()
    params = list(model.parameters())
    reducer = GradReducer([params], dist.group.WORLD, scatter=False, bucket_elements=320)
    reducer.start(MICROBATCHES)
    for x in _inputs(rank):
        grads = torch.autograd.grad(model(x).square().sum(), params)
        for p, g in zip(params, grads):
            p.grad = g if p.grad is None else p.grad + g
    assert reducer.launched_in_backward == 0
    reducer.finish()
    return all(
        torch.allclose(p.main_grad, g, rtol=1e-6, atol=1e-6)
        for p, g in zip(params, _reference(world))
    )


def test_gradients_that_bypass_the_hooks_are_reduced() -> None:
    assert all(run_distributed(_bypass, 2))


def _late(rank: int, world: int) -> str:
    model = _model()
    reducer = GradReducer([list(model.parameters())], dist.group.WORLD, scatter=False)
    reducer.start(1)
    x = _inputs(rank)[0]
    model(x).sum().backward()  # the announced single pass: the only bucket starts reducing
    try:
        model(x).sum().backward()  # one pass too many: must not add into a buffer in flight
    except RuntimeError as exc:
        model.zero_grad()  # drop the refused gradient; complete the collective in flight
        reducer.finish()
        return str(exc)
    return ""


def test_a_gradient_after_its_bucket_started_is_refused() -> None:
    for message in run_distributed(_late, 2):
        assert "after its bucket's reduction had started" in message
