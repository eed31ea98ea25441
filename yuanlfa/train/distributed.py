"""Process-group set-up under torchrun, and building this rank's part of the model."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from yuanlfa.config import Config
from yuanlfa.model import build_model, materialize
from yuanlfa.model.transformer import YuanModel
from yuanlfa.parallel import Mesh, apply_tensor_parallel, build_mesh, shard_full_tensor
from yuanlfa.parallel.pipeline import PipelineLayout
from yuanlfa.parallel.pp.stage import stage_flags


def world_from_env() -> tuple[int, int]:
    """(world size, rank): of the process group when one exists, else as torchrun sets them."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


def _restart_store(world: int, timeout: timedelta) -> dist.Store | None:
    """After a torchrun restart (``--max-restarts``), the job's store still holds the previous
    attempt's keys, and a fast rank can read a dead peer's address from them (gloo then fails
    with "connectFullMesh ... Connection refused"). Each attempt gets its own key prefix."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    # Only where the torchrun agent hosts the store (its workers are all clients).
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    base = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(f"yuanlfa/attempt{attempt}", base)


def init_distributed(cfg: Config, device: torch.device) -> tuple[Mesh, bool]:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA) and build the mesh.

    Returns (mesh, whether this call created the process group and so should destroy it).
    """
    world, rank = world_from_env()
    created = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict = {"device_id": device} if device.type == "cuda" else {}
        timeout = timedelta(minutes=10)
        store = _restart_store(world, timeout)
        if store is not None:
            kwargs.update(store=store, rank=rank, world_size=world)
        dist.init_process_group(backend, timeout=timeout, **kwargs)
        created = True
    mesh = build_mesh(cfg.parallel, world, rank, cfg.model)
    return mesh, created


def build_local_model(
    cfg: Config,
    mesh: Mesh,
    device: torch.device,
    layout: PipelineLayout | None = None,
    dtype: torch.dtype = torch.float32,
) -> YuanModel:
    """This rank's model: the whole single-device model, or the layers of this rank's pipeline
    stages (with the embedding on the first, norm and head on the last), cut to this rank's
    tensor-parallel shard. Every parameter starts from the full initial value a single process
    would use, so every layout trains the same model."""
    m, seed = cfg.model, cfg.train.seed
    layer_ids, has_embedding, has_head = None, True, True
    if layout is not None and mesh.pp > 1:
        layer_ids, has_embedding, has_head = stage_flags(layout, mesh.pp_rank)
    model = build_model(m, layer_ids, has_embedding, has_head)
    shard = None
    if mesh.tp > 1:
        apply_tensor_parallel(
            model, mesh.tp_group, cfg.parallel.sequence_parallel, m.loss_block_size
        )

        def shard(name: str, full: torch.Tensor) -> torch.Tensor:
            return shard_full_tensor(name, full, m, mesh.tp_rank, mesh.tp)

    materialize(model, m, seed, device, dtype, shard=shard)
    tied = m.tie_embeddings and model.embed is not None
    if mesh.pp > 1 and tied and mesh.embed_group is not None:
        # The first stage's embedding and the last stage's copy (for the tied head): kept equal
        # by summing their gradients; counted once (on the first stage) in the gradient norm.
        model.embed.weight.pipeline_tied = True
        if has_head and not has_embedding:
            model.embed.weight.pipeline_copy = True
    return model
