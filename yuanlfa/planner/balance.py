"""The pipeline balancer: the exact best block list under the cost model.

A pipeline rank's cost depends only on the layers of its own stages (s = r, r + pp, ...): its
time on their sum n_r (layers cost the same wherever they are; the embedding, head and links are
fixed per stage), its memory and its slowest stage on how n_r is spread over its v stages (each
stage's in-flight count comes from the schedule, independent of the split). So the search
separates:

1. per rank: every spread of at most L layers over its v stages, C(L + v, v) candidates, each
   with its peak memory (against the schedule's K candidate peak vectors), its time and its
   slowest stage, vectorized with numpy: O(pp * C(L + v, v) * K * v); for v = 1, pp * L;
2. over ranks: a min-max dynamic program over "layers left" choosing n_r with sum L,
   O(pp * L^2), once per criterion of the lexicographic objective, each phase keeping only the
   candidates within the earlier optima (so the result is the exact lexicographic optimum).

objective "time": minimize the slowest rank's time per microbatch among the splits where every
rank fits the memory limit, then the slowest stage (with v > 1 the stages of a rank pass the
microbatches on one after another, so an uneven spread lengthens the pipeline bubble), then the
largest rank memory.
objective "memory": minimize the largest rank memory, then the slowest rank, then the slowest
stage.
Among splits equal on every criterion the even split (layout.uniform_blocks) is preferred.
Tests compare the result with exhaustive search. 102B on PP32 (v = 1) takes well under a
second, v = 2 about a second.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from yuanlfa.config import Config, ConfigError
from yuanlfa.layout import uniform_blocks
from yuanlfa.planner.cost import CostModel, PlanCost, cost_model
from yuanlfa.planner.devices import DevicePreset

Objective = Literal["time", "memory"]
CRITERIA: dict[str, tuple[str, ...]] = {
    "time": ("time", "stage_time", "memory"),
    "memory": ("memory", "time", "stage_time"),
}
GIB = 2**30


class NoFitError(ConfigError):
    """No split fits the devices; ``short_bytes``: about how much layer state is missing
    (infinite when a rank cannot hold even its fixed parts), for ranking near misses;
    ``problem``: the message without its generic list of fixes, for callers that find a
    concrete one."""

    def __init__(self, problem: str, short_bytes: float, fixes: str = "") -> None:
        super().__init__(f"{problem}; {fixes}" if fixes else problem)
        self.problem = problem
        self.short_bytes = short_bytes


@dataclass(frozen=True)
class RankCandidates:
    """Every allowed spread of layers over one rank's stages, with its costs."""

    spreads: np.ndarray  # [C, v] layers per local stage
    layers: np.ndarray  # [C] their sum
    memory: np.ndarray  # [C] peak bytes
    time: np.ndarray  # [C] seconds per microbatch (a function of ``layers`` only)
    stage_time: np.ndarray  # [C] seconds per microbatch of the slowest of its stages
    recompute: np.ndarray | None = None  # [C] recompute mode index (:mod:`.recompute`)


@dataclass(frozen=True)
class BalanceResult:
    blocks: tuple[int, ...]
    objective: Objective
    cost: PlanCost


@functools.lru_cache(maxsize=64)
def _compositions(total: int, parts: int, low: int) -> np.ndarray:
    """Every tuple of ``parts`` integers >= ``low`` whose sum is at most ``total`` (shared by
    every rank and cost model: read-only)."""
    rows: list[tuple[int, ...]] = [()]
    for _ in range(parts):
        rows = [r + (b,) for r in rows for b in range(low, total - sum(r) + 1)]
    out = np.array(rows, dtype=np.int64).reshape(len(rows), parts)
    out.flags.writeable = False
    return out


