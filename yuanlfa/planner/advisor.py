"""The layout advisor: every way to lay a config out on a cluster, ranked by predicted step time.

A layout is tp x pp x dp = the cluster's devices, a schedule (1f1b; with pp > 1 also
interleaved 1F1B and zero bubble with 2 stages per rank), activation recompute (none, selective,
full), the distributed optimizer (with dp > 1), sequence parallelism (with tp > 1) and the rank
order (which decides the links each group uses, :mod:`.topology`). Each layout gets the
balancer's time-optimal split that fits the device memory (:mod:`.balance`) and is costed on the
cluster's links (:mod:`.cost`).

The search stays fast by bounding: a layout's step time is at least m / pp times the sum of all
its stages' per-microbatch times (the busiest pipeline rank carries at least the average,
whatever the split; with 1F1B or GPipe also the pipeline's fill and drain, see
:func:`lower_bound_s`) plus the dp reduction of an average rank, computed without balancing.
Layouts are balanced in the order of that bound and the search stops once the bound exceeds the
``top``-th best step time found. A layout whose static memory spread evenly over its pipeline
ranks already exceeds the limit is rejected unbalanced. Two kinds of layouts are skipped as
dominated: without the distributed optimizer (with dp > 1 it moves no more bytes and holds
less), and with more recompute than a variant of the same layout that already fits (recompute
only adds work; it can win only where memory forces a worse split, a case not chased).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from dataclasses import dataclass

from yuanlfa.config import Config, ConfigError, config_to_dict, resolve, validate
from yuanlfa.layout.schedules import schedule_spec
from yuanlfa.planner.balance import balance
from yuanlfa.planner.cost import CostModel, PlanCost, cost_model
from yuanlfa.planner.devices import DEFAULT_MFU, DevicePreset
from yuanlfa.planner.memory import layer_params
from yuanlfa.planner.topology import Cluster, LinkPlan, link_plan

GIB = 2**30
RECOMPUTE = ("none", "selective", "full")
RANK_ORDERS = ("tp-dp-pp", "tp-pp-dp", "dp-tp-pp")
# (schedule, stages per rank) tried with pp > 1; pp = 1 runs no pipeline schedule.
SCHEDULES = (("1f1b", 1), ("interleaved_1f1b", 2), ("zero_bubble", 2))


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    virtual_stages: int = 1
    schedule: str = "1f1b"
    recompute: str = "none"
    distributed: bool = False
    sequence_parallel: bool = False
    rank_order: str = "tp-dp-pp"
    # On a mixed cluster: the order of its node groups in rank order (which kind runs the
    # first pipeline stages); recompute is then "per-rank" (chosen by the balancer).
    groups: tuple[int, ...] = ()

    def describe(self) -> str:
        parts = [f"tp{self.tp} pp{self.pp} dp{self.dp}"]
        if self.pp > 1:
            parts.append(
                self.schedule + (f" v{self.virtual_stages}" if self.virtual_stages > 1 else "")
            )
        parts.append(f"recompute {self.recompute}")
        parts += ["ZeRO-1"] if self.distributed else []
        parts += ["SP"] if self.sequence_parallel else []
        if self.groups:
            parts.append("groups " + ",".join(map(str, self.groups)))
        return ", ".join(parts) + f", order {self.rank_order}"


@dataclass(frozen=True)
class Ranked:
    """A layout that fits, with its balanced split and costs."""

    layout: Layout
    plan: PlanCost
    links: LinkPlan
    cfg: Config  # the resolved config of the layout and split

    @property
    def step_time_s(self) -> float:
        return self.plan.step_time_s

    @property
    def blocks(self) -> tuple[int, ...]:
        return self.plan.blocks


@dataclass(frozen=True)
class Advice:
    ranked: tuple[Ranked, ...]  # the best ``top`` layouts, fastest first
    cluster: Cluster
    considered: int  # distinct layouts (rank orders giving the same links counted once)
    balanced: int  # of them, how many were balanced (the others were bounded out or rejected)
    rejected: dict[str, int]  # reason -> count

    @property
    def best(self) -> Ranked:
        return self.ranked[0]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def apply_layout(
    cfg: Config,
    layout: Layout,
    blocks: tuple[int, ...] | None = None,
    tokenizer_vocab: int | None = None,
) -> Config:
    """``cfg`` with the layout's settings (and split ``blocks``, default ``auto``), validated and
    resolved for tp * pp * dp devices. ConfigError names what the layout breaks."""
    v = layout.virtual_stages
    stages = layout.pp * v
    pipeline_blocks: tuple[int, ...] | str | None = None
    if stages > 1:
        pipeline_blocks = tuple(blocks) if blocks is not None else "auto"
    parallel = dataclasses.replace(
        cfg.parallel,
        tp=layout.tp,
        pp=layout.pp,
        dp=layout.dp,
        virtual_stages=v,
        schedule=layout.schedule,
        sequence_parallel=layout.sequence_parallel,
        rank_order=layout.rank_order,
        pipeline_blocks=pipeline_blocks,
        pipeline_layout=None,
    )
    out = dataclasses.replace(
        cfg,
        parallel=parallel,
        optim=dataclasses.replace(cfg.optim, distributed=layout.distributed),
        # The advisor's "full" recomputes every layer (method uniform, one layer per checkpoint).
        train=dataclasses.replace(
            cfg.train,
            recompute=layout.recompute,
            recompute_stages=None,
            recompute_method="uniform",
            recompute_num_layers=1,
        ),
    )
    validate(out)
    t = out.train
    m = t.global_batch_size // (t.micro_batch_size * layout.dp)
    if layout.pp > 1:
        schedule_spec(layout.schedule).check(layout.pp, v, m)
    return resolve(out, layout.tp * layout.pp * layout.dp, tokenizer_vocab)


def candidate_layouts(world: int, pp_max: int):
    """Every layout of ``world`` devices (validity is checked by :func:`apply_layout`)."""
    for tp in divisors(world):
        for pp in divisors(world // tp):
            if pp > pp_max:
                continue
            dp = world // (tp * pp)
            schedules = SCHEDULES if pp > 1 else (("1f1b", 1),)
            for schedule, v in schedules:
                if pp * v > pp_max:
                    continue
                for sp in (False, True) if tp > 1 else (False,):
                    # Without dp the distributed optimizer is the plain one.
                    for distributed in (False, True) if dp > 1 else (False,):
                        for recompute in RECOMPUTE:
                            for order in RANK_ORDERS:
                                yield Layout(
                                    tp, pp, dp, v, schedule, recompute, distributed, sp, order
                                )


def _total_params(model: CostModel) -> int:
    """Parameters on one tp rank of all stages together (any split)."""
    extras = sum(model.stage_params(s, 0) for s in range(model.num_stages))
    return extras + model.num_layers * layer_params(model.cfg)


def lower_bound_s(model: CostModel) -> float:
    """A step time no split of this layout beats (see the module doc)."""
    m, pp = model.num_microbatches, model.pp
    # S: every stage's time per microbatch, summed: the same for every split.
    S = model.num_layers * model.layer_time(0).total_s
    S += sum(model.stage_time(s, 0).total_s for s in range(model.num_stages))
    pipeline = m * S / pp  # the busiest rank carries at least the average
    if pp > 1 and model.virtual_stages == 1 and model.cfg.parallel.schedule != "zero_bubble":
        # With x the last rank's time, microbatch 0 reaches it after the others' forwards and
        # microbatch m - 1 leaves it for their backwards: at least S - x + m x, while some
        # other rank carries (S - x) / (pp - 1) per microbatch. The split picks x; the bound
        # is the least over x of the larger of the two (they cross at x_star).
        x_star = max(0.0, S * (m - pp + 1) / ((m - 1) * (pp - 1) + m))
        pipeline = max(pipeline, min(S + (m - 1) * x_star, m * (S - x_star) / (pp - 1)))
    average = _total_params(model) // pp
    return pipeline + model.dp_comm_s(average)


def _static_floor_bytes(model: CostModel) -> float:
    """Weights, gradients and optimizer states of the whole model over pp ranks: the least
    static memory the fullest rank can hold."""
    return sum(model.state.of(_total_params(model))) / model.pp


def fits_some_split(model: CostModel) -> bool | None:
    """With one stage per rank: whether some split fits the memory limit (each rank can hold up
    to the most layers whose memory fits, and memory grows with layers; a split exists when
    those most add up to the model). None with several stages per rank (left to the balancer)."""
    limit = model.memory_limit_bytes
    if limit is None:
        return True
    if model.virtual_stages > 1:
        return None
    room = 0
    for rank in range(model.pp):
        if model.rank_memory(rank, (0,)) > limit:
            return False
        lo, hi = 0, model.num_layers  # the most layers that fit lies in [lo, hi]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if model.rank_memory(rank, (mid,)) <= limit:
                lo = mid
            else:
                hi = mid - 1
        room += lo
    return room >= model.num_layers


def _reason(exc: ConfigError) -> str:
    """The error without its numbers, so that layouts failing alike count together."""
    return re.sub(r"\d+", "N", str(exc).split(";")[0])


def advise(
    cfg: Config,
    cluster: Cluster,
    device: DevicePreset,
    *,
    top: int = 10,
    mfu: float = DEFAULT_MFU,
    flops_per_s: float | None = None,
    memory_limit_bytes: int | None = None,
    tokenizer_vocab: int | None = None,
) -> Advice:
    """Rank the layouts of ``cfg`` (loaded, not yet resolved) on ``cluster`` (see module doc).

    Raises ConfigError when no layout is possible or none fits, naming what to change.
    """
    if top < 1:
        raise ConfigError(f"--top: must be >= 1, got {top}")
    world = cluster.world_size
    rejected: Counter[str] = Counter()
    bounded: list[tuple[float, int, Layout, Config, CostModel]] = []
    seen: set = set()
    least_static = math.inf
    for layout in candidate_layouts(world, cfg.model.num_layers):
        if layout.dp > 1 and not layout.distributed:
            # The distributed optimizer moves no more bytes (a reduce-scatter of the gradients
            # and an all-gather of the narrower-or-equal weights instead of an all-reduce) with
            # the same latency, and holds less: without it a layout can only tie.
            rejected["dominated: the distributed optimizer is as fast and leaner"] += 1
            continue
        try:
            resolved = apply_layout(cfg, layout, tokenizer_vocab=tokenizer_vocab)
        except ConfigError as exc:
            rejected[_reason(exc)] += 1
            continue
        links = link_plan(cluster, layout.tp, layout.pp, layout.dp, layout.rank_order)
        key = (dataclasses.replace(layout, rank_order=""), links)
        if key in seen:  # another rank order with the same links: the same costs
            continue
        seen.add(key)
        model = cost_model(
            resolved,
            device,
            mfu=mfu,
            flops_per_s=flops_per_s,
            links=links,
            memory_limit_bytes=memory_limit_bytes,
        )
        static = _static_floor_bytes(model)
        least_static = min(least_static, static)
        if model.memory_limit_bytes is not None and static > model.memory_limit_bytes:
            rejected["does not fit device memory"] += 1
            continue
        bounded.append((lower_bound_s(model), len(bounded), layout, resolved, model))
    considered = len(seen)
    if considered == 0:
        raise ConfigError(_no_layout_message(cfg, cluster, rejected))
    bounded.sort(key=lambda item: (item[0], item[1]))
    ranked: list[Ranked] = []
    balanced = 0
    least_memory = least_static
    fitted: set[Layout] = set()  # layouts that fit, without their recompute mode
    for bound, _, layout, resolved, model in bounded:
        if len(ranked) >= top and bound > ranked[top - 1].step_time_s:
            break
        base = dataclasses.replace(layout, recompute="none")
        if base in fitted:
            # Recompute only adds work: it is worth it where the layout does not fit without.
            rejected["dominated: fits with less recompute"] += 1
            continue
        if fits_some_split(model) is False:
            rejected["does not fit device memory"] += 1
            continue
        balanced += 1
        try:
            result = balance(resolved, device, "time", model=model)
        except ConfigError:
            rejected["does not fit device memory"] += 1
            continue
        fitted.add(base)
        least_memory = min(least_memory, result.cost.memory_max_bytes)
        final = apply_layout(cfg, layout, result.blocks, tokenizer_vocab)
        ranked.append(Ranked(layout, result.cost, model.links, final))
        ranked.sort(key=_rank_key)
    if not ranked:
        limit = memory_limit_bytes or device.memory_bytes
        raise ConfigError(
            f"no layout of {cfg.model.num_layers} layers on {cluster.nodes} nodes x "
            f"{cluster.gpus_per_node} devices fits {limit / GIB:.1f} GiB per device "
            f"({device.name}); even the leanest needs about {least_memory / GIB:.1f} GiB "
            "(its weights, gradients and optimizer states alone): add nodes, use a device with "
            "more memory, or lower train.micro_batch_size / train.seq_length"
        )
    return Advice(tuple(ranked[:top]), cluster, considered, balanced, dict(rejected))


def _rank_key(r: Ranked) -> tuple:
    lay = r.layout
    # Ties (equal predicted times) go to the leaner and simpler layout.
    return (
        r.step_time_s,
        r.plan.memory_max_bytes,
        RECOMPUTE.index(lay.recompute),
        lay.tp * lay.pp,
        lay.virtual_stages,
        lay.sequence_parallel,
        RANK_ORDERS.index(lay.rank_order),
    )


def _no_layout_message(cfg: Config, cluster: Cluster, rejected: Counter) -> str:
    t, m = cfg.train, cfg.model
    world = cluster.world_size
    why = "; ".join(f"{reason} ({n}x)" for reason, n in rejected.most_common(3))
    dps = [d for d in divisors(world) if t.global_batch_size % (t.micro_batch_size * d) == 0]
    return (
        f"no valid layout of {world} devices ({cluster.nodes} nodes x {cluster.gpus_per_node}) "
        f"for {m.num_layers} layers, {m.num_heads} heads, global batch {t.global_batch_size} of "
        f"micro batches {t.micro_batch_size}: {why}. Data parallel sizes the batch allows here: "
        f"{dps}; choose a device count whose factors divide model.num_heads and "
        "train.global_batch_size / train.micro_batch_size, or change those"
    )


def snippet(ranked: Ranked) -> dict:
    """The config keys (``parallel``, ``optim``, ``train``) that select ``ranked``'s layout;
    merged into the user's config, it loads and resolves to that layout."""
    lay = ranked.layout
    parallel: dict = {
        "tp": lay.tp,
        "pp": lay.pp,
        "dp": lay.dp,
        "virtual_stages": lay.virtual_stages,
        "schedule": lay.schedule,
        "pipeline_blocks": list(ranked.blocks) if lay.pp * lay.virtual_stages > 1 else None,
        "pipeline_layout": None,
        "sequence_parallel": lay.sequence_parallel,
        "rank_order": lay.rank_order,
    }
    out = {
        "parallel": parallel,
        "optim": {"distributed": lay.distributed},
        "train": {
            "recompute": lay.recompute,
            "recompute_stages": None,
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        },
    }
    if lay.groups:  # a mixed cluster: its groups in the chosen order, recompute per rank
        t = ranked.cfg.train
        out["train"] = {"recompute": t.recompute, "recompute_stages": list(t.recompute_stages)}
        out["cluster"] = config_to_dict(ranked.cfg.cluster)
    return out


def merge(base: dict, extra: dict) -> dict:
    """``base`` with ``extra``'s keys set (nested mappings merged, other values replaced)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
