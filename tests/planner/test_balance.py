"""The balancer: valid, feasible, never worse than uniform, and equal to exhaustive search."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest

from yuanlfa.config import Config, ConfigError, config_from_dict, load_config, resolve
from yuanlfa.layout import uniform_blocks
from yuanlfa.planner import (
    CostModel,
    auto_blocks,
    balance,
    best_blocks,
    cost_model,
    get_device,
    stage_memory,
)

ROOT = Path(__file__).resolve().parents[2]


def small(layers: int, pp: int, v: int = 1, vocab: int = 2048, **train) -> Config:
    data = {
        "model": {"num_layers": layers, "hidden_size": 64, "num_heads": 4, "vocab_size": vocab},
        "parallel": {
            "pp": pp,
            "dp": 1,
            "virtual_stages": v,
            "pipeline_blocks": "auto",
            "schedule": "interleaved_1f1b" if v > 1 else "1f1b",
        },
        "train": {
            "micro_batch_size": 2,
            "global_batch_size": 16,
            "seq_length": 64,
            "precision": "bf16",
            **train,
        },
    }
    return resolve(config_from_dict(data), pp)


def splits(layers: int, stages: int, low: int = 0):
    for cut in itertools.product(range(low, layers + 1), repeat=stages - 1):
        if sum(cut) <= layers - low:
            yield (*cut, layers - sum(cut))


def scores(model: CostModel, blocks: tuple[int, ...]) -> dict[str, float]:
    """Largest rank memory, slowest rank, slowest stage: from the cost model's per-rank and
    per-stage functions, one split at a time."""
    memory, times = [], []
    for r in range(model.pp):
        mine = tuple(blocks[s] for s in model.stages_of(r))
        memory.append(model.rank_memory(r, mine))
        times.append(model.rank_time(r, mine))
    stage = max(model.stage_time(s, b).total_s for s, b in enumerate(blocks))
    return {"memory": max(memory), "time": max(times), "stage": stage}


def key(model: CostModel, blocks: tuple[int, ...], objective: str) -> tuple[float, ...]:
    """What the objective minimizes, lexicographically (see yuanlfa.planner.balance)."""
    s = scores(model, blocks)
    if objective == "time":
        return (s["time"], s["stage"], s["memory"])
    return (s["memory"], s["time"], s["stage"])


def exhaustive(model: CostModel, objective: str, low: int = 0) -> tuple[float, ...]:
    limit = model.memory_limit_bytes
    best = None
    for blocks in splits(model.num_layers, model.num_stages, low):
        if objective == "time" and limit is not None and scores(model, blocks)["memory"] > limit:
            continue
        k = key(model, blocks, objective)
        best = k if best is None or k < best else best
    return best


CASES = [
    # layers, pp, v, extra train settings
    (6, 3, 1, {}),
    (7, 3, 1, {"recompute": "selective"}),
    (8, 4, 1, {"global_batch_size": 4}),
    (5, 2, 1, {"recompute": "full"}),
    (6, 2, 2, {}),
    (7, 2, 2, {"recompute": "full", "global_batch_size": 8}),
    (7, 3, 1, {"recompute_stages": ["full", "selective", "none"]}),
]


@pytest.mark.parametrize("layers,pp,v,train", CASES)
@pytest.mark.parametrize("objective", ["time", "memory"])
@pytest.mark.parametrize("binding", [False, True])
def test_equals_exhaustive_search(layers, pp, v, train, objective: str, binding: bool) -> None:
    cfg = small(layers, pp, v, **train)
    limit = None
    if binding:
        # Between the best and worst achievable maxima: the limit rules some splits out.
        free = cost_model(cfg)
        maxima = sorted(scores(free, b)["memory"] for b in splits(layers, pp * v))
        limit = int(maxima[len(maxima) // 3])
    model = cost_model(cfg, memory_limit_bytes=limit)
    blocks = best_blocks(model, objective)
    assert len(blocks) == pp * v and sum(blocks) == layers and min(blocks) >= 0
    assert key(model, blocks, objective) == exhaustive(model, objective)
    if objective == "time" and limit is not None:
        assert scores(model, blocks)["memory"] <= limit


@pytest.mark.parametrize("layers,pp,v,train", CASES[:3] + CASES[4:5])
def test_without_empty_stages(layers, pp, v, train) -> None:
    model = cost_model(small(layers, pp, v, **train))
    for objective in ("time", "memory"):
        blocks = best_blocks(model, objective, allow_empty_stages=False)
        assert min(blocks) >= 1 and sum(blocks) == layers
        assert key(model, blocks, objective) == exhaustive(model, objective, low=1)


def test_evaluate_agrees_with_the_balancer_functions() -> None:
    model = cost_model(small(7, 2, 2))
    for blocks in [(1, 2, 3, 1), (0, 0, 4, 3), (2, 2, 2, 1)]:
        plan = model.evaluate(blocks)
        s = scores(model, blocks)
        assert (plan.memory_max_bytes, plan.time_max_s) == (s["memory"], s["time"])


@pytest.mark.parametrize(
    "path,sets",
    [
        ("configs/paper-24l-pp8.yaml", []),
        ("configs/yuan2-51b.yaml", ["parallel.dp=3", "train.recompute=selective"]),
        ("configs/yuan2-102b.yaml", ["train.recompute=full"]),
        ("configs/yuan2-102b.yaml", []),
    ],
)
def test_never_worse_than_uniform(path: str, sets: list[str]) -> None:
    cfg = load_config(ROOT / path, sets)
    p = cfg.parallel
    cfg = resolve(cfg, p.tp * p.pp * (p.dp or 1))
    model = cost_model(cfg, get_device("H100-SXM"))
    uniform = model.evaluate(uniform_blocks(cfg.model.num_layers, model.num_stages))
    start = time.perf_counter()
    memory = balance(cfg, objective="memory", require_fit=False, model=model).cost
    assert time.perf_counter() - start < 10
    assert memory.memory_max_bytes <= uniform.memory_max_bytes
    if memory.fits:
        timed = balance(cfg, objective="time", model=model).cost
        assert timed.fits
        assert timed.time_max_s <= uniform.time_max_s or not uniform.fits
        assert sum(timed.blocks) == cfg.model.num_layers and len(timed.blocks) == p.pp


def test_infeasible_names_the_fix() -> None:
    # The preset without its recompute does not fit (docs/presets.md).
    cfg = resolve(load_config(ROOT / "configs/yuan2-102b.yaml", ["train.recompute=none"]), 96)
    with pytest.raises(ConfigError, match="recompute") as err:
        balance(cfg, get_device("H100-SXM"), "time")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="fits"):
        balance(cfg, get_device("H100-SXM"), "memory")


def test_head_only_last_stage_when_it_helps() -> None:
    """A vocabulary far larger than the layers makes the head worth a stage of its own."""
    cfg = small(6, 3, vocab=65536)
    blocks = best_blocks(cost_model(cfg), "time")
    assert blocks[-1] == 0
    no_empty = best_blocks(cost_model(cfg), "time", allow_empty_stages=False)
    assert min(no_empty) == 1


def test_auto_blocks_for_the_trainer() -> None:
    cfg = small(8, 4)
    blocks = auto_blocks(cfg)
    assert len(blocks) == 4 and sum(blocks) == 8
    assert blocks == best_blocks(cost_model(cfg), "time")
    # parallel.pipeline_blocks: auto resolves through the balancer for the static memory too.
    assert [s.layers for s in stage_memory(cfg, 1)] == list(blocks)
    limited = auto_blocks(cfg, get_device("cpu"), "memory")
    assert sum(limited) == 8


def test_interleaved_time_split_keeps_the_pipeline_short() -> None:
    """With v > 1 the time objective spreads a rank's layers over its stages (an all-in-one-chunk
    spread has the same per-rank time but a far longer schedule)."""
    cfg = small(16, 2, 2, recompute="full", global_batch_size=32)
    model = cost_model(cfg)
    blocks = best_blocks(model, "time")
    balanced = model.evaluate(blocks)
    lopsided = model.evaluate((0, 0, blocks[0] + blocks[2], blocks[1] + blocks[3]))
    assert balanced.time_max_s == lopsided.time_max_s
    assert balanced.step_time_s < lopsided.step_time_s
    assert max(balanced.blocks) <= 5


def test_interleaved_102b_runs_in_seconds() -> None:
    cfg = load_config(
        ROOT / "configs/yuan2-102b.yaml",
        [
            "parallel.pp=8",
            "parallel.virtual_stages=2",
            "parallel.schedule=interleaved_1f1b",
            "parallel.pipeline_blocks=auto",
            "train.recompute=full",
            "train.recompute_method=uniform",  # every layer, not the preset's block of 2
            "train.recompute_num_layers=1",
        ],
    )
    cfg = resolve(cfg, 24)
    start = time.perf_counter()
    result = balance(cfg, get_device("H200"), "time")
    assert time.perf_counter() - start < 10
    assert len(result.blocks) == 16 and sum(result.blocks) == 84
    assert result.cost.fits
