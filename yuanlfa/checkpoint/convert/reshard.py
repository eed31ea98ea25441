"""Any supported format to any other: the format of the input is detected; our own format needs
no resharding between layouts (any tp / pp / dp loads any checkpoint), so conversions between two
foreign formats go through ours in a temporary directory next to the output, except Megatron ->
Megatron without ``--verify``, which is direct. Outputs appear only when complete and are never
overwritten without ``force``."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from yuanlfa.checkpoint.convert.hf import BIN_INDEX, INDEX, export_hf, import_hf, verify_hf
from yuanlfa.checkpoint.convert.megatron import (
    TRACKER,
    export_megatron,
    import_megatron,
    reshard_megatron,
    verify_megatron,
)
from yuanlfa.checkpoint.errors import CheckpointError
from yuanlfa.checkpoint.files import LATEST
from yuanlfa.checkpoint.manifest import is_complete
from yuanlfa.config import ModelConfig, load_config
from yuanlfa.model.registry import check_model_config

FORMATS = ("hf", "yuanlfa", "megatron")


@dataclass(frozen=True)
class Reshard:
    """One conversion. Block lists are text like ``2,3,1`` (parsed when needed); ``config`` a
    yuanlfa YAML describing a Megatron input whose args lack the model."""

    input: Path
    output: Path
    to: str
    target_tp: int | None = None
    target_pp: int | None = None
    target_blocks: str | None = None
    blocks: str | None = None
    config: str | None = None
    weights_only: bool = False
    dtype: torch.dtype | None = None
    max_shard_bytes: int = 2 * 2**30
    verify: bool = False
    force: bool = False
    progress: bool = True
    # A data.tokenizer spec for the HF export's special ids and tokenizer files, in place of
    # the run's (e.g. when its model file has moved).
    tokenizer: str | None = None


def detect_format(path: Path) -> str:
    """yuanlfa, megatron or hf; a clear error for anything else."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if is_complete(path) or (path / LATEST).is_file():
        return "yuanlfa"
    if (path / TRACKER).is_file() or path.name.startswith("iter_"):
        return "megatron"
    weights = (INDEX, "model.safetensors", BIN_INDEX, "pytorch_model.bin")
    if (path / "config.json").is_file() and any((path / w).is_file() for w in weights):
        return "hf"
    raise CheckpointError(
        f"{path}: not a checkpoint this tool reads (expected our meta.json / latest, Megatron's "
        f"{TRACKER} or an iter_* directory, or a Hugging Face config.json with safetensors or "
        "pytorch_model.bin weights)"
    )


def check_output(src: Path, out: Path) -> None:
    """The output is a directory (or nothing yet) apart from the input: --force replaces an
    existing output, and an output that is, contains or lies inside the input would replace or
    mix with the source checkpoint."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--output {out} is a file; give a directory to create")
    a, b = src.resolve(), out.resolve()
    if a == b or a in b.parents or b in a.parents:
        where = "is" if a == b else ("lies inside" if a in b.parents else "contains")
        raise CheckpointError(
            f"--output {out} {where} the input {src}; choose an output outside it (even "
            "--force never writes over the source)"
        )


def parse_blocks(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(b) for b in text.replace(" ", "").split(",") if b]
    except ValueError:
        raise CheckpointError(f"{flag}: {text!r} is not a list of integers like 2,3,1") from None


def _model_config(path: str | None) -> ModelConfig | None:
    if path is None:
        return None
    model = load_config(path).model
    check_model_config(model)  # plug-ins and component names, before any checkpoint is read
    return model


def _to_ours(src: Path, fmt: str, out: Path, job: Reshard) -> None:
    if fmt == "hf":
        import_hf(src, out, force=job.force, progress=job.progress)
    else:
        import_megatron(
            src,
            out,
            blocks=parse_blocks(job.blocks, "--blocks"),
            model_cfg=_model_config(job.config),
            weights_only=job.weights_only,
            force=job.force,
            progress=job.progress,
        )


def reshard(job: Reshard) -> Path:
    """Run ``job``; returns the output directory. A failure leaves no temporary directory
    behind, and the existing output (with --force) untouched."""
    try:
        return _reshard(job)
    except BaseException:
        # The converters build the output in .NAME.tmp next to it (convert.common.prepare_output,
        # which clears it before each use, so it holds nothing of anyone else).
        out = Path(job.output)
        shutil.rmtree(out.parent / f".{out.name}.tmp", ignore_errors=True)
        raise


def _reshard(job: Reshard) -> Path:
    src, out = Path(job.input), Path(job.output)
    fmt = detect_format(src)
    if job.to not in FORMATS:
        raise CheckpointError(f"--to {job.to!r}: expected one of {', '.join(FORMATS)}")
    if job.to == "megatron" and (job.target_tp is None or job.target_pp is None):
        raise CheckpointError("--to megatron needs --target-tp and --target-pp")
    if job.to == "yuanlfa" and fmt == "yuanlfa":
        raise CheckpointError(
            f"{src} is already in our format; it loads into any tp / pp / dp as it is"
        )
    check_output(src, out)
    if out.exists() and any(out.iterdir()) and not job.force:
        raise CheckpointError(f"{out} exists and is not empty; choose another output or --force")
    if job.to == "yuanlfa":
        _to_ours(src, fmt, out, job)
        if job.verify:
            if fmt == "hf":
                count = verify_hf(out, src, progress=job.progress)
            else:
                blocks = parse_blocks(job.blocks, "--blocks")
                count = verify_megatron(out, src, progress=job.progress, blocks=blocks)
            print(f"verified {count} tensors", flush=True)
        return out
    if fmt == "megatron" and job.to == "megatron" and not job.verify:
        # Directly, each source byte read once (--verify compares against our format, so it
        # goes through it).
        return reshard_megatron(
            src,
            out,
            tp=job.target_tp,
            pp=job.target_pp,
            target_blocks=parse_blocks(job.target_blocks, "--target-blocks"),
            blocks=parse_blocks(job.blocks, "--blocks"),
            model_cfg=_model_config(job.config),
            weights_only=job.weights_only,
            dtype=job.dtype,
            force=job.force,
            progress=job.progress,
        )
    staging = None
    ours = src
    try:
        if fmt != "yuanlfa":
            staging = out.parent / f".{out.name}.staging"
            shutil.rmtree(staging, ignore_errors=True)
            _to_ours(src, fmt, staging, dataclasses.replace(job, force=True))
            ours = staging
        if job.to == "hf":
            export_hf(
                ours,
                out,
                dtype=job.dtype,
                max_shard_bytes=job.max_shard_bytes,
                force=job.force,
                progress=job.progress,
                tokenizer=job.tokenizer,
            )
            verify = verify_hf
        else:
            export_megatron(
                ours,
                out,
                tp=job.target_tp,
                pp=job.target_pp,
                blocks=parse_blocks(job.target_blocks, "--target-blocks"),
                weights_only=job.weights_only,
                dtype=job.dtype,
                force=job.force,
                progress=job.progress,
            )
            verify = verify_megatron
        if job.verify:
            print(f"verified {verify(ours, out, progress=job.progress)} tensors", flush=True)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return out
