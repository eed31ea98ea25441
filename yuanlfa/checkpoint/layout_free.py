"""The layout-free checkpoint: every tensor under its global name with its global shape.

Written with torch.distributed.checkpoint by the ranks that own each block (one owner per block:
dp rank 0 for replicated state, tp rank 0 for tp-replicated parameters, every dp rank for its
slice of the distributed optimizer), plus ``meta.json`` (format, model config, layout, step,
consumed samples, run settings) and per-rank RNG states named by rank coordinates. Any tp / pp /
dp / stage split / optimizer mode loads any checkpoint: each rank reads the blocks it needs and
DCP computes the overlaps with the saved ones. The manifest and the tensor keys are
:mod:`~yuanlfa.checkpoint.manifest`'s.
"""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from yuanlfa.checkpoint import manifest
from yuanlfa.checkpoint.blocks import Block, local_blocks
from yuanlfa.checkpoint.errors import CheckpointError
from yuanlfa.checkpoint.files import LATEST, fsync_dir, prune, step_name, write_text_atomic
from yuanlfa.checkpoint.manifest import TrainingState
from yuanlfa.checkpoint.planners import BlockSavePlanner
from yuanlfa.checkpoint.storage import (
    distributed,
    load_blocks,
    quiet_single_process,
    stored_tensors,
)
from yuanlfa.checkpoint.torch_files import load_untrusted
from yuanlfa.config import ModelConfig
from yuanlfa.model import build_model
from yuanlfa.parallel.collectives import collective_device
from yuanlfa.parallel.mesh import Mesh
from yuanlfa.parallel.optim_state import OptimizerState, checkpoint_state
from yuanlfa.parallel.roles import is_pipeline_copy, is_sharded
from yuanlfa.parallel.tp.plan import shard_pieces


def _barrier() -> None:
    if distributed():
        dist.barrier()


@functools.lru_cache(maxsize=4)  # every save of a run asks again; building even on meta costs
def _full_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in build_model(cfg).named_parameters()}


class _Placer:
    """Blocks of this rank's tensors in the global tensors."""

    def __init__(self, cfg: ModelConfig, mesh: Mesh) -> None:
        self.shapes = _full_shapes(cfg)
        self.mesh = mesh
        self.cfg = cfg

    def blocks(
        self, key: str, name: str, local_shape, flat: torch.Tensor, start=0, stop=None
    ) -> list[Block]:
        full = self.shapes[name]
        pieces = shard_pieces(name, full, self.mesh.tp_rank, self.mesh.tp, self.cfg)
        return local_blocks(key, full, pieces, tuple(local_shape), flat, start, stop)


def _owns_param(p: nn.Parameter, mesh: Mesh, replicas_write: bool = False) -> bool:
    """One writer per block: never the pipeline copy; tp rank 0 for tp-replicated parameters;
    dp rank 0 unless the dp replicas hold disjoint slices (``replicas_write``)."""
    if is_pipeline_copy(p):
        return False
    if not is_sharded(p) and mesh.tp_rank != 0:
        return False
    # Islands training apart write only the first island's state here (the others' goes to
    # their own files: yuanlfa.train.islands).
    return (replicas_write or mesh.dp_rank == 0) and (mesh.joined or mesh.island == 0)


def _param_blocks(
    model: nn.Module, placer: _Placer, mesh: Mesh, saving: bool, keys: set[str] | None = None
) -> list[Block]:
    out = []
    for name, p in model.named_parameters():
        if saving and not _owns_param(p, mesh):
            continue
        key = manifest.model_key(name)
        # A lower-precision run saved fp32 master weights: an fp32 model loads those.
        master = manifest.master_key(name)
        if not saving and keys is not None and master in keys and p.dtype == torch.float32:
            key = master
        out += placer.blocks(key, name, p.shape, p.data.view(-1))
    return out


