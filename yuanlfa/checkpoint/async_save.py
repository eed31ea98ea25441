"""Saves that do not stop training: stage this rank's blocks, write them in a background thread.

The step that saves only copies its tensors (to pinned host memory on GPU, to a host copy on
CPU); a writer thread then writes them in the layout-free format (the same files as
:func:`~yuanlfa.checkpoint.layout_free.save_checkpoint`) while training continues. At most one
save is in flight: the next save waits for the previous one.

Completion protocol, multi-rank: the writer threads run DCP's save over a process group of
their own (gloo, made once, so their collectives never interleave with the training loop's),
which gathers every rank's write result; the threads then agree (an all-reduce) that every
rank's tensors and RNG file are on disk, rank 0's thread publishes (``meta.json`` last, rename,
``latest``, prune) and a second all-reduce tells every rank whether that worked. The training
loop learns the outcome through :meth:`AsyncSaver.poll` (every step while a save is in flight:
one all-reduce over the training group so that all ranks see it at the same step) or
:meth:`AsyncSaver.wait`. A failed write raises there, on every rank, naming the directory; the
partial directory is removed and ``latest`` still names the previous complete checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from yuanlfa.checkpoint.blocks import Block
from yuanlfa.checkpoint.errors import CheckpointError
from yuanlfa.checkpoint.layout_free import (
    SaveJob,
    begin_save,
    publish,
    save_blocks,
    write_job,
)
from yuanlfa.checkpoint.manifest import TrainingState
from yuanlfa.checkpoint.storage import distributed, first_failure
from yuanlfa.config import ModelConfig
from yuanlfa.parallel.collectives import collective_device
from yuanlfa.parallel.mesh import Mesh


@dataclass(frozen=True)
class SaveStarted:
    """What the step that saved logs: ``save_blocking_s``, the time the loop was held."""

    path: Path
    blocking_s: float


@dataclass(frozen=True)
class SaveDone:
    """A published checkpoint; ``total_s`` from the save call to its publication."""

    path: Path
    total_s: float


def use_async(setting: bool | None, device: torch.device) -> bool:
    """``checkpoint.async_save``: None (auto) saves asynchronously on GPU only (on CPU the
    writer competes with training for the same cores)."""
    return device.type == "cuda" if setting is None else setting


def _describe(error: BaseException) -> str:
    """One line: DCP wraps each rank's error, with its traceback, in a CheckpointException."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        rank = min(failures)
        error = first_failure(error)
        return f"rank {rank}: {type(error).__name__}: {error}"
    return f"{type(error).__name__}: {error}"


# The background writer's scheduling priority (Linux nice, 0-19): where training and the
# writer compete for a core, the scheduler gives it to training, and the writer uses what
# training leaves. Measured on 2 shared cores under load from other jobs (a 1 GB save every
# 5 steps): steps overlapping the writer took 2x as long at nice 0 and as long as steps
# without it at nice 19. On a machine with a core to spare for the writer it changes nothing.
WRITER_NICE = 19


def _lower_priority(nice: int) -> None:
    """Make the calling thread (only it: Linux's setpriority takes a thread id) run at
    ``nice``; raising it needs no privilege. Elsewhere it is left as it is."""
    if sys.platform.startswith("linux") and nice > 0:
        with contextlib.suppress(OSError):  # a sandbox may refuse: the save still works
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))


class _Stager:
    """Host copies of a rank's blocks, kept across saves (the block list is the same every save,
    so after the first save staging allocates nothing). :meth:`reserve` allocates them ahead,
    in a background thread, so that the first save does not pay for it either."""

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []
        self._reserving: threading.Thread | None = None

    def _fits(self, blocks: list[Block]) -> bool:
        return len(self.buffers) == len(blocks) and all(
            b.shape == blk.tensor.shape and b.dtype == blk.tensor.dtype
            for b, blk in zip(self.buffers, blocks, strict=True)
        )

    def reserve(self, blocks: list[Block]) -> None:
        """Allocate (and fault in: a fresh buffer's pages cost as much as the copy) the buffers
        for ``blocks`` in a background thread; :meth:`stage` waits for it."""
        if self._reserving is not None or self._fits(blocks):
            return
        like = [(b.tensor.shape, b.tensor.dtype, b.tensor.is_cuda) for b in blocks]

        def allocate() -> None:
            buffers = []
            for shape, dtype, pinned in like:
                buffers.append(torch.empty(shape, dtype=dtype, pin_memory=pinned))
                buffers[-1].zero_()
            self.buffers = buffers

        self._reserving = threading.Thread(
            target=allocate, name="yuanlfa-checkpoint-reserve", daemon=True
        )
        self._reserving.start()

    def stage(self, blocks: list[Block]) -> list[Block]:
        if self._reserving is not None:
            self._reserving.join()
            self._reserving = None
        if not self._fits(blocks):
            self.buffers = [self._buffer(b.tensor) for b in blocks]
        on_gpu = False
        for buf, blk in zip(self.buffers, blocks, strict=True):
            on_gpu |= blk.tensor.is_cuda
            buf.copy_(blk.tensor.detach(), non_blocking=blk.tensor.is_cuda)
        if on_gpu:
            torch.cuda.synchronize()  # the copies are async; the writer reads the buffers
        return [replace(blk, tensor=buf) for buf, blk in zip(self.buffers, blocks, strict=True)]

    @staticmethod
    def _buffer(t: torch.Tensor) -> torch.Tensor:
        return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)


