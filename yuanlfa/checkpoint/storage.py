"""Reading and writing blocks of our checkpoints through torch.distributed.checkpoint (DCP).

The training format (:mod:`~yuanlfa.checkpoint.layout_free`) and the converters share these:
a reader whose metadata goes through the allow-list unpickler, the stored tensors' metadata, the
collective load of blocks, whole-tensor reads, and the streamed single-process write.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from yuanlfa.checkpoint.blocks import Block
from yuanlfa.checkpoint.errors import CheckpointError
from yuanlfa.checkpoint.planners import BlockLoadPlanner, LazySavePlanner, LazyTensor
from yuanlfa.checkpoint.torch_files import load_pickle_restricted


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def quiet_single_process() -> Iterator[None]:
    # DCP warns that it assumes a single process when no process group exists: that is the
    # intent here (one-process training and the conversion tools).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_lazy(directory: Path, tensors: list[LazyTensor]) -> None:
    """Write whole tensors produced one at a time (conversion tools), single process.

    One file per tensor: torch's FileSystemWriter keeps every tensor of a file alive until the
    file is complete, so a single file would hold the whole checkpoint in memory."""
    writer = dcp.FileSystemWriter(directory, thread_count=1, single_file_per_rank=False)
    with quiet_single_process():
        dcp.save({}, storage_writer=writer, planner=LazySavePlanner(tensors), no_dist=True)


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with the metadata unpickled through an allow-list (DCP's own reader
    runs a bare ``pickle.load`` on it, so a crafted checkpoint would run code), read once
    (conversions call load hundreds of times). Tensor data is read by DCP with
    ``weights_only=True``."""

    def read_metadata(self, *args, **kwargs):
        if not hasattr(self, "_metadata"):
            path = Path(self.path) / ".metadata"
            try:
                with open(path, "rb") as f:
                    metadata = load_pickle_restricted(f, path)
            except OSError as exc:
                raise CheckpointError(
                    f"{path}: cannot read the checkpoint's metadata ({exc.strerror}); the "
                    "checkpoint is incomplete"
                ) from None
            if not isinstance(metadata, Metadata):
                raise CheckpointError(
                    f"{path}: holds a {type(metadata).__name__}, not checkpoint metadata"
                )
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            self._metadata = metadata
        return self._metadata


@functools.lru_cache(maxsize=8)
def _cached_reader(path: str, stamp: tuple[int, int]) -> SafeReader:
    return SafeReader(path)


def storage_reader(path: str | Path) -> SafeReader:
    """A reader of ``path``, reused while its metadata file is unchanged."""
    meta = Path(path) / ".metadata"
    try:
        st = meta.stat()
    except OSError:
        return SafeReader(path)  # raises a CheckpointError naming the file on use
    return _cached_reader(str(Path(path).resolve()), (st.st_mtime_ns, st.st_ino))


def stored_tensors(path: str | Path) -> dict[str, Any]:
    """Key -> DCP tensor metadata (global size, dtype) of the checkpoint at ``path``."""
    return storage_reader(path).read_metadata().state_dict_metadata


def load_blocks(path: Path, blocks: list[Block]) -> None:
    """Fill ``blocks`` from the checkpoint at ``path`` (collective when a group exists)."""
    with quiet_single_process():
        dcp.load(
            {},
            storage_reader=storage_reader(path),
            planner=BlockLoadPlanner(blocks),
            no_dist=not distributed(),
        )


def read_tensor(path: Path, key: str) -> torch.Tensor:
    """One whole tensor of our checkpoint ``path`` (any layout wrote it)."""
    md = stored_tensors(path)[key]
    out = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    load_blocks(path, [Block(key, tuple(md.size), (0,) * len(md.size), out)])
    return out