def _optimizer_blocks(
    optimizer: OptimizerState,
    model: nn.Module,
    placer: _Placer,
    mesh: Mesh,
    saving: bool,
    keys: set[str],
) -> list[Block]:
    names = {id(p): n for n, p in model.named_parameters()}
    out: list[Block] = []
    for piece in optimizer.pieces():
        p, name = piece.param, names[id(piece.param)]
        if saving and not _owns_param(p, mesh, replicas_write=optimizer.sharded):
            continue
        tensors = [
            (manifest.optim_key(name, "exp_avg"), piece.exp_avg),
            (manifest.optim_key(name, "exp_avg_sq"), piece.exp_avg_sq),
        ]
        # fp32 masters of fp32 parameters equal them: saved once, as model.<name>.
        if piece.master is not None and not (saving and p.dtype == torch.float32):
            master = manifest.master_key(name)
            if not saving and master not in keys:
                master = manifest.model_key(name)
            tensors.append((master, piece.master))
        for key, flat in tensors:
            out += placer.blocks(key, name, p.shape, flat, piece.start, piece.stop)
    return out


def _rng_file(path: Path, mesh: Mesh) -> Path:
    return manifest.rng_file(path, mesh.tp_rank, mesh.pp_rank, mesh.data_rank)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


@dataclass
class SaveJob:
    """One checkpoint being written: this rank's blocks, RNG state and, on rank 0, the manifest.
    :func:`begin_save` makes it, :func:`write_job` writes it (in the background for an
    asynchronous save, from staged copies), :func:`publish` finishes it on rank 0."""

    root: Path
    name: str
    tmp: Path
    blocks: list[Block]
    rng: dict[str, torch.Tensor]
    rng_file: Path
    meta: dict[str, Any] | None  # rank 0 only
    keep_last: int
    keep_every: int | None

    @property
    def final(self) -> Path:
        return self.root / self.name


def save_blocks(model: nn.Module, optimizer, mesh: Mesh, model_cfg: ModelConfig) -> list[Block]:
    """This rank's blocks of a save: views into the live parameters and optimizer state."""
    placer = _Placer(model_cfg, mesh)
    optim_state = checkpoint_state(optimizer)
    optim_state.prepare(optim_state.steps())  # before the first update it has none
    blocks = _param_blocks(model, placer, mesh, saving=True)
    return blocks + _optimizer_blocks(optim_state, model, placer, mesh, saving=True, keys=set())


def begin_save(
    directory: str | Path,
    model: nn.Module,
    optimizer,
    state: TrainingState,
    mesh: Mesh,
    model_cfg: ModelConfig,
    layout: dict[str, Any],
    keep_last: int = 2,
    keep_every: int | None = None,
) -> SaveJob:
    """Collective. Create the hidden directory of ``step_<N>`` and collect this rank's blocks
    (views into the live tensors: stage them before training changes them)."""
    root = Path(directory)
    name = step_name(state.step)
    tmp = root / f".{name}.tmp"
    problem = None
    if mesh.rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # debris of a crashed save of this step
            (tmp / manifest.RNG_DIR).mkdir(parents=True)
        except OSError as exc:
            problem = (
                f"cannot create {tmp} ({exc.strerror}); make checkpoint.dir writable (the "
                "checkpoints already there are kept)"
            )
    _agree(problem)
    optim_state = checkpoint_state(optimizer)
    adam_steps = optim_state.steps()
    blocks = save_blocks(model, optimizer, mesh, model_cfg)
    meta = None
    if mesh.rank == 0:
        record = manifest.adamw_record(adam_steps, optim_state.sharded)
        meta = manifest.build_meta(state, layout, record)
    return SaveJob(
        root, name, tmp, blocks, _rng_state(), _rng_file(tmp, mesh), meta, keep_last, keep_every
    )


