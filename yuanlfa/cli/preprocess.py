"""yuanlfa-preprocess: tokenize text, JSON-lines or Yuan 2.0-format files into a Megatron .bin/.idx
pair."""

from __future__ import annotations

import argparse
import glob
import os

from yuanlfa.cli.common import add_debug_arg, run
from yuanlfa.data import (
    DataError,
    MMapIndexedDataset,
    build_tokenizer,
    default_corpus_files,
    preprocess_files,
)
from yuanlfa.data.preprocess import INPUT_FORMATS


def _expand(patterns: list[str]) -> list[str]:
    """Files matched by each pattern (``**`` recurses), in pattern order, without repeats."""
    files: list[str] = []
    seen: set[str] = set()
    for pattern in patterns:
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if not os.path.isdir(p))
        if not matches:
            raise DataError(f"--input {pattern!r} matches no files")
        for path in matches:
            if path not in seen:
                seen.add(path)
                files.append(path)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="yuanlfa-preprocess", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input",
        nargs="+",
        metavar="GLOB",
        help="files or glob patterns (quote them; ** recurses); .jsonl files give one document "
        "per line, any other file is one document",
    )
    source.add_argument(
        "--default-corpus",
        action="store_true",
        help="tokenize the embedded default corpus (this Python's standard library sources)",
    )
    parser.add_argument(
        "--output-prefix", required=True, metavar="PATH", help="writes PATH.bin and PATH.idx"
    )
    parser.add_argument("--tokenizer", default="byte", help="tokenizer name (default: byte)")
    parser.add_argument(
        "--input-format",
        choices=INPUT_FORMATS,
        default="auto",
        help="auto (default): .jsonl files give one document per line, any other file is one "
        "document, text as given; yuan: every file holds one sample per line in Yuan 2.0's "
        "format (newlines written <n>), tokenized as Yuan 2.0's preprocessing does: the line "
        "stripped, <n> turned into newlines, one <eod> appended",
    )
    parser.add_argument(
        "--json-key", default="text", help="field holding the text in .jsonl files (default: text)"
    )
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    parser.add_argument("--no-eod", action="store_true", help="do not end documents with <eod>")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output pair")
    parser.add_argument(
        "--skip-existing",
        action="store_true",
        help="do nothing when a valid output pair already exists (for re-runnable scripts)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_debug_arg(parser)
    args = parser.parse_args(argv)
    return run("yuanlfa-preprocess", lambda: _run(parser, args), args)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:

    if args.skip_existing and args.force:
        parser.error("--skip-existing and --force exclude each other")
    if args.default_corpus and args.input_format != "auto":
        parser.error(
            "--default-corpus is Python sources, not Yuan-format text: drop --input-format"
        )
    if args.skip_existing and _valid_output(args.output_prefix):
        print(f"{args.output_prefix}.bin/.idx exist and are valid; skipping (--skip-existing)")
        return 0
    tokenizer = build_tokenizer(args.tokenizer)
    files = default_corpus_files() if args.default_corpus else _expand(args.input)
    stats = preprocess_files(
        files,
        args.output_prefix,
        tokenizer,
        workers=args.workers,
        json_key=args.json_key,
        append_eod=not args.no_eod,
        progress=not args.quiet,
        force=args.force,
        input_format=args.input_format,
    )
    prefix = args.output_prefix
    print(
        f"{stats['documents']} documents, {stats['tokens']} tokens from {stats['files']} files "
        f"in {stats['seconds']:.1f}s -> {prefix}.bin, {prefix}.idx"
    )
    return 0


def _valid_output(prefix: str) -> bool:
    try:
        MMapIndexedDataset(prefix)
    except DataError:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
