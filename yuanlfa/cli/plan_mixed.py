"""yuanlfa-plan on a heterogeneous cluster (a ``cluster:`` section, or ``--cluster FILE``).

Without --advise: the config's layout on the cluster's devices (each pipeline rank on the device
its ranks map to through parallel.rank_order), three splits side by side: ``uniform``,
``homogeneous`` (the balancer's time-optimal split as if every rank ran on the fastest device,
re-costed on the real ones) and ``aware`` (each rank's own speed and memory, recompute chosen per
rank). With --advise: every layout, group order and rank order ranked by step time, and the
config snippet (with the cluster section in the chosen order) of the best.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from yuanlfa.config import Config, ConfigError, resolve
from yuanlfa.layout import uniform_blocks
from yuanlfa.planner.advisor import snippet
from yuanlfa.planner.advisor_mixed import advise_mixed, stage_table
from yuanlfa.planner.balance import NoFitError
from yuanlfa.planner.cluster import MixedCluster, mixed_cluster, pipeline_devices
from yuanlfa.planner.cluster_plan import with_nearest_fit
from yuanlfa.planner.cost import PlanCost, cost_model
from yuanlfa.planner.devices import GIB, DevicePreset
from yuanlfa.planner.recompute import RecomputePlan, balance_recompute, with_recompute
from yuanlfa.planner.report import snippet_yaml
from yuanlfa.planner.topology import link_plan


@dataclasses.dataclass(frozen=True)
class MixedPlans:
    cluster: MixedCluster
    devices: tuple
    uniform: PlanCost
    # The balancer's best plan as if every rank had the weakest device (least speed and
    # memory: what a planner assuming one kind must assume), re-costed on the real devices;
    # None when even that does not fit.
    homogeneous: PlanCost | None
    homogeneous_recompute: tuple[str, ...]
    aware: RecomputePlan


def plan_mixed(cfg: Config, mfu: float) -> MixedPlans:
    """The three splits of a resolved ``cfg`` on its cluster (see the module doc)."""
    cluster = mixed_cluster(cfg.cluster)
    p = cfg.parallel
    devices = pipeline_devices(cluster, p.tp, p.pp, p.dp or 1, p.rank_order)
    options = {"cluster": cluster, "mfu": mfu}
    real = cost_model(cfg, **options)
    uniform = real.evaluate(uniform_blocks(cfg.model.num_layers, real.num_stages))
    try:
        aware = balance_recompute(cfg, **options)
    except NoFitError as exc:
        raise with_nearest_fit(exc, cfg, mfu) from None
    homogeneous, modes = homogeneous_plan(cfg, cluster, devices, mfu)
    return MixedPlans(cluster, devices, uniform, homogeneous, modes, aware)


def weakest(devices: tuple) -> DevicePreset:
    slow = min(devices, key=lambda d: d.peak_flops)
    small = min(devices, key=lambda d: d.memory_bytes)
    return DevicePreset(f"weakest({slow.name})", slow.peak_flops, small.memory_bytes,
                        slow.link_gbps, slow.gpu)  # fmt: skip


def homogeneous_plan(
    cfg: Config, cluster: MixedCluster, devices: tuple, mfu: float
) -> tuple[PlanCost | None, tuple[str, ...]]:
    """The weakest-device plan (see :class:`MixedPlans`) re-costed on the real devices."""
    p = cfg.parallel
    links = link_plan(cluster, p.tp, p.pp, p.dp or 1, p.rank_order)
    same = (weakest(devices),) * p.pp
    try:
        blind = balance_recompute(cfg, devices=same, links=links, mfu=mfu)
    except ConfigError:
        return None, ()
    real = cost_model(with_recompute(cfg, blind.recompute), cluster=cluster, mfu=mfu)
    return real.evaluate(blind.blocks), blind.recompute


def _memory_by_kind(r) -> str:
    """The fullest rank of each device kind against its limit: "A100-40GB 37.7/40, ..."."""
    fullest: dict[str, tuple[float, float]] = {}
    for row in stage_table(r):
        used = max(row["memory_gib"], fullest.get(row["device"], (0.0, 0.0))[0])
        fullest[row["device"]] = (used, row["limit_gib"])
    return ", ".join(f"{d} {u:.1f}/{lim:.0f}" for d, (u, lim) in sorted(fullest.items()))


def plans_to_dict(plans: MixedPlans) -> dict:
    def one(plan: PlanCost, modes: tuple[str, ...]) -> dict:
        return {
            "blocks": list(plan.blocks),
            "step_time_s": plan.step_time_s,
            "time_max_s": plan.time_max_s,  # the balancer's objective: the slowest rank
            "fits": plan.fits,
            "ranks": [
                {
                    "pipeline_rank": r.rank,
                    "device": plans.devices[r.rank].name,
                    "layers": r.layers,
                    "recompute": modes[r.rank],
                    "memory_gib": r.memory_bytes / GIB,
                    "limit_gib": plan.limit_of(r.rank) / GIB,
                    "time_per_microbatch_s": r.time_s,
                }
                for r in plan.ranks
            ],
        }

    base = (plans.aware.model.cfg.train.recompute,) * len(plans.devices)
    homogeneous = plans.homogeneous
    return {
        "cluster": plans.cluster.describe(),
        "uniform": one(plans.uniform, base),
        "homogeneous": one(homogeneous, plans.homogeneous_recompute) if homogeneous else None,
        "aware": one(plans.aware.cost, plans.aware.recompute),
    }


def format_plans(plans: MixedPlans) -> str:
    d = plans_to_dict(plans)
    lines = [f"cluster {d['cluster']}"]
    names = tuple(n for n in ("uniform", "homogeneous", "aware") if d[n] is not None)
    lines.append(
        f"{'rank':>4} {'device':<12}"
        + "".join(f" | {n + ' layers/rc/GiB':<26}" for n in names)
        + " | limit GiB"
    )
    for r in range(len(plans.devices)):
        cells = []
        for n in names:
            row = d[n]["ranks"][r]
            over = "!" if row["memory_gib"] > row["limit_gib"] else " "
            cells.append(
                f" | {row['layers']:>3} {row['recompute']:<9} {row['memory_gib']:>8.1f}{over}    "
            )
        limit = d["aware"]["ranks"][r]["limit_gib"]
        lines.append(f"{r:>4} {plans.devices[r].name:<12}" + "".join(cells) + f" | {limit:.0f}")
    for label, key in (("step time s", "step_time_s"), ("fits", "fits")):
        cells = [d[n][key] for n in names]
        text = [f"{c:.4g}" if isinstance(c, float) else str(c) for c in cells]
        lines.append(f"{label:<17}" + "".join(f" | {t:<26}" for t in text))
    if d["homogeneous"] is None:
        lines.append(
            "homogeneous: no split fits when every rank is planned as the weakest device "
            f"({weakest(plans.devices).memory_bytes / GIB:.0f} GiB): only the aware plan runs"
        )
    a = plans.aware
    lines.append("aware blocks: " + ",".join(map(str, a.blocks)))
    lines.append("aware recompute_stages: " + ",".join(a.recompute))
    return "\n".join(lines)


def mixed_main(args: argparse.Namespace, cfg: Config, tokenizer_vocab: int | None) -> int:
    """--cluster (or a config with cluster.groups): plan or advise; prints JSON with --json."""
    if args.advise:
        limit = None if args.memory_limit_gib is None else int(args.memory_limit_gib * GIB)
        advice = advise_mixed(
            cfg,
            mixed_cluster(cfg.cluster),
            top=args.top,
            mfu=args.mfu,
            memory_limit_bytes=limit,
            tokenizer_vocab=tokenizer_vocab,
        )
        if args.json:
            print(json.dumps(advice_dict(advice), indent=2))
            return 0
        best = advice.best.step_time_s
        print(f"cluster {advice.cluster.describe()}: {advice.considered} layouts, "
              f"{advice.balanced} balanced, rejected {advice.rejected}")  # fmt: skip
        for i, r in enumerate(advice.ranked, 1):
            print(
                f"{i:>2} {r.step_time_s:>9.4g}s x{r.step_time_s / best:.2f} "
                f"{r.layout.describe()} | GiB used/limit {_memory_by_kind(r)}"
            )
        print("\nbest layout, to merge into the config:")
        print(snippet_yaml(advice.best).rstrip())
        return 0
    p = cfg.parallel
    world = mixed_cluster(cfg.cluster).world_size
    if world % (p.tp * p.pp * p.cp):
        raise ConfigError(
            f"cluster: {world} devices, not a multiple of tp * pp * cp = {p.tp * p.pp * p.cp}; "
            "change parallel.pp / parallel.tp or the groups"
        )
    cfg = resolve(cfg, world, tokenizer_vocab)
    plans = plan_mixed(cfg, args.mfu)
    if args.plot:
        write_mixed_plot(args.plot, plans)
    if args.json:
        print(json.dumps(plans_to_dict(plans), indent=2))
    else:
        print(format_plans(plans))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


def write_mixed_plot(path: str, plans: MixedPlans) -> None:
    """Per pipeline rank, the three splits' memory against that rank's own device limit, and
    their time per microbatch on that device (the slowest rank sets the step)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'yuanlfa[plot]'") from None
    d = plans_to_dict(plans)
    names = [n for n in ("uniform", "homogeneous", "aware") if d[n] is not None]
    pp = len(plans.devices)
    fig, (memory, time) = plt.subplots(2, 1, figsize=(max(9.0, 0.45 * pp + 4), 8.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [r + (i - (len(names) - 1) / 2) * width for r in range(pp)]
        rows = d[name]["ranks"]
        label = f"{name} ({d[name]['step_time_s']:.4g} s per step, fits: {d[name]['fits']})"
        memory.bar(xs, [row["memory_gib"] for row in rows], width, label=label)
        time.bar(xs, [row["time_per_microbatch_s"] for row in rows], width, label=name)
    limits = [row["limit_gib"] for row in d["aware"]["ranks"]]
    memory.step(
        [r - 0.5 for r in range(pp + 1)], [limits[0], *limits], where="pre", color="crimson",
        linestyle="--", label="each rank's device limit",
    )  # fmt: skip
    ticks = [f"{r}\n{dev.name}" for r, dev in enumerate(plans.devices)]
    for ax, label in ((memory, "memory per device (GiB)"), (time, "time per microbatch (s)")):
        ax.set_xticks(range(pp), ticks, fontsize=7)
        ax.set_ylabel(label)
        ax.legend(fontsize=8, loc="upper right")
    memory.set_title(f"{d['cluster']}: pipeline ranks on their own devices")
    time.set_xlabel("pipeline rank and its device")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def advice_dict(advice) -> dict:
    return {
        "cluster": advice.cluster.describe(),
        "considered": advice.considered,
        "balanced": advice.balanced,
        "rejected": advice.rejected,
        "ranked": [
            {
                "step_time_s": r.step_time_s,
                "layout": r.layout.describe(),
                "stages": stage_table(r),
                "snippet": snippet(r),
            }
            for r in advice.ranked
        ],
    }
