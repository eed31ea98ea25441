"""What the trainer asks the planner about a config with a ``cluster:`` section, before any step:
the split and per-rank recompute to run, and each pipeline rank's predicted busy time.

- :func:`cluster_plan`: with ``parallel.pipeline_blocks: auto``, the balancer's split and
  recompute per rank on each rank's own device (:mod:`.recompute`); with a given split, that
  split checked against each rank's device (a one-line ConfigError naming the rank, its need,
  its limit and the smallest change that fits: more recompute on that rank, else the
  balancer's split). None without a cluster section or an ``emulate:`` budget or speeds.
- :func:`plan_devices`, :func:`emulated_speeds`, :func:`memory_budgets`: per pipeline rank the
  device the plan sees (the cluster's, with ``emulate.memory_gib`` as its memory), the speed a
  paced CPU rank runs at, and the memory budget the trainer enforces.
- :func:`predicted_busy_s`: per pipeline rank, microbatches x its time per microbatch under the
  cost model (at the devices' peak x mfu, or ``emulate.tflops`` for the fastest device),
  for the log next to the measured busy time.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from yuanlfa.config import Config, ConfigError, resolve
from yuanlfa.layout import resolve_blocks
from yuanlfa.planner.balance import NoFitError
from yuanlfa.planner.cluster import mixed_cluster, pipeline_devices, tp_mixed
from yuanlfa.planner.cost import CostModel, PlanCost, RankCost, cost_model
from yuanlfa.planner.devices import DEFAULT_MFU, GIB, PRESETS, DevicePreset
from yuanlfa.planner.recompute import MODES, balance_recompute, with_recompute


@dataclass(frozen=True)
class ClusterPlan:
    blocks: tuple[int, ...]
    recompute: tuple[str, ...]  # per pipeline rank
    model: CostModel


def plan_devices(cfg: Config) -> tuple[DevicePreset, ...] | None:
    """Per pipeline rank the device the plan sees: the cluster section's (a nominal CPU without
    one), its memory replaced by ``emulate.memory_gib`` where given; None when neither is set."""
    p, e = cfg.parallel, cfg.emulate
    if cfg.cluster.groups:
        cluster = mixed_cluster(cfg.cluster)
        devices = pipeline_devices(cluster, p.tp, p.pp, p.dp or 1, p.rank_order)
    elif e.memory_gib:
        devices = (PRESETS["cpu"],) * p.pp
    else:
        return None
    if e.memory_gib:
        devices = tuple(
            dataclasses.replace(d, name=f"{d.name} budget", memory_bytes=int(gib * GIB))
            for d, gib in zip(devices, e.memory_gib, strict=True)
        )
    return devices


def emulated_speeds(cfg: Config) -> tuple[float, ...]:
    """Per pipeline rank the speed a paced rank runs at: ``emulate.speeds``, else each rank's
    device TFLOP/s relative to the fastest of the cluster section, else 1."""
    if cfg.emulate.speeds:
        return tuple(cfg.emulate.speeds)
    devices = plan_devices(cfg) if cfg.cluster.groups else None
    if devices is None:
        return (1.0,) * cfg.parallel.pp
    fastest = max(d.peak_flops for d in devices)
    return tuple(d.peak_flops / fastest for d in devices)


def memory_budgets(cfg: Config) -> tuple[int | None, ...]:
    """Per pipeline rank the bytes the trainer holds it to on its own accounting:
    ``emulate.memory_gib``, else on CPU (``train.device: cpu``) the cluster section's device
    memory (an emulated cluster), else none (a GPU enforces its own)."""
    pp = cfg.parallel.pp
    if cfg.emulate.memory_gib or (cfg.cluster.groups and cfg.train.device == "cpu"):
        return tuple(d.memory_bytes for d in plan_devices(cfg) or ())
    return (None,) * pp


def _plan_options(cfg: Config, mfu: float) -> dict | None:
    devices = plan_devices(cfg)
    # The cluster's figures give its ranks' speeds; emulate.speeds those of a cluster-less run.
    speeds = tuple(cfg.emulate.speeds) if cfg.emulate.speeds and not cfg.cluster.groups else None
    if devices is None and speeds is None:
        return None
    cluster = mixed_cluster(cfg.cluster) if cfg.cluster.groups else None
    flops = cfg.emulate.tflops * 1e12 if cfg.emulate.tflops is not None else None
    return {
        "cluster": cluster,
        "devices": devices,
        "speeds": speeds,
        "mfu": mfu,
        "flops_per_s": flops,
    }


def cluster_plan(cfg: Config, mfu: float = DEFAULT_MFU) -> ClusterPlan | None:
    """See the module doc; ``cfg`` resolved (dp known)."""
    options = _plan_options(cfg, mfu)
    if options is None or cfg.parallel.pp == 1:
        return None
    if cfg.parallel.pipeline_blocks == "auto":
        try:
            plan = balance_recompute(cfg, **options)
        except NoFitError as exc:
            raise with_nearest_fit(exc, cfg, mfu) from None
        return ClusterPlan(plan.blocks, plan.recompute, plan.model)
    t, pp = cfg.train, cfg.parallel.pp
    modes = t.recompute_per_rank(pp)
    model = cost_model(with_recompute(cfg, modes), **options)
    blocks = tuple(resolve_blocks(cfg.parallel, cfg.model))
    plan = model.evaluate(blocks)
    for r in plan.ranks:
        limit = plan.limit_of(r.rank) or 0
        if not _fits(plan, r):
            source = "emulate.memory_gib" if cfg.emulate.memory_gib else "its device"
            raise ConfigError(
                f"pipeline rank {r.rank} ({r.layers} layers of parallel.pipeline_blocks, "
                f"recompute {modes[r.rank]}) needs {r.memory_bytes / GIB:.2f} GiB but "
                f"{source} ({model.device_of(r.rank).name}) holds {limit / GIB:.2f} GiB; "
                f"{_smallest_fix(cfg, modes, blocks, r.rank, options)}"
            )
    return ClusterPlan(blocks, modes, model)


def _fits(plan: PlanCost, rank: RankCost) -> bool:
    limit = plan.limit_of(rank.rank)
    return limit is None or rank.memory_bytes <= limit


def _smallest_fix(
    cfg: Config, modes: tuple[str, ...], blocks: tuple[int, ...], rank: int, options: dict
) -> str:
    """The cheapest change that makes every rank fit: more recompute on the ranks that do not
    fit (same split), else the balancer's split and recompute, else what that balancer says is
    missing."""
    tried = list(modes)
    while True:
        plan = cost_model(with_recompute(cfg, tuple(tried)), **options).evaluate(blocks)
        over = [r.rank for r in plan.ranks if not _fits(plan, r)]
        if not over:
            return f"it fits with train.recompute_stages={tried}"
        if any(tried[r] == MODES[-1] for r in over):
            break
        for r in over:
            tried[r] = MODES[MODES.index(tried[r]) + 1]
    try:
        plan = balance_recompute(cfg, **options)
    except NoFitError as exc:
        return f"no split fits with any recompute: {with_nearest_fit(exc, cfg, options['mfu'])}"
    return (
        f"it fits with parallel.pipeline_blocks={list(plan.blocks)} "
        f"train.recompute_stages={list(plan.recompute)} (or parallel.pipeline_blocks: auto)"
    )


def with_nearest_fit(exc: NoFitError, cfg: Config, mfu: float = DEFAULT_MFU) -> NoFitError:
    """``exc`` (no split fits with any recompute) with the smallest change found that fits, or
    with what was tried when none does: the balancer's generic list of fixes is not a fix."""
    change = nearest_fit(cfg, mfu)
    if change is None:
        tried = "a smaller train.micro_batch_size"
        if cfg.parallel.dp and cfg.parallel.dp > 1:
            tried += ", optim.distributed=true"
        if cfg.cluster.groups and not cfg.emulate.memory_gib:
            tried += f", other tp x pp x dp on these {cfg.cluster.world_size} devices"
        return NoFitError(f"{exc}; none of {tried} fits either", exc.short_bytes)
    return NoFitError(exc.problem, exc.short_bytes, f"the smallest change that fits: {change}")


