"""Rectangular blocks of global tensors that one rank holds.

A checkpoint stores every tensor under its global name with its global shape; each rank
contributes (and later reads) the blocks it holds. A block is a view into the rank's own storage
(a parameter, an optimizer state, or a slice of the distributed optimizer's flat buffers), so
saving and loading copy nothing beyond what the storage layer does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Block:
    key: str  # global name, e.g. "model.layers.3.attn.qk_proj.weight"
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    tensor: torch.Tensor  # a view into the rank's storage, shaped like the block


@dataclass(frozen=True)
class LazyTensor:
    """A whole tensor to save, produced only when the writer reaches it (bounded memory)."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]
    # Where its bytes already lie in existing files, when they do (a
    # :class:`~yuanlfa.checkpoint.stored.Stored`): writers copy them file to file.
    stored: Any = None


def flat_range_blocks(
    shape: tuple[int, ...], start: int, stop: int
) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """Split the flat range [start, stop) of a contiguous tensor of ``shape`` into rectangular
    blocks: ``(offsets, sizes, flat_start)``, in flat order. At most 2 * ndim - 1 blocks."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,), (stop - start,), start)]
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner
    if first == last:  # inside one slice along dim 0: recurse into it
        return [
            ((first, *off), (1, *sizes), first * inner + flat)
            for off, sizes, flat in flat_range_blocks(
                shape[1:], start - first * inner, stop - first * inner
            )
        ]
    out = []
    lo = first if start % inner == 0 else first + 1
    hi = last + 1 if stop % inner == 0 else last
    if lo != first:
        out += flat_range_blocks(shape, start, lo * inner)
    if hi > lo:
        out.append(((lo, *[0] * (len(shape) - 1)), (hi - lo, *shape[1:]), lo * inner))
    if hi != last + 1:
        out += flat_range_blocks(shape, hi * inner, stop)
    return out


def local_blocks(
    key: str,
    full_shape: tuple[int, ...],
    pieces: tuple[int, list[tuple[int, int, int]]],
    local_shape: tuple[int, ...],
    flat: torch.Tensor,
    start: int = 0,
    stop: int | None = None,
) -> list[Block]:
    """Blocks of the global tensor ``key`` covered by elements [start, stop) of a rank's local
    shard (shape ``local_shape``, flattened in ``flat``, whose element 0 is local element
    ``start``), given how the shard maps into the full tensor (``pieces`` from
    :func:`yuanlfa.parallel.tp.plan.shard_pieces`)."""
    numel = math.prod(local_shape)
    stop = numel if stop is None else stop
    dim, parts = pieces
    out = []
    if dim == 1:  # column shards: the local tensor is one piece
        ((_, global_start, _),) = parts
        for off, sizes, f in flat_range_blocks(local_shape, start, stop):
            offsets = (off[0], off[1] + global_start, *off[2:])
            view = flat[f - start : f - start + math.prod(sizes)].view(sizes)
            out.append(Block(key, full_shape, offsets, view))
        return out
    inner = math.prod(local_shape[1:]) if len(local_shape) > 1 else 1
    for local_start, global_start, length in parts:
        lo, hi = max(start, local_start * inner), min(stop, (local_start + length) * inner)
        piece_shape = (length, *local_shape[1:])
        base = local_start * inner
        for off, sizes, f in flat_range_blocks(piece_shape, lo - base, hi - base):
            offsets = (off[0] + global_start, *off[1:])
            begin = base + f - start
            view = flat[begin : begin + math.prod(sizes)].view(sizes)
            out.append(Block(key, full_shape, offsets, view))
    return out
