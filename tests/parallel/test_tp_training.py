"""20 training steps of the tiny model at tp=2 and tp=4, with and without sequence parallelism,
equal one process (fp32): losses and gradient norms, step by step."""

from __future__ import annotations

import pytest

from tests.distributed.launcher import run_distributed
from tests.tiny import tiny_overrides
from yuanlfa.config import config_from_dict
from yuanlfa.train import train

STEPS = 20


def _train(
    corpus: str, tp: int, sequence_parallel: bool, recompute: str = "none"
) -> list[tuple[float, float]]:
    cfg = tiny_overrides(
        corpus,
        train__recompute=recompute,
        train__steps=STEPS,
        parallel__tp=tp,
        parallel__sequence_parallel=sequence_parallel,
        model__loss_block_size=100,
    )
    records = train(config_from_dict(cfg), progress=False).records
    return [(r["loss"], r["grad_norm"]) for r in records]


def _tp_runs(rank: int, world: int, corpus: str) -> dict[str, list[tuple[float, float]]]:
    runs = {f"sp={sp}": _train(corpus, world, sp) for sp in (False, True)}
    if world == 2:
        # Recompute re-runs the layers' collectives in backward: still the same numbers.
        runs["sp+full recompute"] = _train(corpus, world, True, "full")
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_tp_training_equals_one_process(small_corpus: str, world: int) -> None:
    single = _train(small_corpus, 1, False)
    assert single[-1][0] < single[0][0] - 1.0
    results = run_distributed(_tp_runs, world, small_corpus, timeout=600)
    for rank_result in results:
        for sp, run in rank_result.items():
            for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(run, single)):
                assert loss == pytest.approx(ref_loss, rel=1e-5), (sp, step)
                assert norm == pytest.approx(ref_norm, rel=1e-4), (sp, step)
