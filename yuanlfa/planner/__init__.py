"""Sizes and costs computed from configs alone (no model is built)."""

from yuanlfa.planner.flops import flops_per_token
from yuanlfa.planner.memory import StageMemory, stage_memory
from yuanlfa.planner.params import ParamCounts, param_counts, stage_blocks

__all__ = [
    "ParamCounts",
    "StageMemory",
    "flops_per_token",
    "param_counts",
    "stage_blocks",
    "stage_memory",
]
