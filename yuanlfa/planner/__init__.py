"""Sizes and costs computed from configs alone (no model is built): parameters, FLOPs, memory
(static and activations), time per pipeline rank, and the pipeline balancer."""

from yuanlfa.planner.activations import (
    ActivationSpec,
    StageActivations,
    activation_spec,
    in_flight_microbatches,
    layer_activation_bytes,
    microbatch_activations,
    rank_ops,
    stage_activation_bytes,
)
from yuanlfa.planner.balance import BalanceResult, auto_blocks, balance, best_blocks
from yuanlfa.planner.cost import CostModel, PlanCost, RankCost, cost_model, simulate
from yuanlfa.planner.devices import (
    DEFAULT_MFU,
    PRESETS,
    DevicePreset,
    device_from_cuda_name,
    get_device,
)
from yuanlfa.planner.flops import flops_per_token
from yuanlfa.planner.memory import StageMemory, stage_memory
from yuanlfa.planner.params import ParamCounts, param_counts, stage_blocks

__all__ = [
    "DEFAULT_MFU",
    "PRESETS",
    "ActivationSpec",
    "BalanceResult",
    "CostModel",
    "DevicePreset",
    "ParamCounts",
    "PlanCost",
    "RankCost",
    "StageActivations",
    "StageMemory",
    "activation_spec",
    "auto_blocks",
    "balance",
    "best_blocks",
    "cost_model",
    "device_from_cuda_name",
    "flops_per_token",
    "get_device",
    "in_flight_microbatches",
    "layer_activation_bytes",
    "microbatch_activations",
    "param_counts",
    "rank_ops",
    "simulate",
    "stage_activation_bytes",
    "stage_blocks",
    "stage_memory",
]
