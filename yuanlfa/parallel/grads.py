"""Gradient bookkeeping across tensor-parallel ranks: replicated-parameter reduction, the global
norm (replicated parameters counted once) and clipping; the pieces
:class:`~yuanlfa.parallel.grad_sync.ReplicatedGradSync` is made of."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from yuanlfa.parallel.dp.reducer import allreduce_flat
from yuanlfa.parallel.roles import is_pipeline_copy, is_sharded


def grad_of(param: nn.Parameter) -> torch.Tensor | None:
    """The gradient to reduce and step with: the fp32 accumulation buffer of a parameter handled
    by a :class:`~yuanlfa.parallel.dp.reducer.GradReducer`, else ``param.grad``."""
    return param.main_grad if hasattr(param, "main_grad") else param.grad


def sum_over(value: torch.Tensor, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(value, group=group)
    return value


def allreduce_replicated_grads(params: list[nn.Parameter], group) -> None:
    """Sum the gradients of tp-replicated parameters (norms, LFA) over the tp group.

    Under sequence parallelism each rank's gradient covers only its sequence shard; the sum is
    the full gradient, identical on every rank afterwards. One flat buffer, one collective.
    """
    grads = [grad_of(p) for p in params if not is_sharded(p)]
    allreduce_flat([g for g in grads if g is not None], group)


def global_grad_norm(params: list[nn.Parameter], tp_group=None, pp_group=None) -> float:
    """L2 norm of the whole model's gradient: sharded parts summed over tp, replicated ones once,
    every pipeline stage's part summed over pp (pipeline copies counted once)."""
    owned = [p for p in params if grad_of(p) is not None and not is_pipeline_copy(p)]
    sharded = [grad_of(p) for p in owned if is_sharded(p)]
    replicated = [grad_of(p) for p in owned if not is_sharded(p)]
    ref = next(grad_of(p) for p in params if grad_of(p) is not None)
    device = ref.device
    acc = torch.promote_types(ref.dtype, torch.float32)

    def sq(gs: list[torch.Tensor]) -> torch.Tensor:
        # One multi-tensor kernel for all the norms (not a cast, square and sum per parameter),
        # accumulated in fp32 or better whatever the gradients' dtype.
        if not gs:
            return torch.zeros((), dtype=acc, device=device)
        norms = torch._foreach_norm(gs, 2, dtype=acc)
        return torch.linalg.vector_norm(torch.stack(norms)).pow(2)

    total = sum_over(sq(sharded), tp_group) + sq(replicated)
    return float(sum_over(total, pp_group).sqrt())


def clip_grads(params: list[nn.Parameter], max_norm: float, total_norm: float) -> None:
    """Scale gradients so their global norm is at most max_norm (torch's clip_grad_norm_ rule)."""
    if not math.isfinite(total_norm) or max_norm <= 0:
        return
    coef = max_norm / (total_norm + 1e-6)
    if coef < 1.0:
        grads = [grad_of(p) for p in params if grad_of(p) is not None]
        torch._foreach_mul_(grads, coef)