def _fit_candidates(cfg: Config) -> list[tuple[str, Config]]:
    """Changes of a resolved ``cfg`` that lower what each rank holds, least disruptive first:
    smaller micro batches (activations only), ZeRO-1 (optimizer state over dp), then the other
    tp x pp x dp of the same devices nearest to the configured one (tp only inside nodes of one
    kind), ZeRO-1 on where dp > 1."""
    t, p, o = cfg.train, cfg.parallel, cfg.optim
    out: list[tuple[str, Config]] = []
    mbs = t.micro_batch_size // 2
    while mbs >= 1:
        train = dataclasses.replace(t, micro_batch_size=mbs)
        out.append((f"train.micro_batch_size={mbs}", dataclasses.replace(cfg, train=train)))
        mbs //= 2
    dp = p.dp or 1
    if dp > 1 and not o.distributed:
        optim = dataclasses.replace(o, distributed=True)
        out.append(("optim.distributed=true", dataclasses.replace(cfg, optim=optim)))
    if not cfg.cluster.groups or cfg.emulate.memory_gib:
        return out  # an emulated pipeline has no tp or dp to trade
    cluster = mixed_cluster(cfg.cluster)
    width = p.tp * p.pp * dp
    layouts = []
    for tp in (1, 2, 4, 8, 16):
        for pp in range(1, cfg.model.num_layers + 1):
            if width % (tp * pp) or (tp, pp) == (p.tp, p.pp):
                continue
            d = width // (tp * pp)
            if tp_mixed(cluster, tp, pp, d, p.rank_order):
                continue
            far = abs(math.log2(tp / p.tp)) + abs(math.log2(pp / p.pp))
            layouts.append((far, -(tp * pp), tp, pp, d))
    for _, _, tp, pp, d in sorted(layouts):
        parallel = dataclasses.replace(p, tp=tp, pp=pp, dp=None, pipeline_blocks="auto")
        train = dataclasses.replace(t, recompute_stages=None)
        optim = dataclasses.replace(o, distributed=o.distributed or d > 1)
        words = f"parallel.tp={tp} parallel.pp={pp} (dp {d})"
        words += " optim.distributed=true" if optim.distributed and not o.distributed else ""
        moved = dataclasses.replace(cfg, parallel=parallel, train=train, optim=optim)
        out.append((words + " parallel.pipeline_blocks=auto", moved))
    return out


