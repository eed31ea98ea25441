"""yuanlfa-train-tokenizer: train a SentencePiece model on local text or JSON-lines files (or the
embedded default corpus), with Yuan 2.0's special tokens, byte fallback and split digits.

    yuanlfa-train-tokenizer --default-corpus --vocab-size 4000 --output-prefix runs/tok/spm
    yuanlfa-preprocess --default-corpus --tokenizer sentencepiece:runs/tok/spm.model \\
        --output-prefix runs/data/stdlib_spm
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator

from yuanlfa.cli.common import add_debug_arg, run
from yuanlfa.cli.preprocess import _expand
from yuanlfa.data import DataError, default_corpus_files
from yuanlfa.data.preprocess import check_not_compressed
from yuanlfa.data.spm import SentencePieceTokenizer, train_sentencepiece


def _texts(files: list[str], json_key: str) -> Iterator[str]:
    for path in files:
        if not path.lower().endswith(".jsonl"):
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()
            continue
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
                text = record.get(json_key) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise DataError(f"{path}:{lineno}: no string field {json_key!r}")
                yield text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="yuanlfa-train-tokenizer",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="GLOB", help="text or .jsonl files")
    source.add_argument(
        "--default-corpus", action="store_true", help="the embedded corpus (Python's stdlib)"
    )
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.model, .vocab")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--json-key", default="text", help="text field of .jsonl records")
    parser.add_argument(
        "--max-sentences", type=int, default=2_000_000, help="lines sampled for training"
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--force", action="store_true", help="overwrite an existing model")
    parser.add_argument(
        "--skip-existing",
        action="store_true",
        help="do nothing when PREFIX.model exists and loads (for re-runnable scripts)",
    )
    add_debug_arg(parser)
    args = parser.parse_args(argv)
    return run("yuanlfa-train-tokenizer", lambda: _run(parser, args), args)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.skip_existing and args.force:
        parser.error("--skip-existing and --force exclude each other")
    model = f"{args.output_prefix}.model"
    if args.skip_existing and os.path.isfile(model):
        try:
            SentencePieceTokenizer(model)
        except DataError:
            pass  # unreadable: train it again (with --force semantics for this file)
        else:
            print(f"{model} exists and loads; skipping (--skip-existing)")
            return 0
        args.force = True
    files = default_corpus_files() if args.default_corpus else _expand(args.input)
    for path in files:
        check_not_compressed(str(path))  # before SentencePiece reads anything
    out = train_sentencepiece(
        _texts([str(f) for f in files], args.json_key),
        args.output_prefix,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        max_sentences=args.max_sentences,
        seed=args.seed,
        force=args.force,
    )
    print(f"wrote {out} ({args.vocab_size} pieces); use it as sentencepiece:{out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
