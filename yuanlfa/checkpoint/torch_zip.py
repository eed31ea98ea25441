"""``torch.save``-format archives written at disk speed: our own writer of the zip container.

A ``torch.save`` file is an uncompressed zip: ``<name>/data.pkl`` (the pickle, naming each storage
by a key), ``<name>/data/<key>`` (each storage's raw bytes, 64-byte aligned so that
``torch.load(mmap=True)`` can map them) and a few small records. torch's own writer
(``PyTorchFileWriter``) takes every byte from memory and checksums it with miniz's byte-wise
CRC-32: measured on the 2B conversions it ran at about 1 GB/s, the larger part of their time.
:class:`ArchiveWriter` writes the same container from bytes, tensors or
:class:`~yuanlfa.checkpoint.file_copy.FileRange` lists (a record whose bytes already lie in a
source file is copied inside the kernel, never read into this process), with zlib's CRC-32
(several GB/s, computed on a worker thread from a read-only map of the source while the kernel
copies). Each entry is laid out as torch lays it out (a local header with the data descriptor
flag, an ``FB`` padding field up to the alignment, the data, the descriptor) and Zip64 records
are added where offsets or sizes pass 4 GiB (in the descriptors and the central directory; unlike
torch's, our local headers then carry no Zip64 field: readers that go by the central directory,
as torch (miniz), Python's ``zipfile`` and ``unzip`` do, read the result, CRCs checked; a
streaming reader of a record over 4 GiB might not).
"""

from __future__ import annotations

import os
import struct
import sys
import threading
import zlib
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from yuanlfa.checkpoint.file_copy import FileRange, OutputFile, SourceMaps
from yuanlfa.checkpoint.stored import nbytes_of

ALIGNMENT = 64  # torch's default (its .storage_alignment record)
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_DESCRIPTOR32 = struct.Struct("<IIII")
_DESCRIPTOR64 = struct.Struct("<IIQQ")
_EOCD = struct.Struct("<IHHHHIIH")
_EOCD64 = struct.Struct("<IQHHIIQQQQ")
_LOCATOR64 = struct.Struct("<IIQI")
_FLAGS = 0x0808  # bit 3: sizes and CRC in a descriptor after the data; bit 11: UTF-8 names
_VERSION_ZIP64 = 45
_MAX32 = 0xFFFFFFFF  # a 32-bit field's "see the Zip64 record" value
_ZIP64_FROM = _MAX32  # offsets and sizes from here on go to Zip64 records (tests lower it)
_PADDING_ID = 0x4246  # "FB": torch's alignment padding field
_CRC_CHUNK = 256 * 2**20  # the CRC of a long range in pieces, so that a map stays small


class _Entry:
    __slots__ = ("name", "offset", "size", "crc")

    def __init__(self, name: bytes, offset: int) -> None:
        self.name, self.offset, self.size, self.crc = name, offset, 0, 0


