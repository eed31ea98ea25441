"""Sizes and costs computed from configs alone (no model is built): parameters, FLOPs, memory
(static and activations), time per pipeline rank on a cluster's links, the pipeline balancer,
the layout advisor and the calibration of the time model on measurements."""

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
from yuanlfa.planner.advisor import Advice, Layout, Ranked, advise, apply_layout, snippet
from yuanlfa.planner.advisor_mixed import advise_mixed
from yuanlfa.planner.balance import BalanceResult, auto_blocks, balance, best_blocks
from yuanlfa.planner.calibrate import fit_flops_per_s, fit_latency_s, flops_from_layer_time
from yuanlfa.planner.cluster import MixedCluster, mixed_cluster, pipeline_devices
from yuanlfa.planner.cluster_plan import ClusterPlan, cluster_plan, predicted_busy_s
from yuanlfa.planner.components import ComponentCost, component_cost, declare_cost, unknown_costs
from yuanlfa.planner.cost import CostModel, PlanCost, RankCost, cost_model, simulate
from yuanlfa.planner.devices import (
    DEFAULT_MFU,
    PRESETS,
    DevicePreset,
    device_from_cuda_name,
    get_device,
)
from yuanlfa.planner.flops import flops_per_token
from yuanlfa.planner.links import (
    Link,
    ring_all_gather_s,
    ring_all_reduce_s,
    ring_reduce_scatter_s,
)
from yuanlfa.planner.params import ParamCounts, param_counts
from yuanlfa.planner.recompute import RecomputePlan, balance_recompute
from yuanlfa.planner.stages import StageMemory, config_blocks, stage_memory
from yuanlfa.planner.topology import Cluster, LinkPlan, link_plan
from yuanlfa.planner.weak_link import bandwidth_sweep, paper_comparison

__all__ = [
    "predicted_busy_s",
    "pipeline_devices",
    "mixed_cluster",
    "cluster_plan",
    "balance_recompute",
    "advise_mixed",
    "RecomputePlan",
    "ClusterPlan",
    "MixedCluster",
    "DEFAULT_MFU",
    "PRESETS",
    "ActivationSpec",
    "Advice",
    "BalanceResult",
    "Cluster",
    "ComponentCost",
    "CostModel",
    "DevicePreset",
    "Layout",
    "Link",
    "LinkPlan",
    "ParamCounts",
    "PlanCost",
    "RankCost",
    "Ranked",
    "StageActivations",
    "StageMemory",
    "activation_spec",
    "advise",
    "apply_layout",
    "auto_blocks",
    "balance",
    "bandwidth_sweep",
    "config_blocks",
    "best_blocks",
    "component_cost",
    "cost_model",
    "declare_cost",
    "device_from_cuda_name",
    "fit_flops_per_s",
    "fit_latency_s",
    "flops_from_layer_time",
    "flops_per_token",
    "get_device",
    "in_flight_microbatches",
    "layer_activation_bytes",
    "link_plan",
    "microbatch_activations",
    "paper_comparison",
    "param_counts",
    "rank_ops",
    "ring_all_gather_s",
    "ring_all_reduce_s",
    "ring_reduce_scatter_s",
    "simulate",
    "snippet",
    "stage_activation_bytes",
    "stage_memory",
    "unknown_costs",
]
