"""Checkpoints: the layout-free format (torch.distributed.checkpoint, global names and shapes),
written atomically, loadable into any tp / pp / dp layout; its manifest (``meta.json``) and key
scheme; conversions to and from the Megatron / Yuan 2.0 and Hugging Face formats in ``convert/``.
"""

from yuanlfa.checkpoint.async_save import AsyncSaver, SaveDone, SaveStarted, use_async
from yuanlfa.checkpoint.errors import CheckpointError
from yuanlfa.checkpoint.files import (
    LATEST,
    holds_checkpoints,
    latest_checkpoint,
    resolve_checkpoint,
)
from yuanlfa.checkpoint.layout_free import load_checkpoint, save_checkpoint
from yuanlfa.checkpoint.manifest import FORMAT, TrainingState, is_complete, read_meta
from yuanlfa.checkpoint.storage import read_tensor, stored_tensors

__all__ = [
    "AsyncSaver",
    "FORMAT",
    "LATEST",
    "CheckpointError",
    "TrainingState",
    "holds_checkpoints",
    "is_complete",
    "latest_checkpoint",
    "load_checkpoint",
    "read_meta",
    "read_tensor",
    "SaveDone",
    "SaveStarted",
    "resolve_checkpoint",
    "save_checkpoint",
    "stored_tensors",
    "use_async",
]
