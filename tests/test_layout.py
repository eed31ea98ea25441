"""The layout vocabulary: rank coordinates and groups, the stage -> rank mapping and the
layer -> stage lookup, and the shared split rules."""

from __future__ import annotations

import itertools

import pytest

from yuanlfa.config import (
    ConfigError,
    ModelConfig,
    ParallelConfig,
    blocks_problem,
    tp_indivisible,
    uneven_problem,
)
from yuanlfa.layout import (
    DIMS,
    PipelineLayout,
    coords_rank,
    dim_sizes,
    embedding_group_ranks,
    group_ranks,
    rank_coords,
    rank_of_stage,
    rank_order,
    stages_of_rank,
)

ORDERS = ["tp-dp-pp", "tp-pp-dp", "dp-tp-pp"]


@pytest.mark.parametrize("order_name", ORDERS)
def test_groups_partition_the_world_along_one_dim(order_name: str) -> None:
    parallel = ParallelConfig(tp=2, pp=3, rank_order=order_name)
    sizes = dim_sizes(parallel, 12)
    assert sizes == {"tp": 2, "dp": 2, "pp": 3}
    order = rank_order(parallel)
    for rank in range(12):
        assert coords_rank(order, sizes, rank_coords(order, sizes, rank)) == rank
    for dim in DIMS:
        groups = group_ranks(order, sizes, dim)
        assert sorted(itertools.chain(*groups)) == list(range(12))
        for ranks in groups:
            coords = [rank_coords(order, sizes, r) for r in ranks]
            assert [c[dim] for c in coords] == list(range(sizes[dim]))
            others = {tuple(c[d] for d in DIMS if d != dim) for c in coords}
            assert len(others) == 1
    for first, last in embedding_group_ranks(order, sizes):
        assert rank_coords(order, sizes, first)["pp"] == 0
        assert rank_coords(order, sizes, last)["pp"] == 2


def test_tp_varies_fastest_by_default() -> None:
    sizes = {"tp": 2, "dp": 3, "pp": 2}
    assert [rank_coords(("tp", "dp", "pp"), sizes, r)["tp"] for r in range(4)] == [0, 1, 0, 1]


def test_world_size_must_match() -> None:
    with pytest.raises(ConfigError, match="world size 7"):
        dim_sizes(ParallelConfig(tp=2, pp=2, dp=2), 7)


def test_stages_and_ranks_agree() -> None:
    layout = PipelineLayout((1, 2, 0, 3, 1, 1), pp=3, virtual_stages=2)
    for rank in range(3):
        stages = stages_of_rank(rank, 3, 2)
        assert stages == layout.stages_of_rank(rank) == [rank, rank + 3]
        assert all(rank_of_stage(s, 3) == layout.rank_of_stage(s) == rank for s in stages)
    for stage in range(layout.num_stages):
        for layer in layout.layer_ids(stage):
            assert layout.stage_of_layer(layer) == stage
    with pytest.raises(ValueError, match="beyond the split"):
        layout.stage_of_layer(8)


def test_shared_split_and_tp_rules() -> None:
    assert blocks_problem((2, 2), 2, 4) is None
    assert "has 3 entries" in blocks_problem((1, 1, 2), 2, 4)
    assert ">= 0" in blocks_problem((5, -1), 2, 4)
    assert "sums to 3" in blocks_problem((1, 2), 2, 4, "pp", "the layers")
    assert uneven_problem(4, 2) is None and "not divisible by 3" in uneven_problem(4, 3)
    model = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, vocab_size=130)
    assert tp_indivisible(2, model) is None
    assert "model.num_heads" in tp_indivisible(8, model)
    assert "model.vocab_size" in tp_indivisible(
        4, ModelConfig(hidden_size=64, num_heads=4, vocab_size=130)
    )
