"""Before a run starts: the device, the precision, the resolved config and the checks that can
fail before any data is loaded; what a checkpoint records to tell one run from another."""

from __future__ import annotations

import dataclasses
import os
import resource
import warnings
from pathlib import Path
from typing import Any

import torch

from yuanlfa.checkpoint import CheckpointError, holds_checkpoints, resolve_checkpoint
from yuanlfa.config import Config, ConfigError, resolve
from yuanlfa.config.preflight import preflight
from yuanlfa.data import build_tokenizer
from yuanlfa.layout.schedules import schedule_spec
from yuanlfa.model.registry import check_model_config
from yuanlfa.ops.lfa import resolve_impl
from yuanlfa.parallel.islands.ft import launched_island
from yuanlfa.planner.cluster_plan import cluster_plan
from yuanlfa.train.distributed import world_from_env
from yuanlfa.train.islands import check_single_launch, per_island_config
from yuanlfa.train.metrics import check_tensorboard
from yuanlfa.train.pipeline import pipeline_layout


def pick_device(cfg: Config) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device: cuda requested but no CUDA device is visible")
        local, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if count == 1:
            local = 0  # the launcher gives each process one visible GPU
        elif local >= count:
            raise ConfigError(
                f"train.device: LOCAL_RANK {local} but only {count} GPUs are visible on this "
                "node; start at most one process per GPU (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", local)
        # Triton launches and NCCL use the current device: make it this rank's GPU.
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` has bf16 tensor cores (Ampere or newer); torch's default check also
    accepts GPUs that only emulate bf16, many times slower than fp32 there."""
    if device.type != "cuda":
        return True  # CPU autocast runs bf16 (slowly on old CPUs, but correctly)
    return torch.cuda.is_bf16_supported(including_emulation=False)


def pick_precision(cfg: Config, device: torch.device) -> torch.dtype:
    """bf16 autocast on a GPU with bf16 tensor cores (``auto``), else fp32; an explicit bf16
    request (precision or param_dtype) on a GPU without them is refused."""
    t = cfg.train
    native = bf16_native(device)
    for key, value in (("precision", t.precision), ("param_dtype", t.param_dtype)):
        if value == "bf16" and not native:
            raise ConfigError(
                f"train.{key}: bf16 needs a GPU with bf16 tensor cores (compute capability 8.0+), "
                f"and {torch.cuda.get_device_name(device)} has none; set train.{key}=fp32 "
                "(fp16 training is not supported)"
            )
    precision = t.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and native else "fp32"
        if device.type == "cuda" and not native:
            warnings.warn(
                f"{torch.cuda.get_device_name(device)} has no bf16 tensor cores: training in "
                "fp32 (train.precision=auto)",
                stacklevel=2,
            )
    return torch.bfloat16 if precision == "bf16" else torch.float32


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def prepare_config(cfg: Config) -> Config:
    """Resolve derived fields for this launch and check what can be checked up front."""
    world, _ = world_from_env()
    island = launched_island()
    if island is not None:  # this launch is one island: the run's world is islands of it
        cfg = per_island_config(cfg, island)
        world *= cfg.parallel.islands
    else:
        check_single_launch(cfg)
    # Output paths, input files and kernels, before any data is read or model built.
    preflight(cfg, cuda=torch.cuda.is_available())
    check_model_config(cfg.model)  # plug-ins imported, filter and attention names known
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    cfg = resolve(cfg, world_size=world, tokenizer_vocab=tokenizer.vocab_size)
    cfg = with_cluster_plan(cfg)
    p, t = cfg.parallel, cfg.train
    if p.pp > 1:
        pipeline_layout(cfg)  # a bad block list or layout string fails here, before any data
        micro = t.global_batch_size // (p.dp or 1) // t.micro_batch_size
        schedule_spec(p.schedule).check(p.pp, p.virtual_stages, micro)
    if cfg.checkpoint.init_from is not None:
        init_source(cfg.checkpoint.init_from)
    check_tensorboard(cfg.logging)
    ckpt = cfg.checkpoint
    if ckpt.dir is not None and not ckpt.resume and holds_checkpoints(ckpt.dir):
        raise ConfigError(
            f"checkpoint.dir: {ckpt.dir} already holds checkpoints; set checkpoint.resume=true "
            "to continue from them, or choose another directory (nothing was overwritten)"
        )
    return cfg


def with_cluster_plan(cfg: Config) -> Config:
    """A config with a ``cluster:`` section runs the planner's plan for it: the split (the
    balancer's on each rank's own device for ``auto``, or the given one checked against each
    device) and its per-rank recompute. Every rank computes the same plan."""
    plan = cluster_plan(cfg)
    if plan is None:
        return cfg
    parallel = dataclasses.replace(cfg.parallel, pipeline_blocks=tuple(plan.blocks))
    train = dataclasses.replace(cfg.train, recompute_stages=tuple(plan.recompute))
    return dataclasses.replace(cfg, parallel=parallel, train=train)


def pin_split(cfg: Config, device: torch.device) -> Config:
    """``pipeline_blocks: auto`` resolved once, for this device, so that the fit check and the
    trainer see the same split."""
    if cfg.parallel.pp == 1 or cfg.parallel.pipeline_blocks != "auto":
        return cfg
    blocks = tuple(pipeline_layout(cfg, device).blocks)
    return dataclasses.replace(
        cfg, parallel=dataclasses.replace(cfg.parallel, pipeline_blocks=blocks)
    )


def run_settings(cfg: Config, data_source: str) -> dict[str, Any]:
    """What fixes the sample order and the lr schedule: a resumed run must keep all of it."""
    t = cfg.train
    return {
        "train.steps": t.steps,
        "train.seed": t.seed,
        "train.global_batch_size": t.global_batch_size,
        "train.seq_length": t.seq_length,
        "data.path": data_source,
        "data.split": cfg.data.split,
        "optim.lr_schedule": cfg.optim.lr_schedule,
        "optim.warmup_steps": cfg.optim.warmup_steps,
        "optim.decay_steps": cfg.optim.decay_steps,
    }


def init_source(path: str) -> Path:
    """The checkpoint ``checkpoint.init_from`` names: a step directory or a checkpoint.dir."""
    try:
        return resolve_checkpoint(path)
    except CheckpointError as exc:
        raise ConfigError(
            f"checkpoint.init_from: {exc}, e.g. the output of yuanlfa-reshard --to yuanlfa"
        ) from None


def layout_record(cfg: Config, layout) -> dict[str, Any]:
    """The layout a checkpoint was written from (informational: any layout loads it)."""
    p = cfg.parallel
    return {
        "tp": p.tp,
        "pp": p.pp,
        "dp": p.dp,
        "virtual_stages": p.virtual_stages,
        "pipeline_blocks": list(layout.blocks) if layout is not None else None,
        "sequence_parallel": p.sequence_parallel,
        "distributed_optimizer": cfg.optim.distributed,
        "param_dtype": cfg.train.param_dtype,
    }


def check_lfa_impl(cfg: Config, device: torch.device) -> None:
    """Fail before loading data when the requested LFA implementation cannot run here."""
    if not cfg.model.lfa:
        return
    try:
        impl = resolve_impl(cfg.model.lfa_impl, device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"model.lfa_impl: {exc}") from None
    if impl == "triton" and cfg.model.hidden_size % 16:
        raise ConfigError(
            f"model.lfa_impl: the Triton kernels need model.hidden_size % 16 == 0, got "
            f"{cfg.model.hidden_size}; use lfa_impl=reference"
        )
