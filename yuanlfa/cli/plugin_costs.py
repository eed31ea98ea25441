"""Hand the planner the costs of the plug-ins a config names (yuanlfa-info, yuanlfa-plan).

The planner is torch-free and knows the library's own filters and attention; a plug-in is a
torch module in a user's file, so reading its declaration means importing that file (and
torch). A plug-in registered with ``cost=`` (yuanlfa.model.registry) gives all its costs; one
without is counted from its module built on the meta device (parameters, and which of them its
tp_plan shards), the rest reported as unknown, never costed as LFA.
"""

from __future__ import annotations

import functools
import sys

from yuanlfa.config import ConfigError, ModelConfig
from yuanlfa.planner.components import (
    ComponentCost,
    declare_cost,
    is_builtin,
    unknown_costs,
)


def load_plugin_costs(model: ModelConfig) -> list[str]:
    """Declare the costs of ``model``'s plug-in filter and core attention to the planner and
    print one warning line (stderr) per component whose costs are partly unknown; returns
    those lines."""
    chosen = [("filter", model.filter_name), ("attention", model.attention)]
    plugins = [(kind, name) for kind, name in chosen if not is_builtin(kind, name)]
    for kind, name in plugins:
        try:
            from yuanlfa.model.registry import get_entry, load_plugins
        except ImportError as exc:
            raise ConfigError(
                f"model.{kind}: {name!r} is a plug-in; costing it imports its file "
                f"(model.plugins), which needs torch: {exc}. Install torch, or plan a built-in "
                "filter and attention"
            ) from None
        load_plugins(model.plugins)
        entry = get_entry(kind, name)
        declare_cost(kind, name, entry.cost or functools.partial(_counted, kind, name))
    lines = unknown_costs(model)
    for line in lines:
        print(f"warning: {line}", file=sys.stderr)
    return lines


@functools.lru_cache(maxsize=8)
def _counted(kind: str, name: str, cfg: ModelConfig) -> ComponentCost:
    """An undeclared plug-in's costs: its parameters from the module built on the meta device
    (split per its tp_plan), no tp communication when its plan shards nothing, the rest unknown."""
    import torch

    from yuanlfa.model.registry import get_entry, param_style

    entry = get_entry(kind, name)
    with torch.device("meta"):
        module = entry.build(cfg)
    plan = entry.tp_plan
    params = sharded = 0
    for path, param in module.named_parameters():
        params += param.numel()
        if param_style(plan, path) is not None:
            sharded += param.numel()
    layers = any(style in ("column", "row") for style in plan.values())
    return ComponentCost(
        params=params,
        sharded_params=sharded,
        forward_flops=None,
        saved_bytes=None,
        halo_tokens=module.receptive_field if kind == "filter" else 0,
        column_inputs=None if layers else 0.0,
        row_outputs=None if layers else 0.0,
    )
