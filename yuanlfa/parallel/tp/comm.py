"""Communication with autograd, for tensor and sequence parallelism.

The conjugate pairs of Megatron-LM (Shoeybi et al., 2019, "Megatron-LM: Training Multi-Billion
Parameter Language Models Using Model Parallelism", section 3; sequence parallelism from Korthikanti
et al., 2022, "Reducing Activation Recomputation in Large Transformer Models", section 4.2.2):
what one direction does with a collective, the other does with its transpose. Sequence-sharded
activations are split along dim 0 ([s, b, h]).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.13 renamed reduce_scatter_tensor; accept both so a range of torch versions works.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _size(group) -> int:
    return dist.get_world_size(group)


def _all_gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def _reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    n = _size(group)
    if x.shape[0] % n:
        raise ValueError(f"sequence length {x.shape[0]} is not divisible by the tp size {n}")
    out = torch.empty((x.shape[0] // n, *x.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter(out, x.contiguous(), group=group)
    return out


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x, group=group)
    return x


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group), None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_seq(grad, ctx.group), None


class _SplitSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        n, r = _size(group), dist.get_rank(group)
        if x.shape[0] % n:
            raise ValueError(f"sequence length {x.shape[0]} is not divisible by the tp size {n}")
        return x.chunk(n, dim=0)[r].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_seq(grad, ctx.group), None


class _PrevHalo(torch.autograd.Function):
    """The previous rank's last ``n`` rows (zeros on the first rank); the gradient of those rows
    travels back to the rank that owns them. Exchanged by all-gather: n rows per rank."""

    @staticmethod
    def forward(ctx, x, n, group):
        ctx.group, ctx.n = group, n
        tails = _all_gather_seq(x[-n:], group).view(_size(group), n, *x.shape[1:])
        r = dist.get_rank(group)
        ctx.shape = x.shape
        return tails[r - 1].clone() if r > 0 else torch.zeros_like(tails[0])

    @staticmethod
    def backward(ctx, grad):
        n, group = ctx.n, ctx.group
        size, r = _size(group), dist.get_rank(group)
        grads = _all_gather_seq(grad, group).view(size, n, *grad.shape[1:])
        out = grad.new_zeros(ctx.shape)
        if r + 1 < size:
            out[-n:] = grads[r + 1]
        return out, None, None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient (input of a column-parallel layer)."""
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce forward; identity backward (output of a row-parallel layer)."""
    return _ReduceFromTP.apply(x, group)


def gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather along the sequence; reduce-scatter of the gradient."""
    return _GatherSeq.apply(x, group)


def reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Reduce-scatter along the sequence; all-gather of the gradient."""
    return _ReduceScatterSeq.apply(x, group)


def split_seq(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's sequence shard; all-gather of the gradient."""
    return _SplitSeq.apply(x, group)


def prev_halo(x: torch.Tensor, n: int, group) -> torch.Tensor:
    """The last ``n`` sequence rows of the previous rank's shard ([n, ...]); zeros on rank 0."""
    if x.shape[0] < n:
        raise ValueError(
            f"a sequence shard of {x.shape[0]} tokens cannot provide a {n}-token halo; use a "
            "longer sequence or a smaller tp"
        )
    return _PrevHalo.apply(x, n, group)
