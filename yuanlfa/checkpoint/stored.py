"""Where a tensor's bytes already lie in files, held compactly, for writers that copy them.

A tensor-parallel shard split by columns is, in its source, one short range per row: a 51B
Megatron checkpoint at tp 8 holds about 22 million of them. Held as :class:`FileRange`
objects they took gigabytes before the first byte was written. :class:`Ranges` holds them as
*blocks* of rows instead: ``rows`` repetitions of the same *parts* (path, offset, stride,
length), part ``p`` of row ``i`` lying at ``offset + i * stride``. A plain list of ranges is
one block of one row; a column block of a tensor stored in one place, or of a tensor merged
from tp shards, is one block of ``rows`` rows. Writers iterate over the ranges (generated one
at a time) and never need them all at once.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from yuanlfa.checkpoint.file_copy import FileRange, block_ranges


class Part(NamedTuple):
    """Range ``i`` of a block: ``length`` bytes at ``offset + i * stride`` of ``path``."""

    path: Path
    offset: int
    stride: int
    length: int


class Block(NamedTuple):
    rows: int
    parts: tuple[Part, ...]

    @property
    def row_bytes(self) -> int:
        return sum(p.length for p in self.parts)


class Ranges(Sequence[FileRange]):
    """File ranges in order (a tensor's bytes, or a slice of them), as blocks of rows."""

    def __init__(self, blocks: Iterable[Block]) -> None:
        self.blocks = [
            Block(b.rows, tuple(p for p in b.parts if p.length))
            for b in blocks
            if b.rows and any(p.length for p in b.parts)
        ]
        self._counts = list(
            itertools.accumulate((b.rows * len(b.parts) for b in self.blocks), initial=0)
        )
        self._bytes = list(
            itertools.accumulate((b.rows * b.row_bytes for b in self.blocks), initial=0)
        )

    @classmethod
    def of(cls, ranges: Iterable[FileRange]) -> Ranges:
        """A list of ranges: one block of one row."""
        return cls([Block(1, tuple(Part(r.path, r.offset, 0, r.nbytes) for r in ranges))])

    @property
    def nbytes(self) -> int:
        return self._bytes[-1]

    def __len__(self) -> int:
        return self._counts[-1]

    def __iter__(self) -> Iterator[FileRange]:
        for rows, parts in self.blocks:
            yield from block_ranges(rows, parts)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        b = bisect.bisect_right(self._counts, index) - 1
        rows, parts = self.blocks[b]
        row, p = divmod(index - self._counts[b], len(parts))
        path, offset, stride, length = parts[p]
        return FileRange(path, offset + row * stride, length)

    def slice(self, offset: int, nbytes: int) -> Ranges:
        """The ranges holding bytes ``[offset, offset + nbytes)``: whole rows of a block stay
        one block; a partial row becomes a block of one row."""
        out: list[Block] = []
        end = offset + nbytes
        b = max(bisect.bisect_right(self._bytes, offset) - 1, 0)
        while offset < end and b < len(self.blocks):
            block, start = self.blocks[b], self._bytes[b]
            row_bytes = block.row_bytes
            lo, hi = offset - start, min(end - start, block.rows * row_bytes)
            first, last = -(-lo // row_bytes), hi // row_bytes  # the whole rows inside
            if first > last:  # within one row
                out.append(_cut(block, lo // row_bytes, lo % row_bytes, hi - lo))
            else:
                if lo < first * row_bytes:
                    out.append(_cut(block, first - 1, lo % row_bytes, first * row_bytes - lo))
                if last > first:
                    out.append(_rows(block, first, last - first))
                if hi > last * row_bytes:
                    out.append(_cut(block, last, 0, hi - last * row_bytes))
            offset, b = start + hi, b + 1
        return Ranges(out)

    def columns(self, row_bytes: int, rows: int, spans: list[tuple[int, int]]) -> Ranges | None:
        """The byte ``spans`` ``(start, length)`` of every row, when these ranges are ``rows``
        rows of ``row_bytes`` each laid out as one block (or as one range): a block again,
        however many rows. None for other layouts (then: :meth:`slice` row by row)."""
        if len(self.blocks) != 1:
            return None
        block = self.blocks[0]
        if block.rows == 1 and len(block.parts) == 1 and block.parts[0].length == rows * row_bytes:
            path, offset, _, _ = block.parts[0]  # one range: its rows are row_bytes apart
            block = Block(rows, (Part(path, offset, row_bytes, row_bytes),))
        if block.rows != rows or block.row_bytes != row_bytes:
            return None
        parts = tuple(p for start, n in spans for p in _cut(block, 0, start, n).parts)
        return Ranges([Block(rows, parts)])


def _rows(block: Block, first: int, count: int) -> Block:
    """Rows ``first .. first + count`` of ``block``."""
    return Block(
        count,
        tuple(Part(p.path, p.offset + first * p.stride, p.stride, p.length) for p in block.parts),
    )


def _cut(block: Block, row: int, lo: int, nbytes: int) -> Block:
    """Bytes ``[lo, lo + nbytes)`` of row ``row`` of ``block``, as a block of one row whose
    parts keep the block's strides (so that :meth:`Ranges.columns` may repeat it)."""
    parts, at, hi = [], 0, lo + nbytes
    for p in block.parts:
        a, b = max(lo, at), min(hi, at + p.length)
        if a < b:
            parts.append(Part(p.path, p.offset + row * p.stride + a - at, p.stride, b - a))
        at += p.length
    return Block(1, tuple(parts))


def nbytes_of(ranges: Iterable[FileRange]) -> int:
    """The bytes of ``ranges``: counted by blocks for :class:`Ranges` (no range made)."""
    return ranges.nbytes if isinstance(ranges, Ranges) else sum(r.nbytes for r in ranges)


class Stored:
    """A tensor's bytes (row-major) as they already lie in files: ``ranges`` in order. Slices
    of it by byte, row or column block are again :class:`Ranges`, for a writer to copy."""

    def __init__(self, ranges: Ranges | Iterable[FileRange]) -> None:
        self.ranges = ranges if isinstance(ranges, Ranges) else Ranges.of(ranges)

    @property
    def nbytes(self) -> int:
        return self.ranges.nbytes

    def slice(self, offset: int, nbytes: int) -> Ranges:
        """The ranges holding bytes ``[offset, offset + nbytes)``."""
        return self.ranges.slice(offset, nbytes)

    def block(self, shape: tuple[int, ...], itemsize: int, dim: int, pieces) -> Ranges | None:
        """The ranges of a tensor-parallel shard: ``pieces`` ``(local, start, length)`` along
        ``dim`` (0: blocks of rows; 1: a block of columns of every row), None for other dims."""
        if not shape or self.nbytes != math.prod(shape) * itemsize:
            return None
        row = math.prod(shape[1:]) * itemsize
        if dim == 0:
            return _joined(self.slice(start * row, n * row) for _, start, n in pieces)
        if dim != 1 or len(shape) < 2:
            return None
        inner = math.prod(shape[2:]) * itemsize  # the bytes of one column entry
        spans = [(start * inner, n * inner) for _, start, n in pieces]
        fast = self.ranges.columns(row, shape[0], spans)
        if fast is not None:
            return fast
        # Another layout (a tensor over several files): row by row.
        return _joined(self.slice(i * row + s, n) for i in range(shape[0]) for s, n in spans)


def _joined(pieces: Iterable[Ranges]) -> Ranges:
    return Ranges([block for ranges in pieces for block in ranges.blocks])
