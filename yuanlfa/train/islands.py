"""The islands' share of a checkpoint, next to the layout-free one.

The layout-free checkpoint (``checkpoint.dir/step_<N>``) holds the model and inner optimizer of
the first island. Every rank of a run with an outer algorithm also writes
``checkpoint.dir/islands/step_<N>/rank<R>.pt``: the outer state (the anchor, i.e. the last
synchronized parameters, and the outer momentum, plus any exchange still in flight) and, when
islands train apart (not ``outer.algorithm: none``), its own parameters and inner optimizer
state, which differ between islands between two synchronizations. A resume with the same
layout then continues exactly where the run stopped.

Per-island launches (``--island I``, torchft): :func:`per_island_config` gives each island its
own checkpoint directory and log, :func:`connect_islands` its Manager, and :class:`LiveState`
is what a live island hands a restarted one (torchft's recovery, over HTTP, not from disk).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from yuanlfa.checkpoint import CheckpointError
from yuanlfa.checkpoint.files import step_dirs, step_name, step_of
from yuanlfa.config import Config, ConfigError
from yuanlfa.parallel import Mesh
from yuanlfa.parallel.islands.ft import (
    ManagerExchange,
    check_lighthouse,
    check_rendezvous,
    require_torchft,
)

ISLANDS_DIR = "islands"


def _host_copy(value: Any) -> Any:
    """``value`` with every tensor in it copied to the host (dicts, lists, tuples walked)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _host_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_host_copy(v) for v in value)
    return value


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


def per_island_config(cfg: Config, island: int) -> Config:
    """The config of island ``island`` of a per-island launch: checked, with its own
    ``checkpoint.dir/island<I>`` and ``logging.jsonl`` (``<name>.island<I>.jsonl``), so that
    every island can be given the same config."""
    p, o = cfg.parallel, cfg.outer
    if p.islands < 2:
        raise ConfigError(
            f"--island {island}: per-island launches need parallel.islands = the number of "
            f"islands of the run (>= 2), got {p.islands}; set it, or launch without --island"
        )
    if island >= p.islands:
        raise ConfigError(
            f"--island {island}: islands are numbered 0 .. parallel.islands - 1 = {p.islands - 1}"
        )
    if o.algorithm == "none":
        raise ConfigError(
            "outer.algorithm: none joins the islands in every step's gradient reduction, which "
            "needs them in one launch; use diloco or streaming_diloco with --island, or launch "
            "every island in one torchrun without --island"
        )
    if o.warm_start_steps:
        raise ConfigError(
            f"outer.warm_start_steps: {o.warm_start_steps} reduces the gradients across the "
            "islands in every warm-up step, which needs them in one launch (as algorithm none); "
            "launch every island in one torchrun without --island, or set it to 0"
        )
    gap = o.sync_every // (o.fragments or 1)  # steps between two rounds
    if o.fragment_delay > gap:
        raise ConfigError(
            f"outer.fragment_delay: {o.fragment_delay} with per-island launches overlaps a "
            f"fragment's exchange with the next one (every sync_every / fragments = {gap} "
            f"steps), and a torchft Manager holds one round at a time; set it to at most {gap}"
        )
    require_torchft()  # before any data is read or model built
    check_rendezvous(o, Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else None)
    ckpt, log = cfg.checkpoint, cfg.logging
    if ckpt.dir is not None:
        ckpt = dataclasses.replace(ckpt, dir=str(Path(ckpt.dir) / f"island{island}"))
    if log.jsonl is not None:
        path = Path(log.jsonl)
        log = dataclasses.replace(log, jsonl=str(path.with_suffix(f".island{island}{path.suffix}")))
    if o.lighthouse != "auto" and int(os.environ.get("RANK", "0")) == 0:
        check_lighthouse(o)  # before any data is read or model built
    return dataclasses.replace(cfg, checkpoint=ckpt, logging=log)


def check_single_launch(cfg: Config) -> None:
    """Every island in this launch: a lighthouse would have no effect."""
    if cfg.outer.lighthouse != "auto":
        raise ConfigError(
            f"outer.lighthouse: {cfg.outer.lighthouse} is for per-island launches (yuanlfa-train "
            "--island I, one torchrun per island); this launch holds every island: drop it or "
            "launch per island"
        )


def connect_islands(cfg: Config, mesh: Mesh, device: torch.device) -> ManagerExchange | None:
    """The torchft Manager of this rank in a per-island launch (None otherwise). With
    ``outer.lighthouse: auto`` the lighthouse's address is published next to the islands'
    checkpoint directories."""
    if not mesh.launched:
        return None
    rendezvous = Path(cfg.checkpoint.dir).parent if cfg.checkpoint.dir else None
    return ManagerExchange(
        cfg.outer, mesh.islands, mesh.island, mesh.rank, mesh.world_size, device, rendezvous
    )


class LiveState:
    """What a restarted island takes from a live one in torchft's recovery: the live rank's
    parameters (its piece), inner optimizer state, outer state (anchor, momentum) and step.

    ``holder`` is the trainer: ``step``, ``consumed``, ``model``, ``optimizer``, ``outer``.

    When it is taken: torchft calls :meth:`state_dict` inside the live island's quorum, which
    opens a round (``OuterSync.after_step``: after the previous round was applied, before this
    round's pseudo-gradient is taken and its all-reduce started; per-island rounds never
    overlap). So the state holds no exchange in flight: the healed island takes the same step,
    computes the same pseudo-gradient from the same anchor and joins the round's all-reduce as
    one more participant, and nothing is counted twice. The tensors are copied to the host at
    that moment: with ``outer.fragment_delay`` > 0 the live island trains on while the healed
    one is still fetching them (on CPU torchft would otherwise serve the live tensors)."""

    def __init__(self, holder: Any) -> None:
        self.holder = holder

    def state_dict(self) -> dict[str, Any]:
        h = self.holder
        if h.outer.pending:
            # Taken outside a round's start: the healed island would miss the exchange.
            raise RuntimeError("islands: live state requested with an exchange in flight")
        state = {
            "step": h.step,
            "consumed": h.consumed,
            "model": {n: p.detach() for n, p in h.model.named_parameters()},
            "inner": _inner(h.optimizer).state_dict(),
            "outer": h.outer.state_dict(),
        }
        return _host_copy(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        h = self.holder
        with torch.no_grad():
            for name, p in h.model.named_parameters():
                p.copy_(state["model"][name])
        _inner(h.optimizer).load_state_dict(state["inner"])
        reload = getattr(h.optimizer, "reload_masters", None)
        if reload is not None:
            reload()
        h.outer.load_state_dict(state["outer"])
        h.step, h.consumed = int(state["step"]), int(state["consumed"])
        h.outer.healed(h.step)
