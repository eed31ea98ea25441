"""Bytes of weights, gradients and optimizer states held by one rank of each pipeline stage."""

from __future__ import annotations

from dataclasses import dataclass

from yuanlfa.config import Config
from yuanlfa.planner.params import param_counts, stage_blocks


@dataclass(frozen=True)
class StageMemory:
    stage: int
    layers: int
    params: int  # held by one tensor-parallel rank of this stage
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes


def stage_memory(cfg: Config, dp: int) -> list[StageMemory]:
    """Static memory of one rank of each pipeline rank's stages (activations excluded).

    bf16 training keeps bf16 weights and gradients plus fp32 master weights and two Adam moments
    (12 bytes per parameter); fp32 training keeps fp32 weights and gradients and the two moments.
    The distributed optimizer divides the optimizer bytes by dp. Replicated parameters (norms, and
    LFA without sequence parallelism) are held whole by every tensor-parallel rank.
    """
    m, p = cfg.model, cfg.parallel
    counts = param_counts(m)
    blocks = stage_blocks(m, p)
    bf16 = cfg.train.precision == "bf16" or (
        cfg.train.precision == "auto" and cfg.train.device == "cuda"
    )
    weight_b, grad_b, optim_b = (2, 2, 12) if bf16 else (4, 4, 8)
    shard = dp if cfg.optim.distributed else 1
    per_layer = counts.per_layer_replicated + counts.per_layer_sharded // p.tp
    # Under interleaving, virtual stage s runs on pipeline rank s % pp.
    layers_on = [0] * p.pp
    params_on = [0] * p.pp
    for stage, layers in enumerate(blocks):
        rank = stage % p.pp
        layers_on[rank] += layers
        params_on[rank] += layers * per_layer
        if stage == 0:
            params_on[rank] += counts.embedding // p.tp
        if stage == len(blocks) - 1:
            params_on[rank] += counts.final_norm + counts.head // p.tp
            if len(blocks) > 1 and m.tie_embeddings:
                params_on[rank] += counts.embedding // p.tp  # the last stage's tied copy
    return [
        StageMemory(
            stage=rank,
            layers=layers_on[rank],
            params=params,
            weights_bytes=params * weight_b,
            grads_bytes=params * grad_b,
            optimizer_bytes=-(-params * optim_b // shard),
        )
        for rank, params in enumerate(params_on)
    ]
