"""The optimizer state as checkpoints see it: which tensors exist per parameter and where this
rank's pieces of them live, whatever the optimizer keeps them in.

A checkpoint asks :func:`checkpoint_state` and never looks at the optimizer's class: torch's
AdamW holds whole per-parameter moments; the fp32-master optimizer
(:class:`~yuanlfa.parallel.dp.zero.ShardedAdamW`) holds flat slices of buckets and describes them
through its own ``checkpoint_state()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class StatePiece:
    """This rank's elements [start, stop) of ``param`` (flattened) in the optimizer state."""

    param: nn.Parameter
    start: int
    stop: int
    exp_avg: torch.Tensor  # flat fp32 [stop - start]
    exp_avg_sq: torch.Tensor  # flat fp32 [stop - start]
    master: torch.Tensor | None  # flat fp32 master weights; None: the parameter steps itself


class OptimizerState(Protocol):
    # The dp replicas hold disjoint slices (each writes its own) rather than equal copies.
    sharded: bool

    def steps(self) -> int:
        """Updates taken so far (fewer than training steps when some were skipped)."""

    def prepare(self, steps: int) -> None:
        """Create the state tensors (torch creates them at the first update) so a checkpoint can
        be read into them, and set the update count."""

    def pieces(self) -> list[StatePiece]:
        """Views of this rank's state (after :meth:`prepare`)."""


def adam_steps(optimizer: torch.optim.Optimizer) -> int:
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def init_adamw_state(optimizer: torch.optim.Optimizer, step: int) -> None:
    """Create torch AdamW's state tensors if absent and set every parameter's step count."""
    for group in optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            state = optimizer.state[p]
            if "exp_avg" not in state:
                device = p.device if on_device else "cpu"
                state["step"] = torch.tensor(float(step), dtype=torch.float32, device=device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:
                state["step"].fill_(float(step))


class AdamWState:
    """torch's AdamW over whole parameters (replicated over dp)."""

    sharded = False

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def steps(self) -> int:
        return adam_steps(self.optimizer)

    def prepare(self, steps: int) -> None:
        init_adamw_state(self.optimizer, steps)

    def pieces(self) -> list[StatePiece]:
        out = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state[p]
                exp_avg, exp_avg_sq = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
                out.append(StatePiece(p, 0, p.numel(), exp_avg, exp_avg_sq, None))
        return out


def checkpoint_state(optimizer) -> OptimizerState:
    """The checkpoint view of ``optimizer``: its own ``checkpoint_state()`` when it has one,
    else torch's AdamW's."""
    own = getattr(optimizer, "checkpoint_state", None)
    return own() if own is not None else AdamWState(optimizer)
