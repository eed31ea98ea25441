"""Torch-free vocabulary of a parallel layout: pipeline splits (``splits``) and rank arithmetic
(``ranks``), schedules (``schedules``) and the bytes a collective sends (``traffic``). Imports
only :mod:`yuanlfa.config`; the planner and the runtime both speak it."""

from yuanlfa.layout.ranks import (
    DIMS,
    coords_rank,
    dim_sizes,
    embedding_group_ranks,
    group_ranks,
    rank_coords,
    rank_of_stage,
    rank_order,
    stages_of_rank,
)
from yuanlfa.layout.splits import PipelineLayout, build_layout, resolve_blocks, uniform_blocks

__all__ = [
    "DIMS",
    "PipelineLayout",
    "build_layout",
    "coords_rank",
    "dim_sizes",
    "embedding_group_ranks",
    "group_ranks",
    "rank_coords",
    "rank_of_stage",
    "rank_order",
    "resolve_blocks",
    "stages_of_rank",
    "uniform_blocks",
]
