from __future__ import annotations

import math

from yuanlfa.config import OptimConfig


def learning_rate(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """LR for optimizer step ``step`` (0-based): linear warmup, then decay to min_lr.

    Warmup reaches cfg.lr at step warmup_steps; decay runs over decay_steps (default: the whole
    run) and stays at min_lr afterwards, as in Megatron's OptimizerParamScheduler.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    decay_steps = cfg.decay_steps if cfg.decay_steps is not None else total_steps
    span = max(decay_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    if cfg.lr_schedule == "linear":
        coeff = 1.0 - progress
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)
