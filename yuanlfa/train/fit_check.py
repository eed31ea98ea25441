"""The fit check at launch: the planner's predicted peak per pipeline rank against the device's
memory (train.device_memory_gb, else what the GPU reports), before anything is allocated."""

from __future__ import annotations

import importlib.util
import warnings

import torch

from yuanlfa.config import Config
from yuanlfa.planner.components import is_builtin
from yuanlfa.planner.fit import GIB, FitReport, require_fit


def check_memory_fit(cfg: Config, device: torch.device) -> FitReport | None:
    """Raise ConfigError naming the overflow and the settings that fit (resolved ``cfg``); no
    check on CPU unless train.device_memory_gb is set."""
    m, t = cfg.model, cfg.train
    if not (is_builtin("filter", m.filter_name) and is_builtin("attention", m.attention)):
        # A plug-in's costs come from importing and building it (yuanlfa-info does); not here.
        return None
    if cfg.cluster.groups:
        return None  # the cluster plan checked every rank against its own device
    if (
        m.attention_dropout > 0
        and device.type == "cuda"
        and not importlib.util.find_spec("flash_attn")
    ):
        # fp32 scores, the bool mask and the probabilities per head and sample, per layer.
        per_layer = t.micro_batch_size * m.num_heads // cfg.parallel.tp * t.seq_length**2 * 7
        warnings.warn(
            f"model.attention_dropout without flash-attn: each layer that keeps its activations "
            f"keeps about {per_layer / GIB:.2f} GiB per microbatch of attention probabilities, "
            "which the fit check does not count; install flash-attn (its fused dropout keeps "
            "none)",
            stacklevel=2,
        )
    gib = t.device_memory_gb
    if gib is None and device.type == "cuda":
        gib = torch.cuda.get_device_properties(device).total_memory / GIB
    return require_fit(cfg, gib)
