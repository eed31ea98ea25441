from __future__ import annotations

import torch
from torch import nn

from yuanlfa.config import OptimConfig
from yuanlfa.parallel.dp.zero import no_weight_decay


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
    device = next(model.parameters()).device
    fused = cfg.fused
    if fused is None:
        # Fused AdamW exists for CUDA (and CPU in recent torch); on CPU the foreach path is as
        # fast for small models and gives identical results, so only fuse on accelerators.
        fused = device.type == "cuda"
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused or None,
    )
