"""Layout-independent construction: build on the meta device, then give every parameter a value
that depends only on (seed, global parameter name).

Any tensor/pipeline layout therefore builds exactly the same model, and any checkpoint loads into
any layout. Values are drawn on the CPU so they do not depend on the device either.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from yuanlfa.config import ModelConfig
from yuanlfa.model.registry import component_of, init_parameter
from yuanlfa.model.seeds import name_seed
from yuanlfa.model.transformer import YuanModel


def init_value(name: str, shape: tuple[int, ...], cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The initial fp32 value of the full (unsharded) parameter ``name``."""
    if component_of(name, cfg) is not None:
        # The filter's or core attention's own rule (LFA: torch.nn.Conv2d's default, which the
        # released model was trained from; a plug-in: its constructor's values, seeded by name).
        return init_parameter(name, shape, cfg, seed)
    gen = torch.Generator().manual_seed(name_seed(seed, name))
    out = torch.empty(shape, dtype=torch.float32)
    if name.endswith("norm.weight"):
        return out.fill_(1.0)
    if name.endswith(("attn.o_proj.weight", "mlp.fc2.weight")):
        # Megatron's scaled init for projections that feed the residual stream.
        std = cfg.init_std / math.sqrt(2.0 * cfg.num_layers)
        return out.normal_(0.0, std, generator=gen)
    if name.endswith("weight"):
        return out.normal_(0.0, cfg.init_std, generator=gen)
    raise ValueError(f"no initialization rule for parameter {name!r}")


def build_model(
    cfg: ModelConfig,
    layer_ids: Iterable[int] | None = None,
    has_embedding: bool = True,
    has_head: bool = True,
    device: str | torch.device = "meta",
) -> YuanModel:
    """Construct without allocating (device="meta"); call :func:`materialize` to fill values."""
    with torch.device(device):
        return YuanModel(cfg, layer_ids, has_embedding, has_head)


@torch.no_grad()
def materialize(
    model: nn.Module,
    cfg: ModelConfig,
    seed: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    shard: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> nn.Module:
    """Allocate the parameters on ``device`` and fill each from (seed, its global name).

    ``shard(name, full_value)`` cuts this rank's piece out of a parameter's full value, for models
    whose modules a parallel plan has already replaced by shards: every layout then starts from
    exactly the single-device values.
    """
    full_shapes = None
    if shard is not None:
        full_shapes = {n: tuple(p.shape) for n, p in build_model(cfg).named_parameters()}
    # to_empty creates new Parameter objects; keep the attributes plans put on them.
    attrs = {name: dict(param.__dict__) for name, param in model.named_parameters()}
    model.to_empty(device=device)
    for name, param in model.named_parameters():
        param.__dict__.update(attrs[name])
        shape = full_shapes[name] if full_shapes is not None else tuple(param.shape)
        value = init_value(name, shape, cfg, seed)
        if shard is not None:
            value = shard(name, value)
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{name}: initial value {tuple(value.shape)} vs {tuple(param.shape)}")
        # A fresh contiguous tensor: a shard cut from the full value is a view whose storage
        # would otherwise keep the whole tensor alive (and column shards are strided).
        param.data = torch.empty(value.shape, device=device, dtype=dtype).copy_(value)
    return model


def create_model(
    cfg: ModelConfig,
    seed: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    layer_ids: Iterable[int] | None = None,
    has_embedding: bool = True,
    has_head: bool = True,
) -> YuanModel:
    """Build on meta and materialize: the model (or stage) ready to train."""
    model = build_model(cfg, layer_ids, has_embedding, has_head)
    materialize(model, cfg, seed, device, dtype)
    return model
