"""The balancer with recompute chosen per pipeline rank: the exact best split and modes.

A rank's recompute mode changes only its own time and memory (its activations, its workspace,
its backward's extra forward), so the search of :mod:`.balance` extends directly: each rank's
candidates are its spreads under every mode, and the min-max DP over layers picks both. On a
heterogeneous cluster a small device can then recompute where it must to fit while the others
keep the cheaper mode.

Objective, lexicographic: the slowest rank's time per microbatch among the plans where every
rank fits its own device, then the slowest stage, then the most recompute any rank does (less
is better: it costs energy even off the critical path), then the largest rank memory. Each rank
then takes, among the candidates within those optima, the least recompute and memory. Tests
compare with exhaustive search over splits and modes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from yuanlfa.config import Config, ConfigError
from yuanlfa.planner.balance import (
    RankCandidates,
    _infeasible_message,
    _search,
    rank_candidates,
)
from yuanlfa.planner.cost import CostModel, PlanCost, cost_model

MODES = ("none", "selective", "full")
CRITERIA = ("time", "stage_time", "recompute", "memory")


@dataclass(frozen=True)
class RecomputePlan:
    blocks: tuple[int, ...]
    recompute: tuple[str, ...]  # per pipeline rank: train.recompute_stages
    cost: PlanCost
    model: CostModel  # the cost model of the chosen modes


def with_recompute(cfg: Config, modes: tuple[str, ...]) -> Config:
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, recompute_stages=tuple(modes))
    )


def _merged(parts: list[RankCandidates]) -> RankCandidates:
    """One rank's candidates under every mode, with the mode index of each."""

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(c, name) for c in parts])

    return RankCandidates(
        spreads=cat("spreads"),
        layers=cat("layers"),
        memory=cat("memory"),
        time=cat("time"),
        stage_time=cat("stage_time"),
        recompute=np.concatenate([np.full(len(c.layers), i) for i, c in enumerate(parts)]),
    )


def balance_recompute(
    cfg: Config,
    modes: tuple[str, ...] = MODES,
    *,
    allow_empty_stages: bool = True,
    **cost_options,
) -> RecomputePlan:
    """The exact best (split, recompute per rank) of a resolved ``cfg``; ``cost_options`` go to
    :func:`~.cost.cost_model` (device, devices, cluster, speeds, ...). ConfigError, naming the
    rank that does not fit and what would make it fit, when no plan fits."""
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise ConfigError(f"recompute modes: {bad or 'none given'}; choose from {list(MODES)}")
    pp, L, v = cfg.parallel.pp, cfg.model.num_layers, cfg.parallel.virtual_stages
    if not allow_empty_stages and pp * v > L:
        raise ConfigError(
            f"model.num_layers={L} is fewer than the {pp * v} pipeline stages; allow empty stages"
        )
    models = [cost_model(with_recompute(cfg, (m,) * pp), **cost_options) for m in modes]
    per_mode = [[rank_candidates(mdl, r, allow_empty_stages) for mdl in models] for r in range(pp)]
    ranks = [_merged(parts) for parts in per_mode]
    ok = []
    for r, c in enumerate(ranks):
        limit = models[0].limit_of(r)
        ok.append(np.ones(len(c.layers), dtype=bool) if limit is None else c.memory <= limit)
    _, choice, ok = _search(ranks, ok, CRITERIA, L)
    if choice is None:
        raise _infeasible_message(models[-1], per_mode)
    blocks = [0] * (pp * v)
    chosen = []
    for rank, (c, mask, n) in enumerate(zip(ranks, ok, choice)):
        pick = np.flatnonzero(mask & (c.layers == n))
        best = pick[np.lexsort((c.memory[pick], c.recompute[pick]))[0]]
        chosen.append(modes[int(c.recompute[best])])
        for stage, b in zip(models[0].stages_of(rank), c.spreads[best]):
            blocks[stage] = int(b)
    model = cost_model(with_recompute(cfg, tuple(chosen)), **cost_options)
    return RecomputePlan(tuple(blocks), tuple(chosen), model.evaluate(tuple(blocks)), model)