def write_job(job: SaveJob, group: dist.ProcessGroup | None = None) -> None:
    """Collective over ``group`` (the default group when None and distributed): write this
    rank's blocks and RNG file into the job's hidden directory, synced. DCP gathers every rank's
    write result, so when it returns on one rank all ranks' tensor files are written, and a
    failure on any rank raises on all. The partial directory is removed on failure."""
    try:
        with quiet_single_process():
            dcp.save(
                {},
                storage_writer=dcp.FileSystemWriter(job.tmp),
                planner=BlockSavePlanner(job.blocks),
                process_group=group,
                no_dist=not distributed(),
            )
        torch.save(job.rng, job.rng_file)
        with open(job.rng_file, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        # The previous checkpoints are untouched; drop the partial one (a save of the same
        # step also clears it first, should this process die before getting here).
        shutil.rmtree(job.tmp, ignore_errors=True)
        raise


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer,
    state: TrainingState,
    mesh: Mesh,
    model_cfg: ModelConfig,
    layout: dict[str, Any],
    keep_last: int = 2,
    keep_every: int | None = None,
) -> Path:
    """Collective: every rank calls it. Writes ``step_<N>`` atomically (a hidden directory renamed
    into place once complete), points ``latest`` at it and prunes what the retention policy
    (``keep_last`` newest, every ``keep_every``-th step) no longer keeps. Blocks until done;
    :class:`~yuanlfa.checkpoint.async_save.AsyncSaver` writes in the background."""
    job = begin_save(
        directory, model, optimizer, state, mesh, model_cfg, layout, keep_last, keep_every
    )
    write_job(job)
    _barrier()
    if job.meta is not None:
        publish(job.root, job.name, job.tmp, job.meta, job.keep_last, job.keep_every)
    _barrier()
    return job.final


def publish(
    root: Path,
    name: str,
    tmp: Path,
    meta: dict[str, Any],
    keep_last: int,
    keep_every: int | None = None,
) -> Path:
    """Finish a checkpoint written into ``tmp``: meta.json last, rename to ``root/name``
    (keeping a complete copy on disk at every moment), point ``latest`` at it, then prune."""
    final = root / name
    manifest.write_meta(tmp, meta)
    fsync_dir(tmp)
    if final.exists():
        backup = root / f".{name}.old"
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(final, backup)
        os.replace(tmp, final)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    write_text_atomic(root / LATEST, name + "\n")
    prune(root, keep_last, keep=name, keep_every=keep_every)
    return final


def _agree(problem: str | None) -> None:
    """Raise on every rank when any rank found a problem (a lone raise would hang the others
    in the collective load)."""
    bad = torch.tensor([0 if problem is None else 1], device=collective_device())
    if distributed():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if problem is not None:
        raise CheckpointError(problem)
    if bad.item():
        raise CheckpointError("another rank refused the checkpoint (its message says why)")


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer,
    model_config: dict[str, Any],
    mesh: Mesh,
    model_cfg: ModelConfig,
) -> TrainingState:
    """Collective. Restore this rank's parameters and optimizer state (any layout), and its RNG
    when the checkpoint has one for the same rank coordinates. Refuses a checkpoint of another
    model, or whose tensors are missing or shaped differently, naming the first ones."""
    path = Path(path)
    problem = None
    try:
        meta = manifest.read_meta(path)
        diffs = manifest.model_differences(manifest.saved_model_config(meta), model_config)
        if diffs:
            raise CheckpointError(
                f"{path} was saved for another model ({'; '.join(diffs[:3])}); use a matching "
                "config or another checkpoint.dir"
            )
        stored = stored_tensors(path)
        keys = set(stored)
        placer = _Placer(model_cfg, mesh)
        blocks = _param_blocks(model, placer, mesh, saving=False, keys=keys)
        if optimizer is not None:
            optim_state = checkpoint_state(optimizer)
            optim_state.prepare(manifest.adam_steps(meta))
            blocks += _optimizer_blocks(optim_state, model, placer, mesh, saving=False, keys=keys)
        missing = sorted({b.key for b in blocks if b.key not in keys})
        shapes = sorted(
            {
                f"{b.key} {tuple(stored[b.key].size)} vs {b.global_shape}"
                for b in blocks
                if b.key in keys and tuple(stored[b.key].size) != b.global_shape
            }
        )
        if missing or shapes:
            raise CheckpointError(
                f"{path} does not match the model: "
                + (
                    f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}; "
                    if missing
                    else ""
                )
                + (f"shape checkpoint vs model: {shapes[:3]}" if shapes else "")
            )
    except (CheckpointError, OSError, ValueError) as exc:
        problem = str(exc)
    _agree(problem)
    load_blocks(path, blocks)
    rng_file = _rng_file(path, mesh)
    if rng_file.is_file():
        rng = load_untrusted(rng_file)
        torch.set_rng_state(rng["torch_cpu"])
        if "torch_cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["torch_cuda"])
    return manifest.training_state(meta)
