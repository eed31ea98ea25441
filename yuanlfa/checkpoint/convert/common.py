"""What the converters share: their output directories (complete or absent), the streamed
writing of our format, the model config carried in foreign files, the architectures the released
formats can hold, and the tensor-by-tensor verification of a conversion."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from yuanlfa.checkpoint import manifest
from yuanlfa.checkpoint.blocks import LazyTensor
from yuanlfa.checkpoint.dcp_direct import read_tensor
from yuanlfa.checkpoint.dcp_records import stored_tensors
from yuanlfa.checkpoint.errors import CheckpointError
from yuanlfa.checkpoint.files import fsync_dir, resolve_checkpoint, step_name
from yuanlfa.config import ModelConfig
from yuanlfa.model import build_model

# What Yuan 2.0's code hard-codes (its HF modeling code and its Megatron code alike): the RoPE
# base (LlamaRotaryEmbedding's default, never passed) and the LFA output norm's epsilon
# (LocalizedFiltering builds RMSNorm(h) / RMSNorm(h, eps=1e-6)). Its Megatron code hard-codes
# 1e-6 for every RMSNorm; its HF code reads rms_norm_eps for the others, but ours has one
# model.norm_eps for all norms, LFA's included.
YUAN_ROPE_BASE = 10000.0
YUAN_NORM_EPS = 1e-6
HF = "Hugging Face"


def return_freed_buffers() -> None:
    """Make glibc give every freed buffer of 1 MiB or more back to the system at once.

    By default glibc raises its mmap threshold to the size of the last freed mapping (up to 32
    MiB), so the many tensors of 1-32 MiB a conversion reads and frees one after another come
    from the heap, which does not shrink while a later block is alive: measured on the 2B
    export to Megatron, the heap grew by a few MiB per tensor to about one embedding (0.5 GiB)
    beside the tensors in flight. A fixed threshold keeps it at the tensors in flight. A
    process-wide setting, so only the conversion command sets it (its process entry)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 2**20)  # M_MMAP_THRESHOLD (a fixed value also ends the adjustment)
    except (OSError, AttributeError):  # not glibc: its allocator behaves otherwise
        pass


def release_problems(cfg: ModelConfig, target: str) -> list[str]:
    """Every setting of ``cfg`` that Yuan 2.0's code for ``target`` (``HF`` or ``Megatron``)
    would not reproduce, each naming the value Yuan uses."""
    problems = []
    # Yuan's HF attention always builds the LFA (lf_gate); its Megatron code has --use-lf-gate.
    filters = ("lfa",) if target == HF else ("lfa", "none")
    if cfg.filter_name not in filters:
        problems.append(
            f"model.filter is {cfg.filter_name!r} (Yuan's {target} code has "
            f"{' or '.join(filters)} only)"
        )
    if cfg.attention != "causal":
        problems.append(f"model.attention is {cfg.attention!r} (Yuan's code: causal)")
    if cfg.rope_base != YUAN_ROPE_BASE:
        problems.append(f"model.rope_base is {cfg.rope_base:g} (Yuan's code: 10000)")
    if cfg.norm_eps != YUAN_NORM_EPS:
        problems.append(f"model.norm_eps is {cfg.norm_eps:g} (Yuan's code: 1e-06 in the LFA norm)")
    if cfg.lfa_reset_at_doc_start:
        problems.append("model.lfa_reset_at_doc_start is true (Yuan's LFA never restarts)")
    # Yuan's HF code masks across <eod> only while training or with reset_position_ids, never
    # restarts positions there, and its flash path ignores the mask: no setting reproduces it.
    if cfg.document_attention and target == HF:
        problems.append("model.document_attention is true (Yuan's HF code: causal over the sample)")
    return problems


def require_release_architecture(cfg: ModelConfig, target: str) -> None:
    """Stop before anything is written when Yuan 2.0's code would compute another model."""
    problems = release_problems(cfg, target)
    if problems:
        raise CheckpointError(
            f"the {target} format of Yuan 2.0 cannot hold this model: {'; '.join(problems)}; "
            "keep this checkpoint in yuanlfa's format"
        )


def read_source(path: Path) -> tuple[Path, dict[str, Any], ModelConfig]:
    """Our checkpoint to convert (a step directory, or a checkpoint.dir with ``latest``): its
    path, manifest and model."""
    path = resolve_checkpoint(path)
    meta = manifest.read_meta(path)
    return path, meta, manifest.model_config(meta)


def weight_keys(path: Path, cfg: ModelConfig) -> Iterator[tuple[str, str]]:
    """(parameter name, key holding its best copy): fp32 masters when the run kept them."""
    keys = set(stored_tensors(path))
    for name, _ in build_model(cfg).named_parameters():
        master = manifest.master_key(name)
        yield name, master if master in keys else manifest.model_key(name)


def prepare_output(output: Path, force: bool) -> Path:
    """A fresh temporary directory next to ``output``, to be moved into place when complete."""
    if output.exists() and any(output.iterdir()) and not force:
        raise CheckpointError(
            f"{output} exists and is not empty; choose another output or pass --force"
        )
    tmp = output.parent / f".{output.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def replace_output(tmp: Path, output: Path) -> None:
    """Move the finished output into place; an existing one (--force) is removed only after."""
    old = output.parent / f".{output.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if output.exists():
        os.replace(output, old)
    os.replace(tmp, output)
    fsync_dir(output.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_ours(
    output: Path,
    tensors: list[LazyTensor],
    state: manifest.TrainingState,
    layout: dict[str, Any],
    optimizer: dict[str, Any] | None,
    *,
    force: bool,
    progress: bool,
) -> Path:
    """Our checkpoint directory (``output/step_<N>`` + latest) from tensors produced one at a
    time; ``output`` appears only when complete."""
    # DCP's writer side (the publishing of a checkpoint imports torch.distributed.checkpoint):
    # only conversions into our format need it.
    from yuanlfa.checkpoint.layout_free import publish
    from yuanlfa.checkpoint.storage import save_lazy

    out_root = Path(output)
    tmp = prepare_output(out_root, force)
    name = step_name(state.step)
    inner = tmp / f".{name}.tmp"
    if progress:
        print(f"import: writing {len(tensors)} tensors", flush=True)
    try:
        save_lazy(inner, tensors)
        publish(tmp, name, inner, manifest.build_meta(state, layout, optimizer), keep_last=1)
        replace_output(tmp, out_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed conversion leaves no debris
        raise
    return out_root


def verify_weights(
    ours: Path,
    other: Path,
    open_other: Callable[[ModelConfig], Callable[[str], torch.Tensor]],
    progress: bool = True,
) -> int:
    """Compare every parameter of our checkpoint with the converted one exactly (after casting
    ours to its dtype); raise on the first difference. ``open_other(cfg)`` returns the other
    checkpoint's parameter by our name. Returns the number of tensors compared."""
    from tqdm import tqdm

    ours, _, cfg = read_source(ours)
    theirs_of = open_other(cfg)
    params = list(weight_keys(ours, cfg))
    for name, key in tqdm(params, desc="verify", disable=not progress, unit="tensor"):
        theirs = theirs_of(name)
        mine = read_tensor(ours, key).to(theirs.dtype)
        if mine.shape != theirs.shape or not torch.equal(mine, theirs):
            raise CheckpointError(f"verify: {name} differs between {ours} and {other}")
    return len(params)
