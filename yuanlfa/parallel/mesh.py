"""The device mesh: one validated object holding the tensor/pipeline/data-parallel groups.

Ranks are laid out by ``parallel.rank_order`` (the arithmetic is :mod:`yuanlfa.layout.ranks`).
Nothing here is global: the mesh is built once and passed to whatever needs a group.

Islands (``parallel.islands``) are the outermost rank dimension: island ``i`` holds the ranks
``i * S .. (i + 1) * S - 1`` (``S`` = tp * dp * pp) and every group above lives inside one island,
except that with ``joined`` islands (``outer.algorithm: none``) the dp group spans them (dp is
then islands * dp, island-major). The ``island`` group joins the ranks holding the same piece
(tp, pp, dp coordinates) in every island: the outer step's exchange.
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
    # Islands of this launch and this rank's; joined: the dp dims above span the islands.
    islands: int = 1
    island: int = 0
    joined: bool = True

    @property
    def world_size(self) -> int:
        return self.tp * self.dp * self.pp * (1 if self.joined else self.islands)

    @property
    def data_dp(self) -> int:
        """Data shards per step (every island's dp ranks read a share of the global batch)."""
        return self.dp if self.joined else self.dp * self.islands

    @property
    def data_rank(self) -> int:
        """This rank's share of the global batch, island-major."""
        return self.dp_rank if self.joined else self.island * self.dp + self.dp_rank

    @property
    def island_group(self) -> dist.ProcessGroup | None:
        """The ranks holding this rank's piece in every island (None with one island or
        joined islands)."""
        return self.groups.get("island")

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
    parallel: ParallelConfig,
    world_size: int,
    rank: int,
    model: ModelConfig | None = None,
    joined: bool = True,
) -> Mesh:
    """Validate the layout and create one process group per dim slice.

    Every rank must call this collectively (``new_group`` is collective), in the same order.
    With a world of one process no groups are created. ``world_size`` counts every island of
    this launch (``parallel.islands``); ``joined`` islands are plain dp replicas of each other
    (``outer.algorithm: none``), else each reduces inside itself and the ``island`` group
    joins them.
    """
    islands = parallel.islands
    if world_size % islands != 0:
        raise ConfigError(
            f"parallel.islands: {islands} islands do not divide the world size {world_size}"
        )
    size = world_size // islands  # ranks per island
    sizes = dim_sizes(parallel, size)
    problem = tp_indivisible(parallel.tp, model) if model is not None else None
    if problem is not None:
        raise ConfigError(f"parallel.tp: {problem}")
    order = rank_order(parallel)
    island, local = divmod(rank, size)
    joined = joined or islands == 1
    coords = rank_coords(order, sizes, local)
    mesh = Mesh(
        tp=sizes["tp"],
        dp=sizes["dp"] * (islands if joined else 1),
        pp=sizes["pp"],
        rank=rank,
        order=order,
        coords={**coords, "dp": coords["dp"] + (island * sizes["dp"] if joined else 0)},
        islands=islands,
        island=island,
        joined=joined,
    )
    if world_size == 1:
        return mesh

    def new_group(ranks: list[int]) -> dist.ProcessGroup:
        group = dist.new_group(ranks)
        return group

    for dim in DIMS:
        spans = dim == "dp" and joined and islands > 1
        if sizes[dim] == 1 and not spans:
            # Alone in this dim: no group (every user takes None as "nothing to exchange"),
            # which saves world_size communicators and their set-up per size-1 dim.
            continue
        for local_ranks in group_ranks(order, sizes, dim):
            if spans:  # one group over every island, island-major (the dp rank order above)
                every = [[r + i * size for i in range(islands) for r in local_ranks]]
            else:
                every = [[r + i * size for r in local_ranks] for i in range(islands)]
            for ranks in every:
                group = new_group(ranks)
                if rank in ranks:
                    mesh.groups[dim] = group
    if sizes["pp"] > 1 and not schedule_spec(parallel.schedule).ends_on_one_rank:
        # The tied embedding lives on the first stage (input) and the last (head): their
        # gradients are summed over this two-rank group each step; with two stages that is the
        # pipeline group itself. (V-shaped schedules put both stages on pipeline rank 0, whose
        # one embedding collects both gradients.)
        same = sizes["pp"] == 2
        for i in range(islands):
            for local_ranks in embedding_group_ranks(order, sizes):
                ranks = [r + i * size for r in local_ranks]
                group = None if same else new_group(ranks)
                if rank in ranks:
                    mesh.groups["embed"] = mesh.groups["pp"] if same else group
    if islands > 1 and not joined:
        for r in range(size):
            ranks = [r + i * size for i in range(islands)]
            group = new_group(ranks)
            if rank in ranks:
                mesh.groups["island"] = group
    return mesh