def nearest_fit(cfg: Config, mfu: float = DEFAULT_MFU, tries: int = 8) -> str | None:
    """The first of :func:`_fit_candidates` (at most ``tries`` balanced, so that an error stays
    a matter of seconds) whose balanced plan fits every rank's own device, as config overrides
    with its predicted step time; None when none does."""
    balanced = 0
    for words, candidate in _fit_candidates(cfg):
        try:
            candidate = resolve(candidate, candidate.cluster.world_size or _world(candidate))
            options = _plan_options(candidate, mfu)
        except ConfigError:
            continue  # e.g. tp not dividing the heads, a batch the micro batch does not divide
        if options is None:
            return None
        if balanced == tries:
            return None
        balanced += 1
        try:
            plan = balance_recompute(candidate, **options)
        except ConfigError:
            continue
        return f"{words} (predicted step {plan.cost.step_time_s:.3g} s)"
    return None


def _world(cfg: Config) -> int:
    p = cfg.parallel
    return p.tp * p.pp * p.cp * (p.dp or 1) * p.islands


def predicted_busy_s(plan: ClusterPlan) -> list[float]:
    """Per pipeline rank: the compute and link time of one step (no bubble), as the trainer's
    ``stage_busy_s`` measures it."""
    m = plan.model
    mine = [tuple(plan.blocks[s] for s in m.stages_of(r)) for r in range(m.pp)]
    return [m.num_microbatches * m.rank_time(r, b) for r, b in enumerate(mine)]
