"""The syntax and consistency of a configured pipeline split (``parallel.pipeline_blocks`` or
``parallel.pipeline_layout``), checked when a config is loaded.

Resolving a split (the even one, the balancer's ``auto``, the stages of each rank) is
:mod:`yuanlfa.layout.splits`' job; it reads the configured split through
:func:`configured_blocks`, so what a user may write is defined here once.
"""

from __future__ import annotations

import re
from typing import Literal

from yuanlfa.config.schema import ConfigError, ModelConfig, ParallelConfig

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


def blocks_problem(
    blocks: tuple[int, ...],
    stages: int,
    num_layers: int,
    stages_from: str = "parallel.pp * parallel.virtual_stages",
    layers_from: str = "model.num_layers",
) -> str | None:
    """The rule for a block list (layers per stage): what is wrong with it, as words naming where
    the stage and layer counts come from, or None. Configs and checkpoint converters (which name
    their own flags) share it."""
    if len(blocks) != stages:
        return f"has {len(blocks)} entries but {stages_from} = {stages}"
    if any(b < 0 for b in blocks):
        return f"entries must be >= 0, got {list(blocks)}"
    if sum(blocks) != num_layers:
        return f"sums to {sum(blocks)} but {layers_from} = {num_layers}"
    return None


def uneven_problem(
    num_layers: int, stages: int, layers_from: str = "model.num_layers"
) -> str | None:
    """The even split needs whole layers per stage: the problem, as words, or None."""
    if num_layers % stages:
        return f"{layers_from}={num_layers} is not divisible by {stages} stages"
    return None


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def configured_blocks(
    parallel: ParallelConfig, model: ModelConfig
) -> tuple[int, ...] | Literal["auto"] | None:
    """The split the config gives, checked: its blocks (from the block list or the layout
    string), ``"auto"`` (the balancer decides) or None (the even split, which needs the layers
    to divide evenly over the stages)."""
    stages = parallel.pp * parallel.virtual_stages
    _require(
        parallel.pipeline_layout is None or parallel.pipeline_blocks is None,
        "parallel.pipeline_layout: give either pipeline_layout or pipeline_blocks, not both",
    )
    if parallel.pipeline_layout is not None:
        blocks = parse_layout_string(parallel.pipeline_layout, model.num_layers)
        _require(
            len(blocks) == stages,
            f"parallel.pipeline_layout: {parallel.pipeline_layout!r} has {len(blocks)} stages "
            f"but parallel.pp * parallel.virtual_stages = {stages}",
        )
        return blocks
    if parallel.pipeline_blocks == "auto":
        return "auto"
    if parallel.pipeline_blocks is not None:
        blocks = tuple(parallel.pipeline_blocks)
        problem = blocks_problem(blocks, stages, model.num_layers)
        _require(problem is None, f"parallel.pipeline_blocks: {problem}")
        return blocks
    problem = uneven_problem(model.num_layers, stages)
    _require(
        problem is None,
        f"parallel.pp: {problem}; give parallel.pipeline_blocks (a list, or auto) or "
        "parallel.pipeline_layout",
    )
    return None
