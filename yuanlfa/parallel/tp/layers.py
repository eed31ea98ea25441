"""Tensor- and sequence-parallel layers: each holds this rank's slice of a full weight, under
the single-device parameter name, and takes its tp group as a constructor argument.

With sequence parallelism, activations between the attention and MLP blocks are split along the
sequence over the tp group: norms and LFA run on the local shard (LFA with a 2-token halo from the
previous rank), column-parallel layers all-gather their input and row-parallel layers
reduce-scatter their output.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from yuanlfa.model.lfa import LocalizedFiltering
from yuanlfa.ops.cross_entropy import blockwise_lm_loss
from yuanlfa.ops.lfa import LFAState, halo_state
from yuanlfa.parallel.roles import set_role
from yuanlfa.parallel.tp.comm import (
    copy_to_tp,
    gather_seq,
    prev_halo,
    reduce_from_tp,
    reduce_scatter_seq,
)


def sharded_param(tensor: torch.Tensor) -> nn.Parameter:
    """A parameter holding this rank's tp slice (its role: summed over tp in the norm)."""
    return set_role(nn.Parameter(tensor), tp_sharded=True)


class ColumnParallelLinear(nn.Module):
    """y_local = x @ W_local^T (+ b_local) for this rank's output rows; the input is replicated
    (or, with sequence parallelism, gathered from the sequence shards)."""

    def __init__(
        self,
        weight: torch.Tensor,
        group,
        sequence_parallel: bool,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.weight = sharded_param(weight)
        self.bias = sharded_param(bias) if bias is not None else None
        self.group = group
        self.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = gather_seq(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_local @ W_local^T for this rank's input columns (+ b); the sum is
    an all-reduce (or, with sequence parallelism, a reduce-scatter onto the sequence shards). The
    bias is replicated and added once, after the sum."""

    def __init__(
        self,
        weight: torch.Tensor,
        group,
        sequence_parallel: bool,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.weight = sharded_param(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.group = group
        self.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_seq(y, self.group)
        else:
            y = reduce_from_tp(y, self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Rows [vocab_start, vocab_start + V/tp) of the embedding; other ids contribute zeros and the
    ranks' partial results are summed (reduce-scattered over the sequence with SP)."""

    def __init__(
        self, weight: torch.Tensor, vocab_start: int, group, sequence_parallel: bool
    ) -> None:
        super().__init__()
        self.weight = sharded_param(weight)
        self.vocab_start = vocab_start
        self.group = group
        self.sequence_parallel = sequence_parallel

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_seq(out, self.group)
        return reduce_from_tp(out, self.group)


class VocabParallelLMHead(nn.Module):
    """Block-wise, vocab-parallel loss over this rank's vocabulary rows of the tied matrix."""

    def __init__(self, vocab_start: int, group, sequence_parallel: bool, block_size: int) -> None:
        super().__init__()
        self.vocab_start = vocab_start
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.block_size = block_size

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        if self.sequence_parallel:
            hidden = gather_seq(hidden, self.group)
        else:
            hidden = copy_to_tp(hidden, self.group)
        if labels is not None:
            return blockwise_lm_loss(
                hidden,
                weight,
                labels,
                group=self.group,
                vocab_start=self.vocab_start,
                block_size=self.block_size,
            )
        local = F.linear(hidden, weight)
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


class SequenceParallelLFA(LocalizedFiltering):
    """LFA on this rank's sequence shard. The shard's first tokens need the previous shard's last
    two inputs (x_{s0-2}, x_{s0-1}); they arrive as a halo and their gradient is sent back."""

    def __init__(self, inner: LocalizedFiltering, group) -> None:
        nn.Module.__init__(self)
        # Take over the submodules so parameter names stay lf_gate.conv1.weight etc.
        self.conv1, self.conv2, self.norm = inner.conv1, inner.conv2, inner.norm
        self.eps, self.impl = inner.eps, inner.impl
        self.group = group

    def forward(
        self,
        x: torch.Tensor,
        state: LFAState | None = None,
        doc_start: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, LFAState]:
        """x: [s/tp, b, h] (this rank's shard); doc_start: [s, b] for the whole sequence."""
        if state is not None:
            raise NotImplementedError("incremental decoding under sequence parallelism")
        rank = dist.get_rank(self.group)
        s_local = x.shape[0]
        halo = prev_halo(x, 2, self.group)
        local_start = None
        if doc_start is not None:
            local_start = doc_start[rank * s_local : (rank + 1) * s_local]
        if rank > 0:
            halo_start = doc_start[rank * s_local - 1] if doc_start is not None else None
            state = halo_state(halo, self.conv1.weight, self.conv1.bias, halo_start)
        else:
            # The sequence starts here: a zero state is exactly "no previous token". Deriving it
            # from the halo keeps the exchange in every rank's graph, so all ranks run its
            # backward collective (otherwise rank 0 would skip it and the others would hang).
            zero = halo[1] * 0
            state = LFAState(zero, zero[..., : zero.shape[-1] // 2])
        return super().forward(x, state=state, doc_start=local_start)
