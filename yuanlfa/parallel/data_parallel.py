"""Data parallelism: gradient reduction over the dp group, in contiguous buckets."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

BUCKET_ELEMENTS = 1 << 24


def allreduce_flat(tensors: list[torch.Tensor], group, bucket_elements: int = BUCKET_ELEMENTS):
    """Sum ``tensors`` in place over ``group``, packed into contiguous buckets (one collective per
    bucket instead of one per tensor). Reduction happens in fp32 (fp64 for fp64) whatever the
    gradient dtype."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors + [None]:
        if t is not None and (not bucket or size + t.numel() <= bucket_elements):
            bucket.append(t)
            size += t.numel()
            continue
        if bucket:
            dtype = torch.promote_types(bucket[0].dtype, torch.float32)
            flat = torch.cat([b.reshape(-1).to(dtype) for b in bucket])
            dist.all_reduce(flat, group=group)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()
        bucket, size = ([t], t.numel()) if t is not None else ([], 0)


def allreduce_gradients(params: list[nn.Parameter], group) -> None:
    """Sum the gradients over the data-parallel group.

    The trainer divides each rank's loss by the token count of the whole global batch, so the sum
    over ranks is exactly the gradient of the global-batch mean loss.
    """
    from yuanlfa.parallel.grads import grad_of

    grads = [grad_of(p) for p in params]
    allreduce_flat([g for g in grads if g is not None], group)
