"""Every pickle this library reads goes through an allow-list; large ``torch.save`` files are
written with bounded memory.

Reading: a checkpoint is something users download and share, so no file in one may run code.
- ``torch.save`` files (Megatron-format files: pickles carrying an ``argparse.Namespace`` and
  Python/numpy RNG states; our RNG files) are loaded with torch's ``weights_only`` unpickler,
  which admits tensors and plain containers, plus an explicit allow-list of exactly those extra
  types (:func:`load_untrusted`). Tensors are memory-mapped, so a large file costs no resident
  memory until read.
- Plain pickles (torch.distributed.checkpoint's ``.metadata``, which DCP itself reads with a bare
  ``pickle.load``) go through :func:`load_pickle_restricted`, which admits DCP's metadata classes,
  torch sizes, dtypes and layouts, and paths.
Any other global (a function, an arbitrary class) is refused before anything is called, and the
error names the global that was found.

Writing: :func:`save_streaming` writes the same zip layout as ``torch.save`` (``data.pkl`` plus one
``data/<key>`` record per storage), but each tensor is a :class:`Pending` placeholder produced only
when its record is written, so at most one tensor is in memory at a time.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import pickle
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from yuanlfa.checkpoint.errors import CheckpointError
from yuanlfa.checkpoint.file_copy import FileRange, fsync_files
from yuanlfa.checkpoint.stored import nbytes_of

ALLOWED_TYPES = "tensors, containers, argparse.Namespace and Python/numpy RNG states"


def _numpy_globals() -> list[Any]:
    """What a pickled ``numpy.random.get_state()`` needs (an ndarray of uint32 and its dtype),
    under the module paths numpy 1 and numpy 2 write."""
    try:
        import numpy as np
    except ImportError:
        return []
    out: list[Any] = [np.ndarray, np.dtype]
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    for path in ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"):
        out.append((_reconstruct, path))
    for dtype in (np.uint32, np.int64, np.float64):
        cls = type(np.dtype(dtype))
        if cls is not np.dtype:  # numpy >= 1.25 pickles dtypes by their class
            out.append(cls)
    return out


def _safe_globals() -> list[Any]:
    return [argparse.Namespace, *_numpy_globals()]


def safe_globals_scope() -> contextlib.AbstractContextManager:
    """torch's ``weights_only`` unpickler admits the allow-list's extra globals within this."""
    globals_ = _safe_globals()
    scoped = getattr(torch.serialization, "safe_globals", None)
    if scoped is None:  # torch < 2.5: register them process-wide (the same allow-list)
        torch.serialization.add_safe_globals([g for g in globals_ if not isinstance(g, tuple)])
        return contextlib.nullcontext()
    return scoped(globals_)


def refused(path: Path, exc: pickle.UnpicklingError) -> CheckpointError:
    """The one-line error for a pickle the allow-list refused."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # torch's message starts with advice to disable the check; keep only what it found.
    found = [line for line in lines if "GLOBAL" in line or "global" in line]
    first = (found or lines or [type(exc).__name__])[0]
    return CheckpointError(
        f"{path}: refused to unpickle it ({first}). Only {ALLOWED_TYPES} are accepted "
        "from checkpoint files, so nothing in them can run code; this file holds "
        "something else (it may be malicious, or not a Megatron checkpoint)"
    )


def load_untrusted(path: str | Path) -> Any:
    """``torch.load`` of a foreign pickle through the allow-list (see the module docstring)."""
    path = Path(path)
    with safe_globals_scope():
        try:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                # A legacy (non-zip) file cannot be memory-mapped: read it whole.
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise refused(path, exc) from None
        except (OSError, RuntimeError, EOFError) as exc:
            problem = str(exc).split(". ")[0] or type(exc).__name__  # torch adds paragraphs
            raise CheckpointError(
                f"{path}: not a readable torch checkpoint file ({problem}); the file is "
                "truncated or corrupt, copy it again"
            ) from None


