"""Data parallelism (alone and with tensor parallelism) equals one process over 20 steps, with
gradient accumulation and clipping active."""

from __future__ import annotations

import pytest

from tests.distributed.launcher import run_distributed
from tests.tiny import tiny_overrides
from yuanlfa.config import ConfigError, config_from_dict
from yuanlfa.train import train

STEPS = 20


def _train(corpus: str, tp: int = 1, sp: bool = False) -> list[tuple[float, float]]:
    cfg = tiny_overrides(
        corpus,
        train__steps=STEPS,
        train__micro_batch_size=1,  # 8 samples per step: accumulation on every layout
        parallel__tp=tp,
        parallel__sequence_parallel=sp,
        optim__clip_grad=0.5,
    )
    records = train(config_from_dict(cfg), progress=False).records
    return [(r["loss"], r["grad_norm"]) for r in records]


def _layouts(rank: int, world: int, corpus: str) -> dict[str, list[tuple[float, float]]]:
    runs = {f"dp{world}": _train(corpus)}
    if world == 4:
        runs["tp2xdp2+sp"] = _train(corpus, tp=2, sp=True)
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


def _sharded_optimizer(rank: int, world: int, corpus: str) -> str:
    cfg = tiny_overrides(corpus, train__steps=1, optim__distributed=True)
    try:
        train(config_from_dict(cfg), progress=False)
    except ConfigError as exc:
        return str(exc)
    return "no error"


@pytest.mark.slow
def test_unavailable_layouts_are_refused(small_corpus: str) -> None:
    messages = run_distributed(_sharded_optimizer, 2, small_corpus)
    assert all("optim.distributed" in m for m in messages)
    cfg = tiny_overrides(small_corpus, train__steps=1, parallel__pp=2)
    with pytest.raises(ConfigError, match="parallel"):
        train(config_from_dict(cfg), progress=False)
