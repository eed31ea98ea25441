"""The configured split, resolved (``auto`` through the balancer), and the static memory of one
rank of each pipeline rank's stages."""

from __future__ import annotations

from dataclasses import dataclass

from yuanlfa.config import Config
from yuanlfa.layout import rank_of_stage, resolve_blocks
from yuanlfa.layout.schedules import schedule_spec
from yuanlfa.planner.balance import auto_blocks
from yuanlfa.planner.cluster_plan import cluster_plan
from yuanlfa.planner.memory import layer_params, stage_extra_params, state_bytes


@dataclass(frozen=True)
class StageMemory:
    stage: int
    layers: int
    params: int  # held by one tensor-parallel rank of this stage
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes


def config_blocks(cfg: Config) -> tuple[int, ...]:
    """The configured split (block list, layout string, or ``auto``: the balancer's time-optimal
    split without a memory limit, or with a ``cluster:`` section the split on each rank's own
    device, :func:`~.cluster_plan.cluster_plan`)."""
    auto = None
    if cfg.parallel.pipeline_blocks == "auto":
        planned = cluster_plan(cfg)
        auto = planned.blocks if planned is not None else auto_blocks(cfg)
    return resolve_blocks(cfg.parallel, cfg.model, auto)


def stage_memory(
    cfg: Config, dp: int, blocks: tuple[int, ...] | None = None, *, gpu: bool | None = None
) -> list[StageMemory]:
    """Static memory of one rank of each pipeline rank's stages (activations excluded).

    ``blocks`` defaults to the configured split. Under interleaving, virtual stage s runs on
    the pipeline rank the schedule places it on, and the rank holds the sum of its stages.
    """
    pp = cfg.parallel.pp
    blocks = tuple(blocks) if blocks is not None else config_blocks(cfg)
    state = state_bytes(cfg, dp, gpu)
    per_layer = layer_params(cfg)
    layers_on = [0] * pp
    params_on = [0] * pp
    placement = schedule_spec(cfg.parallel.schedule).placement
    for stage, layers in enumerate(blocks):
        rank = rank_of_stage(stage, pp, cfg.parallel.virtual_stages, placement)
        layers_on[rank] += layers
        first, last = stage == 0, stage == len(blocks) - 1
        params_on[rank] += layers * per_layer + stage_extra_params(cfg, first, last, len(blocks))
    out = []
    for rank, params in enumerate(params_on):
        weights, grads, optimizer = state.of(params)
        out.append(StageMemory(rank, layers_on[rank], params, weights, grads, optimizer))
    return out
