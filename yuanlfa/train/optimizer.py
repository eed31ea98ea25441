"""The optimizer and its gradient path, chosen from the config."""

from __future__ import annotations

import torch
from torch import nn

from yuanlfa.config import Config, OptimConfig
from yuanlfa.parallel import Mesh
from yuanlfa.parallel.dp.zero import ShardedAdamW, fused_adamw, no_weight_decay
from yuanlfa.parallel.grad_sync import GradSync, ReplicatedGradSync, ShardedGradSync


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters, fused where torch supports the device."""
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if no_weight_decay(name, param) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    # Fused AdamW exists for CUDA (and CPU in recent torch); on CPU the foreach path is as fast
    # for small models and gives identical results, so by default only fuse on accelerators.
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused_adamw(cfg, next(model.parameters()).device),
    )


def uses_sharded_optimizer(cfg: Config, mesh: Mesh) -> bool:
    return cfg.optim.distributed and mesh.dp > 1


def build_optimizer_and_sync(
    model: nn.Module, cfg: Config, mesh: Mesh, param_dtype: torch.dtype
) -> tuple[ShardedAdamW | torch.optim.AdamW, GradSync]:
    """The optimizer and the one gradient path the trainer drives. Low-precision parameters step
    through fp32 master weights: sharded over dp (ZeRO-1), or whole on every replica."""
    par = cfg.parallel
    sharded = uses_sharded_optimizer(cfg, mesh)
    if sharded or param_dtype != torch.float32:
        optimizer = ShardedAdamW(
            model,
            cfg.optim,
            mesh.dp_group,
            mesh.tp_group,
            mesh.pp_group,
            shard=sharded,
            embed_group=mesh.embed_group,
            sequence_parallel=par.sequence_parallel,
            bucket_elements=par.grad_bucket_size,
            overlap=par.overlap_grad_reduce,
        )
        return optimizer, ShardedGradSync(optimizer)
    sync = ReplicatedGradSync(
        model,
        mesh,
        sequence_parallel=par.sequence_parallel,
        bucket_elements=par.grad_bucket_size,
        overlap=par.overlap_grad_reduce,
    )
    return build_optimizer(model, cfg.optim), sync
