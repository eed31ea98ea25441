"""yuanlfa: train Yuan 2.0-style LLMs with Localized Filtering-based Attention.

The research API is importable from here (loaded on first use, so ``import yuanlfa`` stays
light): ``LocalizedFiltering`` and ``localized_filtering`` (the LFA filter as a module and as a
function), ``register_filter`` / ``register_attention`` (plug-ins selected by
``model.filter`` / ``model.attention``), ``registered_filters`` / ``registered_attentions``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "LocalizedFiltering": "yuanlfa.model.lfa",
    "localized_filtering": "yuanlfa.ops.lfa",
    "causal_conv": "yuanlfa.ops.causal_conv",
    "register_filter": "yuanlfa.model.registry",
    "register_attention": "yuanlfa.model.registry",
    "registered_filters": "yuanlfa.model",
    "registered_attentions": "yuanlfa.model",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'yuanlfa' has no attribute {name!r}")
