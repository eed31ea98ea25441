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

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta

from yuanlfa.checkpoint.blocks import Block, LazyTensor
from yuanlfa.checkpoint.dcp_records import forget_records, open_metadata, stored_tensors
from yuanlfa.checkpoint.errors import CheckpointError
from yuanlfa.checkpoint.planners import BlockLoadPlanner
from yuanlfa.config import ConfigError


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def quiet_single_process() -> Iterator[None]:
    # DCP warns that it assumes a single process when no process group exists: that is the
    # intent here (one-process training and the conversion tools).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@contextlib.contextmanager
def dcp_errors(path: Path, action: str) -> Iterator[None]:
    """torch.distributed.checkpoint wraps every failure in a ``CheckpointException`` (a
    BaseException, so ordinary handlers miss it) holding each rank's error: re-raise our own
    errors as they are, anything else as a CheckpointError naming ``path``."""
    try:
        yield
    except CheckpointException as exc:
        inner = first_failure(exc)
        if isinstance(inner, (CheckpointError, ConfigError)):
            raise inner from None
        problem = " ".join(f"{type(inner).__name__}: {inner}".split())
        raise CheckpointError(
            f"{path}: cannot {action} ({problem}); the checkpoint's files are truncated or "
            "corrupt, or the disk is full"
        ) from None


def first_failure(exc: CheckpointException) -> BaseException:
    """The first rank's own error inside DCP's CheckpointException (each entry is the error, or
    an (error, traceback) pair)."""
    for failure in exc.failures.values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, BaseException):
            return inner
    return exc


def save_lazy(directory: Path, tensors: list[LazyTensor]) -> None:
    """Write whole tensors produced one at a time (conversion tools), single process, in DCP's
    format (:func:`yuanlfa.checkpoint.dcp_write.write_dcp`: one file per tensor, those whose
    rows already lie in files copied file to file)."""
    from yuanlfa.checkpoint.dcp_write import write_dcp

    write_dcp(directory, tensors)


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with the metadata unpickled through an allow-list (DCP's own reader
    runs a bare ``pickle.load`` on it, so a crafted checkpoint would run code), read once
    (conversions call load hundreds of times). Tensor data is read by DCP with
    ``weights_only=True``."""

    def read_metadata(self, *args, **kwargs):
        if not hasattr(self, "_metadata"):
            metadata = open_metadata(Path(self.path), records=False)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            self._metadata = metadata
        return self._metadata


@functools.lru_cache(maxsize=8)
def _cached_reader(path: str, stamp: tuple[int, int]) -> SafeReader:
    return SafeReader(path)


def forget_metadata() -> None:
    """Drop every cached reader and metadata (for tests that rewrite a checkpoint in place)."""
    _cached_reader.cache_clear()
    forget_records()


def storage_reader(path: str | Path) -> SafeReader:
    """A reader of ``path``, reused while its metadata file is unchanged."""
    meta = Path(path) / ".metadata"
    try:
        st = meta.stat()
    except OSError:
        return SafeReader(path)  # raises a CheckpointError naming the file on use
    return _cached_reader(str(Path(path).resolve()), (st.st_mtime_ns, st.st_ino))


def load_blocks(path: Path, blocks: list[Block]) -> None:
    """Fill ``blocks`` from the checkpoint at ``path`` (collective when a group exists)."""
    with quiet_single_process(), dcp_errors(path, "read the checkpoint"):
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
