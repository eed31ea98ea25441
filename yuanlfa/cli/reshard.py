"""yuanlfa-reshard: convert checkpoints between our layout-free format and the Hugging Face
Yuan 2.0 format (weights only), streaming tensor by tensor.

Our format needs no resharding tool between layouts: any tp / pp / dp loads any checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from yuanlfa.checkpoint import CheckpointError
from yuanlfa.checkpoint.hf import export_hf, import_hf, verify_hf

DTYPES = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="yuanlfa-reshard", description=__doc__)
    parser.add_argument("--input", required=True, help="source checkpoint directory")
    parser.add_argument("--output", required=True, help="directory to create")
    parser.add_argument(
        "--to",
        required=True,
        choices=["hf", "yuanlfa"],
        help="hf: our checkpoint -> Hugging Face safetensors; yuanlfa: the reverse",
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="keep", help="HF output dtype")
    parser.add_argument("--max-shard-gb", type=float, default=2.0, help="HF shard size limit")
    parser.add_argument("--verify", action="store_true", help="re-read and compare the output")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    src, out = Path(args.input), Path(args.output)
    try:
        if args.to == "hf":
            export_hf(
                src,
                out,
                dtype=DTYPES[args.dtype],
                max_shard_bytes=int(args.max_shard_gb * 2**30),
                force=args.force,
                progress=not args.quiet,
            )
            if args.verify:
                n = verify_hf(src, out, progress=not args.quiet)
                print(f"verified {n} tensors", flush=True)
        else:
            import_hf(src, out, force=args.force, progress=not args.quiet)
            if args.verify:
                n = verify_hf(out, src, progress=not args.quiet)
                print(f"verified {n} tensors", flush=True)
    except CheckpointError as exc:
        print(f"yuanlfa-reshard: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
