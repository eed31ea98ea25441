"""Pipeline stage layouts: which global layers each (virtual) stage holds.

A split is given in one of three ways (``parallel``):
- ``pipeline_blocks: [2, 2, 3, ...]``: layers per stage, Yuan 2.0 style;
- ``pipeline_layout: "Et*2|t*3|t*3,L"``: Megatron style, embedding (E), layers (t) and loss (L)
  per stage, ``|`` between stages, ``x*N`` repeats a token or a parenthesized group;
- ``pipeline_blocks: auto``: the balancer's split (see :mod:`yuanlfa.planner.balance`).

With ``virtual_stages`` v > 1 there are pp * v stages, placed as the schedule's spec says
(:mod:`yuanlfa.layout.schedules`): looped, stage s on pipeline rank s % pp (Megatron's and torch's
interleaved schedules), or V-shaped (ZBV, DualPipeV). Pure Python: the planner uses it without
building anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from yuanlfa.config import ConfigError, ModelConfig, ParallelConfig
from yuanlfa.layout.schedules import Placement, rank_of_stage, schedule_spec, stages_of_rank


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
        return list(stages_of_rank(self.placement, self.pp, self.virtual_stages, pp_rank))

    def rank_of_stage(self, stage: int) -> int:
        return rank_of_stage(self.placement, self.pp, self.virtual_stages, stage)

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


_REPEAT = re.compile(r"\(([^()]*)\)\*(\d+)|([EtL])\*(\d+)")


def _expand(text: str) -> str:
    """Expand ``x*N`` and ``(group)*N`` (innermost groups first) into plain tokens."""
    previous = None
    while previous != text:
        previous = text
        text = _REPEAT.sub(
            lambda m: (
                (m.group(1) * int(m.group(2)))
                if m.group(1) is not None
                else m.group(3) * int(m.group(4))
            ),
            text,
        )
    return text


def parse_layout_string(text: str, num_layers: int) -> tuple[int, ...]:
    """Blocks (layers per stage) from a Megatron-style layout string.

    ``E`` must open the first stage and ``L`` close the last (this model embeds on the first
    stage and computes the loss on the last); ``,`` is accepted as a separator inside a stage, as
    in Megatron's ``t,L``. A stage may hold no layers.
    """
    field = "parallel.pipeline_layout"
    raw = "".join(text.split()).replace(",", "")
    expanded = _expand(raw)
    bad = sorted(set(expanded) - set("EtL|"))
    if bad:
        raise ConfigError(
            f"{field}: {text!r} has unexpected characters {''.join(bad)!r}; use E (embedding), "
            "t (layer), L (loss), | between stages, and x*N or (group)*N to repeat"
        )
    stages = expanded.split("|")
    if expanded.endswith("|") and len(stages) > 1 and stages[-1] == "":
        # "(t|)*4" style repetition leaves a trailing separator: not an extra stage.
        stages = stages[:-1]
    if expanded.count("E") != 1 or not stages[0].startswith("E"):
        raise ConfigError(f"{field}: {text!r} must start with E (the embedding) exactly once")
    if expanded.count("L") != 1 or not stages[-1].endswith("L"):
        raise ConfigError(f"{field}: {text!r} must end with L (the loss) exactly once")
    blocks = tuple(s.count("t") for s in stages)
    if sum(blocks) != num_layers:
        raise ConfigError(
            f"{field}: {text!r} places {sum(blocks)} layers but model.num_layers = {num_layers}"
        )
    return blocks


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
    """The configured split as blocks; ``auto_blocks`` is the balancer's answer for ``auto``."""
    stages = parallel.pp * parallel.virtual_stages
    if parallel.pipeline_layout is not None:
        if parallel.pipeline_blocks is not None:
            raise ConfigError(
                "parallel.pipeline_layout: give either pipeline_layout or pipeline_blocks, not both"
            )
        blocks = parse_layout_string(parallel.pipeline_layout, model.num_layers)
        if len(blocks) != stages:
            raise ConfigError(
                f"parallel.pipeline_layout: {parallel.pipeline_layout!r} has {len(blocks)} "
                f"stages but parallel.pp * parallel.virtual_stages = {stages}"
            )
        return blocks
    if parallel.pipeline_blocks == "auto":
        if auto_blocks is None:
            raise ConfigError(
                "parallel.pipeline_blocks: auto needs the balancer (yuanlfa.planner.balance)"
            )
        return tuple(auto_blocks)
    if parallel.pipeline_blocks is not None:
        return tuple(parallel.pipeline_blocks)
    if model.num_layers % stages:
        raise ConfigError(
            f"parallel.pp: model.num_layers={model.num_layers} is not divisible by {stages} "
            "stages; give parallel.pipeline_blocks (a list, or auto) or parallel.pipeline_layout"
        )
    return uniform_blocks(model.num_layers, stages)


def build_layout(
    parallel: ParallelConfig, model: ModelConfig, auto_blocks: tuple[int, ...] | None = None
) -> PipelineLayout:
    return PipelineLayout(
        resolve_blocks(parallel, model, auto_blocks),
        parallel.pp,
        parallel.virtual_stages,
        schedule_spec(parallel.schedule).placement,
    )
