"""Tensor (and sequence) parallelism: parallel layers and the plan that applies them.

The single-device model is untouched; :func:`apply_tensor_parallel` swaps its modules for
parallel ones that keep the same parameter names and hold this rank's slice of each full weight.
The same slicing rule (:func:`shard_full_tensor`) serves the module swap and layout-independent
initialization, so every layout starts from exactly the single-device values.

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

from yuanlfa.config import ModelConfig
from yuanlfa.model.lfa import LocalizedFiltering
from yuanlfa.model.registry import component_of, split_dim
from yuanlfa.model.transformer import YuanModel
from yuanlfa.ops.cross_entropy import blockwise_lm_loss
from yuanlfa.ops.lfa import LFAState, halo_state
from yuanlfa.parallel.tp.comm import (
    copy_to_tp,
    gather_seq,
    prev_halo,
    reduce_from_tp,
    reduce_scatter_seq,
)


def _mark_sharded(param: nn.Parameter) -> nn.Parameter:
    # Read by the gradient-norm code: sharded parameters are summed over tp, replicated ones
    # counted once.
    param.tensor_parallel = True
    return param


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
        self.weight = _mark_sharded(nn.Parameter(weight))
        self.bias = _mark_sharded(nn.Parameter(bias)) if bias is not None else None
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
        self.weight = _mark_sharded(nn.Parameter(weight))
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
        self.weight = _mark_sharded(nn.Parameter(weight))
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


def shard_pieces(
    name: str,
    full_shape: tuple[int, ...],
    tp_rank: int,
    tp: int,
    cfg: ModelConfig | None = None,
) -> tuple[int, list[tuple[int, int, int]]]:
    """Where this rank's shard of the full parameter ``name`` comes from: ``(dim, pieces)`` with
    pieces ``(local_start, global_start, length)`` along ``dim`` (one source of truth for
    initialization, checkpoints and conversion).

    Fused QK rows are laid out per head as [q_head; k_head], so a contiguous block of rows is a
    block of whole heads. fc1's rows are [SiLU branch; linear branch]: each rank keeps its slice
    of both halves, in that order, as the Yuan 2.0 release does. Replicated parameters are one
    piece covering the whole tensor. With ``cfg``, a plug-in filter's or core attention's
    parameters follow its ``tp_plan`` (yuanlfa.model.registry).
    """
    if tp > 1 and cfg is not None and component_of(name, cfg) is not None:
        dim = split_dim(name, cfg)
        if dim is None:
            return 0, [(0, 0, full_shape[0])]
        n = full_shape[dim] // tp
        return dim, [(0, tp_rank * n, n)]
    if tp > 1:
        if name.endswith(("attn.qk_proj.weight", "attn.v_proj.weight", "embed.weight")) or (
            name == "output.weight"
        ):
            n = full_shape[0] // tp
            return 0, [(0, tp_rank * n, n)]
        if name.endswith(("attn.o_proj.weight", "mlp.fc2.weight")):
            n = full_shape[1] // tp
            return 1, [(0, tp_rank * n, n)]
        if name.endswith("mlp.fc1.weight"):
            half = full_shape[0] // 2
            n = half // tp
            return 0, [(0, tp_rank * n, n), (n, half + tp_rank * n, n)]
    return 0, [(0, 0, full_shape[0])]


def shard_full_tensor(
    name: str, full: torch.Tensor, cfg: ModelConfig, tp_rank: int, tp: int
) -> torch.Tensor:
    """This rank's slice of the full parameter ``name`` (replicated ones are returned whole)."""
    dim, pieces = shard_pieces(name, tuple(full.shape), tp_rank, tp, cfg)
    parts = [full.narrow(dim, start, length) for _, start, length in pieces]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def apply_tensor_parallel(
    model: YuanModel, group, sequence_parallel: bool, loss_block_size: int = 2048
) -> YuanModel:
    """Turn the single-device model (real or meta) into this rank's tensor-parallel shard."""
    from yuanlfa.parallel.tp.plugin import apply_attention_plan, apply_filter_plan

    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    cfg = model.cfg
    if not cfg.tie_embeddings:
        raise NotImplementedError("tensor parallelism with an untied output matrix")

    def shard(name: str, tensor: torch.Tensor) -> torch.Tensor:
        return shard_full_tensor(name, tensor.detach(), cfg, rank, tp).clone()

    for layer_id, layer in model.layers.items():
        prefix = f"layers.{layer_id}."
        attn, mlp = layer.attn, layer.mlp
        for attr, cls in (("qk_proj", ColumnParallelLinear), ("v_proj", ColumnParallelLinear),
                          ("o_proj", RowParallelLinear)):  # fmt: skip
            module = getattr(attn, attr)
            full_name = f"{prefix}attn.{attr}.weight"
            setattr(attn, attr, cls(shard(full_name, module.weight), group, sequence_parallel))
        attn.num_heads = cfg.num_heads // tp
        if isinstance(attn.lf_gate, LocalizedFiltering):
            if sequence_parallel:
                attn.lf_gate = SequenceParallelLFA(attn.lf_gate, group)
        elif attn.lf_gate is not None:
            apply_filter_plan(
                attn.lf_gate, cfg, f"{prefix}attn.lf_gate", group, sequence_parallel, shard
            )
        apply_attention_plan(attn.core, cfg, f"{prefix}attn.core", group, sequence_parallel, shard)
        mlp.fc1 = ColumnParallelLinear(
            shard(f"{prefix}mlp.fc1.weight", mlp.fc1.weight), group, sequence_parallel
        )
        mlp.fc2 = RowParallelLinear(
            shard(f"{prefix}mlp.fc2.weight", mlp.fc2.weight), group, sequence_parallel
        )
    vocab_start = rank * (cfg.vocab_size // tp)
    if model.embed is not None:
        weight = shard("embed.weight", model.embed.weight)
        model.embed = VocabParallelEmbedding(weight, vocab_start, group, sequence_parallel)
    if model.lm_head is not None:
        model.lm_head = VocabParallelLMHead(vocab_start, group, sequence_parallel, loss_block_size)
    model.tp_group = group
    model.sequence_parallel = sequence_parallel
    return model
