"""Checkpoints: the layout-free format (torch.distributed.checkpoint, global names and shapes),
written atomically, loadable into any tp / pp / dp layout; its manifest (``meta.json``) and key
scheme; conversions to and from the Megatron / Yuan 2.0 and Hugging Face formats in ``convert/``.
"""

from __future__ import annotations

import importlib
from typing import Any

# Each name from the module that defines it, imported on first use: the conversion tools read
# and write files without torch.distributed.checkpoint, whose import (0.7 s: DTensor, sympy)
# the training format's modules would otherwise cost every process that touches a submodule.
_WHERE = {
    "AsyncSaver": "async_save",
    "SaveDone": "async_save",
    "SaveStarted": "async_save",
    "use_async": "async_save",
    "CheckpointError": "errors",
    "LATEST": "files",
    "holds_checkpoints": "files",
    "latest_checkpoint": "files",
    "resolve_checkpoint": "files",
    "load_checkpoint": "layout_free",
    "save_checkpoint": "layout_free",
    "FORMAT": "manifest",
    "TrainingState": "manifest",
    "is_complete": "manifest",
    "read_meta": "manifest",
    "read_tensor": "storage",
    "stored_tensors": "dcp_records",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = sorted(_WHERE)
