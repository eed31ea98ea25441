"""Rank arithmetic: where each rank sits in the tp x dp x pp grid, the ranks of each group, and
which pipeline rank runs a stage. Plain integers, no process groups: the mesh
(:mod:`yuanlfa.parallel.mesh`) creates groups from these lists and the planner prices the links
between them.

Ranks are laid out by ``parallel.rank_order`` (fastest-varying first; default tp, then dp, then
pp as in Megatron, so tensor parallelism stays inside a node).
"""

from __future__ import annotations

import itertools
from typing import Literal

from yuanlfa.config import ConfigError, ParallelConfig

# Where a schedule puts its stages (see yuanlfa.layout.schedules).
Placement = Literal["looped", "v"]

DIMS = ("tp", "dp", "pp")


def rank_order(parallel: ParallelConfig) -> tuple[str, ...]:
    """The dims from fastest- to slowest-varying."""
    return tuple(parallel.rank_order.split("-"))


def dim_sizes(parallel: ParallelConfig, world_size: int) -> dict[str, int]:
    """Size of each dim for ``world_size`` ranks (dp derived when the config leaves it out)."""
    dp = parallel.dp if parallel.dp is not None else world_size // (parallel.tp * parallel.pp)
    sizes = {"tp": parallel.tp, "dp": dp, "pp": parallel.pp}
    if sizes["tp"] * sizes["dp"] * sizes["pp"] != world_size:
        raise ConfigError(
            f"parallel: tp * dp * pp = {parallel.tp} * {dp} * {parallel.pp} does not equal the "
            f"world size {world_size}"
        )
    return sizes


def rank_coords(order: tuple[str, ...], sizes: dict[str, int], rank: int) -> dict[str, int]:
    """Coordinates of ``rank`` when dims vary in ``order`` (fastest first)."""
    coords = {}
    for dim in order:
        coords[dim] = rank % sizes[dim]
        rank //= sizes[dim]
    return coords


def coords_rank(order: tuple[str, ...], sizes: dict[str, int], coords: dict[str, int]) -> int:
    rank, stride = 0, 1
    for dim in order:
        rank += coords[dim] * stride
        stride *= sizes[dim]
    return rank


def group_ranks(order: tuple[str, ...], sizes: dict[str, int], dim: str) -> list[list[int]]:
    """The groups along ``dim``: one list of ranks (in ``dim`` coordinate order) per setting of
    the other dims, in a fixed order every rank computes alike."""
    others = [d for d in DIMS if d != dim]
    groups = []
    for fixed in itertools.product(*(range(sizes[d]) for d in others)):
        base = dict(zip(others, fixed))
        groups.append([coords_rank(order, sizes, {**base, dim: i}) for i in range(sizes[dim])])
    return groups


def embedding_group_ranks(order: tuple[str, ...], sizes: dict[str, int]) -> list[list[int]]:
    """First and last pipeline rank of each tp/dp slice: the two holders of the tied embedding."""
    groups = []
    for fixed in itertools.product(range(sizes["tp"]), range(sizes["dp"])):
        base = dict(zip(("tp", "dp"), fixed))
        groups.append([coords_rank(order, sizes, {**base, "pp": i}) for i in (0, sizes["pp"] - 1)])
    return groups


def rank_of_stage(
    stage: int, pp: int, virtual_stages: int = 1, placement: Placement = "looped"
) -> int:
    """The pipeline rank running (virtual) stage ``stage``. Looped: round-robin over the pp
    ranks (Megatron's and torch's interleaved schedules). V-shaped (ZBV, DualPipeV): down the
    ranks, then back up, so rank r holds stages r and 2 * pp - 1 - r."""
    lap, offset = divmod(stage, pp)
    if placement == "v" and lap % 2 == 1:
        return pp - 1 - offset
    return offset


def stages_of_rank(
    pp_rank: int, pp: int, virtual_stages: int, placement: Placement = "looped"
) -> list[int]:
    """The stages pipeline rank ``pp_rank`` runs, in stage order."""
    if placement == "v":
        # torch's generate_stage_to_rank_mapping(style="v").
        return [
            pp_rank + k * pp if k % 2 == 0 else (k + 1) * pp - 1 - pp_rank
            for k in range(virtual_stages)
        ]
    return [pp_rank + k * pp for k in range(virtual_stages)]
