"""Whole tensors written in torch.distributed.checkpoint's file format without its writer, at disk
speed (the conversions' output in our format).

DCP's ``FileSystemWriter`` stores each item as one ``torch.save`` archive in a ``.distcp`` file and
lists them in a pickled ``.metadata`` (the format :mod:`yuanlfa.checkpoint.dcp_direct` reads).
Going through it costs ``torch.save``'s writer (miniz's CRC at about 1 GB/s, every byte from
memory) and a Python stream: measured, the larger part of the 2B imports' time. Here each tensor
becomes ``__0_<i>.distcp`` holding the archive ``torch.save(tensor, stream)`` would write, by
:class:`~yuanlfa.checkpoint.torch_zip.ArchiveWriter` (a tensor whose rows already lie in existing
files is copied file to file), and ``.metadata`` holds the same classes with the same fields as
DCP's own save of these tensors (one chunk each, as :class:`LazySavePlanner` plans them); tests
compare the two and read the result back with DCP's reader.
"""

from __future__ import annotations

import math
import os
import pickle
import uuid
from pathlib import Path

import torch
from torch.distributed.checkpoint import filesystem
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from yuanlfa.checkpoint.blocks import LazyTensor
from yuanlfa.checkpoint.errors import CheckpointError
from yuanlfa.checkpoint.file_copy import OutputFile, fsync_files
from yuanlfa.checkpoint.prefetch import Prefetcher
from yuanlfa.checkpoint.torch_files import Pending, pickle_pending
from yuanlfa.checkpoint.torch_zip import ArchiveWriter, write_header_records

METADATA = ".metadata"  # DCP's name for it


def _stored_source(t: LazyTensor):
    """The file ranges holding all of ``t`` in order, or None."""
    if t.stored is None or t.stored.nbytes != math.prod(t.shape) * t.dtype.itemsize:
        return None
    return t.stored.ranges


def write_dcp(directory: Path, tensors: list[LazyTensor]) -> None:
    """Our checkpoint's tensor files in ``directory`` (created if missing): one
    ``.distcp`` per tensor and DCP's ``.metadata``, all fsynced. Tensors are produced one at a
    time (the next while this one is written, when both fit in the largest)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    by_key = {t.key: t for t in tensors}
    sources = {t.key: _stored_source(t) for t in tensors}
    prefetch = Prefetcher(
        [t.key for t in tensors if sources[t.key] is None],
        lambda key: by_key[key].load(),
        lambda key: math.prod(by_key[key].shape) * by_key[key].dtype.itemsize,
    )
    state_dict_metadata, storage_data, files = {}, {}, []
    try:
        for i, t in enumerate(tensors):
            name = f"__0_{i}.distcp"
            files.append(directory / name)
            refs = pickle_pending(Pending(t.shape, t.dtype, t.load))
            with OutputFile(directory / name) as out:
                archive = ArchiveWriter(name="archive", file=out)
                try:
                    _write_one(archive, refs.data, t, sources[t.key], prefetch)
                except BaseException:
                    archive.abort()
                    raise
                length = out.position
                out.close(sync=False)  # write-back starts; fsynced below, all together
            offsets = torch.Size([0] * len(t.shape))
            state_dict_metadata[t.key] = TensorStorageMetadata(
                properties=TensorProperties(dtype=t.dtype),
                size=torch.Size(t.shape),
                chunks=[ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(t.shape))],
            )
            storage_data[MetadataIndex(t.key, offsets, 0)] = _StorageInfo(name, 0, length)
    finally:
        prefetch.close()
    metadata = Metadata(
        state_dict_metadata=state_dict_metadata,
        storage_data=storage_data,
        storage_meta=StorageMeta(checkpoint_id=directory, save_id=str(uuid.uuid4())),
    )
    # The format version DCP's writer stamps (torch versions without one stamp nothing).
    metadata.version = getattr(filesystem, "CURRENT_DCP_VERSION", None)
    fsync_files(files)
    tmp = directory / f"{METADATA}.tmp"  # as DCP: the metadata appears complete or not at all
    with open(tmp, "wb") as f:
        pickle.dump(metadata, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / METADATA)


def _write_one(archive: ArchiveWriter, pickled: bytes, t: LazyTensor, source, prefetch) -> None:
    write_header_records(archive, pickled)
    if source is not None:
        archive.copy_ranges("data/0", source)
    else:
        tensor = prefetch.get(t.key)
        # The metadata is planned from the declared shape: anything else would read back as
        # another tensor.
        if tuple(tensor.shape) != tuple(t.shape) or tensor.dtype != t.dtype:
            raise CheckpointError(
                f"{t.key}: the source gives {tuple(tensor.shape)} {tensor.dtype} where the "
                f"model has {tuple(t.shape)} {t.dtype}; the source does not match its config"
            )
        archive.write_tensor("data/0", tensor)
    archive.close()
