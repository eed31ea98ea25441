"""What training settles before any data is read: a cluster's plan (split and per-rank
recompute) is the one every rank runs, `auto` is pinned to one split for the fit check and the
trainer alike, and a microbatch count the schedule cannot run is refused up front."""

from __future__ import annotations

import pytest
import torch

from tests.planner.test_heterogeneous import groups
from yuanlfa.config import ConfigError, config_from_dict
from yuanlfa.planner.cluster_plan import cluster_plan
from yuanlfa.train.setup import pin_split, prepare_config


def _cfg(**parallel) -> dict:
    return {
        "model": {"num_layers": 8, "hidden_size": 64, "num_heads": 4, "vocab_size": None},
        "parallel": {"pp": 2, **parallel},
        "data": {"tokenizer": "byte"},
        "train": {"device": "cpu", "micro_batch_size": 1, "global_batch_size": 4},
    }


def test_a_cluster_section_runs_its_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    data = _cfg(pipeline_blocks="auto")
    data["cluster"] = groups(("h100-80g", 1, 1), ("a100-40g", 1, 1))
    cfg = prepare_config(config_from_dict(data))
    plan = cluster_plan(cfg)
    assert plan is not None
    assert cfg.parallel.pipeline_blocks == tuple(plan.blocks)
    assert cfg.train.recompute_stages == tuple(plan.recompute)
    # The faster device takes more layers (H100 first in rank order).
    assert plan.blocks[0] > plan.blocks[1]


def test_auto_is_pinned_once_and_explicit_splits_are_kept(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = prepare_config(config_from_dict(_cfg(pipeline_blocks="auto")))
    pinned = pin_split(cfg, torch.device("cpu"))
    blocks = pinned.parallel.pipeline_blocks
    assert isinstance(blocks, tuple) and sum(blocks) == 8 and len(blocks) == 2
    given = prepare_config(config_from_dict(_cfg(pipeline_blocks=[3, 5])))
    assert pin_split(given, torch.device("cpu")) is given


def test_a_schedule_that_cannot_run_the_microbatches_is_refused_up_front(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    # DualPipeV needs at least as many microbatches as stages (4 here), and gets 2.
    data = _cfg(virtual_stages=2, schedule="dualpipev", pipeline_blocks=[2, 2, 2, 2])
    data["train"]["global_batch_size"] = 2
    with pytest.raises(ConfigError, match="dualpipev needs at least 4 microbatches"):
        prepare_config(config_from_dict(data))