class ArchiveWriter:
    """One ``torch.save``-format file at ``path`` with records under ``<name>/`` (torch names
    them after the file's stem; DCP's streams use ``archive``). Records are appended with
    :meth:`write_bytes`, :meth:`write_tensor` and :meth:`copy_ranges`; :meth:`close` adds torch's
    closing records and the central directory and fsyncs (or only starts the write-back, for a
    caller that fsyncs later). ``file`` writes into an already open :class:`OutputFile` from its
    current position instead (an archive inside a larger file, as DCP stores each tensor); its
    offsets are then relative to where the archive starts, as in a standalone file."""

    def __init__(
        self,
        path: str | Path | None = None,
        name: str | None = None,
        *,
        file: OutputFile | None = None,
    ) -> None:
        if (path is None) == (file is None):
            raise ValueError("ArchiveWriter: give a path or an open file")
        self._own = file is None
        self.file = OutputFile(path) if file is None else file
        self.base = self.file.position
        stem = Path(path).stem if path is not None else "archive"
        self.prefix = f"{stem if name is None else name}/"
        self.entries: list[_Entry] = []
        self._pool: ThreadPoolExecutor | None = None
        self._maps: SourceMaps | None = None
        self._lock = threading.Lock()

    # -- records -----------------------------------------------------------------------------
    def _begin(self, name: str) -> _Entry:
        full = (self.prefix + name).encode()
        # Data start, in the file: the header and the padding field's own 4 bytes before it.
        header_end = self.file.position + _LOCAL.size + len(full) + 4
        pad = (self.base - header_end) % ALIGNMENT
        entry = _Entry(full, self.file.position - self.base)
        extra = struct.pack("<HH", _PADDING_ID, pad) + b"Z" * pad
        # Sizes and CRC follow the data (flag bit 3), as torch writes them.
        self.file.write(_LOCAL.pack(0x04034B50, 0, _FLAGS, 0, 0, 0, 0, 0, 0, len(full), len(extra)))
        self.file.write(full + extra)
        return entry

    def _end(self, entry: _Entry, size: int, crc: int) -> None:
        entry.size, entry.crc = size, crc
        if size >= _ZIP64_FROM:
            self.file.write(_DESCRIPTOR64.pack(0x08074B50, crc, size, size))
        else:
            self.file.write(_DESCRIPTOR32.pack(0x08074B50, crc, size, size))
        self.entries.append(entry)

    def write_bytes(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """A record from memory."""
        view = memoryview(data).cast("B")
        entry = self._begin(name)
        self.file.write(view)
        self._end(entry, view.nbytes, zlib.crc32(view))

    def write_tensor(self, name: str, tensor: torch.Tensor) -> int:
        """A record holding a contiguous CPU tensor's bytes (little-endian hosts: as stored).
        Returns its bytes."""
        tensor = tensor.detach().cpu().contiguous()
        if tensor.numel() == 0:
            self.write_bytes(name, b"")
            return 0
        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        entry = self._begin(name)
        crc = self._crc_async(lambda: zlib.crc32(view))
        self.file.write(view)
        self._end(entry, view.nbytes, crc.result())
        return view.nbytes

    def copy_ranges(self, name: str, ranges: Sequence[FileRange]) -> int:
        """A record whose bytes are the concatenation of ``ranges``, copied file to file.
        Returns its bytes."""
        entry = self._begin(name)
        if self._maps is None:
            self._maps = SourceMaps()
        maps = self._maps
        nbytes = nbytes_of(ranges)

        def crc_all() -> int:  # from maps of the sources (the page cache, no copy)
            crc = 0
            for batch in maps.batches(ranges):  # a bounded number of views at once
                for view in batch:
                    for start in range(0, view.nbytes, _CRC_CHUNK):
                        crc = zlib.crc32(view[start : start + _CRC_CHUNK], crc)
                    view.release()
            return crc

        crc = self._crc_async(crc_all)
        self.file.copy_all(ranges)
        self._end(entry, nbytes, crc.result())
        return nbytes

    def _crc_async(self, job) -> Future:
        # A worker thread: zlib and copy_file_range both let go of the GIL, so the checksum
        # runs beside the kernel's copy (or the write) on another core.
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="yuanlfa-crc")
        return self._pool.submit(job)

    # -- closing -----------------------------------------------------------------------------
    def finish(self, serialization_id: str = "") -> None:
        """torch's closing records and the central directory (the file stays open)."""
        self.write_bytes("version", b"3\n")
        if serialization_id:
            self.write_bytes(".data/serialization_id", serialization_id.encode())
        start = self.file.position - self.base
        central = bytearray()
        for e in self.entries:
            extra = b""
            big_size, big_offset = e.size >= _ZIP64_FROM, e.offset >= _ZIP64_FROM
            size32 = _MAX32 if big_size else e.size
            offset32 = _MAX32 if big_offset else e.offset
            # The Zip64 extra field holds, in this order, only the values whose field says so.
            fields = [e.size, e.size] * big_size + [e.offset] * big_offset
            if fields:
                extra = struct.pack(f"<HH{len(fields)}Q", 0x0001, 8 * len(fields), *fields)
            version = _VERSION_ZIP64 if fields else 0
            central += _CENTRAL.pack(
                0x02014B50, version, version, _FLAGS, 0, 0, 0, e.crc, size32, size32,
                len(e.name), len(extra), 0, 0, 0, 0, offset32,
            )  # fmt: skip
            central += e.name + extra
        self.file.write(central)
        end = self.file.position - self.base
        count, size = len(self.entries), len(central)
        if count >= 0xFFFF or max(start, size, end) >= _ZIP64_FROM:
            self.file.write(
                _EOCD64.pack(0x06064B50, _EOCD64.size - 12, _VERSION_ZIP64, _VERSION_ZIP64,
                             0, 0, count, count, size, start)
            )  # fmt: skip
            self.file.write(_LOCATOR64.pack(0x07064B50, 0, end, 1))
            self.file.write(_EOCD.pack(0x06054B50, 0, 0, 0xFFFF, 0xFFFF, _MAX32, _MAX32, 0))
        else:
            self.file.write(_EOCD.pack(0x06054B50, 0, 0, count, count, size, start, 0))
        self._release()

    def _release(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        if self._maps is not None:
            self._maps.close()
            self._maps = None

    def close(self, sync: bool = True) -> None:
        """Finish the archive and close its file (fsynced, or with ``sync`` false only its
        write-back started)."""
        self.finish(_serialization_id())
        if self._own:
            self.file.close(sync=sync)

    def abort(self) -> None:
        """Stop without finishing (the caller removes the file)."""
        self._release()
        if self._own:
            self.file.__exit__(RuntimeError, None, None)


def write_header_records(writer: ArchiveWriter, pickle_bytes: bytes) -> None:
    """``data.pkl`` and the records torch writes right after it, in its order."""
    writer.write_bytes("data.pkl", pickle_bytes)
    writer.write_bytes(".format_version", b"1")
    writer.write_bytes(".storage_alignment", str(ALIGNMENT).encode())
    writer.write_bytes("byteorder", sys.byteorder.encode())


def _serialization_id() -> str:
    # torch writes a random 40-digit id (used to tell saves apart); any such string does.
    return "".join(str(b % 10) for b in os.urandom(40))
