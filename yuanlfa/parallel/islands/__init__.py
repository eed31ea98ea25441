"""Islands: full tp x pp x dp replicas joined over a slow link (``parallel.islands``,
``outer:``; docs/islands.md). :mod:`outer` is the DiLoCo / Streaming DiLoCo outer step on this
rank's piece, :mod:`link` counts the bytes crossing between islands."""

from __future__ import annotations

from typing import Any

from torch import nn

from yuanlfa.config import Config
from yuanlfa.parallel.islands.link import joined_step_bytes, warm_start_step_bytes
from yuanlfa.parallel.islands.outer import Exchange, GroupExchange, OuterSync
from yuanlfa.parallel.mesh import Mesh


class IslandsLog:
    """The record fields of a joined (``outer.algorithm: none``) multi-island run."""

    def __init__(self, model: nn.Module, mesh: Mesh) -> None:
        self.bytes = joined_step_bytes(model, mesh)
        self.islands = mesh.islands

    def after_step(self, step: int) -> dict[str, Any]:
        return {"outer_sync": False, "link_bytes": self.bytes, "islands_alive": self.islands}


def build_outer(
    model: nn.Module,
    optimizer: Any,
    mesh: Mesh,
    cfg: Config,
    exchange: Exchange | None = None,
) -> OuterSync | IslandsLog | None:
    """This rank's outer loop, or None for a run without islands or an outer algorithm.
    ``exchange``: the cross-island all-reduce (default: the mesh's island group)."""
    if cfg.outer.algorithm == "none":
        return IslandsLog(model, mesh) if cfg.parallel.islands > 1 else None
    return OuterSync(
        model,
        mesh,
        cfg.outer,
        cfg.model.num_layers,
        exchange if exchange is not None else GroupExchange(mesh.island_group),
        getattr(optimizer, "reload_masters", None),
        warm_start_step_bytes(model, optimizer, mesh) if cfg.outer.warm_start_steps else 0,
        optimizer,
    )


__all__ = ["GroupExchange", "IslandsLog", "OuterSync", "build_outer"]
