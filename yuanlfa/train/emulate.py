"""The trainer's side of a planned (or emulated) heterogeneous pipeline: this rank's pacer, the
plan's predicted busy time per pipeline rank for the step records and the end summary, and the
memory budget held on the trainer's own accounting.

The budget (``emulate.memory_gib``, or on CPU the cluster section's device memory) is checked
twice: before the first step the planner's predicted peak of every rank must fit it (that is
:func:`~yuanlfa.planner.cluster_plan.cluster_plan`, which names the smallest change that fits),
and after every step this rank's measured peak must: its parameters, gradients and optimizer
state (each storage once) plus the peak of the activations autograd kept for backward during
the step (:class:`~.activation_probe.SavedActivationProbe`), the quantities the planner
predicts. A CPU process has no allocator of its own to ask, and a GPU's includes what other
libraries hold, so the trainer counts its own tensors.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from yuanlfa.config import Config
from yuanlfa.parallel.grads import grad_of
from yuanlfa.parallel.pp.pacing import Pacer
from yuanlfa.planner.cluster_plan import (
    cluster_plan,
    emulated_speeds,
    memory_budgets,
    predicted_busy_s,
)
from yuanlfa.planner.devices import GIB
from yuanlfa.train.activation_probe import SavedActivationProbe


class MemoryBudgetExceeded(RuntimeError):
    pass


def rank_pacer(cfg: Config, pp_rank: int) -> Pacer | None:
    """This pipeline rank's pacer under ``emulate.pace``, at its emulated speed; else None."""
    if not cfg.emulate.pace:
        return None
    return Pacer(cfg.emulate.pace, emulated_speeds(cfg)[pp_rank])


def predicted_busy(cfg: Config) -> list[float] | None:
    """The plan's busy seconds per pipeline rank and step (compute and links, no bubble), for a
    config with a cluster section or emulated ranks (resolved, split pinned); else None."""
    plan = cluster_plan(cfg)
    return None if plan is None else [round(x, 5) for x in predicted_busy_s(plan)]


def busy_summary(records: list[dict[str, Any]]) -> str | None:
    """One line per pipeline rank: the median measured busy time per step (warm-up step left
    out) against the plan's prediction."""
    timed = [r for r in records if "stage_busy_s" in r and not r.get("warmup")]
    timed = timed or [r for r in records if "stage_busy_s" in r]
    if not timed or "predicted_busy_s" not in timed[0]:
        return None
    predicted = timed[0]["predicted_busy_s"]
    lines = [f"busy seconds per step, median of {len(timed)} steps, measured vs predicted:"]
    for k, want in enumerate(predicted):
        got = statistics.median(r["stage_busy_s"][k] for r in timed)
        ratio = f" ({got / want:.2f}x)" if want > 0 else ""
        lines.append(f"  pipeline rank {k}: {got:.4f} s vs {want:.4f} s{ratio}")
    return "\n".join(lines)


def _storage_bytes(tensors: Iterator[torch.Tensor | None], seen: set[int]) -> int:
    total = 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _state_tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _state_tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _state_tensors(v)


class MemoryBudget:
    """This rank's budget on its own accounting; without one (``budget_bytes`` None) it does
    nothing."""

    def __init__(self, budget_bytes: int | None, pp_rank: int, model: nn.Module) -> None:
        self.budget_bytes, self.pp_rank, self.model = budget_bytes, pp_rank, model
        self.activation_peak = 0
        self.grads_bytes = 0

    @classmethod
    def for_rank(cls, cfg: Config, pp_rank: int, model: nn.Module) -> MemoryBudget:
        budgets = memory_budgets(cfg) if cfg.parallel.pp > 1 else (None,)
        return cls(budgets[pp_rank], pp_rank, model)

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """Around a step's forward and backward passes: the activation peak, then the
        gradients they left."""
        if self.budget_bytes is None:
            yield
            return
        with SavedActivationProbe(exclude=list(self.model.parameters())) as probe:
            yield
        self.activation_peak = probe.peak
        params = list(self.model.parameters())
        self.grads_bytes = _storage_bytes((grad_of(p) for p in params), set())

    def measured(self, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        seen: set[int] = set()
        weights = _storage_bytes(iter(self.model.parameters()), seen)
        state = _storage_bytes(_state_tensors(list(optimizer.state.values())), seen)
        parts = {
            "weights": weights,
            "grads": self.grads_bytes,
            "optimizer": state,
            "activations": self.activation_peak,
        }
        return {**parts, "total": sum(parts.values())}

    def check(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """After a step's update: raise MemoryBudgetExceeded when the measured peak is over."""
        if self.budget_bytes is None:
            return
        m = self.measured(optimizer)
        if m["total"] <= self.budget_bytes:
            return
        parts = ", ".join(f"{k} {m[k] / GIB:.3f}" for k in m if k != "total")
        raise MemoryBudgetExceeded(
            f"step {step}: pipeline rank {self.pp_rank} held {m['total'] / GIB:.3f} GiB ({parts}) "
            f"over its budget of {self.budget_bytes / GIB:.3f} GiB (emulate.memory_gib or its "
            "cluster device); the planner predicted less: give that rank more recompute "
            "(train.recompute_stages) or fewer layers (parallel.pipeline_blocks)"
        )
