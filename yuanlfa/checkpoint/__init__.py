"""Checkpoints: the layout-free format (torch.distributed.checkpoint, global names and shapes),
written atomically, loadable into any tp / pp / dp layout."""

from yuanlfa.checkpoint.files import (
    CheckpointError,
    TrainingState,
    holds_checkpoints,
    latest_checkpoint,
    resolve_checkpoint,
)
from yuanlfa.checkpoint.layout_free import load_checkpoint, read_meta, save_checkpoint

__all__ = [
    "CheckpointError",
    "TrainingState",
    "holds_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "read_meta",
    "resolve_checkpoint",
    "save_checkpoint",
]
