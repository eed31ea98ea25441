"""checkpoint/stored.py: a tensor's bytes held as blocks of rows. Every slice, row block and
column block is checked against torch's own slicing of the tensor, over layouts as the
converters meet them (one range, ranges over several files, tp shards split by columns), and
a column block stays a few blocks however many rows it has (the 51B sizes)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from yuanlfa.checkpoint.file_copy import FileRange
from yuanlfa.checkpoint.stored import Block, Part, Ranges, Stored


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()


def _layouts(whole: torch.Tensor, rng: random.Random):
    """(name, files, Stored) of ``whole``'s bytes laid out the ways converters find them."""
    data = _bytes(whole)
    rows, cols = whole.shape[0], whole.shape[1]
    inner = len(data) // (rows * cols)
    yield "one range", {Path("a"): b"xyz" + data}, Stored([FileRange(Path("a"), 3, len(data))])
    cuts = sorted(rng.sample(range(1, len(data)), 4))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    files = {Path(f"f{i}"): b"." * i + p for i, p in enumerate(pieces)}
    ranges = [FileRange(Path(f"f{i}"), i, len(p)) for i, p in enumerate(pieces)]
    yield "ranges over files", files, Stored(ranges)
    # tp shards split by columns (a Megatron row-parallel weight): shard t holds columns
    # [t * w, (t + 1) * w) of every row, stored whole in its own file.
    tp = 3 if cols % 3 == 0 else 2
    w = cols // tp
    files, parts = {}, []
    for t in range(tp):
        shard = _bytes(whole.narrow(1, t * w, w))
        files[Path(f"s{t}")] = b"#" * (7 * t) + shard
        parts.append(Part(Path(f"s{t}"), 7 * t, w * inner, w * inner))
    yield "column shards", files, Stored(Ranges([Block(rows, tuple(parts))]))


def _read(files: dict, ranges) -> bytes:
    return b"".join(files[r.path][r.offset : r.offset + r.nbytes] for r in ranges)


@pytest.mark.parametrize("seed", range(6))
def test_slices_and_blocks_equal_torch_slicing(seed: int) -> None:
    rng = random.Random(seed)
    shape = (rng.randint(2, 9), rng.choice([4, 6, 12]), rng.randint(1, 3))
    whole = torch.randint(-(2**15), 2**15, shape, dtype=torch.int16)
    data = _bytes(whole)
    for name, files, where in _layouts(whole, rng):
        ranges = where.ranges
        assert where.nbytes == len(data), name
        assert _read(files, ranges) == data, name
        # A sequence: indexing, slicing and iteration agree.
        assert list(ranges) == [ranges[i] for i in range(len(ranges))] == ranges[:], name
        assert ranges[-1] == list(ranges)[-1]
        for _ in range(20):
            a = rng.randrange(len(data))
            n = rng.randint(0, len(data) - a)
            assert _read(files, where.slice(a, n)) == data[a : a + n], (name, a, n)
        for _ in range(10):
            dim = rng.choice([0, 1])
            size = shape[dim]
            starts = sorted(rng.sample(range(size), rng.randint(1, min(3, size))))
            spans = [(s, rng.randint(1, (nxt if nxt else size) - s))
                     for s, nxt in zip(starts, [*starts[1:], None])]  # fmt: skip
            pieces = [(0, s, n) for s, n in spans]
            expect = torch.cat([whole.narrow(dim, s, n) for s, n in spans], dim=dim)
            got = where.block(shape, 2, dim, pieces)
            assert _read(files, got) == _bytes(expect), (name, dim, pieces)
        assert where.block(shape, 2, 2, [(0, 0, 1)]) is None  # only rows and columns
        assert where.block((shape[0] + 1, *shape[1:]), 2, 0, [(0, 0, 1)]) is None


def test_column_blocks_stay_compact_at_51b_sizes() -> None:
    """A 51B row-parallel weight merged from tp 8 shards (8192 rows, 8 parts a row) and cut
    into the 4 column blocks of tp 4: one block each, whatever the rows; their ranges are the
    ones the row-by-row cut gives (checked on a sample)."""
    rows, cols, tp, itemsize = 8192, 8192, 8, 2
    w = cols // tp
    parts = tuple(
        Part(Path(f"mp_rank_{t:02d}"), 4096, w * itemsize, w * itemsize) for t in range(tp)
    )
    merged = Stored(Ranges([Block(rows, parts)]))
    assert len(merged.ranges) == rows * tp and len(merged.ranges.blocks) == 1
    for rank in range(4):
        pieces = [(0, rank * cols // 4, cols // 4)]
        got = merged.block((rows, cols), itemsize, 1, pieces)
        assert len(got.blocks) == 1 and len(got) == rows * 2
        assert got.nbytes == rows * cols // 4 * itemsize
        for i in (0, 1, 4097, rows - 1):  # row i: two shards' rows, whole
            for j in range(2):
                t = rank * 2 + j
                assert got[2 * i + j] == FileRange(
                    Path(f"mp_rank_{t:02d}"), 4096 + i * w * itemsize, w * itemsize
                )
