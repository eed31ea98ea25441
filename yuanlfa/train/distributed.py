"""Process-group set-up under torchrun and the mesh."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from yuanlfa.config import Config
from yuanlfa.parallel import Mesh, build_mesh


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
    joined = cfg.outer.algorithm == "none"
    mesh = build_mesh(cfg.parallel, world, rank, cfg.model, joined=joined)
    return mesh, created
