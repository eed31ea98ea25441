"""Block-wise (and vocab-parallel) LM loss against the plain full-logits head."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed.launcher import run_distributed
from yuanlfa.ops.cross_entropy import blockwise_lm_loss, plain_lm_loss

# s*b = 39 is odd and not a multiple of any tested block size below it.
S, B, H, V = 13, 3, 16, 52
TOL = {torch.float64: 1e-6, torch.float32: 1e-5}


def _inputs(dtype: torch.dtype, seed: int = 0, v: int = V):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, B, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, H, generator=gen, dtype=torch.float64) * 0.5
    labels = torch.randint(0, v, (S, B), generator=gen)
    # Like a loss mask: some tokens contribute nothing.
    upstream = torch.rand(S, B, generator=gen, dtype=torch.float64)
    upstream[torch.rand(S, B, generator=gen) < 0.3] = 0.0
    return hidden.to(dtype), weight.to(dtype), labels, upstream.to(dtype)


def _loss_and_grads(fn, hidden, weight, labels, upstream, **kw):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    losses = fn(hidden, weight, labels, **kw)
    (losses * upstream).sum().backward()
    return losses.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("block_size", [1, 3, 7, S * B, S * B + 5])
def test_matches_plain(dtype: torch.dtype, block_size: int) -> None:
    inputs = _inputs(dtype)
    expected = _loss_and_grads(plain_lm_loss, *inputs)
    got = _loss_and_grads(blockwise_lm_loss, *inputs, block_size=block_size)
    for name, g, e in zip(("loss", "grad hidden", "grad weight"), got, expected):
        assert g.dtype == e.dtype == dtype, name
        torch.testing.assert_close(g, e, rtol=TOL[dtype], atol=TOL[dtype], msg=name)


def test_bf16_close_to_plain() -> None:
    # On CPU both round the logits to bf16 before the fp32 loss; the loss comes back in fp32
    # and the gradients in bf16.
    hidden, weight, labels, upstream = _inputs(torch.bfloat16)
    expected = _loss_and_grads(plain_lm_loss, hidden, weight, labels, upstream)
    got = _loss_and_grads(blockwise_lm_loss, hidden, weight, labels, upstream, block_size=8)
    assert got[0].dtype == torch.float32
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-2)


def test_gradient_of_one_input_only() -> None:
    hidden, weight, labels, upstream = _inputs(torch.float64)
    _, expected_dh, expected_dw = _loss_and_grads(plain_lm_loss, hidden, weight, labels, upstream)
    w = weight.clone().requires_grad_()
    (blockwise_lm_loss(hidden, w, labels, block_size=5) * upstream).sum().backward()
    torch.testing.assert_close(w.grad, expected_dw)
    x = hidden.clone().requires_grad_()
    (blockwise_lm_loss(x, weight, labels, block_size=5) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, expected_dh)


def _saved_numels(fn, hidden, weight, labels) -> list[int]:
    numels: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        numels.append(t.numel())
        return t

    hidden = hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(hidden, weight, labels)
    return numels


def test_saves_no_logits() -> None:
    hidden, weight, labels, _ = _inputs(torch.float32)
    full = S * B * V
    # Sanity of the probe: the plain head keeps something logits-sized.
    assert max(_saved_numels(plain_lm_loss, hidden, weight, labels)) >= full
    saved = _saved_numels(
        lambda x, w, y: blockwise_lm_loss(x, w, y, block_size=4), hidden, weight, labels
    )
    assert saved and max(saved) < full, saved
    # hidden, weight, labels, per-token lse: nothing else.
    assert sorted(saved) == sorted([S * B * H, V * H, S * B, S * B])


def test_saves_no_logits_via_grad_fn() -> None:
    hidden, weight, labels, _ = _inputs(torch.float32)
    out = blockwise_lm_loss(hidden.requires_grad_(), weight.requires_grad_(), labels)
    assert all(t.numel() < S * B * V for t in out.grad_fn.saved_tensors)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": torch.zeros(S, B + 1, dtype=torch.long)}, "labels must be"),
        ({"labels": torch.zeros(S * B, dtype=torch.long)}, "labels must be"),
        ({"labels": torch.zeros(S, B)}, "integer token ids"),
        ({"hidden": torch.zeros(S * B, H)}, "hidden must be"),
        ({"weight": torch.zeros(V, H + 1)}, "hidden size mismatch"),
        ({"weight": torch.zeros(V)}, "weight must be"),
        ({"block_size": 0}, "block_size must be"),
        ({"block_size": -3}, "block_size must be"),
        ({"block_size": 2.0}, "block_size must be"),
        ({"labels": torch.full((S, B), V)}, r"labels must lie in \[0, 52\)"),
        ({"labels": torch.full((S, B), -100)}, r"labels must lie in \[0, 52\)"),
        ({"vocab_start": 4}, "without a group"),
    ],
)
def test_bad_input(change: dict, message: str) -> None:
    hidden, weight, labels, _ = _inputs(torch.float32)
    args = {"hidden": hidden, "weight": weight, "labels": labels, "block_size": 4}
    args.update(change)
    kw = {k: args.pop(k) for k in ("block_size", "vocab_start") if k in args}
    with pytest.raises(ValueError, match=message):
        blockwise_lm_loss(args["hidden"], args["weight"], args["labels"], **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_label_check_on_gpu_does_not_sync() -> None:
    # On an accelerator the range check is a device-side assertion: no host sync per
    # micro-batch. (A bad label then fails the next synchronizing call; not triggered here, as
    # a device assertion leaves the CUDA context unusable for the tests after it.)
    hidden, weight, labels, _ = _inputs(torch.float32)
    hidden, weight, labels = hidden.cuda(), weight.cuda(), labels.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = blockwise_lm_loss(hidden, weight, labels, block_size=4)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert loss.shape == (S, B)


def _shards(v: int, world_size: int, uneven: bool) -> list[tuple[int, int]]:
    if not uneven:
        return [(r * v // world_size, (r + 1) * v // world_size) for r in range(world_size)]
    # Shards of different sizes (the first one the largest): the function needs no equal split.
    sizes = [v // world_size] * world_size
    sizes[0] += v - sum(sizes)
    sizes[0], sizes[-1] = sizes[0] + 1, sizes[-1] - 1
    starts = [sum(sizes[:r]) for r in range(world_size)]
    return [(a, a + n) for a, n in zip(starts, sizes)]


def sharded_matches_plain(rank: int, world_size: int) -> None:
    """Every rank checks its shard of the loss and gradients against the single-device head."""
    cases = [(torch.float64, V, False), (torch.float32, V, False), (torch.float64, V - 1, True)]
    for dtype, v, uneven in cases:
        hidden, weight, labels, upstream = _inputs(dtype, seed=7, v=v)
        loss_ref, dh_ref, dw_ref = _loss_and_grads(plain_lm_loss, hidden, weight, labels, upstream)
        lo, hi = _shards(v, world_size, uneven)[rank]
        for block_size in (1, 5, S * B, S * B + 2):
            loss, dh, dw = _loss_and_grads(
                blockwise_lm_loss,
                hidden,
                weight[lo:hi],
                labels,
                upstream,
                group=dist.group.WORLD,
                vocab_start=lo,
                block_size=block_size,
            )
            tol = {"rtol": TOL[dtype], "atol": TOL[dtype]}
            what = f"rank {rank}, {dtype}, V={v}, block {block_size}"
            torch.testing.assert_close(loss, loss_ref, **tol, msg=f"loss, {what}")
            torch.testing.assert_close(dw, dw_ref[lo:hi], **tol, msg=f"grad weight, {what}")
            # Each rank's hidden gradient is a partial sum over its vocabulary rows.
            dist.all_reduce(dh)
            torch.testing.assert_close(dh, dh_ref, **tol, msg=f"grad hidden, {what}")


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_vocab_parallel_matches_plain(world_size: int) -> None:
    run_distributed(sharded_matches_plain, world_size)
