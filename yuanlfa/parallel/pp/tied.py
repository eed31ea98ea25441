"""The embedding tied to the head across pipeline stages.

The first stage holds the embedding (input) and the last a copy of it (for the tied head). They
are kept equal by summing their gradients over the two-rank ``embed`` group of the mesh each
step; the copy is counted in the gradient norm and saved only on the first stage.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from yuanlfa.model.transformer import YuanModel
from yuanlfa.parallel.grads import grad_of
from yuanlfa.parallel.mesh import Mesh
from yuanlfa.parallel.roles import is_tied_across_stages, set_role


def mark_tied_embedding(model: YuanModel, mesh: Mesh) -> None:
    """Record the roles of a pipelined model's tied embedding (or of its copy on the last
    stage)."""
    if mesh.pp == 1 or mesh.embed_group is None:
        return
    if not model.cfg.tie_embeddings or model.embed is None:
        return
    set_role(model.embed.weight, pipeline_tied=True)
    if model.has_head and not model.has_embedding:
        set_role(model.embed.weight, pipeline_copy=True)


def sync_tied_embedding_grads(model: YuanModel, mesh: Mesh) -> None:
    """Sum the embedding gradient of the first stage (input) and the last (head), for optimizers
    that step whole parameters (the distributed optimizer sums its slices itself)."""
    if mesh.embed_group is None or model.embed is None:
        return
    weight = model.embed.weight
    if not is_tied_across_stages(weight):  # untied: the head has a weight of its own
        return
    grad = grad_of(weight)
    if grad is None:  # no microbatch reached it (cannot happen in training; keep ranks in step)
        weight.grad = grad = torch.zeros_like(weight)
    dist.all_reduce(grad, group=mesh.embed_group)
