"""The fit check at launch: the planner's predicted peak per pipeline rank against the device's
memory (train.device_memory_gb, else what the GPU reports), before anything is allocated."""

from __future__ import annotations

import torch

from yuanlfa.config import Config
from yuanlfa.planner.fit import GIB, FitReport, require_fit


def check_memory_fit(cfg: Config, device: torch.device) -> FitReport | None:
    """Raise ConfigError naming the overflow and the settings that fit (resolved ``cfg``); no
    check on CPU unless train.device_memory_gb is set."""
    gib = cfg.train.device_memory_gb
    if gib is None and device.type == "cuda":
        gib = torch.cuda.get_device_properties(device).total_memory / GIB
    return require_fit(cfg, gib)