def _dcp_metadata_allowed(module: str, name: str) -> bool:
    """The globals a torch.distributed.checkpoint ``.metadata`` pickle needs, and nothing else."""
    if module == "torch.distributed.checkpoint.metadata":
        # Dataclasses and enums of DCP's metadata (Metadata, TensorStorageMetadata, ...): built
        # from their fields, none of them calls anything given in the file.
        return name in {
            "Metadata",
            "TensorStorageMetadata",
            "TensorProperties",
            "ChunkStorageMetadata",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        }
    if module == "torch.distributed.checkpoint.filesystem":
        return name == "_StorageInfo"
    if module == "torch":
        return name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
    if module == "torch.serialization":
        return name == "_get_layout"  # looks a layout up by name in a fixed table
    if module == "pathlib":
        return name in {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}
    if module == "collections":
        return name == "OrderedDict"
    return False


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, stream: Any, replace: Mapping[tuple[str, str], type]) -> None:
        super().__init__(stream)
        self.replace = replace

    def find_class(self, module: str, name: str) -> Any:
        if not _dcp_metadata_allowed(module, name):
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        if (module, name) in self.replace:
            return self.replace[module, name]
        return super().find_class(module, name)


def load_pickle_restricted(
    stream: Any, path: str | Path, replace: Mapping[tuple[str, str], type] | None = None
) -> Any:
    """Unpickle a checkpoint's ``.metadata`` from ``stream`` through the allow-list above;
    ``path`` names the file in errors. ``replace``: allowed globals built as other classes
    instead, by (module, name) (:mod:`~yuanlfa.checkpoint.dcp_records`' records, read without
    importing DCP)."""
    try:
        return _RestrictedUnpickler(stream, replace or {}).load()
    except pickle.UnpicklingError as exc:
        if "is not allowed" in str(exc):
            raise CheckpointError(
                f"{path}: refused to unpickle it ({exc}). Only torch.distributed.checkpoint's "
                "metadata classes, sizes, dtypes and paths are accepted from a checkpoint's "
                "metadata, so nothing in it can run code; this file holds something else (it "
                "may be malicious)"
            ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint metadata file ({exc})") from None
    except (EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: truncated or corrupt checkpoint metadata ({type(exc).__name__}: {exc})"
        ) from None


class Pending:
    """A tensor of known shape and dtype, produced by ``load()`` when the file writer needs it."""

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        load: Callable[[], Any],
        cost: int | None = None,
        source: Sequence[FileRange] | None = None,
    ) -> None:
        self.shape, self.dtype, self.load = tuple(shape), dtype, load
        # The tensor's exact bytes (row-major, this dtype) as ranges of existing files: the
        # writer copies them file to file and never calls ``load``.
        self.source = source
        # Bytes held while it is loaded (a slice keeps its whole tensor alive).
        self.cost = self.numel * dtype.itemsize if cost is None else cost

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def __reduce_ex__(self, protocol: int):
        stride = []
        acc = 1
        for s in reversed(self.shape):
            stride.append(acc)
            acc *= s
        # Exactly how torch.save pickles a contiguous CPU tensor.
        args = (_StorageRef(self), 0, self.shape, tuple(reversed(stride)), False)
        return torch._utils._rebuild_tensor_v2, (*args, collections.OrderedDict())


class _StorageRef:
    def __init__(self, pending: Pending) -> None:
        self.pending = pending