def rank_candidates(model: CostModel, rank: int, allow_empty_stages: bool = True) -> RankCandidates:
    """The costs of every spread, computed as :meth:`CostModel.rank_memory`, ``rank_time`` and
    ``stage_time`` compute them for one spread."""
    L, v = model.num_layers, model.virtual_stages
    stages = model.stages_of(rank)
    spreads = _compositions(L, v, 0 if allow_empty_stages else 1)
    cols = np.arange(v)[None, :]
    unit = np.array([[model.microbatch_bytes(s, b) for b in range(L + 1)] for s in stages])
    params = np.array([[model.stage_params(s, b) for b in range(L + 1)] for s in stages])
    held = np.array(model.held[rank], dtype=np.int64)  # [K, v]
    activations = (unit[cols, spreads] @ held.T).max(axis=1)
    p = params[cols, spreads].sum(axis=1)
    st = model.state
    static = p * (st.weights + st.grads) - (-p * st.optimizer // st.optimizer_shards)
    layers = spreads.sum(axis=1)
    # CostModel.workspace_bytes: recompute needs a layer, the loss the last stage.
    loss = model.loss_workspace_bytes() if model.num_stages - 1 in stages else 0
    workspace = np.maximum(np.where(layers > 0, model.recompute_workspace_bytes(rank), 0), loss)
    by_layers = np.array([model.rank_time(rank, (n,) + (0,) * (v - 1)) for n in range(L + 1)])
    per_stage = np.array([[model.stage_time(s, b).total_s for b in range(L + 1)] for s in stages])
    return RankCandidates(
        spreads=spreads,
        layers=layers,
        memory=static + activations + workspace,
        time=by_layers[layers],
        stage_time=per_stage[cols, spreads].max(axis=1),
    )


def _best_per_layers(values: np.ndarray, layers: np.ndarray, ok: np.ndarray, total: int):
    """For each layer count n: the least value among the allowed candidates holding n layers."""
    best = np.full(total + 1, math.inf)
    np.minimum.at(best, layers[ok], values[ok].astype(float))
    return best.tolist()


def _minmax(costs: list[list[float]], total: int) -> tuple[float, list[int] | None]:
    """Split ``total`` over the rows (n_r for row r, sum = total) minimizing max_r costs[r][n_r];
    returns (optimum, choice), or (inf, None) when every split has an infinite cost."""
    rows = len(costs)
    inf = math.inf
    best = [[inf] * (total + 1) for _ in range(rows + 1)]
    best[rows][0] = -inf
    for r in reversed(range(rows)):
        row, nxt, cur = costs[r], best[r + 1], best[r]
        for k in range(total + 1):
            value = inf
            for n in range(k + 1):
                rest = nxt[k - n]
                cost = row[n] if row[n] > rest else rest
                if cost < value:
                    value = cost
            cur[k] = value
    optimum = best[0][total]
    if optimum == inf:
        return inf, None
    choice, left = [], total
    for r in range(rows):
        n = next(n for n in range(left + 1) if max(costs[r][n], best[r + 1][left - n]) <= optimum)
        choice.append(n)
        left -= n
    return optimum, choice


def best_blocks(
    model: CostModel, objective: Objective = "time", allow_empty_stages: bool = True
) -> tuple[int, ...]:
    """The exact best block list (see the module doc); ConfigError when nothing fits."""
    if objective not in CRITERIA:
        raise ConfigError(f"objective: {objective!r} is not one of time, memory")
    L, pp, v = model.num_layers, model.pp, model.virtual_stages
    if not allow_empty_stages and pp * v > L:
        raise ConfigError(
            f"model.num_layers={L} is fewer than the {pp * v} pipeline stages; allow empty stages"
        )
    ranks = [rank_candidates(model, r, allow_empty_stages) for r in range(pp)]
    ok = _fitting(model, ranks, objective)
    optima, choice, ok = _search(ranks, ok, CRITERIA[objective], L)
    if choice is None:
        raise _infeasible_message(model, [[c] for c in ranks])
    even = uniform_blocks(L, model.num_stages)
    if (allow_empty_stages or min(even) > 0) and _within(model, even, objective, optima):
        return even
    blocks = [0] * model.num_stages
    for rank, (c, mask, n) in enumerate(zip(ranks, ok, choice)):
        pick = np.flatnonzero(mask & (c.layers == n))
        best = pick[np.argmin(c.memory[pick])]
        for stage, b in zip(model.stages_of(rank), c.spreads[best]):
            blocks[stage] = int(b)
    return tuple(blocks)


def plan_scores(model: CostModel, blocks: tuple[int, ...]) -> dict[str, float]:
    """The balancer's criteria for one split: largest rank memory, slowest rank, slowest stage."""
    mine = [tuple(blocks[s] for s in model.stages_of(r)) for r in range(model.pp)]
    return {
        "memory": max(model.rank_memory(r, b) for r, b in enumerate(mine)),
        "time": max(model.rank_time(r, b) for r, b in enumerate(mine)),
        "stage_time": max(model.stage_time(s, b).total_s for s, b in enumerate(blocks)),
    }


def _fitting(model: CostModel, ranks: list[RankCandidates], objective: str) -> list[np.ndarray]:
    """Per rank: the candidates allowed before the search (under "time", those that fit the
    rank's own device)."""
    out = []
    for r, c in enumerate(ranks):
        limit = model.limit_of(r)
        fits = objective != "time" or limit is None
        out.append(np.ones(len(c.layers), dtype=bool) if fits else c.memory <= limit)
    return out


def _search(
    ranks: list[RankCandidates], ok: list[np.ndarray], criteria: tuple[str, ...], total: int
) -> tuple[list[float], list[int] | None, list[np.ndarray]]:
    """The lexicographic min-max over ``criteria``: each phase splits ``total`` layers over the
    ranks by the min-max DP and keeps only the candidates within its optimum. Returns the
    optima, the layers per rank, and the candidates left; choice None when nothing is allowed."""
    optima: list[float] = []
    choice: list[int] | None = None
    for criterion in criteria:
        costs = [
            _best_per_layers(getattr(c, criterion), c.layers, mask, total)
            for c, mask in zip(ranks, ok)
        ]
        optimum, choice = _minmax(costs, total)
        if choice is None:
            return optima, None, ok
        optima.append(optimum)
        ok = [mask & (getattr(c, criterion) <= optimum) for c, mask in zip(ranks, ok)]
    return optima, choice, ok


def _within(model: CostModel, blocks: tuple[int, ...], objective: str, optima: list) -> bool:
    scores = plan_scores(model, blocks)
    if objective == "time":  # each rank within its own device's limit
        for r in range(model.pp):
            limit = model.limit_of(r)
            mine = tuple(blocks[s] for s in model.stages_of(r))
            if limit is not None and model.rank_memory(r, mine) > limit:
                return False
    return all(scores[c] <= opt for c, opt in zip(CRITERIA[objective], optima))


def _room(model: CostModel, ranks: list[list[RankCandidates]]) -> list[int]:
    """Per rank: the most layers it can hold within its own limit under any of its candidate
    sets (recompute modes); -1 when not even its fixed parts fit."""
    room = []
    for r, variants in enumerate(ranks):
        limit = model.limit_of(r)
        most = -1
        for c in variants:
            fit = c.layers[c.memory <= limit] if limit is not None else c.layers
            most = max(most, int(fit.max()) if len(fit) else -1)
        room.append(most)
    return room


def _size(nbytes: float) -> str:
    return f"{nbytes / GIB:.0f} GiB" if nbytes >= 10 * GIB else f"{nbytes / 2**20:.1f} MiB"


def _infeasible_message(model: CostModel, ranks: list[list[RankCandidates]]) -> NoFitError:
    """What does not fit, by rank and device, and the smallest change that would make it fit."""
    room = _room(model, ranks)
    L = model.num_layers
    fixes = (
        "set train.recompute=full, optim.distributed=true with dp > 1, a smaller "
        "train.micro_batch_size or a larger parallel.pp/tp, or use devices with more memory"
    )
    full = model.cfg.train.recompute == "full" or len(ranks[0]) > 1
    if full:
        fixes = fixes.replace("set train.recompute=full, ", "set ")
    bad = [r for r, n in enumerate(room) if n < 0]
    if bad:
        r = bad[0]
        c = min(ranks[r], key=lambda c: c.memory.min())
        need = float(c.memory.min())
        limit = model.limit_of(r) or 0
        return NoFitError(
            f"pipeline rank {r} ({model.device_of(r).name}, {_size(limit)}) cannot hold "
            f"even its fixed parts (embedding / head) with no layers: needs {_size(need)}, "
            f"{_size(need - limit)} more",
            math.inf,
            fixes,
        )
    short = L - sum(room)
    kinds: dict[str, list[int]] = {}
    for r, n in enumerate(room):
        kinds.setdefault(model.device_of(r).name, []).append(n)
    held = ", ".join(f"{len(ns)} x {name}: {min(ns)}-{max(ns)}" for name, ns in kinds.items())
    # A layer's state on the roomiest rank: what each missing layer needs somewhere.
    r = max(range(model.pp), key=lambda r: model.limit_of(r) or 0)
    per_layer = sum(model.state.of(model.stage_params(r, 1) - model.stage_params(r, 0)))
    return NoFitError(
        f"no split of {L} layers over {model.pp} pipeline ranks fits each rank's own device: "
        f"together they hold at most {sum(room)} layers (per rank {held}), {short} short, about "
        f"{_size(short * per_layer)} of layer state more",
        short * per_layer,
        fixes,
    )


def balance(
    cfg: Config,
    device: DevicePreset | None = None,
    objective: Objective = "time",
    *,
    allow_empty_stages: bool = True,
    require_fit: bool = True,
    model: CostModel | None = None,
    **cost_options,
) -> BalanceResult:
    """Balance a resolved ``cfg`` for ``device`` (None: no memory limit). ``cost_options`` go to
    :func:`~yuanlfa.planner.cost.cost_model`. With ``require_fit`` a result over the memory
    limit (possible with objective "memory") raises ConfigError naming the fixes."""
    model = model if model is not None else cost_model(cfg, device, **cost_options)
    blocks = best_blocks(model, objective, allow_empty_stages)
    cost = model.evaluate(blocks)
    if require_fit and not cost.fits:
        ranks = [[rank_candidates(model, r, allow_empty_stages)] for r in range(model.pp)]
        raise _infeasible_message(model, ranks)
    return BalanceResult(blocks, objective, cost)


def auto_blocks(
    cfg: Config, device: DevicePreset | None = None, objective: Objective = "time"
) -> tuple[int, ...]:
    """The split for ``parallel.pipeline_blocks: auto``: without a device, the time-optimal
    split with no memory limit; with one, the best split that fits it."""
    return balance(cfg, device, objective).blocks
