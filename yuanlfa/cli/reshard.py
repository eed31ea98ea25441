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
import gc
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch

from yuanlfa.checkpoint.convert.common import return_freed_buffers
from yuanlfa.checkpoint.convert.reshard import FORMATS, Reshard, reshard
from yuanlfa.cli.common import add_debug_arg, run

DTYPES = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="yuanlfa-reshard",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--input", required=True, help="source checkpoint directory")
    parser.add_argument("--output", required=True, help="directory to create")
    parser.add_argument("--to", required=True, choices=list(FORMATS))
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
    parser.add_argument(
        "--tokenizer",
        help="data.tokenizer spec for --to hf, replacing the run's (e.g. a moved .model file)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_debug_arg(parser)
    args = parser.parse_args(argv)
    return run("yuanlfa-reshard", lambda: _run(parser, args), args)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    for flag in ("target_tp", "target_pp"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    job = Reshard(
        input=Path(args.input),
        output=Path(args.output),
        to=args.to,
        target_tp=args.target_tp,
        target_pp=args.target_pp,
        target_blocks=args.target_blocks,
        blocks=args.blocks,
        config=args.config,
        weights_only=args.weights_only,
        dtype=DTYPES[args.dtype],
        max_shard_bytes=int(args.max_shard_gb * 2**30),
        verify=args.verify,
        force=args.force,
        progress=not args.quiet,
        tokenizer=args.tokenizer,
    )
    out = reshard(job)
    print(f"wrote {out}", flush=True)
    return 0


def script() -> NoReturn:
    """The command's process: conversions free large buffers as they go (a process-wide
    allocator setting, so not made by :func:`main`, which tests and other programs call), and
    the process ends without the interpreter's teardown once :func:`main` has returned (every
    output is written and fsynced by then; tearing down torch's modules and thread pools took
    0.4 s of a 2B conversion's 5-9 s)."""
    return_freed_buffers()
    # The modules' objects (torch's: about a million) leave the collector's generations: its
    # full passes over them took 0.6 s of CPU in a 2B conversion that makes no cycles of note.
    gc.freeze()
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(script())
