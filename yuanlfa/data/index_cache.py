"""The packed dataset's index arrays kept on disk, so later runs memory-map them.

Building the document order, sample index and shuffle index of a large corpus takes seconds to
minutes and memory on every rank; like Megatron, the arrays are written once as ``.npy`` files
named by a hash of everything that determines them, and read back memory-mapped. The data files
enter the hash by path, size and modification time, so a rewritten ``.bin``/``.idx`` pair never
meets a stale index. Every file is written to a temporary name and renamed, the description last:
a crash or a concurrent writer never leaves a half-written index that a reader would accept.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

PARTS = ("doc_order", "sample_index", "shuffle_index")


def _data_identity(prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {"prefix": os.path.realpath(prefix)}
    for suffix in (".bin", ".idx"):
        st = os.stat(prefix + suffix)
        out[suffix] = [st.st_size, st.st_mtime_ns]
    return out


class IndexCache:
    """The cached arrays of one dataset split under ``cache_dir``."""

    def __init__(
        self, cache_dir: str | os.PathLike[str], prefix: str, key: dict[str, Any], name: str
    ) -> None:
        self.description = {"data": _data_identity(prefix), "name": name, **key}
        text = json.dumps(self.description, sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()[:32]
        self.dir = Path(cache_dir)
        self.stem = f"{digest}-{name}"

    def path(self, part: str) -> Path:
        return self.dir / f"{self.stem}-{part}.npy"

    @property
    def description_path(self) -> Path:
        return self.dir / f"{self.stem}-description.json"

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The three arrays, memory-mapped, or None when absent or not matching (then rebuilt)."""
        try:
            if json.loads(self.description_path.read_text()) != self.description:
                return None
            arrays = tuple(np.load(self.path(p), mmap_mode="r") for p in PARTS)
        except (OSError, ValueError):
            return None
        doc_order, sample_index, shuffle_index = arrays
        # The indices cover every sample of the epochs used, at least the num_samples asked for.
        n = self.description["num_samples"]
        total = sample_index.shape[0] - 1 if sample_index.ndim == 2 else -1
        if (
            sample_index.ndim != 2
            or sample_index.shape[1] != 2
            or total < n
            or shuffle_index.shape != (total,)
            or doc_order.ndim != 1
        ):
            return None
        return doc_order, sample_index, shuffle_index

    def save(self, arrays: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        """Write the arrays atomically; a cache that cannot be written only costs a rebuild."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            for part, array in zip(PARTS, arrays, strict=True):
                _write_atomic(self.path(part), lambda f, a=array: np.save(f, a))
            text = json.dumps(self.description, sort_keys=True, indent=1).encode()
            _write_atomic(self.description_path, lambda f: f.write(text))
        except OSError as exc:
            warnings.warn(
                f"could not cache the dataset index in {self.dir} ({exc}); it is rebuilt on "
                "every run. Set data.cache_dir to a writable directory or data.cache_index=false",
                stacklevel=2,
            )


def _write_atomic(path: Path, write) -> None:
    # A name per process: concurrent ranks building the same index each rename a whole file.
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
