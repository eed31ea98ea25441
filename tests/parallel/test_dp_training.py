"""Data parallelism (alone and with tensor parallelism, with and without the sharded ZeRO-1
optimizer) equals one process over 20 steps, with gradient accumulation and clipping active."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed.launcher import run_distributed
from tests.tiny import tiny_overrides
from yuanlfa.config import ConfigError, OptimConfig, config_from_dict
from yuanlfa.model import create_model
from yuanlfa.parallel.dp.zero import ShardedAdamW
from yuanlfa.train import train
from yuanlfa.train.optimizer import build_optimizer

STEPS = 20


def _train(
    corpus: str, tp: int = 1, sp: bool = False, sharded: bool = False, bucket: int = 40_000_000
) -> list[tuple[float, float]]:
    cfg = tiny_overrides(
        corpus,
        parallel__grad_bucket_size=bucket,
        train__steps=STEPS,
        train__micro_batch_size=1,  # 8 samples per step: accumulation on every layout
        parallel__tp=tp,
        parallel__sequence_parallel=sp,
        optim__clip_grad=0.5,
        optim__distributed=sharded,
    )
    records = train(config_from_dict(cfg), progress=False).records
    return [(r["loss"], r["grad_norm"]) for r in records]


def _layouts(rank: int, world: int, corpus: str) -> dict[str, list[tuple[float, float]]]:
    runs = {f"dp{world}": _train(corpus), f"dp{world}+zero1": _train(corpus, sharded=True)}
    if world == 4:
        # Many buckets, each reduced from the backward hooks as soon as it is complete.
        runs["dp4 small buckets"] = _train(corpus, bucket=20000)
        runs["dp4+zero1 small buckets"] = _train(corpus, sharded=True, bucket=20000)
        runs["tp2xdp2+sp+zero1"] = _train(corpus, tp=2, sp=True, sharded=True)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_dp_training_equals_one_process(small_corpus: str, world: int) -> None:
    single = _train(small_corpus)
    # Clipping is active early on (the norm starts above clip_grad = 0.5).
    assert single[0][1] > 0.5
    for rank_result in run_distributed(_layouts, world, small_corpus, timeout=600):
        for name, run in rank_result.items():
            assert len(run) == STEPS
            for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(run, single)):
                assert loss == pytest.approx(ref_loss, rel=1e-5), (name, step)
                assert norm == pytest.approx(ref_norm, rel=1e-4), (name, step)


def _state_bytes(rank: int, world: int) -> tuple[int, int]:
    cfg = config_from_dict(
        {"model": {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "vocab_size": 128}}
    ).model
    plain_model, sharded_model = create_model(cfg, 1), create_model(cfg, 1)
    plain = build_optimizer(plain_model, OptimConfig())
    sharded = ShardedAdamW(sharded_model, OptimConfig(), dist.group.WORLD)
    for model in (plain_model, sharded_model):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
    plain.step()
    sharded.reduce_gradients()
    sharded.step()
    moments = lambda opt: sum(  # noqa: E731
        t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if t.dim()
    )
    # The replicas agree after the all-gather.
    for p, q in zip(plain_model.parameters(), sharded_model.parameters()):
        torch.testing.assert_close(p, q)
    return moments(plain), moments(sharded.inner)


@pytest.mark.slow
def test_sharded_optimizer_states_are_one_dp_th() -> None:
    for world in (2, 4):
        for plain, sharded in run_distributed(_state_bytes, world):
            # Each bucket is padded to a multiple of dp: at most dp - 1 extra elements each.
            assert plain / world <= sharded <= plain / world + 4 * 2 * 4 * world


def test_bad_pipeline_layouts_are_refused_before_data(small_corpus: str, monkeypatch) -> None:
    # As torchrun would launch two processes: the checks run before the process group exists.
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = tiny_overrides(small_corpus, parallel__pp=2, parallel__pipeline_layout="Ett|txL")
    with pytest.raises(ConfigError, match="pipeline_layout"):
        train(config_from_dict(cfg), progress=False)
