"""The tensor-parallel plan of the built-in model: ONE table of which modules are split how.

Both uses of the plan are derived from :data:`LAYER_PLAN` and :data:`MODEL_PLAN`:
:func:`apply_tensor_parallel` swaps the single-device modules for the parallel layers the styles
name, and :func:`shard_pieces` says where a rank's slice of each full parameter comes from (for
initialization, checkpoints and conversion). A plug-in filter's or core attention's parameters
follow its own ``tp_plan`` (yuanlfa.model.registry, applied by :mod:`yuanlfa.parallel.tp.plugin`).
Parameter names never change, so every layout starts from exactly the single-device values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from yuanlfa.config import ModelConfig
from yuanlfa.model.lfa import LocalizedFiltering
from yuanlfa.model.registry import component_of, split_dim
from yuanlfa.model.transformer import YuanModel
from yuanlfa.parallel.tp.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    SequenceParallelLFA,
    VocabParallelEmbedding,
    VocabParallelLMHead,
)
from yuanlfa.parallel.tp.plugin import apply_attention_plan, apply_filter_plan, set_submodule

Pieces = tuple[int, list[tuple[int, int, int]]]


@dataclass(frozen=True)
class Style:
    """How a weight is split: along ``dim``; ``halves``: its rows are two stacked matrices
    ([SiLU branch; linear branch] of fc1) and each rank keeps its slice of both, in that order,
    as the Yuan 2.0 release does. ``layer``: the parallel module replacing an nn.Linear."""

    dim: int
    halves: bool = False
    layer: type[nn.Module] | None = None


COLUMN = Style(0, layer=ColumnParallelLinear)
COLUMN_HALVES = Style(0, halves=True, layer=ColumnParallelLinear)
ROW = Style(1, layer=RowParallelLinear)
VOCAB = Style(0)  # rows of the vocabulary: the embedding (and an untied output matrix)

# Inside every decoder layer ("layers.<i>." + path). Fused QK rows are laid out per head as
# [q_head; k_head], so a contiguous block of rows is a block of whole heads.
LAYER_PLAN: dict[str, Style] = {
    "attn.qk_proj": COLUMN,
    "attn.v_proj": COLUMN,
    "attn.o_proj": ROW,
    "mlp.fc1": COLUMN_HALVES,
    "mlp.fc2": ROW,
}
# Outside the layers. Everything not named in either table is replicated over tp.
MODEL_PLAN: dict[str, Style] = {"embed": VOCAB, "output": VOCAB}


def style_of(name: str) -> Style | None:
    """The built-in plan's style for the full parameter ``name`` (None: replicated)."""
    module, _, leaf = name.rpartition(".")
    if leaf != "weight":
        return None
    if module in MODEL_PLAN:
        return MODEL_PLAN[module]
    head, _, rest = module.partition(".")
    layer_id, _, path = rest.partition(".")
    if head == "layers" and layer_id.isdigit():
        return LAYER_PLAN.get(path)
    return None


def shard_pieces(
    name: str,
    full_shape: tuple[int, ...],
    tp_rank: int,
    tp: int,
    cfg: ModelConfig | None = None,
) -> Pieces:
    """Where this rank's shard of the full parameter ``name`` comes from: ``(dim, pieces)`` with
    pieces ``(local_start, global_start, length)`` along ``dim`` (one source of truth for
    initialization, checkpoints and conversion). Replicated parameters are one piece covering
    the whole tensor. With ``cfg``, a plug-in's parameters follow its ``tp_plan``."""
    whole: Pieces = (0, [(0, 0, full_shape[0])])
    if tp == 1:
        return whole
    if cfg is not None and component_of(name, cfg) is not None:
        dim = split_dim(name, cfg)
        if dim is None:
            return whole
        n = full_shape[dim] // tp
        return dim, [(0, tp_rank * n, n)]
    style = style_of(name)
    if style is None:
        return whole
    if style.halves:
        half = full_shape[0] // 2
        n = half // tp
        return 0, [(0, tp_rank * n, n), (n, half + tp_rank * n, n)]
    n = full_shape[style.dim] // tp
    return style.dim, [(0, tp_rank * n, n)]


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
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    cfg = model.cfg
    if not cfg.tie_embeddings:
        raise NotImplementedError("tensor parallelism with an untied output matrix")

    def shard(name: str, tensor: torch.Tensor) -> torch.Tensor:
        return shard_full_tensor(name, tensor.detach(), cfg, rank, tp).clone()

    for layer_id, layer in model.layers.items():
        prefix = f"layers.{layer_id}."
        for path, style in LAYER_PLAN.items():
            weight = shard(f"{prefix}{path}.weight", layer.get_submodule(path).weight)
            set_submodule(layer, path, style.layer(weight, group, sequence_parallel))
        attn = layer.attn
        attn.num_heads = cfg.num_heads // tp
        attn.head_offset = rank * attn.num_heads  # global index of this rank's first head
        if isinstance(attn.lf_gate, LocalizedFiltering):
            if sequence_parallel:
                attn.lf_gate = SequenceParallelLFA(attn.lf_gate, group)
        elif attn.lf_gate is not None:
            apply_filter_plan(
                attn.lf_gate, cfg, f"{prefix}attn.lf_gate", group, sequence_parallel, shard
            )
        apply_attention_plan(attn.core, cfg, f"{prefix}attn.core", group, sequence_parallel, shard)
    vocab_start = rank * (cfg.vocab_size // tp)
    if model.embed is not None:
        weight = shard("embed.weight", model.embed.weight)
        model.embed = VocabParallelEmbedding(weight, vocab_start, group, sequence_parallel)
    if model.lm_head is not None:
        model.lm_head = VocabParallelLMHead(vocab_start, group, sequence_parallel, loss_block_size)
    model.tp_group = group
    model.sequence_parallel = sequence_parallel
    return model
