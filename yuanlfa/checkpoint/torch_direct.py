"""``torch.save`` files (Megatron's ``model_optim_rng.pt``) read at disk speed: tensors are read
straight from their stored bytes into the destination buffer.

``torch.load`` (even memory-mapped) materializes every storage, and copying a tensor-parallel
shard out of a memory-mapped file faults it in page by page. Here the file's pickle is run
through the same allow-list unpickler as :func:`~yuanlfa.checkpoint.torch_files.load_untrusted`
(torch's ``weights_only`` unpickler with the same extra globals), but each storage it names
becomes a meta-device placeholder: the result has every tensor's shape, dtype, stride and offset
and no data. The storage's byte range in the file comes from the zip's own directory (torch
stores each ``data/<key>`` record uncompressed); :meth:`TorchFile.read_into` then reads a
tensor, or a slice of it, with large positional reads into the destination (thread-safe, so
several reads may be in flight). Anything unexpected (a legacy non-zip file, compressed or
big-endian records) falls back to ``load_untrusted``, which gives the same tensors.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from yuanlfa.checkpoint.errors import CheckpointError
from yuanlfa.checkpoint.file_copy import FileRange
from yuanlfa.checkpoint.torch_files import load_untrusted, refused, safe_globals_scope

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # a zip entry's local file header


class NotDirect(Exception):
    """This file is not stored the way the direct path reads; ``torch.load`` handles it."""


def record_offset(fd: int, info: zipfile.ZipInfo, base: int = 0) -> int:
    """The file offset of the data of zip entry ``info`` (its local header says how far past the
    header it starts; ``base``: where the archive starts in the file)."""
    header = os.pread(fd, _LOCAL_HEADER.size, base + info.header_offset)
    if len(header) != _LOCAL_HEADER.size:
        raise NotDirect("truncated archive")
    fields = _LOCAL_HEADER.unpack(header)
    if fields[0] != b"PK\x03\x04":
        raise NotDirect("no local header")
    return base + info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]


def pread_into(fd: int, offset: int, dest: torch.Tensor) -> None:
    """Fill the contiguous tensor ``dest`` with the bytes at ``offset``: positional reads, so
    threads may share ``fd``."""
    view = memoryview(dest.reshape(-1).view(torch.uint8).numpy())
    while view.nbytes:
        got = os.preadv(fd, [view], offset)
        if not got:
            raise EOFError("file ends early")
        view, offset = view[got:], offset + got


class TorchFile:
    """One ``torch.save`` file: :attr:`obj` is its object with tensors that carry no data
    (device ``meta``; real tensors after a fallback), read with :meth:`read_into` or
    :meth:`read`. Close with :meth:`close` (or use as a context manager)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._spans: dict[int, tuple[int, int]] = {}  # meta storage -> (file offset, nbytes)
        self._keep: list[torch.UntypedStorage] = []  # alive, so storage addresses stay unique
        self._fd: int | None = None
        try:
            self.obj = self._load() if sys.byteorder == "little" else None
        except NotDirect:
            self.obj = None
        if self.obj is None:
            self.close()
            self._spans.clear()
            self.obj = load_untrusted(self.path)  # memory-mapped tensors

    @property
    def direct(self) -> bool:
        return self._fd is not None

    def _load(self) -> Any:
        try:
            archive = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError):
            raise NotDirect("not a zip archive") from None  # load_untrusted says what is wrong
        with archive:
            infos = {i.filename: i for i in archive.infolist()}
            pickles = [n for n in infos if n.endswith("data.pkl") and n.count("/") <= 1]
            if len(pickles) != 1:
                raise NotDirect("no single data.pkl")
            prefix = pickles[0].removesuffix("data.pkl")
            order = infos.get(prefix + "byteorder")
            if order is not None and archive.read(order).strip() != b"little":
                raise NotDirect("big-endian data")
            try:
                data = archive.read(pickles[0])
            except (zipfile.BadZipFile, OSError, EOFError):
                raise NotDirect("unreadable data.pkl") from None
        fd = os.open(self.path, os.O_RDONLY)
        self._fd = fd
        size = os.fstat(fd).st_size

        def persistent_load(pid: Any) -> Any:
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
                raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.60}")
            _, kind, key, _location, numel = pid
            dtype = torch.uint8 if kind is torch.UntypedStorage else getattr(kind, "dtype", None)
            if not isinstance(dtype, torch.dtype) or not isinstance(numel, int) or numel < 0:
                raise pickle.UnpicklingError(f"malformed storage reference {pid!r:.60}")
            key = key.decode() if isinstance(key, bytes) else str(key)
            info = infos.get(f"{prefix}data/{key}")
            if info is None:
                raise pickle.UnpicklingError(f"storage data/{key} is missing from the archive")
            if info.compress_type != zipfile.ZIP_STORED:
                raise NotDirect("compressed storage")
            nbytes = numel * torch._utils._element_size(dtype)
            offset = record_offset(fd, info)
            if info.file_size < nbytes or offset + nbytes > size:
                raise EOFError(f"storage data/{key} ends beyond the file")
            storage = torch.UntypedStorage(nbytes, device="meta")
            self._keep.append(storage)
            self._spans[storage._cdata] = (offset, nbytes)
            return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)

        from torch import _weights_only_unpickler

        with safe_globals_scope():
            try:
                unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(data), encoding="utf-8")
                unpickler.persistent_load = persistent_load  # type: ignore[method-assign]
                return unpickler.load()
            except pickle.UnpicklingError as exc:
                raise refused(self.path, exc) from None
            except NotDirect:
                raise
            except (RuntimeError, EOFError, ValueError, TypeError, KeyError, IndexError) as exc:
                raise CheckpointError(
                    f"{self.path}: not a readable torch checkpoint file ({exc}); the file is "
                    "truncated or corrupt, copy it again"
                ) from None

    def read_into(self, t: torch.Tensor, dest: torch.Tensor) -> None:
        """``dest.copy_(t)`` for a tensor (or a view of one) of :attr:`obj`: one positional read
        straight into ``dest`` when both are contiguous, else through one staging buffer of the
        stored span."""
        if tuple(dest.shape) != tuple(t.shape) or dest.dtype != t.dtype:
            raise CheckpointError(
                f"internal: reading {tuple(t.shape)} {t.dtype} into "
                f"{tuple(dest.shape)} {dest.dtype}"
            )
        if t.device.type != "meta":
            dest.copy_(t)
            return
        if self._fd is None:
            raise CheckpointError(f"{self.path}: read after close")
        offset, nbytes = self._spans[t.untyped_storage()._cdata]
        item = t.element_size()
        if t.numel() == 0:
            return
        if t.is_contiguous():
            start, count = t.storage_offset(), t.numel()
            stride: tuple[int, ...] | None = None
        else:  # the span from the first to the last element, viewed with t's strides
            start = t.storage_offset()
            count = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True))
            stride = t.stride()
        if (start + count) * item > nbytes:
            raise CheckpointError(f"{self.path}: a tensor lies beyond its storage (corrupt file)")
        try:
            if stride is None and dest.is_contiguous():
                pread_into(self._fd, offset + start * item, dest)
                return
            staged = torch.empty(count, dtype=t.dtype)
            pread_into(self._fd, offset + start * item, staged)
            if stride is None:
                dest.copy_(staged.view(t.shape))
            else:
                dest.copy_(staged.as_strided(t.shape, stride))
        except (OSError, EOFError) as exc:
            raise CheckpointError(
                f"{self.path}: cannot read it ({exc}); the file is truncated or unreadable"
            ) from None

    def range_of(self, t: torch.Tensor) -> FileRange | None:
        """Where the bytes of a contiguous data-less tensor (or view) of :attr:`obj` lie in the
        file, for a file-to-file copy; None when they are not one plain range."""
        if t.device.type != "meta" or self._fd is None or sys.byteorder != "little":
            return None
        if not t.is_contiguous():
            return None
        offset, nbytes = self._spans[t.untyped_storage()._cdata]
        item = t.element_size()
        start, size = t.storage_offset() * item, t.numel() * item
        if start + size > nbytes:
            return None  # read_into names the damage
        return FileRange(self.path, offset + start, size)

    def read(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor of :attr:`obj` with its data (contiguous)."""
        out = torch.empty(tuple(t.shape), dtype=t.dtype)
        self.read_into(t, out)
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> TorchFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
