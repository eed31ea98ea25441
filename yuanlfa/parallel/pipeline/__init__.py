"""Pipeline parallelism: stage layouts, stage modules and schedules."""

from yuanlfa.parallel.pipeline.layout import (
    PipelineLayout,
    build_layout,
    parse_layout_string,
    resolve_blocks,
    uniform_blocks,
)

__all__ = [
    "PipelineLayout",
    "build_layout",
    "parse_layout_string",
    "resolve_blocks",
    "uniform_blocks",
]
