"""The layout-free checkpoint: every tensor under its global name with its global shape.

Written with torch.distributed.checkpoint by the ranks that own each block (one owner per block:
dp rank 0 for replicated state, tp rank 0 for tp-replicated parameters, every dp rank for its
slice of the distributed optimizer), plus ``meta.json`` (format, model config, layout, step,
consumed samples, run settings) and per-rank RNG states named by rank coordinates. Any tp / pp /
dp / stage split / optimizer mode loads any checkpoint: each rank reads the blocks it needs and
DCP computes the overlaps with the saved ones.

Keys: ``model.<name>`` (parameters, in their training dtype), ``optim.<name>.exp_avg`` and
``optim.<name>.exp_avg_sq`` (AdamW moments, fp32), ``optim.<name>.master`` (fp32 master weights,
when the parameters are kept in lower precision).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from yuanlfa.checkpoint.blocks import Block, local_blocks
from yuanlfa.checkpoint.files import (
    LATEST,
    CheckpointError,
    TrainingState,
    fsync_dir,
    prune,
    write_text_atomic,
)
from yuanlfa.checkpoint.planners import (
    BlockLoadPlanner,
    BlockSavePlanner,
    LazySavePlanner,
    LazyTensor,
)
from yuanlfa.checkpoint.torch_files import load_pickle_restricted, load_untrusted
from yuanlfa.config import ModelConfig, config_to_dict
from yuanlfa.model import build_model
from yuanlfa.parallel.mesh import Mesh
from yuanlfa.parallel.optim_state import OptimizerState, checkpoint_state
from yuanlfa.parallel.roles import is_pipeline_copy, is_sharded
from yuanlfa.parallel.tp.plan import shard_pieces

FORMAT = "yuanlfa-dcp-v1"
# Settings that do not change the parameters or their values (plug-in files may move).
IGNORED_MODEL_KEYS = ("lfa_impl", "attention_backend", "loss_block_size", "plugins")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


@contextlib.contextmanager
def _quiet_single_process():
    # DCP warns that it assumes a single process when no process group exists: that is the
    # intent here (one-process training and the conversion tools).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


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
    return replicas_write or mesh.dp_rank == 0


def _param_blocks(
    model: nn.Module, placer: _Placer, mesh: Mesh, saving: bool, keys: set[str] | None = None
) -> list[Block]:
    out = []
    for name, p in model.named_parameters():
        if saving and not _owns_param(p, mesh):
            continue
        key = f"model.{name}"
        # A lower-precision run saved fp32 master weights: an fp32 model loads those.
        master = f"optim.{name}.master"
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
            (f"optim.{name}.exp_avg", piece.exp_avg),
            (f"optim.{name}.exp_avg_sq", piece.exp_avg_sq),
        ]
        # fp32 masters of fp32 parameters equal them: saved once, as model.<name>.
        if piece.master is not None and not (saving and p.dtype == torch.float32):
            master = f"optim.{name}.master"
            if not saving and master not in keys:
                master = f"model.{name}"
            tensors.append((master, piece.master))
        for key, flat in tensors:
            out += placer.blocks(key, name, p.shape, flat, piece.start, piece.stop)
    return out


def _coords(mesh: Mesh) -> str:
    return f"tp{mesh.tp_rank}-pp{mesh.pp_rank}-dp{mesh.dp_rank}"


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer,
    state: TrainingState,
    mesh: Mesh,
    model_cfg: ModelConfig,
    layout: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Collective: every rank calls it. Writes ``step_<N>`` atomically (a hidden directory renamed
    into place once complete), points ``latest`` at it and keeps the newest ``keep_last``."""
    root = Path(directory)
    name = f"step_{state.step:07d}"
    final, tmp = root / name, root / f".{name}.tmp"
    if mesh.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a crashed save of this step
        (tmp / "rng").mkdir(parents=True)
    _barrier()
    placer = _Placer(model_cfg, mesh)
    optim_state = checkpoint_state(optimizer)
    adam_steps = optim_state.steps()
    optim_state.prepare(adam_steps)  # before the first update it has none
    blocks = _param_blocks(model, placer, mesh, saving=True)
    blocks += _optimizer_blocks(optim_state, model, placer, mesh, saving=True, keys=set())
    try:
        with _quiet_single_process():
            dcp.save(
                {},
                storage_writer=dcp.FileSystemWriter(tmp),
                planner=BlockSavePlanner(blocks),
                no_dist=not _distributed(),
            )
        rng_file = tmp / "rng" / f"{_coords(mesh)}.pt"
        torch.save(_rng_state(), rng_file)
        with open(rng_file, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        # The previous checkpoints are untouched; drop the partial one (a save of the same
        # step also clears it first, should this process die before getting here).
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    if mesh.rank == 0:
        meta = {
            "format": FORMAT,
            "step": state.step,
            "consumed_samples": state.consumed_samples,
            "model_config": state.model_config,
            "layout": layout,
            "optimizer": {
                "type": "adamw",
                "steps": adam_steps,
                "sharded": optim_state.sharded,
            },
            **state.extra,
        }
        publish(root, name, tmp, meta, keep_last)
    _barrier()
    return final


def publish(root: Path, name: str, tmp: Path, meta: dict[str, Any], keep_last: int) -> Path:
    """Finish a checkpoint written into ``tmp``: meta.json last, rename to ``root/name``
    (keeping a complete copy on disk at every moment), point ``latest`` at it, prune."""
    final = root / name
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    with open(tmp / "meta.json", "rb") as f:
        os.fsync(f.fileno())
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
    prune(root, keep_last, keep=name)
    return final


def save_lazy(directory: Path, tensors: list[LazyTensor]) -> None:
    """Write whole tensors produced one at a time (conversion tools), single process.

    One file per tensor: torch's FileSystemWriter keeps every tensor of a file alive until the
    file is complete, so a single file would hold the whole checkpoint in memory."""
    writer = dcp.FileSystemWriter(directory, thread_count=1, single_file_per_rank=False)
    with _quiet_single_process():
        dcp.save({}, storage_writer=writer, planner=LazySavePlanner(tensors), no_dist=True)


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with the metadata unpickled through an allow-list (DCP's own reader
    runs a bare ``pickle.load`` on it, so a crafted checkpoint would run code), read once
    (conversions call load hundreds of times). Tensor data is read by DCP with
    ``weights_only=True``."""

    def read_metadata(self, *args, **kwargs):
        if not hasattr(self, "_metadata"):
            path = Path(self.path) / ".metadata"
            try:
                with open(path, "rb") as f:
                    metadata = load_pickle_restricted(f, path)
            except OSError as exc:
                raise CheckpointError(
                    f"{path}: cannot read the checkpoint's metadata ({exc.strerror}); the "
                    "checkpoint is incomplete"
                ) from None
            if not isinstance(metadata, Metadata):
                raise CheckpointError(
                    f"{path}: holds a {type(metadata).__name__}, not checkpoint metadata"
                )
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            self._metadata = metadata
        return self._metadata


@functools.lru_cache(maxsize=8)
def _cached_reader(path: str, stamp: tuple[int, int]) -> SafeReader:
    return SafeReader(path)


def storage_reader(path: str | Path) -> SafeReader:
    """A reader of ``path``, reused while its metadata file is unchanged."""
    meta = Path(path) / ".metadata"
    try:
        st = meta.stat()
    except OSError:
        return SafeReader(path)  # raises a CheckpointError naming the file on use
    return _cached_reader(str(Path(path).resolve()), (st.st_mtime_ns, st.st_ino))


def stored_tensors(path: str | Path) -> dict[str, Any]:
    """Key -> DCP tensor metadata (global size, dtype) of the checkpoint at ``path``."""
    return storage_reader(path).read_metadata().state_dict_metadata


def load_blocks(path: Path, blocks: list[Block]) -> None:
    """Fill ``blocks`` from the checkpoint at ``path`` (collective when a group exists)."""
    with _quiet_single_process():
        dcp.load(
            {},
            storage_reader=storage_reader(path),
            planner=BlockLoadPlanner(blocks),
            no_dist=not _distributed(),
        )


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: no meta.json; not a complete yuanlfa checkpoint")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}; convert it with "
            "yuanlfa-reshard"
        )
    return meta


def _agree(problem: str | None) -> None:
    """Raise on every rank when any rank found a problem (a lone raise would hang the others
    in the collective load)."""
    bad = torch.tensor([0 if problem is None else 1])
    if _distributed():
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
        meta = read_meta(path)
        saved = meta.get("model_config", {})
        # Fields added after a checkpoint was written read as their defaults.
        saved = {**config_to_dict(ModelConfig()), **saved}
        diffs = [
            f"{k}: checkpoint {saved.get(k)!r} vs config {model_config.get(k)!r}"
            for k in sorted(set(saved) | set(model_config))
            if saved.get(k) != model_config.get(k) and k not in IGNORED_MODEL_KEYS
        ]
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
            steps = meta.get("optimizer", {}).get("steps", meta["step"])
            optim_state = checkpoint_state(optimizer)
            optim_state.prepare(steps)
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
    rng_file = path / "rng" / f"{_coords(mesh)}.pt"
    if rng_file.is_file():
        rng = load_untrusted(rng_file)
        torch.set_rng_state(rng["torch_cpu"])
        if "torch_cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["torch_cuda"])
    skip = ("format", "step", "consumed_samples", "model_config")
    extra = {k: v for k, v in meta.items() if k not in skip}
    return TrainingState(meta["step"], meta["consumed_samples"], saved, extra)
