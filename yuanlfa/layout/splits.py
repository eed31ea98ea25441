"""Pipeline splits: which global layers each (virtual) stage holds. The one place a split is
resolved; what a user may write is checked by :func:`yuanlfa.config.configured_blocks`.

A split is given in one of three ways (``parallel``):
- ``pipeline_blocks: [2, 2, 3, ...]``: layers per stage, Yuan 2.0 style;
- ``pipeline_layout: "Et*2|t*3|t*3,L"``: Megatron style, embedding (E), layers (t) and loss (L)
  per stage, ``|`` between stages, ``x*N`` repeats a token or a parenthesized group;
- ``pipeline_blocks: auto``: the balancer's split (see :mod:`yuanlfa.planner.balance`);
- none of them: an even split (layers divisible by the stages; :func:`uniform_blocks` also
  spreads a remainder when called directly, e.g. by the planner).

With ``virtual_stages`` v > 1 there are pp * v stages, placed as the schedule's spec says
(:mod:`yuanlfa.layout.schedules`): looped, stage s on pipeline rank s % pp (Megatron's and torch's
interleaved schedules), or V-shaped (ZBV, DualPipeV; :func:`yuanlfa.layout.ranks.rank_of_stage`).
Pure Python: the planner uses it without building anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from yuanlfa.config import ConfigError, ModelConfig, ParallelConfig, configured_blocks
from yuanlfa.layout.ranks import Placement, rank_of_stage, stages_of_rank
from yuanlfa.layout.schedules import schedule_spec


@dataclass(frozen=True)
class PipelineLayout:
    blocks: tuple[int, ...]  # layers per stage, in stage order
    pp: int
    virtual_stages: int = 1
    placement: Placement = "looped"  # of the schedule, see yuanlfa.layout.schedules

    def __post_init__(self) -> None:
        if len(self.blocks) != self.pp * self.virtual_stages:
            raise ConfigError(
                f"pipeline layout: {len(self.blocks)} stages but pp * virtual_stages = "
                f"{self.pp * self.virtual_stages}"
            )

    @property
    def num_stages(self) -> int:
        return len(self.blocks)

    @property
    def num_layers(self) -> int:
        return sum(self.blocks)

    def layer_ids(self, stage: int) -> list[int]:
        start = sum(self.blocks[:stage])
        return list(range(start, start + self.blocks[stage]))

    def stages_of_rank(self, pp_rank: int) -> list[int]:
        """The stages pipeline rank ``pp_rank`` runs, in stage order."""
        return stages_of_rank(pp_rank, self.pp, self.virtual_stages, self.placement)

    def rank_of_stage(self, stage: int) -> int:
        return rank_of_stage(stage, self.pp, self.virtual_stages, self.placement)

    def stage_of_layer(self, layer: int) -> int:
        """The stage holding global layer ``layer``."""
        start = 0
        for stage, count in enumerate(self.blocks):
            if layer < start + count:
                return stage
            start += count
        raise ValueError(f"layer {layer} is beyond the split {list(self.blocks)}")

    def is_first(self, stage: int) -> bool:
        return stage == 0

    def is_last(self, stage: int) -> bool:
        return stage == self.num_stages - 1

    def describe(self) -> str:
        """The split as a layout string (``E`` on the first stage, ``L`` on the last)."""
        parts = []
        for s, n in enumerate(self.blocks):
            text = ("E" if s == 0 else "") + "t" * n + ("L" if self.is_last(s) else "")
            parts.append(text)
        return "|".join(parts)


def uniform_blocks(num_layers: int, stages: int) -> tuple[int, ...]:
    """As even as whole layers allow; the extra layers go to the middle stages, which hold
    neither the embedding nor the head (Megatron puts them last, where the head already is)."""
    base, extra = divmod(num_layers, stages)
    blocks = [base] * stages
    # Hand the remainder out from the stage after the first, wrapping to the first last.
    order = list(range(1, stages - 1)) + [0, stages - 1] if stages > 2 else list(range(stages))
    for s in order[:extra]:
        blocks[s] += 1
    return tuple(blocks)


def resolve_blocks(
    parallel: ParallelConfig, model: ModelConfig, auto_blocks: tuple[int, ...] | None = None
) -> tuple[int, ...]:
    """The configured split as blocks; ``auto_blocks`` is the balancer's answer for ``auto``
    (this package sits below the planner, so the caller asks it)."""
    given = configured_blocks(parallel, model)
    if given == "auto":
        if auto_blocks is None:
            raise ConfigError(
                "parallel.pipeline_blocks: auto needs the balancer (yuanlfa.planner.balance)"
            )
        return tuple(auto_blocks)
    if given is None:
        return uniform_blocks(model.num_layers, parallel.pp * parallel.virtual_stages)
    return given


def build_layout(
    parallel: ParallelConfig, model: ModelConfig, auto_blocks: tuple[int, ...] | None = None
) -> PipelineLayout:
    return PipelineLayout(
        resolve_blocks(parallel, model, auto_blocks),
        parallel.pp,
        parallel.virtual_stages,
        schedule_spec(parallel.schedule).placement,
    )
