"""Single-process checkpoints, written atomically.

Layout of ``checkpoint.dir``::

    step_0000100/  model.pt  optim.pt  rng.pt  meta.json
    latest         (text: the name of the newest complete checkpoint)

A checkpoint is written into a hidden temporary directory and renamed into place only when every
file is on disk; ``latest`` is then replaced atomically. A crash at any point leaves the previous
checkpoint and pointer intact. Files load with ``weights_only=True`` (no arbitrary unpickling).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT = "yuanlfa-simple-v1"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says what is wrong and what to do."""


@dataclass
class TrainingState:
    step: int
    consumed_samples: int
    model_config: dict[str, Any]
    extra: dict[str, Any]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainingState,
    keep_last: int = 2,
) -> Path:
    """Write ``state.step`` atomically, point ``latest`` at it, keep the newest ``keep_last``."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{state.step:07d}"
    final = root / name
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.tmp-"))
    try:
        torch.save(model.state_dict(), tmp / "model.pt")
        torch.save(optimizer.state_dict(), tmp / "optim.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        meta = {
            "format": FORMAT,
            "step": state.step,
            "consumed_samples": state.consumed_samples,
            "model_config": state.model_config,
            **state.extra,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            # Re-saving the same step (e.g. after a resume): move the old one aside first so
            # that a crash between the two renames still leaves a complete copy on disk.
            backup = root / f".{name}.old"
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(final, backup)
            os.replace(tmp, final)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_text_atomic(root / LATEST, name + "\n")
    _prune(root, keep_last, keep=name)
    return final


def _step_dirs(root: Path) -> list[Path]:
    """Complete checkpoints (meta.json is written last) in step order."""
    found = [p for p in root.glob("step_*") if (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


def holds_checkpoints(directory: str | Path) -> bool:
    root = Path(directory)
    return (root / LATEST).exists() or bool(_step_dirs(root))


def _prune(root: Path, keep_last: int, keep: str) -> None:
    steps = _step_dirs(root)
    for old in steps[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint ``latest`` points to, or None when the directory holds none."""
    root = Path(directory)
    pointer = root / LATEST
    if not pointer.is_file():
        # A crash between the checkpoint's rename and the pointer's: the newest complete one.
        steps = _step_dirs(root)
        return steps[-1] if steps else None
    name = pointer.read_text().strip()
    path = root / name
    if not (path / "meta.json").is_file():
        raise CheckpointError(
            f"{pointer} names {name!r}, which is missing or incomplete; point it at an existing "
            "step_* directory or remove it to start fresh"
        )
    return path


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    model_config: dict[str, Any],
) -> TrainingState:
    """Restore model, optimizer and RNG from ``path``; refuse a checkpoint of another model."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: no meta.json; not a yuanlfa checkpoint directory")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}; convert it with the "
            "checkpoint tools"
        )
    saved = meta.get("model_config", {})
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs config {model_config.get(k)!r}"
        for k in sorted(set(saved) | set(model_config))
        if saved.get(k) != model_config.get(k) and k not in ("lfa_impl", "attention_backend")
    ]
    if diffs:
        raise CheckpointError(
            f"{path} was saved for another model ({'; '.join(diffs[:3])}); use a matching "
            "config or another checkpoint.dir"
        )
    weights = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: parameters do not match the model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]})"
        )
    if optimizer is not None:
        optimizer.load_state_dict(
            torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
        )
    rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    extra = {
        k: v
        for k, v in meta.items()
        if k not in ("format", "step", "consumed_samples", "model_config")
    }
    return TrainingState(meta["step"], meta["consumed_samples"], saved, extra)
