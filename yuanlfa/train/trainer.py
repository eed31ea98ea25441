"""The training loop for one process (CPU or one GPU)."""

from __future__ import annotations

import contextlib
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from yuanlfa.checkpoint import (
    CheckpointError,
    TrainingState,
    holds_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from yuanlfa.config import Config, ConfigError, config_to_dict, resolve
from yuanlfa.data import build_tokenizer
from yuanlfa.ops.lfa import resolve_impl
from yuanlfa.parallel.dp.reducer import GradReducer
from yuanlfa.parallel.grads import (
    allreduce_replicated_grads,
    clip_grads,
    global_grad_norm,
)
from yuanlfa.parallel.dp.zero import ShardedAdamW
from yuanlfa.data.build import build_datasets, get_batch
from yuanlfa.train.distributed import (
    build_local_model,
    init_distributed,
    world_from_env,
)
from yuanlfa.train.loader import StepLoader
from yuanlfa.train.metrics import MetricsLogger, check_tensorboard
from yuanlfa.train.optimizer import build_optimizer
from yuanlfa.train.pipeline import (
    build_runner,
    concat_batches,
    evaluate_pipeline,
    from_last_stage,
    pipeline_layout,
    stage_stats,
    sync_tied_embedding_grads,
)
from yuanlfa.parallel.recompute import apply_recompute
from yuanlfa.train.schedule import learning_rate


@dataclass
class TrainResult:
    records: list[dict[str, Any]] = field(default_factory=list)
    final_checkpoint: Path | None = None


class NonFiniteGradients(RuntimeError):
    pass


def pick_device(cfg: Config) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device: cuda requested but no CUDA device is visible")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        # Triton launches and NCCL use the current device: make it this rank's GPU.
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def pick_precision(cfg: Config, device: torch.device) -> torch.dtype:
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def prepare_config(cfg: Config) -> Config:
    """Resolve derived fields for this launch and check what can be checked up front."""
    world, _ = world_from_env()
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    cfg = resolve(cfg, world_size=world, tokenizer_vocab=tokenizer.vocab_size)
    if cfg.parallel.pp > 1:
        pipeline_layout(cfg)  # a bad block list or layout string fails here, before any data
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


def check_same_run(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    changed = [
        f"{k} {saved[k]!r} -> {current[k]!r}"
        for k in current
        if k in saved and saved[k] != current[k]
    ]
    if changed:
        raise CheckpointError(
            f"{path} belongs to a run with other settings ({'; '.join(changed)}); the sample "
            "order and lr schedule depend on them, so resuming would not continue that run. "
            "Restore the settings, or start a new run in another checkpoint.dir"
        )


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


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model, dataset, cfg: Config, device, dtype) -> float:
    """Mean per-token loss over the first eval_iters global batches of the held-out split."""
    model.eval()
    total, count = 0.0, 0.0
    micro = cfg.train.micro_batch_size
    for start in range(0, len(dataset) - micro + 1, micro):
        batch = get_batch(dataset, start, micro, device)
        with _autocast(device, dtype):
            losses = model(batch["tokens"], batch["position_ids"], labels=batch["labels"])
        total += float((losses * batch["loss_mask"]).sum())
        count += float(batch["loss_mask"].sum())
    model.train()
    return total / max(count, 1.0)


def train(cfg: Config, progress: bool = True) -> TrainResult:
    """Train per ``cfg``; return the per-step records (the same ones written to the JSONL log)."""
    cfg = prepare_config(cfg)
    t = cfg.train
    device = pick_device(cfg)
    check_lfa_impl(cfg, device)
    dtype = pick_precision(cfg, device)
    torch.manual_seed(t.seed)
    progress = progress and world_from_env()[1] == 0

    data = build_datasets(
        cfg.data,
        vocab_size=cfg.model.vocab_size,
        seq_length=t.seq_length,
        train_samples=t.steps * t.global_batch_size,
        valid_samples=t.eval_iters * t.global_batch_size,
        seed=t.seed,
        progress=progress,
    )

    mesh, owns_group = init_distributed(cfg, device)
    try:
        return _train(cfg, mesh, device, dtype, data, progress)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _train(cfg: Config, mesh, device, dtype, data, progress: bool) -> TrainResult:
    t, o = cfg.train, cfg.optim
    local_batch = t.global_batch_size // mesh.dp
    micro_batches = local_batch // t.micro_batch_size
    # The process holding the loss logs: last pipeline stage, first tp and dp rank.
    is_logger = mesh.is_last_stage and mesh.tp_rank == 0 and mesh.dp_rank == 0
    say = print if is_logger else (lambda *a, **k: None)
    layout = pipeline_layout(cfg, device) if mesh.pp > 1 else None
    recompute = t.recompute_stages[mesh.pp_rank] if t.recompute_stages else t.recompute
    param_dtype = torch.bfloat16 if t.param_dtype == "bf16" else torch.float32
    model = build_local_model(cfg, mesh, device, layout, param_dtype)
    model = apply_recompute(model, recompute)
    runner = None
    if layout is not None:
        runner = build_runner(cfg, mesh, model, layout, device, micro_batches)
    resuming = cfg.checkpoint.resume and latest_checkpoint(cfg.checkpoint.dir) is not None
    if cfg.checkpoint.init_from and not resuming:
        # Weights only, before the optimizer copies them into its fp32 masters.
        source = init_source(cfg.checkpoint.init_from)
        load_checkpoint(source, model, None, config_to_dict(cfg.model), mesh, cfg.model)
        say(f"initialized the weights from {source}", flush=True)
    sharded_optimizer = o.distributed and mesh.dp > 1
    par = cfg.parallel
    reducer: GradReducer | None = None
    if sharded_optimizer or param_dtype != torch.float32:
        # Low-precision parameters step through fp32 master weights: sharded over dp, or whole
        # on every replica (shard=False) in the unsharded mode.
        optimizer = ShardedAdamW(
            model,
            o,
            mesh.dp_group,
            mesh.tp_group,
            mesh.pp_group,
            shard=sharded_optimizer,
            embed_group=mesh.embed_group,
            sequence_parallel=par.sequence_parallel,
            bucket_elements=par.grad_bucket_size,
            overlap=par.overlap_grad_reduce,
        )
    else:
        optimizer = build_optimizer(model, o)
        if mesh.dp > 1:
            reducer = GradReducer(
                [[q for q in model.parameters() if q.requires_grad]],
                mesh.dp_group,
                scatter=False,
                bucket_elements=par.grad_bucket_size,
                overlap=par.overlap_grad_reduce,
            )
    model_dict = config_to_dict(cfg.model)

    extra = {"config": config_to_dict(cfg), "run": run_settings(cfg, data.prefix)}
    step, consumed = 0, 0
    if cfg.checkpoint.resume:
        path = latest_checkpoint(cfg.checkpoint.dir)
        if path is not None:
            state = load_checkpoint(path, model, optimizer, model_dict, mesh, cfg.model)
            check_same_run(state.extra.get("run", {}), run_settings(cfg, data.prefix), path)
            step, consumed = state.step, state.consumed_samples
            say(f"resumed from {path} at step {step}", flush=True)
    if mesh.world_size > 1:
        # Every rank must resume from the same step (e.g. not from a non-shared filesystem).
        steps = torch.tensor([step, -step], dtype=torch.float64, device=device)
        dist.all_reduce(steps, op=dist.ReduceOp.MIN)
        if steps[0] != -steps[1]:
            raise CheckpointError(
                f"ranks resumed from different steps ({int(steps[0])} to {int(-steps[1])}); "
                "checkpoint.dir must be on a filesystem every rank sees"
            )

    n_params = sum(p.numel() for p in model.parameters())
    pipeline = ""
    if layout is not None:
        pipeline = (
            f" x pp {mesh.pp} ({cfg.parallel.schedule}, blocks {list(layout.blocks)}, "
            f"{micro_batches} microbatches)"
        )
    say(
        f"model: {n_params / 1e6:.2f}M parameters on this rank, {cfg.model.num_layers} layers, "
        f"hidden {cfg.model.hidden_size} | data: {data.prefix} ({len(data.train)} train samples) "
        f"| device {device}, {str(dtype).removeprefix('torch.')} | tp {mesh.tp} x dp {mesh.dp}"
        f"{pipeline}{' + sequence parallel' if cfg.parallel.sequence_parallel else ''}"
        f"{' | sharded optimizer (ZeRO-1)' if sharded_optimizer else ''}",
        flush=True,
    )
    logger = MetricsLogger(cfg.logging, t.steps, enabled=is_logger, start_step=step)
    result = TrainResult()
    params = [p for p in model.parameters() if p.requires_grad]
    tokens_per_step = t.global_batch_size * t.seq_length
    loader = StepLoader(
        data.train,
        consumed=consumed,
        global_batch=t.global_batch_size,
        micro_batch=t.micro_batch_size,
        dp_rank=mesh.dp_rank,
        dp=mesh.dp,
        device=device,
        num_workers=cfg.data.num_workers,
    )
    try:
        while step < t.steps:
            started = time.perf_counter()
            lr = learning_rate(o, step, t.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            # This data-parallel rank's contiguous share of the global batch.
            batches = loader.next_step()
            # Normalize by the tokens of the whole global batch, so the gradient is that of the
            # global-batch mean loss however the batch is split into microbatches and ranks.
            num_tokens = sum(b["loss_mask"].sum() for b in batches)
            if mesh.dp > 1:
                dist.all_reduce(num_tokens, group=mesh.dp_group)
            # Zero the gradient buffers; arm the reduction that overlaps the last backward pass.
            if isinstance(optimizer, ShardedAdamW):
                optimizer.start_step(micro_batches)
            elif reducer is not None:
                reducer.start(micro_batches)
            if runner is not None:
                # The schedule splits this rank's batch back into the same microbatches.
                with _autocast(device, dtype):
                    part = runner.train_step(concat_batches(batches), num_tokens)
                loss_sum = from_last_stage(part, mesh, loss_sum)
            else:
                for batch in batches:
                    with _autocast(device, dtype):
                        losses = model(
                            batch["tokens"], batch["position_ids"], labels=batch["labels"]
                        )
                    loss = (losses * batch["loss_mask"]).sum() / num_tokens
                    loss.backward()
                    loss_sum += loss.detach()
            if mesh.dp > 1:
                dist.all_reduce(loss_sum, group=mesh.dp_group)
            if isinstance(optimizer, ShardedAdamW):
                grad_norm = optimizer.reduce_gradients()
                optimizer.clip(o.clip_grad, grad_norm)
            else:
                if reducer is not None:
                    reducer.finish()
                    for q in params:  # torch's AdamW steps with .grad: the reduced buffers
                        q.grad = q.main_grad
                if runner is not None:
                    sync_tied_embedding_grads(model, mesh)
                if mesh.tp > 1 and par.sequence_parallel:
                    allreduce_replicated_grads(params, mesh.tp_group)
                grad_norm = global_grad_norm(params, mesh.tp_group, mesh.pp_group)
                clip_grads(params, o.clip_grad, grad_norm)
            skipped = not math.isfinite(grad_norm)
            if skipped:
                message = f"step {step + 1}: gradient norm is {grad_norm}"
                if t.stop_on_nan:
                    raise NonFiniteGradients(message + "; stopping (train.stop_on_nan=true)")
                say(message + "; skipping the update", flush=True)
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            consumed += t.global_batch_size
            elapsed = time.perf_counter() - started
            record: dict[str, Any] = {
                "step": step,
                "loss": float(loss_sum),
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_step / elapsed,
                "step_time_s": elapsed,
                "mem_gb": _memory_gb(device),
            }
            if runner is not None:
                record.update(stage_stats(runner, mesh, _memory_gb(device), device))
            if skipped:
                record["skipped"] = True
            exiting = bool(t.exit_interval) and step % t.exit_interval == 0 and step < t.steps
            last = step == t.steps or exiting
            if data.valid is not None and (
                last or (t.eval_interval and step % t.eval_interval == 0)
            ):
                if runner is not None:
                    record["eval_loss"] = evaluate_pipeline(
                        runner,
                        model,
                        data.valid,
                        cfg,
                        mesh,
                        device,
                        lambda: _autocast(device, dtype),
                    )
                else:
                    record["eval_loss"] = evaluate(model, data.valid, cfg, device, dtype)
            console = last or step == 1 or step % cfg.logging.log_interval == 0
            logger.log(record, console=console or "eval_loss" in record)
            result.records.append(record)
            ckpt = cfg.checkpoint
            interval_due = ckpt.interval and step % ckpt.interval == 0
            if ckpt.dir is not None and (interval_due or exiting or (last and ckpt.save_at_end)):
                result.final_checkpoint = save_checkpoint(
                    ckpt.dir,
                    model,
                    optimizer,
                    TrainingState(step, consumed, model_dict, extra),
                    mesh,
                    cfg.model,
                    layout_record(cfg, layout),
                    keep_last=ckpt.keep_last,
                )
                say(f"saved checkpoint {result.final_checkpoint}", flush=True)
            if exiting:
                say(f"exiting at step {step} (train.exit_interval={t.exit_interval})")
                break
    finally:
        loader.close()
        logger.close()
    return result