class AsyncSaver:
    """Layout-free checkpoints of one run, written in the background (``enabled``) or inline.

    Collective: every rank makes one (the writers' process group is created here) and calls
    :meth:`save`, :meth:`poll` and :meth:`wait` at the same steps. Call :meth:`wait` at the end
    of training and before a clean exit, so the last save is published."""

    def __init__(
        self,
        directory: str | Path,
        keep_last: int = 2,
        keep_every: int | None = None,
        enabled: bool = True,
    ) -> None:
        if keep_last < 1:
            raise CheckpointError(f"checkpoint.keep_last: must be >= 1, got {keep_last}")
        if keep_every is not None and keep_every < 1:
            raise CheckpointError(
                f"checkpoint.keep_every: must be >= 1 (or unset), got {keep_every}"
            )
        self.directory = Path(directory)
        self.keep_last, self.keep_every, self.enabled = keep_last, keep_every, enabled
        self.group = None
        if enabled and distributed():
            # DCP's collectives from the writer thread must not meet the training loop's.
            self.group = dist.new_group(backend="gloo")
        self._stager = _Stager()
        self._thread: threading.Thread | None = None
        self._job: SaveJob | None = None
        self._started = 0.0
        self._error: BaseException | None = None

    def reserve(self, model: nn.Module, optimizer, mesh: Mesh, model_cfg: ModelConfig) -> None:
        """Allocate the staging buffers ahead of the first save, in the background (the
        trainer calls it after its first optimizer step, when the optimizer state exists)."""
        if self.enabled:
            self._stager.reserve(save_blocks(model, optimizer, mesh, model_cfg))

    @property
    def in_flight(self) -> bool:
        return self._thread is not None

    def save(
        self,
        model: nn.Module,
        optimizer,
        state: TrainingState,
        mesh: Mesh,
        model_cfg: ModelConfig,
        layout: dict[str, Any],
    ) -> tuple[SaveStarted, SaveDone | None]:
        """Collective. Start saving ``state.step`` (after publishing the save in flight, whose
        :class:`SaveDone` is returned with it); with ``enabled`` false, save inline."""
        previous = self.wait()
        started = time.perf_counter()
        job = begin_save(
            self.directory,
            model,
            optimizer,
            state,
            mesh,
            model_cfg,
            layout,
            self.keep_last,
            self.keep_every,
        )
        if not self.enabled:
            self._run(job)
            self._raise_failure()
            return SaveStarted(job.final, time.perf_counter() - started), previous
        job = replace(job, blocks=self._stager.stage(job.blocks))
        self._job, self._started, self._error = job, started, None
        self._thread = threading.Thread(
            target=self._run_in_background,
            args=(job,),
            name="yuanlfa-checkpoint-writer",
            daemon=True,
        )
        self._thread.start()
        return SaveStarted(job.final, time.perf_counter() - started), previous

    def poll(self) -> SaveDone | None:
        """Collective while a save is in flight (cheap otherwise): the save's outcome once every
        rank's writer has finished, else None. Raises a failed save's error on every rank."""
        if self._thread is None:
            return None
        done = not self._thread.is_alive()
        if distributed():
            flag = torch.tensor([1 if done else 0], device=collective_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            done = bool(flag.item())
        return self._finish() if done else None

    def wait(self) -> SaveDone | None:
        """Collective: block until the save in flight is published (None when there is none)."""
        if self._thread is None:
            return None
        return self._finish()

    def _finish(self) -> SaveDone:
        assert self._thread is not None and self._job is not None
        self._thread.join()
        job, self._thread, self._job = self._job, None, None
        self._raise_failure()
        return SaveDone(job.final, time.perf_counter() - self._started)

    def _raise_failure(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise CheckpointError(
                f"checkpoint save into {self.directory} failed ({_describe(error)}); the run "
                "stops here, "
                "the last complete checkpoint (named by latest) is kept"
            ) from error

    def _run_in_background(self, job: SaveJob) -> None:
        _lower_priority(WRITER_NICE)
        self._run(job)

    def _run(self, job: SaveJob) -> None:
        """The writer (a background thread, or inline): write, agree, publish, agree. Any
        failure, an agreement's own included, is kept for poll/wait to raise: a thread that died
        silently would report an unpublished save as done."""
        try:
            self._write_and_publish(job)
        except BaseException as exc:
            self._error = exc

    def _write_and_publish(self, job: SaveJob) -> None:
        error: BaseException | None = None
        try:
            write_job(job, self.group)
        except BaseException as exc:  # reported by poll/wait in the training thread
            error = exc
        if not self._all_ok(error is None):
            error = error or CheckpointError("another rank's write failed (its error says why)")
        if error is None and job.meta is not None:
            try:
                publish(job.root, job.name, job.tmp, job.meta, job.keep_last, job.keep_every)
            except BaseException as exc:
                error = exc
        if not self._all_ok(error is None) and error is None:
            error = CheckpointError(f"rank 0 could not publish {job.final}")
        self._error = error

    def _all_ok(self, ok: bool) -> bool:
        group = self.group if self.enabled else None
        if not distributed():
            return ok
        # The CPU for the saver's own gloo group, the default group's device otherwise.
        flag = torch.tensor([1 if ok else 0], device=collective_device(group))
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        return bool(flag.item())
