"""Emulated heterogeneous pipelines (yuanlfa/parallel/pp/pacing.py, yuanlfa/train/emulate.py):
a paced op at speed 0.5 takes twice the wall time per CPU second of one at 1, whatever else
runs on the cores; pacing changes times only (a paced pipeline trains bitwise like an unpaced
one); a rank's memory budget is held before the first step by the plan (naming the smallest
change that fits) and after each step by the trainer's own accounting."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from tests.distributed.launcher import run_distributed
from tests.planner.test_heterogeneous import groups
from tests.tiny import tiny_overrides
from yuanlfa.config import ConfigError, config_from_dict, resolve
from yuanlfa.model import create_model
from yuanlfa.parallel.pp.pacing import Pacer
from yuanlfa.planner.cluster_plan import cluster_plan, emulated_speeds, memory_budgets
from yuanlfa.planner.cost import cost_model
from yuanlfa.planner.recompute import with_recompute
from yuanlfa.train import train
from yuanlfa.train.emulate import (
    MemoryBudget,
    MemoryBudgetExceeded,
    busy_summary,
    predicted_busy,
)
from yuanlfa.train.setup import prepare_config


def _work(n: int = 96) -> torch.Tensor:
    a = torch.randn(n, n)
    for _ in range(40):
        a = torch.tanh(a @ a / n)
    return a


def test_pacing_stretches_each_op_by_its_speed() -> None:
    torch.set_num_threads(1)
    _work()  # first-call allocations out of the timing
    ratios = {}
    # Pace 8: an op stays within its emulated time while its process gets 1/8 of a core (a
    # load of 16 on 2 cores).
    for speed in (1.0, 0.5):
        pacer = Pacer(pace=8, speed=speed)
        op = pacer.wrap(_work)
        began = time.perf_counter()
        for _ in range(5):
            op()
        wall = time.perf_counter() - began  # the caller's clock, not the pacer's own count
        assert pacer.ops == 5
        ratios[speed] = wall / pacer.cpu_s  # wall seconds per CPU second of the same work
    assert ratios[1.0] == pytest.approx(8, rel=0.15)
    # The comparison asked for: half speed takes twice the wall time per op's work.
    assert ratios[0.5] / ratios[1.0] == pytest.approx(2, rel=0.15)
    with pytest.raises(ValueError, match="speed"):
        Pacer(4, 0)
    with pytest.raises(ValueError, match="pace"):
        Pacer(0.5)


def _cfg(corpus: str, **emulate: object) -> dict:
    data = tiny_overrides(
        corpus,
        model__num_layers=4,
        parallel__pp=2,
        parallel__pipeline_blocks=[1, 3],
        train__steps=4,
        train__micro_batch_size=2,
        train__eval_interval=0,
        train__eval_iters=0,
    )
    data["emulate"] = emulate
    data["logging"]["log_interval"] = 1
    return data


def _paced_and_not(rank: int, world: int, corpus: str) -> dict:
    plain = train(config_from_dict(_cfg(corpus)), progress=False).records
    dist.barrier()
    paced = train(
        config_from_dict(_cfg(corpus, pace=2, speeds=[1.0, 0.5], memory_gib=[1.0, 1.0])),
        progress=False,
    ).records
    return {"plain": plain, "paced": paced}


@pytest.mark.slow
def test_paced_pipeline_trains_bitwise_like_an_unpaced_one(small_corpus: str) -> None:
    results = run_distributed(_paced_and_not, 2, small_corpus, timeout=300)
    last = results[1]  # the rank holding the loss
    plain, paced = last["plain"], last["paced"]
    assert len(plain) == len(paced) == 4
    for a, b in zip(plain, paced, strict=True):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"])
    # Each step's record carries the plan's prediction next to the measurement, per rank.
    assert "predicted_busy_s" not in plain[0]
    assert len(paced[0]["predicted_busy_s"]) == 2 == len(paced[0]["stage_busy_s"])
    assert "pipeline rank 1:" in busy_summary(paced)


def _two_rank(**emulate: object) -> dict:
    return {
        "model": {"num_layers": 8, "hidden_size": 64, "num_heads": 4, "vocab_size": 512},
        "parallel": {"pp": 2, "pipeline_blocks": [4, 4]},
        "train": {"device": "cpu", "micro_batch_size": 2, "global_batch_size": 8},
        "emulate": emulate,
    }


def test_a_budget_that_the_plan_overfills_names_the_smallest_fix() -> None:
    cfg = resolve(config_from_dict(_two_rank()), 2)
    need = [cost_model(with_recompute(cfg, (m, m)), gpu=False).evaluate((4, 4)).ranks[0]
            for m in ("none", "full")]  # fmt: skip
    # Between rank 0's need with full recompute and without: recompute on rank 0 alone fits.
    gib = (need[0].memory_bytes + need[1].memory_bytes) / 2 / 2**30
    tight = resolve(config_from_dict(_two_rank(memory_gib=[gib, 8.0])), 2)
    assert memory_budgets(tight)[0] == int(gib * 2**30)
    with pytest.raises(ConfigError) as err:
        cluster_plan(tight)
    message = str(err.value)
    assert "\n" not in message
    assert "pipeline rank 0 (4 layers" in message and "emulate.memory_gib" in message
    assert "it fits with train.recompute_stages=" in message
    assert "'none']" in message  # rank 1 keeps its activations
    # With auto the balancer fits the budget itself.
    data = _two_rank(memory_gib=[gib, 8.0])
    data["parallel"]["pipeline_blocks"] = "auto"
    auto = resolve(config_from_dict(data), 2)
    plan = cluster_plan(auto)
    assert plan.model.evaluate(plan.blocks).fits


def test_speeds_and_budgets_come_from_the_cluster_section() -> None:
    data = _two_rank()
    data["cluster"] = groups(
        ("fast", 1, 1, {"memory_gib": 3, "tflops": 2}),
        ("slow", 1, 1, {"memory_gib": 1, "tflops": 1}),
    )
    cfg = resolve(config_from_dict(data), 2)
    assert emulated_speeds(cfg) == (1.0, 0.5)
    assert memory_budgets(cfg) == (3 * 2**30, 2**30)
    gpu = resolve(config_from_dict({**data, "train": {**data["train"], "device": "auto"}}), 2)
    assert memory_budgets(gpu) == (None, None)  # a GPU holds its own limit
    given = resolve(config_from_dict({**data, "emulate": {"speeds": [0.5, 1.0]}}), 2)
    assert emulated_speeds(given) == (0.5, 1.0)
    # The plan's busy times follow a measured sustained rate of the fastest device.
    busy = [
        predicted_busy(resolve(config_from_dict({**data, "emulate": {"tflops": t}}), 2))
        for t in (0.02, 0.01)
    ]
    assert [b / a for a, b in zip(*busy)] == pytest.approx([2, 2], rel=0.01)


@pytest.mark.parametrize(
    ("emulate", "parallel", "match"),
    [
        ({"pace": 0.5}, {}, "emulate.pace: 0 .off. or >= 1"),
        ({"pace": 2}, {"tp": 2}, "emulate.pace: emulates pipelines without tp, cp, dp or islands"),
        ({"speeds": [1.0]}, {}, r"emulate.speeds: one entry per pipeline rank \(parallel.pp=2\)"),
        ({"speeds": [1.0, 1.5]}, {}, "emulate.speeds: each a fraction in"),
        ({"memory_gib": [1, 0]}, {}, "emulate.memory_gib: each must be > 0"),
        ({"memory_gib": [1]}, {"pp": 1, "pipeline_blocks": None}, "train.device_memory_gb"),
    ],
)
def test_bad_emulate_settings(emulate: dict, parallel: dict, match: str) -> None:
    data = _two_rank(**emulate)
    data["parallel"] = {**data["parallel"], **parallel}
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data)


def test_measured_peak_over_the_budget_stops_the_run() -> None:
    cfg = resolve(config_from_dict({**_two_rank(), "parallel": {}}), 1)
    model = create_model(cfg.model, seed=0)
    optimizer = torch.optim.AdamW(model.parameters())
    budget = MemoryBudget(2**40, 0, model)
    tokens = torch.randint(0, 512, (2, 32))
    with budget.watch():
        model(tokens, torch.arange(32).expand(2, 32), labels=tokens).sum().backward()
    optimizer.step()
    m = budget.measured(optimizer)
    # Counted independently: fp32 weights, their gradients, Adam's two moments (+ step counts).
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert m["weights"] == weights and m["grads"] == weights
    assert 2 * weights <= m["optimizer"] <= 2 * weights + 8 * len(optimizer.state)
    assert m["activations"] > 0
    budget.check(optimizer, 1)  # within
    budget.budget_bytes = m["total"] - 1
    with pytest.raises(MemoryBudgetExceeded, match=r"step 3: pipeline rank 0 held .* budget"):
        budget.check(optimizer, 3)


@pytest.mark.parametrize(
    ("group", "match"),
    [
        ({"device": "h100-81g"}, r"'h100-81g' is not a known device kind; use one of h100-80g"),
        ({"device": "h100-80g", "devices_per_node": 8}, "8 devices but the run has 4 processes"),
        (
            {"device": "tiny", "memory_gib": 1e-4, "tflops": 1},
            r"pipeline rank 0 \(tiny, 0.1 MiB\) cannot hold even its fixed parts .* MiB more",
        ),
    ],
)
def test_bad_clusters_are_refused_before_any_step(monkeypatch, group: dict, match: str) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    data = _two_rank()
    data["parallel"] = {"pp": 4, "pipeline_blocks": "auto"}
    data["data"] = {"tokenizer": "byte"}
    data["model"]["vocab_size"] = None
    data["cluster"] = {"groups": [{"nodes": 1, "devices_per_node": 4, **group}]}
    with pytest.raises(ConfigError, match=match) as err:
        prepare_config(config_from_dict(data))
    assert "\n" not in str(err.value)
