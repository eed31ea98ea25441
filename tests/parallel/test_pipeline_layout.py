"""Stage layouts: block lists, Megatron-style layout strings, uniform splits, validation."""

from __future__ import annotations

import pytest

from yuanlfa.config import (
    ConfigError,
    ModelConfig,
    ParallelConfig,
    config_from_dict,
    parse_layout_string,
)
from yuanlfa.layout import PipelineLayout, build_layout, uniform_blocks
from yuanlfa.parallel.pp.stage import stage_flags


@pytest.mark.parametrize(
    ("text", "layers", "blocks"),
    [
        ("Ett|tt|ttL", 6, (2, 2, 2)),
        ("E|t*4|tL", 5, (0, 4, 1)),
        ("Et*2|(t*3|)*2tL", 9, (2, 3, 3, 1)),
        ("Ett|tt,L", 4, (2, 2)),
        ("E t t | t t | L", 4, (2, 2, 0)),
    ],
)
def test_layout_strings(text: str, layers: int, blocks: tuple[int, ...]) -> None:
    assert parse_layout_string(text, layers) == blocks


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ttt|tL", "must start with E"),
        ("Ettt|t", "must end with L"),
        ("Ett|EtL", "must start with E"),
        ("Ett|txL", "unexpected characters 'x'"),
        ("Ett|ttL", "places 4 layers but model.num_layers = 5"),
    ],
)
def test_bad_layout_strings_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_layout_string(text, 5)


def test_uniform_split_is_as_even_as_layers_allow() -> None:
    assert uniform_blocks(8, 4) == (2, 2, 2, 2)
    blocks = uniform_blocks(10, 4)
    assert sum(blocks) == 10 and max(blocks) - min(blocks) == 1
    # The extra layers go to middle stages first (the ends hold the embedding and the head).
    assert blocks == (2, 3, 3, 2)
    assert uniform_blocks(84, 32).count(3) == 20


def test_interleaved_stages_and_layers_per_rank() -> None:
    layout = PipelineLayout((1, 2, 0, 3), pp=2, virtual_stages=2)
    assert layout.stages_of_rank(0) == [0, 2] and layout.stages_of_rank(1) == [1, 3]
    assert layout.layer_ids(1) == [1, 2] and layout.layer_ids(2) == []
    assert stage_flags(layout, 0) == ([0], True, False)
    assert stage_flags(layout, 1) == ([1, 2, 3, 4, 5], False, True)
    assert layout.describe() == "Et|tt||tttL"


def test_build_layout_from_each_form() -> None:
    model = ModelConfig(num_layers=6)
    assert build_layout(ParallelConfig(pp=3), model).blocks == (2, 2, 2)
    blocks = ParallelConfig(pp=3, pipeline_blocks=(1, 2, 3))
    assert build_layout(blocks, model).blocks == (1, 2, 3)
    text = ParallelConfig(pp=3, pipeline_layout="Et|ttt|ttL")
    assert build_layout(text, model).blocks == (1, 3, 2)
    with pytest.raises(ConfigError, match="has 3 stages but parallel.pp"):
        build_layout(ParallelConfig(pp=2, pipeline_layout="Et|ttt|ttL"), model)
    with pytest.raises(ConfigError, match="auto needs the balancer"):
        build_layout(ParallelConfig(pp=2, pipeline_blocks="auto"), model)


@pytest.mark.parametrize(
    ("parallel", "message"),
    [
        ({"pp": 2, "pipeline_blocks": [1, 2]}, "sums to 3 but model.num_layers = 4"),
        ({"pp": 2, "pipeline_blocks": [1, 1, 2]}, "has 3 entries but parallel.pp"),
        ({"pp": 3}, "not divisible by 3 stages"),
        ({"pp": 2, "virtual_stages": 2}, "runs one stage per rank"),
        ({"pp": 2, "pipeline_blocks": [2, 2], "pipeline_layout": "Ett|ttL"}, "not both"),
        ({"pp": 2, "pipeline_blocks": "often"}, "pipeline_blocks"),
    ],
)
def test_config_refuses_bad_splits(parallel: dict, message: str) -> None:
    data = {"model": {"num_layers": 4, "hidden_size": 64, "num_heads": 4}, "parallel": parallel}
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_config_accepts_auto_and_layout_strings() -> None:
    model = {"num_layers": 4, "hidden_size": 64, "num_heads": 4}
    auto = config_from_dict({"model": model, "parallel": {"pp": 3, "pipeline_blocks": "auto"}})
    assert auto.parallel.pipeline_blocks == "auto"
    text = config_from_dict({"model": model, "parallel": {"pp": 3, "pipeline_layout": "Et|tt|tL"}})
    assert text.parallel.pipeline_layout == "Et|tt|tL"
