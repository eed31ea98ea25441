"""Whole tensors of our checkpoints read straight from the bytes DCP stored, at disk speed.

DCP's own reader loads each stored chunk into a bytes buffer, unpickles a tensor from it and
copies that into the destination: about three copies of a tensor in memory and three passes
over its bytes. The format is plain enough to skip all that. The checkpoint's metadata (read
through :func:`yuanlfa.checkpoint.dcp_records.read_metadata`'s allow-list unpickler) maps each
chunk to a byte range ``[offset, offset + length)`` of a ``.distcp`` file; that range is one
``torch.save`` archive (an uncompressed zip) whose single storage entry ``<name>/data/0`` holds
the chunk's elements in row-major order (DCP clones a tensor whose storage is larger than it,
so the storage is exactly the chunk). We locate that entry through the zip's own directory and
``readinto`` the destination tensor directly: one large sequential read per chunk, no pickle
run, and at most one chunk-sized staging buffer when a chunk is not contiguous in the
destination (a column block). Anything unexpected (another serialization, compressed entries,
stream transforms, big-endian data) falls back to DCP's reader, which gives the same tensor.
"""

from __future__ import annotations

import io
import math
import os
import re
import sys
import zipfile
from pathlib import Path

import torch

from yuanlfa.checkpoint.dcp_records import MetadataIndex, read_metadata
from yuanlfa.checkpoint.errors import CheckpointError
from yuanlfa.checkpoint.file_copy import FileRange
from yuanlfa.checkpoint.stored import Stored
from yuanlfa.checkpoint.torch_direct import NotDirect, record_offset

_STORAGE_ENTRY = re.compile(r"[^/]+/data/\d+")


# This chunk is not stored the way the direct path reads; DCP's reader handles it.
_NotDirect = NotDirect


class _Window(io.RawIOBase):
    """The byte range [start, start + length) of an open file, as a file of its own (zipfile
    reads the archive's directory through it)."""

    def __init__(self, f, start: int, length: int) -> None:
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = min(max(base + pos, 0), self.length)
        return self.pos

    def readinto(self, b) -> int:
        n = min(len(b), self.length - self.pos)
        if n <= 0:
            return 0
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(b)[:n])
        self.pos += got
        return got


def _storage_span(f, start: int, length: int) -> tuple[int, int]:
    """(file offset, bytes) of the single storage in the torch.save archive at [start, +length)."""
    try:
        archive = zipfile.ZipFile(_Window(f, start, length))
    except zipfile.BadZipFile:
        raise _NotDirect("not a zip archive") from None
    entries = [i for i in archive.infolist() if _STORAGE_ENTRY.fullmatch(i.filename)]
    if len(entries) != 1 or entries[0].compress_type != zipfile.ZIP_STORED:
        raise _NotDirect("not one uncompressed storage")
    order = [i for i in archive.infolist() if i.filename.endswith("/byteorder")]
    if order and archive.read(order[0]).strip() != b"little":
        raise _NotDirect("big-endian data")
    info = entries[0]
    data = record_offset(f.fileno(), info, start)
    if data + info.file_size > start + length:
        raise _NotDirect("storage beyond the archive")
    return data, info.file_size


def _fill(f, offset: int, dest: torch.Tensor) -> None:
    """Read ``dest``'s bytes (contiguous) from ``offset``: one sequential read into it."""
    view = memoryview(dest.reshape(-1).view(torch.uint8).numpy())
    f.seek(offset)
    while view.nbytes:
        got = f.readinto(view)
        if not got:
            raise _NotDirect("file shorter than its metadata says")
        view = view[got:]