def _storage_type(dtype: torch.dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated, but is what pickles name
        name = torch.storage.TypedStorage(dtype=dtype, device="cpu")._pickle_storage_type()
    return getattr(torch, name)


class _StreamingFile:
    """One ``torch.save``-format file: the pickle first, then the tensor records as they come
    (:class:`~yuanlfa.checkpoint.torch_zip.ArchiveWriter`: a tensor whose bytes lie in a source
    file is copied file to file)."""

    def __init__(self, obj: Any, path: str | Path) -> None:
        from yuanlfa.checkpoint.torch_zip import ArchiveWriter, write_header_records

        self.refs, self.path = pickle_pending(obj), Path(path)
        self.writer = ArchiveWriter(path)
        try:
            write_header_records(self.writer, self.refs.data)
        except BaseException:  # (a full disk): the caller never sees this stream to abort it
            self.writer.abort()
            raise

    def write(self, key: int, tensor: Any) -> int:
        """Write tensor ``key``, produced by its ``load()``; returns its bytes."""
        pending = self.refs[key]
        if tuple(tensor.shape) != pending.shape or tensor.dtype != pending.dtype:
            raise CheckpointError(
                f"internal: tensor {key} is {tuple(tensor.shape)} {tensor.dtype}, announced as "
                f"{pending.shape} {pending.dtype}"
            )
        return self.writer.write_tensor(f"data/{key}", tensor)

    def copy(self, key: int) -> int:
        """Write tensor ``key`` from its :attr:`Pending.source` ranges; returns its bytes."""
        pending = self.refs[key]
        nbytes = nbytes_of(pending.source)
        if nbytes != pending.numel * pending.dtype.itemsize:
            raise CheckpointError(
                f"internal: tensor {key}'s source holds {nbytes} bytes, announced as "
                f"{pending.shape} {pending.dtype}"
            )
        return self.writer.copy_ranges(f"data/{key}", pending.source)

    def close(self, sync: bool = True) -> None:
        self.writer.close(sync=sync)

    def abort(self) -> None:
        self.writer.abort()


class PickledRefs(list):
    """The pickle of an object holding :class:`Pending` tensors (``data``) and those tensors in
    storage-key order (the list)."""

    data: bytes


def pickle_pending(obj: Any) -> PickledRefs:
    """Pickle ``obj`` as ``torch.save`` does, each :class:`Pending` as a storage named by its
    index in the returned list."""
    refs = PickledRefs()

    class _Pickler(pickle.Pickler):
        def persistent_id(self, item: Any):
            if isinstance(item, _StorageRef):
                refs.append(item.pending)
                kind = _storage_type(item.pending.dtype)
                return ("storage", kind, str(len(refs) - 1), "cpu", item.pending.numel)
            if isinstance(item, torch.Tensor | torch.UntypedStorage | torch.TypedStorage):
                raise TypeError("save_streaming: wrap tensors in Pending")
            return None

    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    refs.data = buf.getvalue()
    return refs


def save_streaming(
    files: list[tuple[Any, str | Path]], progress: Callable[[int], None] | None = None
) -> None:
    """``torch.save(obj, path)`` for each ``(obj, path)``, where ``obj`` may hold
    :class:`Pending` tensors; ``torch.load`` reads the results like any other file.

    The files are written in lockstep: the first tensor of each, then the second of each, and so
    on. Files of one pipeline stage at different tp ranks hold slices of the same parameters in
    the same order, so a loader that keeps its last source tensor reads each one once.
    ``progress(nbytes)`` is called after each tensor. The next tensor is produced while one is
    written when both fit in the largest :attr:`Pending.cost`."""
    from yuanlfa.checkpoint.prefetch import Prefetcher

    streams = []
    try:
        for obj, path in files:
            streams.append(_StreamingFile(obj, path))
        order = [
            (key, i)
            for key in range(max((len(s.refs) for s in streams), default=0))
            for i, stream in enumerate(streams)
            if key < len(stream.refs)
        ]
        # Tensors with a source are copied file to file: nothing to produce in memory.
        produced = [item for item in order if streams[item[1]].refs[item[0]].source is None]
        prefetch = Prefetcher(
            produced,
            lambda item: streams[item[1]].refs[item[0]].load(),
            lambda item: streams[item[1]].refs[item[0]].cost,
        )
        try:
            for key, i in order:
                if streams[i].refs[key].source is not None:
                    nbytes = streams[i].copy(key)
                else:
                    nbytes = streams[i].write(key, prefetch.get((key, i)))
                if progress is not None:
                    progress(nbytes)
        finally:
            prefetch.close()
        # Each file's write-back starts when it is complete; the fsyncs come last, together.
        for stream in streams:
            stream.close(sync=False)
        fsync_files([s.path for s in streams])
    except BaseException:
        for stream in streams:
            stream.abort()
        raise
