"""The device mesh: one validated object holding the tensor/pipeline/data-parallel groups.

Ranks are laid out by ``parallel.rank_order`` (the arithmetic is :mod:`yuanlfa.layout.ranks`).
Nothing here is global: the mesh is built once and passed to whatever needs a group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from yuanlfa.config import ConfigError, ModelConfig, ParallelConfig, tp_indivisible
from yuanlfa.layout.ranks import (
    DIMS,
    dim_sizes,
    embedding_group_ranks,
    group_ranks,
    rank_coords,
    rank_order,
)
from yuanlfa.layout.schedules import schedule_spec


@dataclass
class Mesh:
    tp: int
    dp: int
    pp: int
    rank: int
    order: tuple[str, ...]
    coords: dict[str, int]
    groups: dict[str, dist.ProcessGroup | None] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.tp * self.dp * self.pp

    @property
    def tp_rank(self) -> int:
        return self.coords["tp"]

    @property
    def dp_rank(self) -> int:
        return self.coords["dp"]

    @property
    def pp_rank(self) -> int:
        return self.coords["pp"]

    @property
    def tp_group(self) -> dist.ProcessGroup | None:
        return self.groups.get("tp")

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self.groups.get("dp")

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        return self.groups.get("pp")

    @property
    def embed_group(self) -> dist.ProcessGroup | None:
        """First and last pipeline rank of this tp/dp slice (they share the tied embedding)."""
        return self.groups.get("embed")

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def build_mesh(
    parallel: ParallelConfig, world_size: int, rank: int, model: ModelConfig | None = None
) -> Mesh:
    """Validate the layout and create one process group per dim slice.

    Every rank must call this collectively (``new_group`` is collective), in the same order.
    With a world of one process no groups are created.
    """
    sizes = dim_sizes(parallel, world_size)
    problem = tp_indivisible(parallel.tp, model) if model is not None else None
    if problem is not None:
        raise ConfigError(f"parallel.tp: {problem}")
    order = rank_order(parallel)
    mesh = Mesh(
        tp=sizes["tp"],
        dp=sizes["dp"],
        pp=sizes["pp"],
        rank=rank,
        order=order,
        coords=rank_coords(order, sizes, rank),
    )
    if world_size == 1:
        return mesh
    for dim in DIMS:
        if sizes[dim] == 1:
            # Alone in this dim: no group (every user takes None as "nothing to exchange"),
            # which saves world_size communicators and their set-up per size-1 dim.
            continue
        for ranks in group_ranks(order, sizes, dim):
            group = dist.new_group(ranks)
            if rank in ranks:
                mesh.groups[dim] = group
    if sizes["pp"] > 1 and not schedule_spec(parallel.schedule).ends_on_one_rank:
        # The tied embedding lives on the first stage (input) and the last (head): their
        # gradients are summed over this two-rank group each step; with two stages that is the
        # pipeline group itself. (V-shaped schedules put both stages on pipeline rank 0, whose
        # one embedding collects both gradients.)
        for ranks in embedding_group_ranks(order, sizes):
            same = sizes["pp"] == 2
            group = None if same else dist.new_group(ranks)
            if rank in ranks:
                mesh.groups["embed"] = mesh.groups["pp"] if same else group
    return mesh
