"""What crosses the link between islands: the bytes an island sends per exchange.

``link_bytes`` in the step records counts the bytes the ranks of one island send to other
islands in that step, by the ring all-reduce formula: an all-reduce of ``B`` bytes over ``n``
ranks sends ``2 (n - 1) / n * B`` bytes from each rank (a reduce-scatter and an all-gather of
``n - 1`` chunks of ``B / n``). gloo and NCCL pick their own algorithms per size; the ring's
figure is the bandwidth-optimal one every algorithm approaches for large tensors.

- Joined islands (``outer.algorithm: none``): the dp reduction spans the islands, island-major, so
  its ring crosses each island boundary once: per tp/pp piece, the island sends
  ``2 (n - 1) / n * G`` (``G``: the piece's fp32 gradient bytes, ``n``: the dp ranks of every
  island), every step.
- A synchronous warm start (``outer.warm_start_steps``): every warm-up step each rank all-reduces
  the gradients it steps (its ZeRO slice, or the whole piece) over the ``N`` ranks holding the
  same piece in the other islands: ``2 (N - 1) / N * G_r`` per rank (``G_r``: those fp32 bytes),
  summed over the island's ranks.
- DiLoCo: each exchange all-reduces the pseudo-gradient of a fragment over the ``islands`` ranks
  holding the same piece; the island's dp ranks each send a disjoint 1/dp chunk, so per piece the
  island sends ``2 (N - 1) / N * F`` (``F``: the fragment's bytes on the wire, fp32 or bf16 with
  ``outer.quantize``; ``N``: islands), only on the steps an exchange starts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from yuanlfa.layout.traffic import ring_all_reduce_bytes
from yuanlfa.parallel.collectives import collective_device
from yuanlfa.parallel.mesh import Mesh


def island_sum(values: list[float], mesh: Mesh) -> list[float]:
    """Sum per-rank figures over the ranks of this rank's island that hold different pieces
    (tp and pp; collective over those groups). dp replicas are not summed: the caller counts a
    dp rank's own share."""
    out = torch.tensor(values, dtype=torch.float64, device=collective_device())
    for group in (mesh.tp_group, mesh.pp_group):
        if group is not None:
            dist.all_reduce(out, group=group)
    return out.tolist()


def island_dp_sum(values: list[float], mesh: Mesh) -> list[float]:
    """Sum over the island's dp ranks too (only when they hold disjoint shares)."""
    out = torch.tensor(island_sum(values, mesh), dtype=torch.float64, device=collective_device())
    if mesh.dp_group is not None and not mesh.joined:
        dist.all_reduce(out, group=mesh.dp_group)
    return out.tolist()


def joined_step_bytes(model: torch.nn.Module, mesh: Mesh) -> int:
    """Joined islands: the bytes the island's gradient reduction sends across the link each step
    (0 with one island)."""
    if mesh.islands == 1:
        return 0
    grad_bytes = sum(4 * p.numel() for p in model.parameters() if p.requires_grad)
    (total,) = island_sum([ring_all_reduce_bytes(grad_bytes, mesh.dp)], mesh)
    return round(total)


def warm_start_step_bytes(model: torch.nn.Module, optimizer: object, mesh: Mesh) -> int:
    """A synchronous warm-start step: the bytes the island sends across the link (0 with one
    island). Collective over the island's ranks."""
    buckets = getattr(optimizer, "buckets", None)  # ShardedAdamW: its slices' gradients
    if buckets is not None:
        grad_bytes = sum(4 * b.shard.numel() for b in buckets)
    else:
        grad_bytes = sum(4 * p.numel() for p in model.parameters() if p.requires_grad)
    (total,) = island_dp_sum([ring_all_reduce_bytes(grad_bytes, mesh.islands)], mesh)
    return round(total)
