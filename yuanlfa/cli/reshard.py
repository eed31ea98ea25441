"""yuanlfa-reshard: convert checkpoints between our layout-free format, the Megatron / Yuan 2.0
format (any tp, pp and block list) and the Hugging Face Yuan 2.0 format, streaming tensor by
tensor.

    yuanlfa-reshard --input ckpt/ --output megatron/ --to megatron --target-tp 2 --target-pp 3 \\
        --target-blocks 1,3,2
    yuanlfa-reshard --input megatron/ --output ours/ --to yuanlfa     # split read from args
    yuanlfa-reshard --input megatron/ --output tp1/ --to megatron --target-tp 1 --target-pp 1
    yuanlfa-reshard --input ours/ --output hf/ --to hf --dtype bf16 --verify

The input format is detected. Our own format needs no resharding between layouts (any tp / pp /
dp loads any checkpoint); conversions between two foreign formats go through ours in a temporary
directory next to the output. Outputs appear only when complete and are never overwritten
without --force.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from yuanlfa.checkpoint import CheckpointError
from yuanlfa.checkpoint.files import LATEST
from yuanlfa.checkpoint.convert.hf import INDEX, export_hf, import_hf, verify_hf
from yuanlfa.checkpoint.convert.megatron import (
    TRACKER,
    export_megatron,
    import_megatron,
    verify_megatron,
)

DTYPES = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def detect_format(path: Path) -> str:
    """yuanlfa, megatron or hf; a clear error for anything else."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if (path / "meta.json").is_file() or (path / LATEST).is_file():
        return "yuanlfa"
    if (path / TRACKER).is_file() or path.name.startswith("iter_"):
        return "megatron"
    if (path / "config.json").is_file() and (
        (path / INDEX).is_file() or (path / "model.safetensors").is_file()
    ):
        return "hf"
    raise CheckpointError(
        f"{path}: not a checkpoint this tool reads (expected our meta.json / latest, Megatron's "
        f"{TRACKER} or an iter_* directory, or a Hugging Face config.json with safetensors)"
    )


def _blocks(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(b) for b in text.replace(" ", "").split(",") if b]
    except ValueError:
        raise CheckpointError(f"{flag}: {text!r} is not a list of integers like 2,3,1") from None


def _model_config(path: str | None):
    if path is None:
        return None
    from yuanlfa.config import load_config

    return load_config(path).model


def to_ours(src: Path, fmt: str, out: Path, args: argparse.Namespace) -> None:
    quiet = args.quiet
    if fmt == "hf":
        import_hf(src, out, force=args.force, progress=not quiet)
    else:
        import_megatron(
            src,
            out,
            blocks=_blocks(args.blocks, "--blocks"),
            model_cfg=_model_config(args.config),
            weights_only=args.weights_only,
            force=args.force,
            progress=not quiet,
        )


def convert(args: argparse.Namespace) -> Path:
    src, out = Path(args.input), Path(args.output)
    fmt = detect_format(src)
    if args.to == "megatron" and (args.target_tp is None or args.target_pp is None):
        raise CheckpointError("--to megatron needs --target-tp and --target-pp")
    if args.to == "yuanlfa" and fmt == "yuanlfa":
        raise CheckpointError(
            f"{src} is already in our format; it loads into any tp / pp / dp as it is"
        )
    if out.exists() and any(out.iterdir()) and not args.force:
        raise CheckpointError(f"{out} exists and is not empty; choose another output or --force")
    staging = None
    ours = src
    if args.to == "yuanlfa":
        to_ours(src, fmt, out, args)
        if args.verify:
            verify = verify_hf if fmt == "hf" else verify_megatron
            print(f"verified {verify(out, src, progress=not args.quiet)} tensors", flush=True)
        return out
    try:
        if fmt != "yuanlfa":
            staging = out.parent / f".{out.name}.staging"
            shutil.rmtree(staging, ignore_errors=True)
            to_ours(src, fmt, staging, argparse.Namespace(**{**vars(args), "force": True}))
            ours = staging
        if args.to == "hf":
            export_hf(
                ours,
                out,
                dtype=DTYPES[args.dtype],
                max_shard_bytes=int(args.max_shard_gb * 2**30),
                force=args.force,
                progress=not args.quiet,
            )
            verify = verify_hf
        else:
            export_megatron(
                ours,
                out,
                tp=args.target_tp,
                pp=args.target_pp,
                blocks=_blocks(args.target_blocks, "--target-blocks"),
                weights_only=args.weights_only,
                dtype=DTYPES[args.dtype],
                force=args.force,
                progress=not args.quiet,
            )
            verify = verify_megatron
        if args.verify:
            print(f"verified {verify(ours, out, progress=not args.quiet)} tensors", flush=True)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="yuanlfa-reshard",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--input", required=True, help="source checkpoint directory")
    parser.add_argument("--output", required=True, help="directory to create")
    parser.add_argument("--to", required=True, choices=["hf", "yuanlfa", "megatron"])
    parser.add_argument("--target-tp", type=int, help="tensor parallelism of Megatron output")
    parser.add_argument("--target-pp", type=int, help="pipeline stages of Megatron output")
    parser.add_argument(
        "--target-blocks", help="layers per stage of Megatron output, e.g. 1,3,2 (default: even)"
    )
    parser.add_argument(
        "--blocks", help="layers per stage of a Megatron input whose args do not record them"
    )
    parser.add_argument(
        "--config", help="yuanlfa YAML describing a Megatron input whose args lack the model"
    )
    parser.add_argument(
        "--weights-only",
        action="store_true",
        help="leave out the optimizer state (by default it is converted where present)",
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="keep", help="output weights")
    parser.add_argument("--max-shard-gb", type=float, default=2.0, help="HF shard size limit")
    parser.add_argument("--verify", action="store_true", help="re-read and compare the output")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for flag in ("target_tp", "target_pp"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    try:
        out = convert(args)
    except CheckpointError as exc:
        print(f"yuanlfa-reshard: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
