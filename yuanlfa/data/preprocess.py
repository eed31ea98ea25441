"""Tokenize text files and JSON-lines files into a Megatron ``.bin``/``.idx`` pair; files in
Yuan 2.0's one-sample-per-line format as Yuan's own preprocessing reads them."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from yuanlfa.data.indexed_dataset import DataError, IndexedDatasetBuilder, best_dtype
from yuanlfa.data.special_tokens import Tokenizer
from yuanlfa.data.tokenizer import build_tokenizer

# A JSON-lines task carries this many bytes of lines, so workers get batches big enough to
# amortize the pickling and small enough to keep memory flat.
_JSONL_TASK_BYTES = 1 << 20

# "auto": a .jsonl file gives one document per line, any other file is one document (its text as
# given). "yuan": every file is in Yuan 2.0's format, one sample per line (see yuan_sample).
INPUT_FORMATS = ("auto", "yuan")


@dataclass(frozen=True)
class _Settings:
    tokenizer: Tokenizer
    json_key: str
    append_eod: bool
    # The .bin's token type: documents are narrowed in the worker, so a worker sends back 2
    # bytes per token instead of 8 (the main process's unpickling limited the scaling).
    dtype: np.dtype = np.dtype(np.int64)


# Set by the pool initializer, in worker processes only.
_worker_settings: _Settings | None = None


# Magic numbers of the compressed formats corpora come in: read as text, they would be
# tokenized (or a tokenizer trained) on the compressed bytes.
_COMPRESSED = {
    b"\x1f\x8b": ("gzip", "gunzip -k"),
    b"BZh": ("bzip2", "bunzip2 -k"),
    b"\xfd7zXZ\x00": ("xz", "unxz -k"),
    b"\x28\xb5\x2f\xfd": ("zstd", "unzstd"),
    b"PK\x03\x04": ("zip", "unzip"),
}


def check_not_compressed(path: str) -> None:
    """Refuse a compressed input file, naming it and the command that unpacks it."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise DataError(f"input {path}: cannot read it ({exc.strerror})") from None
    for magic, (kind, command) in _COMPRESSED.items():
        if head.startswith(magic):
            raise DataError(
                f"input {path} is {kind}-compressed; decompress it first ({command} {path}) and "
                "give the uncompressed file"
            )


def _is_jsonl(path: str) -> bool:
    return path.lower().endswith(".jsonl")


def yuan_sample(line: str) -> str | None:
    """The text Yuan 2.0's preprocessing (its ``tools/preprocess_data_yuan.py``) tokenizes for
    one line of its format, or None for a line it skips: the line is stripped (after dropping a
    leading ``<n>``), ``<n>`` becomes a newline, ``▃`` is removed, ``[SEP]`` becomes
    ``<sep>``; a line that is empty or only newlines is skipped. Yuan then appends one ``<eod>``."""
    if line == "\n":
        return None
    data = line[3:] if line.startswith("<n>") else line
    data = data.strip().replace("\r", "").replace("\n", "")
    data = data.replace("<n>", "\n").replace("\u2583", "").replace("[SEP]", "<sep>")
    return data if data.strip("\n") else None


def _yuan_tasks(path: str) -> Iterator[tuple]:
    """Batches of a Yuan-format file's lines. Read as Yuan reads them: text mode (universal
    newlines, so a lone ``\r`` also ends a line), UTF-8, undecodable bytes dropped."""
    with open(path, encoding="utf-8", errors="ignore") as f:
        batch: list[str] = []
        size = 0
        for line in f:
            batch.append(line)
            size += len(line)
            if size >= _JSONL_TASK_BYTES:
                yield ("yuan", batch)
                batch, size = [], 0
        if batch:
            yield ("yuan", batch)


def _tasks(paths: Sequence[str], input_format: str = "auto") -> Iterator[tuple]:
    """Work items in output order: a whole text file, a batch of numbered JSON lines, or a batch
    of lines in Yuan 2.0's format."""
    for path in paths:
        if input_format == "yuan":
            yield from _yuan_tasks(path)
            continue
        if not _is_jsonl(path):
            yield ("text", path)
            continue
        with open(path, "rb") as f:
            batch: list[bytes] = []
            first, size = 1, 0
            for lineno, line in enumerate(f, start=1):
                if not batch:
                    first = lineno
                batch.append(line)
                size += len(line)
                if size >= _JSONL_TASK_BYTES:
                    yield ("jsonl", path, first, batch)
                    batch, size = [], 0
            if batch:
                yield ("jsonl", path, first, batch)


def _encode(text: str, tok: Tokenizer) -> np.ndarray:
    encode_np = getattr(tok, "encode_np", None)
    return encode_np(text) if encode_np is not None else np.asarray(tok.encode(text), np.int64)


def _add(text: str, settings: _Settings, docs: list[np.ndarray], keep_empty: bool = False) -> None:
    tokens = _encode(text, settings.tokenizer)
    # Empty documents would only add lone EOD tokens (kept where Yuan's preprocessing keeps them).
    if tokens.size == 0 and not (keep_empty and settings.append_eod):
        return
    out = np.empty(tokens.size + settings.append_eod, dtype=settings.dtype)
    out[: tokens.size] = tokens
    if settings.append_eod:
        out[-1] = settings.tokenizer.eod
    docs.append(out)


