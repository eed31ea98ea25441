"""Output files written at disk speed: byte ranges of source files copied inside the kernel.

Where a converted tensor is, byte for byte, a contiguous range of a source file (same dtype; a
whole tensor or a block of its rows), :class:`OutputFile` copies that range with
``copy_file_range`` (what ``cp`` does): no user-space buffer, one copy from page cache to page
cache. Measured on the 2B checkpoint's embedding (553 MB, ext4 in a VM): 0.14-0.6 s, against
0.2-2.3 s for ``write()`` of the same bytes from a tensor in memory. When the kernel refuses a
copy (another file system, an old kernel, a file system without support) the range goes through
a bounded buffer with ``pread`` / ``pwrite`` instead: the same bytes. Runs of short ranges (the
rows of a column block) are gathered from read-only maps of their files into one ``pwritev``
each. Other tensors are written from their memory with large positional writes. The disk's
write-back is started as the file grows; the file is fsynced once, when complete (by
:meth:`OutputFile.close`, or by the caller with :func:`fsync_files`).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import mmap
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from yuanlfa.checkpoint.errors import CheckpointError

# copy_file_range's answers that mean "not here, copy it yourself".
_REFUSED = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM, errno.EBADF}
_FALLBACK_CHUNK = 16 * 2**20  # the staging buffer of the read/write fallback
WRITE_BACK_BYTES = 64 * 2**20  # dirty bytes of a file after which its write-back starts
SMALL_RANGE = 2**20  # ranges below this are gathered into one write, not copied one by one
_IOV_MAX = 1024  # buffers per pwritev (Linux's limit)
OPEN_SOURCES = 64  # source files held open (or mapped) per output file at once
# Tests switch it off to cover the read/write path; it is also the answer on platforms without
# the call.
KERNEL_COPY = hasattr(os, "copy_file_range")


def truncated(path: Path, end: int) -> CheckpointError:
    """The error for a source file shorter than the metadata that points into it."""
    return CheckpointError(
        f"{path}: ends before byte {end}, where the checkpoint's metadata puts data; the file is "
        "truncated, copy it again"
    )


class FileRange(NamedTuple):
    """``nbytes`` bytes of ``path`` from ``offset``: a converted tensor's exact bytes. (A
    named tuple: converters make millions of them, and it is made twice as fast as a frozen
    dataclass.)"""

    path: Path
    offset: int
    nbytes: int


def block_ranges(rows: int, parts: Iterable[tuple[Path, int, int, int]]) -> Iterator[FileRange]:
    """The ranges of a block of ``rows`` rows, row by row: part ``(path, offset, stride,
    length)`` of row ``i`` is ``length`` bytes at ``offset + i * stride`` (the layout of
    :class:`~yuanlfa.checkpoint.stored.Ranges`' blocks)."""
    parts = tuple(parts)
    for i in range(rows):
        for path, offset, stride, length in parts:
            yield FileRange(path, offset + i * stride, length)


class SourceMaps:
    """Read-only maps of whole source files (the page cache, no copy), opened once each: many
    small ranges (a column block's rows) are written from them with few calls, and checksums
    read them. Thread-safe; :meth:`close` when done."""

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()

    def views(self, ranges: list[FileRange]) -> list[memoryview]:
        """Views of many ranges at once (a column block's thousands of rows: one lookup of
        each file, not one per range)."""
        out = []
        path, whole = None, memoryview(b"")
        for r in ranges:
            if r.path is not path and r.path != path:  # (ranges of a file share its path)
                path, whole = r.path, self._whole(r.path)
            end = r.offset + r.nbytes
            if end > len(whole):
                raise truncated(r.path, end)
            out.append(whole[r.offset : end])
        return out

    def batches(self, ranges: Iterable[FileRange]) -> Iterator[list[memoryview]]:
        """Views of all of ``ranges`` in order, at most ``_IOV_MAX`` at a time (blocks of rows
        of :class:`~yuanlfa.checkpoint.stored.Ranges` without a range object per row)."""
        blocks = getattr(ranges, "blocks", None)
        if blocks is not None:
            for rows, parts in blocks:
                yield from self.block_views(rows, parts)
            return
        it = iter(ranges)
        while run := list(itertools.islice(it, _IOV_MAX)):
            yield self.views(run)

    def block_views(
        self, rows: int, parts: tuple[tuple[Path, int, int, int], ...]
    ) -> Iterator[list[memoryview]]:
        """Views of a block of ``rows`` rows, at most ``_IOV_MAX`` at a time: part ``(path,
        offset, stride, length)`` of row ``i`` is ``length`` bytes at ``offset + i * stride``
        (a column block: one map lookup per part, not one per range)."""
        step = max(_IOV_MAX // max(len(parts), 1), 1)
        for first in range(0, rows, step):
            yield self._rows(range(first, min(first + step, rows)), parts)

    def _rows(self, rows: range, parts: tuple[tuple[Path, int, int, int], ...]) -> list[memoryview]:
        wholes = []
        for path, offset, stride, length in parts:
            whole = self._whole(path)
            end = offset + (rows[-1] if rows else 0) * stride + length
            if end > len(whole):
                raise truncated(path, end)
            wholes.append((whole, offset, stride, length))
        return [
            whole[offset + i * stride : offset + i * stride + length]
            for i in rows
            for whole, offset, stride, length in wholes
        ]

    def _whole(self, path: Path) -> memoryview:
        with self._lock:
            m = self._maps.pop(path, None)
            if m is None:
                # A map holds a descriptor of its own: at most OPEN_SOURCES of them (a source
                # checkpoint may hold a file per tensor), the least recently used one closed.
                while len(self._maps) >= OPEN_SOURCES and self._drop_oldest():
                    pass
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) if size else b""
            self._maps[path] = m  # last: the most recently used
        return memoryview(m)

    def _drop_oldest(self) -> bool:
        for path, m in self._maps.items():
            try:
                if isinstance(m, mmap.mmap):
                    m.close()
            except BufferError:  # a view of it is still in use: keep it
                continue
            del self._maps[path]
            return True
        return False

    def close(self) -> None:
        with self._lock:
            for m in self._maps.values():
                if isinstance(m, mmap.mmap):
                    with contextlib.suppress(BufferError):  # a view still alive: freed later
                        m.close()
            self._maps.clear()


class OutputFile:
    """A file written front to back from tensors and :class:`FileRange` copies, fsynced by
    :meth:`close` (unless told the caller does it). Use as a context manager; a failure leaves
    the file for the caller's temporary directory to remove."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.position = 0
        self._sources: dict[Path, int] = {}  # read-only fds of the copied files
        self._written_back = 0  # where the write-back started last
        self._maps: SourceMaps | None = None  # for runs of small ranges

    def write(self, data: torch.Tensor | bytes | memoryview) -> None:
        """Append ``data`` (a tensor's bytes as they are in memory: contiguous, no copy)."""
        if isinstance(data, torch.Tensor):
            if data.numel() == 0:
                return
            data = memoryview(data.contiguous().reshape(-1).view(torch.uint8).numpy())
        view = memoryview(data).cast("B")
        while view.nbytes:
            n = os.pwrite(self.fd, view, self.position)
            view, self.position = view[n:], self.position + n
        self._write_back()

    def copy(self, src: FileRange) -> None:
        """Append the bytes of ``src``: in the kernel where it copies, else through a buffer."""
        fd = self._sources.pop(src.path, None)
        if fd is None:
            if len(self._sources) >= OPEN_SOURCES:  # the least recently used one goes
                os.close(self._sources.pop(next(iter(self._sources))))
            fd = os.open(src.path, os.O_RDONLY)
        self._sources[src.path] = fd  # last: the most recently used
        offset, left = src.offset, src.nbytes
        if KERNEL_COPY:
            try:
                while left:
                    n = os.copy_file_range(fd, self.fd, left, offset, self.position)
                    if n == 0:
                        raise truncated(src.path, offset + left)
                    offset, left, self.position = offset + n, left - n, self.position + n
                self._write_back()
                return
            except OSError as exc:
                if exc.errno not in _REFUSED:
                    raise
        self._copy_through_buffer(fd, src.path, offset, left)

    def copy_all(self, ranges: Iterable[FileRange]) -> None:
        """Append the bytes of ``ranges`` in order: large ones copied in the kernel, runs of
        small ones (the rows of a column block: thousands of a few KiB) gathered from maps of
        their files into one positional write each, instead of a call per range. Ranges held
        as blocks of rows (:class:`~yuanlfa.checkpoint.stored.Ranges`, whose ``blocks`` are
        ``(rows, parts)``) gather a block of short parts straight from its parts, without a
        range object per row."""
        blocks = getattr(ranges, "blocks", None)
        if blocks is not None and hasattr(os, "pwritev"):
            for rows, parts in blocks:
                if all(p[3] < SMALL_RANGE for p in parts):
                    for batch in self._source_maps().block_views(rows, parts):
                        self._gather_views(batch)
                else:
                    self._copy_listed(block_ranges(rows, parts))
            return
        self._copy_listed(ranges)

    def _copy_listed(self, ranges: Iterable[FileRange]) -> None:
        run: list[FileRange] = []
        for r in ranges:
            if r.nbytes >= SMALL_RANGE or not hasattr(os, "pwritev"):
                self._gather(run)
                run = []
                self.copy(r)
            else:
                run.append(r)
                if len(run) == _IOV_MAX:
                    self._gather(run)
                    run = []
        self._gather(run)

    def _source_maps(self) -> SourceMaps:
        if self._maps is None:
            self._maps = SourceMaps()
        return self._maps

    def _gather(self, run: list[FileRange]) -> None:
        if run:
            self._gather_views(self._source_maps().views(run))

    def _gather_views(self, batch: list[memoryview]) -> None:
        """Append ``batch`` (views of the source maps) with positional gather writes."""
        first = 0
        while first < len(batch):
            n = os.pwritev(self.fd, batch[first:], self.position)
            if n == 0 and any(v.nbytes for v in batch[first:]):
                raise OSError(errno.EIO, f"{self.path}: the system wrote nothing")
            self.position += n
            while first < len(batch) and n >= batch[first].nbytes:  # skip what was written
                n -= batch[first].nbytes
                first += 1
            if n:
                batch[first] = batch[first][n:]
        for view in batch:
            view.release()
        self._write_back()

    def _write_back(self) -> None:
        # Start writing the bytes appended since the last call to disk once they are many:
        # the kernel otherwise lets a conversion's gigabytes pile up dirty until it throttles
        # the writer (measured on the 2B export to Megatron: copies slowed from about 3 GB/s
        # to 0.4 GB/s after the first gigabytes). The fsync at the end still makes it durable.
        if self.position - self._written_back >= WRITE_BACK_BYTES:
            start_writeback(self.fd, self._written_back, self.position - self._written_back)
            self._written_back = self.position

    def _copy_through_buffer(self, fd: int, path: Path, offset: int, left: int) -> None:
        buffer = memoryview(bytearray(min(left, _FALLBACK_CHUNK)))
        while left:
            n = os.preadv(fd, [buffer[: min(left, len(buffer))]], offset)
            if n == 0:
                raise truncated(path, offset + left)
            self.write(buffer[:n])
            offset, left = offset + n, left - n

    def close(self, sync: bool = True) -> None:
        """fsync once (the caller renames the output into place only after) and close. With
        ``sync`` false the disk write-back is only started: the caller fsyncs the file later
        (:func:`fsync_files`), so that the next file is written while this one goes to disk."""
        for fd in self._sources.values():
            os.close(fd)
        self._sources.clear()
        if self._maps is not None:
            self._maps.close()
        if self.fd >= 0:
            try:
                if sync:
                    os.fsync(self.fd)
                else:
                    start_writeback(self.fd)
            finally:
                os.close(self.fd)
                self.fd = -1

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:  # no fsync for a file that is thrown away
            for fd in self._sources.values():
                os.close(fd)
            self._sources.clear()
            if self._maps is not None:
                self._maps.close()
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


def start_writeback(fd: int, offset: int = 0, nbytes: int = 0) -> None:
    """Ask the kernel to start writing the file's dirty pages (``nbytes`` from ``offset``; 0:
    to the end) to disk now, without waiting (Linux's ``sync_file_range``, which Python's
    ``os`` does not offer; elsewhere the final fsync does it all). Advice only: the fsync that
    follows makes the file durable."""
    call = _sync_file_range()
    if call is not None:
        call(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # an error only loses the advice


_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start write-out of dirty pages, do not wait
_SYNC_CALL: list = []  # [the libc function or None], looked up once


def _sync_file_range():
    if not _SYNC_CALL:
        call = None
        if sys.platform.startswith("linux"):
            import ctypes
            import ctypes.util

            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
                call = libc.sync_file_range
                call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                call.restype = ctypes.c_int
            except (OSError, AttributeError):
                call = None
        _SYNC_CALL.append(call)
    return _SYNC_CALL[0]


def fsync_files(paths: list[Path]) -> None:
    """fsync each file (complete before the output directory is renamed into place)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
