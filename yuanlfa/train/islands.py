"""The islands' share of a checkpoint, next to the layout-free one.

The layout-free checkpoint (``checkpoint.dir/step_<N>``) holds the model and inner optimizer of
the first island. Every rank of a run with an outer algorithm also writes
``checkpoint.dir/islands/step_<N>/rank<R>.pt``: the outer state (the anchor, i.e. the last
synchronized parameters, and the outer momentum, plus any exchange still in flight) and, when
islands train apart (not ``outer.algorithm: none``), its own parameters and inner optimizer
state, which differ between islands between two synchronizations. A resume with the same
layout then continues exactly where the run stopped.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from yuanlfa.checkpoint import CheckpointError
from yuanlfa.checkpoint.files import step_dirs, step_name, step_of
from yuanlfa.parallel import Mesh

ISLANDS_DIR = "islands"


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "inner", optimizer)


def _file(root: str | Path, step: int, mesh: Mesh) -> Path:
    return Path(root) / ISLANDS_DIR / step_name(step) / f"rank{mesh.rank}.pt"


def save_island_state(
    root: str | Path, step: int, mesh: Mesh, model: nn.Module, optimizer: Any, outer: Any
) -> None:
    """Write this rank's file (atomically: a temporary name renamed into place) and drop the
    files of steps whose checkpoint retention removed."""
    state: dict[str, Any] = {"step": step, "outer": outer.state_dict()}
    if not mesh.joined:
        state["model"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        state["inner"] = _inner(optimizer).state_dict()
    path = _file(root, step, mesh)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    if mesh.rank == 0:
        _prune(Path(root))


def _prune(root: Path) -> None:
    """Remove the islands' files of checkpoints that are gone. Only those older than the newest
    published checkpoint: a background save still in flight has no directory yet, and its
    files must stay."""
    published = [step_of(d) for d in step_dirs(root)]
    if not published:
        return
    for old in (root / ISLANDS_DIR).glob("step_*"):
        if step_of(old) < max(published) and not (root / old.name).exists():
            shutil.rmtree(old, ignore_errors=True)


def load_island_state(
    root: str | Path, step: int, mesh: Mesh, model: nn.Module, optimizer: Any, outer: Any
) -> None:
    path = _file(root, step, mesh)
    if not path.exists():
        raise CheckpointError(
            f"{path} is missing: the islands' state of step {step} (outer optimizer, last "
            "synchronized parameters) was not saved; resume from a checkpoint written with "
            "the same outer settings"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "model" in state:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(state["model"][name])
        _inner(optimizer).load_state_dict(state["inner"])
        reload = getattr(optimizer, "reload_masters", None)
        if reload is not None:
            reload()
    outer.load_state_dict(state["outer"])
