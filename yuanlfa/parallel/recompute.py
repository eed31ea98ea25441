"""Activation recompute, applied to a built model from outside (the model code stays plain).

selective: only the core attention's activations are dropped and recomputed (the cheapest to
recompute per byte saved, as in Korthikanti et al., 2022); full: decoder layers keep only their
input and recompute the rest in backward, which layers as Megatron's --recompute-method says:
``uniform`` every layer (each its own checkpoint, --recompute-num-layers 1), ``block`` the first
``num_layers`` layers of each pipeline stage only (the rest keep everything: a stage that holds
fewer microbatches in flight can afford it, and recomputes less).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from torch import nn
from torch.utils.checkpoint import checkpoint

from yuanlfa.model.transformer import YuanModel


def _wrap(module: nn.Module, method: str) -> None:
    # An instance attribute shadows the class method, so parameter names do not change (a
    # wrapper module would rename every parameter under it).
    original = getattr(module, method)
    setattr(module, method, functools.partial(checkpoint, original, use_reentrant=False))


def recomputed_layers(
    layer_ids: Sequence[int], method: str, num_layers: int, stages: Sequence[Sequence[int]]
) -> list[int]:
    """The layers full recompute checkpoints: all of ``layer_ids`` (uniform), or the first
    ``num_layers`` of each stage in ``stages`` (block; each a list of global layer ids)."""
    if method == "uniform":
        return list(layer_ids)
    if method == "block":
        return [i for stage in stages for i in list(stage)[:num_layers]]
    raise ValueError(f"recompute method {method!r} is not one of uniform, block")


def apply_recompute(
    model: YuanModel,
    mode: str,
    method: str = "uniform",
    num_layers: int = 1,
    stages: Sequence[Sequence[int]] | None = None,
) -> YuanModel:
    """``stages``: the global layer ids of each pipeline stage this model holds, in order
    (default: all its layers as one stage)."""
    if mode not in ("none", "selective", "full"):
        raise ValueError(f"recompute mode {mode!r} is not one of none, selective, full")
    ids = [int(k) for k in model.layers]
    if mode == "full":
        for i in recomputed_layers(ids, method, num_layers, stages or [ids]):
            _wrap(model.layers[str(i)], "forward")
    elif mode == "selective":
        for layer in model.layers.values():
            _wrap(layer.attn, "core_attention")
    return model
