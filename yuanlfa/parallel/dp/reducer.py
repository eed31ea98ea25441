"""Data parallelism: gradient reduction over the dp group, in contiguous buckets, overlapped with
backward.

Every parameter's gradient accumulates into a view of a persistent flat buffer (fp32 whatever the
parameter dtype), so microbatch accumulation is fp32 and no per-step concatenation is needed. A
bucket is a contiguous run of such buffers in backward order; on the last backward pass of a step,
as soon as autograd has delivered the last gradient of a bucket, that bucket's reduction starts
asynchronously (all-reduce for replicated optimizers, reduce-scatter onto this rank's slice for the
distributed optimizer) while backward goes on with earlier layers. Buckets are launched strictly in
index order, so every data-parallel rank issues the same collectives in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from yuanlfa.parallel.tp.comm import _reduce_scatter

# Megatron-LM's default bucket: large enough to use the links well, small enough to start early.
BUCKET_ELEMENTS = 40_000_000


def allreduce_flat(tensors: list[torch.Tensor], group, bucket_elements: int = 1 << 24):
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


@dataclass(eq=False)
class GradBucket:
    params: list[nn.Parameter]  # in forward order; the buffer holds them in this order
    group: int  # index of the parameter group it was cut from
    numel: int  # without padding
    grad: torch.Tensor  # [numel, padded to a multiple of dp to scatter]; main_grads are views
    shard_grad: torch.Tensor | None  # this rank's reduced slice (reduce-scatter mode)
    pending: int = 0  # gradients still to arrive in this step's last backward pass
    launched: bool = False
    work: dist.Work | None = field(default=None, repr=False)

    @property
    def reduced(self) -> torch.Tensor:
        """After :meth:`GradReducer.finish`: this rank's slice (reduce-scatter) or the whole
        summed buffer (all-reduce, or no data parallelism)."""
        return self.shard_grad if self.shard_grad is not None else self.grad


class GradReducer:
    """Persistent gradient buffers for ``groups`` of parameters and their reduction over
    ``dp_group`` (None: no data parallelism; the buffers still give fp32 accumulation).

    ``scatter``: reduce-scatter each bucket so this rank gets the sum of its 1/dp slice (the
    distributed optimizer); otherwise all-reduce it. ``overlap``: start each bucket's reduction
    from autograd hooks during the last backward pass of the step (see :meth:`start`); otherwise
    everything is reduced in :meth:`finish`.

    A parameter whose gradient arrives without passing through the hook (e.g. torch's zero-bubble
    weight pass, which writes ``.grad`` directly) is folded in by :meth:`finish`; its bucket is then
    reduced there, after backward, which is still correct.
    """

    def __init__(
        self,
        groups: Sequence[Sequence[nn.Parameter]],
        dp_group,
        *,
        scatter: bool,
        bucket_elements: int = BUCKET_ELEMENTS,
        overlap: bool = True,
    ) -> None:
        if bucket_elements < 1:
            raise ValueError(f"bucket_elements must be >= 1, got {bucket_elements}")
        self.dp_group = dp_group
        self.dp = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.rank = dist.get_rank(dp_group) if dp_group is not None else 0
        self.scatter, self.overlap = scatter, overlap
        order = {}  # forward position: buckets whose first parameter comes late finish early
        for params in groups:
            for p in params:
                order.setdefault(p, len(order))
        cut: list[tuple[int, list[nn.Parameter]]] = []
        for index, params in enumerate(groups):
            chunk: list[nn.Parameter] = []
            size = 0
            for p in reversed(list(params)):  # backward order
                if chunk and size + p.numel() > bucket_elements:
                    cut.append((index, chunk[::-1]))
                    chunk, size = [], 0
                chunk.append(p)
                size += p.numel()
            if chunk:
                cut.append((index, chunk[::-1]))
        cut.sort(key=lambda item: -order[item[1][0]])
        self.buckets = [self._make_bucket(index, params) for index, params in cut]
        self._bucket_of = {p: b for b in self.buckets for p in b.params}
        self._next = 0  # the first bucket not launched yet
        self._armed = False
        self.launched_in_backward = 0  # buckets started from hooks in the last step
        for p in self._bucket_of:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def _make_bucket(self, index: int, params: list[nn.Parameter]) -> GradBucket:
        numel = sum(p.numel() for p in params)
        padded = -(-numel // self.dp) * self.dp if self.scatter else numel
        dtype = torch.promote_types(params[0].dtype, torch.float32)
        device = params[0].device
        grad = torch.zeros(padded, dtype=dtype, device=device)
        offset = 0
        for p in params:
            if torch.promote_types(p.dtype, torch.float32) != dtype:
                raise ValueError("a gradient bucket needs parameters of one precision class")
            p.main_grad = grad[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        shard_grad = None
        if self.scatter and self.dp > 1:
            shard_grad = torch.zeros(padded // self.dp, dtype=dtype, device=device)
        return GradBucket(params, index, numel, grad, shard_grad)

    def _on_grad(self, param: nn.Parameter) -> None:
        bucket = self._bucket_of[param]
        if bucket.launched:
            raise RuntimeError(
                "a gradient arrived after its bucket's reduction had started (more backward "
                "passes than announced to GradReducer.start); set parallel.overlap_grad_reduce="
                "false if a model runs backward through a parameter more than once per microbatch"
            )
        param.main_grad.add_(param.grad)
        param.grad = None
        if self._armed:
            bucket.pending -= 1
            if bucket.pending == 0:
                self._launch_ready(in_backward=True)

    def zero(self) -> None:
        for b in self.buckets:
            b.grad.zero_()
            b.launched, b.work, b.pending = False, None, 0
        self._next, self._armed = 0, False

    def start(self, backward_passes: int) -> None:
        """Zero the buffers; with overlap on, arm the hooks to launch each bucket when the last
        of ``backward_passes`` passes (one per microbatch) has delivered all its gradients."""
        self.zero()
        self.launched_in_backward = 0
        if self.overlap and self.dp > 1:
            for b in self.buckets:
                b.pending = len(b.params) * backward_passes
            self._armed = True

    def _launch_ready(self, in_backward: bool) -> None:
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if in_backward and bucket.pending > 0:
                return
            self._launch(bucket)
            self.launched_in_backward += in_backward
            self._next += 1

    def _launch(self, b: GradBucket) -> None:
        b.launched = True
        if self.dp == 1:
            return
        if b.shard_grad is not None:
            b.work = _reduce_scatter(b.shard_grad, b.grad, group=self.dp_group, async_op=True)
        else:
            b.work = dist.all_reduce(b.grad, group=self.dp_group, async_op=True)

    def finish(self) -> list[GradBucket]:
        """Fold in gradients that bypassed the hooks, reduce what has not been reduced yet, and
        wait for every bucket. Returns the buckets (see :attr:`GradBucket.reduced`)."""
        for p, b in self._bucket_of.items():
            if p.grad is not None:
                if b.launched:
                    raise RuntimeError(
                        "a gradient arrived after its bucket's reduction had started; set "
                        "parallel.overlap_grad_reduce=false"
                    )
                p.main_grad.add_(p.grad)
                p.grad = None
        self._armed = False
        self._launch_ready(in_backward=False)
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
                b.work = None
        return self.buckets
