"""bf16 parameters with fp32 master weights and fp32 gradient accumulation: trains like fp32,
and the data-parallel sharded optimizer equals one process."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.launcher import run_distributed
from tests.tiny import tiny_overrides
from yuanlfa.config import OptimConfig, config_from_dict
from yuanlfa.model import create_model
from yuanlfa.parallel.dp.zero import ShardedAdamW
from yuanlfa.train import train

STEPS = 12


def _losses(corpus: str, **extra: object) -> list[float]:
    cfg = tiny_overrides(corpus, train__steps=STEPS, train__micro_batch_size=2, **extra)
    return [r["loss"] for r in train(config_from_dict(cfg), progress=False).records]


def test_gradients_accumulate_in_fp32_and_masters_stay_fp32() -> None:
    cfg = config_from_dict(
        {"model": {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "vocab_size": 64}}
    ).model
    tokens = torch.randint(0, 64, (2, 8))
    # One microbatch's bf16 gradients, from a model without the optimizer's hooks.
    plain = create_model(cfg, seed=1, dtype=torch.bfloat16)
    plain(tokens, labels=tokens).sum().backward()
    model = create_model(cfg, seed=1, dtype=torch.bfloat16)
    params = list(model.parameters())
    optimizer = ShardedAdamW(model, OptimConfig(lr=1e-2), None)
    optimizer.start_step(3)
    for _ in range(3):  # three identical microbatches
        model(tokens, labels=tokens).sum().backward()
    for p, q in zip(params, plain.parameters()):
        assert p.dtype == torch.bfloat16 and p.grad is None
        assert p.main_grad.dtype == torch.float32
        # The fp32 sum is exact; a bf16 accumulator would have rounded 2g and 3g.
        torch.testing.assert_close(p.main_grad, 3 * q.grad.float(), rtol=0, atol=0)
    before = [p.detach().clone() for p in params]
    optimizer.reduce_gradients()
    optimizer.step()
    assert all(b.shard.dtype == torch.float32 for b in optimizer.buckets)
    assert any(not torch.equal(b, p) for b, p in zip(before, params))
    optimizer.zero_grad()
    assert all(not p.main_grad.any() for p in params)


@pytest.mark.slow
def test_bf16_parameters_train_like_fp32(small_corpus: str) -> None:
    fp32 = _losses(small_corpus)
    bf16 = _losses(small_corpus, train__param_dtype="bf16")
    assert bf16[-1] < bf16[0] - 0.3  # it learns
    # bf16 weights round every update, so curves agree closely but not exactly.
    assert bf16 == pytest.approx(fp32, rel=2e-2)
    assert bf16 != fp32


def _dp_losses(rank: int, world: int, corpus: str) -> dict[str, list[float]]:
    return {
        "zero1": _losses(corpus, train__param_dtype="bf16", optim__distributed=True),
        "unsharded": _losses(corpus, train__param_dtype="bf16"),
    }


@pytest.mark.slow
def test_bf16_data_parallel_equals_one_process(small_corpus: str) -> None:
    single = _losses(small_corpus, train__param_dtype="bf16")
    for result in run_distributed(_dp_losses, 2, small_corpus, timeout=600):
        for name, losses in result.items():
            assert losses == pytest.approx(single, rel=1e-3), name
