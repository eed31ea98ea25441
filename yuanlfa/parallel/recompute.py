"""Activation recompute, applied to a built model from outside (the model code stays plain).

selective: only the core attention's activations are dropped and recomputed (the cheapest to
recompute per byte saved, as in Korthikanti et al., 2022); full: every decoder layer keeps only
its input and recomputes the rest in backward.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from yuanlfa.model.transformer import YuanModel


def _wrap(module: nn.Module, method: str) -> None:
    # An instance attribute shadows the class method, so parameter names do not change (a
    # wrapper module would rename every parameter under it).
    original = getattr(module, method)
    setattr(module, method, functools.partial(checkpoint, original, use_reentrant=False))


def apply_recompute(model: YuanModel, mode: str) -> YuanModel:
    if mode not in ("none", "selective", "full"):
        raise ValueError(f"recompute mode {mode!r} is not one of none, selective, full")
    for layer in model.layers.values():
        if mode == "full":
            _wrap(layer, "forward")
        elif mode == "selective":
            _wrap(layer.attn, "core_attention")
    return model
