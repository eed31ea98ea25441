"""Checkpoints. For now a single-process format with atomic saves; the layout-free format comes
with multi-process training."""

from yuanlfa.checkpoint.simple import (
    CheckpointError,
    TrainingState,
    holds_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

__all__ = [
    "CheckpointError",
    "TrainingState",
    "holds_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]