def _read_direct(path: Path, key: str) -> torch.Tensor:
    metadata = read_metadata(path)
    md = metadata.state_dict_metadata[key]
    dtype = md.properties.dtype
    out = torch.empty(tuple(md.size), dtype=dtype)
    itemsize = out.element_size()
    located = []
    for chunk in md.chunks:
        info = metadata.storage_data[MetadataIndex(key, chunk.offsets)]
        if getattr(info, "transform_descriptors", None):
            raise _NotDirect("stream transforms")
        located.append((info.relative_path, info.offset, info.length, chunk))
    files: dict[str, io.FileIO] = {}
    try:
        # In file order: sequential reads.
        for rel, start, length, chunk in sorted(located, key=lambda x: (x[0], x[1])):
            if rel not in files:
                files[rel] = open(Path(path) / rel, "rb", buffering=0)  # noqa: SIM115
            f = files[rel]
            if os.fstat(f.fileno()).st_size < start + length:
                raise CheckpointError(
                    f"{Path(path) / rel}: shorter than the checkpoint's metadata says ({key} "
                    "ends beyond it); the checkpoint is incomplete or damaged"
                )
            data, nbytes = _storage_span(f, start, length)
            if nbytes != math.prod(chunk.sizes) * itemsize:
                raise _NotDirect("storage larger than its chunk")
            dest = out
            for dim, (lo, n) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
                dest = dest.narrow(dim, lo, n)
            if dest.is_contiguous():
                _fill(f, data, dest)
            else:  # a column block: stage it, at most one chunk in memory besides the output
                staged = torch.empty(tuple(chunk.sizes), dtype=dtype)
                _fill(f, data, staged)
                dest.copy_(staged)
                del staged
    finally:
        for f in files.values():
            f.close()
    return out


def row_ranges(path: str | Path, key: str) -> tuple[list[tuple[int, int, FileRange]], int] | None:
    """Where the rows of tensor ``key`` of our checkpoint at ``path`` lie in its files, when
    every stored chunk is a block of whole rows (then any row range of a chunk is one byte
    range of its file): ``([(first row, rows, bytes of the chunk)], bytes per row)``, in row
    order, the chunks covering every row once. None when the bytes are not plainly there
    (column blocks, stream transforms, another serialization, a big-endian host, a 0-d
    tensor): read the tensor instead."""
    if sys.byteorder != "little":
        return None
    path = Path(path)
    metadata = read_metadata(path)
    md = metadata.state_dict_metadata[key]
    size = tuple(md.size)
    if not size:
        return None
    row_bytes = math.prod(size[1:]) * md.properties.dtype.itemsize
    found = []
    for chunk in md.chunks:
        if any(chunk.offsets[1:]) or tuple(chunk.sizes[1:]) != size[1:]:
            return None  # a column block: its rows are not contiguous in the whole tensor
        info = metadata.storage_data[MetadataIndex(key, chunk.offsets)]
        if getattr(info, "transform_descriptors", None):
            return None
        file = path / info.relative_path
        try:
            with open(file, "rb", buffering=0) as f:
                if os.fstat(f.fileno()).st_size < info.offset + info.length:
                    return None  # read_tensor names the damage
                data, nbytes = _storage_span(f, info.offset, info.length)
        except (_NotDirect, OSError):
            return None
        if nbytes != chunk.sizes[0] * row_bytes:
            return None
        found.append((int(chunk.offsets[0]), int(chunk.sizes[0]), FileRange(file, data, nbytes)))
    found.sort(key=lambda c: c[0])
    row = 0
    for start, rows, _ in found:
        if start != row:
            return None  # a gap or an overlap: not this simple layout
        row += rows
    return (found, row_bytes) if row == size[0] else None


def stored(path: str | Path, key: str) -> Stored | None:
    """Where the bytes of tensor ``key`` of our checkpoint lie, in order (see
    :func:`row_ranges`), or None."""
    found = row_ranges(path, key)
    return None if found is None else Stored([where for _, _, where in found[0]])


def read_tensor(path: str | Path, key: str) -> torch.Tensor:
    """One whole tensor of our checkpoint at ``path`` (any layout wrote it), read directly from
    its stored bytes; the same tensor as :func:`yuanlfa.checkpoint.storage.read_tensor`."""
    path = Path(path)
    if sys.byteorder == "little":
        try:
            return _read_direct(path, key)
        except _NotDirect:
            pass
    from yuanlfa.checkpoint import storage  # DCP's reader, imported only when needed

    return storage.read_tensor(path, key)
