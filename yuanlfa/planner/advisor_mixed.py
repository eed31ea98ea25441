"""The layout advisor on a heterogeneous cluster (:class:`~.cluster.MixedCluster`).

On top of the homogeneous advisor's choices (:mod:`.advisor`: tp x pp x dp, schedule, ZeRO,
sequence parallelism, rank order), a layout here also fixes which device group comes first in
rank order, i.e. which pipeline stages run on which kind of device (every order of the distinct
groups is tried), and recompute is chosen per pipeline rank by the balancer
(:mod:`.recompute`), so a small device recomputes where it must and a large one does not. A
tensor-parallel group must lie inside one node of one kind (tp's collectives run every layer; a
group across kinds would run at the slower one's pace and across nodes at the network's), so
other layouts are rejected.

Bounding as in the homogeneous advisor: a layout's step time is at least m times the least
slowest-rank time any split could reach, the continuous relaxation of the balancer's min-max
over ranks of different speeds (ranks computing at their own speed with no recompute), plus the
dp reduction of an average rank. Layouts are balanced in the order of that bound until it
exceeds the ``top``-th best found.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

from yuanlfa.config import Config, ConfigError
from yuanlfa.planner.advisor import (
    Advice,
    Ranked,
    _reason,
    _total_params,
    apply_layout,
    candidate_layouts,
)
from yuanlfa.planner.balance import NoFitError
from yuanlfa.planner.cluster import MixedCluster, mixed_cluster, pipeline_devices, tp_mixed
from yuanlfa.planner.cost import CostModel, cost_model
from yuanlfa.planner.devices import DEFAULT_MFU, GIB
from yuanlfa.planner.recompute import balance_recompute, with_recompute
from yuanlfa.planner.topology import link_plan

PER_RANK = "per-rank"


def relaxed_bound_s(model: CostModel) -> float:
    """Least step time of any split (see the module doc): with a_r rank r's time per layer and
    c_r its fixed parts, max_r (c_r + n_r a_r) over real n_r >= 0 summing to L is at least the
    T with sum_r (T - c_r) / a_r = L."""
    L = model.num_layers
    a = [model.layer_time(r).total_s for r in range(model.pp)]
    c = [sum(model.stage_time(s, 0).total_s for s in model.stages_of(r)) for r in range(model.pp)]
    T = (L + sum(ci / ai for ci, ai in zip(c, a))) / sum(1 / ai for ai in a)
    T = max(T, max(c))
    average = _total_params(model) // model.pp
    return model.num_microbatches * T + model.dp_comm_s(average)


def mixed_cluster_config(cfg: Config, order: tuple[int, ...]) -> Config:
    """``cfg`` with its cluster groups in ``order``."""
    groups = tuple(cfg.cluster.groups[i] for i in order)
    return dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, groups=groups))


def advise_mixed(
    cfg: Config,
    cluster: MixedCluster,
    *,
    top: int = 10,
    mfu: float = DEFAULT_MFU,
    memory_limit_bytes: int | None = None,
    tokenizer_vocab: int | None = None,
) -> Advice:
    """Rank the layouts of ``cfg`` (loaded, its ``cluster`` section describing ``cluster``) on
    the mixed cluster. ConfigError when none fits, naming the leanest one's shortfall."""
    if top < 1:
        raise ConfigError(f"--top: must be >= 1, got {top}")
    world = cluster.world_size
    rejected: Counter[str] = Counter()
    bounded = []
    seen: set = set()
    for base in candidate_layouts(world, cfg.model.num_layers):
        if base.recompute != "none":  # recompute is the balancer's, per rank
            continue
        if base.dp > 1 and not base.distributed:
            rejected["dominated: the distributed optimizer is as fast and leaner"] += 1
            continue
        try:
            resolved = apply_layout(cfg, base, tokenizer_vocab=tokenizer_vocab)
        except ConfigError as exc:
            rejected[_reason(exc)] += 1
            continue
        for order in cluster.group_orders():
            ordered = cluster.reordered(order)
            lay = dataclasses.replace(base, recompute=PER_RANK, groups=order)
            if tp_mixed(ordered, lay.tp, lay.pp, lay.dp, lay.rank_order):
                rejected["tp across nodes or device kinds"] += 1
                continue
            links = link_plan(ordered, lay.tp, lay.pp, lay.dp, lay.rank_order)
            devices = pipeline_devices(ordered, lay.tp, lay.pp, lay.dp, lay.rank_order)
            key = (dataclasses.replace(lay, rank_order="", groups=()), links, devices)
            if key in seen:
                continue
            seen.add(key)
            # The device kind decides precision and the collectives' backend, as with one
            # device (cost_model's default follows train.device, for the trainer's own plan).
            options = {"devices": devices, "links": links, "mfu": mfu, "gpu": devices[0].gpu}
            options["memory_limit_bytes"] = memory_limit_bytes
            model = cost_model(resolved, **options)
            static = sum(model.state.of(_total_params(model)))
            if static > sum(model.limit_of(r) for r in range(model.pp)):
                rejected["does not fit device memory"] += 1
                continue
            bound = relaxed_bound_s(model)
            bounded.append((bound, len(bounded), lay, resolved, options, order))
    if not bounded:
        reasons = Counter({k: n for k, n in rejected.items() if not k.startswith("dominated")})
        why = "; ".join(f"{k} ({n}x)" for k, n in reasons.most_common(3))
        raise ConfigError(
            f"no layout of {cfg.model.num_layers} layers fits {cluster.describe()}: {why}; add "
            "nodes with more memory or lower train.micro_batch_size / train.seq_length"
        )
    bounded.sort(key=lambda item: (item[0], item[1]))
    ranked: list[Ranked] = []
    balanced = 0
    closest: tuple[float, str, str] | None = None  # (GiB short, layout, why) of a near miss
    for bound, _, lay, resolved, options, order in bounded:
        if len(ranked) >= top and bound > ranked[top - 1].step_time_s:
            break
        balanced += 1
        try:
            plan = balance_recompute(resolved, **options)
        except NoFitError as exc:
            rejected["does not fit device memory"] += 1
            if closest is None or exc.short_bytes < closest[0]:
                closest = (exc.short_bytes, lay.describe(), str(exc))
            continue
        final = apply_layout(cfg, dataclasses.replace(lay, recompute="none"), plan.blocks,
                             tokenizer_vocab)  # fmt: skip
        final = mixed_cluster_config(with_recompute(final, plan.recompute), order)
        ranked.append(Ranked(lay, plan.cost, plan.model.links, final))
        ranked.sort(key=lambda r: (r.step_time_s, r.plan.memory_max_bytes))
    if not ranked:
        near = f"the closest, {closest[1]}: {closest[2]}" if closest else "none was balanced"
        raise ConfigError(
            f"no layout of {cfg.model.num_layers} layers fits {cluster.describe()} (more "
            f"devices or more memory per device would); {near}"
        )
    return Advice(tuple(ranked[:top]), cluster, len(seen), balanced, dict(rejected))


def stage_table(r: Ranked) -> list[dict]:
    """Per pipeline rank of a ranked layout: its device, layers, recompute, memory and limit."""
    plan, cfg = r.plan, r.cfg
    devices = plan_devices(r)
    modes = cfg.train.recompute_per_rank(plan.pp)
    return [
        {
            "pipeline_rank": rc.rank,
            "device": devices[rc.rank].name,
            "layers": rc.layers,
            "recompute": modes[rc.rank],
            "memory_gib": rc.memory_bytes / GIB,
            "limit_gib": (plan.limit_of(rc.rank) or math.inf) / GIB,
            "time_per_microbatch_s": rc.time_s,
        }
        for rc in plan.ranks
    ]


def plan_devices(r: Ranked) -> tuple:
    p = r.cfg.parallel
    return pipeline_devices(mixed_cluster(r.cfg.cluster), p.tp, p.pp, p.dp or 1, p.rank_order)