def _run_task(task: tuple, settings: _Settings) -> tuple[list[np.ndarray], int]:
    """Tokenize one work item; returns its documents and the input bytes it consumed."""
    docs: list[np.ndarray] = []
    if task[0] == "yuan":
        size = 0
        for line in task[1]:
            size += len(line.encode("utf-8"))
            text = yuan_sample(line)
            if text is not None:
                _add(text, settings, docs, keep_empty=True)
        return docs, size
    if task[0] == "text":
        raw = Path(task[1]).read_bytes()
        _add(raw.decode("utf-8", errors="replace"), settings, docs)
        return docs, len(raw)
    _, path, first, lines = task
    key = settings.json_key
    nbytes = 0
    for lineno, line in enumerate(lines, start=first):
        nbytes += len(line)
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line.decode("utf-8", errors="replace"))
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{where}: invalid JSON ({exc.msg}); each line must be one JSON object"
            ) from None
        if not isinstance(record, dict) or key not in record:
            raise DataError(
                f"{where}: no field {key!r} in this record; choose the text field with "
                "--json-key (json_key=...)"
            )
        text = record[key]
        if not isinstance(text, str):
            raise DataError(f"{where}: field {key!r} is {type(text).__name__}, expected a string")
        _add(text, settings, docs)
    return docs, nbytes


def _init_worker(settings: _Settings) -> None:
    global _worker_settings
    _worker_settings = settings


def _run_in_worker(task: tuple) -> tuple[np.ndarray, np.ndarray, int]:
    """One task's documents as one flat array and their lengths: cheaper to send than a list
    of many small arrays."""
    assert _worker_settings is not None
    docs, nbytes = _run_task(task, _worker_settings)
    flat = np.concatenate(docs) if docs else np.empty(0, dtype=_worker_settings.dtype)
    return flat, np.array([len(d) for d in docs], dtype=np.int64), nbytes


def _unpack(result: tuple[np.ndarray, np.ndarray, int]) -> tuple[list[np.ndarray], int]:
    flat, lengths, nbytes = result
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else [], nbytes


def _ordered_map(
    pool: Any, fn: Callable[[tuple], Any], tasks: Iterable[tuple], window: int
) -> Iterator[Any]:
    """Like ``pool.imap`` (results in input order) but with at most ``window`` tasks in flight.

    ``Pool.imap`` drains its input eagerly, which would read a large JSON-lines file into memory
    ahead of the workers.
    """
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.apply_async(fn, (task,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _progress_bar(enabled: bool, total: int) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing")


def preprocess_files(
    paths: Sequence[str | os.PathLike[str]],
    output_prefix: str | os.PathLike[str],
    tokenizer: Tokenizer | str,
    *,
    workers: int = 1,
    json_key: str | None = None,
    append_eod: bool = True,
    progress: bool = True,
    force: bool = False,
    input_format: str = "auto",
) -> dict[str, Any]:
    """Tokenize ``paths`` in order into ``output_prefix.bin``/``.idx``; returns statistics.

    ``input_format="auto"``: a ``.jsonl`` file gives one document per line (its ``json_key``
    field, default "text"); any other file is one document, its text as given.
    ``input_format="yuan"``: every file holds one sample per line in Yuan 2.0's format (newlines
    written ``<n>``), read as Yuan's preprocessing reads it (see ``yuan_sample``), so the output
    holds Yuan's documents and ids, in the order of the lines. The output is identical for every
    number of workers.
    """
    files = [str(p) for p in paths]
    if not files:
        raise DataError("no input files given; pass at least one file to tokenize")
    for path in files:
        if not os.path.isfile(path):
            raise DataError(f"input {path} is not a readable file")
        check_not_compressed(path)
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    if input_format not in INPUT_FORMATS:
        raise DataError(
            f"unknown input format {input_format!r}; use one of {', '.join(INPUT_FORMATS)}"
        )
    if isinstance(tokenizer, str):
        tokenizer = build_tokenizer(tokenizer)
    prefix = str(output_prefix)
    existing = [p for p in (prefix + ".bin", prefix + ".idx") if os.path.exists(p)]
    if existing and not force:
        raise DataError(
            f"{' and '.join(existing)} already exist; pass --force (force=True) to overwrite"
        )
    parent = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(parent, exist_ok=True)

    start = time.perf_counter()
    total_bytes = sum(os.path.getsize(p) for p in files)
    dtype = best_dtype(tokenizer.vocab_size)
    settings = _Settings(tokenizer, json_key or "text", append_eod, dtype)
    bar = _progress_bar(progress, total_bytes)
    documents = 0
    pool = None
    try:
        with IndexedDatasetBuilder(prefix, dtype) as builder:
            if workers == 1:
                results: Iterable[Any] = (
                    _run_task(t, settings) for t in _tasks(files, input_format)
                )
            else:
                pool = multiprocessing.Pool(workers, initializer=_init_worker, initargs=(settings,))
                results = map(
                    _unpack,
                    _ordered_map(
                        pool, _run_in_worker, _tasks(files, input_format), window=4 * workers
                    ),
                )
            for docs, nbytes in results:
                for doc in docs:
                    builder.add_document(doc)
                documents += len(docs)
                if bar is not None:
                    bar.update(nbytes)
            tokens = builder.num_tokens
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
    return {
        "files": len(files),
        "documents": documents,
        "tokens": tokens,
        "bytes": total_bytes,
        "seconds": time.perf_counter() - start,
    }
