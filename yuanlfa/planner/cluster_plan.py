"""What the trainer asks the planner about a config with a ``cluster:`` section, before any step:
the split and per-rank recompute to run, and each pipeline rank's predicted busy time.

- :func:`cluster_plan`: with ``parallel.pipeline_blocks: auto``, the balancer's split and
  recompute per rank on each rank's own device (:mod:`.recompute`); with a given split, that
  split checked against each rank's device (a one-line ConfigError naming the rank, its device
  and the shortfall). None without a cluster section.
- :func:`predicted_busy_s`: per pipeline rank, microbatches x its time per microbatch under the
  cost model (at the devices' peak x mfu, or a measured ``flops_per_s`` of the fastest device),
  for the log next to the measured busy time.
"""

from __future__ import annotations

from dataclasses import dataclass

from yuanlfa.config import Config, ConfigError
from yuanlfa.layout import resolve_blocks
from yuanlfa.planner.cluster import mixed_cluster
from yuanlfa.planner.cost import CostModel, cost_model
from yuanlfa.planner.devices import DEFAULT_MFU, GIB
from yuanlfa.planner.recompute import balance_recompute, with_recompute


@dataclass(frozen=True)
class ClusterPlan:
    blocks: tuple[int, ...]
    recompute: tuple[str, ...]  # per pipeline rank
    model: CostModel


def cluster_plan(cfg: Config, mfu: float = DEFAULT_MFU) -> ClusterPlan | None:
    """See the module doc; ``cfg`` resolved (dp known)."""
    if not cfg.cluster.groups:
        return None
    cluster = mixed_cluster(cfg.cluster)
    if cfg.parallel.pipeline_blocks == "auto":
        plan = balance_recompute(cfg, cluster=cluster, mfu=mfu)
        return ClusterPlan(plan.blocks, plan.recompute, plan.model)
    t, pp = cfg.train, cfg.parallel.pp
    modes = t.recompute_stages or (t.recompute,) * pp
    model = cost_model(with_recompute(cfg, tuple(modes)), cluster=cluster, mfu=mfu)
    blocks = resolve_blocks(cfg.parallel, cfg.model)
    plan = model.evaluate(blocks)
    for r in plan.ranks:
        limit = plan.limit_of(r.rank)
        if limit is not None and r.memory_bytes > limit:
            raise ConfigError(
                f"parallel.pipeline_blocks: pipeline rank {r.rank} ({r.layers} layers, recompute "
                f"{modes[r.rank]}) needs {r.memory_bytes / GIB:.1f} GiB but its device "
                f"{model.device_of(r.rank).name} holds {limit / GIB:.1f} GiB; set "
                "parallel.pipeline_blocks: auto (the balancer fits each device, recomputing "
                "where needed) or move layers off that rank"
            )
    return ClusterPlan(tuple(blocks), tuple(modes), model)


def predicted_busy_s(plan: ClusterPlan) -> list[float]:
    """Per pipeline rank: the compute and link time of one step (no bubble), as the trainer's
    ``stage_busy_s`` measures it."""
    m = plan.model
    mine = [tuple(plan.blocks[s] for s in m.stages_of(r)) for r in range(m.pp)]
    return [m.num_microbatches * m.rank_time(r, b) for r, b in enumerate(mine)]
