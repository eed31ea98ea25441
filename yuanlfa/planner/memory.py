"""Bytes per parameter of weights, gradients and optimizer states, and the parameters one
rank holds per layer and besides the layers (per-stage totals: :mod:`yuanlfa.planner.stages`)."""

from __future__ import annotations

from dataclasses import dataclass

from yuanlfa.config import Config
from yuanlfa.layout.schedules import schedule_spec
from yuanlfa.planner.params import param_counts


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter: weights, gradients, and optimizer states before dp sharding."""

    weights: int
    grads: int
    optimizer: int
    optimizer_shards: int  # dp with the distributed optimizer, else 1

    def of(self, params: int) -> tuple[int, int, int]:
        return (
            params * self.weights,
            params * self.grads,
            -(-params * self.optimizer // self.optimizer_shards),
        )


def state_bytes(cfg: Config, dp: int, gpu: bool | None = None) -> StateBytes:
    """As the trainer stores them. ``train.param_dtype: bf16``: bf16 weights, gradients
    accumulated in fp32, fp32 master weights and two Adam moments (2 + 4 + 12 bytes per
    parameter). fp32 parameters (also under bf16 autocast): fp32 weights and gradients and the
    two moments (4 + 4 + 8). The distributed optimizer divides the optimizer bytes by dp.
    ``gpu`` is accepted for symmetry with the activation model (precision does not change the
    stored state)."""
    del gpu
    bf16_params = cfg.train.param_dtype == "bf16"
    weight_b, grad_b, optim_b = (2, 4, 12) if bf16_params else (4, 4, 8)
    return StateBytes(weight_b, grad_b, optim_b, dp if cfg.optim.distributed else 1)


def layer_params(cfg: Config) -> int:
    """Parameters of one decoder layer on one tensor-parallel rank. Replicated parameters
    (norms, the built-in filters, what a plug-in leaves out of its tp_plan) are held whole by
    every rank."""
    counts = param_counts(cfg.model)
    return counts.per_layer_replicated + counts.per_layer_sharded // cfg.parallel.tp


def stage_extra_params(cfg: Config, first: bool, last: bool, num_stages: int) -> int:
    """Parameters besides the layers: the embedding on the first stage; the final norm, the head
    and (tied, pp > 1) the last stage's copy of the embedding matrix."""
    counts, tp = param_counts(cfg.model), cfg.parallel.tp
    params = counts.embedding // tp if first else 0
    if last:
        params += counts.final_norm + counts.head // tp
        # A V-shaped placement puts the last stage on the first stage's rank: no copy there.
        ends_apart = not schedule_spec(cfg.parallel.schedule).ends_on_one_rank
        if num_stages > 1 and cfg.model.tie_embeddings and ends_apart:
            params += counts.embedding // tp
    return params
