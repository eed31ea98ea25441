"""One gradient path: what happens to the gradients between the last backward pass of a step and
the optimizer update, whatever the layout.

``start(backward_passes)`` before the step's first backward (zero the buffers; arm the data-
parallel reduction that overlaps the last pass) and ``finish(max_norm)`` after its last: finish
the reductions, sum the partial gradients other ranks hold, compute the global norm and clip.
Two implementations:

- :class:`ReplicatedGradSync`: every rank steps whole parameters (torch's AdamW). Gradients are
  all-reduced over dp in buckets, the tied embedding summed over its two pipeline stages, the
  tp-replicated parameters' partial sums (sequence parallelism) summed over tp.
- :class:`ShardedGradSync`: the fp32-master optimizer (:class:`~yuanlfa.parallel.dp.zero.
  ShardedAdamW`: ZeRO-1, or whole masters for low-precision parameters), which reduce-scatters
  onto its slices and sums and measures them itself.
"""

from __future__ import annotations

from typing import Protocol

import torch.distributed as dist
from torch import nn

from yuanlfa.parallel.dp.reducer import GradReducer, allreduce_flat
from yuanlfa.parallel.dp.zero import ShardedAdamW
from yuanlfa.parallel.grads import allreduce_replicated_grads, clip_grads, global_grad_norm
from yuanlfa.parallel.mesh import Mesh
from yuanlfa.parallel.pp.tied import sync_tied_embedding_grads


class GradSync(Protocol):
    def start(self, backward_passes: int) -> None:
        """Zero the gradients; arm the reduction overlapping the last of ``backward_passes``."""

    def finish(self, max_norm: float, across: dist.ProcessGroup | None = None) -> float:
        """Complete the gradients, clip them to ``max_norm`` (0: no clipping); return the global
        norm before clipping (inf or nan: the caller skips the update). ``across``: a group of
        ranks holding the same piece in other islands to sum the reduced gradients over too
        (``outer.warm_start_steps``: islands stepping synchronously)."""


class ReplicatedGradSync:
    def __init__(
        self,
        model: nn.Module,
        mesh: Mesh,
        *,
        sequence_parallel: bool,
        bucket_elements: int,
        overlap: bool,
    ) -> None:
        self.model, self.mesh = model, mesh
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.sequence_parallel = sequence_parallel
        self.reducer = None
        if mesh.dp > 1:
            self.reducer = GradReducer(
                [self.params],
                mesh.dp_group,
                scatter=False,
                bucket_elements=bucket_elements,
                overlap=overlap,
            )

    def start(self, backward_passes: int) -> None:
        if self.reducer is not None:
            self.reducer.start(backward_passes)

    def finish(self, max_norm: float, across: dist.ProcessGroup | None = None) -> float:
        mesh = self.mesh
        if self.reducer is not None:
            self.reducer.finish()
            for p in self.params:  # torch's AdamW steps with .grad: the reduced buffers
                p.grad = p.main_grad
        if across is not None:
            # Linear like the sums below, so the order of the reductions does not matter.
            allreduce_flat([p.grad for p in self.params if p.grad is not None], across)
        if mesh.pp > 1:
            sync_tied_embedding_grads(self.model, mesh)
        if mesh.tp > 1 and self.sequence_parallel:
            allreduce_replicated_grads(self.params, mesh.tp_group)
        norm = global_grad_norm(self.params, mesh.tp_group, mesh.pp_group)
        clip_grads(self.params, max_norm, norm)
        return norm


class ShardedGradSync:
    def __init__(self, optimizer: ShardedAdamW) -> None:
        self.optimizer = optimizer

    def start(self, backward_passes: int) -> None:
        self.optimizer.start_step(backward_passes)

    def finish(self, max_norm: float, across: dist.ProcessGroup | None = None) -> float:
        norm = self.optimizer.reduce_gradients(across)
        self.optimizer.clip(max_norm, norm)
        return norm
