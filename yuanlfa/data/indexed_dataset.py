"""Megatron-compatible memory-mapped token datasets: a ``.bin`` of raw tokens plus an ``.idx``.

Index layout (little endian): magic ``b"MMIDIDX\\x00\\x00"``, ``<Q`` version 1, ``<B`` dtype code,
``<Q`` number of sequences n, ``<Q`` number of doc_idx entries m, then int32 sizes[n] (tokens per
sequence), int64 pointers[n] (byte offset of each sequence in the .bin) and int64 doc_idx[m]
(sequence index where each document starts, from 0 up to and including n). Files written here load
in Megatron-LM and files written by Megatron-LM load here.
"""

from __future__ import annotations

import os
import secrets
import struct
from array import array
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF = {dtype: code for code, dtype in DTYPE_CODES.items()}


class DataError(ValueError):
    """A user-facing problem with data files or data settings; the message names the fix."""


def best_dtype(vocab_size: int) -> np.dtype:
    """The smallest token dtype Megatron uses for this vocabulary (its own threshold)."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def dtype_code(dtype: Any) -> int:
    dtype = np.dtype(dtype)
    if dtype not in _CODE_OF:
        supported = ", ".join(str(d) for d in DTYPE_CODES.values())
        raise DataError(
            f"dtype {dtype} cannot be stored in a Megatron index; use one of {supported}"
        )
    return _CODE_OF[dtype]


def _check_fits(tokens: np.ndarray, dtype: np.dtype) -> None:
    if tokens.size == 0 or dtype.kind == "f":
        return
    if tokens.dtype.kind not in "iub":
        raise DataError(f"tokens must be integers to store as {dtype}, got {tokens.dtype}")
    lo, hi = tokens.min(), tokens.max()
    if lo < 0:
        raise DataError(f"token {int(lo)} is negative; token ids must be >= 0 (dtype {dtype})")
    limit = np.iinfo(dtype).max
    if hi > limit:
        raise DataError(
            f"token {int(hi)} does not fit dtype {dtype} (max {limit}); use a wider dtype "
            "such as int32"
        )


def _create_temp(directory: str, prefix: str, suffix: str) -> tuple[int, str]:
    """A new file ``(fd, path)`` with the mode the umask gives: tempfile.mkstemp makes 0600,
    which the rename into place would keep, leaving the data unreadable to the group."""
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"{directory}: no free temporary name starting {prefix!r}")


class IndexedDatasetBuilder:
    """Streams sequences into ``prefix.bin``/``prefix.idx``, published atomically by finalize().

    Tokens go to a temporary .bin next to the target as they are added, so memory holds only the
    per-sequence sizes. Nothing appears under the final names until finalize(); as a context
    manager, an exception removes the temporary files and a clean exit finalizes.
    """

    def __init__(self, prefix: str | os.PathLike[str], dtype: Any = np.uint16) -> None:
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        directory = os.path.dirname(os.path.abspath(self.prefix))
        base = os.path.basename(self.prefix)
        fd, self._bin_tmp = _create_temp(directory, f".{base}.", ".bin.tmp")
        self._bin = os.fdopen(fd, "wb")
        self._idx_tmp: str | None = None
        self._sizes = array("q")
        self._doc_idx = array("q", [0])
        self._num_tokens = 0
        self._done = False

    @property
    def num_sequences(self) -> int:
        return len(self._sizes)

    @property
    def num_documents(self) -> int:
        return len(self._doc_idx) - 1

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def add_item(self, tokens: Iterable[int] | np.ndarray) -> None:
        """Append one sequence to the current document."""
        if self._done:
            raise DataError(f"builder for {self.prefix} is already finalized or aborted")
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise DataError(f"a sequence must be 1-D, got shape {arr.shape}")
        _check_fits(arr, self.dtype)
        data = np.ascontiguousarray(arr, dtype=self.dtype)
        if data.size > np.iinfo(np.int32).max:
            raise DataError(f"a sequence of {data.size} tokens exceeds the int32 size field")
        self._bin.write(data.tobytes())
        self._sizes.append(data.size)
        self._num_tokens += data.size

    def end_document(self) -> None:
        self._doc_idx.append(len(self._sizes))

    def add_document(self, tokens: Iterable[int] | np.ndarray) -> None:
        """Append a document made of one sequence."""
        self.add_item(tokens)
        self.end_document()

    def finalize(self) -> str:
        """Write the index and move both files to their final names; returns the prefix."""
        if self._done:
            raise DataError(f"builder for {self.prefix} is already finalized or aborted")
        try:
            if self._doc_idx[-1] != len(self._sizes):
                self.end_document()
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            self._write_index()
            # The .idx goes last: a reader that finds a fresh .idx also finds its .bin, and a
            # crash in between leaves a size mismatch that the reader reports.
            os.replace(self._bin_tmp, self.prefix + ".bin")
            os.replace(self._idx_tmp, self.prefix + ".idx")
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.prefix

    def _write_index(self) -> None:
        directory = os.path.dirname(self._bin_tmp)
        base = os.path.basename(self.prefix)
        fd, self._idx_tmp = _create_temp(directory, f".{base}.", ".idx.tmp")
        sizes = np.frombuffer(self._sizes, dtype=np.int64)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        np.cumsum(sizes[:-1] * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.frombuffer(self._doc_idx, dtype=np.int64)
        with os.fdopen(fd, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, self._code, len(sizes), len(doc_idx)))
            f.write(sizes.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(doc_idx.astype("<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())

    def abort(self) -> None:
        """Drop everything written so far; the final names are left untouched."""
        self._done = True
        if not self._bin.closed:
            self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            if path is not None and os.path.exists(path):
                os.unlink(path)

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finalize()


def _fail(path: str, problem: str) -> DataError:
    return DataError(
        f"{path}: {problem}; the file is damaged or not written by yuanlfa-preprocess or "
        "Megatron-LM: re-run yuanlfa-preprocess to rebuild it"
    )


class MMapIndexedDataset:
    """Read-only view of a ``.bin``/``.idx`` pair; sequences come back as numpy views of the map.

    Pickles by prefix (DataLoader workers reopen the files instead of copying the map).
    """

    def __init__(self, prefix: str | os.PathLike[str]) -> None:
        self.prefix = str(prefix)
        self._open()

    def _open(self) -> None:
        idx_path, bin_path = self.prefix + ".idx", self.prefix + ".bin"
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                hint = ""
                if self.prefix.endswith((".bin", ".idx")):
                    hint = " (give the prefix without the .bin/.idx extension)"
                raise DataError(
                    f"{path} not found{hint}; create the pair with yuanlfa-preprocess "
                    "--output-prefix PREFIX"
                )
        idx_bytes = os.path.getsize(idx_path)
        if idx_bytes < _HEADER.size:
            raise _fail(idx_path, f"index truncated ({idx_bytes} bytes, header is {_HEADER.size})")
        with open(idx_path, "rb") as f:
            magic, version, code, n, m = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            raise DataError(
                f"{idx_path}: not a Megatron mmap index (magic {magic!r}, expected {MAGIC!r}); "
                "re-run yuanlfa-preprocess to build the .bin/.idx pair"
            )
        if version != VERSION:
            raise DataError(
                f"{idx_path}: unsupported index version {version} (only {VERSION} is known); "
                "re-run yuanlfa-preprocess with this version of yuanlfa"
            )
        if code not in DTYPE_CODES:
            raise _fail(idx_path, f"unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
        self._dtype = DTYPE_CODES[code]
        need = _HEADER.size + 4 * n + 8 * n + 8 * m
        # Megatron's multimodal variant appends per-sequence modes; extra bytes are allowed.
        if idx_bytes < need:
            raise _fail(idx_path, f"index truncated ({idx_bytes} bytes, header promises {need})")
        if m < 1:
            raise _fail(idx_path, "empty document index (it must start with 0)")
        self._idx_map = np.memmap(idx_path, mode="r", dtype=np.uint8)
        buf = memoryview(self._idx_map)
        offset = _HEADER.size
        self._sizes = np.frombuffer(buf, dtype="<i4", count=n, offset=offset)
        offset += 4 * n
        self._pointers = np.frombuffer(buf, dtype="<i8", count=n, offset=offset)
        offset += 8 * n
        self._doc_idx = np.frombuffer(buf, dtype="<i8", count=m, offset=offset)
        if self._doc_idx[0] != 0 or self._doc_idx[-1] != n:
            raise _fail(
                idx_path,
                f"document index runs from {self._doc_idx[0]} to {self._doc_idx[-1]}, "
                f"expected 0 to {n}",
            )
        bin_bytes = os.path.getsize(bin_path)
        expected = 0
        if n:
            expected = int(self._pointers[-1]) + int(self._sizes[-1]) * self._dtype.itemsize
        if bin_bytes != expected:
            what = "truncated" if bin_bytes < expected else "longer than its index"
            raise DataError(
                f"{bin_path}: data file {what} ({bin_bytes} bytes, {idx_path} describes "
                f"{expected}); the pair does not belong together or a write was interrupted: "
                "re-run yuanlfa-preprocess to rebuild it"
            )
        self._bin_bytes = bin_bytes
        # mmap cannot map an empty file, and an empty dataset needs no map.
        self._bin_map = np.memmap(bin_path, mode="r", dtype=np.uint8) if bin_bytes else None
        self._bin_buf = memoryview(self._bin_map) if self._bin_map is not None else memoryview(b"")

    def __getstate__(self) -> dict[str, Any]:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.prefix = state["prefix"]
        self._open()

    def __len__(self) -> int:
        return len(self._sizes)

    def __getitem__(self, i: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(i, slice):
            return [self.get(j) for j in range(*i.indices(len(self)))]
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``i`` (a read-only view)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({n} sequences)")
        i = int(i) % n
        size = int(self._sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"tokens [{offset}, {offset + length}) out of range for sequence {i} of "
                f"{self.prefix} ({size} tokens)"
            )
        start = int(self._pointers[i]) + offset * self._dtype.itemsize
        return np.frombuffer(self._bin_buf, dtype=self._dtype, count=length, offset=start)

    @property
    def sizes(self) -> np.ndarray:
        return self._sizes

    @property
    def pointers(self) -> np.ndarray:
        return self._pointers

    @property
    def doc_idx(self) -> np.ndarray:
        return self._doc_idx

    @property
    def num_documents(self) -> int:
        return len(self._doc_idx) - 1

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def num_tokens(self) -> int:
        return self._bin_bytes // self._dtype.itemsize

    def check_tokens(self, vocab_size: int, chunk_tokens: int = 1 << 24) -> int:
        """Raise DataError if a token is outside ``[0, vocab_size)``; returns the largest token.

        Scans the .bin in chunks so memory stays bounded whatever the dataset size.
        """
        tokens = np.frombuffer(self._bin_buf, dtype=self._dtype, count=self.num_tokens)
        largest = -1
        for start in range(0, tokens.size, chunk_tokens):
            chunk = tokens[start : start + chunk_tokens]
            hi, lo = chunk.max(), chunk.min()
            largest = max(largest, int(hi))
            if hi >= vocab_size or lo < 0:
                bad = int(np.flatnonzero((chunk >= vocab_size) | (chunk < 0))[0]) + start
                seq = int(np.searchsorted(self._pointers, bad * self._dtype.itemsize, "right")) - 1
                if hi >= vocab_size:
                    problem = f"max token {int(tokens[start:].max())} >= vocab size {vocab_size}"
                else:
                    problem = f"negative token {int(lo)}"
                raise DataError(
                    f"{self.prefix}.bin: {problem} (first bad token in sequence {seq}); "
                    "tokenize the data with the model's tokenizer or raise model.vocab_size"
                )
        return largest
