"""Process-group set-up under torchrun, and building this rank's part of the model."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from yuanlfa.config import Config, ConfigError
from yuanlfa.model import build_model, create_model, materialize
from yuanlfa.model.transformer import YuanModel
from yuanlfa.parallel import Mesh, apply_tensor_parallel, build_mesh, shard_full_tensor


def world_from_env() -> tuple[int, int]:
    """(world size, rank): of the process group when one exists, else as torchrun sets them."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


def check_supported_layout(cfg: Config) -> None:
    p = cfg.parallel
    dp = p.dp or 1
    if p.pp > 1:
        raise ConfigError(
            f"parallel.pp: {p.pp}: pipeline parallelism is not available in this version; "
            "launch tp * dp processes with parallel.pp=1"
        )
    if cfg.optim.distributed and dp > 1 and cfg.checkpoint.dir is not None:
        raise ConfigError(
            "checkpoint.dir: saving the sharded optimizer needs the layout-free checkpoint "
            "format, which this version does not have; unset checkpoint.dir or set "
            "optim.distributed=false"
        )
    if p.tp > 1 and cfg.checkpoint.dir is not None:
        raise ConfigError(
            "checkpoint.dir: saving checkpoints under tensor parallelism needs the layout-free "
            "checkpoint format, which this version does not have; unset checkpoint.dir"
        )


def init_distributed(cfg: Config, device: torch.device) -> tuple[Mesh, bool]:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA) and build the mesh.

    Returns (mesh, whether this call created the process group and so should destroy it).
    """
    world, rank = world_from_env()
    created = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timedelta(minutes=10), **kwargs)
        created = True
    mesh = build_mesh(cfg.parallel, world, rank, cfg.model)
    return mesh, created


def build_local_model(cfg: Config, mesh: Mesh, device: torch.device) -> YuanModel:
    """This rank's model: the whole single-device model, or its tensor-parallel shard with every
    parameter cut from the same full initial value a single process would use."""
    m, seed = cfg.model, cfg.train.seed
    if mesh.tp == 1:
        return create_model(m, seed=seed, device=device)
    model = build_model(m)
    apply_tensor_parallel(model, mesh.tp_group, cfg.parallel.sequence_parallel, m.loss_block_size)

    def shard(name: str, full: torch.Tensor) -> torch.Tensor:
        return shard_full_tensor(name, full, m, mesh.tp_rank, mesh.tp)

    materialize(model, m, seed, device, shard=shard)
    return model
