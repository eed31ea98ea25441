"""Gradient bookkeeping across tensor-parallel ranks: replicated-parameter reduction, the global
norm (replicated parameters counted once) and clipping."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from yuanlfa.parallel.data_parallel import allreduce_flat


def is_sharded(param: nn.Parameter) -> bool:
    return getattr(param, "tensor_parallel", False)


def allreduce_replicated_grads(params: list[nn.Parameter], group) -> None:
    """Sum the gradients of tp-replicated parameters (norms, LFA) over the tp group.

    Under sequence parallelism each rank's gradient covers only its sequence shard; the sum is
    the full gradient, identical on every rank afterwards. One flat buffer, one collective.
    """
    allreduce_flat([p.grad for p in params if p.grad is not None and not is_sharded(p)], group)


def global_grad_norm(params: list[nn.Parameter], tp_group=None) -> float:
    """L2 norm of the whole model's gradient: sharded parts summed over tp, replicated ones once."""
    sharded = [p.grad for p in params if p.grad is not None and is_sharded(p)]
    replicated = [p.grad for p in params if p.grad is not None and not is_sharded(p)]
    device = (sharded or replicated)[0].device
    acc = torch.promote_types((sharded or replicated)[0].dtype, torch.float32)

    def sq(gs: list[torch.Tensor]) -> torch.Tensor:
        return sum((g.to(acc).pow(2).sum() for g in gs), torch.zeros((), dtype=acc, device=device))

    sharded_sq = sq(sharded)
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(sharded_sq, group=tp_group)
    return float((sharded_sq + sq(replicated)).sqrt())


def clip_grads(params: list[nn.Parameter], max_norm: float, total_norm: float) -> None:
    """Scale gradients so their global norm is at most max_norm (torch's clip_grad_norm_ rule)."""
    if not math.isfinite(total_norm) or max_norm <= 0:
        return
    coef = max_norm / (total_norm + 1e-6)
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
