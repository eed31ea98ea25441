"""The training loop: :func:`train` sets up a :class:`Trainer` (setup), which runs
``train_step`` per optimizer step, ``evaluate`` and ``maybe_save`` when due.

Every layout goes through the same steps. The few places where one differs (a pipeline runs its
microbatches through a schedule; its eval too) branch on ``self.runner``; gradients are finished
by the one :class:`~yuanlfa.parallel.grad_sync.GradSync` the optimizer came with.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from yuanlfa.checkpoint import (
    CheckpointError,
    TrainingState,
    latest_checkpoint,
    load_checkpoint,
    manifest,
)
from yuanlfa.checkpoint.async_save import AsyncSaver, SaveDone, use_async
from yuanlfa.config import Config, config_to_dict
from yuanlfa.data.build import TrainData, build_datasets, get_batch
from yuanlfa.model.dropout import DropoutStep, dropout_step
from yuanlfa.parallel import Mesh, parallelize
from yuanlfa.parallel.grads import sum_over
from yuanlfa.parallel.islands import OuterSync, build_outer
from yuanlfa.parallel.pp.build import build_runner
from yuanlfa.train.distributed import init_distributed, world_from_env
from yuanlfa.train.emulate import MemoryBudget, busy_summary, predicted_busy, rank_pacer
from yuanlfa.train.fit_check import check_memory_fit
from yuanlfa.train.islands import (
    LiveState,
    connect_islands,
    load_island_state,
    save_island_state,
)
from yuanlfa.train.loader import StepLoader
from yuanlfa.train.metrics import LOG_RECORD, MetricsLogger
from yuanlfa.train.optimizer import build_optimizer_and_sync, uses_sharded_optimizer
from yuanlfa.train.pipeline import (
    concat_batches,
    evaluate_pipeline,
    from_last_stage,
    pipeline_layout,
    stage_stats,
)
from yuanlfa.train.schedule import learning_rate
from yuanlfa.train.setup import (
    check_lfa_impl,
    init_source,
    layout_record,
    memory_gb,
    pick_device,
    pick_precision,
    pin_split,
    prepare_config,
    run_settings,
)
from yuanlfa.train.throughput import StepTimer


@dataclass
class TrainResult:
    records: list[dict[str, Any]] = field(default_factory=list)
    final_checkpoint: Path | None = None


class NonFiniteGradients(RuntimeError):
    pass


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
    cfg = pin_split(cfg, device)  # auto: the balancer's split for this device, for every check
    check_memory_fit(cfg, device)  # the planner's peak per rank against the device, up front
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
        return Trainer(cfg, mesh, device, dtype, data).run()
    finally:
        if owns_group:
            dist.destroy_process_group()


class Trainer:
    def __init__(self, cfg: Config, mesh: Mesh, device, dtype, data: TrainData) -> None:
        """Setup: this rank's model, pipeline runner, optimizer and gradient path; weights from
        checkpoint.init_from, or everything from the latest checkpoint when resuming."""
        t = cfg.train
        self.cfg, self.mesh, self.device, self.dtype, self.data = cfg, mesh, device, dtype, data
        self.micro_batches = t.global_batch_size // mesh.data_dp // t.micro_batch_size
        # The process holding the loss logs: last pipeline stage, first tp and dp rank (of the
        # first island; of each island launched on its own).
        first = mesh.dp_rank == 0 if mesh.launched else mesh.data_rank == 0
        self.is_logger = mesh.is_last_stage and mesh.tp_rank == 0 and first
        self.layout = pipeline_layout(cfg, device) if mesh.pp > 1 else None
        param_dtype = torch.bfloat16 if t.param_dtype == "bf16" else torch.float32
        self.model = parallelize(cfg, mesh, device, self.layout, param_dtype)
        self.runner = None
        if self.layout is not None:
            pacer = rank_pacer(cfg, mesh.pp_rank)
            self.runner = build_runner(
                cfg, mesh, self.model, self.layout, device, self.micro_batches, pacer
            )
        self.predicted_busy = predicted_busy(cfg) if self.runner is not None else None
        self.budget = MemoryBudget.for_rank(cfg, mesh.pp_rank, self.model)
        self.model_dict = config_to_dict(cfg.model)
        self._init_weights()
        self.optimizer, self.grad_sync = build_optimizer_and_sync(
            self.model, cfg, mesh, param_dtype
        )
        run = run_settings(cfg, data.prefix)
        # The sample order's signature per dataset: a run may be extended only while it holds.
        datasets = getattr(data.train, "datasets", [data.train])
        run["data.order"] = [list(d.order_signature) for d in datasets]
        self.extra = {"config": config_to_dict(cfg), "run": run}
        self.step, self.consumed = self._resume()
        self.ft = connect_islands(cfg, mesh, device)  # per-island launches: torchft's Manager
        self.outer = build_outer(self.model, self.optimizer, mesh, cfg, self.ft)
        self._resume_outer()
        if self.ft is not None and isinstance(self.outer, OuterSync):
            live = LiveState(self)
            self.ft.register("island", live.load_state_dict, live.state_dict)
            self.say(f"island {mesh.island}: joining the islands at step {self.step}", flush=True)
            try:
                self.step = self.outer.join(self.step)  # a live island ahead heals this one
            except BaseException:
                self.ft.shutdown()  # its server threads would keep the process up
                raise
        self.timer = StepTimer(cfg, device, mesh.world_size)
        self.result = TrainResult()
        ckpt = cfg.checkpoint
        self.saver = None
        if ckpt.dir is not None:
            enabled = use_async(ckpt.async_save, device)
            self.saver = AsyncSaver(ckpt.dir, ckpt.keep_last, ckpt.keep_every, enabled)

    def say(self, *args, **kwargs) -> None:
        if self.is_logger:
            print(*args, **kwargs)

    def _init_weights(self) -> None:
        ckpt = self.cfg.checkpoint
        resuming = ckpt.resume and latest_checkpoint(ckpt.dir) is not None
        if ckpt.init_from and not resuming:
            # Weights only, before the optimizer copies them into its fp32 masters.
            source = init_source(ckpt.init_from)
            load_checkpoint(source, self.model, None, self.model_dict, self.mesh, self.cfg.model)
            self.say(f"initialized the weights from {source}", flush=True)

    def _resume(self) -> tuple[int, int]:
        """(step, consumed samples) of the latest checkpoint when resuming, else (0, 0)."""
        step, consumed = 0, 0
        self.resumed_record: dict[str, Any] | None = None
        if self.cfg.checkpoint.resume:
            path = latest_checkpoint(self.cfg.checkpoint.dir)
            if path is not None:
                state = load_checkpoint(
                    path, self.model, self.optimizer, self.model_dict, self.mesh, self.cfg.model
                )
                problem = manifest.resume_problem(state.extra.get("run", {}), self.extra["run"])
                if problem is not None:
                    raise CheckpointError(f"{path}: {problem}")
                step, consumed = state.step, state.consumed_samples
                self.resumed_record = state.extra.get(LOG_RECORD)
                self.say(f"resumed from {path} at step {step}", flush=True)
        if self.mesh.world_size > 1:
            # Every rank must resume from the same step (e.g. not from a non-shared filesystem).
            steps = torch.tensor([step, -step], dtype=torch.float64, device=self.device)
            dist.all_reduce(steps, op=dist.ReduceOp.MIN)
            if steps[0] != -steps[1]:
                raise CheckpointError(
                    f"ranks resumed from different steps ({int(steps[0])} to "
                    f"{int(-steps[1])}); checkpoint.dir must be on a filesystem every rank sees"
                )
        return step, consumed

    def _resume_outer(self) -> None:
        """The islands' own state (outer optimizer, anchor, per-island weights) of the step
        resumed from (yuanlfa.train.islands)."""
        if self.step > 0 and isinstance(self.outer, OuterSync):
            load_island_state(
                self.cfg.checkpoint.dir,
                self.step,
                self.mesh,
                self.model,
                self.optimizer,
                self.outer,
            )

    def describe(self) -> str:
        cfg, mesh, layout = self.cfg, self.mesh, self.layout
        n_params = sum(p.numel() for p in self.model.parameters())
        pipeline = ""
        if layout is not None:
            pipeline = (
                f" x pp {mesh.pp} ({cfg.parallel.schedule}, blocks {list(layout.blocks)}, "
                f"{self.micro_batches} microbatches)"
            )
        return (
            f"model: {n_params / 1e6:.2f}M parameters on this rank, {cfg.model.num_layers} "
            f"layers, hidden {cfg.model.hidden_size} | data: {self.data.prefix} "
            f"({len(self.data.train)} train samples) | device {self.device}, "
            f"{str(self.dtype).removeprefix('torch.')} | tp {mesh.tp} x dp {mesh.dp}"
            f"{pipeline}{' + sequence parallel' if cfg.parallel.sequence_parallel else ''}"
            f"{f' x islands {mesh.islands} ({cfg.outer.algorithm})' if mesh.islands > 1 else ''}"
            f"{f', this launch island {mesh.island}' if mesh.launched else ''}"
            f"{' | sharded optimizer (ZeRO-1)' if uses_sharded_optimizer(cfg, mesh) else ''}"
        )

    def run(self) -> TrainResult:
        t = self.cfg.train
        self.say(self.describe(), flush=True)
        logger = MetricsLogger(
            self.cfg.logging,
            t.steps,
            enabled=self.is_logger,
            start_step=self.step,
            start_record=self.resumed_record,
        )
        loader = StepLoader(
            self.data.train,
            consumed=self.consumed,
            global_batch=t.global_batch_size,
            micro_batch=t.micro_batch_size,
            dp_rank=self.mesh.data_rank,
            dp=self.mesh.data_dp,
            device=self.device,
            num_workers=self.cfg.data.num_workers,
        )
        try:
            reserved = False
            while self.step < t.steps:
                record = self.train_step(loader)
                if not reserved and self.saver is not None:
                    # The optimizer state exists now: the staging buffers are allocated behind
                    # the next steps rather than in the first save.
                    self.saver.reserve(self.model, self.optimizer, self.mesh, self.cfg.model)
                    reserved = True
                self.note_saved(self.saver.poll() if self.saver else None, record)
                exiting = bool(t.exit_interval) and self.step % t.exit_interval == 0
                exiting = exiting and self.step < t.steps
                last = self.step == t.steps or exiting
                if self.eval_due(last):
                    record["eval_loss"] = self.evaluate()
                self.maybe_save(last, exiting, record)
                if last and self.saver is not None:  # the end and a clean exit publish the save
                    self.note_saved(self.saver.wait(), record)
                console = last or self.step == 1 or self.step % self.cfg.logging.log_interval == 0
                logger.log(record, console=console or "eval_loss" in record)
                self.result.records.append(record)
                if exiting:
                    self.say(f"exiting at step {self.step} (train.exit_interval={t.exit_interval})")
                    break
        finally:
            loader.close()
            logger.close()
            if self.ft is not None:
                self.ft.shutdown()
        summary = busy_summary(self.result.records)
        if summary is not None:
            self.say(summary, flush=True)
        return self.result

    def train_step(self, loader: StepLoader) -> dict[str, Any]:
        """One optimizer step on this data-parallel rank's share of the next global batch."""
        t, mesh = self.cfg.train, self.mesh
        self.timer.start()
        lr = learning_rate(self.cfg.optim, self.step, t.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = loader.next_step()
        # A synchronous warm-start step (outer.warm_start_steps): the islands reduce their
        # gradients together, as the ranks of one data-parallel run.
        across = None
        if isinstance(self.outer, OuterSync) and self.outer.synchronous(self.step):
            across = mesh.island_group
        # Normalize by the tokens of the whole global batch, so the gradient is that of the
        # global-batch mean loss however the batch is split into microbatches and ranks.
        num_tokens = sum(b["loss_mask"].sum() for b in batches)
        num_tokens = sum_over(sum_over(num_tokens, mesh.dp_group), across)
        # Zero the gradient buffers; arm the reduction that overlaps the last backward pass.
        self.grad_sync.start(self.micro_batches)
        with dropout_step(self.dropout_state()), self.budget.watch():
            loss_sum = sum_over(self.forward_backward(batches, num_tokens), mesh.dp_group)
        loss_sum = sum_over(loss_sum, across)
        grad_norm = self.grad_sync.finish(self.cfg.optim.clip_grad, across)
        skipped = not self.update(grad_norm)
        self.step += 1
        self.budget.check(self.optimizer, self.step)
        self.consumed += t.global_batch_size
        record: dict[str, Any] = {
            "step": self.step,
            "loss": float(loss_sum),
            "lr": lr,
            "grad_norm": grad_norm,
            **self.timer.stop(),
            "mem_gb": memory_gb(self.device),
        }
        if self.runner is not None:
            record.update(stage_stats(self.runner, mesh, memory_gb(self.device), self.device))
            if self.predicted_busy is not None:
                record["predicted_busy_s"] = self.predicted_busy
        if self.outer is not None:
            record.update(self.outer.after_step(self.step))
        if skipped:
            record["skipped"] = True
        return record

    def dropout_state(self) -> DropoutStep:
        """Which samples this step's microbatches hold (the loader's order: dp rank r takes the
        r-th contiguous share of the global batch), for the layout-free dropout masks."""
        t = self.cfg.train
        local = t.global_batch_size // self.mesh.data_dp
        start = self.consumed + self.mesh.data_rank * local
        return DropoutStep(
            t.seed, self.step, tuple(range(start, start + local)), t.micro_batch_size
        )

    def forward_backward(
        self, batches: list[dict[str, torch.Tensor]], num_tokens: torch.Tensor
    ) -> torch.Tensor:
        """Run every microbatch forward and backward; return this rank's loss (its share of
        the global-batch mean, on every pipeline rank)."""
        loss_sum = torch.zeros((), device=self.device)
        if self.runner is not None:
            # The schedule splits this rank's batch back into the same microbatches.
            with _autocast(self.device, self.dtype):
                part = self.runner.train_step(concat_batches(batches), num_tokens)
            return from_last_stage(part, self.mesh, loss_sum)
        for batch in batches:
            with _autocast(self.device, self.dtype):
                losses = self.model(batch["tokens"], batch["position_ids"], labels=batch["labels"])
            loss = (losses * batch["loss_mask"]).sum() / num_tokens
            loss.backward()
            loss_sum += loss.detach()
        return loss_sum

    def update(self, grad_norm: float) -> bool:
        """Step the optimizer unless the gradients are not finite; returns whether it stepped."""
        finite = math.isfinite(grad_norm)
        if not finite:
            message = f"step {self.step + 1}: gradient norm is {grad_norm}"
            if self.cfg.train.stop_on_nan:
                raise NonFiniteGradients(message + "; stopping (train.stop_on_nan=true)")
            self.say(message + "; skipping the update", flush=True)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    def eval_due(self, last: bool) -> bool:
        interval = self.cfg.train.eval_interval
        due = last or (interval and self.step % interval == 0)
        return self.data.valid is not None and bool(due)

    def evaluate(self) -> float:
        if self.runner is None:
            return evaluate(self.model, self.data.valid, self.cfg, self.device, self.dtype)
        return evaluate_pipeline(
            self.runner,
            self.model,
            self.data.valid,
            self.cfg,
            self.mesh,
            self.device,
            lambda: _autocast(self.device, self.dtype),
        )

    def maybe_save(self, last: bool, exiting: bool, record: dict[str, Any]) -> None:
        """Save when due: the step only stages its tensors when saves are asynchronous
        (``save_blocking_s`` is the time the loop was held); ``save_total_s`` is logged when the
        save is published (a later step's poll, the next save, or the end)."""
        ckpt = self.cfg.checkpoint
        interval_due = ckpt.interval and self.step % ckpt.interval == 0
        if self.saver is None or not (interval_due or exiting or (last and ckpt.save_at_end)):
            return
        if isinstance(self.outer, OuterSync):
            save_island_state(
                ckpt.dir, self.step, self.mesh, self.model, self.optimizer, self.outer
            )
        # The step's record travels in the manifest: a process killed after the save is
        # published but before the record reached the log gets it back on resume.
        extra = {**self.extra, LOG_RECORD: dict(record)}
        started, previous = self.saver.save(
            self.model,
            self.optimizer,
            TrainingState(self.step, self.consumed, self.model_dict, extra),
            self.mesh,
            self.cfg.model,
            layout_record(self.cfg, self.layout),
        )
        self.note_saved(previous, record)
        record["save_blocking_s"] = round(started.blocking_s, 4)
        if not self.saver.in_flight:  # written inline: already published
            self.note_saved(SaveDone(started.path, started.blocking_s), record)

    def note_saved(self, done: SaveDone | None, record: dict[str, Any]) -> None:
        if done is None:
            return
        self.result.final_checkpoint = done.path
        record["save_total_s"] = round(done.total_s, 4)
        self.say(f"saved checkpoint {done.path}", flush=True)
