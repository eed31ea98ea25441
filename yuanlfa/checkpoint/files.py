"""The checkpoint directory: step directories, the ``latest`` pointer, atomic replacement.

Layout of ``checkpoint.dir``::

    step_0000100/  meta.json (written last)  ...the format's files
    latest         (text: the name of the newest complete checkpoint)

A checkpoint is written into a hidden temporary directory and renamed into place only when every
file is on disk; ``latest`` is then replaced atomically. A crash at any point leaves the previous
checkpoint and pointer intact.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from yuanlfa.checkpoint.errors import CheckpointError
from yuanlfa.checkpoint.manifest import is_complete

LATEST = "latest"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_temp(directory: Path, prefix: str) -> tuple[int, str]:
    """A new file for writing, ``(fd, path)``, with the mode the umask gives (as every other
    tool's output on a shared cluster). tempfile.mkstemp would make it 0600, unreadable to the
    group, and the rename keeps that mode."""
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{secrets.token_hex(6)}")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"{directory}: no free temporary name starting {prefix!r}")


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = create_temp(path.parent, f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def step_dirs(root: Path) -> list[Path]:
    """Complete checkpoints (meta.json is written last) in step order."""
    found = [p for p in root.glob("step_*") if is_complete(p)]
    return sorted(found, key=step_of)


def holds_checkpoints(directory: str | Path) -> bool:
    root = Path(directory)
    return (root / LATEST).exists() or bool(step_dirs(root))


def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def retained(steps: list[int], keep_last: int, keep_every: int | None) -> set[int]:
    """Steps a retention policy keeps: the newest ``keep_last`` plus every multiple of
    ``keep_every`` (kept for later evaluation; None keeps none of those)."""
    kept = set(sorted(steps)[-keep_last:]) if keep_last > 0 else set()
    if keep_every is not None:
        kept |= {s for s in steps if s % keep_every == 0}
    return kept


def prune(root: Path, keep_last: int, keep: str, keep_every: int | None = None) -> None:
    """Remove complete checkpoints the policy no longer keeps. Called only after ``keep`` (the
    newest) is published, so a failed save never costs an older checkpoint."""
    steps = step_dirs(root)
    kept = retained([step_of(p) for p in steps], keep_last, keep_every)
    for old in steps:
        if old.name != keep and step_of(old) not in kept:
            shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory itself, or the checkpoint a checkpoint.dir's ``latest`` names."""
    path = Path(path)
    if is_complete(path):
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise CheckpointError(
            f"{path} holds no checkpoint (no meta.json, no latest); give a step directory or a "
            "checkpoint.dir"
        )
    return found


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint ``latest`` points to, or None when the directory holds none."""
    root = Path(directory)
    pointer = root / LATEST
    if not pointer.is_file():
        # A crash between the checkpoint's rename and the pointer's: the newest complete one.
        steps = step_dirs(root)
        return steps[-1] if steps else None
    name = pointer.read_text().strip()
    path = root / name
    if not is_complete(path):
        raise CheckpointError(
            f"{pointer} names {name!r}, which is missing or incomplete; point it at an existing "
            "step_* directory or remove it to start fresh"
        )
    return path
