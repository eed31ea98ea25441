"""The device mesh: one validated object holding the tensor/pipeline/data-parallel groups.

Ranks are laid out by ``parallel.rank_order`` (fastest-varying first; default tp, then dp, then
pp as in Megatron, so tensor parallelism stays inside a node). Nothing here is global: the mesh
is built once and passed to whatever needs a group.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch.distributed as dist

from yuanlfa.config import ConfigError, ModelConfig, ParallelConfig
from yuanlfa.layout.schedules import schedule_spec

DIMS = ("tp", "dp", "pp")


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


def _sizes(parallel: ParallelConfig, world_size: int) -> dict[str, int]:
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


def validate_for_model(parallel: ParallelConfig, model: ModelConfig) -> None:
    tp = parallel.tp
    for name, value in (
        ("model.num_heads", model.num_heads),
        ("the ffn size", model.ffn_size),
        ("model.vocab_size", model.vocab_size),
    ):
        if value is not None and value % tp:
            raise ConfigError(f"parallel.tp: {tp} does not divide {name} = {value}")


def build_mesh(
    parallel: ParallelConfig, world_size: int, rank: int, model: ModelConfig | None = None
) -> Mesh:
    """Validate the layout and create one process group per dim slice.

    Every rank must call this collectively (``new_group`` is collective), in the same order.
    With a world of one process no groups are created.
    """
    sizes = _sizes(parallel, world_size)
    if model is not None:
        validate_for_model(parallel, model)
    order = tuple(parallel.rank_order.split("-"))
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
        others = [d for d in DIMS if d != dim]
        for fixed in itertools.product(*(range(sizes[d]) for d in others)):
            base = dict(zip(others, fixed))
            ranks = [coords_rank(order, sizes, {**base, dim: i}) for i in range(sizes[dim])]
            group = dist.new_group(ranks)
            if rank in ranks:
                mesh.groups[dim] = group
    if sizes["pp"] > 1 and not schedule_spec(parallel.schedule).ends_on_one_rank:
        # The tied embedding lives on the first stage (input) and the last (head): their
        # gradients are summed over this two-rank group each step. (V-shaped schedules put
        # both stages on pipeline rank 0, whose one embedding collects both gradients.)
        for fixed in itertools.product(range(sizes["tp"]), range(sizes["dp"])):
            base = dict(zip(("tp", "dp"), fixed))
            ranks = [coords_rank(order, sizes, {**base, "pp": i}) for i in (0, sizes["pp"] - 1)]
            group = dist.new_group(ranks)
            if rank in ranks:
                mesh.groups["embed"] = group
    return mesh
