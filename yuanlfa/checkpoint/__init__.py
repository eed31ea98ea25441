"""Checkpoints. For now a single-process format with atomic saves; the layout-free format comes
with multi-process training."""

from yuanlfa.checkpoint.simple import (
    CheckpointError,
    TrainingState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

__all__ = [
    "CheckpointError",
    "TrainingState",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]
