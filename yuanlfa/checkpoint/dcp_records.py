"""The ``.metadata`` of a torch.distributed.checkpoint (DCP) directory, read without DCP.

DCP's metadata is a pickle of DCP's own dataclasses (``Metadata``, ``TensorStorageMetadata``,
``MetadataIndex``, the file system's ``_StorageInfo``...). Unpickling it into those classes
imports ``torch.distributed.checkpoint``, which pulls in DTensor and sympy: 0.7 s of every
conversion process, which needs no more than each tensor's size, dtype, chunks and byte ranges.
The records below have the same names, fields and pickled state as DCP's classes (torch 2.x), so
the allow-list unpickler (:func:`~yuanlfa.checkpoint.torch_files.load_pickle_restricted`, given
:data:`RECORDS`) builds them instead. DCP's own load path
(:class:`~yuanlfa.checkpoint.storage.SafeReader`) keeps DCP's classes, whose types its code
checks.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yuanlfa.checkpoint.errors import CheckpointError
from yuanlfa.checkpoint.torch_files import load_pickle_restricted

MODULE = "torch.distributed.checkpoint.metadata"  # where DCP's classes live, as pickled
FILESYSTEM = "torch.distributed.checkpoint.filesystem"


@dataclass
class ChunkStorageMetadata:
    """One stored block of a tensor: where it starts (``offsets``) and its ``sizes``."""

    offsets: Any
    sizes: Any


class _MEM_FORMAT_ENCODING(enum.Enum):  # noqa: N801 (DCP's name, as pickled)
    TORCH_CONTIGUOUS_FORMAT = 0
    TORCH_CHANNELS_LAST = 1
    TORCH_PRESERVE_FORMAT = 2


@dataclass
class TensorProperties:
    """A stored tensor's dtype and the rest of DCP's properties (pickled as a 5-tuple)."""

    dtype: Any = None
    layout: Any = None
    requires_grad: bool = False
    memory_format: Any = None  # the encoding above: no tensor is made from it here
    pin_memory: bool = False

    def __setstate__(self, state: tuple) -> None:
        (self.dtype, self.layout, self.requires_grad, self.memory_format, self.pin_memory) = state


@dataclass
class TensorStorageMetadata:
    properties: TensorProperties
    size: Any
    chunks: list[ChunkStorageMetadata]


@dataclass
class BytesStorageMetadata:
    pass


@dataclass
class StorageMeta:
    checkpoint_id: Any = None
    save_id: str | None = None
    load_id: str | None = None
    modules: list[str] = field(default_factory=list)


@dataclass
class Metadata:
    state_dict_metadata: dict[str, Any]
    planner_data: Any = None
    storage_data: Any = None
    storage_meta: StorageMeta | None = None
    version: str | None = None


@dataclass(frozen=True)
class MetadataIndex:
    """The key of :attr:`Metadata.storage_data`: a tensor's name and a chunk's offsets (equal,
    and hashed alike, whether the offsets are a ``torch.Size`` or a tuple)."""

    fqn: str
    offset: tuple[int, ...] | None = None
    index: int | None = field(default=None, hash=False, compare=False)

    def __init__(self, fqn: str, offset: Any = None, index: int | None = None) -> None:
        object.__setattr__(self, "fqn", fqn)
        object.__setattr__(self, "offset", None if offset is None else tuple(offset))
        object.__setattr__(self, "index", index)


@dataclass
class _StorageInfo:
    """Where a chunk's bytes lie: ``length`` bytes of ``relative_path`` from ``offset``."""

    relative_path: str
    offset: int
    length: int
    transform_descriptors: Any = None


RECORDS: dict[tuple[str, str], type] = {
    **{
        (MODULE, c.__name__): c
        for c in (
            Metadata,
            TensorStorageMetadata,
            BytesStorageMetadata,
            TensorProperties,
            ChunkStorageMetadata,
            MetadataIndex,
            StorageMeta,
            _MEM_FORMAT_ENCODING,
        )
    },
    (FILESYSTEM, "_StorageInfo"): _StorageInfo,
}


def check_sizes(directory: Path, metadata: Any) -> None:
    """Every data file is at least as long as the metadata says: a truncated copy (an
    interrupted download or rsync) is named here, not found as garbage or an EOFError later.
    (DCP's classes or the records above: the same fields.)"""
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        file = directory / name
        try:
            size = file.stat().st_size
        except OSError:
            raise CheckpointError(
                f"{file}: missing; the checkpoint's metadata lists it, so the copy is incomplete"
            ) from None
        if size < end:
            raise CheckpointError(
                f"{file}: {size} bytes, but the checkpoint's metadata needs {end}; the file is "
                "truncated (an interrupted copy?), copy the checkpoint again"
            )


def open_metadata(directory: Path, records: bool) -> Any:
    """The checkpoint's ``.metadata`` at ``directory``, unpickled through the allow-list (into
    the records above, or into DCP's classes) and checked against its files."""
    path = directory / ".metadata"
    try:
        with open(path, "rb") as f:
            metadata = load_pickle_restricted(f, path, RECORDS if records else None)
    except OSError as exc:
        raise CheckpointError(
            f"{path}: cannot read the checkpoint's metadata ({exc.strerror}); the checkpoint "
            "is incomplete"
        ) from None
    if records:
        expected: type = Metadata
    else:
        from torch.distributed.checkpoint.metadata import Metadata as expected
    if not isinstance(metadata, expected):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not checkpoint metadata")
    check_sizes(directory, metadata)
    return metadata


@functools.lru_cache(maxsize=8)
def _cached(directory: str, stamp: tuple[int, int]) -> Metadata:
    return open_metadata(Path(directory), records=True)


def forget_records() -> None:
    _cached.cache_clear()


def read_metadata(path: str | Path) -> Metadata:
    """The metadata records of our checkpoint at ``path``, read once while the file is
    unchanged (conversions ask for each of hundreds of tensors)."""
    meta = Path(path) / ".metadata"
    try:
        st = meta.stat()
    except OSError:
        return open_metadata(Path(path), records=True)  # names the missing file
    return _cached(str(Path(path).resolve()), (st.st_mtime_ns, st.st_ino))


def stored_tensors(path: str | Path) -> dict[str, Any]:
    """Key -> stored tensor metadata (``size``, ``properties.dtype``, ``chunks``) of the
    checkpoint at ``path``."""
    return read_metadata(path).state_dict_metadata
